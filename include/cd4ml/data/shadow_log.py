"""The shadow log (`<data root>/<model>/shadow/date=YYYY-MM-DD/*.parquet`, written by the prediction
service's `cd4ml.serving.shadow`): one record per live request a shadow version also answered.
Read here, without the service's dependencies, by the Models view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHADOW_DIR = "shadow"


def read_shadow_log(data_dir: Path, model: str, version: str | None = None) -> Any:
    """Every shadow record of `model` (of one shadow `version`, if given) as a DataFrame."""
    import pandas as pd

    parts = sorted((data_dir / model / SHADOW_DIR).glob("date=*/part-*.parquet"))
    if not parts:
        return pd.DataFrame()
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    if version is not None:
        frame = frame[frame["shadow_version"].astype(str) == str(version)]
    return frame.reset_index(drop=True)


def shadow_summary(frame: Any) -> dict[str, Any]:
    """Agreement, latency and errors of a shadow's records (what the Models view shows)."""
    if frame is None or len(frame) == 0:
        return {"requests": 0, "errors": 0, "rows": 0, "agreement": None, "mean_abs_difference": None,
                "p50_ms": None, "p99_ms": None, "last_error": ""}  # fmt: skip
    failed = frame[frame["error"] != ""]
    ok = frame[frame["error"] == ""]
    rows = int(ok["rows"].sum())
    ms = ok["shadow_seconds"] * 1000.0
    return {
        "requests": len(frame),
        "errors": len(failed),
        "rows": rows,
        "agreement": float(ok["agreed"].sum() / rows) if rows else None,
        "mean_abs_difference": float(ok["abs_difference"].sum() / rows) if rows else None,
        "p50_ms": float(ms.quantile(0.5)) if len(ms) else None,
        "p99_ms": float(ms.quantile(0.99)) if len(ms) else None,
        "last_error": str(frame[frame["error"] != ""]["error"].iloc[-1])
        if (frame["error"] != "").any()
        else "",
    }
