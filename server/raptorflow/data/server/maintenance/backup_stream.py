"""The backup message stream: COPY data cut into checked chunks on the way out, and
checked message by message on the way in.

A backup is one BackupHeader, then BackupChunk messages, then one
BackupManifest. Each chunk carries at most `chunk_bytes` of one table's binary
COPY stream, its SHA-256 and its position in the whole backup (gap-free, from
0); a table's chunks follow each other, and even a table without rows has one
(the COPY header and trailer). The manifest counts rows per table, chunks and
bytes, and gives the SHA-256 of all the chunks' data in order. `Incoming`
checks all of that while the data flows on into COPY, so nothing needs to be
held in memory whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from raptorflow.data.server.errors import Code, ServiceError, invalid_argument
from raptorflow.data.server.maintenance.progress import Progress
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2

pb = maintenance_service_pb2

FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
# The largest chunk_bytes a request may ask for (the documented range).
MAX_CHUNK_BYTES = 4 << 20
# gRPC's default receive limit, which raw stubs, grpcurl and other languages' clients keep.
DEFAULT_GRPC_MESSAGE_BYTES = 4 << 20
# Room in a message for all but the chunk's data: the table name (at most 63 bytes), the
# sequence, the SHA-256 and the fields' tags and lengths take under 150 bytes.
MESSAGE_OVERHEAD_BYTES = 1024
# The most COPY data one chunk carries, so every message fits the default receive limit.
LARGEST_CHUNK_DATA = DEFAULT_GRPC_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES
# A message of a backup stream, as ExportBackup sends it or RestoreBackup receives it:
# both carry the same `part` oneof.
Part = pb.ExportBackupResponse | pb.RestoreBackupRequest


def malformed(description: str, field_path: str = "") -> ServiceError:
    return invalid_argument(field_path, description, reason="MALFORMED_BACKUP")


def data_loss(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(Code.DATA_LOSS, reason, message, metadata=metadata)


def chunk_bytes(requested: int, max_message_bytes: int) -> int:
    """The most COPY data per chunk for an export request; INVALID_ARGUMENT outside the bounds.

    Any size in the documented range is accepted, but a chunk never carries more than
    LARGEST_CHUNK_DATA, so its message fits gRPC's default 4 MiB receive limit, nor more
    than the server's own message limit (`max_message_bytes`) allows.
    """
    if requested == 0:
        requested = DEFAULT_CHUNK_BYTES
    elif not MIN_CHUNK_BYTES <= requested <= MAX_CHUNK_BYTES:
        raise invalid_argument(
            "chunk_bytes",
            f"must be from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} (or 0), not {requested}",
            reason="OUT_OF_RANGE",
        )
    largest = min(LARGEST_CHUNK_DATA, max_message_bytes - MESSAGE_OVERHEAD_BYTES)
    return max(MIN_CHUNK_BYTES, min(requested, largest))


@dataclass
class Report:
    """Per-table reports of a backup or restore, and a job's progress when it is a job."""

    progress: Progress | None = None
    position: Callable[[], tuple[int, int]] = lambda: (0, 0)
    """(done, total) bytes of the job's file, for progress."""
    tables: list[job_pb2.TableReport] = field(default_factory=list)
    _phase: str = ""
    _started: float = 0.0

    async def start(self, table: str) -> None:
        self._started = time.perf_counter()
        await self.enter(f"copy {table}")

    async def enter(self, phase: str) -> None:
        self._phase = phase
        await self.advance()

    async def advance(self) -> None:
        if self.progress is not None:
            done, total = self.position()
            await self.progress.report(
                self._phase, done=done, total=total, unit=job_pb2.PROGRESS_UNIT_BYTES
            )

    def finish(self, table: str, action: str, rows: int) -> None:
        self.tables.append(
            job_pb2.TableReport(
                table=table,
                action=action,
                rows=rows,
                duration_ms=(time.perf_counter() - self._started) * 1000,
            )
        )


@dataclass
class Outgoing:
    """Position and checksum of an export so far."""

    sequence: int = 0
    data_bytes: int = 0
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)


@dataclass(frozen=True)
class Ended:
    """The last item of an export's queue: how the export ended."""

    error: BaseException | None = None


class Chunker:
    """Cuts one table's COPY stream into chunks; waits while the reader is behind."""

    def __init__(
        self,
        table: str,
        size: int,
        state: Outgoing,
        queue: asyncio.Queue[pb.ExportBackupResponse | Ended],
        report: Report,
    ) -> None:
        self._table = table
        self._size = size
        self._state = state
        self._queue = queue
        self._report = report
        self._buffer = bytearray()
        self._chunks = 0

    async def write(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= self._size:
            with memoryview(buffer) as view:  # released before the buffer shrinks
                piece = bytes(view[: self._size])
            # Cheap: CPython drops a bytearray's head without moving the rest.
            del buffer[: self._size]
            await self._emit(piece)

    async def flush(self) -> None:
        # Every table has at least one chunk: even no rows have a COPY header and trailer.
        if self._buffer or not self._chunks:
            piece = bytes(self._buffer)
            self._buffer.clear()
            await self._emit(piece)

    async def _emit(self, data: bytes) -> None:
        state = self._state
        # Filled in place: passing a chunk to the response's constructor would copy it.
        message = pb.ExportBackupResponse()
        chunk = message.chunk
        chunk.table = self._table
        chunk.sequence = state.sequence
        chunk.data = data
        chunk.sha256 = hashlib.sha256(data).digest()
        state.sequence += 1
        state.data_bytes += len(data)
        state.sha256.update(data)
        self._chunks += 1
        await self._queue.put(message)
        await self._report.advance()


class Incoming:
    """A backup stream read message by message: order, sequence and checksums checked."""

    def __init__(self, messages: AsyncIterator[Part]) -> None:
        self._messages = messages
        self._pending: Part | None = None
        self._ended = False
        self.sequence = 0
        self.data_bytes = 0
        self._sha256 = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    async def _next(self) -> Part | None:
        if self._pending is not None:
            part, self._pending = self._pending, None
            return part
        if self._ended:
            return None
        try:
            return await anext(self._messages)
        except StopAsyncIteration:
            self._ended = True
            return None

    async def first(self) -> Part:
        """The first message, which must carry the header."""
        part = await self._next()
        if part is None:
            raise malformed("the backup stream is empty")
        if part.WhichOneof("part") != "header":
            raise malformed("a backup stream starts with its header")
        return part

    async def table_data(self, table: str, report: Report) -> AsyncGenerator[bytes, None]:
        """The COPY data of `table`: its chunks, which must come next, checked one by one."""
        chunks = 0
        while True:
            part = await self._next()
            if part is None:
                raise malformed("the backup stream ended before its manifest")
            if part.WhichOneof("part") == "chunk" and part.chunk.table == table:
                chunks += 1
                yield self._checked(part.chunk)
                await report.advance()
                continue
            if not chunks:
                raise malformed(f"the chunks of table {table!r} do not come where due")
            self._pending = part
            return

    def _checked(self, chunk: pb.BackupChunk) -> bytes:
        if chunk.sequence != self.sequence:
            raise malformed(
                f"chunk {chunk.sequence} came where chunk {self.sequence} was due",
                "chunk.sequence",
            )
        data = chunk.data
        if hashlib.sha256(data).digest() != chunk.sha256:
            raise data_loss(
                "CHECKSUM_MISMATCH",
                f"chunk {chunk.sequence} (table {chunk.table[:200]!r}) does not match its SHA-256",
                table=chunk.table[:200],
                sequence=str(chunk.sequence),
            )
        self.sequence += 1
        self.data_bytes += len(data)
        self._sha256.update(data)
        return data

    async def manifest(self) -> pb.BackupManifest:
        """The manifest, which must come after the last table's chunks and end the stream."""
        part = await self._next()
        if part is None:
            raise malformed("the backup stream ended before its manifest")
        kind = part.WhichOneof("part")
        if kind != "manifest":
            what = {"chunk": f"a chunk of table {part.chunk.table[:200]!r}", "header": "a header"}
            raise malformed(
                f"{what.get(kind or '', 'an empty message')} came where the manifest was due"
            )
        if await self._next() is not None:
            raise malformed("messages follow the manifest")
        return part.manifest


def check_manifest(
    manifest: pb.BackupManifest, incoming: Incoming, counts: Sequence[pb.BackupTableCount]
) -> None:
    """Refuses a restore whose data or row counts differ from what its manifest promises."""
    if [t.table for t in manifest.tables] != [c.table for c in counts]:
        raise malformed("the manifest does not list the header's tables", "manifest.tables")
    if (
        manifest.sha256 != incoming.sha256
        or manifest.chunk_count != incoming.sequence
        or manifest.data_bytes != incoming.data_bytes
    ):
        raise data_loss(
            "CHECKSUM_MISMATCH",
            "the backup's data does not match its manifest (checksum, chunks or bytes)",
        )
    for expected, loaded in zip(manifest.tables, counts, strict=True):
        if expected.row_count != loaded.row_count:
            raise data_loss(
                "ROW_COUNT_MISMATCH",
                f"table {loaded.table!r}: the manifest counts {expected.row_count} rows, "
                f"{loaded.row_count} were loaded",
                table=loaded.table,
            )
