"""The plugin's extra links resolve, for a real run, to the MLflow run and model version it made; and
with a real SMTP server listening, a spec without recipients sends no mail for either run."""

from __future__ import annotations

from typing import Any

import pytest

from cd4ml_dev.datagen import generate_churn
from tests.conftest import Inbox
from tests.helpers import LOGREG, write_spec
from tests.integration.dagtools import land, run

pytestmark = pytest.mark.integration


def test_extra_links_point_at_what_each_task_made(env: dict[str, Any], inbox: Inbox) -> None:
    from airflow import plugins_manager
    from airflow.models.taskinstancekey import TaskInstanceKey

    links = {link.name: link for link in plugins_manager.get_global_operator_extra_links()}
    assert {"MLflow run", "Model version"} <= set(links), "the cd4ml plugin did not load"

    write_spec(env["specs"], "linked", estimator=LOGREG)
    land(env, "linked", "week0.csv", generate_churn(1500, seed=80))
    states = run(env, "linked")
    assert states["__run__"] == "success"

    def link(name: str, task_id: str) -> str:
        key = TaskInstanceKey(
            dag_id="linked__train", task_id=task_id, run_id=states["__run_id__"], try_number=1
        )
        return str(links[name].get_link(None, ti_key=key))

    mv = env["mlflow"].get_model_version("linked", "1")
    experiment = env["mlflow"].get_run(mv.run_id).info.experiment_id
    assert link("MLflow run", "train_challenger").endswith(f"/#/experiments/{experiment}/runs/{mv.run_id}")
    for task_id in ("register_challenger", "promote_champion", "deploy_champion"):
        assert link("Model version", task_id).endswith("/#/models/linked/versions/1"), task_id
    assert link("Model version", "collect_landed_files") == ""  # no link where the task made none
    assert link("MLflow run", "register_challenger") == ""

    # The Data Docs page of this very validation, served by the plugin from the model's gx/ dir.
    docs = link("Data Docs", "validate_batches")
    assert docs.startswith("/cd4ml/files/linked/gx/") and docs.endswith(".html"), docs
    page = env["data"] / "linked" / docs.removeprefix("/cd4ml/files/linked/")
    assert "validations" in docs and page.is_file() and "week0" in page.read_text()

    # A run whose only file is quarantined fails, yet still links to the Data Docs that say why.
    bad = generate_churn(400, seed=81)
    bad.loc[:, "monthly_charges"] = -5.0
    land(env, "linked", "week1-broken.csv", bad)
    failed = run(env, "linked")
    assert failed["validate_batches"] == "failed"
    key = TaskInstanceKey(dag_id="linked__train", task_id="validate_batches", run_id=failed["__run_id__"],
                          try_number=1)  # fmt: skip
    docs = str(links["Data Docs"].get_link(None, ti_key=key))
    page = env["data"] / "linked" / docs.removeprefix("/cd4ml/files/linked/")
    assert page.is_file() and "week1-broken" in page.read_text() and "monthly_charges" in page.read_text()

    # The spec names no recipients: neither the promotion nor the quarantine sent mail (nor failed).
    assert inbox.messages == []
