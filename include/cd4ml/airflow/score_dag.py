"""`<model>__score`: batch scoring with the champion, when files land in score/ or on the spec's cron."""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from cd4ml.airflow.assets import score_requested
from cd4ml.airflow.common import START, context, default_args, params
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec

DOC = """\
### {name}: batch scoring

**What it does.** Scores every CSV or Parquet file, or folder of part files (one table, e.g. a
Spark output), waiting in `{score}` with the current champion, in chunks of {chunk_rows:,} rows, so
a file larger than memory scores too. The champion is loaded once per run, as the prediction
service loads it; with the service's admin token it must carry cd4ml's promotion record. Each row
is checked as the service checks a request: a value of the wrong type or a non-finite number
sends the row to a rejects file with the reason, and the other rows are still scored.

**What it produces.** Per input, under `{runs}/<run>/<sha16>__<name>/`: `predictions.parquet`
{csv}with the row number, {keep}the prediction (and one `probability_<class>` column per
class), the model version, the run id and the input's sha256; `rejects.parquet` with the row
number, the columns at fault and why; and `manifest.json`. The input then moves to
`{inputs}`. An input that cannot be scored at all (not CSV or Parquet, unreadable, a missing
column) moves to `{quarantine}` with a reason file. The run is recorded in `run.json`, listed in
the *Models* view and counted on `/cd4ml/metrics`.

**What starts it.** A file or folder landing in `{score}` (within seconds; write it as `x.part` or
`.x` and rename it when complete), {schedule}, or a manual trigger (form: a path to score where it
is, instead of `score/`; such an input is never moved).

**When it fails.** Only when inputs were found and not one row could be scored: no champion yet
(the inputs wait in `score/`), a champion the service would refuse, or every input unreadable or
every row rejected; the message lists why. Only transient errors (MLflow unreachable) are retried,
and a retry never writes an output twice: it pins the version of its first try and skips what that
try finished.
"""


def build_score_dag(spec: ModelSpec, settings: Settings) -> DAG:
    requested = score_requested(spec, settings)
    paths = ModelPaths.for_model(settings, spec.name)
    scoring = spec.scoring
    schedule: Any = requested
    when = "no schedule (set `scoring.schedule` for one)"
    if scoring.schedule:
        schedule = AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(scoring.schedule, timezone="UTC"), assets=requested
        )
        when = f"the schedule `{scoring.schedule}` (UTC, `scoring.schedule`)"
    doc = DOC.format(
        name=spec.name,
        score=paths.score,
        runs=paths.score_runs,
        inputs=paths.scored_inputs,
        quarantine=paths.score_quarantine,
        chunk_rows=scoring.chunk_rows,
        csv="and `predictions.csv` (`scoring.csv`) " if scoring.csv else "",
        keep=f"the kept columns ({', '.join(scoring.keep_columns)}), " if scoring.keep_columns else "",
        schedule=when,
    )

    @dag(
        dag_id=f"{spec.name}__score",
        description=f"Score files dropped into {spec.name}'s score/ folder with the champion",
        doc_md=doc,
        schedule=schedule,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["cd4ml", spec.name, "score"],
        default_args=default_args(spec, retries=2, retry_delay_s=30),
        params={
            "path": Param(
                "",
                type="string",
                maxLength=1000,
                title="Path",
                description="Absolute path of a CSV/Parquet file or folder to score where it is (it is "
                "not moved). Empty: score what waits in score/.",
            ),
        },
    )
    def score_pipeline() -> None:
        @task
        def score_files() -> dict[str, Any]:
            from cd4ml.airflow.train_dag import run_context
            from cd4ml.steps.batch_score import score_pending

            ctx = context()
            run = run_context(ctx, with_service=True)
            source = str(params(ctx).get("path") or "").strip() or None
            token = run.service.admin_token if run.service else None
            return score_pending(spec, settings, run_id=run.run_id, run_time=run.run_time,
                                 trigger=run.trigger, signing_key=token, source=source).to_xcom()  # fmt: skip

        score_files()

    return score_pipeline()
