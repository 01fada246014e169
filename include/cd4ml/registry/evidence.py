"""A version's evidence as artifacts of its training run, under `cd4ml/`:

    cd4ml/decision.json     the champion/challenger decision and its evidence, whole
    cd4ml/validation.json   the validation record of the data it was trained on, whole
    cd4ml/spec.yaml         the spec text it was trained from
    cd4ml/snapshots.json    what the training set and holdout hold (rows, columns, digest)
    cd4ml/batches.json      the accepted files they were built from, in order (artifacts-v2)
    cd4ml/snapshots/<name>.parquet   copies of them (artifacts-v1 versions only)

Tags keep small scalars only (`cd4ml.evidence_format`, `cd4ml.validation_status`); any machine that
reaches MLflow can read the rest. Versions registered before this layout have their evidence in JSON
tags (cut at 5,000 characters) and local snapshot paths: the readers fall back to those. New versions
carry no JSON tags (`cd4ml.evidence`, `cd4ml.validation`): `read_evidence` is the one way to read them.

`read_evidence(..., cached=True)` remembers a version's evidence for the process once its artifacts are
complete (the format tag is set last and the files never change after it), so a page that lists many
versions reads each from MLflow once; versions without artifacts are read afresh every time.

Accepted data, stored once (format `artifacts-v2`, the default for new versions when the
registering step passes the accepted files): every accepted file is logged once, by content hash,
as `batches/<sha256>/<file name>` of one run per model (experiment `<model>-data`, tag
`cd4ml.data_store`); a version stores `cd4ml/batches.json`, the ordered list of the files it was
trained on, and in `snapshots.json` the row counts, columns and a digest of its training set and
holdout instead of copies of their rows. `reference_frame` rebuilds them with the same
read/normalise/split functions training used, from the version's stored spec. MLflow then grows by
each accepted file's bytes once plus a few kB per version (linear in the data) instead of by a copy
of all the training data per version (quadratic in the number of batches until the snapshot cap).

Snapshots of `artifacts-v1` versions: a table up to `CD4ML_SNAPSHOT_MAX_ROWS` rows (default 200,000)
is stored whole. A larger one is stored as a seeded uniform sample of that many rows, in the
original row order, plus the distinct values of its low-cardinality columns taken over all rows. The
sample is what the drift check needs: its two-sample tests are limited by the current window, not by
a reference of hundreds of thousands of rows, and the benchmarks put Evidently at 2-4 s on 100k rows
against 27-45 s on 1M. The distinct values keep the "value never seen" check exact, which a sample
is not.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cd4ml.core.errors import Cd4mlError, is_transient
from cd4ml.data.landing import file_sha256

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

PREFIX = "cd4ml"
FORMAT_TAG = "cd4ml.evidence_format"
FORMAT = "artifacts-v1"  # snapshots copied (whole, or sampled past CD4ML_SNAPSHOT_MAX_ROWS)
FORMAT_V2 = "artifacts-v2"  # snapshots rebuilt from the accepted files, each stored once by hash
FORMATS = frozenset({FORMAT, FORMAT_V2})
STORE_TAG = "cd4ml.data_store"
VALIDATION_STATUS_TAG = "cd4ml.validation_status"
# Tags older versions carry instead of artifacts.
LEGACY_EVIDENCE_TAG = "cd4ml.evidence"
LEGACY_VALIDATION_TAG = "cd4ml.validation"
LEGACY_SNAPSHOT_TAGS = {"train": "cd4ml.train_snapshot", "holdout": "cd4ml.holdout_snapshot"}
CATEGORY_LIMIT = 10_000  # more distinct values than this: not a category column, not listed


class EvidenceMissingError(Cd4mlError):
    """A version has no evidence of the kind asked for (the message says what and where)."""


def snapshot_max_rows() -> int:
    """CD4ML_SNAPSHOT_MAX_ROWS, validated by the settings object (a bad value names the variable)."""
    from cd4ml.core.settings import get_settings

    return get_settings().snapshot_max_rows


@dataclass(frozen=True)
class Evidence:
    """What a version was decided on. `source` says where it came from: "artifacts", or "tags" for
    versions registered before evidence moved to artifacts (their JSON may be cut at 5,000 chars)."""

    decision: dict[str, Any]
    validation: dict[str, Any]
    spec_text: str | None
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "artifacts"


def _categories(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Distinct values (as text, like the monitor compares them) of every low-cardinality column."""
    out: dict[str, list[str]] = {}
    for col in frame.columns:
        values = frame[col].dropna()
        if values.nunique() <= CATEGORY_LIMIT:
            out[str(col)] = sorted(values.astype(str).unique().tolist())
    return out


def _store_snapshot(source: Path, dest: Path, max_rows: int, seed: int) -> dict[str, Any]:
    import pandas as pd

    frame = pd.read_parquet(source)
    entry: dict[str, Any] = {
        "artifact": f"{PREFIX}/snapshots/{dest.name}",
        "source": str(source),  # provenance only: no reader depends on this path
        "source_sha256": file_sha256(source),
        "rows": len(frame),
        "columns": [str(c) for c in frame.columns],
    }
    if len(frame) <= max_rows:
        dest.write_bytes(source.read_bytes())
        return {**entry, "stored_rows": len(frame), "sampled": False}
    sample = frame.sample(n=max_rows, random_state=seed).sort_index()
    sample.to_parquet(dest, index=False)
    return {
        **entry,
        "stored_rows": len(sample),
        "sampled": True,
        "seed": seed,
        "why": f"more than CD4ML_SNAPSHOT_MAX_ROWS={max_rows} rows: a seeded uniform sample in row "
        "order; `categories` lists every column's distinct values over all rows",
        "categories": _categories(frame),
    }


def data_experiment_name(name: str) -> str:
    return f"{name}-data"


def _store_run(mlflow_client: MlflowClient, name: str) -> str:
    """The model's one run that holds its accepted files (created on first use; the oldest wins a race)."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(data_experiment_name(name))
    if exp is None:
        try:
            exp_id = mlflow_client.create_experiment(data_experiment_name(name), tags={"cd4ml.model": name})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = mlflow_client.get_experiment_by_name(data_experiment_name(name))
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    found = mlflow_client.search_runs(
        [str(exp_id)], filter_string=f"tags.`{STORE_TAG}` = '{name}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )  # fmt: skip
    if found:
        return str(found[0].info.run_id)
    run = mlflow_client.create_run(str(exp_id), run_name=f"{name} accepted data", tags={STORE_TAG: name})
    mlflow_client.set_terminated(run.info.run_id)
    return str(run.info.run_id)


def store_batches(mlflow_client: MlflowClient, name: str, files: list[Path]) -> list[dict[str, Any]]:
    """Log each accepted file once, by content hash, into the model's data store; returns the ordered
    list `batches.json` holds. A file already there (any name) is not uploaded again."""
    run_id = _store_run(mlflow_client, name)
    held = {Path(a.path).name for a in mlflow_client.list_artifacts(run_id, "batches")}
    out: list[dict[str, Any]] = []
    for path in files:
        sha = file_sha256(path)
        where = f"batches/{sha}"
        if sha in held:
            stored = [Path(a.path).name for a in mlflow_client.list_artifacts(run_id, where) if not a.is_dir]
            artifact = f"{where}/{stored[0]}" if stored else ""
        else:
            artifact = ""
        if not artifact:  # new, or a directory an interrupted upload left empty
            mlflow_client.log_artifact(run_id, str(path), where)
            held.add(sha)
            artifact = f"{where}/{path.name}"
        out.append({"name": path.name, "sha256": sha, "bytes": path.stat().st_size, "run_id": run_id,
                    "artifact": artifact})  # fmt: skip
    return out


def frame_digest(frame: pd.DataFrame) -> str:
    """Content digest of a table's values and column names (row order matters, the index does not)."""
    import hashlib

    import pandas as pd

    h = hashlib.sha256(json.dumps([str(c) for c in frame.columns]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _rebuilt_entry(source: Path) -> dict[str, Any]:
    import pandas as pd

    frame = pd.read_parquet(source)
    return {
        "kind": "rebuilt-from-batches",
        "source": str(source),  # provenance only: no reader depends on this path
        "source_sha256": file_sha256(source),
        "rows": len(frame),
        "stored_rows": len(frame),
        "sampled": False,
        "columns": [str(c) for c in frame.columns],
        "digest": frame_digest(frame),
        "why": "rebuilt from cd4ml/batches.json (each accepted file stored once in the model's data "
        "store) with the version's spec; not copied",
    }


def record_evidence(
    mlflow_client: MlflowClient,
    name: str,
    version: str,
    *,
    evidence: dict[str, Any],
    validation: dict[str, Any],
    spec_text: str,
    snapshots: dict[str, str],
    seed: int = 0,
    batches: list[Path] | None = None,
) -> dict[str, dict[str, Any]]:
    """Store the version's evidence as artifacts of its run (see the module docstring); returns the
    snapshot manifest (what `snapshot_info` reads back).

    Idempotent: a retry writes the same files again. `snapshots` maps a name ("train", "holdout")
    to a local parquet file, which must exist now; afterwards nothing reads the local file, and one
    stored whole or rebuildable (`held_whole`) may be deleted. With `batches` (the accepted files the
    snapshots were built from, in order) the rows are not copied: each file goes once into the
    model's data store and the snapshots are rebuilt from them (`artifacts-v2`).
    """
    mv = mlflow_client.get_model_version(name, version)
    if not mv.run_id:
        raise EvidenceMissingError(f"{name} v{version} has no MLflow run to store its evidence in")
    missing = {k: p for k, p in snapshots.items() if not Path(p).is_file()}
    if missing:
        raise EvidenceMissingError(f"{name} v{version}: snapshot file(s) not found: {missing}")
    if batches is not None:
        gone = [str(p) for p in batches if not Path(p).is_file()]
        if gone:
            raise EvidenceMissingError(f"{name} v{version}: accepted file(s) not found: {gone}")
    max_rows = snapshot_max_rows()
    with tempfile.TemporaryDirectory(prefix="cd4ml-evidence-") as tmp:
        root = Path(tmp) / PREFIX
        (root / "snapshots").mkdir(parents=True)
        (root / "decision.json").write_text(json.dumps(evidence, indent=2, sort_keys=True, default=str))
        (root / "validation.json").write_text(json.dumps(validation, indent=2, sort_keys=True, default=str))
        (root / "spec.yaml").write_text(spec_text, encoding="utf-8")
        if batches is not None:
            stored = store_batches(mlflow_client, name, [Path(p) for p in batches])
            (root / "batches.json").write_text(json.dumps(stored, indent=2))
            manifest = {key: _rebuilt_entry(Path(path)) for key, path in sorted(snapshots.items())}
        else:
            manifest = {
                key: _store_snapshot(Path(path), root / "snapshots" / f"{key}.parquet", max_rows, seed)
                for key, path in sorted(snapshots.items())
            }
        (root / "snapshots.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        mlflow_client.log_artifacts(mv.run_id, str(root), PREFIX)
    status = str(validation.get("status") or "unknown")[:100]
    # The format tag last: readers trust the artifacts only once all of them are there.
    mlflow_client.set_model_version_tag(name, version, VALIDATION_STATUS_TAG, status)
    mlflow_client.set_model_version_tag(name, version, FORMAT_TAG, FORMAT if batches is None else FORMAT_V2)
    return manifest


def held_whole(entry: dict[str, Any]) -> bool:
    """Whether MLflow can give back a manifest entry's local source whole (a copy, or the accepted
    files it is rebuilt from), not only a sample."""
    return not entry.get("sampled") and bool(entry.get("source_sha256"))


def _version(mlflow_client: MlflowClient, name: str, version: str | ModelVersion) -> ModelVersion:
    if isinstance(version, str):
        return mlflow_client.get_model_version(name, version)
    return version


def has_artifacts(mv: ModelVersion) -> bool:
    return (mv.tags or {}).get(FORMAT_TAG) in FORMATS


def _download(mlflow_client: MlflowClient, run_id: str, path: str, tmp: str) -> Path:
    """One artifact through this client's own tracking server (not the process-wide default)."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow_client.download_artifacts(run_id, path, tmp))
    except (MlflowException, OSError) as err:
        if is_transient(err):
            raise  # MLflow did not answer: a retry may read it; a missing file never appears
        raise EvidenceMissingError(
            f"run {run_id}: artifact {path} cannot be read from MLflow ({err})"
        ) from None


def _load_text(mlflow_client: MlflowClient, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory(prefix="cd4ml-evidence-") as tmp:
        return _download(mlflow_client, run_id, path, tmp).read_text(encoding="utf-8")


def _load_json(mlflow_client: MlflowClient, run_id: str, path: str) -> Any:
    return json.loads(_load_text(mlflow_client, run_id, path))


def _legacy_json(tags: dict[str, str], key: str) -> dict[str, Any]:
    raw = tags.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        # Cut at 5,000 characters by the old tag writer: show what survives, do not guess the rest.
        return {"unreadable": raw, "why": f"the {key} tag is cut short (MLflow's 5,000-character limit)"}
    return value if isinstance(value, dict) else {"value": value}


def _from_artifacts(mlflow_client: MlflowClient, run_id: str) -> tuple[Evidence, int]:
    """The evidence in the run's artifacts, and how many characters of text it was read from."""
    texts = {
        part: _load_text(mlflow_client, run_id, f"{PREFIX}/{part}")
        for part in ("decision.json", "validation.json", "spec.yaml", "snapshots.json")
    }
    evidence = Evidence(
        decision=dict(json.loads(texts["decision.json"])),
        validation=dict(json.loads(texts["validation.json"])),
        spec_text=texts["spec.yaml"],
        snapshots=dict(json.loads(texts["snapshots.json"])),
        source="artifacts",
    )
    return evidence, sum(len(text) for text in texts.values())


# Bounds of the process-wide cache: entries, and characters of artifact text they were read from (a
# sampled snapshot's manifest lists up to CATEGORY_LIMIT values per column, so entries differ in size).
EVIDENCE_CACHE_ENTRIES = 256
EVIDENCE_CACHE_CHARS = 32_000_000


@dataclass(frozen=True)
class EvidenceCacheInfo:
    hits: int
    misses: int
    entries: int
    chars: int


class _EvidenceCache:
    """Least recently used evidence by (tracking URI, model, version, run id); thread-safe (the
    Airflow UI builds pages in worker threads)."""

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self._items: OrderedDict[tuple[str, str, str, str], tuple[Evidence, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.chars = 0

    def get(self, key: tuple[str, str, str, str]) -> Evidence | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: tuple[str, str, str, str], evidence: Evidence, size: int) -> None:
        if size > self.max_chars // 4:
            return  # one huge manifest must not push out everything else
        with self._lock:
            if key in self._items:
                self.chars -= self._items.pop(key)[1]
            self._items[key] = (evidence, size)
            self.chars += size
            while len(self._items) > self.max_entries or self.chars > self.max_chars:
                self.chars -= self._items.popitem(last=False)[1][1]

    def info(self) -> EvidenceCacheInfo:
        with self._lock:
            return EvidenceCacheInfo(self.hits, self.misses, len(self._items), self.chars)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = self.chars = 0


_CACHE = _EvidenceCache(EVIDENCE_CACHE_ENTRIES, EVIDENCE_CACHE_CHARS)


def evidence_cache_info() -> EvidenceCacheInfo:
    """Hits and misses of `read_evidence(..., cached=True)` in this process, and what it holds."""
    return _CACHE.info()


def clear_evidence_cache() -> None:
    _CACHE.clear()


def read_evidence(
    mlflow_client: MlflowClient, name: str, version: str | ModelVersion, *, cached: bool = False
) -> Evidence:
    """The version's decision, validation record, spec text and snapshot manifest.

    `cached=True`: a version whose artifacts are complete is read from MLflow once per process (pass
    the ModelVersion, as a search returns it, and a repeated read makes no request at all). The
    Evidence returned is then shared by every caller: read it, do not change it.
    """
    mv = _version(mlflow_client, name, version)
    tags = dict(mv.tags or {})
    if not has_artifacts(mv):
        # Never cached: the format tag may come later (an interrupted registration is retried).
        snapshots = {
            key: {"source": tags[tag], "legacy_path": True}
            for key, tag in LEGACY_SNAPSHOT_TAGS.items()
            if tags.get(tag)
        }
        return Evidence(
            decision=_legacy_json(tags, LEGACY_EVIDENCE_TAG),
            validation=_legacy_json(tags, LEGACY_VALIDATION_TAG),
            spec_text=None,  # never stored before
            snapshots=snapshots,
            source="tags",
        )
    run_id = str(mv.run_id)
    if not cached:
        return _from_artifacts(mlflow_client, run_id)[0]
    key = (str(mlflow_client.tracking_uri), name, str(mv.version), run_id)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    evidence, size = _from_artifacts(mlflow_client, run_id)
    _CACHE.put(key, evidence, size)
    return evidence


def validation_status(mlflow_client: MlflowClient, name: str, version: str | ModelVersion) -> str:
    """ "passed" when the version's data passed validation; from the scalar tag, else the evidence."""
    mv = _version(mlflow_client, name, version)
    status = (mv.tags or {}).get(VALIDATION_STATUS_TAG)
    if status:
        return status
    return str(read_evidence(mlflow_client, name, mv).validation.get("status") or "unknown")


def reference_frame(
    mlflow_client: MlflowClient,
    name: str,
    version: str | ModelVersion,
    snapshot: str = "train",
    *,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """The version's `snapshot` ("train" or "holdout") as a DataFrame, read from MLflow (a sample if
    the table was larger than CD4ML_SNAPSHOT_MAX_ROWS; see `snapshot_info`). Versions registered
    before snapshots were artifacts are read from the local path in their tag, if it still exists."""
    import pandas as pd

    mv = _version(mlflow_client, name, version)
    where = f"{name} v{mv.version}"
    if not has_artifacts(mv):
        tag = LEGACY_SNAPSHOT_TAGS.get(snapshot)
        path = (mv.tags or {}).get(tag or "", "")
        if not path or not Path(path).is_file():
            raise EvidenceMissingError(
                f"{where}: {snapshot} snapshot {path or '(no ' + str(tag) + ' tag)'!r} is missing; the "
                "version predates snapshots in MLflow and its local file is gone (was runs/ pruned, or "
                "is this another machine?). Promote a newer version to monitor or roll back to it"
            )
        return pd.read_parquet(path, columns=columns)
    if (mv.tags or {}).get(FORMAT_TAG) == FORMAT_V2:
        return _rebuild(mlflow_client, name, mv, snapshot, columns)
    with tempfile.TemporaryDirectory(prefix="cd4ml-snapshot-") as tmp:
        try:
            local = _download(mlflow_client, str(mv.run_id), f"{PREFIX}/snapshots/{snapshot}.parquet", tmp)
        except EvidenceMissingError as err:
            raise EvidenceMissingError(f"{where}: no {snapshot} snapshot in MLflow: {err}") from None
        return pd.read_parquet(local, columns=columns)


def _rebuild(
    mlflow_client: MlflowClient, name: str, mv: ModelVersion, snapshot: str, columns: list[str] | None
) -> pd.DataFrame:
    """An `artifacts-v2` version's training set or holdout, rebuilt as `prepare_datasets` built it:
    every accepted file it names read and normalised in order, concatenated, split by its spec."""
    import logging

    import pandas as pd

    from cd4ml.core.spec import parse_spec
    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import normalise
    from cd4ml.ml.training import split_holdout

    where = f"{name} v{mv.version}"
    evidence = read_evidence(mlflow_client, name, mv, cached=True)
    entry = evidence.snapshots.get(snapshot)
    if entry is None or evidence.spec_text is None:
        raise EvidenceMissingError(f"{where}: no {snapshot} snapshot in its evidence")
    # parse_spec wants the file named after the model; the text is cd4ml/spec.yaml of the version's run.
    spec = parse_spec(evidence.spec_text, Path(f"MLflow run {mv.run_id}") / f"{name}.yaml")
    batches = _load_json(mlflow_client, str(mv.run_id), f"{PREFIX}/batches.json")
    frames = []
    with tempfile.TemporaryDirectory(prefix="cd4ml-batches-") as tmp:
        for i, batch in enumerate(batches):
            local = _download(mlflow_client, str(batch["run_id"]), str(batch["artifact"]), f"{tmp}/{i}")
            if file_sha256(local) != batch["sha256"]:
                raise EvidenceMissingError(
                    f"{where}: accepted file {batch['name']} in MLflow ({batch['artifact']}) does not match "
                    f"its recorded SHA-256 {str(batch['sha256'])[:12]}: the data store was changed by hand"
                )
            frames.append(normalise(spec, read_table(local)))
    if not frames:
        raise EvidenceMissingError(f"{where}: trained on no accepted files?")
    split = split_holdout(spec, pd.concat(frames, ignore_index=True))
    frame = split.train if snapshot == "train" else split.holdout
    if len(frame) != entry.get("rows") or frame_digest(frame) != entry.get("digest"):
        # Code that reads, normalises or splits data changed since the version was trained: the
        # rebuilt table is what this code makes of the same files, which is still the right reference
        # for a drift check, but say so.
        logging.getLogger(__name__).warning(
            "%s: the rebuilt %s set (%d rows) differs from the one trained on (%s rows); "
            "the code that reads or splits data changed since",
            where, snapshot, len(frame), entry.get("rows"),
        )  # fmt: skip
    return frame[columns] if columns is not None else frame


def snapshot_info(mlflow_client: MlflowClient, name: str, version: str | ModelVersion) -> dict[str, Any]:
    """The snapshot manifest: rows, stored rows, whether sampled, and (if sampled) the distinct values."""
    return read_evidence(mlflow_client, name, version).snapshots


def legacy_snapshot_paths(mlflow_client: MlflowClient, name: str) -> set[str]:
    """Local snapshot files (resolved paths) that versions registered before snapshots were artifacts
    name in their tags: `reference_frame` still reads these, so nothing may delete them."""
    paths: set[str] = set()
    for mv in mlflow_client.search_model_versions(f"name = '{name}'"):
        if has_artifacts(mv):
            continue
        tags = mv.tags or {}
        paths |= {str(Path(tags[t]).resolve()) for t in LEGACY_SNAPSHOT_TAGS.values() if tags.get(t)}
    return paths
