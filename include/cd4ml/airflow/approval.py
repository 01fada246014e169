"""`approve_promotion`: with `promotion.approval: required`, a challenger that won waits for a person.

The task sits between `stage_challenger` and `promote_champion` of `<model>__train`. It asks only
when there is something to approve: a challenger whose evaluation says promote, in a run that is not
`evaluate_only`; otherwise it returns `{"asked": False, ...}` at once and `promote_champion` records
the decision as it always does. When it asks, Airflow 3's human-in-the-loop request (the standard
provider's `ApprovalOperator`; the task waits in the *awaiting input* state, holding no worker slot)
carries the evidence: both scores on the same holdout, the bootstrap interval of the improvement,
the last drift check, and how the challenger differs from the champion (lineage, data rows, spec and
estimator params). A mail with the same evidence and a link to the form goes to the spec's
`notifications.email` when the `cd4ml_smtp` connection exists.

The answer is recorded before anything else happens: an `approval` event in the model's append-only
history (who, when, approved/rejected/timed out) and tags on the version. *Approve* hands the
`Approval` to `promote_champion` (which records it on the promotion); *Reject*, or no answer within
`promotion.approval_timeout_hours` (the scheduler then applies the default, Reject, and nobody is
recorded as the responder), skips `promote_champion` and `deploy_champion`: champion stays.

An answer is final for its run: a retried or cleared `approve_promotion` acts on the answer already
recorded instead of asking again. To promote a version after all, run `<model>__rollback` with it;
to be asked again, start a new run.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.providers.standard.operators.hitl import ApprovalOperator

from cd4ml.core.settings import Settings
from cd4ml.core.spec import ModelSpec
from cd4ml.steps.contracts import Approval, Evaluation, Registration, XCom

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TASK_ID = "approve_promotion"
TIMEOUT_WHO = "timeout"  # the `who` of an approval nobody gave: the time-out applied the default
# Lineage tags shown side by side (of the Models view's LINEAGE_TAGS: those that say what it was built from).
DIFF_TAGS = (
    "cd4ml.data_fingerprint", "cd4ml.spec_hash", "cd4ml.code_version", "cd4ml.lock_hash",
    "cd4ml.trained_through",
)  # fmt: skip
SPEC_DIFF_LINES = 60  # a longer spec diff is cut in the form (the whole texts are on the versions)
HASH_TAGS = frozenset({"cd4ml.data_fingerprint", "cd4ml.spec_hash", "cd4ml.lock_hash"})  # shown cut
HASH_CHARS = 12


# -- what the approver sees (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class VersionFacts:
    """What the form compares of one version: tags, the spec text it was trained from, its snapshot
    manifest (rows) and validation record. `problem`: why its evidence could not be read, if so."""

    version: str
    tags: dict[str, str] = field(default_factory=dict)
    spec_text: str | None = None
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass(frozen=True)
class ApprovalRequest:
    subject: str
    body: str  # Markdown, shown in the Airflow form
    lines: list[str]  # the same evidence as plain text, for the mail


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):+.4f}"


def _score_lines(decision: dict[str, Any]) -> list[str]:
    metric = decision.get("metric", "metric")
    average = f", {decision['average']} average" if decision.get("average") else ""
    champion = decision.get("champion_version")
    lines = [
        f"Decision: {decision.get('reason')}",
        f"{metric} ({decision.get('direction')}{average}) on the same {decision.get('n')} holdout rows: "
        f"challenger {_num(decision.get('challenger_score'))}, "
        + (f"champion v{champion} {_num(decision.get('champion_score'))}" if champion else "no champion yet"),
    ]
    if champion:
        confidence = float(decision.get("confidence") or 0.0)
        lines.append(
            f"Improvement {_signed(decision.get('difference'))} (positive: the challenger is better); "
            f"paired bootstrap, {decision.get('resamples')} resamples: {confidence:.0%} lower bound "
            f"{_signed(decision.get('ci_low'))}, interval [{_signed(decision.get('ci_low'))}, "
            f"{_signed(decision.get('ci_high'))}]; needed: lower bound > {decision.get('min_improvement')}"
        )
    if decision.get("floor") is not None:
        lines.append(f"Floor: {decision['floor']} (the challenger must reach it to serve at all)")
    if decision.get("business_metric"):
        unit = decision.get("business_unit") or ""
        champion_value = decision.get("champion_business_value")
        lines.append(
            f"Business value {decision['business_metric']}: challenger "
            f"{_num(decision.get('challenger_business_value'), 2)} {unit}, champion "
            f"{_num(champion_value, 2) if champion_value is not None else 'n/a'} {unit}".rstrip()
        )
    return lines


def drift_lines(check: dict[str, Any] | None, threshold: float) -> list[str]:
    """The monitor's last check in a sentence or two; none yet says so."""
    if not check:
        return ["Drift: no drift check has run yet"]
    window = check.get("window") or {}
    decision = check.get("decision") or {}
    columns = ", ".join(check.get("drifted_columns") or []) or "none"
    lines = [
        f"Drift (last check, window ending {window.get('end')}, {window.get('rows')} rows from "
        f"{window.get('source') or 'no data'}, champion v{check.get('champion_version')}): drifted share "
        f"{float(check.get('share') or 0.0):.2f} (threshold {threshold}); drifted columns: {columns}",
        f"Drift decision: {decision.get('reason') or 'n/a'}",
    ]
    live = check.get("live") or {}
    if live.get("value") is not None:
        lines.append(f"Live performance: {live.get('reason')}")
    return lines


def _estimator(spec_text: str | None) -> tuple[str, dict[str, Any]] | None:
    if not spec_text:
        return None
    import yaml

    try:
        raw = yaml.safe_load(spec_text) or {}
    except yaml.YAMLError:
        return None
    est = raw.get("estimator") if isinstance(raw, dict) else None
    if not isinstance(est, dict):
        return None
    return str(est.get("class")), dict(est.get("params") or {})


def _rows(facts: VersionFacts, part: str) -> Any:
    entry = facts.snapshots.get(part) or {}
    if entry.get("rows") is not None:
        return entry["rows"]
    return facts.tags.get("cd4ml.rows_train") if part == "train" else None


def _short(tag: str, value: str | None) -> str:
    if value is None or value == "":
        return "-"
    return value[:HASH_CHARS] if tag in HASH_TAGS and len(value) > HASH_CHARS else value


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


@dataclass(frozen=True)
class Diff:
    """The challenger against the champion: `rows` (what, champion's, challenger's) side by side,
    `notes` in words, and the unified diff of the two spec texts (cut at SPEC_DIFF_LINES)."""

    rows: list[tuple[str, str, str]]
    notes: list[str]
    spec_diff: list[str]

    def lines(self) -> list[str]:
        """As text (the mail): what changed, then what did not."""
        changed = [f"{what}: {before} -> {after}" for what, before, after in self.rows if before != after]
        same = [what for what, before, after in self.rows if before == after]
        out = [*self.notes]
        if self.rows:
            out.append("Changed: " + ("; ".join(changed) if changed else "nothing"))
        if same:
            out.append(f"Unchanged: {', '.join(same)}")
        return out

    def markdown(self, champion: str, challenger: str) -> list[str]:
        out = []
        if self.rows:
            out += [f"| | champion v{champion} | challenger v{challenger} |", "|---|---|---|"]
            for what, before, after in self.rows:
                shown = _cell(after) if after == before else f"**{_cell(after)}**"  # bold: it changed
                out.append(f"| {_cell(what)} | {_cell(before)} | {shown} |")
            out.append("")
        return out + [f"- {note}" for note in self.notes]


def diff_against(challenger: VersionFacts, champion: VersionFacts | None) -> Diff:
    """How the challenger differs from the champion: lineage, data rows, estimator and its params, spec."""
    if champion is None:
        return Diff([], ["Champion: none yet; approving makes this version the first champion"], [])
    notes = [
        f"v{f.version}: evidence not readable ({f.problem})" for f in (champion, challenger) if f.problem
    ]
    rows = [
        (
            tag.removeprefix("cd4ml."),
            _short(tag, champion.tags.get(tag)),
            _short(tag, challenger.tags.get(tag)),
        )
        for tag in DIFF_TAGS
    ]
    for part in ("train", "holdout"):
        before, after = _rows(champion, part), _rows(challenger, part)
        if before is not None or after is not None:
            rows.append((f"{part} rows", str(before if before is not None else "-"),
                         str(after if after is not None else "-")))  # fmt: skip
    est_before, est_after = _estimator(champion.spec_text), _estimator(challenger.spec_text)
    if est_before and est_after:
        rows.append(("estimator", est_before[0], est_after[0]))
        for key in sorted(set(est_before[1]) | set(est_after[1])):
            rows.append(
                (f"estimator {key}", str(est_before[1].get(key, "-")), str(est_after[1].get(key, "-")))
            )
    new_files = challenger.validation.get("accepted") or []
    if new_files:
        notes.append(f"New accepted files in this run: {', '.join(map(str, new_files))}")
    if champion.spec_text is None or challenger.spec_text is None:
        return Diff(rows, notes, [])
    spec_diff = list(difflib.unified_diff(
        champion.spec_text.splitlines(), challenger.spec_text.splitlines(),
        f"v{champion.version} spec", f"v{challenger.version} spec", lineterm="", n=1,
    ))  # fmt: skip
    if not spec_diff:
        notes.append("Spec: unchanged")
    elif len(spec_diff) > SPEC_DIFF_LINES:
        spec_diff = [*spec_diff[:SPEC_DIFF_LINES], f"... {len(spec_diff) - SPEC_DIFF_LINES} more lines"]
    return Diff(rows, notes, spec_diff)


def approval_request(
    spec: ModelSpec,
    decision: dict[str, Any],
    challenger: VersionFacts,
    champion: VersionFacts | None,
    drift_check: dict[str, Any] | None,
) -> ApprovalRequest:
    """The question, with its evidence, as the Airflow form (Markdown) and the mail (text) show it."""
    metric = decision.get("metric", spec.metric.name)
    versus = f"champion v{champion.version}" if champion else "no champion"
    subject = (
        f"{spec.name}: promote v{challenger.version} to champion? {metric} "
        f"{_num(decision.get('challenger_score'))} vs {versus}"
        + (f" {_num(decision.get('champion_score'))}" if champion else "")
    )
    scores = _score_lines(decision)
    drift = drift_lines(drift_check, spec.drift.threshold)
    diff = diff_against(challenger, champion)
    champion_version = champion.version if champion else ""
    timeout = spec.promotion.approval_timeout_hours
    footer = (
        f"Approve moves `champion` to v{challenger.version} and deploys it. Reject, or no answer within "
        f"{timeout:g} h (promotion.approval_timeout_hours), promotes nothing: champion stays. The answer, "
        f"who gave it and when, is recorded in {spec.name}'s history (kind approval) and on the version."
    )
    won = f"beat champion v{champion.version}" if champion else "is the first model to pass (no champion yet)"
    body = "\n".join([
        f"**{spec.name} v{challenger.version}** {won}; it is staged and smoke-tested in the prediction "
        "service, and waits for your approval.",
        "", "#### Scores", "", *[f"- {line}" for line in scores],
        "", "#### Drift", "", *[f"- {line}" for line in drift],
        "", "#### Challenger vs champion", "", *diff.markdown(champion_version, challenger.version),
        *(["", "```diff", *diff.spec_diff, "```"] if diff.spec_diff else []),
        "", footer,
    ])  # fmt: skip
    lines = [*scores, *drift, *diff.lines(), *(["Spec diff:", *diff.spec_diff] if diff.spec_diff else [])]
    return ApprovalRequest(subject=subject, body=body, lines=lines)


# -- what the answer records (pure) -------------------------------------------------------------------


def answer_of(event: dict[str, Any], timeout_hours: float) -> Approval:
    """The HITL response event as cd4ml's `Approval`: approved only on "Approve" from a person."""
    chosen = list(event.get("chosen_options") or [])
    responded_at = event.get("responded_at")
    when = responded_at.isoformat() if isinstance(responded_at, datetime) else str(responded_at or "")
    user = event.get("responded_by_user")
    if event.get("timedout") or not user:
        return Approval(False, TIMEOUT_WHO, when, f"timed out after {timeout_hours:g} h")
    name, user_id = str(user.get("name") or ""), str(user.get("id") or "")
    who = name if not user_id or user_id == name else f"{name} (id {user_id})"
    approved = chosen == [ApprovalOperator.APPROVE]
    return Approval(approved, who or user_id, when, "approved" if approved else "rejected")


def version_tags(answer: Approval) -> dict[str, str]:
    """What the version keeps of the answer (the whole record is the history event)."""
    if answer.approved:
        return {"cd4ml.approval": f"approved by {answer.who} at {answer.when}"}
    what = answer.note if answer.who == TIMEOUT_WHO else f"rejected by {answer.who}"
    return {
        "cd4ml.approval": f"{what} at {answer.when}",
        "cd4ml.promotion": f"not approved: {what} at {answer.when}; champion untouched",
    }


def record_answer(
    mlflow_client: MlflowClient,
    spec: ModelSpec,
    *,
    answer: Approval,
    version: str,
    evaluation: Evaluation,
    run_id: str,
) -> None:
    """The `approval` event and the version's tags. Keyed by run, version and the answer's time: a
    repeated write of the same answer records it once, a new answer (after a retry asked again) too."""
    from cd4ml import registry
    from cd4ml.steps.pipeline import run_key

    champion = evaluation.champion_version
    outcome = "approved" if answer.approved else "timed out" if answer.who == TIMEOUT_WHO else "rejected"
    why = {"approved": f"approved by {answer.who}", "rejected": f"rejected by {answer.who}",
           "timed out": f"{answer.note}: nobody answered; the default (Reject) applied"}[outcome]  # fmt: skip
    registry.append_event(
        mlflow_client, spec.name, kind="approval", version=version, who=answer.who, why=why,
        when=answer.when, key=f"approval:{run_key(run_id)}:{version}:{answer.when}",
        details={"outcome": outcome, "approval": answer.to_xcom(), "run_id": run_id,
                 "timeout_hours": spec.promotion.approval_timeout_hours,
                 "champion": None if champion is None else str(champion), "evidence": evaluation.to_xcom()},
    )  # fmt: skip
    registry.set_tags(mlflow_client, spec.name, version, version_tags(answer))


def recorded_answer(mlflow_client: MlflowClient, name: str, version: str, run_id: str) -> Approval | None:
    """The answer this run already gave for `version` (an earlier try of the task recorded it)."""
    from cd4ml import registry

    for event in reversed(registry.events(mlflow_client, name)):
        if event.kind == "approval" and event.version == version and event.details.get("run_id") == run_id:
            return Approval.from_xcom(event.details["approval"])
    return None


# -- reading the evidence (I/O) ---------------------------------------------------------------------


def version_facts(mlflow_client: MlflowClient, name: str, version: str) -> VersionFacts:
    """The version's tags and evidence artifacts; unreadable evidence is shown, never fatal here."""
    from cd4ml import registry

    mv = mlflow_client.get_model_version(name, version)
    tags = dict(mv.tags or {})
    try:
        evidence = registry.read_evidence(mlflow_client, name, mv)
    except registry.EvidenceMissingError as err:
        return VersionFacts(version, tags, problem=str(err))
    return VersionFacts(
        version, tags, evidence.spec_text, dict(evidence.snapshots), dict(evidence.validation)
    )


def gather_request(
    spec: ModelSpec, settings: Settings, evaluation: Evaluation, registration: Registration
) -> ApprovalRequest:
    from cd4ml import registry
    from cd4ml.steps import monitor

    mlflow_client = registry.client(settings.mlflow_tracking_uri)
    challenger = version_facts(mlflow_client, spec.name, registration.version)
    champion_version = evaluation.champion_version
    champion = version_facts(mlflow_client, spec.name, str(champion_version)) if champion_version else None
    checks = monitor.history(settings, spec.name)
    return approval_request(spec, evaluation.to_xcom(), challenger, champion, checks[-1] if checks else None)


def form_url(settings: Settings, dag_id: str, run_id: str) -> str:
    """The task's Required Actions page in the Airflow UI, at the URL a reader's browser follows."""
    return (
        f"{settings.airflow_public_url}/dags/{dag_id}/runs/{quote(run_id, safe='')}/tasks/{TASK_ID}"
        "/required_actions"
    )


# -- the operator -----------------------------------------------------------------------------------


class PromotionApproval(ApprovalOperator):
    """`approve_promotion`: see the module docstring. Built only for `promotion.approval: required`."""

    def __init__(self, *, spec: ModelSpec, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            task_id=TASK_ID,
            subject=f"{spec.name}: promote the challenger to champion?",  # replaced with the evidence
            defaults=[ApprovalOperator.REJECT],  # what the time-out answers
            response_timeout=timedelta(hours=spec.promotion.approval_timeout_hours),
            **kwargs,
        )
        self.spec = spec
        self.settings = settings

    def _upstream(self, context: Any) -> tuple[Evaluation, Registration]:
        ti = context["ti"]
        return (
            Evaluation.from_xcom(ti.xcom_pull(task_ids="evaluate_against_champion")),
            Registration.from_xcom(ti.xcom_pull(task_ids="register_challenger")),
        )

    def execute(self, context: Any) -> Any:
        evaluation, registration = self._upstream(context)
        version = registration.version
        if bool((context.get("params") or {}).get("evaluate_only")):
            return not_needed(version, "evaluate_only: the champion does not move, nothing to approve")
        if not evaluation.promote:
            return not_needed(version, f"the challenger did not win: {evaluation.reason}")
        from cd4ml import registry

        client = registry.client(self.settings.mlflow_tracking_uri)
        recorded = recorded_answer(client, self.spec.name, version, str(context["run_id"]))
        if recorded is not None:
            return self._act_on_recorded(context, recorded)
        request = gather_request(self.spec, self.settings, evaluation, registration)
        self.subject, self.body = request.subject[:1000], request.body
        dag_run = context["dag_run"]
        self._mail(version, request, form_url(self.settings, dag_run.dag_id, dag_run.run_id), dag_run)
        self.log.info("%s v%s waits for approval (%g h): %s", self.spec.name, version,
                      self.spec.promotion.approval_timeout_hours, request.subject)  # fmt: skip
        return super().execute(context)  # parks the task until someone answers or the time-out

    def _act_on_recorded(self, context: Any, answer: Approval) -> XCom:
        """An earlier try of this task already recorded the answer: act on it, do not ask again.

        Airflow 3.3.2 can fail a task that was answered within seconds of parking: the executor's
        report of the parked try arrives after the answer resumed it, and the scheduler takes the
        running task for one killed externally (apache/airflow#71579, open), so the task is retried.
        Asking again would drop the answer given; it is also final for clears and transient retries.
        """
        self.log.warning(
            "%s: this run's answer was already recorded (%s, by %s at %s); acting on it instead of "
            "asking again", self.spec.name, answer.note, answer.who, answer.when,
        )  # fmt: skip
        if not answer.approved:
            self._unstage()
            skip = [t for t in context["task"].get_direct_relatives(upstream=False) if not t.is_teardown]
            if skip:
                self.skip(ti=context["ti"], tasks=skip)
        return answer.to_xcom()

    def _unstage(self) -> None:
        """A challenger that will not be promoted leaves the service's staging slot (best effort:
        the next staged deploy replaces it anyway)."""
        from cd4ml.airflow.connections import service_endpoint
        from cd4ml.steps.deploy import unstage_version

        endpoint = service_endpoint()
        if endpoint.admin_token:
            unstage_version(endpoint, self.spec.name)

    def _mail(self, version: str, request: ApprovalRequest, url: str, dag_run: Any) -> None:
        from cd4ml.airflow.notifiers import has_smtp_connection, send
        from cd4ml.ui import notify

        recipients = list(self.spec.notifications.email)
        if not recipients:
            return
        if not has_smtp_connection():
            self.log.warning("cd4ml: no '%s' connection; no approval mail sent", notify.SMTP_CONN_ID)
            return
        run_url = notify.airflow_run_url(dag_run.dag_id, dag_run.run_id)
        send(notify.approval_needed(self.spec.name, version, request.lines, url, run_url), recipients)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" in event:  # no answer and no default: cannot happen with defaults=[Reject]
            return super().execute_complete(context, event)
        from cd4ml import registry

        evaluation, registration = self._upstream(context)
        answer = answer_of(event, self.spec.promotion.approval_timeout_hours)
        # Recorded before the operator skips anything: an answer that cannot be recorded fails the
        # task with promote_champion not yet skipped, and its retry asks again.
        try:
            record_answer(
                registry.client(self.settings.mlflow_tracking_uri), self.spec, answer=answer,
                version=registration.version, evaluation=evaluation, run_id=str(context["run_id"]),
            )  # fmt: skip
        except Exception as err:
            err.add_note(
                f"{self.spec.name} v{registration.version}: the answer {answer} could not be recorded; "
                "nothing was promoted; a retry of approve_promotion asks again"
            )
            raise
        self.log.info("%s v%s: %s by %s at %s", self.spec.name, registration.version,
                      answer.note, answer.who, answer.when)  # fmt: skip
        if not answer.approved:
            self._unstage()
        super().execute_complete(context, event)  # Reject (or the time-out's Reject): skips downstream
        return answer.to_xcom()


def not_needed(version: str, why: str) -> XCom:
    """The task's XCom when it did not ask (promote_champion then gets no approval and decides as
    it always does)."""
    log.info("v%s: no approval asked: %s", version, why)
    return {"asked": False, "version": version, "why": why}


def approval_of(xcom: Any) -> Approval | None:
    """promote_champion's view of the task's XCom: the answer, or None when nothing was asked."""
    if isinstance(xcom, dict) and "approved" in xcom:
        return Approval.from_xcom(xcom)
    return None
