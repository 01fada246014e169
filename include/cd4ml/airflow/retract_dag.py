"""`<model>__retract`: take an accepted file back, record who, when and why, and retrain without it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow.sdk import DAG, Metadata, Param, XComArg, dag, task

from cd4ml.airflow import assets
from cd4ml.airflow.common import START, context, default_args, params, run_time, who, xcom_dict
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data.landing import MIN_SHA_PREFIX

DOC = """\
### {name}: retract an accepted file

**What it does.** Moves one file from `{accepted}` to `quarantine/`, with a reason file that records
who retracted it, when and why. Nothing is deleted. From then on its rows are in no training set,
no holdout and no learned validation reference. The task is safe to retry: an interrupted move is
finished, and a file that is already retracted is reported, not moved twice.

**Which file.** The *File* field takes the stored name (`<sha16>__<name>`, as listed in
`accepted/`), the original name, or at least {min_sha} hex digits of the file's sha256. If the key
matches no accepted file, or more than one, the run fails, lists the candidates and moves nothing.

**Then.** The retraction is added to the model's history in MLflow (experiment `{name}-history`:
who, when, why, which file), once even if the task is retried. `request_retrain` emits
`{name}.new_data` with the retraction as the event's extra, which starts `{name}__train`. Its
run records the retraction as its trigger, and the new version's data fingerprint leaves the
file out. The *Models* view lists every retraction.

**What starts it.** Only a manual trigger. *Trigger* opens a form with the file and the reason.
The command line does the same: `cd4ml data retract {name} <file-or-sha> --reason "..."`.
"""


def build_retract_dag(spec: ModelSpec, settings: Settings) -> DAG:
    new_data = assets.new_data(spec, settings)

    @dag(
        dag_id=f"{spec.name}__retract",
        description=f"Retract an accepted {spec.name} file and retrain without it",
        doc_md=DOC.format(
            name=spec.name,
            accepted=ModelPaths.for_model(settings, spec.name).accepted,
            min_sha=MIN_SHA_PREFIX,
        ),
        schedule=None,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["cd4ml", spec.name, "retract"],
        default_args=default_args(spec, retries=1, retry_delay_s=10),
        params={
            "file": Param(
                "",
                type="string",
                maxLength=500,
                title="File",
                description=f"Stored name, original name or sha256 prefix (>= {MIN_SHA_PREFIX} hex "
                "digits) of the accepted file to take back.",
            ),
            "reason": Param(
                "",
                type="string",
                maxLength=500,
                title="Reason",
                description="Why it is retracted; recorded with who and when.",
            ),
        },
    )
    def retract_pipeline() -> None:
        @task
        def retract_file() -> dict[str, Any]:
            from dataclasses import asdict

            from cd4ml import registry
            from cd4ml.data.landing import retract

            ctx = context()
            form = params(ctx)
            zone = ModelPaths.for_model(settings, spec.name).ensure()
            done = retract(zone, str(form.get("file") or ""), reason=str(form.get("reason") or ""),
                           who=who(ctx), when=run_time(ctx))  # fmt: skip
            registry.record_retraction(registry.client(settings.mlflow_tracking_uri), spec.name, done)
            return asdict(done)

        @task(outlets=[new_data])
        def request_retrain(retraction: XComArg | dict[str, Any]) -> Iterator[Metadata]:
            retraction = xcom_dict("retract_file", retraction)
            keys = ("file", "sha256", "reason", "who", "when", "rows")
            yield Metadata(new_data, extra={"retracted": {k: retraction[k] for k in keys}})

        request_retrain(retract_file())

    return retract_pipeline()
