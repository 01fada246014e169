"""The one settings object: what each variable sets, the derived defaults, and the docs table."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cd4ml.core.settings import PROJECT_ROOT, Settings, SettingsError, env_names, get_settings, settings_table

DOCS = PROJECT_ROOT / "docs" / "settings.md"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from the test session's environment leaks into a case."""
    for name in Settings.model_fields:
        for var in env_names(name):
            monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_are_a_local_stack(clean_env: pytest.MonkeyPatch) -> None:
    s = get_settings()
    assert s.home == PROJECT_ROOT / ".cd4ml"
    assert s.data_dir == PROJECT_ROOT / ".cd4ml" / "data"
    assert s.specs_dir == PROJECT_ROOT / "include" / "specs"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert s.mlflow_public_url == "http://127.0.0.1:5000"
    assert s.airflow_url == s.airflow_public_url == "http://127.0.0.1:8080"
    assert s.service_url == "http://127.0.0.1:8000"
    assert s.service_admin_token is None and s.code_version is None
    assert s.service_log_predictions is True


def test_read_when_called_not_at_import(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = get_settings()
    clean_env.setenv("CD4ML_HOME", str(tmp_path))
    after = get_settings()
    assert before.home != tmp_path
    assert after.home == tmp_path and after.data_dir == tmp_path / "data"
    assert after.model_dir("churn") == tmp_path / "data" / "churn"


def test_ports_build_the_urls(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_MLFLOW_PORT", "5123")
    clean_env.setenv("CD4ML_AIRFLOW_PORT", "8123")
    clean_env.setenv("CD4ML_SERVICE_PORT", "8001")
    s = get_settings()
    assert s.mlflow_tracking_uri == s.mlflow_public_url == "http://127.0.0.1:5123"
    assert s.airflow_url == s.airflow_public_url == "http://127.0.0.1:8123"
    assert s.service_url == "http://127.0.0.1:8001"


def test_mlflow_public_url_is_not_a_container_hostname(clean_env: pytest.MonkeyPatch) -> None:
    """Issue 12: under compose, mailed links pointed at http://mlflow:5000."""
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    clean_env.setenv("CD4ML_MLFLOW_PUBLIC_URL", "http://localhost:5000/")
    s = get_settings()
    assert s.mlflow_tracking_uri == "http://mlflow:5000"
    assert s.mlflow_public_url == "http://localhost:5000"


def test_mlflow_public_url_old_name_and_precedence(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_MLFLOW_UI_URL", "http://old:1")
    assert get_settings().mlflow_public_url == "http://old:1"
    clean_env.setenv("CD4ML_MLFLOW_PUBLIC_URL", "http://new:2")
    assert get_settings().mlflow_public_url == "http://new:2"


def test_a_non_http_tracking_uri_links_to_the_local_port(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:///tmp/mlflow.db")
    clean_env.setenv("CD4ML_MLFLOW_PORT", "5200")
    assert get_settings().mlflow_public_url == "http://127.0.0.1:5200"


def test_airflow_public_url_is_airflows_base_url(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_AIRFLOW_URL", "http://airflow-apiserver:8080")
    assert get_settings().airflow_public_url == "http://airflow-apiserver:8080"
    clean_env.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    s = get_settings()
    assert s.airflow_url == "http://airflow-apiserver:8080"
    assert s.airflow_public_url == "https://airflow.example.com"


def test_empty_means_unset_and_secrets_stay_out_of_repr(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_SERVICE_ADMIN_TOKEN", "")
    assert get_settings().service_admin_token is None
    clean_env.setenv("CD4ML_SERVICE_ADMIN_TOKEN", "s3cret-token")
    clean_env.setenv("CD4ML_METRICS_TOKEN", "m3trics-token")
    clean_env.setenv("CD4ML_ADMIN_PASSWORD", "pa55word")
    s = get_settings()
    assert (s.service_admin_token, s.metrics_token, s.airflow_password) == (
        "s3cret-token", "m3trics-token", "pa55word",
    )  # fmt: skip
    for secret in ("s3cret-token", "m3trics-token", "pa55word"):
        assert secret not in repr(s) and secret not in str(s)


def test_airflow_password_prefers_its_own_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_ADMIN_PASSWORD", "compose")
    clean_env.setenv("CD4ML_AIRFLOW_PASSWORD", "mine")
    assert get_settings().airflow_password == "mine"


def test_service_knobs(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_SERVICE_MAX_ROWS", "5")
    clean_env.setenv("CD4ML_SERVICE_POLL_SECONDS", "0.5")
    clean_env.setenv("CD4ML_SERVICE_LOG_PREDICTIONS", "0")
    clean_env.setenv("CD4ML_DEPLOY_GOLDEN_ROWS", "7")
    s = get_settings()
    assert (s.service_max_rows, s.service_poll_seconds, s.service_log_predictions) == (5, 0.5, False)
    assert s.deploy_golden_rows == 7
    from cd4ml.serving.app import ServiceConfig

    config = ServiceConfig.from_settings(get_settings())  # as create_app builds it
    assert (config.max_rows, config.poll_seconds, config.log_predictions) == (5, 0.5, False)
    assert config.admin_token is None


def test_a_bad_value_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CD4ML_SERVICE_MAX_ROWS", "many")
    with pytest.raises(SettingsError, match=r"CD4ML_SERVICE_MAX_ROWS='many': .*integer") as err:
        get_settings()
    assert not err.value.retryable and "docs/settings.md" in str(err.value)
    clean_env.setenv("CD4ML_SERVICE_MAX_ROWS", "0")
    with pytest.raises(SettingsError, match=r"CD4ML_SERVICE_MAX_ROWS='0': .*greater than 0"):
        get_settings()


def test_frozen_and_positional_construction(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings(tmp_path, tmp_path / "d", tmp_path / "s", "http://m")
    assert (s.home, s.data_dir, s.specs_dir, s.mlflow_tracking_uri) == (
        tmp_path, tmp_path / "d", tmp_path / "s", "http://m",
    )  # fmt: skip
    assert s.mlflow_public_url == "http://m"
    with pytest.raises(ValidationError, match="frozen"):
        s.home = Path("/")  # type: ignore[misc]
    with pytest.raises(TypeError, match="at most 4"):
        Settings(tmp_path, tmp_path, tmp_path, "x", "y")


def test_a_dotenv_file_in_the_working_directory_is_ignored(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("CD4ML_SERVICE_MAX_ROWS=3\n")
    clean_env.chdir(tmp_path)
    assert get_settings().service_max_rows == 10_000


def test_docs_table_is_the_settings() -> None:
    """docs/settings.md embeds settings_table(); regenerate it with `python -m cd4ml.core.settings`."""
    text = DOCS.read_text()
    assert settings_table() in text, (
        f"{DOCS} is out of step with cd4ml.core.settings.Settings: "
        "run `.venv/bin/python -m cd4ml.core.settings --write-docs`"
    )
    for name in Settings.model_fields:
        for var in env_names(name):
            assert text.count(f"`{var}`") >= 1, f"{var} is not documented in {DOCS}"
