"""`cd4ml-dev`: run the embedded stack (`make up`) and land the demo's synthetic data.

Development tooling only; the runtime command line is `cd4ml` (spec check, retract, train, serve).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cd4ml.core.errors import Cd4mlError
from cd4ml.core.paths import ModelPaths
from cd4ml.core.settings import get_settings


def champion_version(mlflow_url: str, model: str) -> str | None:
    query = urllib.parse.urlencode({"name": model, "alias": "champion"})
    url = f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?{query}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(json.loads(resp.read())["model_version"]["version"])
    except urllib.error.HTTPError as err:
        # 404: no such model yet; 400: the model exists (registration under way) but has no champion.
        if err.code in {400, 404}:
            return None
        raise


def _demo_land(model: str, batch: int, rows: int, drift: float, seed: int) -> Path:
    from cd4ml_dev.datagen import generate_churn, write_batch

    landing = ModelPaths.for_model(get_settings(), model).landing
    frame = generate_churn(rows, seed=seed, batch=batch, drift=drift)
    suffix = f"_drift{drift:g}" if drift else ""
    return write_batch(frame, landing, f"{model}_batch{batch:03d}{suffix}.csv")


def _seed_demo_if_new(model: str) -> Path | None:
    """First `make up` lands the demo's first batch; later ones leave the data alone."""
    paths = ModelPaths.for_model(get_settings(), model)
    if any(paths.accepted.glob("*")) or any(paths.landing.glob("*")):
        return None
    return _demo_land(model, batch=0, rows=5000, drift=0.0, seed=7)


def cmd_stack(args: argparse.Namespace) -> int:
    from cd4ml_dev import stack

    cfg = stack.config_from_env()
    if args.action == "up":
        print(f"cd4ml-dev: starting the embedded stack (state in {cfg.home}) ...", flush=True)
        stack.up(cfg)
        user, password = stack.login(cfg)
        seeded = None if args.no_demo else _seed_demo_if_new("churn")
        print(
            f"\n  Airflow UI   {cfg.airflow_url}   (login: {user} / {password})\n"
            f"  MLflow UI    {cfg.mlflow_url}\n"
            f"  Predictions  {cfg.service_url}/v1/models/<model>/predict   (docs: {cfg.service_url}/docs)\n"
            f"  Data root    {get_settings().data_dir}   (drop files into <model>/landing/)\n"
            f"  Logs         {cfg.logs_dir}\n",
            flush=True,
        )
        if seeded:
            print(f"cd4ml-dev: landed the demo's first batch: {seeded}", flush=True)
        if args.wait > 0 and not args.no_demo:
            return _wait_champion(cfg.mlflow_url, "churn", args.wait)
        return 0
    if args.action == "down":
        stack.down(cfg)
    elif args.action == "status":
        print(stack.status(cfg))
    elif args.action == "env":
        for key, value in stack.environment(cfg).items():
            if not any(word in key for word in ("SECRET", "TOKEN", "AIRFLOW_CONN_")):
                print(f"export {key}='{value}'")
    elif args.action == "clean":
        stack.clean(cfg)
    elif args.action == "init-auth":
        print(f"cd4ml-dev: wrote the Airflow login file {stack.write_auth_file(os.environ)}")
    return 0


def _wait_champion(mlflow_url: str, model: str, timeout: float) -> int:
    print(
        f"cd4ml-dev: waiting up to {timeout:.0f}s for the '{model}' champion (Ctrl-C is safe) ...", flush=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = champion_version(mlflow_url, model)
        if version:
            print(
                f"cd4ml-dev: {model} champion is version {version}: {mlflow_url}/#/models/{model}", flush=True
            )
            return 0
        time.sleep(3)
    print(f"cd4ml-dev: no champion yet after {timeout:.0f}s; check the {model}__train runs in the Airflow UI")
    return 1


def cmd_demo_land(args: argparse.Namespace) -> int:
    print(_demo_land(args.model, args.batch, args.rows, args.drift, args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cd4ml-dev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="run the embedded Airflow + MLflow stack")
    p.add_argument("action", choices=["up", "down", "status", "env", "clean", "init-auth"])
    p.add_argument("--no-demo", action="store_true", help="do not land demo data")
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for the demo champion")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("demo", help="land a synthetic demo batch")
    p.add_argument("action", choices=["land"])
    p.add_argument("--model", default="churn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--drift", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo_land)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Cd4mlError as err:
        print(f"cd4ml-dev: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
