"""What the training steps hand each other: small frozen records, serialised explicitly for XCom.

Each record's `to_xcom()` is the JSON-able dict a task returns (URIs, ids, metrics; never frames or
models) and `from_xcom()` reads it back in the next task. The dict shapes are what the Airflow UI's
extra links, the notifications and the REST API's readers see, so they change only on purpose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

from cd4ml.core.errors import QuarantinedError
from cd4ml.data.landing import AcceptedFile, LandedFile

if TYPE_CHECKING:  # numpy and pandas behind it: DAG files import these records at parse time
    from cd4ml.ml.evaluation import Decision
    from cd4ml.steps.deploy import ServiceEndpoint

XCom = dict[str, Any]


class Contract(Protocol):
    def to_xcom(self) -> XCom: ...


def _require(record: str, xcom: Any, *keys: str) -> XCom:
    """The XCom dict, or an error naming the record and what is missing (a task wired wrongly)."""
    if not isinstance(xcom, dict):
        raise TypeError(f"{record}.from_xcom: expected a dict, got {type(xcom).__name__}: {xcom!r:.200}")
    missing = [k for k in keys if k not in xcom]
    if missing:
        raise KeyError(f"{record}.from_xcom: missing {missing} in {sorted(xcom)}")
    return xcom


@dataclass(frozen=True)
class RunContext:
    """Facts about one run of the steps, from Airflow's context or from the command line."""

    run_id: str
    run_time: str  # the run's own timestamp (never "now"): a retried step writes the same values
    trigger: str  # why this run: recorded on the version and in the run outcome
    who: str
    force: bool = False
    evaluate_only: bool = False
    last_attempt: bool = True
    # The prediction service to deploy to: Airflow's `cd4ml_service` connection in a DAG run; None
    # (the settings' CD4ML_SERVICE_URL / token) for `cd4ml train`.
    service: ServiceEndpoint | None = None
    # promotion.approval: required: the approval task's answer (`Approval`), None where there is none
    # (outside Airflow, or the task did not ask).
    approval: Approval | None = None


@dataclass(frozen=True)
class Approval:
    """A person's answer to `approve_promotion`: approved or not, who, when (ISO 8601 UTC)."""

    approved: bool
    who: str
    when: str
    note: str = ""  # e.g. "timed out after 24 h"

    def to_xcom(self) -> XCom:
        return asdict(self)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "approved", "who", "when")
        return cls(bool(d["approved"]), str(d["who"]), str(d["when"]), str(d.get("note") or ""))


@dataclass(frozen=True)
class Rejected:
    """A file that went to quarantine (duplicate, unreadable or refused by validation)."""

    name: str
    path: str
    reason: str

    def to_xcom(self) -> XCom:
        return asdict(self)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "name", "path", "reason")
        return cls(str(d["name"]), str(d["path"]), str(d["reason"]))


@dataclass(frozen=True)
class Collected:
    """collect_landed_files: new files to validate, and byte-identical copies set aside."""

    new: tuple[LandedFile, ...]
    duplicates: tuple[Rejected, ...] = ()

    def to_xcom(self) -> XCom:
        return {"new": [asdict(f) for f in self.new], "duplicates": [d.to_xcom() for d in self.duplicates]}

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "new")
        return cls(
            tuple(LandedFile(**f) for f in d["new"]),
            tuple(Rejected.from_xcom(r) for r in d.get("duplicates", [])),
        )


@dataclass(frozen=True)
class AcceptedBatch:
    """One file validation accepted, with its validation summary and any accepted drift."""

    record: AcceptedFile
    validation: str
    drift: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record.name

    def to_xcom(self) -> XCom:
        return {**asdict(self.record), "validation": self.validation, "drift": self.drift}

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "name", "path")
        names = {f.name for f in fields(AcceptedFile)}
        return cls(
            AcceptedFile(**{k: v for k, v in d.items() if k in names}),
            str(d.get("validation", "")),
            dict(d.get("drift") or {}),
        )


class NothingAccepted(QuarantinedError):
    """Every new file of the run went to quarantine; carries the Data Docs link for the failed task."""

    def __init__(self, quarantined: list[dict[str, Any]], docs_url: str | None = None) -> None:
        super().__init__(quarantined)
        self.docs_url = docs_url

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.quarantined, self.docs_url))


@dataclass(frozen=True)
class Validated:
    """validate_batches: what was accepted and what was quarantined, and the GX Data Docs."""

    accepted: tuple[AcceptedBatch, ...] = ()
    quarantined: tuple[Rejected, ...] = ()
    docs_url: str | None = None

    @property
    def nothing_accepted(self) -> bool:
        """Files came and none was accepted: a quarantine, nothing new to train on."""
        return bool(self.quarantined) and not self.accepted

    def quarantine_error(self) -> NothingAccepted:
        return NothingAccepted([q.to_xcom() for q in self.quarantined], self.docs_url)

    def to_xcom(self) -> XCom:
        return {
            "accepted": [a.to_xcom() for a in self.accepted],
            "quarantined": [q.to_xcom() for q in self.quarantined],
            "docs_url": self.docs_url,
        }

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "accepted", "quarantined")
        return cls(
            tuple(AcceptedBatch.from_xcom(a) for a in d["accepted"]),
            tuple(Rejected.from_xcom(q) for q in d["quarantined"]),
            d.get("docs_url"),
        )


@dataclass(frozen=True)
class Datasets:
    """build_datasets: the saved training set and holdout; `fingerprint` None = no accepted data yet."""

    fingerprint: str | None
    train_path: str = ""
    holdout_path: str = ""
    rows_train: int = 0
    rows_holdout: int = 0
    holdout_starts_at: str = ""
    files: tuple[str, ...] = ()
    # The drift monitor treats batches accepted after this as new to a model trained now.
    trained_through: str = ""

    @property
    def empty(self) -> bool:
        return self.fingerprint is None

    def to_xcom(self) -> XCom:
        if self.empty:
            return {"empty": True, "fingerprint": None}
        return {"empty": False, **asdict(self), "files": list(self.files)}

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "fingerprint")
        if d.get("empty") or d["fingerprint"] is None:
            return cls(None)
        d = _require(cls.__name__, d, "train_path", "holdout_path", "rows_train", "rows_holdout")
        return cls(
            fingerprint=str(d["fingerprint"]),
            train_path=str(d["train_path"]),
            holdout_path=str(d["holdout_path"]),
            rows_train=int(d["rows_train"]),
            rows_holdout=int(d["rows_holdout"]),
            holdout_starts_at=str(d.get("holdout_starts_at", "")),
            files=tuple(d.get("files", ())),
            trained_through=str(d.get("trained_through", "")),
        )


@dataclass(frozen=True)
class TrainingGate:
    """needs_training: whether this run trains, and why (the task's XCom is just the boolean)."""

    needed: bool
    why: str

    def to_xcom(self) -> XCom:
        return asdict(self)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "needed", "why")
        return cls(bool(d["needed"]), str(d["why"]))


@dataclass(frozen=True)
class RunOutcome:
    """runs/<run key>/outcome.json: why a run trained or not (the Models view lists these)."""

    run_id: str
    trigger: str
    trained: bool
    why: str

    def to_xcom(self) -> XCom:
        return asdict(self)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "run_id", "trigger", "trained", "why")
        return cls(str(d["run_id"]), str(d["trigger"]), bool(d["trained"]), str(d["why"]))


@dataclass(frozen=True)
class Challenger:
    """train_challenger: the logged model and its MLflow run (the task's "MLflow run" link)."""

    run_id: str
    model_uri: str
    experiment_id: str
    holdout_score: float

    def to_xcom(self) -> XCom:
        return asdict(self)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "run_id", "model_uri", "experiment_id", "holdout_score")
        return cls(str(d["run_id"]), str(d["model_uri"]), str(d["experiment_id"]), float(d["holdout_score"]))


@dataclass(frozen=True)
class Evaluation:
    """evaluate_against_champion: the decision; its XCom is the evidence recorded on the version."""

    decision: Decision

    @property
    def promote(self) -> bool:
        return self.decision.promote

    @property
    def reason(self) -> str:
        return self.decision.reason

    @property
    def champion_version(self) -> str | None:
        return self.decision.champion_version

    def to_xcom(self) -> XCom:
        return self.decision.as_dict()

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        from cd4ml.ml.evaluation import Decision

        d = _require(cls.__name__, xcom, "promote", "reason", "champion_version")
        names = {f.name for f in fields(Decision)}
        return cls(Decision(**{k: v for k, v in d.items() if k in names}))


@dataclass(frozen=True)
class Registration:
    """register_challenger: the model version every challenger becomes."""

    version: str
    run_id: str

    def to_xcom(self) -> XCom:
        return asdict(self)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "version", "run_id")
        return cls(str(d["version"]), str(d["run_id"]))


@dataclass(frozen=True)
class Promotion:
    """promote_champion: whether `champion` moved, to which version, from which, and why."""

    promoted: bool
    version: str
    why: str
    previous: str | None = None
    shadow: bool = False  # not promoted: given the `shadow` alias (deployment.strategy: shadow)
    canary: bool = False  # not promoted yet: given the `canary` alias (deployment.strategy: canary)

    def to_xcom(self) -> XCom:
        out: XCom = {"promoted": self.promoted, "version": self.version}
        if self.promoted:
            out["previous"] = self.previous
        if self.shadow:
            out["shadow"] = True
        if self.canary:
            out["canary"] = True
        out["why"] = self.why
        return out

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        d = _require(cls.__name__, xcom, "promoted", "version", "why")
        previous = d.get("previous")
        return cls(
            bool(d["promoted"]),
            str(d["version"]),
            str(d["why"]),
            None if previous is None else str(previous),
            shadow=bool(d.get("shadow")),
            canary=bool(d.get("canary")),
        )


@dataclass(frozen=True)
class ServiceRecord:
    """What a step that talks to the prediction service recorded, as `cd4ml.steps.deploy` wrote it."""

    record: dict[str, Any]
    required: ClassVar[tuple[str, ...]] = ()

    def to_xcom(self) -> XCom:
        return dict(self.record)

    @classmethod
    def from_xcom(cls, xcom: Any) -> Self:
        return cls(dict(_require(cls.__name__, xcom, *cls.required)))


class Staging(ServiceRecord):
    """stage_challenger: whether the challenger was smoke-tested in the service's staging slot."""

    required = ("staged",)


class Deployment(ServiceRecord):
    """deploy_champion: the rollout record (outcome, smoke test, rollback)."""
