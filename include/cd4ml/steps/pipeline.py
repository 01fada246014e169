"""The training pipeline's steps: each loads what it needs, calls pure functions, saves, and returns
a small frozen record (`cd4ml.steps.contracts`). `TRAINING_STEPS` is their one order: the
`<model>__train` DAG makes a task of each, and `run_training` (`cd4ml train`, benchmarks) runs them
in one plain process, with the same run outcome, the same gate and the same error policy.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cd4ml.core import lineage
from cd4ml.core.errors import DataError, DataReadError, TrainingError, is_transient
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data import landing
from cd4ml.steps.contracts import (
    AcceptedBatch,
    Approval,
    Challenger,
    Collected,
    Contract,
    Datasets,
    Deployment,
    Evaluation,
    Promotion,
    Registration,
    Rejected,
    RunContext,
    RunOutcome,
    Staging,
    TrainingGate,
    Validated,
)

if TYPE_CHECKING:  # numpy and pandas behind it: the DAG files import this module at parse time
    from cd4ml.ml.evaluation import BusinessValues

log = logging.getLogger(__name__)


def run_key(run_id: str) -> str:
    """A filesystem-safe key for one pipeline run; outputs are keyed by it, so retries overwrite."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


def zone_for(spec: ModelSpec, settings: Settings) -> ModelPaths:
    return ModelPaths.for_model(settings, spec.name).ensure()


# -- collect ---------------------------------------------------------------------------------------


def collect_landed_files(spec: ModelSpec, settings: Settings) -> Collected:
    """Every complete file in landing/; byte-identical copies of accepted files go to quarantine.

    A spec whose model cannot be trained or scored fails here, before any file moves.
    """
    from cd4ml.ml.training import check_trainable_spec

    check_trainable_spec(spec)
    zone = zone_for(spec, settings)
    known = landing.accepted_hashes(zone)
    new: list[landing.LandedFile] = []
    duplicates: list[Rejected] = []
    seen: dict[str, str] = {}
    for landed in landing.list_landed(zone):
        prefix = landed.sha256[: landing.HASH_PREFIX]
        original = known.get(prefix)
        if original is not None or prefix in seen:
            first = original.name if original is not None else seen[prefix]
            reason = (
                f"{landed.name}: duplicate: byte-identical to {first} (sha256 {landed.sha256[:16]}…), "
                "which was already processed; not trained on twice"
            )
            target = landing.quarantine(
                zone, landed, reason=reason, details={"kind": "duplicate", "of": first}
            )
            duplicates.append(Rejected(landed.name, str(target), reason))
            log.warning(reason)
            continue
        seen[prefix] = landed.name
        new.append(landed)
    return Collected(tuple(new), tuple(duplicates))


# -- validate --------------------------------------------------------------------------------------


def _read_accepted_files(spec: ModelSpec, zone: ModelPaths) -> list[tuple[str, Any]]:
    """(file name, normalised frame) per accepted file, in acceptance order: rows keep provenance."""
    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import normalise

    return [(f.name, normalise(spec, read_table(Path(f.path)))) for f in landing.list_accepted(zone)]


def _concat(spec: ModelSpec, frames: list[Any]) -> Any:
    import pandas as pd

    if not frames:
        return pd.DataFrame(columns=spec.columns)
    return pd.concat(frames, ignore_index=True)


def _non_finite_problems(spec: ModelSpec, frame: Any) -> list[str]:
    from cd4ml.data.validation import non_finite_counts

    return [
        f"column {col!r}: {count} non-finite values (inf, -inf or overflow)"
        for col, count in non_finite_counts(spec, frame).items()
    ]


def file_problems(spec: ModelSpec, frame: Any) -> list[str]:
    """Why one accepted file cannot be trained on: non-finite numbers, what preprocessing refuses."""
    from cd4ml.ml.training import preprocessing_findings

    problems = _non_finite_problems(spec, frame)
    if spec.target in frame.columns:
        missing = int(frame[spec.target].isna().sum())
        if missing:
            problems.append(f"target {spec.target!r}: missing in {missing} rows")
    # Non-finite numbers (target included) are reported once, in the words above.
    problems += [f.message for f in preprocessing_findings(spec, frame) if f.kind != "non_finite"]
    return problems


def diagnose_accepted(spec: ModelSpec, files: list[tuple[str, Any]]) -> dict[str, list[str]]:
    """Accepted files that cannot be trained on, each with its problems (empty: none is to blame)."""
    return {name: found for name, frame in files if (found := file_problems(spec, frame))}


def _blame(spec: ModelSpec, zone: ModelPaths, culprits: dict[str, list[str]], what: str) -> DataError:
    lines = [f"{spec.name}: {what}; the accepted file(s) responsible:"]
    for name, problems in culprits.items():
        lines.append(f"- {name}: " + "; ".join(problems))
    first = next(iter(culprits))
    lines.append(
        "They were accepted before these checks existed, or under a looser spec; retraining will not "
        f"help. Retract each one (e.g. `cd4ml data retract {spec.name} {first} --reason ...`, or the "
        f"{spec.name}__retract DAG): it moves to {zone.quarantine}, nothing is deleted, and training reruns."
    )
    return DataError("\n".join(lines))


def validate_landed_files(
    spec: ModelSpec,
    settings: Settings,
    files: tuple[landing.LandedFile, ...],
    *,
    run_id: str,
    run_time: str,
) -> Validated:
    """Validate each new file; move it to accepted/ or to quarantine/ with the reasons."""
    import pandas as pd

    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import (
        accepted_profile,
        merge_profiles,
        normalise,
        profile,
        reference_from_profile,
        save_profile,
        validate_frame,
    )
    from cd4ml.ml.training import acceptance_problems, preprocessing_problems

    zone = zone_for(spec, settings)
    records = landing.list_accepted(zone)
    frames = {f.path: normalise(spec, read_table(Path(f.path))) for f in records}
    accepted_files = [(f.name, frames[f.path]) for f in records]
    accepted_frame = _concat(spec, [frame for _, frame in accepted_files])
    # The reference comes from per-file profiles stored by content hash and merged: the Reference
    # `learn_reference` computes from every accepted row, without re-learning it for each new file.
    summary = accepted_profile(
        spec, zone.profiles, [(f.sha256, Path(f.path)) for f in records], lambda path: frames[str(path)]
    )
    if not accepted_frame.empty and preprocessing_problems(spec, accepted_frame):
        # Not the new batches' fault: no batch could be accepted on top of this data.
        culprits = diagnose_accepted(spec, accepted_files)
        if culprits:
            raise _blame(spec, zone, culprits, "the accepted data cannot be trained on")
    accepted: list[AcceptedBatch] = []
    quarantined: list[Rejected] = []
    docs_url = None
    for landed in files:
        if not Path(landed.path).exists():
            log.info("%s already processed by an earlier attempt", landed.name)
            continue
        try:
            frame = normalise(spec, read_table(Path(landed.path)))
        except DataReadError as err:
            reason = f"{landed.name}: rejected before validation: {err}"
            target = landing.quarantine(
                zone, landed, reason=reason, details={"kind": "unreadable", "run_id": run_id}
            )
            quarantined.append(Rejected(landed.name, str(target), reason))
            continue
        reference = reference_from_profile(spec, summary)
        outcome = validate_frame(
            spec,
            frame,
            reference,
            batch_name=f"{run_key(run_id)}__{landed.stored_name}",
            context_root=zone.gx,
        )
        docs_url = outcome.docs_url or docs_url
        problems = list(outcome.problems)
        if outcome.success:
            # Anything accepted must be trainable: the model's own preprocessing has the last word.
            combined = (
                frame if accepted_frame.empty else pd.concat([accepted_frame, frame], ignore_index=True)
            )
            problems = [
                f"no model could be trained on the accepted data with this batch: {p}"
                for p in acceptance_problems(spec, combined)
            ]
        if not problems:
            record = landing.accept(zone, landed, rows=len(frame), accepted_at=run_time, run_id=run_id)
            accepted.append(AcceptedBatch(record, outcome.summary(), dict(outcome.drift)))
            batch_profile = profile(spec, frame)
            save_profile(zone.profiles, spec, landed.sha256, batch_profile)
            summary = merge_profiles([summary, batch_profile])
            if outcome.drift:
                log.warning("%s accepted with drift: %s", landed.name, outcome.summary())
            accepted_frame = combined
        else:
            verdict = (
                f"rejected by validation ({outcome.summary()})"
                if not outcome.success
                else f"rejected: it {outcome.summary()}, but no model could be trained on it"
            )
            lines = [
                f"{landed.name} was {verdict}:",
                *[f"- {p}" for p in problems],
                f"Data Docs: {outcome.docs_url}" if outcome.docs_url else "",
                "Fix the file and land it again; nothing was trained on it.",
            ]
            reason = "\n".join(line for line in lines if line)
            target = landing.quarantine(
                zone, landed, reason=reason,
                details={"kind": "validation", "problems": problems, "run_id": run_id,
                         "docs_url": outcome.docs_url},
            )  # fmt: skip
            quarantined.append(Rejected(landed.name, str(target), reason))
        log.info("%s: %s", landed.name, outcome.summary())
    return Validated(tuple(accepted), tuple(quarantined), docs_url)


# -- datasets --------------------------------------------------------------------------------------


def prepare_datasets(spec: ModelSpec, settings: Settings, *, run_id: str) -> Datasets:
    """Training set and holdout from every accepted file, saved under runs/<run key>/.

    These local copies live only as long as the run: its end removes them once MLflow holds them
    whole or the gate trains nothing (`finish_run_storage`); a step run again after that rebuilds
    them (`ensure_snapshots`).

    Refuses (DataError naming the files) accepted data no model can be fitted on, and (SpecError) a
    target the spec's task or metric cannot be computed on, before anything is fitted.
    """
    from cd4ml.ml.training import check_target, split_holdout

    zone = zone_for(spec, settings)
    files = landing.list_accepted(zone)
    if not files:
        return Datasets(fingerprint=None)
    per_file = _read_accepted_files(spec, zone)
    # Files accepted before non-finite numbers were refused (or under a looser spec) must not reach
    # a fit: training would fail on every attempt without saying which file to take back.
    culprits = {name: found for name, frame in per_file if (found := _non_finite_problems(spec, frame))}
    if culprits:
        raise _blame(spec, zone, culprits, "accepted data holds non-finite numbers, which no model can fit")
    accepted = _concat(spec, [frame for _, frame in per_file])
    try:
        check_target(spec, accepted[spec.target])
    except DataError as err:
        blamed = diagnose_accepted(spec, per_file)
        if blamed:
            raise _blame(spec, zone, blamed, str(err)) from None
        raise
    split = split_holdout(spec, accepted)
    key = run_key(run_id)
    zone.run_dir(key).mkdir(parents=True, exist_ok=True)
    split.train.to_parquet(zone.train_snapshot(key), index=False)
    split.holdout.to_parquet(zone.holdout_snapshot(key), index=False)
    return Datasets(
        fingerprint=landing.data_fingerprint(files),
        train_path=str(zone.train_snapshot(key)),
        holdout_path=str(zone.holdout_snapshot(key)),
        rows_train=len(split.train),
        rows_holdout=len(split.holdout),
        holdout_starts_at=split.cutoff,
        files=tuple(f.name for f in files),
        trained_through=max(f.accepted_at for f in files),
    )


def _snapshot_paths(datasets: Datasets) -> dict[str, str]:
    return {"train": datasets.train_path, "holdout": datasets.holdout_path}


def ensure_snapshots(spec: ModelSpec, settings: Settings, datasets: Datasets, *, run_id: str) -> None:
    """The run's local training set and holdout, written again from the accepted data if the run's
    end already removed them (a task of a finished run cleared by hand, a retry after a lost
    response), as long as that data is still what the run saw: the split is deterministic."""
    if all(Path(p).is_file() for p in _snapshot_paths(datasets).values()):
        return
    zone = zone_for(spec, settings)
    now = landing.data_fingerprint(landing.list_accepted(zone))
    if now != datasets.fingerprint:
        raise DataError(
            f"{spec.name}: run {run_id}'s training set and holdout ({zone.run_dir(run_key(run_id))}) were "
            f"removed at the end of the run, and the accepted data changed since (fingerprint "
            f"{str(datasets.fingerprint)[:12]} then, {now[:12]} now), so they cannot be rebuilt as they "
            "were. Clear the run from build_datasets (or start a new run) instead of re-running this "
            "step alone"
        )
    prepare_datasets(spec, settings, run_id=run_id)
    log.info("%s: rebuilt run %s's training set and holdout from the accepted data", spec.name, run_id)


def finish_run_storage(
    spec: ModelSpec,
    settings: Settings,
    *,
    remove: Mapping[str, str | None],
    why: str,
    now: datetime | None = None,
) -> None:
    """A training run's end: delete this run's local snapshots in `remove` (path -> the sha256 MLflow
    holds of it, checked first; None: delete unchecked), then prune older runs' left-over snapshots
    (`registry.prune_runs`, CD4ML_RUNS_RETENTION_DAYS). outcome.json stays.

    Never fails the run: storage is housekeeping, so a problem is a warning and the next run tries
    again. A path a version registered before snapshots were artifacts names in its tags is kept.
    """
    from cd4ml import registry

    with registry.impatient():
        _finish_run_storage(spec, settings, remove=remove, why=why, now=now)


def _finish_run_storage(
    spec: ModelSpec,
    settings: Settings,
    *,
    remove: Mapping[str, str | None],
    why: str,
    now: datetime | None,
) -> None:
    from cd4ml import registry
    from cd4ml.registry.evidence import legacy_snapshot_paths

    zone = zone_for(spec, settings)
    remove = {path: sha for path, sha in remove.items() if path and Path(path).is_file()}
    try:
        mlflow_client = registry.client(settings.mlflow_tracking_uri)
        if remove:
            legacy = legacy_snapshot_paths(mlflow_client, spec.name)
            for path, sha in remove.items():
                local = Path(path)
                if str(local.resolve()) in legacy:
                    continue
                if sha is not None and landing.file_sha256(local) != sha:
                    log.warning("%s: kept %s: its bytes differ from the copy MLflow holds", spec.name, path)
                    continue
                local.unlink()
                log.info("%s: removed %s (%s)", spec.name, path, why)
    except Exception as err:  # noqa: BLE001 - housekeeping must never fail a training run
        log.warning(
            "%s: could not remove this run's local snapshots %s (%s): %s: %s; they stay in runs/ "
            "until retention deletes them (CD4ML_RUNS_RETENTION_DAYS); "
            "training is unaffected",
            spec.name, sorted(remove), why, type(err).__name__, err,
        )  # fmt: skip
        return
    days = settings.runs_retention_days
    if days is None:
        return
    try:
        registry.prune_runs(
            mlflow_client, spec.name, zone.runs, older_than_days=days, now=now or datetime.now(UTC)
        )
    except Exception as err:  # noqa: BLE001 - housekeeping must never fail a training run
        log.warning(
            "%s: pruning %s (snapshots older than CD4ML_RUNS_RETENTION_DAYS=%s days) failed: %s: %s; "
            "training is unaffected, the next run tries again",
            spec.name, zone.runs, days, type(err).__name__, err,
        )  # fmt: skip


def record_run_outcome(spec: ModelSpec, settings: Settings, outcome: RunOutcome) -> Path:
    """runs/<run key>/outcome.json: why this run trained or not (shown in the Models view)."""
    import json

    key = run_key(outcome.run_id)
    zone = zone_for(spec, settings)
    zone.run_dir(key).mkdir(parents=True, exist_ok=True)
    path = zone.run_outcome(key)
    path.write_text(json.dumps(outcome.to_xcom()))
    return path


def training_needed(spec: ModelSpec, settings: Settings, datasets: Datasets, *, force: bool) -> TrainingGate:
    """Skip retraining when the champion was built from exactly this data, spec and code."""
    from cd4ml import registry

    fingerprint = datasets.fingerprint
    if fingerprint is None:
        return TrainingGate(False, "no accepted data yet: land a file in landing/ to train the first model")
    if force:
        return TrainingGate(True, "forced by the run's parameters")
    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    champion = registry.version_by_alias(mlflow_client, spec.name, registry.CHAMPION)
    if champion is None:
        return TrainingGate(True, "no champion yet")
    # The latest challenger counts too: a rejected model retrained on the same inputs is the same model.
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        mv = (
            champion
            if alias == registry.CHAMPION
            else registry.version_by_alias(mlflow_client, spec.name, alias)
        )
        tags = (mv.tags or {}) if mv is not None else {}
        if mv is not None and (
            tags.get("cd4ml.data_fingerprint") == fingerprint
            and tags.get("cd4ml.spec_hash") == spec.spec_hash()
            and tags.get("cd4ml.code_version") == lineage.code_version()
        ):
            return TrainingGate(False, (
                f"version {mv.version} ({alias}) was already trained on exactly this data "
                f"(fingerprint {fingerprint[:12]}), spec and code; nothing to retrain"
            ))  # fmt: skip
    return TrainingGate(True, "data, spec or code changed since the champion was trained")


# -- train -----------------------------------------------------------------------------------------


def train_challenger(spec: ModelSpec, settings: Settings, datasets: Datasets, *, run_id: str) -> Challenger:
    import pandas as pd

    from cd4ml import registry
    from cd4ml.ml import training
    from cd4ml.ml.evaluation import score

    ensure_snapshots(spec, settings, datasets, run_id=run_id)
    train_frame = pd.read_parquet(datasets.train_path)
    holdout = pd.read_parquet(datasets.holdout_path)
    try:
        model = training.train(spec, train_frame)
    except TrainingError as err:
        # Deterministic either way; when the data is to blame, say which accepted file to take back.
        zone = zone_for(spec, settings)
        culprits = diagnose_accepted(spec, _read_accepted_files(spec, zone))
        if culprits:
            raise _blame(spec, zone, culprits, f"training failed ({err})") from None
        raise
    holdout_score = score(spec.metric.name, holdout[spec.target].to_numpy(),
                          training.metric_inputs(spec, model, holdout))  # fmt: skip
    example = training.features(spec, train_frame.head(5))
    logged = registry.log_challenger(
        settings.mlflow_tracking_uri,
        experiment=spec.name,
        run_name=f"train {run_key(run_id)}",
        model=model,
        input_example=example,
        params={"estimator": spec.estimator.class_path, **spec.estimator.params, "seed": spec.seed,
                "rows_train": datasets.rows_train, "rows_holdout": datasets.rows_holdout},
        tags={"cd4ml.airflow_run_id": run_id, "cd4ml.data_fingerprint": str(datasets.fingerprint),
              "cd4ml.spec_hash": spec.spec_hash()},
        metrics={f"holdout_{spec.metric.name}": holdout_score},
    )  # fmt: skip
    return Challenger(logged.run_id, logged.model_uri, str(logged.experiment_id), float(holdout_score))


# -- evaluate --------------------------------------------------------------------------------------


def evaluate_against_champion(
    spec: ModelSpec, settings: Settings, datasets: Datasets, challenger: Challenger, *, run_id: str
) -> Evaluation:
    """Score both models on the same holdout and decide with a paired bootstrap."""
    import mlflow
    import pandas as pd

    from cd4ml import registry
    from cd4ml.ml import training
    from cd4ml.ml.evaluation import decide

    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    ensure_snapshots(spec, settings, datasets, run_id=run_id)
    holdout = pd.read_parquet(datasets.holdout_path)
    y = holdout[spec.target].to_numpy()
    challenger_model = registry.load_model(settings.mlflow_tracking_uri, challenger.model_uri)
    challenger_scores = training.metric_inputs(spec, challenger_model, holdout)
    champion = registry.version_by_alias(mlflow_client, spec.name, registry.CHAMPION)
    champion_scores = None
    champion_model = None
    if champion is not None:
        champion_model = registry.load_model(
            settings.mlflow_tracking_uri, f"models:/{spec.name}/{champion.version}"
        )
        champion_scores = training.metric_inputs(spec, champion_model, holdout)
    decision = decide(
        spec.metric.name, spec.promotion, y, challenger_scores, champion_scores,
        champion_version=champion.version if champion else None, seed=spec.seed,
        business=holdout_business_values(spec, holdout, challenger_model, champion_model),
    )  # fmt: skip
    evidence = decision.as_dict()
    optional = {
        "champion_score": decision.champion_score,
        "ci_low": decision.ci_low,
        "challenger_business_value": decision.challenger_business_value,
        "champion_business_value": decision.champion_business_value,
    }
    with mlflow.start_run(run_id=challenger.run_id):
        mlflow.log_metrics({
            "challenger_score": decision.challenger_score,
            **{key: value for key, value in optional.items() if value is not None},
        })  # fmt: skip
        mlflow.log_dict(evidence, "decision.json")
        mlflow.set_tag("cd4ml.decision", "promote" if decision.promote else "reject")
    log.info("decision: %s", decision.reason)
    return Evaluation(decision)


def holdout_business_values(
    spec: ModelSpec, holdout: Any, challenger_model: Any, champion_model: Any | None
) -> BusinessValues | None:
    """Both models' business value (`cd4ml.ml.business`) on the same holdout, from the labels (or
    values) each predicts, as the service would serve them; None when the spec has no business section."""
    from cd4ml.ml import training
    from cd4ml.ml.business import business_value
    from cd4ml.ml.evaluation import BusinessValues

    business = spec.business
    if business is None:
        return None
    y = holdout[spec.target].to_numpy()
    x = training.features(spec, holdout)

    def value(model: Any) -> float:
        found = business_value(spec, y, model.predict(x))
        if found is None:  # an empty holdout: build_datasets never makes one
            raise DataError(f"{spec.name}: the holdout has no rows to compute {business.name!r} on")
        return found

    return BusinessValues(
        name=business.name,
        unit=business.unit,
        gate=business.gate,
        challenger=value(challenger_model),
        champion=value(champion_model) if champion_model is not None else None,
    )


# -- register and promote --------------------------------------------------------------------------


def register_challenger(
    spec: ModelSpec,
    settings: Settings,
    *,
    challenger: Challenger,
    evaluation: Evaluation,
    datasets: Datasets,
    validation: Validated,
    run_id: str,
    reason: str,
) -> Registration:
    """Every challenger becomes a version with full lineage; the `challenger` alias points to it.

    Its end is the run's last read of the local snapshots, so they are removed here.
    """
    from cd4ml import registry
    from cd4ml.registry.evidence import has_artifacts, held_whole, snapshot_info

    evidence = evaluation.to_xcom()
    validation_record = {
        "accepted": [a.name for a in validation.accepted],
        "quarantined": [q.name for q in validation.quarantined],
        # Accepted files with rows outside a learned range (drift, not refused): which columns.
        "drift": {a.name: sorted(a.drift) for a in validation.accepted if a.drift},
        "status": "passed",
    }
    tags = {
        "cd4ml.data_fingerprint": str(datasets.fingerprint),
        "cd4ml.spec_hash": spec.spec_hash(),
        "cd4ml.code_version": lineage.code_version(),
        "cd4ml.lock_hash": lineage.lock_hash(),
        "cd4ml.decision": "promote" if evaluation.promote else "reject",
        "cd4ml.airflow_run_id": run_id,
        "cd4ml.trigger_reason": reason[:500],
        "cd4ml.trained_through": datasets.trained_through,
        "cd4ml.holdout_starts_at": datasets.holdout_starts_at,
        "cd4ml.rows_train": str(datasets.rows_train),
    }  # fmt: skip
    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    mv = registry.register_version(
        mlflow_client,
        name=spec.name,
        description=spec.description,
        logged=registry.LoggedModel(challenger.run_id, challenger.model_uri),
        tags=tags,
    )
    # Tags keep small scalars only; the decision and validation records go whole into artifacts any
    # machine can read (`registry.read_evidence`). A retry re-uses the version and writes them again.
    version = str(mv.version)
    snapshots = _snapshot_paths(datasets)
    manifest: dict[str, dict[str, Any]] | None = None
    if not all(Path(p).is_file() for p in snapshots.values()):
        current = mlflow_client.get_model_version(spec.name, version)
        if has_artifacts(current):
            # A retry after this step had recorded the evidence and removed the local copies.
            manifest = snapshot_info(mlflow_client, spec.name, current)
        else:
            ensure_snapshots(spec, settings, datasets, run_id=run_id)
    if manifest is None:
        manifest = registry.record_evidence(
            mlflow_client, spec.name, version,
            evidence=evidence, validation=validation_record, spec_text=spec_text(spec),
            snapshots=snapshots, seed=spec.seed, batches=_training_files(spec, settings, datasets),
        )  # fmt: skip
    # The last step that reads the local copies, so they go (deploy reads the holdout from MLflow).
    # One MLflow holds whole is checked against its bytes first; a sampled one goes too: it is the
    # deterministic split of the accepted files the version's fingerprint names, which a step re-run
    # by hand rebuilds (`ensure_snapshots`), so keeping it would only make runs/ grow with history.
    local = {
        path: (str(manifest[key]["source_sha256"]) if key in manifest and held_whole(manifest[key]) else None)
        for key, path in snapshots.items()
    }
    finish_run_storage(spec, settings, remove=local, why=f"evidence of {spec.name} v{version} is in MLflow")
    return Registration(version, challenger.run_id)


def _training_files(spec: ModelSpec, settings: Settings, datasets: Datasets) -> list[Path] | None:
    """The accepted files the run's split was built from, in the order it read them, so MLflow stores
    each file once and the version only lists them; None (copy the snapshots instead) when the
    accepted data changed since build_datasets (a file taken back mid-run), as the list would then
    rebuild another split."""
    files = landing.list_accepted(zone_for(spec, settings))
    if landing.data_fingerprint(files) != datasets.fingerprint:
        log.warning("%s: accepted data changed since build_datasets; the version stores copies of its "
                    "training set and holdout instead of the list of files", spec.name)  # fmt: skip
        return None
    return [Path(f.path) for f in files]


def spec_text(spec: ModelSpec) -> str:
    """The spec as parsed (what `spec_hash` hashes), as YAML: the file may have changed since."""
    import yaml

    return yaml.safe_dump(spec.canonical(), sort_keys=False)


def promote_champion(
    spec: ModelSpec,
    settings: Settings,
    *,
    version: str,
    evaluation: Evaluation,
    evaluate_only: bool,
    run_time: str,
    who: str,
    run_id: str,
    signing_key: str | None = None,
    approval: Approval | None = None,
) -> Promotion:
    """Move `champion` if the decision says so; a rejected challenger changes nothing that serves.

    `signing_key` (the prediction service's admin token) signs cd4ml's champion record on the
    version: a service holding that token serves no champion without one. With
    `promotion.approval: required`, nothing moves without an `approval` that says approved.
    """
    from cd4ml import registry

    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    if not evaluation.promote:
        return Promotion(False, version, evaluation.reason)
    if evaluate_only:
        registry.set_tags(mlflow_client, spec.name, version, {"cd4ml.promotion": "skipped: evaluate_only"})
        return Promotion(False, version, "evaluate_only: decision recorded, champion untouched")
    approval_tags: dict[str, str] = {}
    if spec.promotion.approval == "required":
        if approval is None or not approval.approved:
            why = (
                f"approval required (promotion.approval): not approved ({approval.note or 'rejected'} "
                f"by {approval.who} at {approval.when})"
                if approval is not None
                else "approval required (promotion.approval): no approval was given; only an Airflow "
                f"run of {spec.name}__train asks for one (task approve_promotion)"
            )
            registry.set_tags(mlflow_client, spec.name, version, {"cd4ml.promotion": f"not approved: {why}"})
            return Promotion(False, version, why)
        approval_tags = {"cd4ml.approved_by": approval.who, "cd4ml.approved_at": approval.when}
        # The champion moves once approved: its record and history say when that was (a retry
        # reads the same recorded answer, so it writes the same values).
        moved = datetime.fromisoformat(approval.when.replace("Z", "+00:00"))
        if moved > datetime.fromisoformat(run_time.replace("Z", "+00:00")):
            run_time = approval.when
    expected = evaluation.champion_version
    if spec.deployment.strategy == "canary" and expected is not None:
        return _start_canary(spec, mlflow_client, version, evaluation, approval_tags, approval,
                             run_time=run_time, who=who, run_id=run_id, signing_key=signing_key)  # fmt: skip
    if spec.deployment.strategy == "shadow" and expected is not None:
        # A copy of live traffic first; a person promotes it with <model>__rollback once its
        # agreement, latency and errors (Models view, /metrics) look right.
        mlflow_client.set_registered_model_alias(spec.name, registry.SHADOW, version)
        shadow_tags = {"cd4ml.promotion": f"shadow: since {run_time}", "cd4ml.shadow_since": run_time}
        registry.set_tags(mlflow_client, spec.name, version, shadow_tags)
        why = (
            f"shadow: version {version} answers a copy of live traffic, champion stays {expected}; "
            f"promote it with {spec.name}__rollback (version {version}) when the shadow's numbers look right"
        )
        log.info("%s: %s", spec.name, why)
        return Promotion(False, version, why, shadow=True)
    # On success the previous champion is the one the challenger was evaluated against.
    previous = registry.promote_with_tags(
        mlflow_client, spec.name, version, expected_current=expected,
        tags={"cd4ml.promoted_at": run_time, "cd4ml.previous_champion": str(expected or "none"),
              **approval_tags},
        sign_with=signing_key, when=run_time,
    )  # fmt: skip
    registry.append_event(
        mlflow_client, spec.name, kind="promotion", version=version, who=who, why=evaluation.reason,
        when=run_time, details={"previous": previous, "evidence": evaluation.to_xcom(),
                                **({"approval": approval.to_xcom()} if approval_tags and approval else {})},
        key=f"promotion:{run_key(run_id)}:{version}",  # a retried task records it once
    )  # fmt: skip
    log.info("%s: champion is now version %s (was %s)", spec.name, version, previous)
    return Promotion(True, version, evaluation.reason, previous)


def _start_canary(
    spec: ModelSpec,
    mlflow_client: Any,
    version: str,
    evaluation: Evaluation,
    approval_tags: dict[str, str],
    approval: Approval | None,
    *,
    run_time: str,
    who: str,
    run_id: str,
    signing_key: str | None,
) -> Promotion:
    """Give the challenger the `canary` alias (with cd4ml's signed canary record): the service
    answers `deployment.canary.fraction` of live traffic with it; deploy_champion judges it."""
    from cd4ml import registry

    canary = spec.deployment.canary
    tags = {"cd4ml.promotion": f"canary: since {run_time}", "cd4ml.canary_since": run_time, **approval_tags}
    if signing_key:
        tags[registry.CANARY_SIGNATURE_TAG] = registry.champion_signature(
            signing_key, spec.name, version, run_time, registry.CANARY
        )
    registry.set_tags(mlflow_client, spec.name, version, tags)  # before the alias: the service reads them
    mlflow_client.set_registered_model_alias(spec.name, registry.CANARY, version)
    why = (
        f"canary: version {version} answers {canary.fraction:.0%} of live traffic beside champion "
        f"{evaluation.champion_version}; judged after {canary.min_requests} canary requests or "
        f"{canary.max_duration_minutes:g} min"
    )
    registry.append_event(
        mlflow_client, spec.name, kind="canary", version=version, who=who, why=why, when=run_time,
        details={"phase": "started", "champion": evaluation.champion_version, "policy": canary.model_dump(),
                 "evidence": evaluation.to_xcom(), **({"approval": approval.to_xcom()} if approval else {})},
        key=f"canary:{run_key(run_id)}:{version}",
    )  # fmt: skip
    log.info("%s: %s", spec.name, why)
    return Promotion(False, version, why, canary=True)


# -- the one order of steps ------------------------------------------------------------------------

C = TypeVar("C")


class Results(Mapping[str, Contract]):
    """What the earlier steps of one run returned, by step name (= the DAG's task id)."""

    def __init__(self, by_step: Mapping[str, Contract] | None = None) -> None:
        self._by_step = dict(by_step or {})

    def __getitem__(self, step: str) -> Contract:
        return self._by_step[step]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_step)

    def __len__(self) -> int:
        return len(self._by_step)

    def of(self, step: str, kind: type[C]) -> C:
        """The result of `step`, which must be a `kind` (anything else is a wiring bug, named)."""
        if step not in self._by_step:
            raise KeyError(f"step result {step!r} is not available here (have: {sorted(self._by_step)})")
        value = self._by_step[step]
        if not isinstance(value, kind):
            raise TypeError(f"step result {step!r} is a {type(value).__name__}, expected {kind.__name__}")
        return value

    def with_result(self, step: str, value: Contract) -> Results:
        return Results({**self._by_step, step: value})


@dataclass(frozen=True)
class Step:
    """One training step: its name (the task id), the earlier steps it reads, how it runs.

    `load` reads its result back from XCom; a `gate` step ends the run early when its
    `TrainingGate` says no (in Airflow: a short-circuit task that skips everything after it).
    """

    name: str
    inputs: tuple[str, ...]
    run: Callable[[ModelSpec, Settings, RunContext, Results], Contract]
    load: Callable[[Any], Contract]
    gate: bool = False


def _collect(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Collected:
    return collect_landed_files(spec, settings)


def _validate(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Validated:
    collected = got.of("collect_landed_files", Collected)
    validated = validate_landed_files(spec, settings, collected.new, run_id=run.run_id, run_time=run.run_time)
    if validated.nothing_accepted:
        raise validated.quarantine_error()  # a data error: never retried, mailed as a quarantine
    return validated


def _datasets(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Datasets:
    return prepare_datasets(spec, settings, run_id=run.run_id)


def _gate(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> TrainingGate:
    gate = training_needed(spec, settings, got.of("build_datasets", Datasets), force=run.force)
    log.info("%s: %s", "Training" if gate.needed else "Skipping training", gate.why)
    record_run_outcome(spec, settings, RunOutcome(run.run_id, run.trigger, gate.needed, gate.why))
    if not gate.needed:
        # The run ends here: nothing will ever read the copies build_datasets wrote.
        datasets = got.of("build_datasets", Datasets)
        finish_run_storage(
            spec, settings, remove=dict.fromkeys(_snapshot_paths(datasets).values()), why="nothing trained"
        )
    return gate


def _train(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Challenger:
    return train_challenger(spec, settings, got.of("build_datasets", Datasets), run_id=run.run_id)


def _evaluate(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Evaluation:
    return evaluate_against_champion(
        spec,
        settings,
        got.of("build_datasets", Datasets),
        got.of("train_challenger", Challenger),
        run_id=run.run_id,
    )


def _register(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Registration:
    return register_challenger(
        spec, settings,
        challenger=got.of("train_challenger", Challenger),
        evaluation=got.of("evaluate_against_champion", Evaluation),
        datasets=got.of("build_datasets", Datasets),
        validation=got.of("validate_batches", Validated),
        run_id=run.run_id, reason=run.trigger,
    )  # fmt: skip


def _promote(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Promotion:
    return promote_champion(
        spec, settings,
        version=got.of("register_challenger", Registration).version,
        evaluation=got.of("evaluate_against_champion", Evaluation),
        evaluate_only=run.evaluate_only, run_time=run.run_time, who=run.who, run_id=run.run_id,
        signing_key=(run.service.admin_token if run.service else settings.service_admin_token),
        approval=run.approval,
    )  # fmt: skip


def _stage(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Staging:
    from cd4ml.steps.deploy import stage_challenger

    evaluation = got.of("evaluate_against_champion", Evaluation)
    return Staging(stage_challenger(
        spec, settings,
        version=got.of("register_challenger", Registration).version,
        promote=evaluation.promote and not run.evaluate_only, champion=evaluation.champion_version,
        holdout_path=_local_or_none(got.of("build_datasets", Datasets).holdout_path),
        who=run.who, when=run.run_time, last_attempt=run.last_attempt, endpoint=run.service,
    ))  # fmt: skip


def _local_or_none(path: str) -> str | None:
    """The holdout's local copy if it is still there, else None: read from MLflow instead."""
    return path if path and Path(path).is_file() else None


def _deploy(spec: ModelSpec, settings: Settings, run: RunContext, got: Results) -> Deployment:
    from cd4ml.steps.deploy import deploy_champion

    return Deployment(deploy_champion(
        spec, settings,
        promoted=got.of("promote_champion", Promotion).to_xcom(),
        holdout_path=_local_or_none(got.of("build_datasets", Datasets).holdout_path),
        who=run.who, when=run.run_time, last_attempt=run.last_attempt, endpoint=run.service,
        staged=got.of("stage_challenger", Staging).record if "stage_challenger" in got else None,
    ))  # fmt: skip


# Inputs are the data each step reads, and with it the DAG's edges (tests/dags asserts that graph).
TRAINING_STEPS: tuple[Step, ...] = (
    Step("collect_landed_files", (), _collect, Collected.from_xcom),
    Step("validate_batches", ("collect_landed_files",), _validate, Validated.from_xcom),
    Step("build_datasets", ("validate_batches",), _datasets, Datasets.from_xcom),
    Step("needs_training", ("build_datasets",), _gate, TrainingGate.from_xcom, gate=True),
    Step("train_challenger", ("build_datasets",), _train, Challenger.from_xcom),
    Step(
        "evaluate_against_champion", ("build_datasets", "train_challenger"), _evaluate, Evaluation.from_xcom
    ),
    Step(
        "register_challenger",
        ("train_challenger", "evaluate_against_champion", "build_datasets", "validate_batches"),
        _register,
        Registration.from_xcom,
    ),
    Step(
        "stage_challenger",
        ("register_challenger", "evaluate_against_champion", "build_datasets"),
        _stage,
        Staging.from_xcom,
    ),
    # Reads nothing from stage_challenger, but runs only after it passed (the edge).
    Step(
        "promote_champion",
        ("register_challenger", "evaluate_against_champion", "stage_challenger"),
        _promote,
        Promotion.from_xcom,
    ),
    Step(
        "deploy_champion",
        ("promote_champion", "build_datasets", "stage_challenger"),
        _deploy,
        Deployment.from_xcom,
    ),
)
STEPS_BY_NAME: dict[str, Step] = {s.name: s for s in TRAINING_STEPS}
# The steps that talk to the prediction service (left out by `run_training(deploy=False)`).
SERVICE_STEPS = frozenset({"stage_challenger", "deploy_champion"})
# The steps that need the service's connection: those, and the promotion, which signs with its token.
CONNECTION_STEPS = SERVICE_STEPS | {"promote_champion"}
# The DAG's default_args use these too: a transient error is retried the same way in and out of Airflow.
RETRIES = 2
RETRY_DELAY_S = 10.0


def load_inputs(step: Step, xcoms: Mapping[str, Any]) -> Results:
    """A step's inputs from its upstream tasks' XCom values, each read back by its own contract."""
    return Results({name: STEPS_BY_NAME[name].load(xcoms[name]) for name in step.inputs})


def run_steps(
    spec: ModelSpec,
    settings: Settings,
    run: RunContext,
    steps: tuple[Step, ...] = TRAINING_STEPS,
    *,
    retries: int = 0,
    retry_delay_s: float = RETRY_DELAY_S,
) -> Results:
    """Run `steps` in order in this process, as the DAG would: a transient error is retried up to
    `retries` times, anything else fails at once; a gate saying no ends the run (not an error).

    A failure keeps its type and message, with a note naming the step, as a failed task would.
    """
    results = Results()
    for step in steps:
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                result = step.run(spec, settings, _attempt(run, last), results)
                break
            except Exception as err:
                if last or not is_transient(err):
                    err.add_note(
                        f"{spec.name}__train: step {step.name} failed (try {attempt + 1}, run {run.run_id})"
                    )
                    raise
                log.warning("%s: %s is transient, retrying in %.0f s: %s", step.name, type(err).__name__,
                            retry_delay_s, err)  # fmt: skip
                time.sleep(retry_delay_s)
        results = results.with_result(step.name, result)
        if step.gate and isinstance(result, TrainingGate) and not result.needed:
            break
    return results


def _attempt(run: RunContext, last: bool) -> RunContext:
    return replace(run, last_attempt=last)


def run_training(
    spec: ModelSpec,
    settings: Settings,
    *,
    run_id: str,
    run_time: str,
    force: bool = False,
    deploy: bool = True,
    evaluate_only: bool = False,
    trigger: str = "plain python run",
    who: str | None = None,
    retries: int = 0,
) -> dict[str, Any]:
    """The training DAG's steps without Airflow (`deploy=False` stops before the rollout).

    Returns the promotion's XCom (plus `deployment`), or `{"trained": False, "why": ...}` when the
    gate found nothing to train; the run outcome is recorded either way, as the DAG records it.
    """
    steps = TRAINING_STEPS if deploy else tuple(s for s in TRAINING_STEPS if s.name not in SERVICE_STEPS)
    run = RunContext(run_id=run_id, run_time=run_time, trigger=trigger, who=who or run_id, force=force,
                     evaluate_only=evaluate_only)  # fmt: skip
    results = run_steps(spec, settings, run, steps, retries=retries)
    gate = results.of("needs_training", TrainingGate)
    if not gate.needed:
        return {"trained": False, "why": gate.why}
    out = results.of("promote_champion", Promotion).to_xcom()
    if "deploy_champion" in results:
        out["deployment"] = results.of("deploy_champion", Deployment).to_xcom()
    return out
