"""The docker-compose topology run on this machine, without Docker (`make test-scale`, bench_scale).

Every service of docker-compose.yaml except PostgreSQL and Redis runs as a local process with the
command and environment the compose file gives it (read through `cd4ml_dev.compose`, mapped onto local
hosts, ports and paths), in depends_on order, waiting for the same health checks. PostgreSQL and
Redis are the machine's own servers: each run gets private databases (`<prefix>_airflow`,
`<prefix>_mlflow`) and a private Redis db number, and removes them when it stops.

What Docker gives each container for free is emulated per process: its own hostname (Airflow's
`hostname_callable` reads CD4ML_REPLICA_HOSTNAME, which is what task_instance.hostname records) and
its own network namespace (the worker and triggerer log servers get free ports). Health checks
are the compose file's: HTTP probes are polled; `airflow jobs check` becomes the same query on the
metadata DB's job table, `celery inspect ping` the same ping through the broker.

One module per job: `mapping` (services -> ports, paths, URLs) and `plan` (-> processes), `lease`
(the private databases and Redis db, released in a finally, stale ones swept), `supervisor` and
`health` (start in order, probe, stop), `queries` (what tests ask); `topology.LocalTopology` sequences
them.
"""

from cd4ml_dev.scale.common import ScaleError, replica_hostname
from cd4ml_dev.scale.plan import Process
from cd4ml_dev.scale.topology import LocalTopology, running

__all__ = ["LocalTopology", "Process", "ScaleError", "replica_hostname", "running"]
