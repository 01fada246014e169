"""The training pipeline's steps: each loads what it needs, calls pure functions, saves, and returns
a small JSON-able dict. Airflow tasks are thin adapters around these; `run_training` chains them
in one plain process (used by benchmarks and for debugging without Airflow).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cd4ml.core import lineage
from cd4ml.core.errors import DataError, DataReadError, QuarantinedError, TrainingError
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.data import landing
from cd4ml.data.landing import Zone

log = logging.getLogger(__name__)


def run_key(run_id: str) -> str:
    """A filesystem-safe key for one pipeline run; outputs are keyed by it, so retries overwrite."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


def zone_for(spec: ModelSpec, settings: Settings) -> Zone:
    return Zone(settings.model_dir(spec.name)).ensure()


# -- collect ---------------------------------------------------------------------------------------


def collect_landed_files(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """Every complete file in landing/; byte-identical copies of accepted files go to quarantine.

    A spec whose model cannot be trained or scored fails here, before any file moves.
    """
    from cd4ml.ml.training import check_trainable_spec

    check_trainable_spec(spec)
    zone = zone_for(spec, settings)
    known = landing.accepted_hashes(zone)
    new: list[dict[str, Any]] = []
    duplicates: list[dict[str, str]] = []
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
            duplicates.append({"name": landed.name, "path": str(target), "reason": reason})
            log.warning(reason)
            continue
        seen[prefix] = landed.name
        new.append(asdict(landed))
    return {"new": new, "duplicates": duplicates}


# -- validate --------------------------------------------------------------------------------------


def _read_accepted_files(spec: ModelSpec, zone: Zone) -> list[tuple[str, Any]]:
    """(file name, normalised frame) per accepted file, in acceptance order: rows keep provenance."""
    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import normalise

    return [(f.name, normalise(spec, read_table(Path(f.path)))) for f in landing.list_accepted(zone)]


def _concat(spec: ModelSpec, frames: list[Any]) -> Any:
    import pandas as pd

    if not frames:
        return pd.DataFrame(columns=spec.columns)
    return pd.concat(frames, ignore_index=True)


def _read_accepted(spec: ModelSpec, zone: Zone) -> Any:
    return _concat(spec, [frame for _, frame in _read_accepted_files(spec, zone)])


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


def _blame(spec: ModelSpec, zone: Zone, culprits: dict[str, list[str]], what: str) -> DataError:
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
    files: list[dict[str, Any]],
    *,
    run_id: str,
    run_time: str,
) -> dict[str, Any]:
    """Validate each new file; move it to accepted/ or to quarantine/ with the reasons."""
    import pandas as pd

    from cd4ml.data.tables import read_table
    from cd4ml.data.validation import learn_reference, normalise, validate_frame
    from cd4ml.ml.training import acceptance_problems, preprocessing_problems

    zone = zone_for(spec, settings)
    accepted_files = _read_accepted_files(spec, zone)
    accepted_frame = _concat(spec, [frame for _, frame in accepted_files])
    if not accepted_frame.empty and preprocessing_problems(spec, accepted_frame):
        # Not the new batches' fault: no batch could be accepted on top of this data.
        culprits = diagnose_accepted(spec, accepted_files)
        if culprits:
            raise _blame(spec, zone, culprits, "the accepted data cannot be trained on")
    accepted: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    docs_url = None
    for item in files:
        landed = landing.LandedFile(**item)
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
            quarantined.append({"name": landed.name, "path": str(target), "reason": reason})
            continue
        reference = learn_reference(spec, accepted_frame)
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
            accepted.append({**asdict(record), "validation": outcome.summary(), "drift": outcome.drift})
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
            quarantined.append({"name": landed.name, "path": str(target), "reason": reason})
        log.info("%s: %s", landed.name, outcome.summary())
    return {"accepted": accepted, "quarantined": quarantined, "docs_url": docs_url}


# -- datasets --------------------------------------------------------------------------------------


def prepare_datasets(spec: ModelSpec, settings: Settings, *, run_id: str) -> dict[str, Any]:
    """Training set and holdout from every accepted file, saved under runs/<run key>/.

    Refuses (DataError naming the files) accepted data no model can be fitted on, and (SpecError) a
    target the spec's task or metric cannot be computed on, before anything is fitted.
    """
    from cd4ml.ml.training import check_target, split_holdout

    zone = zone_for(spec, settings)
    files = landing.list_accepted(zone)
    if not files:
        return {"empty": True, "fingerprint": None}
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
    out = zone.runs / run_key(run_id)
    out.mkdir(parents=True, exist_ok=True)
    split.train.to_parquet(out / "train.parquet", index=False)
    split.holdout.to_parquet(out / "holdout.parquet", index=False)
    return {
        "empty": False,
        "train_path": str(out / "train.parquet"),
        "holdout_path": str(out / "holdout.parquet"),
        "rows_train": len(split.train),
        "rows_holdout": len(split.holdout),
        "holdout_starts_at": split.cutoff,
        "fingerprint": landing.data_fingerprint(files),
        "files": [f.name for f in files],
        # The drift monitor treats batches accepted after this as new to a model trained now.
        "trained_through": max(f.accepted_at for f in files),
    }


def record_run_outcome(
    spec: ModelSpec, settings: Settings, *, run_id: str, trigger: str, trained: bool, why: str
) -> Path:
    """runs/<run key>/outcome.json: why this run trained or not (shown in the Models view)."""
    import json

    out = zone_for(spec, settings).runs / run_key(run_id)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "outcome.json"
    path.write_text(json.dumps({"run_id": run_id, "trigger": trigger, "trained": trained, "why": why}))
    return path


def training_needed(
    spec: ModelSpec, settings: Settings, datasets: dict[str, Any], *, force: bool
) -> tuple[bool, str]:
    """Skip retraining when the champion was built from exactly this data, spec and code."""
    from cd4ml import registry

    if datasets.get("empty"):
        return False, "no accepted data yet: land a file in landing/ to train the first model"
    if force:
        return True, "forced by the run's parameters"
    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    champion = registry.version_by_alias(mlflow_client, spec.name, registry.CHAMPION)
    if champion is None:
        return True, "no champion yet"
    # The latest challenger counts too: a rejected model retrained on the same inputs is the same model.
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        mv = (
            champion
            if alias == registry.CHAMPION
            else registry.version_by_alias(mlflow_client, spec.name, alias)
        )
        tags = (mv.tags or {}) if mv is not None else {}
        if mv is not None and (
            tags.get("cd4ml.data_fingerprint") == datasets["fingerprint"]
            and tags.get("cd4ml.spec_hash") == spec.spec_hash()
            and tags.get("cd4ml.code_version") == lineage.code_version()
        ):
            return False, (
                f"version {mv.version} ({alias}) was already trained on exactly this data "
                f"(fingerprint {datasets['fingerprint'][:12]}), spec and code; nothing to retrain"
            )
    return True, "data, spec or code changed since the champion was trained"


# -- train -----------------------------------------------------------------------------------------


def train_challenger(
    spec: ModelSpec, settings: Settings, datasets: dict[str, Any], *, run_id: str
) -> dict[str, Any]:
    import pandas as pd

    from cd4ml import registry
    from cd4ml.ml import training
    from cd4ml.ml.evaluation import score

    train_frame = pd.read_parquet(datasets["train_path"])
    holdout = pd.read_parquet(datasets["holdout_path"])
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
                "rows_train": datasets["rows_train"], "rows_holdout": datasets["rows_holdout"]},
        tags={"cd4ml.airflow_run_id": run_id, "cd4ml.data_fingerprint": datasets["fingerprint"],
              "cd4ml.spec_hash": spec.spec_hash()},
        metrics={f"holdout_{spec.metric.name}": holdout_score},
    )  # fmt: skip
    return {
        "run_id": logged.run_id,
        "model_uri": logged.model_uri,
        "experiment_id": logged.experiment_id,
        "holdout_score": holdout_score,
    }


# -- evaluate --------------------------------------------------------------------------------------


def evaluate_against_champion(
    spec: ModelSpec, settings: Settings, datasets: dict[str, Any], challenger: dict[str, Any]
) -> dict[str, Any]:
    """Score both models on the same holdout and decide with a paired bootstrap."""
    import mlflow
    import pandas as pd

    from cd4ml import registry
    from cd4ml.ml import training
    from cd4ml.ml.evaluation import decide

    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    holdout = pd.read_parquet(datasets["holdout_path"])
    y = holdout[spec.target].to_numpy()
    challenger_model = registry.load_model(settings.mlflow_tracking_uri, challenger["model_uri"])
    challenger_scores = training.metric_inputs(spec, challenger_model, holdout)
    champion = registry.version_by_alias(mlflow_client, spec.name, registry.CHAMPION)
    champion_scores = None
    if champion is not None:
        champion_model = registry.load_model(
            settings.mlflow_tracking_uri, f"models:/{spec.name}/{champion.version}"
        )
        champion_scores = training.metric_inputs(spec, champion_model, holdout)
    decision = decide(
        spec.metric.name, spec.promotion, y, challenger_scores, champion_scores,
        champion_version=champion.version if champion else None, seed=spec.seed,
    )  # fmt: skip
    evidence = decision.as_dict()
    with mlflow.start_run(run_id=challenger["run_id"]):
        mlflow.log_metrics({
            "challenger_score": decision.challenger_score,
            **({"champion_score": decision.champion_score} if decision.champion_score is not None else {}),
            **({"ci_low": decision.ci_low} if decision.ci_low is not None else {}),
        })  # fmt: skip
        mlflow.log_dict(evidence, "decision.json")
        mlflow.set_tag("cd4ml.decision", "promote" if decision.promote else "reject")
    log.info("decision: %s", decision.reason)
    return evidence


# -- register and promote --------------------------------------------------------------------------


def register_challenger(
    spec: ModelSpec,
    settings: Settings,
    *,
    challenger: dict[str, Any],
    evidence: dict[str, Any],
    datasets: dict[str, Any],
    validation: dict[str, Any],
    run_id: str,
    reason: str,
) -> dict[str, Any]:
    """Every challenger becomes a version with full lineage; the `challenger` alias points to it."""
    from cd4ml import registry

    tags = {
        "cd4ml.data_fingerprint": datasets["fingerprint"],
        "cd4ml.spec_hash": spec.spec_hash(),
        "cd4ml.code_version": lineage.code_version(),
        "cd4ml.lock_hash": lineage.lock_hash(),
        "cd4ml.data.validation": registry.tag_json(
            {"accepted": [a["name"] for a in validation.get("accepted", [])],
             "quarantined": [q["name"] for q in validation.get("quarantined", [])],
             # Accepted files with rows outside a learned range (drift, not refused): which columns.
             "drift": {a["name"]: sorted(a["drift"])
                       for a in validation.get("accepted", []) if a.get("drift")},
             "status": "passed"}
        ),
        "cd4ml.decision": "promote" if evidence["promote"] else "reject",
        "cd4ml.evidence": registry.tag_json(evidence),
        "cd4ml.airflow_run_id": run_id,
        "cd4ml.trigger_reason": reason[:500],
        "cd4ml.train_snapshot": datasets["train_path"],
        "cd4ml.holdout_snapshot": datasets["holdout_path"],
        "cd4ml.trained_through": str(datasets.get("trained_through", "")),
        "cd4ml.holdout_starts_at": str(datasets["holdout_starts_at"]),
        "cd4ml.rows_train": str(datasets["rows_train"]),
    }  # fmt: skip
    mv = registry.register_version(
        registry.client(settings.mlflow_tracking_uri),
        name=spec.name,
        description=spec.description,
        logged=registry.LoggedModel(challenger["run_id"], challenger["model_uri"]),
        tags=tags,
    )
    return {"version": str(mv.version), "run_id": challenger["run_id"]}


def promote_champion(
    spec: ModelSpec,
    settings: Settings,
    *,
    version: str,
    evidence: dict[str, Any],
    evaluate_only: bool,
    run_time: str,
) -> dict[str, Any]:
    """Move `champion` if the decision says so; a rejected challenger changes nothing that serves."""
    from cd4ml import registry

    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    if not evidence["promote"]:
        return {"promoted": False, "version": version, "why": evidence["reason"]}
    if evaluate_only:
        registry.set_tags(mlflow_client, spec.name, version, {"cd4ml.promotion": "skipped: evaluate_only"})
        return {
            "promoted": False,
            "version": version,
            "why": "evaluate_only: decision recorded, champion untouched",
        }
    previous = registry.move_champion(
        mlflow_client, spec.name, version, expected_current=evidence["champion_version"]
    )
    registry.set_tags(
        mlflow_client, spec.name, version,
        {"cd4ml.promoted_at": run_time, "cd4ml.previous_champion": previous or "none"},
    )  # fmt: skip
    log.info("%s: champion is now version %s (was %s)", spec.name, version, previous)
    return {"promoted": True, "version": version, "previous": previous, "why": evidence["reason"]}


# -- the whole chain in one process ----------------------------------------------------------------


def run_training(
    spec: ModelSpec,
    settings: Settings,
    *,
    run_id: str,
    run_time: str,
    force: bool = False,
    deploy: bool = True,
) -> dict[str, Any]:
    """The same steps as the training DAG, without Airflow (`deploy=False` skips the rollout)."""
    collected = collect_landed_files(spec, settings)
    validation = validate_landed_files(spec, settings, collected["new"], run_id=run_id, run_time=run_time)
    if validation["quarantined"] and not validation["accepted"]:
        raise QuarantinedError(validation["quarantined"])
    datasets = prepare_datasets(spec, settings, run_id=run_id)
    needed, why = training_needed(spec, settings, datasets, force=force)
    if not needed:
        return {"trained": False, "why": why}
    challenger = train_challenger(spec, settings, datasets, run_id=run_id)
    evidence = evaluate_against_champion(spec, settings, datasets, challenger)
    registered = register_challenger(
        spec, settings, challenger=challenger, evidence=evidence, datasets=datasets,
        validation=validation, run_id=run_id, reason="plain python run",
    )  # fmt: skip
    promoted = promote_champion(
        spec,
        settings,
        version=registered["version"],
        evidence=evidence,
        evaluate_only=False,
        run_time=run_time,
    )
    if deploy:
        from cd4ml.steps.deploy import deploy_champion

        promoted["deployment"] = deploy_champion(
            spec,
            settings,
            promoted=promoted,
            holdout_path=datasets["holdout_path"],
            who=run_id,
            when=run_time,
        )
    return promoted
