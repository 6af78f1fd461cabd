"""A size-bounded local file that critical records spill to while the broker is away.

Owns: `SpillFile`: appending records as JSON lines, reading them back oldest first, and
forgetting them only once they were sent (the read position is kept in a file beside it, so
a restart resends rather than loses; a receiver dedupes by event id).
Must not: be called on the event loop; every method does blocking file I/O and is meant for
`asyncio.to_thread`. It never decides what spills; the sink does.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import orjson

from proxy.kafka.records import Record

logger = logging.getLogger(__name__)


def _line(rec: Record) -> bytes:
    return orjson.dumps(
        {
            "topic": rec.topic,
            "key": None if rec.key is None else base64.b64encode(rec.key).decode(),
            "value": rec.value.decode(),
            "headers": [[k, v.decode()] for k, v in rec.headers],
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _record(line: bytes) -> Record:
    d = orjson.loads(line)
    key = d["key"]
    return Record(
        topic=d["topic"],
        key=None if key is None else base64.b64decode(key),
        value=d["value"].encode(),
        headers=tuple((k, v.encode()) for k, v in d["headers"]),
        critical=True,
    )


class SpillFile:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._offset_path = self.path.with_name(self.path.name + ".offset")
        self.size = self.path.stat().st_size if self.path.exists() else 0
        self.offset = self._read_offset()
        self.corrupt = 0  # lines skipped because they could not be read back

    def _read_offset(self) -> int:
        try:
            offset = int(self._offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0
        return offset if 0 <= offset <= self.size else 0

    @property
    def pending_bytes(self) -> int:
        return self.size - self.offset

    def append(self, records: list[Record]) -> int:
        """Append what fits under `max_bytes`; returns how many records were written."""
        data: list[bytes] = []
        room = self.max_bytes - self.pending_bytes
        for rec in records:
            line = _line(rec)
            if len(line) > room:
                break
            room -= len(line)
            data.append(line)
        if data:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                f.write(b"".join(data))
                f.flush()
                os.fsync(f.fileno())
            self.size = self.path.stat().st_size
        return len(data)

    def read(self, max_records: int) -> tuple[list[Record], int]:
        """Up to `max_records` unsent records, oldest first, and the position after them."""
        if self.pending_bytes <= 0:
            return [], self.offset
        records: list[Record] = []
        pos = self.offset
        with self.path.open("rb") as f:
            f.seek(pos)
            while len(records) < max_records:
                line = f.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):  # cut short by a crash mid-write
                    pos += len(line)
                    self.corrupt += 1
                    break
                pos += len(line)
                try:
                    records.append(_record(line))
                except (ValueError, KeyError, TypeError):
                    self.corrupt += 1
                    logger.error("spill file %s: unreadable line skipped", self.path)
        return records, pos

    def commit(self, pos: int) -> None:
        """Records before `pos` were sent: forget them; an emptied file starts over."""
        if pos >= self.size:
            self.path.unlink(missing_ok=True)
            self._offset_path.unlink(missing_ok=True)
            self.size = self.offset = 0
            return
        self.offset = pos
        tmp = self._offset_path.with_name(self._offset_path.name + ".tmp")
        tmp.write_text(str(pos))
        tmp.replace(self._offset_path)
