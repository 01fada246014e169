"""A realistic synthetic dataset for the demo model: telecom customer churn.

Mixed numerical and categorical features, a timestamp, and a target that depends on the features
through a known (noisy, non-linear) rule, so models can learn it and better models measurably beat
worse ones. Seeded; `drift` shifts the feature distributions (and, with `concept_drift`, the rule)
to produce the batches that the monitor should flag.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

CONTRACTS = ["month-to-month", "one-year", "two-year"]
PLANS = ["basic", "standard", "premium"]
REGIONS = ["north", "south", "east", "west"]
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def generate_churn(
    n_rows: int,
    *,
    seed: int,
    batch: int = 0,
    drift: float = 0.0,
    concept_drift: bool = False,
) -> pd.DataFrame:
    """One batch of churn data. `batch` moves the time window forward by a week per batch.

    `drift` in [0, 1] moves customers towards short tenure, higher charges, more support calls and
    month-to-month contracts; `concept_drift` also changes how these relate to churn.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    rng = np.random.default_rng([seed, batch])
    contract_p = np.array([0.5, 0.3, 0.2]) * (1 - drift) + np.array([0.85, 0.1, 0.05]) * drift
    contract = rng.choice(CONTRACTS, size=n_rows, p=contract_p / contract_p.sum())
    plan = rng.choice(PLANS, size=n_rows, p=[0.45, 0.35, 0.2])
    region = rng.choice(REGIONS, size=n_rows, p=[0.3, 0.25, 0.25, 0.2])
    tenure = np.clip(rng.exponential(24 * (1 - 0.6 * drift), n_rows), 0, 72).round().astype(int)
    plan_base = np.select([plan == "basic", plan == "standard"], [30.0, 60.0], 90.0)
    charges = np.clip(plan_base + rng.normal(10 * drift, 8 + 6 * drift, n_rows), 18, 130).round(2)
    support_calls = rng.poisson(1.2 + 2.0 * drift, n_rows)
    age = np.clip(rng.normal(45, 14, n_rows), 18, 90).round().astype(int)

    contract_effect = np.select([contract == "month-to-month", contract == "one-year"], [1.2, -0.3], -1.4)
    logit = (
        -1.0
        + contract_effect
        - 0.045 * tenure
        + 0.02 * (charges - 60)
        + 0.35 * support_calls
        + 0.6 * (support_calls >= 4)
        - 0.01 * (age - 45)
        + 0.3 * (region == "south")
    )
    if concept_drift:
        logit = -0.5 - contract_effect + 0.03 * tenure - 0.02 * (charges - 60)
    churned = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(int)

    start = EPOCH + timedelta(weeks=batch)
    offsets = np.sort(rng.uniform(0, 7 * 24 * 3600, n_rows))
    event_time = pd.to_datetime([start + timedelta(seconds=float(s)) for s in offsets]).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    return pd.DataFrame(
        {
            "event_time": event_time,
            "tenure_months": tenure,
            "monthly_charges": charges,
            "support_calls": support_calls,
            "age": age,
            "contract": contract,
            "plan": plan,
            "region": region,
            "churned": churned,
        }
    )


def write_batch(frame: pd.DataFrame, directory: Path, name: str) -> Path:
    """Write atomically (temp name, then rename) so a watcher never sees half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = directory / f".{name}.part"
    if name.endswith(".parquet"):
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    tmp.replace(final)
    return final
