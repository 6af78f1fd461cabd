from __future__ import annotations

from pathlib import Path

from proxy.kafka.records import Record
from proxy.kafka.spill import SpillFile


def rec(i: int) -> Record:
    return Record(
        topic="t",
        key=f"k{i}".encode(),
        value=b'{"n": %d}' % i,
        headers=(("kind", b"payment.late_success"),),
        critical=True,
    )


def test_records_come_back_in_order_and_are_forgotten_once_committed(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "s.jsonl", 1 << 20)
    assert spill.append([rec(i) for i in range(5)]) == 5
    first, pos = spill.read(3)
    assert first == [rec(0), rec(1), rec(2)]
    spill.commit(pos)
    # A restart resumes where the last commit left off.
    again = SpillFile(tmp_path / "s.jsonl", 1 << 20)
    rest, pos = again.read(10)
    assert rest == [rec(3), rec(4)]
    again.commit(pos)
    assert again.pending_bytes == 0
    assert not (tmp_path / "s.jsonl").exists()


def test_what_does_not_fit_is_refused(tmp_path: Path) -> None:
    one = SpillFile(tmp_path / "probe", 1 << 20)
    one.append([rec(0)])
    size = one.size
    spill = SpillFile(tmp_path / "s.jsonl", size * 2 + 1)
    assert spill.append([rec(1), rec(2), rec(3)]) == 2
    assert spill.append([rec(4)]) == 0
    _, pos = spill.read(1)
    spill.commit(pos)
    assert spill.append([rec(4)]) == 1  # room again once sent


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    spill = SpillFile(path, 1 << 20)
    spill.append([rec(0)])
    with path.open("ab") as f:
        f.write(b'{"topic": "t", "key"')
    again = SpillFile(path, 1 << 20)
    records, pos = again.read(10)
    assert records == [rec(0)]
    assert again.corrupt == 1
    again.commit(pos)
    assert again.pending_bytes == 0
