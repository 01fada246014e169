from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cd4ml.core.errors import DataReadError
from cd4ml.data import landing
from cd4ml.data.tables import read_table


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", b"", "the file is empty"),
        ("latin1.csv", "a,b\ncaf\xe9,1\n".encode("latin-1"), "not UTF-8 text (invalid byte 0xe9"),
        ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "NUL bytes"),
        ("ragged.csv", b"a,b\n1,2\n3,4,5,6\n", "malformed CSV"),
        ("semicolon.csv", b"a;b;c\n1;2;3\n", "delimited by something other than commas"),
        ("notes.txt", b"hello", "unsupported file type '.txt'"),
        ("broken.parquet", b"PAR1 nope", "not a readable Parquet file"),
    ],
)
def test_unreadable_files_raise_a_clear_error(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataReadError) as err:
        read_table(path)
    assert str(err.value).startswith(name)
    assert expected in str(err.value)


def test_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    frame.to_csv(tmp_path / "f.csv", index=False)
    frame.to_parquet(tmp_path / "f.parquet", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "f.csv"), frame)
    pd.testing.assert_frame_equal(read_table(tmp_path / "f.parquet"), frame)


def test_accept_and_quarantine_move_exactly_once_and_keep_every_byte(tmp_path: Path) -> None:
    zone = landing.Zone(tmp_path).ensure()
    (zone.landing / "a.csv").write_bytes(b"x,y\n1,2\n")
    (zone.landing / "b.csv").write_bytes(b"x,y\n3,4\n")
    (zone.landing / ".c.csv.part").write_bytes(b"half")
    landed = landing.list_landed(zone)
    assert [f.name for f in landed] == ["a.csv", "b.csv"]  # the partial file is left alone
    a, b = landed
    rec = landing.accept(zone, a, rows=1, accepted_at="2026-01-01T00:00:00+00:00", run_id="r1")
    q = landing.quarantine(zone, b, reason="bad file", details={"kind": "test"})
    assert Path(rec.path).read_bytes() == b"x,y\n1,2\n"
    assert q.read_bytes() == b"x,y\n3,4\n"
    assert q.with_name(q.name + ".reason.txt").read_text() == "bad file\n"
    assert sorted(p.name for p in zone.landing.iterdir()) == [".c.csv.part"]
    assert [r.name for r in landing.list_accepted(zone)] == ["a.csv"]
    assert a.sha256[:16] in landing.accepted_hashes(zone)


def test_quarantine_never_overwrites(tmp_path: Path) -> None:
    zone = landing.Zone(tmp_path).ensure()
    for i in range(2):
        (zone.landing / "same.csv").write_bytes(b"same")
        (f,) = landing.list_landed(zone)
        landing.quarantine(zone, f, reason=f"reason {i}", details={})
    files = sorted(p.name for p in zone.quarantine.iterdir() if not p.name.endswith((".txt", ".json")))
    assert len(files) == 2


def test_accepted_file_without_sidecar_is_still_found(tmp_path: Path) -> None:
    """A crash between the rename and the sidecar write loses nothing."""
    zone = landing.Zone(tmp_path).ensure()
    stored = zone.accepted / "0123456789abcdef__f.csv"
    stored.write_bytes(b"x\n1\n")
    (rec,) = landing.list_accepted(zone)
    assert rec.name == "f.csv" and rec.sha256 == landing.file_sha256(stored)


def test_fingerprint_depends_on_content_set_not_order() -> None:
    mk = lambda s: landing.AcceptedFile("p", "n", s, 1, "", "")  # noqa: E731
    assert landing.data_fingerprint([mk("a"), mk("b")]) == landing.data_fingerprint([mk("b"), mk("a")])
    assert landing.data_fingerprint([mk("a")]) != landing.data_fingerprint([mk("a"), mk("b")])
