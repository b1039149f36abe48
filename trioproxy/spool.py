"""The metering spool: request records as JSON lines in an append-only file.

The spool holds every record the database has not acknowledged yet that is no longer in memory: records that
did not fit the writer's queue, batches whose write failed, and whatever was queued when the writer was
cancelled or shut down. The writer replays it into the database (the insert is idempotent by ``request_id``,
so a record replayed twice is stored once) and truncates it only when every record in it has been committed.

Two layers, as in the rest of the package:

* :class:`RecordCodec` is sans-IO: one :class:`~trioproxy.records.RequestRecord` <-> one line of JSON, an
  exact round trip of every field (``Decimal`` as its string, enums by value, the nested ``Usage`` and
  ``CostBreakdown``). Fields are taken from the dataclass definitions, so a field added to a record is spooled
  without touching this module; a field of a type the codec does not know fails loudly at encode time (and in
  the round-trip test).
* :class:`Spool` is the file: synchronous ``append`` (a single ``write``, no fsync: cheap enough for the event
  loop), ``sync`` (fsync, for a worker thread), ``read`` (``pread`` of whole lines, for a worker thread) and
  ``truncate``.

Growth: the spool is not bounded (losing rows is worse than using disk). It grows only while the database is
down or the writer cannot keep up, by roughly 0.5-1 KiB per request; a warning is logged once it exceeds
:data:`SPOOL_WARN_BYTES` and again each time it grows by that much.

Resource handling: one descriptor, opened lazily with ``O_APPEND`` and an exclusive ``flock`` (two processes
sharing a spool would truncate each other's records), released by :meth:`Spool.close`. Appends, ``truncate``
and ``close`` run in the Trio thread; ``sync`` and ``read`` may run in a worker thread concurrently with
appends (an append only adds bytes past the ``end`` that ``read`` was given).

Error handling: a line that does not decode (the torn last line of a crash, a corrupted byte) is skipped with
a warning and never stops a replay. ``OSError`` from the file system propagates to the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import logging
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from trioproxy.errors import TrioProxyError
from trioproxy.records import CostBreakdown, RequestRecord, Usage

logger = logging.getLogger(__name__)

# A spool this large means a long outage or a writer that cannot keep up: worth an operator's attention.
SPOOL_WARN_BYTES = 256 * 1024 * 1024
# Bytes read per pread while replaying; a record line is ~0.5-1 KiB, so one read usually covers a whole batch.
READ_BLOCK = 1024 * 1024
# Bumped when the line format changes incompatibly; lines of another version are skipped with a warning.
FORMAT_VERSION = 1
_VERSION_KEY = "_v"


class SpoolError(TrioProxyError):
    """The spool cannot be used (another process holds it) or a line in it does not decode."""

    status_hint = 500


class RecordCodec:
    """Encode and decode :class:`RequestRecord` as one line of JSON (sans-IO).

    Lines are ASCII (``ensure_ascii``), so a newline can never appear inside one. Unknown keys are ignored and
    missing keys take the dataclass default, so a spool written by a neighbouring version still replays; a
    missing required field or a value of the wrong type is a :class:`SpoolError`.
    """

    def __init__(self) -> None:
        # Resolved once per codec: the records module uses postponed annotations (strings).
        self._hints: dict[type, dict[str, Any]] = {
            cls: typing.get_type_hints(cls) for cls in (RequestRecord, Usage, CostBreakdown)
        }

    def encode(self, record: RequestRecord) -> bytes:
        """One line (ending in ``\\n``) for ``record``; ``TypeError`` for a value the format cannot hold."""
        body = self._encode_value(record)
        body[_VERSION_KEY] = FORMAT_VERSION
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"

    def encode_many(self, records: Sequence[RequestRecord]) -> bytes:
        return b"".join(self.encode(record) for record in records)

    def decode(self, line: bytes) -> RequestRecord:
        """The record in ``line`` (with or without its ``\\n``); :class:`SpoolError` when it is not one."""
        try:
            raw = json.loads(line)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise SpoolError("not a JSON line") from exc
        if not isinstance(raw, dict):
            raise SpoolError("not a JSON object")
        if raw.get(_VERSION_KEY) != FORMAT_VERSION:
            raise SpoolError("unknown spool format version")
        try:
            record = self._decode_value(RequestRecord, raw, "record")
        except OverflowError as exc:  # an integer too large for a float field
            raise SpoolError("a number is out of range") from exc
        assert isinstance(record, RequestRecord)
        return record

    def _encode_value(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value  # json writes repr(), the shortest string that round-trips exactly
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Decimal):
            return str(value)  # exact, keeps the exponent and the sign of zero
        if type(value) in self._hints:
            return {f.name: self._encode_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
        raise TypeError(f"the spool cannot hold a {type(value).__name__}")

    def _decode_value(self, annotation: Any, value: Any, where: str) -> Any:
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if value is None and len(options) < len(typing.get_args(annotation)):
                return None
            if len(options) != 1:
                raise TypeError(f"the spool cannot decode {annotation!r}")
            annotation = options[0]
        if annotation is bool:
            if isinstance(value, bool):
                return value
        elif annotation is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif annotation is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        elif annotation is str:
            if isinstance(value, str):
                return value
        elif annotation is Decimal:
            if isinstance(value, str):
                try:
                    return Decimal(value)
                except InvalidOperation as exc:
                    raise SpoolError(f"{where} is not a decimal") from exc
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            try:
                return annotation(value)
            except ValueError as exc:
                raise SpoolError(f"{where} has an unknown value") from exc
        elif annotation in self._hints:
            if isinstance(value, dict):
                return self._decode_dataclass(annotation, value, where)
        else:
            raise TypeError(f"the spool cannot decode {annotation!r}")
        raise SpoolError(f"{where} has the wrong type")

    def _decode_dataclass(self, cls: type, raw: dict[str, Any], where: str) -> Any:
        hints = self._hints[cls]
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in raw:
                kwargs[f.name] = self._decode_value(hints[f.name], raw[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpoolError(f"{where}.{f.name} is missing")
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class SpoolChunk:
    """What one :meth:`Spool.read` found: decoded records and where the next read starts."""

    records: list[RequestRecord]
    next_offset: int  # just past the last line consumed (decoded or skipped)
    skipped_lines: int  # lines that did not decode


class Spool:
    """The spool file (see the module docstring for the threading rules)."""

    def __init__(
        self,
        path: Path,
        codec: RecordCodec | None = None,
        *,
        warn_bytes: int = SPOOL_WARN_BYTES,
        read_block: int = READ_BLOCK,
    ) -> None:
        self.path = path
        self._codec = codec or RecordCodec()
        self._warn_bytes = warn_bytes
        self._read_block = read_block
        self._fd: int | None = None
        self._size = 0  # bytes of complete lines; only the Trio thread changes it
        self._appends = 0  # generation counter for sync(): appends made so far ...
        self._synced = 0  # ... and how many of them the last fsync covered
        self._next_warning = warn_bytes
        self._torn = False  # a failed append left a fragment without its newline

    @property
    def size(self) -> int:
        """Bytes in the file (every one of them part of a complete line)."""
        return self._size

    @property
    def dirty(self) -> bool:
        """Some append is not fsynced yet."""
        return self._appends != self._synced

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        """Open (creating it and its directory) and lock the file; a no-op when open.

        A file that does not end with a newline was torn by a crash in the middle of a write: a newline is
        appended so the fragment becomes a line of its own (skipped by :meth:`read`) and later appends start
        on a fresh line.
        """
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise SpoolError("the metering spool is in use by another process") from exc
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                logger.warning(
                    "metering spool ends with a torn line (a crash during a write); it will be skipped"
                )
                size += _write_all(fd, b"\n")
                os.fsync(fd)
            if created:
                _fsync_directory(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size
        self._next_warning = (size // self._warn_bytes + 1) * self._warn_bytes
        if size:
            logger.info("metering spool holds %d bytes from an earlier run", size)

    def append(self, records: Sequence[RequestRecord]) -> None:
        """Append ``records`` with one ``write`` (no fsync; see :meth:`sync`). Trio thread only.

        On a failed write (disk full) the partial line is cut off again so the file stays line-aligned, and
        the ``OSError`` propagates: the caller still owns the records. ``TypeError`` or ``ValueError`` (a
        value the format cannot hold) is raised before the file is touched.
        """
        if not records:
            return
        data = self._codec.encode_many(records)  # before touching the file: a TypeError leaves it as it was
        self.open()
        fd = self._fd
        assert fd is not None
        if self._torn:
            data = b"\n" + data  # terminate the fragment a failed write left, so it is a line of its own
        try:
            _write_all(fd, data)
        except OSError:
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                # The fragment stays; read() leaves an unterminated tail alone and the next append ends it.
                self._torn = True
                with contextlib.suppress(OSError):
                    self._size = os.fstat(fd).st_size
            raise
        self._torn = False
        self._size += len(data)
        self._appends += 1
        if self._size >= self._next_warning:
            logger.warning(
                "metering spool is %d MiB: the database is down or slower than the traffic", self._size >> 20
            )
            self._next_warning += self._warn_bytes

    def sync(self) -> None:
        """Make every append made before this call durable (fsync). Safe in a worker thread."""
        generation = self._appends
        fd = self._fd
        if fd is None or generation == self._synced:
            return
        os.fsync(fd)
        self._synced = max(self._synced, generation)

    def read(self, start: int, end: int, max_records: int) -> SpoolChunk:
        """Decode up to ``max_records`` complete lines in ``[start, end)``. Safe in a worker thread.

        Lines that do not decode are skipped with a warning (their offset is logged, never their content). A
        trailing fragment without its newline is left for a later read.
        """
        fd = self._fd
        if fd is None:
            raise SpoolError("the metering spool is not open")
        records: list[RequestRecord] = []
        skipped = 0
        consumed = start  # file offset just past the last complete line handled
        buffer = b""
        read_at = start
        while len(records) < max_records and read_at < end:
            block = os.pread(fd, min(self._read_block, end - read_at), read_at)
            if not block:
                break
            read_at += len(block)
            buffer += block
            lines = buffer.split(b"\n")
            buffer = lines.pop()  # the incomplete tail (b"" when the block ended on a newline)
            for line in lines:
                if len(records) == max_records:
                    break  # the rest of the block is read again next time
                line_offset = consumed
                consumed += len(line) + 1
                if not line.strip():
                    continue
                try:
                    records.append(self._codec.decode(line))
                except SpoolError as exc:
                    skipped += 1
                    logger.warning(
                        "skipped an unreadable metering spool line at byte %d (%d bytes): %s",
                        line_offset,
                        len(line),
                        exc,
                    )
        return SpoolChunk(records=records, next_offset=consumed, skipped_lines=skipped)

    def truncate(self) -> None:
        """Empty the file: call only when every record in it is committed. Trio thread only."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        self._torn = False
        # A crash before this reaches the disk replays committed records again: harmless (idempotent insert).
        self._size = 0
        self._synced = self._appends
        self._next_warning = self._warn_bytes

    def close(self) -> None:
        """Release the descriptor and the lock (appends reopen the file). Trio thread only."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return len(data)


def _fsync_directory(directory: Path) -> None:
    # Without this a power loss right after creating the spool can lose the file itself (its directory entry).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
