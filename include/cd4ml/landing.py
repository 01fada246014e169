"""The per-model data zone: landing/ -> accepted/ or quarantine/, exactly once, nothing deleted.

Files are identified by the SHA-256 of their bytes. An accepted file is stored as
`accepted/<sha16>__<original name>` with a `.meta.json` sidecar; because the hash is in the name,
the directory itself is the ledger and survives any crash between two steps: a file is moved
with one atomic rename, and its sidecar is rewritten from the name if it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_SUFFIXES = {".csv", ".parquet", ".pq"}
HASH_PREFIX = 16


@dataclass(frozen=True)
class Zone:
    root: Path

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def accepted(self) -> Path:
        return self.root / "accepted"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def gx(self) -> Path:
        return self.root / "gx"

    def ensure(self) -> Zone:
        for d in (self.landing, self.accepted, self.quarantine, self.runs):
            d.mkdir(parents=True, exist_ok=True)
        return self


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


def data_fingerprint(files: list[AcceptedFile]) -> str:
    digest = hashlib.sha256()
    for sha in sorted(f.sha256 for f in files):
        digest.update(sha.encode())
    return digest.hexdigest()


def _write_json(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)
