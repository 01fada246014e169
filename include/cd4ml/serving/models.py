"""What the service serves: one slot per model, swapped atomically when `champion` moves.

A background thread polls MLflow for each model's `champion` alias. A new version is loaded and
sanity-checked off the request path; only then is the slot replaced (one reference assignment), so
requests already running finish on the model they started with and no request waits for a load.
A version that fails to load or fails its sanity check is remembered and never swapped in. When
the alias is removed, the model's slot goes too: nothing is served for it and readiness says so.
With an admin token, a champion must carry cd4ml's record signed with it (`registry.
champion_signature`, written by the promotion and the rollback): an alias moved any other way is
reported (metrics, readiness, the model's metadata) and the version is not served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cd4ml import registry
from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec, load_specs, spec_files
from cd4ml.serving.fastpath import FastPipeline, split_rows, verified
from cd4ml.serving.payload import FeatureSchema

if TYPE_CHECKING:
    from cd4ml.serving.canary import CanaryState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    name: str
    version: str
    run_id: str
    champion_since: str
    data_fingerprint: str
    loaded_at: float
    model: Any
    schema: FeatureSchema
    classes: list[Any] | None  # set when the model gives class probabilities (served with them)
    fast: FastPipeline | None = None
    classifier: bool = False  # predictions are labels, with or without probabilities

    def frame(self, rows: list[list[Any]]) -> pd.DataFrame:
        frame = pd.DataFrame(rows, columns=list(self.schema.columns))
        if self.schema.numerical:
            num = list(self.schema.numerical)
            frame[num] = frame[num].astype(float)
        return frame

    def predict(self, rows: list[list[Any]]) -> dict[str, Any]:
        if self.fast is not None:
            num, cat = split_rows(self.fast, list(self.schema.columns), rows)
            labels, proba = self.fast.predict(num, cat)
            out: dict[str, Any] = {
                "model": self.name,
                "version": self.version,
                "predictions": labels.tolist(),
            }
            if proba is not None:
                out["classes"] = self.classes
                out["probabilities"] = proba.tolist()
            return out
        return self.predict_with_sklearn(rows)

    def predict_with_sklearn(self, rows: list[list[Any]]) -> dict[str, Any]:
        frame = self.frame(rows)
        result: dict[str, Any] = {
            "model": self.name,
            "version": self.version,
            "predictions": self.model.predict(frame).tolist(),
        }
        if self.classes is not None:
            result["classes"] = self.classes
            result["probabilities"] = self.model.predict_proba(frame).tolist()
        return result

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "champion_since": self.champion_since,
            "data_fingerprint": self.data_fingerprint,
            "loaded_at": self.loaded_at,
            "inputs": {
                "numerical": list(self.schema.numerical),
                "categorical": list(self.schema.categorical),
            },
            "fast_path": self.fast is not None,
        }


class SanityError(Exception):
    pass


class StagingRefusedError(Exception):
    """The version failed to load or its sanity check: the service will never serve it."""


def _champion_since(tags: dict[str, str]) -> str:
    # The later of the two: a version rolled back to was usually promoted before.
    return max((tags.get(key) or "" for key in ("cd4ml.promoted_at", "cd4ml.rolled_back_at")), default="")


def _transient(err: Exception) -> bool:
    """MLflow briefly unreachable is not the version's fault: retry it on the next poll."""
    from cd4ml.core.errors import is_transient

    return is_transient(err)


def sanity_check(slot: Slot, example: pd.DataFrame | None) -> None:
    """The version must predict on its own input example: right length, finite, valid probabilities."""
    if example is None or example.empty:
        raise SanityError(f"{slot.name} v{slot.version}: no input example to check the model with")
    missing = [c for c in slot.schema.columns if c not in example.columns]
    if missing:
        raise SanityError(f"{slot.name} v{slot.version}: input example lacks {missing}")
    rows = example[list(slot.schema.columns)].astype(object).where(example.notna(), None).values.tolist()
    out = slot.predict(rows)
    preds = out["predictions"]
    if len(preds) != len(rows):
        raise SanityError(f"{slot.name} v{slot.version}: {len(preds)} predictions for {len(rows)} rows")
    if not slot.classifier and not np.all(np.isfinite(np.asarray(preds, dtype=float))):
        raise SanityError(f"{slot.name} v{slot.version}: non-finite predictions {preds[:5]}")
    if slot.classes is not None:
        proba = np.asarray(out["probabilities"], dtype=float)
        if not np.allclose(proba.sum(axis=1), 1.0, atol=1e-6):
            raise SanityError(f"{slot.name} v{slot.version}: probabilities do not sum to 1")


def _fast_path(slot: Slot, example: pd.DataFrame | None) -> FastPipeline | None:
    """The fast path is an optimisation: if it cannot be built, the version serves through sklearn."""
    try:
        return verified(slot.model, example, list(slot.schema.columns))
    except Exception as err:  # noqa: BLE001 - never refuse a version that sklearn serves correctly
        log.warning("%s v%s: no fast path (%s: %s); serving through sklearn",
                    slot.name, slot.version, type(err).__name__, err)  # fmt: skip
        return None


def load_slot(settings: Settings, name: str, mv: Any) -> Slot:
    """Load a registered version into a slot, sanity-checked on its own input example, with the
    fast path when it reproduces sklearn exactly; raises whatever went wrong."""
    version = str(mv.version)
    bundle = registry.load_bundle(settings.mlflow_tracking_uri, f"models:/{name}/{version}")
    if not bundle.numerical and not bundle.categorical:
        raise SanityError(f"{name} v{version}: the model has no input signature")
    classes = getattr(bundle.model, "classes_", None)
    # SVC without probability=True, say, predicts labels but has no predict_proba to serve.
    served_classes = (
        [c.item() if hasattr(c, "item") else c for c in classes]
        if classes is not None and hasattr(bundle.model, "predict_proba")
        else None
    )
    slot = Slot(
        name=name,
        version=version,
        run_id=mv.run_id or "",
        champion_since=_champion_since(mv.tags or {}),
        data_fingerprint=(mv.tags or {}).get("cd4ml.data_fingerprint", ""),
        loaded_at=time.time(),
        model=bundle.model,
        schema=FeatureSchema(tuple(bundle.numerical), tuple(bundle.categorical)),
        classes=served_classes,
        classifier=classes is not None,
    )
    sanity_check(slot, bundle.example)
    fast = _fast_path(slot, bundle.example)
    if fast is not None:
        slot = replace(slot, fast=fast)
        sanity_check(slot, bundle.example)
    return slot


def unrecorded_reason(name: str, version: str, problem: str, serving: Slot | None) -> str:
    return (
        f"champion points to version {version}, which cd4ml did not promote: {problem}; "
        f"{f'still serving version {serving.version}' if serving else 'serving nothing'}. Promote "
        f"through {name}__train or {name}__rollback (they sign the record), or give this service "
        "the admin token Airflow's cd4ml_service connection holds"
    )


@dataclass
class Poller:
    """Calls `work` every `every` seconds on a daemon thread, until stopped."""

    work: Callable[[], None]
    every: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cd4ml-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.work()
            self._stop.wait(self.every)


@dataclass
class ModelStore:
    settings: Settings
    poll_seconds: float = 2.0
    on_event: Callable[[str, str, str], None] = lambda model, version, outcome: None
    slots: dict[str, Slot] = field(default_factory=dict)
    # With a key (the admin token), a champion must carry cd4ml's signed record to be served; an
    # alias moved any other way is reported here (model -> (version, why)) and not served.
    signing_key: str | None = None
    unrecorded: dict[str, tuple[str, str]] = field(default_factory=dict)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    known_models: list[str] = field(default_factory=list)
    last_poll_error: str | None = None
    specs: dict[str, ModelSpec] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _poller: Poller | None = None

    def __post_init__(self) -> None:
        self.candidates = Candidates(self)

    def start(self) -> None:
        self._poller = Poller(self.refresh, self.poll_seconds)
        self._poller.start()

    def stop(self) -> None:
        if self._poller:
            self._poller.stop()

    def versions_in_use(self, name: str) -> set[str]:
        """Versions of `name` this store holds live: champion, canary, shadow."""
        held = [self.slots.get(name), self.candidates.shadows.get(name)]
        canary = self.candidates.canaries.get(name)
        return {slot.version for slot in held if slot is not None} | (
            {canary.slot.version} if canary else set()
        )

    def reload_now(self) -> dict[str, str]:
        """Check every model now (admin action); returns the serving versions."""
        self.refresh()
        return {name: slot.version for name, slot in self.slots.items()}

    def refresh(self) -> None:
        with self._lock:  # the poller and an admin reload never load the same version twice
            try:
                self._refresh()
                self.last_poll_error = None
            except Exception as err:  # noqa: BLE001 - keep serving whatever MLflow does; report it
                self.last_poll_error = f"{type(err).__name__}: {err}"
                log.warning("model poll failed: %s", self.last_poll_error)

    def _refresh(self) -> None:
        self._refresh_known()
        mlflow_client = registry.client(self.settings.mlflow_tracking_uri)
        for name in self.known_models:
            self._refresh_champion(name, registry.version_by_alias(mlflow_client, name, registry.CHAMPION))
            served = self.slots.get(name)
            # Only a shadow-strategy model has a shadow to look up (one MLflow call per model per poll).
            shadowing = self.specs[name].deployment.strategy == "shadow"
            shadow = registry.version_by_alias(mlflow_client, name, registry.SHADOW) if shadowing else None
            self.candidates.refresh_shadow(name, shadow, served.version if served else None)
            canary_strategy = self.specs[name].deployment.strategy == "canary"
            canary = (
                registry.version_by_alias(mlflow_client, name, registry.CANARY) if canary_strategy else None
            )
            self.candidates.refresh_canary(name, canary, served.version if served else None)

    def _refresh_champion(self, name: str, champion: Any) -> None:
        if champion is None:
            # No champion (a failed first deploy removed the alias, or someone did): serve nothing
            # for this model, so requests get "no champion loaded yet" and readiness lists it as
            # waiting. MLflow errors raise above and keep what is served.
            dropped = self.slots.pop(name, None)
            if dropped is not None:
                log.warning("%s: champion alias gone; no longer serving v%s", name, dropped.version)
                self.on_event(name, dropped.version, "unloaded")
            return
        version = str(champion.version)
        current = self.slots.get(name)
        if (current and current.version == version) or (name, version) in self.refused:
            self.unrecorded.pop(name, None)
            return
        if self.signing_key:
            problem = registry.signature_problem(self.signing_key, name, version, champion.tags or {})
            if problem:
                self._report_unrecorded(name, version, problem)
                return
        self.unrecorded.pop(name, None)
        staged = self.candidates.take_staged(name, version) or self.candidates.take_canary(name, version)
        if staged is not None:
            # Loaded and smoke-tested before the alias moved: go live without loading it again.
            self._swap(name, replace(staged, champion_since=_champion_since(champion.tags or {})))
            return
        self._load(name, champion)

    def _report_unrecorded(self, name: str, version: str, problem: str) -> None:
        why = unrecorded_reason(name, version, problem, self.slots.get(name))
        if self.unrecorded.get(name) != (version, why):
            self.unrecorded[name] = (version, why)
            log.error("%s: %s", name, why)
            self.on_event(name, version, "unrecorded")

    def _refresh_known(self) -> None:
        specs, _ = load_specs(spec_files(self.settings.specs_dir))
        self.specs = {s.name: s for s in specs}
        self.known_models = sorted(self.specs)

    def _build(self, name: str, mv: Any) -> Slot:
        """Load a version and check it; `StagingRefusedError` (remembered) if it must never serve."""
        version = str(mv.version)
        try:
            return load_slot(self.settings, name, mv)
        except Exception as err:  # any failure but a transient one means: never serve this version
            if _transient(err):
                raise
            reason = f"{type(err).__name__}: {err}"[:500]
            self.refused[(name, version)] = reason
            log.error("refusing %s v%s: %s", name, version, reason)
            self.on_event(name, version, "refused")
            raise StagingRefusedError(reason) from None

    def _load(self, name: str, mv: Any) -> None:
        version = str(mv.version)
        try:
            slot = self._build(name, mv)
        except StagingRefusedError:
            return  # remembered and reported by _build
        except Exception as err:  # noqa: BLE001 - transient: retried on the next poll
            log.warning(
                "could not fetch %s v%s yet (%s: %s); will retry", name, version, type(err).__name__, err
            )
            return
        # Loading takes a while; if `champion` moved meanwhile (a rollback, say), this version must
        # not go live: the next poll loads whatever the alias points to now.
        now = registry.version_by_alias(
            registry.client(self.settings.mlflow_tracking_uri), name, registry.CHAMPION
        )
        if now is None or str(now.version) != version:
            log.info("%s: champion moved while v%s was loading; not swapping it in", name, version)
            return
        self._swap(name, slot)

    def _swap(self, name: str, slot: Slot) -> None:
        version = slot.version
        previous = self.slots.get(name)
        self.slots[name] = slot  # the atomic swap
        log.info("%s: now serving v%s (was %s)", name, version, previous.version if previous else None)
        self.on_event(name, version, "loaded")


class Candidates:
    """Versions loaded beside the champions: the staging slot (a deploy's smoke test before
    `champion` moves) and the shadow (the `shadow` alias: a copy of live traffic,
    `cd4ml.serving.shadow`) never answer clients; the canary (the `canary` alias, with cd4ml's
    signed canary record) answers a share of live traffic (`cd4ml.serving.canary`)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.staged: dict[str, Slot] = {}
        self.shadows: dict[str, Slot] = {}
        self.canaries: dict[str, CanaryState] = {}
        # model -> (version, why): a `canary` alias this service will not route to (no valid record).
        self.refused_canaries: dict[str, tuple[str, str]] = {}

    def stage(self, name: str, version: str) -> Slot:
        """Load `version` of `name` into the model's staging slot (not live traffic); when `champion`
        moves to it, the poller swaps this slot in as it is. `LookupError`: unknown model or version;
        `StagingRefusedError`: it failed to load or its sanity check (never served); MLflow's error
        when MLflow is unreachable (transient)."""
        store = self.store
        with store._lock:
            if name not in store.known_models:
                store._refresh_known()
            if name not in store.known_models:
                raise LookupError(
                    f"model '{name}' is not served here (no spec for it in {store.settings.specs_dir})"
                )
            mlflow_client = registry.client(store.settings.mlflow_tracking_uri)
            try:
                mv = mlflow_client.get_model_version(name, version)
            except Exception as err:
                if _transient(err):
                    raise
                raise LookupError(f"model '{name}' has no version '{version}' in MLflow") from None
            if (name, version) in store.refused:
                raise StagingRefusedError(store.refused[(name, version)])
            current = self.staged.get(name)
            if current is not None and current.version == version:
                return current
            slot = store._build(name, mv)
            self.staged[name] = slot
            log.info("%s: v%s staged (not live)", name, version)
            store.on_event(name, version, "staged")
            return slot

    def unstage(self, name: str) -> str | None:
        """Drop the model's staged version (a failed smoke test, say); returns which one it was."""
        with self.store._lock:
            dropped = self.staged.pop(name, None)
        return dropped.version if dropped else None

    def take_staged(self, name: str, version: str) -> Slot | None:
        """The staged slot of `name` if it holds `version` (it leaves the staging slot)."""
        staged = self.staged.get(name)
        if staged is None or staged.version != version:
            return None
        del self.staged[name]
        return staged

    def refresh_shadow(self, name: str, shadow: Any, champion_version: str | None) -> None:
        """Follow the `shadow` alias (called by the poller, under the store's lock). No shadow while
        nothing is served, or when the shadow is the champion (it was promoted)."""
        version = str(shadow.version) if shadow is not None else None
        current = self.shadows.get(name)
        if version is None or champion_version is None or version == champion_version:
            if current is not None:
                del self.shadows[name]
                log.info("%s: v%s no longer shadows live traffic", name, current.version)
                self.store.on_event(name, current.version, "unshadowed")
            return
        if (current is not None and current.version == version) or (name, version) in self.store.refused:
            return
        slot = self.take_staged(name, version)
        if slot is None:
            try:
                slot = self.store._build(name, shadow)
            except Exception:  # noqa: BLE001 - refused (remembered) or transient (the next poll)
                return
        self.shadows[name] = slot
        log.info("%s: v%s now answers a copy of live traffic (shadow)", name, version)
        self.store.on_event(name, version, "shadowing")

    def take_canary(self, name: str, version: str) -> Slot | None:
        """The canary's slot if it is `version` (promoted: it becomes the champion's slot as it is)."""
        state = self.canaries.get(name)
        if state is None or state.slot.version != version:
            return None
        del self.canaries[name]
        self.store.on_event(name, version, "uncanaried")
        return state.slot

    def refresh_canary(self, name: str, canary: Any, champion_version: str | None) -> None:
        """Follow the `canary` alias (called by the poller, under the store's lock). No canary while
        nothing is served or when it is the champion; with an admin token, only a version carrying
        cd4ml's signed canary record takes live traffic. A new champion restarts the counts."""
        version = str(canary.version) if canary is not None else None
        current = self.canaries.get(name)
        if version is None or champion_version is None or version == champion_version:
            self.refused_canaries.pop(name, None)
            if current is not None:
                del self.canaries[name]
                log.info("%s: v%s no longer takes live traffic (canary ended)", name, current.slot.version)
                self.store.on_event(name, current.slot.version, "uncanaried")
            return
        store = self.store
        if store.signing_key:
            problem = registry.signature_problem(store.signing_key, name, version, canary.tags or {},
                                                 registry.CANARY)  # fmt: skip
            if problem:
                if current is not None:
                    del self.canaries[name]
                    store.on_event(name, current.slot.version, "uncanaried")
                if self.refused_canaries.get(name, ("", ""))[0] != version:
                    why = f"canary points to version {version}, which cd4ml did not start: {problem}"
                    self.refused_canaries[name] = (version, why)
                    log.error("%s: %s; no live traffic goes to it", name, why)
                    store.on_event(name, version, "unrecorded")
                return
        self.refused_canaries.pop(name, None)
        if current is not None and current.slot.version == version:
            if current.champion_version != champion_version:  # compare with the champion serving now
                self.canaries[name] = self._state(name, current.slot, champion_version)
            return
        if (name, version) in store.refused:
            return
        slot = self.take_staged(name, version)
        if slot is None:
            try:
                slot = store._build(name, canary)
            except Exception:  # noqa: BLE001 - refused (remembered) or transient (the next poll)
                return
        self.canaries[name] = self._state(name, slot, champion_version)
        log.info("%s: v%s now answers a share of live traffic (canary)", name, version)
        store.on_event(name, version, "canary")

    def _state(self, name: str, slot: Slot, champion_version: str) -> CanaryState:
        from cd4ml.serving.canary import CanaryState

        policy = self.store.specs[name].deployment.canary
        return CanaryState(slot, champion_version, policy.fraction, policy.sticky_key)
