"""Deployment: make the prediction service serve the champion, prove it, or roll back by itself.

After `champion` moves: ask the service to reload, wait (bounded) until it reports the new version,
then smoke-test it with golden rows from the holdout — the service's answers must equal the offline
predictions of the registered version, exactly. On any failure `champion` goes back to the previous
version, the service is confirmed to serve it again, and the run fails saying what broke. Every
attempt is recorded on the version as MLflow tags.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

from cd4ml import registry
from cd4ml.core.errors import Cd4mlError, TransientError
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec

log = logging.getLogger(__name__)


def golden_rows() -> int:
    return int(os.environ.get("CD4ML_DEPLOY_GOLDEN_ROWS", "50"))


class DeployError(Cd4mlError):
    """The service did not serve the champion correctly; the message says what broke."""


class ServiceRefusedError(DeployError):
    """The service loaded the version and refused it (its own reason is in the message): a retry
    would be refused the same way."""


class ServiceUnreachableError(TransientError, DeployError):
    """The service (or the MLflow it polls) did not answer: a retry may find it back."""


@dataclass(frozen=True)
class ServiceEndpoint:
    url: str
    admin_token: str | None
    wait_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> ServiceEndpoint:
        port = os.environ.get("CD4ML_SERVICE_PORT", "8000")
        return cls(
            url=os.environ.get("CD4ML_SERVICE_URL", f"http://127.0.0.1:{port}").rstrip("/"),
            admin_token=os.environ.get("CD4ML_SERVICE_ADMIN_TOKEN") or None,
            wait_seconds=float(os.environ.get("CD4ML_DEPLOY_WAIT_SECONDS", "60")),
        )


@dataclass(frozen=True)
class ServiceState:
    """What the service says about one model: the version it serves and the versions it refused."""

    reachable: bool
    known: bool
    version: str | None
    refused: dict[str, str]
    error: str | None = None


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def service_state(endpoint: ServiceEndpoint, model: str) -> ServiceState:
    try:
        resp = httpx.get(f"{endpoint.url}/v1/models/{model}", timeout=5)
    except httpx.HTTPError as err:
        return ServiceState(False, False, None, {}, f"{type(err).__name__}: {err}")
    body = _json(resp)
    refused = {str(v): str(why) for v, why in (body.get("refused_versions") or {}).items()}
    version = str(body["version"]) if resp.status_code == 200 and "version" in body else None
    error = (
        None if resp.status_code == 200 else f"HTTP {resp.status_code}: {body.get('error', resp.text[:200])}"
    )
    return ServiceState(True, resp.status_code != 404, version, refused, error)


def serving_version(endpoint: ServiceEndpoint, model: str) -> str | None:
    return service_state(endpoint, model).version


def _reload(endpoint: ServiceEndpoint, model: str) -> dict[str, str]:
    """Ask the service to check MLflow now; returns the refusals it reports for `model`."""
    if not endpoint.admin_token:
        return {}
    try:
        resp = httpx.post(
            f"{endpoint.url}/admin/reload",
            headers={"Authorization": f"Bearer {endpoint.admin_token}"},
            timeout=endpoint.wait_seconds,
        )
    except httpx.HTTPError:
        return {}  # unreachable now; service_state() reports it if it stays that way
    refused = _json(resp).get("refused") or {}
    prefix = f"{model}/"
    return {str(k)[len(prefix) :]: str(v) for k, v in refused.items() if str(k).startswith(prefix)}


def _poll_error(endpoint: ServiceEndpoint) -> str | None:
    try:
        error = _json(httpx.get(f"{endpoint.url}/health/ready", timeout=5)).get("last_poll_error")
    except httpx.HTTPError:
        return None
    return str(error) if error else None


def wait_until_serving(endpoint: ServiceEndpoint, model: str, version: str) -> None:
    """Return once the service serves `version`; otherwise raise what actually happened: it refused
    the version (with its reason, at once), it is unreachable (transient), or it never switched."""
    deadline = time.monotonic() + endpoint.wait_seconds
    where = f"{model}: the prediction service at {endpoint.url}"
    while True:
        refused = _reload(endpoint, model)
        state = service_state(endpoint, model)
        reason = state.refused.get(version) or refused.get(version)
        if reason:
            raise ServiceRefusedError(f"{where} refused version {version}: {reason}")
        if state.version == version:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    waited = f"{endpoint.wait_seconds:.0f}s after champion moved to {version}"
    if not state.reachable:
        raise ServiceUnreachableError(f"{where} is unreachable ({state.error}) {waited}")
    if not state.known:
        raise DeployError(
            f"{where} does not know model {model!r} {waited}: it serves the specs in its own "
            f"CD4ML_SPECS_DIR; give it {model}.yaml"
        )
    serves = f"still serves version {state.version}" if state.version else "serves no version of it"
    poll_error = _poll_error(endpoint)
    if poll_error:
        raise ServiceUnreachableError(f"{where} {serves} {waited}: it cannot read MLflow ({poll_error})")
    raise DeployError(
        f"{where} {serves} {waited}; it neither loaded nor refused version {version} "
        "(see the service log; CD4ML_DEPLOY_WAIT_SECONDS sets the wait)"
    )


def _golden_rows(spec: ModelSpec, holdout_path: str) -> Any:
    import pandas as pd

    from cd4ml.ml.training import features

    holdout = pd.read_parquet(holdout_path)
    return features(spec, holdout.tail(golden_rows()))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def smoke_test(
    spec: ModelSpec, settings: Settings, endpoint: ServiceEndpoint, version: str, holdout_path: str
) -> dict[str, Any]:
    """Service predictions must equal the registered version's offline predictions on golden rows."""
    golden = _golden_rows(spec, holdout_path)
    model = registry.load_model(settings.mlflow_tracking_uri, f"models:/{spec.name}/{version}")
    expected = model.predict(golden).tolist()
    payload = {"dataframe_split": json.loads(golden.to_json(orient="split", index=False))}
    try:
        resp = httpx.post(
            f"{endpoint.url}/v1/models/{spec.name}/predict",
            json=payload,
            headers={"x-cd4ml-purpose": "smoke-test"},  # not real traffic: kept out of the drift window
            timeout=30,
        )
    except httpx.HTTPError as err:
        raise ServiceUnreachableError(
            f"{spec.name}: smoke test could not reach the service at {endpoint.url}: {err}"
        ) from None
    if resp.status_code != 200:
        raise DeployError(f"{spec.name}: smoke test got HTTP {resp.status_code}: {resp.text[:500]}")
    body = resp.json()
    if str(body.get("version")) != version:
        raise DeployError(
            f"{spec.name}: smoke test answered by version {body.get('version')}, expected {version}"
        )
    got = body["predictions"]
    mismatches = [i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if not _equal(a, b)]
    if len(got) != len(expected) or mismatches:
        i = mismatches[0] if mismatches else min(len(got), len(expected))
        raise DeployError(
            f"{spec.name}: service predictions differ from the registered version {version} offline: "
            f"{len(mismatches)} of {len(expected)} golden rows (row {i}: service "
            f"{got[i] if i < len(got) else None!r} vs offline {expected[i] if i < len(expected) else None!r})"
        )
    return {"golden_rows": len(expected), "version": version}


def _record(settings: Settings, model: str, version: str, record: dict[str, Any]) -> None:
    client = registry.client(settings.mlflow_tracking_uri)
    registry.set_tags(client, model, version, {"cd4ml.deployment": registry.tag_json(record)})


def deploy_champion(
    spec: ModelSpec,
    settings: Settings,
    *,
    promoted: dict[str, Any],
    holdout_path: str,
    who: str,
    when: str,
    endpoint: ServiceEndpoint | None = None,
    last_attempt: bool = True,
) -> dict[str, Any]:
    """Roll out a freshly promoted champion; roll back to the previous one if anything fails.

    A transient failure (service unreachable) before the last attempt is raised as it is, with the
    champion left in place, so the retry deploys it again once the service is back; on the last
    attempt, or for a deterministic failure (a refusal, wrong predictions), `champion` is rolled
    back first. Every outcome is recorded on the version as `cd4ml.deployment`.
    """
    if not promoted.get("promoted"):
        return {"deployed": False, "why": "champion unchanged; nothing to deploy"}
    endpoint = endpoint or ServiceEndpoint.from_env()
    version, previous = str(promoted["version"]), promoted.get("previous")
    current = registry.version_by_alias(
        registry.client(settings.mlflow_tracking_uri), spec.name, registry.CHAMPION
    )
    if current is None or str(current.version) != version:
        # A re-run after an earlier try rolled back, or the alias was moved by hand since.
        raise DeployError(
            f"{spec.name}: champion is {'unset' if current is None else f'version {current.version}'}, "
            f"no longer version {version}; nothing to deploy (promote it again to roll it out)"
        )
    record: dict[str, Any] = {"who": who, "when": when}
    try:
        wait_until_serving(endpoint, spec.name, version)
        checked = smoke_test(spec, settings, endpoint, version, holdout_path)
    except DeployError as failure:
        if failure.retryable and not last_attempt:
            _record(settings, spec.name, version, {**record, "outcome": "retrying", "error": str(failure)})
            raise
        rollback_note = _roll_back_after_failure(spec, settings, endpoint, version, previous)
        _record(
            settings,
            spec.name,
            version,
            {**record, "outcome": "failed", "error": str(failure), "rollback": rollback_note},
        )
        raise type(failure)(f"deploy of {spec.name} v{version} failed: {failure}; {rollback_note}") from None
    _record(settings, spec.name, version, {**record, "outcome": "deployed", **checked})
    return {"deployed": True, "version": version, **checked}


def _roll_back_after_failure(
    spec: ModelSpec, settings: Settings, endpoint: ServiceEndpoint, failed: str, previous: str | None
) -> str:
    client = registry.client(settings.mlflow_tracking_uri)
    if previous is None:
        client.delete_registered_model_alias(spec.name, registry.CHAMPION)
        return "there was no previous champion; the champion alias was removed"
    registry.move_champion(client, spec.name, previous, expected_current=failed)
    registry.set_tags(client, spec.name, failed, {"cd4ml.rolled_back": f"to {previous}"})
    try:
        wait_until_serving(endpoint, spec.name, previous)
    except DeployError as err:
        return f"champion moved back to {previous}, but the service does not serve it yet: {err}"
    return f"champion rolled back to {previous}, which the service serves again"


def rollback(
    spec: ModelSpec,
    settings: Settings,
    *,
    target: str | None,
    reason: str,
    who: str,
    when: str,
    holdout_path: str | None = None,
    endpoint: ServiceEndpoint | None = None,
) -> dict[str, Any]:
    """Move `champion` to `target` (default: the previous champion), then the same smoke test."""
    endpoint = endpoint or ServiceEndpoint.from_env()
    client = registry.client(settings.mlflow_tracking_uri)
    current = registry.version_by_alias(client, spec.name, registry.CHAMPION)
    current_version = str(current.version) if current else None
    if not target:
        target = (current.tags or {}).get("cd4ml.previous_champion") if current else None
        if not target or target == "none":
            raise DeployError(f"{spec.name}: no previous champion recorded; choose a version to roll back to")
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(spec.name, target)
    except MlflowException:
        raise DeployError(f"{spec.name}: version {target!r} does not exist") from None
    validation = json.loads((mv.tags or {}).get("cd4ml.data.validation", "{}") or "{}")
    if validation.get("status") != "passed":
        raise DeployError(f"{spec.name}: version {target} never passed validation; refusing to serve it")
    if target == current_version:
        raise DeployError(f"{spec.name}: version {target} is already the champion")
    registry.move_champion(client, spec.name, target, expected_current=current_version)
    registry.set_tags(client, spec.name, target, {
        "cd4ml.rolled_back_at": when, "cd4ml.rollback_reason": reason[:500],
        "cd4ml.previous_champion": current_version or "none",
    })  # fmt: skip
    try:
        wait_until_serving(endpoint, spec.name, target)
        golden = holdout_path or (mv.tags or {}).get("cd4ml.holdout_snapshot", "")
        if not golden or not os.path.exists(golden):
            raise DeployError(f"{spec.name}: version {target} has no holdout snapshot to smoke-test with")
        checked = smoke_test(spec, settings, endpoint, target, golden)
    except DeployError as failure:
        note = "champion left unchanged"
        if current_version:
            registry.move_champion(client, spec.name, current_version, expected_current=target)
            note = f"champion restored to {current_version}"
        _record(settings, spec.name, target, {"who": who, "when": when, "outcome": "rollback failed",
                                               "error": str(failure)})  # fmt: skip
        raise type(failure)(f"rollback of {spec.name} to v{target} failed: {failure}; {note}") from None
    record = {"who": who, "when": when, "outcome": "rolled back", "reason": reason, "from": current_version}
    _record(settings, spec.name, target, {**record, **checked})
    return {"rolled_back": True, "from": current_version, "to": target, **checked}
