"""Domain errors. Their messages are what a user sees in the UI, so they name what, where and why.

One error policy: every cd4ml error says whether trying again can help (`retryable`). A spec, data
or training error is deterministic — the same inputs fail the same way — so the Airflow adapter
fails the task at once; only transient errors (a service or MLflow unreachable) are retried.
`is_transient` is the single classifier; `cd4ml.airflow.common.Cd4mlRetryPolicy` applies it to
every task of every DAG.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, ClassVar


class Cd4mlError(Exception):
    """Base class of every error cd4ml raises on purpose. Deterministic unless a subclass says so."""

    retryable: ClassVar[bool] = False


class TransientError(Cd4mlError):
    """Something outside cd4ml (MLflow, the prediction service) did not answer; a retry may succeed."""

    retryable = True


class SpecError(Cd4mlError):
    """A model spec is invalid; the message names the file and the field."""


class DataReadError(Cd4mlError):
    """A landed file cannot be read as a table."""


class DataError(Cd4mlError):
    """Accepted data cannot be used as it is; the message names the file(s) responsible."""


class TrainingError(Cd4mlError):
    """A challenger could not be trained from the spec and the accepted data."""


class QuarantinedError(DataError):
    """Every new file of a run went to quarantine, so there is nothing new to train on.

    Typed, so that notifications tell a quarantine from a failure by its class, not by its text.
    `quarantined` holds one `{"name", "path", "reason"}` dict per file.
    """

    def __init__(self, quarantined: list[dict[str, Any]]) -> None:
        self.quarantined = list(quarantined)
        reasons = "\n\n".join(str(q.get("reason", "")) for q in self.quarantined)
        super().__init__(f"{len(self.quarantined)} file(s) quarantined; nothing trained.\n{reasons}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.quarantined,))


class RetractionError(Cd4mlError):
    """A retraction request names no accepted file, or more than one; the message lists candidates."""


# Exceptions of the HTTP stacks that mean "the other side did not answer (in time)". Named, not
# imported: a library that is not loaded cannot have raised anything.
_TRANSIENT_CLASSES = (
    ("requests.exceptions", "ConnectionError"),
    ("requests.exceptions", "Timeout"),
    ("requests.exceptions", "RetryError"),  # the server kept answering 5xx through every retry
    ("httpx", "TransportError"),
    ("urllib3.exceptions", "ProtocolError"),
    ("urllib3.exceptions", "MaxRetryError"),
    ("urllib3.exceptions", "TimeoutError"),
)
# MLflow's own codes for "try again later".
_TRANSIENT_MLFLOW_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "COULD_NOT_ACQUIRE_LOCK",
}
_TRANSIENT_HTTP_STATUS = {429, 502, 503, 504}


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what it was raised from or while handling (`raise ... from None` stops here)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _named_instance(err: BaseException, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(err, cls)


def _transient_here(err: BaseException) -> bool:
    if isinstance(err, ConnectionError | TimeoutError):  # refused, reset, socket timeouts
        return True
    if any(_named_instance(err, module, name) for module, name in _TRANSIENT_CLASSES):
        return True
    code = getattr(err, "error_code", None)
    if type(err).__module__.startswith("mlflow") and code in _TRANSIENT_MLFLOW_CODES:
        return True
    if _named_instance(err, "urllib.error", "HTTPError"):
        return int(getattr(err, "code", 0) or 0) in _TRANSIENT_HTTP_STATUS
    return _named_instance(err, "urllib.error", "URLError")  # no HTTP answer at all


def is_transient(err: BaseException) -> bool:
    """Can trying again help? The outermost cd4ml error decides (it knows what it wrapped);
    otherwise a connection failure or timeout anywhere in the chain makes the error transient.
    Everything else is deterministic: a bug or bad input fails the same way on every try."""
    for cause in causes(err):
        if isinstance(cause, Cd4mlError):
            return cause.retryable
        if _transient_here(cause):
            return True
    return False
