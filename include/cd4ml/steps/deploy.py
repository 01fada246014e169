"""Deployment: make the prediction service serve the champion, prove it, or roll back by itself.

Before `champion` moves (`stage_challenger`): the service loads the challenger into a staging slot
that no live request reaches, and the smoke test runs there; a failure leaves live traffic alone.
After `champion` moves: ask the service to reload, wait (bounded) until it reports the new version,
then smoke-test it with golden rows from the holdout — the service's answers must equal the offline
predictions of the registered version, exactly. On any failure `champion` goes back to the previous
version, the service is confirmed to serve it again, and the run fails saying what broke. Every
attempt is an event in the model's append-only history (`registry.append_event`): who, when, why
and the outcome, never overwritten by the next attempt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from cd4ml import registry
from cd4ml.core.errors import Cd4mlError, TransientError, is_transient
from cd4ml.core.settings import Settings, get_settings
from cd4ml.core.spec import ModelSpec

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


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
    admin_token: str | None = field(repr=False)  # never in logs or task reprs
    wait_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> ServiceEndpoint:
        """From the settings (CD4ML_SERVICE_URL, _ADMIN_TOKEN, CD4ML_DEPLOY_WAIT_SECONDS); Airflow
        tasks use the `cd4ml_service` connection first (cd4ml.airflow.connections)."""
        settings = get_settings()
        return cls(
            url=settings.service_url,
            admin_token=settings.service_admin_token,
            wait_seconds=settings.deploy_wait_seconds,
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
    every = body.get("serving_versions")
    if version is not None and isinstance(every, dict) and set(map(str, every.values())) != {version}:
        # A service of several processes: it serves `version` only once every process does.
        version = None
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


def _golden_rows(
    spec: ModelSpec, settings: Settings, version: str, holdout: str | pd.DataFrame | None
) -> Any:
    """The last rows of the holdout: a local file given by the caller (the run that just built it),
    else the version's holdout snapshot in MLflow."""
    import pandas as pd

    from cd4ml.ml.training import features

    frame: pd.DataFrame
    if holdout is None:
        client = registry.client(settings.mlflow_tracking_uri)
        frame = registry.reference_frame(client, spec.name, version, "holdout")
    elif isinstance(holdout, str):
        frame = pd.read_parquet(holdout)
    else:
        frame = holdout
    return features(spec, frame.tail(settings.deploy_golden_rows))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def smoke_test(
    spec: ModelSpec,
    settings: Settings,
    endpoint: ServiceEndpoint,
    version: str,
    holdout: str | pd.DataFrame | None = None,
    *,
    staged: bool = False,
    expected: list[Any] | None = None,
) -> dict[str, Any]:
    """Service predictions must equal the registered version's offline predictions on golden rows
    (`staged`: the version in the service's staging slot, which no live request reaches).

    `expected`: those offline predictions, computed already by the staged smoke test of the same
    golden rows (loading the model again would only repeat them). The result carries them as
    `expected` for that reuse; callers keep them out of records.
    """
    golden = _golden_rows(spec, settings, version, holdout)
    if expected is None or len(expected) != len(golden):
        model = registry.load_model(settings.mlflow_tracking_uri, f"models:/{spec.name}/{version}")
        expected = model.predict(golden).tolist()
    payload = {"dataframe_split": json.loads(golden.to_json(orient="split", index=False))}
    headers = {"x-cd4ml-purpose": "smoke-test"}  # not real traffic: kept out of the drift window
    if staged:
        headers |= {"x-cd4ml-slot": "staging", "Authorization": f"Bearer {endpoint.admin_token}"}
    try:
        resp = httpx.post(
            f"{endpoint.url}/v1/models/{spec.name}/predict", json=payload, headers=headers, timeout=30
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
    return {"golden_rows": len(expected), "version": version, "expected": expected}


def stage_version(endpoint: ServiceEndpoint, model: str, version: str) -> None:
    """Have the service load `version` into its staging slot (no live traffic reaches it)."""
    where = f"{model}: the prediction service at {endpoint.url}"
    try:
        resp = httpx.put(
            f"{endpoint.url}/admin/models/{model}/staging",
            json={"version": version},
            headers={"Authorization": f"Bearer {endpoint.admin_token}"},
            timeout=max(endpoint.wait_seconds, 30.0),
        )
    except httpx.HTTPError as err:
        raise ServiceUnreachableError(f"{where} is unreachable ({type(err).__name__}: {err})") from None
    error = _json(resp).get("error") or resp.text[:300]
    if resp.status_code == 200:
        return
    if resp.status_code == 422:
        raise ServiceRefusedError(f"{where} refused version {version}: {error}")
    if resp.status_code == 404:
        raise DeployError(f"{where} cannot stage version {version}: {error}; it serves the specs in its "
                          f"own CD4ML_SPECS_DIR and reads the MLflow registry it was given")  # fmt: skip
    if resp.status_code in (401, 403):
        raise DeployError(f"{where} rejected the admin token ({error}): the cd4ml_service connection's "
                          "password (or CD4ML_SERVICE_ADMIN_TOKEN) must match the service's")  # fmt: skip
    raise ServiceUnreachableError(
        f"{where} could not stage version {version}: HTTP {resp.status_code}: {error}"
    )


def unstage_version(endpoint: ServiceEndpoint, model: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # best effort: the next stage replaces it anyway
        httpx.delete(f"{endpoint.url}/admin/models/{model}/staging",
                     headers={"Authorization": f"Bearer {endpoint.admin_token}"}, timeout=10)  # fmt: skip


def stage_challenger(
    spec: ModelSpec,
    settings: Settings,
    *,
    version: str,
    promote: bool,
    champion: str | None,
    holdout_path: str | None = None,
    who: str,
    when: str,
    endpoint: ServiceEndpoint | None = None,
    last_attempt: bool = True,
) -> dict[str, Any]:
    """Before `champion` moves: the service loads the challenger into its staging slot and the smoke
    test runs there, so live traffic only ever switches to a version that already answered right.

    A failure leaves the champion (and live traffic) untouched, is a `deployment` event with
    outcome "staging failed", and fails the run; a transient one before the last attempt is raised
    as it is, for the retry. Without an admin token the service cannot be asked to stage: the
    smoke test then runs after the switch only (deploy_champion), and the record says so.
    """
    if not promote:
        return {"staged": False, "why": "not to be promoted; nothing to stage"}
    endpoint = endpoint or ServiceEndpoint.from_env()
    if not endpoint.admin_token:
        why = ("no admin token for the prediction service (the cd4ml_service connection's password or "
               "CD4ML_SERVICE_ADMIN_TOKEN): not staged; smoke-tested after the switch only")  # fmt: skip
        log.warning("%s v%s: %s", spec.name, version, why)
        return {"staged": False, "why": why}
    record = {"kind": "deployment", "who": who, "when": when}
    try:
        stage_version(endpoint, spec.name, version)
        checked = smoke_test(spec, settings, endpoint, version, holdout_path, staged=True)
    except Exception as failure:
        error = str(failure) if isinstance(failure, DeployError) else f"{type(failure).__name__}: {failure}"
        if is_transient(failure) and not last_attempt:
            raise
        unstage_version(endpoint, spec.name)
        left = f"champion left at version {champion}" if champion else "nothing was served before"
        note = f"version {version} failed in staging, before any live traffic: {error}; {left}"
        with contextlib.suppress(Exception):  # MLflow down: the raised error still says it all
            registry.set_tags(registry.client(settings.mlflow_tracking_uri), spec.name, version,
                              {"cd4ml.staging": f"failed: {error}"[:500]})  # fmt: skip
        with contextlib.suppress(Exception):
            _record(settings, spec.name, version, **record, why=error,
                    details={"outcome": "staging failed", "error": error, "champion": champion})  # fmt: skip
        raise DeployError(f"{spec.name}: {note}") from (None if isinstance(failure, DeployError) else failure)
    why = f"staged; smoke test passed on {checked['golden_rows']} golden rows before any live traffic"
    expected = checked.pop("expected")
    _record(settings, spec.name, version, **record, why=why, details={"outcome": "staged", **checked})
    return {"staged": True, "why": why, **checked, "expected": expected}


def _record(
    settings: Settings,
    model: str,
    version: str,
    *,
    kind: str,
    who: str,
    when: str,
    why: str,
    details: dict[str, Any],
) -> None:
    """One attempt's outcome as a new event in the model's history (the previous ones stay)."""
    client = registry.client(settings.mlflow_tracking_uri)
    registry.append_event(client, model, kind=kind, version=version, who=who, why=why, when=when,
                          details=details)  # fmt: skip


def deploy_champion(
    spec: ModelSpec,
    settings: Settings,
    *,
    promoted: dict[str, Any],
    holdout_path: str | None = None,
    who: str,
    when: str,
    endpoint: ServiceEndpoint | None = None,
    last_attempt: bool = True,
    staged: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Roll out a freshly promoted champion; roll back to the previous one if anything fails.

    A transient failure (service unreachable) before the last attempt is raised as it is, with the
    champion left in place, so the retry deploys it again once the service is back; on the last
    attempt, or for a deterministic failure (a refusal, wrong predictions), `champion` is rolled
    back first. Every outcome is a `deployment` event in the model's history, with
    `details.outcome` one of retrying, failed, deployed. Without `holdout_path` the golden rows
    come from the version's holdout snapshot in MLflow.
    """
    if promoted.get("shadow"):
        return deploy_shadow(
            spec, settings, version=str(promoted["version"]), who=who, when=when,
            endpoint=endpoint or ServiceEndpoint.from_env(), last_attempt=last_attempt,
        )  # fmt: skip
    if promoted.get("canary"):
        from cd4ml.steps.canary import watch_canary

        return watch_canary(
            spec, settings, promoted=promoted, holdout_path=holdout_path, who=who,
            endpoint=endpoint or ServiceEndpoint.from_env(), last_attempt=last_attempt, staged=staged,
        )  # fmt: skip
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
    record = {"kind": "deployment", "who": who, "when": when}
    try:
        wait_until_serving(endpoint, spec.name, version)
        reuse = (staged or {}).get("expected") if str((staged or {}).get("version")) == version else None
        checked = smoke_test(spec, settings, endpoint, version, holdout_path, expected=reuse)
        checked.pop("expected")
    except Exception as failure:  # whatever broke, the alias has moved: roll it back
        error = str(failure) if isinstance(failure, DeployError) else f"{type(failure).__name__}: {failure}"
        if is_transient(failure) and not last_attempt:
            _record(settings, spec.name, version, **record, why=error,
                    details={"outcome": "retrying", "error": error, "previous": previous})  # fmt: skip
            raise
        try:
            rollback_note = _roll_back_after_failure(spec, settings, endpoint, version, previous, when)
        except Exception as err:  # noqa: BLE001 - say so; the deploy failure is what is raised
            rollback_note = (
                f"the automatic rollback failed too ({type(err).__name__}: {err}); champion may still be "
                f"version {version}: run the {spec.name}__rollback DAG"
            )
        try:
            _record(settings, spec.name, version, **record, why=error,
                    details={"outcome": "failed", "error": error, "rollback": rollback_note,
                             "previous": previous})  # fmt: skip
        except Exception as err:  # noqa: BLE001 - MLflow down: the raised error still says it all
            rollback_note += f" (the deployment event could not be recorded: {type(err).__name__}: {err})"
        message = f"deploy of {spec.name} v{version} failed: {error}; {rollback_note}"
        if isinstance(failure, DeployError):
            raise type(failure)(message) from None
        raise DeployError(message) from failure
    why = f"smoke test passed on {checked['golden_rows']} golden rows"
    _record(settings, spec.name, version, **record, why=why,
            details={"outcome": "deployed", "previous": previous, **checked})  # fmt: skip
    return {"deployed": True, "version": version, **checked}


def deploy_shadow(
    spec: ModelSpec,
    settings: Settings,
    *,
    version: str,
    who: str,
    when: str,
    endpoint: ServiceEndpoint,
    last_attempt: bool = True,
) -> dict[str, Any]:
    """Wait (bounded) until the service answers a copy of live traffic with `version` (the `shadow`
    alias); on failure the alias is removed, so nothing half-configured stays behind."""
    deadline = time.monotonic() + endpoint.wait_seconds
    where = f"{spec.name}: the prediction service at {endpoint.url}"
    while True:
        refused = _reload(endpoint, spec.name)
        try:
            body = _json(httpx.get(f"{endpoint.url}/v1/models/{spec.name}", timeout=5))
        except httpx.HTTPError as err:
            body = {"error": f"unreachable ({type(err).__name__}: {err})"}
        reason = refused.get(version) or (body.get("refused_versions") or {}).get(version)
        if str(body.get("shadow_version")) == version or reason or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    record = {"kind": "deployment", "who": who, "when": when}
    if str(body.get("shadow_version")) == version:
        why = f"version {version} answers a copy of live traffic (shadow); champion unchanged"
        _record(settings, spec.name, version, **record, why=why, details={"outcome": "shadowing"})
        return {"deployed": False, "shadow": version, "why": why}
    unreachable = "error" in body and not reason
    if unreachable and not last_attempt:
        raise ServiceUnreachableError(f"{where} {body['error']}")
    error = (
        reason
        or body.get("error")
        or (
            f"it did not take version {version} as its shadow within {endpoint.wait_seconds:.0f}s "
            "(CD4ML_DEPLOY_WAIT_SECONDS sets the wait)"
        )
    )
    client = registry.client(settings.mlflow_tracking_uri)
    with contextlib.suppress(Exception):  # the alias may be gone already
        client.delete_registered_model_alias(spec.name, registry.SHADOW)
    with contextlib.suppress(Exception):
        _record(settings, spec.name, version, **record, why=str(error),
                details={"outcome": "shadow failed", "error": str(error)})  # fmt: skip
    raise DeployError(f"{where} does not shadow version {version}: {error}; the shadow alias was removed")


def _roll_back_after_failure(
    spec: ModelSpec,
    settings: Settings,
    endpoint: ServiceEndpoint,
    failed: str,
    previous: str | None,
    when: str,
) -> str:
    client = registry.client(settings.mlflow_tracking_uri)
    if previous is None:
        client.delete_registered_model_alias(spec.name, registry.CHAMPION)
        removed = "there was no previous champion; the champion alias was removed"
        return removed + _unserved(endpoint, spec.name)
    # Signed afresh: the previous champion's own record may predate signing (or another token).
    registry.promote_with_tags(client, spec.name, previous, expected_current=failed,
                               tags={"cd4ml.rolled_back_at": when}, sign_with=endpoint.admin_token,
                               when=when)  # fmt: skip
    registry.set_tags(client, spec.name, failed, {"cd4ml.rolled_back": f"to {previous}"})
    try:
        wait_until_serving(endpoint, spec.name, previous)
    except DeployError as err:
        return f"champion moved back to {previous}, but the service does not serve it yet: {err}"
    return f"champion rolled back to {previous}, which the service serves again"


def _unserved(endpoint: ServiceEndpoint, model: str) -> str:
    """After the alias was removed: ask the service to drop the model, and say what it serves now."""
    _reload(endpoint, model)
    state = service_state(endpoint, model)
    if not state.reachable or state.version is None:
        return ""
    return f" (the service at {endpoint.url} still serves version {state.version} until it polls MLflow)"


ROLLBACK_TAGS = ("cd4ml.rolled_back_at", "cd4ml.previous_champion", registry.SIGNATURE_TAG)


def rollback_objections(mlflow_client: Any, name: str, mv: Any) -> list[str]:
    """Why `mv` should not be served: its data never passed validation, or the gate rejected it."""
    objections = []
    status = registry.validation_status(mlflow_client, name, mv)
    if status != "passed":
        objections.append(f"it never passed validation (validation status {status!r})")
    if (mv.tags or {}).get("cd4ml.decision") == "reject":
        objections.append("the champion/challenger gate rejected it (tag cd4ml.decision=reject)")
    return objections


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
    force: bool = False,
) -> dict[str, Any]:
    """Move `champion` to `target` (default: the previous champion), smoke-tested in the service's
    staging slot before the move (with an admin token) and on live traffic after it.

    A version the gate rejected, or whose data never passed validation, is refused unless `force`
    is given with a non-empty `reason`. On any failure after the alias moved, the state before is
    restored exactly: the alias back on the champion it was on (or removed if there was none) and
    the target's rollback tags as they were. The outcome is a `rollback` event in the model's
    history (`details.outcome`: rolled back or rollback failed; `details.forced` and what it
    overrode when forced) with the reason. Golden rows: `holdout_path` if given, else the target's
    holdout snapshot in MLflow (a local path in its tags for versions registered before that).
    """
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
    objections = rollback_objections(client, spec.name, mv)
    if objections and not (force and reason.strip()):
        raise DeployError(
            f"{spec.name}: refusing to roll back to version {target}: {'; and '.join(objections)}. To "
            "serve it anyway, trigger the rollback with the `force` param set and a `reason` saying why"
            + (" (force was set, but the reason is empty)" if force else "")
        )
    if target == current_version:
        raise DeployError(f"{spec.name}: version {target} is already the champion")
    forced = {"forced": True, "overrode": objections} if objections else {}
    record = {"kind": "rollback", "who": who, "when": when, "why": reason}
    golden: str | pd.DataFrame | None = holdout_path
    if golden is None:
        try:
            golden = registry.reference_frame(client, spec.name, mv, "holdout")
        except registry.EvidenceMissingError as err:
            raise DeployError(
                f"{spec.name}: version {target} has no holdout to smoke-test with: {err}"
            ) from None
    expected = _staged_for_rollback(spec, settings, endpoint, target, golden, current_version, record, forced)
    before = {key: (mv.tags or {}).get(key) for key in ROLLBACK_TAGS}
    # Small scalars the service (champion since) and the next rollback (its default target) read;
    # written before the alias moves, so the service sees them when it loads the target.
    registry.promote_with_tags(client, spec.name, target, expected_current=current_version, tags={
        "cd4ml.rolled_back_at": when, "cd4ml.previous_champion": current_version or "none",
    }, sign_with=endpoint.admin_token, when=when)  # fmt: skip
    try:
        wait_until_serving(endpoint, spec.name, target)
        checked = smoke_test(spec, settings, endpoint, target, golden, expected=expected)
        checked.pop("expected")
    except Exception as failure:  # whatever broke, put back exactly what was there
        error = str(failure) if isinstance(failure, DeployError) else f"{type(failure).__name__}: {failure}"
        note = _restore(client, endpoint, spec.name, target, current_version, before)
        _record(settings, spec.name, target, **record,
                details={"outcome": "rollback failed", "error": error, "from": current_version,
                         "restored": note, **forced})  # fmt: skip
        message = f"rollback of {spec.name} to v{target} failed: {error}; {note}"
        if isinstance(failure, DeployError):
            raise type(failure)(message) from None
        raise DeployError(message) from failure
    _record(settings, spec.name, target, **record,
            details={"outcome": "rolled back", "from": current_version, **forced, **checked})  # fmt: skip
    return {"rolled_back": True, "from": current_version, "to": target, **forced, **checked}


def _staged_for_rollback(
    spec: ModelSpec,
    settings: Settings,
    endpoint: ServiceEndpoint,
    target: str,
    golden: str | pd.DataFrame,
    current: str | None,
    record: dict[str, Any],
    forced: dict[str, Any],
) -> list[Any] | None:
    """Before a rollback moves `champion`: the target in the service's staging slot, smoke-tested
    there (no live request reaches it); returns its offline predictions for the check after the
    switch. A failure moves nothing: recorded as "rollback failed" and raised. Without an admin
    token nothing can be staged (None): the check runs after the switch only."""
    if not endpoint.admin_token:
        return None
    try:
        stage_version(endpoint, spec.name, target)
        return list(smoke_test(spec, settings, endpoint, target, golden, staged=True)["expected"])
    except Exception as failure:  # noqa: BLE001 - every failure is recorded and raised as a DeployError
        unstage_version(endpoint, spec.name)
        error = str(failure) if isinstance(failure, DeployError) else f"{type(failure).__name__}: {failure}"
        left = f"champion left at version {current}" if current else "no champion, as before"
        note = f"nothing moved: version {target} failed in staging, before any live traffic; {left}"
        with contextlib.suppress(Exception):  # MLflow down: the raised error still says it all
            _record(settings, spec.name, target, **record,
                    details={"outcome": "rollback failed", "error": error, "from": current, "restored": note,
                             **forced})  # fmt: skip
        raise DeployError(f"rollback of {spec.name} to v{target} failed: {error}; {note}") from (
            None if isinstance(failure, DeployError) else failure
        )


def _restore(
    client: Any,
    endpoint: ServiceEndpoint,
    model: str,
    target: str,
    current_version: str | None,
    before: dict[str, str | None],
) -> str:
    """Undo a failed rollback: the alias as it was and the target's rollback tags as they were."""
    try:
        for key, value in before.items():
            if value is None:
                try:
                    client.delete_model_version_tag(model, target, key)
                except Exception:  # noqa: BLE001, S110 - the tag was never written
                    pass
            else:
                client.set_model_version_tag(model, target, key, value)
        if current_version:
            registry.move_champion(client, model, current_version, expected_current=target)
            return f"champion restored to {current_version}"
        client.delete_registered_model_alias(model, registry.CHAMPION)
    except Exception as err:  # noqa: BLE001 - the raised error must say the state was not restored
        return (
            f"restoring the state before failed ({type(err).__name__}: {err}): champion may still be "
            f"version {target}; check the {model} aliases in MLflow"
        )
    return "there was no champion before; the champion alias was removed again" + _unserved(endpoint, model)
