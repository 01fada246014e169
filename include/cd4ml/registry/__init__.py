"""MLflow adapter: log challengers, load models safely, register versions, move aliases.

Aliases: `champion` serves, `challenger` is the latest candidate. Every version carries lineage
tags (`cd4ml.*`) so any served model can be traced to its data, spec, code and decision.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cd4ml.core.errors import Cd4mlError, TransientError, is_transient

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)
# MLflow's usage telemetry sets and unsets an environment variable from its own thread; a thread
# that reads os.environ at that moment (requests does, on every call) fails with KeyError. cd4ml's
# processes run without it unless MLFLOW_DISABLE_TELEMETRY says otherwise (set before MLflow loads).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

CHAMPION = "champion"
CHALLENGER = "challenger"
SHADOW = "shadow"  # a candidate answering a copy of live traffic (deployment.strategy: shadow)
CANARY = "canary"  # a candidate answering a share of live traffic for real (deployment.strategy: canary)
TAG = "cd4ml."
# Types a model artefact may reference. Anything else (os.system, builtins.eval, a custom class
# smuggled into the file) makes loading fail before any object is built.
TRUSTED_TYPE_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.slice")


class UnsafeModelError(Cd4mlError):
    """A model artefact is not in the safe format or references types outside the allow-list."""


@dataclass(frozen=True)
class LoggedModel:
    run_id: str
    model_uri: str
    experiment_id: str = ""


def client(tracking_uri: str) -> MlflowClient:
    quiet_mlflow()
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


@contextmanager
def impatient(retries: int = 1, timeout_s: int = 10) -> Iterator[None]:
    """MLflow calls inside this block give up after `retries` quick retries and `timeout_s` per request.

    MLflow's default HTTP policy (7 retries, backoff factor 2) waits about 4 minutes before it reports
    an unreachable server. That suits a training step, which has nothing better to do; it does not suit
    what may fail without harm and tries again later (run housekeeping, the CLI's note in a model's
    history), nor a person waiting at a prompt. Settings made by the user win (MLFLOW_HTTP_REQUEST_*).
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    mine = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for key in mine:
            os.environ.pop(key, None)


def quiet_mlflow() -> None:
    """Progress bars and emoji links flood Airflow task logs."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def untrusted_types_of(model: Any) -> list[str]:
    import skops.io

    return list(skops.io.get_untrusted_types(data=skops.io.dumps(model)))


def check_trusted(types: list[str], where: str) -> None:
    bad = sorted(t for t in types if not t.startswith(TRUSTED_TYPE_PREFIXES))
    if bad:
        raise UnsafeModelError(
            f"{where}: refers to types outside the allow-list {TRUSTED_TYPE_PREFIXES}: {bad}"
        )


def log_challenger(
    tracking_uri: str,
    *,
    experiment: str,
    run_name: str,
    model: Any,
    input_example: pd.DataFrame,
    params: dict[str, Any],
    tags: dict[str, str],
    metrics: dict[str, float],
) -> LoggedModel:
    """Log a fitted pipeline as an MLflow model (skops format, signature and input example)."""
    quiet_mlflow()
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    trusted = untrusted_types_of(model)
    check_trusted(trusted, f"challenger for {experiment}")
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            serialization_format="skops",
            skops_trusted_types=trusted,
            signature=infer_signature(input_example, model.predict(input_example)),
            input_example=input_example,
            pip_requirements=pip_requirements(model),
        )
    return LoggedModel(run_id=run.info.run_id, model_uri=info.model_uri, experiment_id=run.info.experiment_id)


@cache
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> distributions; scanning every installed package takes seconds on these
    cores and cannot change within a process, yet every training run asked again."""
    import importlib.metadata as md

    return dict(md.packages_distributions())


def pip_requirements(model: Any) -> list[str]:
    """Exact pins, from this environment, of what loading the model needs: MLflow, the skops format,
    sklearn's stack and the estimator's own package (e.g. lightgbm). Left to MLflow, the inference
    re-imports the model in a subprocess and costs 4-13 s per logged model on these cores."""
    import importlib.metadata as md

    estimator = model.steps[-1][1] if hasattr(model, "steps") else model
    modules = {
        "mlflow",
        "sklearn",
        "skops",
        "pandas",
        "numpy",
        "scipy",
        type(estimator).__module__.split(".")[0],
    }
    distributions = _distributions()
    pins = set()
    for module in modules:
        for dist in distributions.get(module, [module]):
            try:
                pins.add(f"{dist}=={md.version(dist)}")
            except md.PackageNotFoundError:
                continue  # a module that is no installed distribution (a local package) has no pin
    return sorted(pins)


@dataclass(frozen=True)
class ModelBundle:
    """A safely loaded model with what serving needs: its input schema and its own input example."""

    model: Any
    numerical: list[str]
    categorical: list[str]
    example: pd.DataFrame | None


def _input_columns(signature: ModelSignature | None) -> tuple[list[str], list[str]]:
    """(numerical, categorical) input column names from the model's signature (MLflow's schema
    types, not the MLmodel YAML); columns of any other type are not served."""
    from mlflow.types import ColSpec, DataType

    if signature is None or signature.inputs is None:
        return [], []
    numeric = {DataType.double, DataType.float, DataType.long, DataType.integer}
    cols = [c for c in signature.inputs.inputs if isinstance(c, ColSpec) and c.name is not None]
    return (
        [str(c.name) for c in cols if c.type in numeric],
        [str(c.name) for c in cols if c.type == DataType.string],
    )


def load_bundle(tracking_uri: str, model_uri: str) -> ModelBundle:
    """Load an sklearn model without executing pickles: skops only, types checked against our list.

    MLflow's own loader trusts the allow-list written inside the artefact; we do not.
    """
    quiet_mlflow()
    import mlflow
    import pandas as pd
    import skops.io
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="cd4ml-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        mlmodel = Model.load(str(local))
        flavor = mlmodel.flavors.get("sklearn")
        if not flavor:
            raise UnsafeModelError(f"{model_uri}: no sklearn flavor in MLmodel")
        if flavor.get("serialization_format") != "skops":
            raise UnsafeModelError(
                f"{model_uri}: serialized as {flavor.get('serialization_format')!r}; only 'skops' is loaded"
            )
        path = (local / str(flavor.get("pickled_model"))).resolve()
        if not path.is_relative_to(local.resolve()) or not path.is_file():
            raise UnsafeModelError(
                f"{model_uri}: MLmodel points at {flavor.get('pickled_model')!r}, not a file in the model"
            )
        try:
            found = list(skops.io.get_untrusted_types(file=path))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
            # A pickle (or anything else) behind a `skops` label: never handed to a loader.
            raise UnsafeModelError(
                f"{model_uri}: {path.name} is labelled skops but is not a skops file ({err}); not loaded"
            ) from None
        check_trusted(found, model_uri)
        model = skops.io.load(path, trusted=found)
        numerical, categorical = _input_columns(mlmodel.signature)
        example = None
        example_file = local / "input_example.json"
        if example_file.exists():
            raw = json.loads(example_file.read_text())
            example = pd.DataFrame(raw["data"], columns=raw["columns"]) if "columns" in raw else None
    return ModelBundle(model, numerical, categorical, example)


def load_model(tracking_uri: str, model_uri: str) -> Any:
    return load_bundle(tracking_uri, model_uri).model


def version_by_alias(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def ensure_registered_model(mlflow_client: MlflowClient, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlflow_client.create_registered_model(name, description=description, tags={f"{TAG}managed": "true"})


def find_version_for_run(mlflow_client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """Registration is idempotent: a retried task finds the version its first attempt created."""
    for mv in mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return mv
    return None


class RegistryUnreachableError(TransientError):
    """MLflow did not answer; nothing this step would have changed is half-changed (see the message)."""


def unreachable(err: BaseException) -> bool:
    """MLflow did not answer (in time): its client re-raises connection failures as MlflowException
    while handling them, so the typed cause is in the exception chain."""
    return is_transient(err)


def register_version(
    mlflow_client: MlflowClient,
    *,
    name: str,
    description: str,
    logged: LoggedModel,
    tags: dict[str, str],
) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return _register_version(mlflow_client, name=name, description=description, logged=logged, tags=tags)
    except MlflowException as err:
        if not unreachable(err):
            raise
        raise RegistryUnreachableError(
            f"{name}: MLflow at {mlflow_client.tracking_uri} is unreachable while registering run "
            f"{logged.run_id}; no alias was moved. A retry re-uses the version if it was already "
            f"created (registration is idempotent by run id). Cause: {err}"
        ) from None


def _register_version(
    mlflow_client: MlflowClient,
    *,
    name: str,
    description: str,
    logged: LoggedModel,
    tags: dict[str, str],
) -> ModelVersion:
    ensure_registered_model(mlflow_client, name, description)
    mv = find_version_for_run(mlflow_client, name, logged.run_id)
    if mv is None:
        import mlflow

        mv = mlflow.register_model(logged.model_uri, name, tags=tags, await_registration_for=60)
        mv = wait_ready(mlflow_client, name, mv.version)
    else:
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, mv.version, key, value)
    mlflow_client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv


def wait_ready(mlflow_client: MlflowClient, name: str, version: str, attempts: int = 60) -> ModelVersion:
    import time

    for _ in range(attempts):
        mv = mlflow_client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION":
            raise Cd4mlError(f"MLflow failed to register {name} version {version}: {mv.status_message}")
        time.sleep(0.5)
    raise TransientError(
        f"{name} version {version} not READY after {attempts * 0.5:.0f}s: MLflow is slow to finish "
        "the registration; a retry re-uses the version (registration is idempotent by run id)"
    )


def set_tags(mlflow_client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)


def move_champion(
    mlflow_client: MlflowClient, name: str, version: str, *, expected_current: str | None
) -> str | None:
    """Point `champion` at `version` in one call (an alias update is a single row write).

    Refuses if the champion moved since it was evaluated against: the decision would be stale.
    Returns the previous champion version. Idempotent: a retried promotion whose first attempt moved
    the alias (and then failed, e.g. recording the event) finds `version` already champion and
    carries on, instead of refusing its own earlier move as a stale decision.
    """
    current = version_by_alias(mlflow_client, name, CHAMPION)
    # MLflow returns versions as int or str depending on the store; compare them as text.
    current_version = str(current.version) if current else None
    expected = None if expected_current is None else str(expected_current)
    if current_version is not None and current_version == str(version):
        return expected
    if current_version != expected:
        raise Cd4mlError(
            f"{name}: champion is version {current_version}, but the challenger was evaluated against "
            f"{expected_current}; refusing to promote on a stale decision"
        )
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return current_version


SIGNATURE_TAG = "cd4ml.champion_signature"
CANARY_SIGNATURE_TAG = "cd4ml.canary_signature"
_SIGNATURE_TAGS = {CHAMPION: SIGNATURE_TAG, CANARY: CANARY_SIGNATURE_TAG}


def champion_signature(key: str, name: str, version: str, when: str, role: str = CHAMPION) -> str:
    """cd4ml's record that it made `version` of `name` champion (or canary: `role`) at `when`: an
    HMAC (SHA-256) keyed with the service's admin token, which only cd4ml's tasks and the service
    hold. Someone who can write to MLflow but does not hold the key can move the alias, but cannot
    write this record (and a canary record does not pass for a champion's)."""
    message = f"cd4ml-{role}\n{name}\n{version}\n{when}".encode()
    digest = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
    return f"v1 {when} {digest}"


def signature_problem(
    key: str, name: str, version: str, tags: dict[str, str], role: str = CHAMPION
) -> str | None:
    """None if the version carries a valid cd4ml record for `role` and this key; else what is wrong."""
    tag = _SIGNATURE_TAGS[role]
    record = tags.get(tag, "")
    what = "promotion" if role == CHAMPION else role
    if not record:
        return f"version {version} carries no cd4ml {what} record (tag {tag})"
    scheme, _, rest = record.partition(" ")
    when, _, digest = rest.rpartition(" ")
    if scheme != "v1" or not when or not digest:
        return f"version {version}'s {what} record is malformed"
    expected = champion_signature(key, name, version, when, role)
    if not hmac.compare_digest(expected.encode(), record.encode()):
        return f"version {version}'s {what} record is not signed with this service's admin token"
    return None


def promote_with_tags(
    mlflow_client: MlflowClient,
    name: str,
    version: str,
    *,
    expected_current: str | None,
    tags: dict[str, str],
    sign_with: str | None = None,
    when: str = "",
) -> str | None:
    """`move_champion`, with `tags` on the version *before* the alias moves.

    The service loads a new champion within a poll of the alias move and reads its tags then
    (champion since); tags written after the move could be missed for as long as it serves the
    version. With `sign_with` (the service's admin token), the tags include cd4ml's signed
    champion record for `when`, without which a service holding that token will not serve the
    version. If the move is refused or fails, the tags go back to what they were.
    """
    if sign_with:
        tags = {**tags, SIGNATURE_TAG: champion_signature(sign_with, name, str(version), when)}
    mv = mlflow_client.get_model_version(name, version)
    before = {key: (mv.tags or {}).get(key) for key in tags}
    set_tags(mlflow_client, name, version, tags)
    try:
        previous = move_champion(mlflow_client, name, version, expected_current=expected_current)
    except BaseException:
        for key, value in before.items():
            if value is None:
                mlflow_client.delete_model_version_tag(name, version, key)
            else:
                mlflow_client.set_model_version_tag(name, version, key, value)
        raise
    # A shadow or canary that became the champion stops being one (else it would shadow or take a
    # share of traffic again as soon as `champion` moved on).
    for alias in (SHADOW, CANARY):
        held = version_by_alias(mlflow_client, name, alias)
        if held is not None and str(held.version) == str(version):
            mlflow_client.delete_registered_model_alias(name, alias)
    return previous


# Evidence and history live in their own modules; `from cd4ml import registry` reaches them here.
from cd4ml.registry.evidence import Evidence as Evidence  # noqa: E402
from cd4ml.registry.evidence import EvidenceMissingError as EvidenceMissingError  # noqa: E402
from cd4ml.registry.evidence import evidence_cache_info as evidence_cache_info  # noqa: E402
from cd4ml.registry.evidence import read_evidence as read_evidence  # noqa: E402
from cd4ml.registry.evidence import record_evidence as record_evidence  # noqa: E402
from cd4ml.registry.evidence import reference_frame as reference_frame  # noqa: E402
from cd4ml.registry.evidence import validation_status as validation_status  # noqa: E402
from cd4ml.registry.history import HistoryEvent as HistoryEvent  # noqa: E402
from cd4ml.registry.history import append_event as append_event  # noqa: E402
from cd4ml.registry.history import events as events  # noqa: E402
from cd4ml.registry.history import record_retraction as record_retraction  # noqa: E402
from cd4ml.registry.retention import prune_runs as prune_runs  # noqa: E402
from cd4ml.registry.retention import retention_days as retention_days  # noqa: E402
