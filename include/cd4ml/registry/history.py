"""An append-only history per model: promotions, deployments, rollbacks, retractions, approvals, canaries.

Each event is its own MLflow run in the experiment `<model>-history`, created once and never
written again: its small fields (kind, version, who, when, why) are run tags, its full record is the
run's `event.json` artifact. Two writers cannot overwrite each other (each creates a new run, with
a new id), and nothing is cut: a record too long for a tag is read back from the artifact. Reading
the history is one search over the experiment, ordered by `when` (then by the time MLflow recorded it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cd4ml.core.errors import Cd4mlError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

PROMOTION = "promotion"
DEPLOYMENT = "deployment"
ROLLBACK = "rollback"
RETRACTION = "retraction"
APPROVAL = "approval"  # a person approved, rejected or let time out a promotion (promotion.approval)
CANARY = "canary"  # a canary started, was promoted or was rolled back (deployment.strategy: canary)
KINDS = frozenset({PROMOTION, DEPLOYMENT, ROLLBACK, RETRACTION, APPROVAL, CANARY})

_PREFIX = "cd4ml.event."
_DETAILS_TAG = f"{_PREFIX}details"
_ARTIFACT = "event.json"
# MLflow refuses tag values over 5000 characters; longer fields stay whole in event.json.
_TAG_LIMIT = 5000
_IN_ARTIFACT = "<in event.json>"


class HistoryError(Cd4mlError):
    """An event cannot be recorded as given (the message names the field)."""


@dataclass(frozen=True)
class HistoryEvent:
    """One thing that happened to a model, as recorded: never changed after it is written."""

    kind: str
    version: str | None
    who: str
    why: str
    when: str
    details: dict[str, Any] = field(default_factory=dict)
    event_id: str = ""  # the MLflow run that holds it
    recorded_ms: int = 0

    @property
    def outcome(self) -> str:
        return str(self.details.get("outcome") or self.kind)


def experiment_name(name: str) -> str:
    return f"{name}-history"


def _experiment_id(mlflow_client: MlflowClient, name: str, *, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(experiment_name(name))
    if exp is not None:
        return str(exp.experiment_id)
    if not create:
        return None
    try:
        return str(mlflow_client.create_experiment(experiment_name(name), tags={"cd4ml.model": name}))
    except MlflowException as err:
        # Two first writers race to create it: the loser uses the winner's.
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    exp = mlflow_client.get_experiment_by_name(experiment_name(name))
    if exp is None:
        raise HistoryError(f"{name}: the history experiment {experiment_name(name)!r} vanished while created")
    return str(exp.experiment_id)


def _sort_key(event: HistoryEvent) -> tuple[float, int]:
    try:
        when = datetime.fromisoformat(event.when.replace("Z", "+00:00"))
        at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        at = event.recorded_ms / 1000  # an unparsable `when`: when MLflow got it is the best guess
    return at, event.recorded_ms


def append_event(
    mlflow_client: MlflowClient,
    name: str,
    *,
    kind: str,
    version: str | None,
    who: str,
    why: str,
    when: str,
    details: dict[str, Any] | None = None,
    key: str | None = None,
) -> None:
    """Record one event for model `name`. Never overwrites: each event is a new run.

    `key` makes a retried task's append idempotent: an event already recorded with the same key is
    not written again (without a key every call is a new event, as a second attempt really is).
    """
    if kind not in KINDS:
        raise HistoryError(f"{name}: event kind {kind!r} is not one of {sorted(KINDS)}")
    if not who.strip() or not when.strip():
        raise HistoryError(f"{name}: a {kind} event needs who and when (got who={who!r}, when={when!r})")
    try:
        datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(f"{name}: a {kind} event's when {when!r} is not an ISO 8601 time") from None
    experiment_id = _experiment_id(mlflow_client, name, create=True)
    assert experiment_id is not None
    if key and _find_key(mlflow_client, experiment_id, key):
        log.info("%s: %s event %s is already recorded", name, kind, key)
        return
    details = dict(details or {})
    record = {"kind": kind, "version": version, "who": who, "why": why, "when": when, "details": details}
    details_text = json.dumps(details, sort_keys=True, default=str)
    tags = {
        f"{_PREFIX}kind": kind,
        f"{_PREFIX}version": version or "",
        f"{_PREFIX}who": who,
        f"{_PREFIX}why": why,
        f"{_PREFIX}when": when,
        _DETAILS_TAG: details_text,
        "cd4ml.model": name,
        **({f"{_PREFIX}key": key} if key else {}),
    }
    tags = {k: v if len(v) <= _TAG_LIMIT else _IN_ARTIFACT for k, v in tags.items()}
    run = mlflow_client.create_run(
        experiment_id, run_name=f"{kind} v{version}" if version else kind, tags=tags
    )
    # The artifact first, the run marked finished last: a reader skips runs still being written.
    mlflow_client.log_dict(run.info.run_id, record, _ARTIFACT)
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")


def record_retraction(mlflow_client: MlflowClient, name: str, done: Any) -> None:
    """A retraction (cd4ml.data.landing.Retraction) as an event; keyed by file and time, so a retried
    task, or the CLI and the DAG reporting the same retraction, record it once."""
    append_event(
        mlflow_client, name, kind="retraction", version=None, who=done.who, why=done.reason, when=done.when,
        key=f"retraction:{done.sha256}:{done.when}",
        details={k: getattr(done, k) for k in ("file", "sha256", "rows", "accepted_at")},
    )  # fmt: skip


def _find_key(mlflow_client: MlflowClient, experiment_id: str, key: str) -> bool:
    escaped = key.replace("'", "\\'")
    found = mlflow_client.search_runs(
        [experiment_id],
        # Only a finished event counts: a run whose record failed to land is written again.
        filter_string=f"tags.`{_PREFIX}key` = '{escaped}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return bool(found)


def _event(mlflow_client: MlflowClient, run: Run) -> HistoryEvent:
    tags = run.data.tags
    record: dict[str, Any] | None = None
    if _IN_ARTIFACT in tags.values():
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="cd4ml-event-") as tmp:
            path = Path(mlflow_client.download_artifacts(run.info.run_id, _ARTIFACT, tmp))
            record = json.loads(path.read_text(encoding="utf-8"))

    def field_(short: str) -> str:
        return str(record[short] if record is not None else tags.get(f"{_PREFIX}{short}", "")) or ""

    if record is not None:
        details = dict(record.get("details") or {})
    else:
        details = json.loads(tags.get(_DETAILS_TAG) or "{}")
    return HistoryEvent(
        kind=field_("kind"),
        version=field_("version") or None,
        who=field_("who"),
        why=field_("why"),
        when=field_("when"),
        details=details,
        event_id=run.info.run_id,
        recorded_ms=int(run.info.start_time or 0),
    )


def events(mlflow_client: MlflowClient, name: str) -> list[HistoryEvent]:
    """Every recorded event of model `name`, oldest first; none yet is an empty list."""
    from mlflow.entities import ViewType

    experiment_id = _experiment_id(mlflow_client, name, create=False)
    if experiment_id is None:
        return []
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return sorted((_event(mlflow_client, r) for r in runs), key=_sort_key)
