"""Domain errors. Their messages are what a user sees in the UI, so they name what, where and why.

One error policy: every cd4ml error says whether trying again can help (`retryable`). A spec, data
or training error is deterministic — the same inputs fail the same way — so the Airflow adapter
fails the task at once; only transient errors (a service or MLflow unreachable) are retried.
"""

from __future__ import annotations

from typing import ClassVar


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
