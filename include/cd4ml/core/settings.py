"""cd4ml's environment configuration, all of it: one typed, frozen settings object.

Every CD4ML_* / MLFLOW_* variable the runtime reads is a field here, read when `get_settings()` is
called, never at import time (a DAG file or a test may set the environment after importing cd4ml).
docs/settings.md is the table of these fields (`settings_table()`); a unit test keeps it in step.
Secrets stay out of `repr`. The prediction service's endpoint and the SMTP server are Airflow
connections (`cd4ml_service`, `cd4ml_smtp`); the service fields below are the fallback for
`cd4ml train` without Airflow and the service's own configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cd4ml.core.errors import Cd4mlError

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _resolved(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def _http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class Locations(BaseSettings):
    """Where cd4ml's state and the servers it talks to are: the first part of `Settings` (its fields
    come first in the settings table)."""

    model_config = SettingsConfigDict(
        env_prefix="CD4ML_",
        frozen=True,
        extra="ignore",
        # An empty variable (`CD4ML_SERVICE_ADMIN_TOKEN=` in .env.example) means "not set".
        env_ignore_empty=True,
        populate_by_name=True,
    )

    home: Path = Field(
        default_factory=lambda: _resolved(PROJECT_ROOT / ".cd4ml"),
        description="All local state of a development stack (default: `.cd4ml/` in the project).",
    )
    data_dir: Path = Field(
        default_factory=lambda data: _resolved(data["home"] / "data"),
        description="The landing zone: `landing/`, `accepted/`, `quarantine/`, reports per model "
        "(default: `$CD4ML_HOME/data`).",
    )
    specs_dir: Path = Field(
        default_factory=lambda: _resolved(PROJECT_ROOT / "include" / "specs"),
        description="Where the model specs (`*.yaml`) are read from (default: `include/specs`).",
    )
    mlflow_port: int = Field(
        5000, description="Port of a local MLflow server; only used to build the two MLflow defaults below."
    )
    mlflow_tracking_uri: str = Field(
        default_factory=lambda data: f"http://127.0.0.1:{data['mlflow_port']}",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
        description="MLflow as cd4ml's code reaches it (MLflow's own variable; default: "
        "`http://127.0.0.1:$CD4ML_MLFLOW_PORT`).",
    )
    mlflow_public_url: str = Field(
        default_factory=lambda data: (
            data["mlflow_tracking_uri"]
            if _http(data["mlflow_tracking_uri"])
            else f"http://127.0.0.1:{data['mlflow_port']}"
        ),
        validation_alias=AliasChoices("CD4ML_MLFLOW_PUBLIC_URL", "CD4ML_MLFLOW_UI_URL"),
        description="MLflow as a reader's browser reaches it: the base of every MLflow link in mails, "
        "the Models view and the task links (`CD4ML_MLFLOW_UI_URL` is the old name). Default: the "
        "tracking URI when it is http(s), else `http://127.0.0.1:$CD4ML_MLFLOW_PORT`. Set it whenever "
        "the tracking URI is a name only the containers resolve (compose: `http://mlflow:5000`).",
    )
    airflow_port: int = Field(8080, description="Port of a local Airflow API server; builds `airflow_url`.")
    airflow_url: str = Field(
        default_factory=lambda data: f"http://127.0.0.1:{data['airflow_port']}",
        description="Airflow's REST API as the `cd4ml` command reaches it "
        "(default: `http://127.0.0.1:$CD4ML_AIRFLOW_PORT`).",
    )
    airflow_public_url: str = Field(
        default_factory=lambda data: data["airflow_url"],
        validation_alias=AliasChoices("AIRFLOW__API__BASE_URL"),
        description="Airflow as a reader's browser reaches it: the base of run links in mails "
        "(Airflow's own `[api] base_url`; default: `airflow_url`).",
    )
    airflow_user: str = Field("admin", description="User the `cd4ml` command logs in to Airflow as.")
    airflow_password: str | None = Field(
        None,
        repr=False,
        validation_alias=AliasChoices("CD4ML_AIRFLOW_PASSWORD", "CD4ML_ADMIN_PASSWORD"),
        description="Password of `airflow_user` (`CD4ML_ADMIN_PASSWORD`, as compose's airflow-init "
        "names it, is read when `CD4ML_AIRFLOW_PASSWORD` is unset).",
    )


class Settings(Locations):
    """Field `x` is read from `CD4ML_X` unless its alias says otherwise (see `settings_table()`): the
    locations, then how the prediction service, deployment and run housekeeping behave."""

    service_host: str = Field("127.0.0.1", description="Interface `cd4ml serve` binds to.")
    service_port: int = Field(8000, description="Port `cd4ml serve` listens on; builds `service_url`.")
    service_url: str = Field(
        default_factory=lambda data: f"http://127.0.0.1:{data['service_port']}",
        description="The prediction service as deployment reaches it, when there is no Airflow "
        "connection `cd4ml_service` (default: `http://127.0.0.1:$CD4ML_SERVICE_PORT`).",
    )
    service_admin_token: str | None = Field(
        None,
        repr=False,
        description="Bearer token of the service's `/admin/*` endpoints (reload, staging slot); the service "
        "requires it when set, deployment sends it when there is no `cd4ml_service` connection. It also "
        "keys cd4ml's signed champion record: a service with a token serves no champion without a record "
        "signed with the same token, so Airflow's `cd4ml_service` password and the service's token must "
        "match. Without it, nothing is staged (the smoke test runs after the switch only) and champion "
        "moves are not verified.",
    )
    service_max_rows: int = Field(10_000, gt=0, description="Most rows one prediction request may carry.")
    service_max_body_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest prediction request body, in bytes."
    )
    service_poll_seconds: float = Field(
        2.0, gt=0, description="How often the service asks MLflow whether a champion moved."
    )
    service_log_predictions: bool = Field(
        True, description="Log every served prediction under the data dir (`0` turns it off)."
    )
    service_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes of `cd4ml serve` on its port (each with its own socket: the kernel spreads "
        "connections). Above 1 they share a "
        "state folder (`service_state_dir`): readiness, `/v1/models`, staging, the canary's counts and "
        "`/metrics` cover every process, whichever one answers.",
    )
    service_state_dir: Path | None = Field(
        None,
        description="Where the service's processes share their state when `service_workers` > 1 "
        "(default: a fresh temporary folder per `cd4ml serve`, removed when it stops).",
    )
    deploy_golden_rows: int = Field(
        50, ge=0, description="Holdout rows deployment sends to the service to prove it serves the champion."
    )
    deploy_wait_seconds: float = Field(
        60.0, gt=0, description="How long deployment waits for the service to report the new version."
    )
    canary_poll_seconds: float = Field(
        10.0, gt=0, description="How often deploy_champion reads a running canary's counts to judge it."
    )
    snapshot_max_rows: int = Field(
        200_000,
        gt=0,
        description="Largest training/holdout table stored whole as a version's artifact; larger ones are "
        "stored as a seeded sample plus every column's distinct values (enough for the drift check).",
    )
    runs_retention_days: float | None = Field(
        7.0,
        ge=0,
        description="At the end of every training run, delete older runs' local snapshots (runs/) last "
        "written more than this many days ago (left-overs of failed or interrupted runs; they are "
        "rebuilt from accepted/ if a step is re-run), except files that versions registered before "
        "snapshots were MLflow artifacts still name. A run's own copies go at its end anyway, once "
        "its evidence is in MLflow or it trained nothing. Each run's outcome.json is always kept.",
    )
    metrics_token: str | None = Field(
        None,
        repr=False,
        description="Static bearer token a Prometheus server may scrape `/cd4ml/metrics` with "
        "(without it, only an Airflow login reads it).",
    )
    code_version: str | None = Field(
        None,
        description="The code's git commit, baked into the image at build time (`-dirty` if the "
        "checkout had local changes); outside an image `git` is asked instead.",
    )

    def __init__(self, *args: Any, **values: Any) -> None:
        # Callers (and tests) that predate this class build it as Settings(home, data_dir, specs_dir, uri).
        positional = ("home", "data_dir", "specs_dir", "mlflow_tracking_uri")
        if len(args) > len(positional):
            raise TypeError(f"Settings takes at most {len(positional)} positional arguments ({positional})")
        super().__init__(**dict(zip(positional, args, strict=False)), **values)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The process environment only: compose's .env configures compose, not the code (and a
        # stray .env in the working directory must not change what a task does).
        return (init_settings, env_settings)

    def model_post_init(self, context: Any) -> None:
        # Relative paths are relative to where the process started; fix them once, and drop trailing
        # slashes so URLs join with one "/".
        for name in ("home", "data_dir", "specs_dir"):
            object.__setattr__(self, name, _resolved(getattr(self, name)))
        for name in ("mlflow_public_url", "airflow_url", "airflow_public_url", "service_url"):
            object.__setattr__(self, name, getattr(self, name).rstrip("/"))

    def model_dir(self, model: str) -> Path:
        return self.data_dir / model


class SettingsError(Cd4mlError):
    """An environment variable cd4ml reads holds a value it cannot use (deterministic: not retried)."""


def get_settings() -> Settings:
    """The environment's settings as of now (not cached: tests and the dev stack change it).

    A bad value fails with the variable's name, the value and what is expected -- not pydantic's
    field name, which the user never typed (a DAG parse error shows this text for every model)."""
    try:
        return Settings()
    except ValidationError as err:
        problems = []
        for error in err.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            names = env_names(field) if field in Settings.model_fields else [field]
            problems.append(f"{' or '.join(names)}={error.get('input')!r}: {error['msg']}")
        raise SettingsError(
            "bad environment setting: " + "; ".join(problems) + " (see docs/settings.md)"
        ) from None


def env_names(name: str) -> list[str]:
    """The variables field `name` is read from, first match wins."""
    field = Settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a).upper() for a in alias.choices if str(a) != name]
    return [f"CD4ML_{name.upper()}"]


def settings_table() -> str:
    """The Markdown table of every setting (docs/settings.md embeds it verbatim)."""
    rows = ["| Variable | Type | Default | What it is |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        names = " or ".join(f"`{n}`" for n in env_names(name))
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation)
        if field.default_factory is not None:
            default = "derived"
        elif field.default is None:
            default = "unset"
        else:
            default = f"`{field.default}`"
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| {names} | {kind.replace('|', 'or')} | {default} | {text} |")
    return "\n".join(rows) + "\n"


TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def write_docs(path: Path = PROJECT_ROOT / "docs" / "settings.md") -> None:
    """Replace the table between the markers in docs/settings.md with `settings_table()`."""
    text = path.read_text()
    head, sep, rest = text.partition(TABLE_START)
    _, sep_end, tail = rest.partition(TABLE_END)
    if not sep or not sep_end:
        raise SystemExit(f"cd4ml: {path} lacks the markers {TABLE_START} ... {TABLE_END}")
    path.write_text(f"{head}{TABLE_START}\n{settings_table()}{TABLE_END}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-docs"]:
        raise SystemExit("usage: python -m cd4ml.core.settings --write-docs")
    write_docs()
