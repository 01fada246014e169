"""The per-model data zone: landing/ -> accepted/ or quarantine/, exactly once, nothing deleted.

Files are identified by the SHA-256 of their bytes. An accepted file is stored as
`accepted/<sha16>__<original name>` with a `.meta.json` sidecar; because the hash is in the name,
the directory itself is the ledger and survives any crash between two steps: a file is moved
with one atomic rename, and its sidecar is rewritten from the name if it is missing.

An accepted file can be retracted (`retract`): it moves on to quarantine/ with a reason file that
records who, when and why, so its rows leave every later training set and nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cd4ml.core.errors import RetractionError
from cd4ml.core.paths import ModelPaths

DATA_SUFFIXES = {".csv", ".parquet", ".pq"}
HASH_PREFIX = 16


# The zone is the model's data root; its layout is spelled once, in cd4ml.core.paths.
Zone = ModelPaths


@dataclass(frozen=True)
class LandedFile:
    path: str
    name: str
    sha256: str
    size: int

    @property
    def stored_name(self) -> str:
        return f"{self.sha256[:HASH_PREFIX]}__{self.name}"


@dataclass(frozen=True)
class AcceptedFile:
    path: str
    name: str
    sha256: str
    rows: int
    accepted_at: str
    run_id: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_candidate(path: Path) -> bool:
    """Hidden and partial files (`.x`, `x.part`, `x.tmp`) are still being written: leave them."""
    return path.is_file() and not path.name.startswith(".") and path.suffix not in {".part", ".tmp"}


def list_landed(zone: Zone) -> list[LandedFile]:
    files = []
    for path in sorted(zone.landing.iterdir()) if zone.landing.exists() else []:
        if is_candidate(path):
            files.append(LandedFile(str(path), path.name, file_sha256(path), path.stat().st_size))
    return files


def accepted_hashes(zone: Zone) -> dict[str, Path]:
    """Hash prefix -> stored file, for every accepted data file."""
    out: dict[str, Path] = {}
    for path in zone.accepted.glob("*__*") if zone.accepted.exists() else []:
        if path.name.endswith(".meta.json"):
            continue
        out[path.name.split("__", 1)[0]] = path
    return out


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def accept(zone: Zone, landed: LandedFile, *, rows: int, accepted_at: str, run_id: str) -> AcceptedFile:
    target = zone.accepted / landed.stored_name
    os.replace(landed.path, target)
    record = AcceptedFile(str(target), landed.name, landed.sha256, rows, accepted_at, run_id)
    _write_json(target.with_name(target.name + ".meta.json"), asdict(record))
    return record


def quarantine(zone: Zone, landed: LandedFile, *, reason: str, details: dict[str, object]) -> Path:
    """Move the file aside with a human-readable reason and a machine-readable one beside it."""
    target = _unique(zone.quarantine / landed.stored_name)
    os.replace(landed.path, target)
    target.with_name(target.name + ".reason.txt").write_text(reason.rstrip() + "\n", encoding="utf-8")
    _write_json(
        target.with_name(target.name + ".reason.json"),
        {"file": landed.name, "sha256": landed.sha256, "reason": reason, **details},
    )
    return target


def list_accepted(zone: Zone) -> list[AcceptedFile]:
    """Every accepted file in acceptance order (the order the holdout split relies on)."""
    records = []
    for path in accepted_hashes(zone).values():
        meta = path.with_name(path.name + ".meta.json")
        if meta.exists():
            records.append(AcceptedFile(**json.loads(meta.read_text(encoding="utf-8"))))
        else:  # moved but crashed before the sidecar was written: the name still says what it is
            records.append(
                AcceptedFile(str(path), path.name.split("__", 1)[1], file_sha256(path), -1, "", "")
            )
    return sorted(records, key=lambda r: (r.accepted_at, r.name, r.sha256))


# -- retraction ------------------------------------------------------------------------------------

RETRACTED = "retracted"
MIN_SHA_PREFIX = 6  # shorter hex strings are too likely to be names or to match several files


@dataclass(frozen=True)
class Retraction:
    file: str  # the original name
    sha256: str
    path: str  # where the bytes are now, under quarantine/
    reason: str
    who: str
    when: str
    accepted_at: str
    accepted_run_id: str
    rows: int


def _matches(key: str, stored_name: str, name: str, sha256: str) -> bool:
    key = key.strip()
    base = Path(key).name
    if base in {stored_name, name}:
        return True
    hexkey = key.lower()
    return (
        len(hexkey) >= MIN_SHA_PREFIX
        and all(c in "0123456789abcdef" for c in hexkey)
        and (sha256.startswith(hexkey))
    )


def _describe(files: list[AcceptedFile]) -> str:
    shown = [f"{Path(f.path).name} (sha256 {f.sha256[:12]}, accepted {f.accepted_at or '?'})" for f in files]
    more = f" and {len(files) - 20} more" if len(files) > 20 else ""
    return "; ".join(shown[:20]) + more if shown else "none"


def find_accepted(zone: Zone, key: str) -> AcceptedFile:
    """The one accepted file `key` names: its stored name, original name or a sha256 prefix."""
    files = list_accepted(zone)
    found = [f for f in files if _matches(key, Path(f.path).name, f.name, f.sha256)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise RetractionError(
            f"{zone.root.name}: no accepted file matches {key!r} (give a stored name, an original "
            f"name or at least {MIN_SHA_PREFIX} hex digits of its sha256). Accepted: {_describe(files)}"
        )
    raise RetractionError(
        f"{zone.root.name}: {key!r} matches {len(found)} accepted files: {_describe(found)}. "
        "Give the stored name (<sha16>__<name>) or a longer sha256 prefix"
    )


def list_retractions(zone: Zone) -> list[dict[str, Any]]:
    """Every retraction recorded in quarantine/, newest first."""
    out = []
    for path in zone.quarantine.glob("*.reason.json") if zone.quarantine.exists() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        # Only once the bytes moved: a reason written just before a crash is not a retraction yet.
        if isinstance(record, dict) and record.get("kind") == RETRACTED and Path(record["path"]).exists():
            out.append(record)
    return sorted(out, key=lambda r: (str(r.get("when", "")), str(r.get("path", ""))), reverse=True)


def _finish(zone: Zone, record: dict[str, Any]) -> Retraction:
    """Complete a retraction whose data file already moved (a crash may have left the sidecar)."""
    target = Path(record["path"])
    sidecar = zone.accepted / (record["stored_name"] + ".meta.json")
    if sidecar.exists():
        os.replace(sidecar, target.with_name(target.name + ".accepted.json"))
    fields = Retraction.__dataclass_fields__
    return Retraction(**{k: v for k, v in record.items() if k in fields})


def retract(zone: Zone, key: str, *, reason: str, who: str, when: str) -> Retraction:
    """Move the accepted file `key` names to quarantine/, recording who, when and why.

    Crash-safe and idempotent like `accept`/`quarantine`: the reason is written first under the
    target's name, then the bytes move with one atomic rename (the moment the file stops being
    accepted), then the acceptance sidecar follows. Running it again for a retracted file finishes
    an interrupted move and returns the recorded retraction.
    """
    if not reason.strip():
        raise RetractionError(f"{zone.root.name}: a retraction needs a reason (who reads it later?)")
    try:
        accepted = find_accepted(zone, key)
    except RetractionError:
        done = [r for r in list_retractions(zone) if _matches(key, r["stored_name"], r["file"], r["sha256"])]
        if len(done) == 1:
            return _finish(zone, done[0])
        raise
    source = Path(accepted.path)
    target = _unique(zone.quarantine / source.name)
    record = Retraction(
        file=accepted.name, sha256=accepted.sha256, path=str(target), reason=reason.strip(), who=who,
        when=when, accepted_at=accepted.accepted_at, accepted_run_id=accepted.run_id, rows=accepted.rows,
    )  # fmt: skip
    zone.quarantine.mkdir(parents=True, exist_ok=True)
    target.with_name(target.name + ".reason.txt").write_text(
        f"{accepted.name} was retracted by {who} at {when}: {record.reason}\n"
        f"It had been accepted at {accepted.accepted_at or '?'} by run {accepted.run_id or '?'}; its "
        "rows are left out of every training run from now on. Nothing was deleted: to use the file "
        "again, land it again (it is validated like any new file).\n",
        encoding="utf-8",
    )
    payload = {"kind": RETRACTED, "stored_name": source.name, **asdict(record)}
    _write_json(target.with_name(target.name + ".reason.json"), payload)
    os.replace(source, target)
    return _finish(zone, payload)


def data_fingerprint(files: list[AcceptedFile]) -> str:
    digest = hashlib.sha256()
    for sha in sorted(f.sha256 for f in files):
        digest.update(sha.encode())
    return digest.hexdigest()


def _write_json(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)
