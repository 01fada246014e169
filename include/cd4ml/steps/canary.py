"""Canary: judge a challenger on a share of live traffic, then promote it or roll it back by itself.

`promote_champion` gives a winning challenger the `canary` alias (with cd4ml's signed canary
record) when the spec says `deployment.strategy: canary` and a champion exists. `deploy_champion`
then calls `watch_canary`: it waits until the prediction service routes to the canary, reads both
sides' counts every `CD4ML_CANARY_POLL_SECONDS`, and judges (`judge`, a pure function) once the
canary has answered `min_requests` requests or `max_duration_minutes` have passed. Promoted: the
alias `champion` moves to it (signed, via `registry.promote_with_tags`, which also drops `canary`),
and the normal deploy checks follow (serving, golden-row smoke test, rollback if those fail). Rolled
back: the `canary` alias is removed and the champion keeps all traffic. Each step is an event of kind
`canary` in the model's append-only history, with both sides' figures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from cd4ml import registry
from cd4ml.core.settings import Settings
from cd4ml.core.spec import CanaryPolicy, ModelSpec
from cd4ml.steps.deploy import (
    DeployError,
    ServiceEndpoint,
    ServiceUnreachableError,
    _json,
    _record,
    _reload,
    deploy_champion,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

EARLY_ERRORS = 5  # a canary failing this often, and worse than allowed, is rolled back at once


@dataclass(frozen=True)
class Verdict:
    promote: bool
    why: str


@dataclass(frozen=True)
class LiveMetric:
    """The primary metric on labelled live predictions of one side since the canary began."""

    value: float | None
    labelled_rows: int


def _rate(arm: dict[str, Any]) -> float:
    return float(arm.get("errors") or 0) / arm["requests"] if arm.get("requests") else 0.0


def _arm_line(arm: dict[str, Any], metric: LiveMetric | None, metric_name: str) -> str:
    p99 = arm.get("p99_ms")
    text = (
        f"{arm.get('requests', 0)} requests, {arm.get('errors', 0)} errors ({_rate(arm):.2%}), "
        f"p99 {'n/a' if p99 is None else f'{p99:.1f} ms'}"
    )
    if metric is not None and metric.value is not None:
        text += f", live {metric_name} {metric.value:.4f} on {metric.labelled_rows} labels"
    return text


def judge(
    policy: CanaryPolicy,
    snapshot: dict[str, Any],
    *,
    metric_name: str = "metric",
    higher_is_better: bool = True,
    metrics: dict[str, LiveMetric] | None = None,
) -> Verdict | None:
    """Promote, roll back, or None (keep watching): the canary must be no worse than the champion
    on error rate, p99 latency and (where `min_labels` labels arrived for both) the primary metric.

    `snapshot` is the service's `/v1/models/{m}/canary` body's `canary`: `seconds` since it began
    and `arms` (`champion`, `canary`), each with requests, errors and p99_ms."""
    arms = snapshot["arms"]
    canary, champion = arms["canary"], arms["champion"]
    metrics = metrics or {}
    allowed = _rate(champion) + policy.max_error_rate_increase
    worse_errors = canary["requests"] and _rate(canary) > allowed
    if canary.get("errors", 0) >= EARLY_ERRORS and worse_errors:
        return Verdict(
            False,
            f"canary error rate {_rate(canary):.2%} ({canary['errors']} of {canary['requests']}) "
            f"over the champion's {_rate(champion):.2%} + {policy.max_error_rate_increase:.2%}",
        )
    minutes = float(snapshot.get("seconds") or 0.0) / 60
    if canary["requests"] < policy.min_requests:
        if minutes >= policy.max_duration_minutes:
            return Verdict(
                False,
                f"too little traffic to judge: {canary['requests']} canary requests of the "
                f"{policy.min_requests} needed (deployment.canary.min_requests) in "
                f"{minutes:.1f} min (max_duration_minutes {policy.max_duration_minutes:g})",
            )
        return None
    problems: list[str] = []
    if worse_errors:
        problems.append(
            f"error rate {_rate(canary):.2%} vs champion {_rate(champion):.2%} "
            f"(allowed + {policy.max_error_rate_increase:.2%})"
        )
    p99, base = canary.get("p99_ms"), champion.get("p99_ms")
    if p99 is not None and base is not None:
        limit = max(base * policy.max_p99_ratio, base + policy.min_p99_difference_ms)
        if p99 > limit:
            problems.append(f"p99 {p99:.1f} ms vs champion {base:.1f} ms (allowed up to {limit:.1f} ms)")
    ours, theirs = metrics.get("canary"), metrics.get("champion")
    judged_metric = (
        ours is not None
        and theirs is not None
        and ours.value is not None
        and theirs.value is not None
        and min(ours.labelled_rows, theirs.labelled_rows) >= policy.min_labels
    )
    if judged_metric:
        assert ours is not None and theirs is not None and ours.value is not None and theirs.value is not None
        drop = (theirs.value - ours.value) if higher_is_better else (ours.value - theirs.value)
        if drop > policy.max_metric_drop:
            problems.append(
                f"live {metric_name} {ours.value:.4f} vs champion {theirs.value:.4f} "
                f"(worse by {drop:.4f}; allowed {policy.max_metric_drop:g})"
            )
    if problems:
        return Verdict(False, "canary worse than the champion: " + "; ".join(problems))
    labels = (
        ""
        if judged_metric
        else f"; no live {metric_name} compared yet (fewer than {policy.min_labels} labels)"
    )
    return Verdict(
        True,
        f"canary no worse than the champion after {canary['requests']} requests in "
        f"{minutes:.1f} min: {_arm_line(canary, ours, metric_name)} vs "
        f"{_arm_line(champion, theirs, metric_name)}{labels}",
    )


def canary_status(endpoint: ServiceEndpoint, model: str) -> dict[str, Any]:
    """The service's `/v1/models/{model}/canary` body; `ServiceUnreachableError` if it does not answer."""
    try:
        resp = httpx.get(f"{endpoint.url}/v1/models/{model}/canary", timeout=10)
    except httpx.HTTPError as err:
        raise ServiceUnreachableError(
            f"{model}: the prediction service at {endpoint.url} is unreachable ({type(err).__name__}: {err})"
        ) from None
    if resp.status_code == 404:
        raise DeployError(
            f"{model}: the prediction service at {endpoint.url} does not serve this model: "
            "it serves the specs in its own CD4ML_SPECS_DIR"
        )
    if resp.status_code != 200:
        raise ServiceUnreachableError(f"{model}: canary status HTTP {resp.status_code}: {resp.text[:200]}")
    return _json(resp)


def live_metrics(spec: ModelSpec, settings: Settings, snapshot: dict[str, Any]) -> dict[str, LiveMetric]:
    """Each side's primary metric on its labelled live predictions since the canary began, where at
    least `deployment.canary.min_labels` usable labels have arrived (the models are loaded only then).
    The metric is re-scored from the logged features, as the monitor's live check does."""
    import numpy as np

    from cd4ml.data import feedback
    from cd4ml.ml import training
    from cd4ml.ml.evaluation import score
    from cd4ml.steps.monitor import cast_outcomes, live_rows, monitor_paths

    start = datetime.fromtimestamp(float(snapshot["since"]), UTC)
    end = datetime.now(UTC)
    labelled = feedback.labelled_predictions(monitor_paths(settings, spec.name), since=start, until=end)
    out: dict[str, LiveMetric] = {}
    for arm, version in (("champion", snapshot["champion_version"]), ("canary", snapshot["version"])):
        rows, _ = live_rows(labelled, version=str(version), start=start, end=end)
        if len(rows) < spec.deployment.canary.min_labels:
            out[arm] = LiveMetric(None, len(rows))
            continue
        model = registry.load_model(settings.mlflow_tracking_uri, f"models:/{spec.name}/{version}")
        classes = None if spec.task == "regression" else tuple(model.classes_.tolist())
        y, usable = cast_outcomes(rows["outcome"].to_numpy(), classes)
        rows, y = rows[usable].reset_index(drop=True), y[usable]
        if len(rows) < spec.deployment.canary.min_labels:
            out[arm] = LiveMetric(None, len(rows))
            continue
        value = float(score(spec.metric, np.asarray(y), training.metric_inputs(spec, model, rows)))
        out[arm] = LiveMetric(value if math.isfinite(value) else None, len(rows))
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _wait_for_canary(endpoint: ServiceEndpoint, model: str, version: str) -> dict[str, Any]:
    """The canary's snapshot once the service routes to `version`; raises what went wrong."""
    deadline = time.monotonic() + endpoint.wait_seconds
    while True:
        refused = _reload(endpoint, model)
        body = canary_status(endpoint, model)
        snapshot = body.get("canary") or {}
        if str(snapshot.get("version")) == version:
            return snapshot
        reason = refused.get(version) or (body.get("refused_canary") or {}).get("why")
        if reason or time.monotonic() >= deadline:
            waited = f"not within {endpoint.wait_seconds:.0f}s (CD4ML_DEPLOY_WAIT_SECONDS)"
            raise DeployError(
                f"{model}: the prediction service at {endpoint.url} does not route to canary version "
                f"{version}: {reason or waited}"
            )
        time.sleep(1.0)


def _end_canary(mlflow_client: MlflowClient, model: str, version: str) -> None:
    current = registry.version_by_alias(mlflow_client, model, registry.CANARY)
    if current is not None and str(current.version) == version:
        mlflow_client.delete_registered_model_alias(model, registry.CANARY)


def _wait_routed_away(endpoint: ServiceEndpoint, model: str, version: str) -> None:
    """After the alias went: until the service stops routing to `version` (bounded)."""
    deadline = time.monotonic() + endpoint.wait_seconds
    while time.monotonic() < deadline:
        _reload(endpoint, model)
        with contextlib.suppress(DeployError):
            if str((canary_status(endpoint, model).get("canary") or {}).get("version")) != version:
                return
        time.sleep(1.0)


def _judged(
    spec: ModelSpec, settings: Settings, endpoint: ServiceEndpoint, version: str
) -> tuple[Verdict, dict[str, Any], dict[str, LiveMetric]]:
    """Read the canary's counts every `canary_poll_seconds` until `judge` decides."""
    policy = spec.deployment.canary
    snapshot = _wait_for_canary(endpoint, spec.name, version)
    while True:
        verdict = judge(policy, snapshot)
        if verdict is not None and verdict.promote:
            # Only a canary about to be promoted needs the labels (read, and models loaded, once).
            metrics = live_metrics(spec, settings, snapshot)
            promote = judge(policy, snapshot, metric_name=spec.metric.name,
                            higher_is_better=spec.metric.higher_is_better, metrics=metrics)  # fmt: skip
            assert promote is not None  # enough requests: it decides either way
            return promote, snapshot, metrics
        if verdict is not None:
            return verdict, snapshot, {}
        time.sleep(settings.canary_poll_seconds)
        snapshot = canary_status(endpoint, spec.name).get("canary") or {}
        if str(snapshot.get("version")) != version:
            raise DeployError(f"{spec.name}: the service stopped routing to canary version {version} (now: "
                              f"{snapshot.get('version') or 'no canary'}); was the alias moved?")  # fmt: skip


def _failed(spec: ModelSpec, settings: Settings, version: str, who: str, failure: Exception) -> DeployError:
    """End a canary that could not be judged (best effort: MLflow may be what failed); say why."""
    error = str(failure) if isinstance(failure, DeployError) else f"{type(failure).__name__}: {failure}"
    with contextlib.suppress(Exception):
        client = registry.client(settings.mlflow_tracking_uri)
        _end_canary(client, spec.name, version)
        registry.set_tags(client, spec.name, version, {"cd4ml.canary": f"failed: {error}"[:500]})
    with contextlib.suppress(Exception):
        _record(settings, spec.name, version, kind="canary", who=who, when=_now(), why=error,
                details={"phase": "failed", "error": error})  # fmt: skip
    return DeployError(
        f"{spec.name}: canary of version {version} failed and was ended, the champion keeps all "
        f"traffic: {error}"
    )


def watch_canary(
    spec: ModelSpec,
    settings: Settings,
    *,
    promoted: dict[str, Any],
    holdout_path: str | None,
    who: str,
    endpoint: ServiceEndpoint,
    last_attempt: bool = True,
    staged: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Watch the canary `promoted["version"]` until judged, then promote or roll it back.

    Returns the deployment result with `canary`: outcome (promoted / rolled back), why, both sides'
    figures. A canary the service never routes to is ended and fails the run (a deterministic
    error), as does an MLflow or service failure on the last attempt; before it, a transient one is
    raised for the retry, which resumes watching (the counts live in the service)."""
    from cd4ml.core.errors import is_transient

    version = str(promoted["version"])
    try:
        verdict, snapshot, metrics = _judged(spec, settings, endpoint, version)
    except Exception as failure:
        if is_transient(failure) and not last_attempt:
            raise
        raise _failed(spec, settings, version, who, failure) from (
            None if isinstance(failure, DeployError) else failure
        )
    champion = str(snapshot["champion_version"])
    arms = ("champion", "canary")
    figures = {a: {**snapshot["arms"][a], **({"live_metric": asdict(metrics[a])} if a in metrics else {})}
               for a in arms}  # fmt: skip
    result: dict[str, Any] = {
        "version": version, "champion": champion, "why": verdict.why,
        "minutes": round(float(snapshot.get("seconds") or 0) / 60, 2),
        "arms": {a: _arm_line(snapshot["arms"][a], metrics.get(a), spec.metric.name) for a in arms},
    }  # fmt: skip
    client = registry.client(settings.mlflow_tracking_uri)
    decided_at = _now()
    event = {"kind": "canary", "who": who, "when": decided_at, "why": verdict.why}
    if not verdict.promote:
        _end_canary(client, spec.name, version)
        registry.set_tags(client, spec.name, version, {"cd4ml.canary": f"rolled back: {verdict.why}"[:500],
                                                       "cd4ml.promotion": "canary rolled back"})  # fmt: skip
        _record(settings, spec.name, version, **event,
                details={"phase": "rolled back", "champion": champion, "figures": figures})  # fmt: skip
        _wait_routed_away(endpoint, spec.name, version)
        log.warning("%s: canary v%s rolled back: %s", spec.name, version, verdict.why)
        return {"deployed": False, "version": version, "why": verdict.why,
                "canary": {**result, "outcome": "rolled back"}}  # fmt: skip
    previous = registry.promote_with_tags(
        client, spec.name, version, expected_current=champion, sign_with=endpoint.admin_token,
        when=decided_at,
        tags={"cd4ml.promoted_at": decided_at, "cd4ml.previous_champion": champion,
              "cd4ml.canary": f"promoted: {verdict.why}"[:500]},
    )  # fmt: skip
    _record(settings, spec.name, version, **event,
            details={"phase": "promoted", "champion": champion, "figures": figures})  # fmt: skip
    registry.append_event(client, spec.name, kind="promotion", version=version, who=who,
                          when=decided_at, why=f"canary: {verdict.why}",
                          details={"previous": previous, "canary": figures})  # fmt: skip
    log.info("%s: canary v%s promoted: %s", spec.name, version, verdict.why)
    deployed = deploy_champion(
        spec, settings, promoted={"promoted": True, "version": version, "previous": previous},
        holdout_path=holdout_path, who=who, when=decided_at, endpoint=endpoint, staged=staged,
    )  # fmt: skip
    return {**deployed, "canary": {**result, "outcome": "promoted"}}
