"""A shard's durable update log: every accepted push, appended before its ack (DESIGN §4.3, §5).

A shard that crashes between checkpoints would lose the pushes it acknowledged since the last one;
Ray restarts it, it reloads its partitions from the newest checkpoint (param_server/actor.py), then
replays this log, so no acknowledged update is lost. One directory per shard id, beside the run's
checkpoints, holding **segments**:

    base-init.log   pushes applied on top of the state the shard was launched with (no checkpoint)
    base-<N>.log    pushes applied on top of checkpoint step-<N>

The shard writes a record for each push it admits, before the push is queued and acknowledged
(write + flush to the OS: a killed process loses nothing; `fsync=True` also survives a power
cut, at a cost per push). At a checkpoint the shard stops admitting, drains, `rotate`s to a new
segment `base-<N>` and writes its partitions. A checkpoint only exists once the driver has written
its manifest, so the older segment is kept until a newer checkpoint is valid; on restart from
checkpoint N the shard replays every segment whose base is >= N (a `base-<M>`, M > N, is left by
a checkpoint whose manifest was never written), oldest first. (worker_id, seq) makes replay
exactly once: the apply queue drops a seq it has already accepted, and a client re-sending an
unacknowledged push to the restarted shard reuses its seq.

Record layout (little-endian): magic b"UMLG", u32 payload bytes, u32 crc32 of the payload; payload
= i64 worker_id, i64 seq, i64 step, f64 lr, u16 table-name bytes, the name (UTF-8), i64 n, i32 d_v,
rows int64 [n], grads float32 [n, d_v]. A torn or corrupt tail (a crash mid-append: never acked)
ends the readable log and is cut off before new records are appended.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"UMLG"
_HEAD = struct.Struct("<4sII")  # magic, payload bytes, crc32
_FIXED = struct.Struct("<qqqdH")  # worker_id, seq, step, lr, name bytes
_SHAPE = struct.Struct("<qi")  # n, d_v
_SEGMENT_RE = re.compile(r"^base-(init|0|[1-9][0-9]*)\.log$")
INIT = -1  # base of the segment over the launch state (no checkpoint)


@dataclass(frozen=True)
class LogRecord:
    """One accepted push, as the shard admitted it."""

    table: str
    worker_id: int
    seq: int
    step: int
    lr: float
    rows: np.ndarray  # int64 [n] global rows (may repeat)
    grads: np.ndarray  # float32 [n, d_v]


def encode_record(rec: LogRecord) -> bytes:
    """One record's bytes (header + payload)."""
    name = rec.table.encode("utf-8")
    rows = np.ascontiguousarray(rec.rows, dtype="<i8")
    grads = np.ascontiguousarray(rec.grads, dtype="<f4")
    n, d_v = grads.shape
    if rows.shape != (n,):
        raise ValueError(f"rows [{rows.shape}] and grads [{grads.shape}] disagree")
    payload = b"".join((_FIXED.pack(rec.worker_id, rec.seq, rec.step, rec.lr, len(name)), name,
                        _SHAPE.pack(n, d_v), rows.tobytes(), grads.tobytes()))
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> LogRecord:
    worker_id, seq, step, lr, name_len = _FIXED.unpack_from(payload, 0)
    off = _FIXED.size
    table = payload[off:off + name_len].decode("utf-8")
    off += name_len
    n, d_v = _SHAPE.unpack_from(payload, off)
    off += _SHAPE.size
    rows = np.frombuffer(payload, dtype="<i8", count=n, offset=off).astype(np.int64)
    off += 8 * n
    grads = np.frombuffer(payload, dtype="<f4", count=n * d_v, offset=off).reshape(n, d_v).astype(np.float32)
    if off + 4 * n * d_v != len(payload):
        raise ValueError("record length does not match its shape")
    return LogRecord(table, worker_id, seq, step, lr, rows, grads)


def read_segment(path: Path) -> tuple[list[LogRecord], int]:
    """(records, bytes of the valid prefix) of one segment; a torn or corrupt tail is left out."""
    data = path.read_bytes()
    out, off = [], 0
    while off + _HEAD.size <= len(data):
        magic, size, crc = _HEAD.unpack_from(data, off)
        end = off + _HEAD.size + size
        if magic != MAGIC or end > len(data):
            break
        payload = data[off + _HEAD.size:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            out.append(_decode_payload(payload))
        except (ValueError, struct.error, UnicodeDecodeError):
            break
        off = end
    if off != len(data):
        logger.warning("update log %s: %d bytes of torn or corrupt tail ignored", path, len(data) - off)
    return out, off


def segment_name(base: int) -> str:
    """File name of the segment over checkpoint `base` (INIT: over the launch state)."""
    return "base-init.log" if base == INIT else f"base-{base}.log"


class UpdateLog:
    """The segments of one shard's log in `directory`; appends go to the newest segment.

    Args:
        directory: this shard's log directory (created).
        fsync: fsync after every append (survives a machine crash; a process crash needs only the
            flush that always happens).
    """

    def __init__(self, directory: str | Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file: object | None = None
        self._base: int | None = None
        self.appended = 0  # records appended by this process

    def segments(self) -> list[tuple[int, Path]]:
        """[(base, path)] of the segments present, oldest base first (INIT before any step)."""
        out = []
        for p in self.directory.iterdir():
            m = _SEGMENT_RE.match(p.name)
            if m:
                out.append((INIT if m.group(1) == "init" else int(m.group(1)), p))
        return sorted(out)

    def replay_records(self, base: int) -> Iterator[LogRecord]:
        """Records to apply on top of checkpoint `base` (INIT: the launch state), in order."""
        for b, path in self.segments():
            if b >= base:
                yield from read_segment(path)[0]

    def open(self, base: int) -> None:
        """Start appending: to the newest segment if its base is >= `base` (torn tail cut off; the
        shard has just replayed it), else to a new segment `base`. Segments older than `base` go."""
        segs = [(b, p) for b, p in self.segments() if b >= base]
        if segs:
            b, path = segs[-1]
            _, valid = read_segment(path)
            with open(path, "r+b") as f:
                f.truncate(valid)
            self._switch(b)
        else:
            self._switch(base)
        self.prune(base)

    def append(self, rec: LogRecord) -> None:
        """Write one record and flush it to the OS (and fsync, if configured) before returning."""
        if self._file is None:
            raise RuntimeError("update log is not open")
        f = self._file
        f.write(encode_record(rec))  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]
        if self.fsync:
            os.fsync(f.fileno())  # type: ignore[attr-defined]
        self.appended += 1

    def rotate(self, base: int) -> None:
        """Appends from now on go to segment `base` (the shard is about to write checkpoint `base`)."""
        if base != self._base:
            self._switch(base)

    def prune(self, valid_base: int) -> list[Path]:
        """Delete segments older than `valid_base` (the newest checkpoint with a manifest)."""
        doomed = [p for b, p in self.segments() if b < valid_base and b != self._base]
        for p in doomed:
            p.unlink()
        return doomed

    @property
    def base(self) -> int | None:
        """Base of the segment being appended to (None: not open)."""
        return self._base

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # type: ignore[attr-defined]
            self._file = None

    def _switch(self, base: int) -> None:
        self.close()
        self._file = open(self.directory / segment_name(base), "ab")  # noqa: SIM115 (held open)
        self._base = base
        logger.info("update log %s: appending to %s", self.directory, segment_name(base))
