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

import hashlib
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cd4ml.serving.models import Slot

CHAMPION, CANARY = "champion", "canary"
ARMS = (CHAMPION, CANARY)
ROUTE_HEADER = "x-cd4ml-route-key"
LATENCY_WINDOW = 20_000  # the latest request times per side kept for the percentiles


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


def percentile(values: Iterable[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, math.ceil(q * len(ordered)) - 1)  # nearest rank: p99 of 100 values is the 99th
    return ordered[rank]


@dataclass
class Arm:
    requests: int = 0
    errors: int = 0
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def summary(self) -> dict[str, Any]:
        p50, p99 = percentile(self.seconds, 0.5), percentile(self.seconds, 0.99)
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
            if not error:
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
            registry=registry,
        )  # fmt: skip
        self.fraction = Gauge(
            "cd4ml_canary_fraction",
            "Share of live traffic routed to the canary",
            ["model"],
            registry=registry,
        )
        registry.register(_Percentiles(states))


class _Percentiles(Collector):
    def __init__(self, states: dict[str, CanaryState]) -> None:
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "cd4ml_canary_latency_seconds",
            "Each side's request time percentile (quantile 0.5, 0.99) since the canary began",
            labels=["model", "arm", "quantile"],
        )
        for model, state in list(self.states.items()):
            for arm, summary in state.snapshot()["arms"].items():
                for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
                    if summary[key] is not None:
                        family.add_metric([model, arm, q], summary[key] / 1000)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
