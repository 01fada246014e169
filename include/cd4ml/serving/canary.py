"""Canary on the service: the `canary` alias answers a share of live traffic for real.

Routing is decided per request, before the model runs: a request carrying the spec's
`deployment.canary.sticky_key` (a column of its rows; the first row's value) or the header
`x-cd4ml-route-key` is hashed, so the same caller always lands on the same side; a request with
neither is drawn at random. The share is `deployment.canary.fraction`.

A canary that cannot answer (it refuses the payload the champion accepts, or its prediction
raises) is counted as the canary's error and the request is answered by the champion instead: a
client never sees a canary's failure. Both sides' requests, errors and latencies since the canary
began are kept here (`CanaryState`), shown in the model's metadata and `/v1/models/{m}/canary`,
and exported on /metrics; cd4ml's deploy step (`cd4ml.steps.canary`) reads them to decide.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cd4ml.serving.models import Slot

log = logging.getLogger(__name__)
CHAMPION, CANARY = "champion", "canary"
ARMS = (CHAMPION, CANARY)
ROUTE_HEADER = "x-cd4ml-route-key"
LATENCY_WINDOW = 20_000  # the latest request times per side kept for the percentiles
TAIL_FLOOR = 2  # a side's p99 has at least this many slower requests above it
# Each side's first answers after the canary starts are counted but not timed: a version just loaded
# answers its first requests slower (cold caches, first calls), and the canary is always the new one.
WARMUP_ANSWERS = 20


def forget_series(gauge: Gauge, model: str) -> None:
    """Drop a model's series of a version gauge. Several service processes share their values in
    files (prometheus_client's multiprocess mode), where a series cannot be removed: it reads 0
    there (no version) instead."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        gauge.labels(model).set(0.0)
        return
    with contextlib.suppress(KeyError):
        gauge.remove(model)


def canary_share(model: str, key: str) -> float:
    """Where `key` falls in [0, 1) for `model`: stable across requests, processes and restarts."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def route_key(
    sticky_key: str | None, columns: list[str], data: list[list[Any]], header: str | None
) -> str | None:
    """The request's routing key: the header if given, else the first row's `sticky_key` value."""
    if header:
        return header
    if sticky_key is None or not data or sticky_key not in columns:
        return None
    value = data[0][columns.index(sticky_key)]
    return None if value is None else str(value)


def percentile(values: Iterable[float], q: float, *, keep_above: int = 0) -> float | None:
    """Nearest-rank percentile (p99 of 1,000 values is the 990th), with at least `keep_above` values
    above it when there are enough: on a few hundred requests a p99 would otherwise be the slowest
    one or two, and one stall (a GC pause, a busy core) would decide a canary."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(math.ceil(q * len(ordered)), len(ordered) - keep_above))
    return ordered[rank - 1]


@dataclass
class Arm:
    requests: int = 0
    errors: int = 0
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def summary(self) -> dict[str, Any]:
        p50, p99 = percentile(self.seconds, 0.5), percentile(self.seconds, 0.99, keep_above=TAIL_FLOOR)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }


@dataclass
class CanaryState:
    """One model's canary: its slot, which champion it runs beside, its share and both sides' counts.

    A request counts for the canary when the canary was chosen for it: answered (ok) or failed
    (error, and the champion answered). Its time is the canary's own answer time; the champion's
    counts are the requests routed to the champion."""

    slot: Slot
    champion_version: str
    fraction: float
    sticky_key: str | None
    since: float = field(default_factory=time.time)
    arms: dict[str, Arm] = field(default_factory=lambda: {arm: Arm() for arm in ARMS})
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _random: random.Random = field(default_factory=random.Random)

    def chooses_canary(self, model: str, key: str | None) -> bool:
        if key is None:
            return self._random.random() < self.fraction
        return canary_share(model, key) < self.fraction

    def count(self, arm: str, seconds: float, *, error: bool = False) -> None:
        with self._lock:
            side = self.arms[arm]
            side.requests += 1
            side.errors += int(error)
            if not error and side.requests > WARMUP_ANSWERS:
                side.seconds.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            arms = {arm: side.summary() for arm, side in self.arms.items()}
        return {
            "version": self.slot.version,
            "champion_version": self.champion_version,
            "since": self.since,
            "seconds": round(time.time() - self.since, 3),
            "fraction": self.fraction,
            "sticky_key": self.sticky_key,
            "arms": arms,
        }


class CanaryMetrics:
    """`cd4ml_canary_*` on /metrics: requests by side and outcome, the canary's version, and each
    side's p50/p99 over the canary's requests so far (what cd4ml judges on)."""

    def __init__(self, registry: CollectorRegistry, states: dict[str, CanaryState]) -> None:
        self.requests = Counter(
            "cd4ml_canary_requests",
            "Live requests routed while a canary runs, by side (champion, canary) and outcome (ok, error: "
            "the canary failed and the champion answered)",
            ["model", "version", "arm", "outcome"], registry=registry,
        )  # fmt: skip
        self.version = Gauge(
            "cd4ml_canary_version", "Version answering a share of live traffic (canary)", ["model"],
            registry=registry, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.fraction = Gauge(
            "cd4ml_canary_fraction",
            "Share of live traffic routed to the canary",
            ["model"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.percentiles = _Percentiles(lambda: {m: s.snapshot() for m, s in list(states.items())})
        registry.register(self.percentiles)


class _Percentiles(Collector):
    """Each side's p50/p99 from `snapshots` (model -> a canary snapshot): this process's canaries, or
    with several service processes every process's together (`cd4ml.serving.workers`)."""

    def __init__(self, snapshots: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "cd4ml_canary_latency_seconds",
            "Each side's request time percentile (quantile 0.5, 0.99) since the canary began",
            labels=["model", "arm", "quantile"],
        )
        for model, snapshot in self.snapshots().items():
            for arm, summary in snapshot["arms"].items():
                for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
                    if summary[key] is not None:
                        family.add_metric([model, arm, q], summary[key] / 1000)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


Predict = Callable[[Slot, list[list[Any]]], Awaitable[dict[str, Any]]]


class CanaryRouting:
    """The service's canary side: which requests the canary answers, its answers (or its failure,
    the champion answering instead), both sides' counts, its gauges and `GET /v1/models/{m}/canary`.

    `canaries` is the model store's (`Candidates.canaries`), which the poller fills from the alias."""

    def __init__(
        self, canaries: dict[str, CanaryState], registry: CollectorRegistry, max_rows: int, predict: Predict
    ) -> None:
        self.canaries = canaries
        self.refused: dict[str, tuple[str, str]] = {}  # bound to Candidates.refused_canaries by the app
        self.metrics = CanaryMetrics(registry, canaries)
        self.max_rows = max_rows
        self.predict = predict
        # model -> the canary's snapshot: this process's; several service processes replace it with
        # every process's together (cd4ml.serving.workers), here and on /metrics.
        self.snapshots: Callable[[], dict[str, dict[str, Any]]] = self.metrics.percentiles.snapshots

    def share_across(self, snapshots: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.snapshots = self.metrics.percentiles.snapshots = snapshots

    def on_event(self, model: str, outcome: str, version: str) -> None:
        if outcome == "canary":
            self.metrics.version.labels(model).set(float(version))
            self.metrics.fraction.labels(model).set(self.canaries[model].fraction)
        elif outcome == "uncanaried":
            for gauge in (self.metrics.version, self.metrics.fraction):
                forget_series(gauge, model)

    def status(self, model: str) -> dict[str, Any]:
        """`canary` (its snapshot or None) and `refused_canary` (a canary alias it will not route to)."""
        body: dict[str, Any] = {"canary": self.snapshots().get(model)}
        refused = self.refused.get(model)
        if refused:
            body["refused_canary"] = {"version": refused[0], "why": refused[1]}
        return body

    def pinned(self, model: str, version: str | None) -> Slot | None:
        """The canary's slot when a request names its version (answered, not counted as routed)."""
        canary = self.canaries.get(model)
        return canary.slot if canary is not None and version == canary.slot.version else None

    def chosen(
        self, model: str, headers: Mapping[str, str], columns: list[str], data: list[list[Any]]
    ) -> tuple[CanaryState | None, bool]:
        """(the model's canary or None, whether it answers this request)."""
        canary = self.canaries.get(model)
        if canary is None:
            return None, False
        key = route_key(canary.sticky_key, columns, data, headers.get(ROUTE_HEADER))
        return canary, canary.chooses_canary(model, key)

    async def answer(
        self, canary: CanaryState, champion_schema: Any, columns: list[str], data: list[list[Any]],
        rows: list[list[Any]],
    ) -> tuple[dict[str, Any], list[list[Any]]] | None:  # fmt: skip
        """The canary's answer and the rows it read, or None (counted as its error) if it refused
        the payload the champion accepted or failed to predict: the champion answers instead."""
        from cd4ml.serving.payload import check

        slot = canary.slot
        began = time.perf_counter()
        try:
            if slot.schema != champion_schema:
                rows = check(slot.schema, columns, data, self.max_rows)
            out = await self.predict(slot, rows)
        except Exception as err:  # noqa: BLE001 - a canary's failure never reaches the client
            log.warning("%s v%s (canary) failed, the champion answers: %s: %s",
                        slot.name, slot.version, type(err).__name__, err)  # fmt: skip
            self.count(canary, CANARY, 0.0, error=True)
            return None
        self.count(canary, CANARY, time.perf_counter() - began)
        return out, rows

    def count(self, canary: CanaryState, arm: str, seconds: float, *, error: bool = False) -> None:
        version = canary.slot.version if arm == CANARY else canary.champion_version
        canary.count(arm, seconds, error=error)
        self.metrics.requests.labels(canary.slot.name, version, arm, "error" if error else "ok").inc()
