"""`cd4ml` command line: check specs, retract data, train without Airflow, run the prediction service.

The embedded stack and the demo data are development tooling: `cd4ml-dev` (dev/cd4ml_dev).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cd4ml.core.errors import Cd4mlError, SpecError
from cd4ml.core.settings import get_settings


def cmd_spec_check(args: argparse.Namespace) -> int:
    from cd4ml.core.spec import load_specs, spec_files

    paths = [Path(p) for p in args.paths] or spec_files(get_settings().specs_dir)
    specs, errors = load_specs(paths)
    by_name = {p.stem: p for p in paths}
    for spec in specs:
        where = by_name.get(spec.name, Path(spec.name))
        try:
            from cd4ml.ml.training import build_pipeline, check_trainable_spec

            # What training would refuse after reading the data (a metric it cannot compute, an
            # estimator it cannot build or of the wrong kind) is refused here, before anything runs.
            check_trainable_spec(spec)
            build_pipeline(spec)
            import great_expectations as gx

            for extra in spec.validation.expectations:
                if not hasattr(gx.expectations, extra.expectation):
                    raise SpecError(f"field 'validation.expectations': unknown {extra.expectation!r}")
            print(f"ok      {spec.name}")
        except Cd4mlError as err:
            text = str(err)
            errors[where] = SpecError(text if text.startswith(str(where)) else f"{where}: {text}")
    for problem in errors.values():
        print(f"error   {problem}", file=sys.stderr)
    return 1 if errors else 0


def _airflow_api() -> tuple[str, str, str | None]:
    """Base URL, user and password of the Airflow REST API (the embedded stack's by default)."""
    settings = get_settings()
    password = settings.airflow_password
    secrets = settings.home / "secrets.json"
    if not password and secrets.is_file():  # written by `make up`; never generated here
        password = json.loads(secrets.read_text()).get("admin_password")
    return settings.airflow_url, settings.airflow_user, password


def _http_json(url: str, body: dict[str, object], token: str | None = None) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def trigger_training(model: str, reason: str) -> str:
    """Start `<model>__train` through the Airflow REST API; returns the run id."""
    url, user, password = _airflow_api()
    if not password:
        raise urllib.error.URLError("no Airflow password (CD4ML_AIRFLOW_PASSWORD, or a running `make up`)")
    token = str(_http_json(f"{url}/auth/token", {"username": user, "password": password})["access_token"])
    run = _http_json(
        f"{url}/api/v2/dags/{model}__train/dagRuns",
        {"logical_date": None, "conf": {"reason": reason[:500]}},
        token,
    )
    return str(run["dag_run_id"])


def cmd_data_retract(args: argparse.Namespace) -> int:
    import getpass
    from datetime import UTC, datetime

    from cd4ml.core.paths import ModelPaths
    from cd4ml.data import landing

    zone = ModelPaths.for_model(get_settings(), args.model)
    if not zone.accepted.is_dir():
        raise Cd4mlError(
            f"{args.model}: no accepted data under {zone.root} (CD4ML_DATA_DIR); is the model name right?"
        )
    done = landing.retract(
        zone,
        args.file,
        reason=args.reason,
        who=f"{getpass.getuser()} via cd4ml CLI",
        when=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    print(f"cd4ml: retracted {done.file} (sha256 {done.sha256[:12]}, {done.rows} rows) at {done.when}")
    print(f"       moved to {done.path}; its rows leave the next training run")
    from cd4ml import registry

    try:
        with registry.impatient():
            registry.record_retraction(registry.client(get_settings().mlflow_tracking_uri), args.model, done)
    except Exception as err:
        if not registry.unreachable(err):
            raise
        print(f"cd4ml: MLflow is not reachable ({err}); the retraction is not in the model's history yet")
    if args.no_retrain:
        print(f"cd4ml: no retrain requested; the next {args.model}__train run trains without it")
        return 0
    try:
        run_id = trigger_training(args.model, f"retraction of {done.file}: {done.reason}")
    except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
        url = _airflow_api()[0]
        print(
            f"cd4ml: Airflow is not reachable at {url} ({err}): the retrain starts with the next "
            f"{args.model}__train run (nightly, new data or drift). To retrain now, trigger "
            f"{args.model}__train in the Airflow UI or run `cd4ml train {args.model}`."
        )
        return 0
    print(f"cd4ml: started {args.model}__train run {run_id} to retrain without it")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """The `<model>__train` DAG's steps in this process: the same gate, run outcome and error policy."""
    import getpass
    from datetime import UTC, datetime

    from cd4ml.core.errors import is_transient
    from cd4ml.core.spec import load_spec
    from cd4ml.steps.pipeline import RETRIES, run_training

    settings = get_settings()
    spec = load_spec(settings.specs_dir / f"{args.model}.yaml")
    now = datetime.now(UTC).isoformat()
    try:
        result = run_training(
            spec, settings, run_id=f"cli__{now}", run_time=now, force=args.force, deploy=not args.no_deploy,
            evaluate_only=args.evaluate_only, trigger=f"manual: {args.reason}",
            who=f"{getpass.getuser()} via cd4ml CLI", retries=RETRIES,
        )  # fmt: skip
    except Cd4mlError as err:
        # As a failed task reports it: which step, the error's kind, whether a retry could help.
        where = "; ".join(getattr(err, "__notes__", [])) or f"{args.model}__train"
        verdict = "transient, retries exhausted" if is_transient(err) else "deterministic, not retried"
        print(f"cd4ml: {where}: {type(err).__name__} ({verdict}):\n{err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """The `<model>__score` DAG's step in this process: what waits in score/, or `path` where it is."""
    import getpass
    from datetime import UTC, datetime

    from cd4ml.core.spec import load_spec
    from cd4ml.steps.batch_score import score_pending

    settings = get_settings()
    spec = load_spec(settings.specs_dir / f"{args.model}.yaml")
    now = datetime.now(UTC).isoformat()
    source = str(Path(args.path).expanduser().resolve()) if args.path else None
    try:
        run = score_pending(
            spec, settings, run_id=f"cli__{now}", run_time=now, source=source,
            trigger=f"manual: {getpass.getuser()} via cd4ml CLI", signing_key=settings.service_admin_token,
        )  # fmt: skip
    except Cd4mlError as err:
        print(f"cd4ml: {args.model}__score: {type(err).__name__}:\n{err}", file=sys.stderr)
        return 2
    print(json.dumps(run.to_xcom(), indent=2))
    return 0


def cmd_champion_sign(args: argparse.Namespace) -> int:
    """Sign the current champion's record by hand: for champions promoted before cd4ml signed its
    promotions, which a service holding the admin token would not serve. Recorded with who and why."""
    import getpass
    from datetime import UTC, datetime

    from cd4ml import registry

    settings = get_settings()
    token = settings.service_admin_token
    if not token:
        raise Cd4mlError(
            "CD4ML_SERVICE_ADMIN_TOKEN is not set: the champion record is signed with the prediction "
            "service's admin token (the cd4ml_service connection's password); set it to that token"
        )
    client = registry.client(settings.mlflow_tracking_uri)
    mv = registry.version_by_alias(client, args.model, registry.CHAMPION)
    if mv is None:
        raise Cd4mlError(f"{args.model}: no champion to sign (its champion alias is not set)")
    version, now = str(mv.version), datetime.now(UTC).isoformat()
    record = registry.champion_signature(token, args.model, version, now)
    registry.set_tags(client, args.model, version, {registry.SIGNATURE_TAG: record})
    registry.append_event(
        client, args.model, kind="promotion", version=version, who=f"{getpass.getuser()} via cd4ml CLI",
        why=f"champion record signed by hand: {args.reason}", when=now, details={"signed_by_hand": True},
    )  # fmt: skip
    print(f"cd4ml: {args.model} version {version} now carries cd4ml's signed champion record")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, 1 or more (not {text!r})")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from cd4ml.serving.app import serve

    settings = get_settings()
    return serve(args.host or settings.service_host, args.port or settings.service_port, args.workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cd4ml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="check model specs (parse, estimator import, expectations)")
    p.add_argument("action", choices=["check"])
    p.add_argument("paths", nargs="*")
    p.set_defaults(func=cmd_spec_check)

    p = sub.add_parser("data", help="manage a model's accepted data")
    p.add_argument("action", choices=["retract"])
    p.add_argument("model")
    p.add_argument("file", help="stored name, original name or sha256 prefix of an accepted file")
    p.add_argument("--reason", required=True, help="why; recorded with who and when")
    p.add_argument(
        "--no-retrain", action="store_true", help="do not start <model>__train through the Airflow API"
    )
    p.set_defaults(func=cmd_data_retract)

    p = sub.add_parser("train", help="run the training pipeline once in this process, without Airflow")
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="train even if nothing changed (the DAG's 'force')")
    p.add_argument(
        "--evaluate-only",
        action="store_true",
        help="train, evaluate and register, but never move the champion (the DAG's 'evaluate_only')",
    )
    p.add_argument("--reason", default="cd4ml train", help="why; recorded on the version and the run outcome")
    p.add_argument("--no-deploy", action="store_true", help="register and promote, but do not roll out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score files with the champion once, in this process, without Airflow")
    p.add_argument("model")
    p.add_argument(
        "path", nargs="?", default=None,
        help="a CSV/Parquet file or folder, scored where it is; default: what waits in the model's score/",
    )  # fmt: skip
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("champion", help="manage a model's champion record")
    p.add_argument("action", choices=["sign"])
    p.add_argument("model")
    p.add_argument("--reason", required=True, help="why; recorded with who and when")
    p.set_defaults(func=cmd_champion_sign)

    p = sub.add_parser("serve", help="run the prediction service in the foreground")
    p.add_argument("--host", default=None, help="default: CD4ML_SERVICE_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: CD4ML_SERVICE_PORT (8000)")
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes on that port; default: CD4ML_SERVICE_WORKERS (1)",
    )
    p.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Cd4mlError as err:
        print(f"cd4ml: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
