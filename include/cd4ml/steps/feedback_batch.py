"""Production data becomes training data: labelled served traffic, landed as one batch.

With `feedback.to_training: true` in the spec, the monitor calls `land_feedback_batch` on its
schedule. Predictions whose outcome was reported and not exported yet
(`cd4ml.data.feedback.labelled_predictions`: the logged features, the outcome, when it was
predicted and labelled) become one Parquet file in the model's `landing/`, with exactly the columns
a landed file has: the spec's features, the target (the outcome, cast to the type the accepted
training data has) and, when the spec declares one, the timestamp (the prediction time). From there
it is a landed file like any other: the landing watcher starts a training run, validation accepts
it or moves it to quarantine with a reason, and nothing is trained on it unseen.

What was exported is recorded under `<model>/feedback/to_training/`, not as a time watermark: a
label may arrive days after its prediction, and the label store keeps the label received last per
(request_id, row), so the same label sent again comes back with a newer `labelled_at`. The record
is a ledger of exported (request_id, row, outcome) keys, one Parquet part per batch
(`exported/<seq>.parquet`), and `state.json`, whose `next` batch number says which parts are
committed. A label is exported once per outcome: sent again, it is not exported again; corrected
to another outcome, the correction is exported (the earlier row stays in the training data until
its file is retracted). Only labels recorded at or before `now` are taken, so a retried run with
the same `now` selects the same rows.

Crash-safe and idempotent, three atomic writes (temp name, then rename): the batch's keys
(`exported/<seq>.parquet`, a journal until committed), the file in landing/
(`feedback__<seq>.parquet`), then `state.json` with `next = seq + 1` (the commit). A run that finds
batch `seq`'s journal and its file (in landing/, accepted/ or quarantine/) commits that batch
instead of exporting a new one; a journal without a file is a batch that never landed, discarded.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Export order and the ledger's key; `outcome` is compared as text (`category_text`).
ORDER = ["labelled_at", "request_id", "row"]
LEDGER = ["request_id", "row", "outcome"]
PREFIX = "feedback__"
STATE_FORMAT = 1
# Batches remembered in state.json, newest last (for people and the Models view; the ledger
# alone decides what is exported).
KEEP_BATCHES = 50


def export_dir(paths: ModelPaths) -> Path:
    """`<model>/feedback/to_training/`: state.json and the ledger `exported/<seq>.parquet`."""
    return paths.feedback_exports


def state_path(paths: ModelPaths) -> Path:
    return export_dir(paths) / "state.json"


def ledger_part(paths: ModelPaths, seq: int) -> Path:
    return export_dir(paths) / "exported" / f"{seq:06d}.parquet"


def batch_name(seq: int) -> str:
    """The landed file of batch `seq`: named by its number, so a retried run finds it."""
    return f"{PREFIX}{seq:06d}.parquet"


def read_state(paths: ModelPaths) -> dict[str, Any]:
    path = state_path(paths)
    if not path.is_file():
        return {"format": STATE_FORMAT, "next": 1, "batches": []}
    state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return state


def exported_keys(paths: ModelPaths, before: int) -> pd.DataFrame:
    """Every (request_id, row, outcome text) of the committed batches (numbers below `before`)."""
    import pandas as pd

    folder = ledger_part(paths, 1).parent
    parts = sorted(p for p in folder.glob("*.parquet") if p.stem.isdigit() and int(p.stem) < before) if (
        folder.is_dir()) else []  # fmt: skip
    if not parts:
        return pd.DataFrame({"request_id": pd.Series(dtype=object), "row": pd.Series(dtype="int64"),
                             "outcome": pd.Series(dtype=object)})  # fmt: skip
    return pd.concat([pd.read_parquet(p, columns=LEDGER) for p in parts], ignore_index=True)


def land_feedback_batch(spec: ModelSpec, settings: Settings, *, now: datetime) -> dict[str, Any]:
    """Land the labelled served traffic not exported yet as one file in `landing/`, once at least
    `feedback.min_rows` (else `validation.min_rows`) rows are ready, at most `feedback.max_rows`
    (else `validation.max_rows`) of them, oldest label first.

    Returns a JSON-able summary: `landed` (bool), `why`, `rows_ready`, and when a file was landed
    its `batch` number, `file`, `path`, `rows` and `labelled_through` (the last label's time).
    """
    from cd4ml.data.feedback import labelled_predictions

    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    if not spec.feedback.to_training:
        return {"landed": False, "rows_ready": 0, "why": "feedback.to_training is off in the spec"}
    paths = ModelPaths.for_model(settings, spec.name)
    state = read_state(paths)
    seq = int(state["next"])
    recovered = _recover(spec, paths, state, seq, now=now)
    if recovered is not None:
        return recovered
    ready = pending_labels(labelled_predictions(paths), exported_keys(paths, seq), now=now)
    wanted = spec.feedback_min_rows
    if len(ready) < wanted:
        return {
            "landed": False,
            "rows_ready": len(ready),
            "why": (
                f"{len(ready)} labelled predictions not exported yet; a batch waits for {wanted} "
                "(feedback.min_rows, else validation.min_rows)"
            ),
        }
    cap = spec.feedback_max_rows
    batch = ready if cap is None else ready.iloc[:cap]
    frame = training_frame(spec, batch, reference=_reference_frame(spec, paths))
    _write_parquet(_ledger(batch), ledger_part(paths, seq))  # the journal: which labels this batch holds
    target = _write_parquet(frame, paths.landing / batch_name(seq))
    log.info("%s: landed %d labelled predictions as %s", spec.name, len(frame), target)
    record = _commit(paths, state, seq, target, rows=len(frame), through=_iso(batch["labelled_at"].iloc[-1]),
                     now=now)  # fmt: skip
    left = len(ready) - len(batch)
    return {
        "landed": True,
        "rows_ready": len(ready),
        "why": f"{len(batch)} labelled predictions landed as {target.name}"
        + (f"; {left} more wait for the next batch (feedback.max_rows {cap})" if left else ""),
        **record,
    }


def _recover(
    spec: ModelSpec, paths: ModelPaths, state: dict[str, Any], seq: int, *, now: datetime
) -> dict[str, Any] | None:
    """Batch `seq`'s journal left by a run that crashed before its commit: commit the batch if its
    file landed, else discard the journal (nothing landed, its labels are still pending)."""
    import pandas as pd

    journal = ledger_part(paths, seq)
    if not journal.is_file():
        return None
    landed = _already_landed(paths, batch_name(seq))
    if landed is None:
        journal.unlink()
        log.warning("%s: discarded batch %d's journal: its file never landed", spec.name, seq)
        return None
    keys = pd.read_parquet(journal)
    through = _iso(keys["labelled_at"].max()) if "labelled_at" in keys and len(keys) else ""
    record = _commit(paths, state, seq, landed, rows=len(keys), through=through, now=now)
    log.warning("%s: batch %d had landed as %s before a crash; committed it", spec.name, seq, landed)
    return {"landed": True, "rows_ready": len(keys), "why": f"committed batch {seq}, landed by an earlier "
            f"attempt as {landed.name}", **record}  # fmt: skip


def _commit(
    paths: ModelPaths,
    state: dict[str, Any],
    seq: int,
    target: Path,
    *,
    rows: int,
    through: str,
    now: datetime,
) -> dict[str, Any]:
    record = {"batch": seq, "file": target.name, "path": str(target), "rows": rows,
              "labelled_through": through, "at": now.isoformat()}  # fmt: skip
    _write_json(state_path(paths), {
        "format": STATE_FORMAT,
        "next": seq + 1,
        "batches": [*state.get("batches", []), record][-KEEP_BATCHES:],
    })  # fmt: skip
    return record


def _ledger(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[[*LEDGER, "labelled_at"]].reset_index(drop=True)


def pending_labels(labelled: pd.DataFrame, exported: pd.DataFrame, *, now: datetime) -> pd.DataFrame:
    """Labelled predictions recorded at or before `now` whose (request_id, row, outcome) was not
    exported yet, oldest label first; `outcome` as text (`category_text`), the rest as logged."""
    import pandas as pd

    from cd4ml.data.tables import category_text

    if labelled.empty:
        return labelled.assign(outcome_value=pd.Series(dtype=object))
    missing = [c for c in [*ORDER, "ts", "outcome"] if c not in labelled.columns]
    if missing:
        raise KeyError(f"labelled predictions lack the columns {missing} (cd4ml.data.feedback contract)")
    out = labelled.assign(
        labelled_at=pd.to_datetime(labelled["labelled_at"], utc=True),
        request_id=labelled["request_id"].astype(str),
        row=labelled["row"].astype("int64"),
        outcome_value=labelled["outcome"],
        outcome=labelled["outcome"].map(category_text).astype(object),
    )
    out = out[out["labelled_at"] <= pd.Timestamp(now).tz_convert("UTC")]
    if len(exported):
        done = pd.MultiIndex.from_frame(
            exported[LEDGER].astype({"request_id": str, "row": "int64", "outcome": object})
        )
        out = out[~pd.MultiIndex.from_frame(out[LEDGER]).isin(done)]
    return out.sort_values(ORDER, kind="mergesort").reset_index(drop=True)


def training_frame(spec: ModelSpec, batch: pd.DataFrame, *, reference: pd.DataFrame | None) -> pd.DataFrame:
    """The spec's columns from labelled predictions: features as logged, the outcome as the target
    (cast to the accepted data's type when every outcome casts cleanly, else left as text so that
    validation refuses it with a reason), the prediction time as the timestamp."""
    import pandas as pd

    from cd4ml.data.tables import category_text

    out = pd.DataFrame(index=batch.index)
    for col in spec.feature_names:
        # A feature the serving model did not log (the spec gained it since): all null, which
        # validation refuses by name rather than this module guessing a value.
        out[col] = batch[col] if col in batch.columns else None
    for col in spec.categorical:
        # As text, as validation and training compare categoricals (the service logs them so): one
        # type per column, whatever a hand-written log part holds.
        out[col] = out[col].map(category_text).astype(object)
    out[spec.target] = cast_outcomes(
        spec, batch["outcome_value"], None if reference is None else reference.get(spec.target)
    )
    if spec.timestamp:
        out[spec.timestamp] = _timestamps(
            batch["ts"], None if reference is None else reference.get(spec.timestamp)
        )
    return out[spec.columns].reset_index(drop=True)


def cast_outcomes(spec: ModelSpec, outcomes: pd.Series, like: pd.Series | None) -> pd.Series:
    """Outcomes in the type the training data has its target in (ints stay ints, "1" becomes 1 for
    an integer target, 1 becomes "1" for a text target); anything that does not cast stays text."""
    import pandas as pd

    from cd4ml.data.tables import category_text

    text = outcomes.map(category_text).astype(object)
    kind = like.dtype.kind if like is not None and len(like) else ("f" if spec.task == "regression" else None)
    if kind is None:  # no training data to copy: as they came, if one type, else as text
        kinds = {type(v) for v in outcomes.dropna()}
        return outcomes if len(kinds) <= 1 and not outcomes.isna().any() else text
    if kind in "iuf":
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers.notna().all():
            if kind == "f":
                return numbers.astype("float64")
            if (numbers == numbers.round()).all():
                return numbers.astype(str(like.dtype) if like is not None else "int64")
        return text
    if kind == "b":
        folded = text.str.strip().str.lower().map({"true": True, "false": False, "1": True, "0": False})
        return folded.astype(bool) if folded.notna().all() else text
    return text


def _timestamps(ts: pd.Series, like: pd.Series | None) -> pd.Series:
    """The prediction time in the form the training data's timestamp column has: datetimes (tz-aware
    or naive UTC) stay datetimes, text becomes ISO 8601 UTC text, numbers epoch seconds. One form per
    column keeps the accepted files concatenable (Parquet refuses a column of mixed types)."""
    import pandas as pd

    when = pd.to_datetime(ts, utc=True)
    kind = like.dtype.kind if like is not None else "M"
    if kind == "M":
        aware = getattr(like.dtype, "tz", None) is not None if like is not None else True
        return when if aware else when.dt.tz_localize(None)
    if kind in "iuf":
        return (when - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return when.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").astype(object)


def _reference_frame(spec: ModelSpec, paths: ModelPaths) -> pd.DataFrame | None:
    """The newest accepted file, read as training reads it: its column types are the ones to copy."""
    from cd4ml.core.errors import DataReadError
    from cd4ml.data import landing
    from cd4ml.data.tables import read_table

    accepted = landing.list_accepted(paths)
    if not accepted:
        return None
    newest = accepted[-1]
    try:
        return read_table(Path(newest.path))
    except DataReadError as err:
        log.warning("%s: cannot read %s to copy its column types (%s); outcomes keep their own", spec.name,
                    newest.name, err)  # fmt: skip
        return None


def _iso(value: Any) -> str:
    import pandas as pd

    return str(pd.Timestamp(value).tz_convert("UTC").isoformat())


def _already_landed(paths: ModelPaths, name: str) -> Path | None:
    """Where a batch of this name is, if an earlier attempt landed it (it may have moved on)."""
    candidates = [paths.landing / name]
    for zone in (paths.accepted, paths.quarantine):
        if zone.is_dir():
            candidates += [p for p in zone.glob(f"*__{name}*") if not p.name.endswith((".json", ".txt"))]
    return next((p for p in candidates if p.is_file()), None)


def _write_parquet(frame: pd.DataFrame, target: Path) -> Path:
    # A hidden temp name: the landing watcher and collect_landed_files skip it until the rename.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, target)
    return target


def _write_json(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, path)
