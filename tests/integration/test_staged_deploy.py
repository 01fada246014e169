"""Staged deploy (issue 15) on the real stack: a real MLflow server, the session's real prediction
service (uvicorn subprocess), real trained versions and real HTTP load.

Before `champion` moves, the service loads the challenger into a staging slot that only the admin
token with the `x-cd4ml-slot: staging` header reaches; the smoke test runs there. Live traffic
switches when the alias moves, to the slot already loaded, and never sees a version that failed.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import httpx
import pytest

from cd4ml import registry
from cd4ml.core.settings import get_settings
from cd4ml.core.spec import load_spec
from cd4ml.steps.deploy import (
    DeployError,
    ServiceEndpoint,
    ServiceUnreachableError,
    smoke_test,
    stage_challenger,
)
from cd4ml.steps.pipeline import run_training
from cd4ml_dev.datagen import generate_churn
from cd4ml_dev.netutil import free_port
from tests.conftest import SERVICE_TOKEN
from tests.helpers import LOGREG, WEAK, write_spec
from tests.integration.dagtools import champion, land, served

pytestmark = pytest.mark.integration
ROWS = 1500
WHEN = "2026-06-01T00:00:00+00:00"
ADMIN = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def train(env: dict[str, Any], model: str, estimator: dict[str, Any], run: str, **kw: Any) -> dict[str, Any]:
    spec = load_spec(write_spec(env["specs"], model, estimator=estimator, promotion__floor=None))
    return run_training(
        spec, get_settings(), run_id=f"{model}-{run}", run_time=WHEN, trigger="staging test", **kw
    )


def outcomes(env: dict[str, Any], model: str, version: str) -> list[str]:
    return [
        str(e.details.get("outcome"))
        for e in registry.events(env["mlflow"], model)
        if e.kind == "deployment" and e.version == version
    ]


def one_row() -> dict[str, Any]:
    return {"dataframe_records": [generate_churn(3, seed=5).drop(columns=["churned"]).iloc[0].to_dict()]}


def test_only_the_admin_reaches_the_staging_slot_and_live_traffic_never_does(env: dict[str, Any]) -> None:
    model, url = "stg_slot", env["service"]
    land(env, model, "week0.csv", generate_churn(ROWS, seed=41))
    assert train(env, model, WEAK, "r1")["deployment"]["deployed"]
    # A better model, registered but not promoted (evaluate-only): v2 exists, champion stays 1.
    out = train(env, model, LOGREG, "r2", force=True, evaluate_only=True, deploy=False)
    assert out["version"] == "2" and not out["promoted"] and champion(env, model) == "1"
    stage = f"{url}/admin/models/{model}/staging"

    assert httpx.put(stage, json={"version": "2"}, timeout=30).status_code == 401
    bad = httpx.put(stage, json={"versoin": "2"}, headers=ADMIN, timeout=30)
    assert bad.status_code == 422 and bad.json()["problems"][0]["field"] == "version", bad.text
    unknown = httpx.put(stage, json={"version": "99"}, headers=ADMIN, timeout=30)
    assert unknown.status_code == 404 and "no version '99'" in unknown.json()["error"], unknown.text
    nobody = httpx.put(f"{url}/admin/models/nosuchmodel/staging", json={"version": "1"}, headers=ADMIN)
    assert nobody.status_code == 404 and "not served here" in nobody.json()["error"], nobody.text
    staged = httpx.put(stage, json={"version": 2}, headers=ADMIN, timeout=60)
    assert staged.status_code == 200 and staged.json()["staged"]["version"] == "2", staged.text

    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
    assert meta["version"] == "1" and meta["staged_version"] == "2"
    predict = f"{url}/v1/models/{model}/predict"
    live = httpx.post(predict, json=one_row(), timeout=10)
    assert live.status_code == 200 and live.headers["x-model-version"] == "1"
    staging = {"x-cd4ml-slot": "staging"}
    assert httpx.post(predict, json=one_row(), headers=staging, timeout=10).status_code == 401
    wrong = httpx.post(predict, json=one_row(), headers={**ADMIN, "x-cd4ml-slot": "canary"}, timeout=10)
    assert wrong.status_code == 400 and "x-cd4ml-slot" in wrong.text
    answer = httpx.post(predict, json=one_row(), headers={**ADMIN, **staging}, timeout=10)
    assert answer.status_code == 200 and answer.json()["version"] == "2", answer.text
    assert answer.headers["x-cd4ml-slot"] == "staging"
    # The staged version answers exactly as the registered version does offline.
    spec = load_spec(env["specs"] / f"{model}.yaml")
    endpoint = ServiceEndpoint(url, SERVICE_TOKEN, wait_seconds=10)
    assert smoke_test(spec, get_settings(), endpoint, "2", staged=True)["golden_rows"] > 0
    # Staged answers are not live traffic: no request counted for v2, nothing logged for it.
    exported = httpx.get(f"{url}/metrics", timeout=10).text
    assert not re.search(rf'cd4ml_requests_total{{[^}}]*model="{model}",version="2"', exported)

    assert httpx.delete(stage, headers=ADMIN, timeout=10).json() == {"dropped": "2"}
    gone = httpx.post(predict, json=one_row(), headers={**ADMIN, **staging}, timeout=10)
    assert gone.status_code == 404 and "no version of model" in gone.json()["error"]

    # The service down at staging time: transient, so an early try raises it for the retry and
    # records nothing; the last try fails the run with the champion untouched, and says why.
    dead = ServiceEndpoint(f"http://127.0.0.1:{free_port()}", SERVICE_TOKEN, wait_seconds=2)
    args: dict[str, Any] = {"version": "2", "promote": True, "champion": "1", "who": "test", "when": WHEN,
                            "endpoint": dead}  # fmt: skip
    with pytest.raises(ServiceUnreachableError):
        stage_challenger(spec, get_settings(), **args, last_attempt=False)
    assert outcomes(env, model, "2") == []
    with pytest.raises(DeployError, match="failed in staging, before any live traffic") as caught:
        stage_challenger(spec, get_settings(), **args, last_attempt=True)
    assert "unreachable" in str(caught.value) and "champion left at version 1" in str(caught.value)
    assert outcomes(env, model, "2") == ["staging failed"]
    assert champion(env, model) == served(env, model) == "1"

    # When `champion` moves to the staged version, the service goes live with that very slot (same
    # load time: not loaded again), with the promotion's time as "champion since".
    again = httpx.put(stage, json={"version": "2"}, headers=ADMIN, timeout=60).json()["staged"]
    registry.promote_with_tags(env["mlflow"], model, "2", expected_current="1",
                               tags={"cd4ml.promoted_at": "2026-06-02T00:00:00+00:00"},
                               sign_with=SERVICE_TOKEN, when="2026-06-02T00:00:00+00:00")  # fmt: skip
    httpx.post(f"{url}/admin/reload", headers=ADMIN, timeout=60)
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
    assert meta["version"] == "2" and meta["staged_version"] is None
    assert meta["loaded_at"] == again["loaded_at"] and meta["champion_since"] == "2026-06-02T00:00:00+00:00"


class Load:
    """Single-row requests to the live endpoint from 4 threads until stopped: every answer kept."""

    def __init__(self, url: str) -> None:
        self.url, self.stop, self.answers = url, threading.Event(), []  # type: list[tuple[int, str]]
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]

    def _run(self) -> None:
        body = one_row()
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    resp = client.post(self.url, json=body)
                    self.answers.append((resp.status_code, resp.headers.get("x-model-version", "")))
                except httpx.HTTPError as err:
                    self.answers.append((0, type(err).__name__))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_a_staged_deploy_under_load_fails_no_request_and_a_failed_staging_serves_nothing_new(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, url = "stg_load", env["service"]
    land(env, model, "week0.csv", generate_churn(ROWS, seed=42))
    assert train(env, model, WEAK, "r1")["deployment"]["deployed"]
    assert served(env, model) == "1"

    with Load(f"{url}/v1/models/{model}/predict") as load:
        time.sleep(1.0)
        # A better challenger whose staged smoke test fails (more golden rows than a request may
        # carry): the run fails, and live traffic never sees it.
        with monkeypatch.context() as mp:
            mp.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "250")
            with pytest.raises(DeployError, match="failed in staging, before any live traffic"):
                train(env, model, LOGREG, "r2", force=True)
        time.sleep(1.0)
        promoted = train(env, model, LOGREG, "r3", force=True)  # stage -> promote -> deploy
        assert promoted["promoted"] and promoted["deployment"]["deployed"], promoted
        assert promoted["version"] == "3"
        switched = len(load.answers)
        time.sleep(1.0)
    answers = list(load.answers)

    assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:5]
    versions = [v for _, v in answers]
    assert set(versions) == {"1", "3"}, set(versions)  # v2 failed staging: never a live answer
    first = versions.index("3")
    assert first <= switched and "1" not in versions[first + 8 :]  # one switch, in-flight aside
    assert outcomes(env, model, "2") == ["staging failed"]
    assert outcomes(env, model, "3") == ["staged", "deployed"]
    assert champion(env, model) == served(env, model) == "3"
    # v3 was loaded once, into the staging slot, and went live from there.
    exported = httpx.get(f"{url}/metrics", timeout=10).text
    series = rf'cd4ml_model_reloads_total{{model="{model}",outcome="(\w+)",version="3"}} (\S+)'
    reloads = dict(re.findall(series, exported))
    assert reloads == {"staged": "1.0", "loaded": "1.0"}, reloads


def test_a_champion_moved_outside_cd4ml_is_reported_and_not_served(env: dict[str, Any]) -> None:
    """Anyone who can write to MLflow can move `champion`; without cd4ml's record signed with the
    service's admin token, the service keeps serving what it served and says so."""
    model, url = "stg_audit", env["service"]
    land(env, model, "week0.csv", generate_churn(ROWS, seed=43))
    assert train(env, model, WEAK, "r1")["deployment"]["deployed"]
    out = train(env, model, LOGREG, "r2", force=True, evaluate_only=True, deploy=False)
    assert out["version"] == "2" and champion(env, model) == served(env, model) == "1"
    client = env["mlflow"]
    v1_record = client.get_model_version(model, "1").tags[registry.SIGNATURE_TAG]
    assert v1_record.startswith(f"v1 {WHEN} ")  # signed by the promotion, for its run time

    def reload() -> dict[str, Any]:
        return httpx.post(f"{url}/admin/reload", headers=ADMIN, timeout=60).json()

    def exported(name: str) -> str:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        found = re.search(rf'{name}{{model="{model}"}} (\S+)', text)
        return found.group(1) if found else ""

    # 1. A bare alias write (as with MLflow's UI or API): not served, reported everywhere.
    client.set_registered_model_alias(model, registry.CHAMPION, "2")
    reload()
    assert served(env, model) == "1"
    ready = httpx.get(f"{url}/health/ready", timeout=10).json()
    why = ready["unrecorded_champions"][model]
    assert "champion points to version 2, which cd4ml did not promote" in why
    assert "carries no cd4ml promotion record" in why and "still serving version 1" in why
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
    assert meta["version"] == "1" and meta["refused_versions"]["2"] == why
    assert exported("cd4ml_champion_unrecorded") == "1.0"
    # 2. A record copied from another version, or signed with another key, does not pass either.
    client.set_model_version_tag(model, "2", registry.SIGNATURE_TAG, v1_record)
    reload()
    assert (
        served(env, model) == "1"
        and "not signed with this service's admin token"
        in (httpx.get(f"{url}/health/ready", timeout=10).json()["unrecorded_champions"][model])
    )
    forged = registry.champion_signature("not-the-token", model, "2", WHEN)
    client.set_model_version_tag(model, "2", registry.SIGNATURE_TAG, forged)
    reload()
    assert served(env, model) == "1"
    # 3. A deploy of such a version fails at once, with the service's reason (not after a timeout).
    spec = load_spec(env["specs"] / f"{model}.yaml")
    started = time.monotonic()
    with pytest.raises(DeployError, match="which cd4ml did not promote"):
        from cd4ml.steps.deploy import wait_until_serving

        wait_until_serving(ServiceEndpoint(url, SERVICE_TOKEN, wait_seconds=30), model, "2")
    assert time.monotonic() - started < 20
    # 4. cd4ml's own rollback signs its record: the service follows it and the report clears.
    from cd4ml.steps.deploy import rollback

    client.set_registered_model_alias(model, registry.CHAMPION, "1")  # put back by hand (v1 is signed)
    done = rollback(spec, get_settings(), target="2", reason="audit test", who="test", when=WHEN, force=True)
    assert done["rolled_back"], done
    assert champion(env, model) == served(env, model) == "2"
    assert model not in httpx.get(f"{url}/health/ready", timeout=10).json()["unrecorded_champions"]
    assert exported("cd4ml_champion_unrecorded") == "0.0"


def test_a_shadow_answers_a_copy_of_live_traffic_that_clients_never_see(env: dict[str, Any]) -> None:
    """`deployment.strategy: shadow`: a better challenger gets the `shadow` alias instead of
    `champion`; the service answers a copy of live traffic with it off the request path, logs both
    predictions and counts agreement, latency and errors; clients only get the champion's answers."""
    from cd4ml.data.shadow_log import read_shadow_log
    from cd4ml.ml.training import features
    from cd4ml.steps.deploy import rollback
    from cd4ml.ui.overview import model_overview, render_html

    model, url = "stg_shadow", env["service"]
    land(env, model, "week0.csv", generate_churn(ROWS, seed=44))

    def shadow_train(estimator: dict[str, Any], run: str, **kw: Any) -> dict[str, Any]:
        spec = load_spec(write_spec(env["specs"], model, estimator=estimator, promotion__floor=None,
                                    deployment={"strategy": "shadow"}))  # fmt: skip
        return run_training(spec, get_settings(), run_id=f"{model}-{run}", run_time=WHEN,
                            trigger="shadow test", **kw)  # fmt: skip

    first = shadow_train(WEAK, "r1")  # no champion yet: the first version is promoted directly
    assert first["promoted"] and first["deployment"]["deployed"], first
    second = shadow_train(LOGREG, "r2", force=True)
    assert not second["promoted"] and second["version"] == "2", second
    assert second["why"].startswith("shadow: version 2 answers a copy of live traffic, champion stays 1")
    assert second["deployment"] == {"deployed": False, "shadow": "2", "why": second["deployment"]["why"]}
    assert champion(env, model) == "1" and outcomes(env, model, "2") == ["staged", "shadowing"]
    meta = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
    assert meta["version"] == "1" and meta["shadow_version"] == "2"

    spec = load_spec(env["specs"] / f"{model}.yaml")
    rows = features(spec, generate_churn(40, seed=45, batch=2))
    uri = get_settings().mlflow_tracking_uri
    offline = {v: registry.load_model(uri, f"models:/{model}/{v}").predict(rows) for v in ("1", "2")}
    assert list(offline["1"]) != list(offline["2"]), "the two versions must disagree somewhere"
    ids = []
    for i in range(len(rows)):
        body = {"dataframe_records": [json.loads(rows.iloc[[i]].to_json(orient="records"))[0]]}
        answer = httpx.post(f"{url}/v1/models/{model}/predict", json=body, timeout=10)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"
        assert answer.json()["predictions"] == [offline["1"][i].item()]  # the champion's, unchanged
        ids.append(answer.headers["x-request-id"])

    def logged() -> Any:
        frame = read_shadow_log(env["data"], model, "2")
        return frame if len(frame) >= len(ids) else None

    deadline = time.monotonic() + 30
    while (frame := logged()) is None:
        assert time.monotonic() < deadline, "the shadow log did not get every request"
        time.sleep(0.5)
    assert sorted(frame["request_id"]) == sorted(ids) and set(frame["champion_version"]) == {"1"}
    by_id = frame.set_index("request_id")
    for i, rid in enumerate(ids):
        assert json.loads(by_id.loc[rid, "champion_predictions"]) == [offline["1"][i].item()]
        assert json.loads(by_id.loc[rid, "shadow_predictions"]) == [offline["2"][i].item()]
    agree = int(sum(a == b for a, b in zip(offline["1"], offline["2"], strict=True)))
    assert int(frame["agreed"].sum()) == agree and (frame["error"] == "").all()
    exported = httpx.get(f"{url}/metrics", timeout=10).text
    series = rf'cd4ml_shadow_rows_total{{agreement="(\w+)",model="{model}",version="2"}} (\S+)'
    counted = dict(re.findall(series, exported))
    assert counted == {"agree": f"{float(agree)}", "disagree": f"{float(len(ids) - agree)}"}, counted
    assert (
        f'cd4ml_shadow_requests_total{{model="{model}",outcome="ok",version="2"}} {float(len(ids))}'
        in exported
    )
    assert f'cd4ml_shadow_version{{model="{model}"}} 2.0' in exported
    # The Models view shows it: agreement, latency, errors.
    overview = model_overview(spec, get_settings())
    assert overview.shadow is not None and overview.shadow["requests"] == len(ids)
    assert overview.shadow["agreement"] == agree / len(ids) and overview.shadow["errors"] == 0
    page = render_html([overview], get_settings(), "http://mlflow", [])
    assert "Shadow: version 2 answers a copy of live traffic" in page
    assert f"{100 * agree / len(ids):.1f} %" in page

    # Promoted by hand (the rollback DAG's move): the shadow becomes the champion and stops shadowing.
    done = rollback(spec, get_settings(), target="2", reason="the shadow agrees well", who="test", when=WHEN)
    assert done["rolled_back"] and champion(env, model) == served(env, model) == "2"
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/v1/models/{model}", timeout=10).json()["shadow_version"] is not None:
        assert time.monotonic() < deadline, "the promoted shadow still shadows"
        time.sleep(0.5)
    assert model_overview(spec, get_settings()).shadow is None
    assert registry.version_by_alias(env["mlflow"], model, registry.SHADOW) is None  # not again later
