"""Backup files under the backup directory: where they may be, and how their bytes are laid out.

A backup file is the ExportBackup message stream on disk: the magic line
`RAPTORFLOW-BACKUP 1\\n`, then each ExportBackupResponse (header, chunks,
manifest) as a 4-byte big-endian length and the serialized message. The chunks
keep their own SHA-256 and the manifest its checksum, so a restore from a file
checks the same things as a streamed restore.

Paths come from callers: every one is resolved (symlinks included) and must
stay inside the backup directory. A backup is written to a hidden temporary
file in the target's directory and linked to its name only when complete, so
a crash or a failure never leaves a half-written backup under a real name, and
an existing file is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from raptorflow.data.server.errors import Code, ServiceError, invalid_argument
from raptorflow.data.v1 import maintenance_service_pb2

pb = maintenance_service_pb2
log = logging.getLogger(__name__)
T = TypeVar("T")

MAGIC = b"RAPTORFLOW-BACKUP 1\n"
# A backup job's path may hold `{time}`: the UTC time the run started, so a scheduled
# job names a new file each run (second resolution: "20240131T020000Z").
TIME_PLACEHOLDER = "{time}"
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_LENGTH_BYTES = 4
# A chunk holds at most 4 MiB of COPY data; a header lists every table's columns. Anything
# longer than this is not a message this server wrote, and is not read into memory.
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class BackupPath:
    """A checked path: the file it names and the path as the caller gave it, normalized."""

    root: Path
    """The backup directory, resolved."""
    file: Path
    relative: str


def backup_dir_not_set() -> ServiceError:
    return ServiceError(
        Code.FAILED_PRECONDITION,
        "BACKUP_DIR_NOT_SET",
        "this server has no backup directory (RAPTORFLOW_BACKUP_DIR)",
    )


def _outside(field_path: str, path: str) -> ServiceError:
    return invalid_argument(
        field_path,
        f"path {path[:200]!r} leaves the backup directory",
        reason="PATH_OUTSIDE_BACKUP_DIR",
    )


def resolve(backup_dir: str, path: str, field_path: str) -> BackupPath:
    """The file `path` names under `backup_dir`, or the error that refuses it.

    Refused: no backup directory (FAILED_PRECONDITION), an empty path, and any
    path that is absolute, has a `..` part or resolves (through symlinks)
    outside the directory (INVALID_ARGUMENT, PATH_OUTSIDE_BACKUP_DIR).
    """
    if not backup_dir:
        raise backup_dir_not_set()
    if not path:
        raise invalid_argument(field_path, "a path is required", reason="PATH_REQUIRED")
    if "\x00" in path:
        raise invalid_argument(field_path, "a path cannot contain NUL", reason="INVALID_PATH")
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts:
        raise _outside(field_path, path)
    try:
        base = Path(backup_dir).resolve()
        # Non-strict: the file (and its directories) may not exist yet; every part that
        # does exist, symlinks included, is followed.
        file = (base / relative).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise _outside(field_path, path) from None
    if file == base or not file.is_relative_to(base):
        raise _outside(field_path, path)
    return BackupPath(base, file, relative.as_posix())


def is_template(path: str) -> bool:
    """Whether `path` names a new file each run (it holds `{time}`)."""
    return TIME_PLACEHOLDER in path


def expand(template: str, moment: dt.datetime, field_path: str) -> str:
    """`template` with each `{time}` replaced by `moment` in UTC as YYYYMMDDTHHMMSSZ.

    INVALID_ARGUMENT (INVALID_PATH_TEMPLATE) for any other `{` or `}`: reserved for
    placeholders this server may add, so a path does not change meaning later.
    """
    if moment.tzinfo is None:
        raise ValueError("moment must be timezone-aware")
    others = template.replace(TIME_PLACEHOLDER, "")
    if "{" in others or "}" in others:
        raise invalid_argument(
            field_path,
            f"path {template[:200]!r} has a brace that is not part of {TIME_PLACEHOLDER}, "
            "the only placeholder",
            reason="INVALID_PATH_TEMPLATE",
        )
    return template.replace(TIME_PLACEHOLDER, moment.astimezone(dt.UTC).strftime(_TIME_FORMAT))


async def locate(backup_dir: str, path: str, field_path: str) -> BackupPath:
    """`resolve`, off the event loop: following symlinks reads the file system."""
    return await asyncio.to_thread(resolve, backup_dir, path, field_path)


async def exists(path: BackupPath) -> bool:
    """Whether the file exists (off the event loop); ServiceError if that cannot be told."""
    return await _in_thread(path, path.file.exists)


def _about_file(code: Code, reason: str, path: BackupPath, message: str) -> ServiceError:
    return ServiceError(code, reason, message, metadata={"path": path.relative[:200]})


def already_exists(path: BackupPath, field_path: str) -> ServiceError:
    return _about_file(
        Code.ALREADY_EXISTS,
        "BACKUP_FILE_EXISTS",
        path,
        f"{field_path}: {path.relative!r} already exists",
    )


def not_found(path: BackupPath, field_path: str) -> ServiceError:
    return _about_file(
        Code.NOT_FOUND,
        "BACKUP_FILE_NOT_FOUND",
        path,
        f"{field_path}: no backup file {path.relative!r}",
    )


def malformed_file(path: BackupPath, description: str) -> ServiceError:
    return invalid_argument(
        "", f"{path.relative!r} is not a backup file: {description}", reason="MALFORMED_BACKUP"
    )


def file_error(path: BackupPath, error: OSError) -> ServiceError:
    """A failed file operation as a status of its own (a bare OSError would read as the
    database being unreachable)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceError(
            Code.RESOURCE_EXHAUSTED,
            "BACKUP_DIR_FULL",
            f"no space left in the backup directory for {path.relative!r}",
        )
    return _about_file(
        Code.FAILED_PRECONDITION,
        "BACKUP_FILE_ERROR",
        path,
        f"{path.relative!r}: {error.strerror or type(error).__name__}",
    )


async def _in_thread(path: BackupPath, work: Callable[..., T], *args: object) -> T:
    """Runs blocking file work off the event loop; OSError becomes a ServiceError."""
    try:
        return await asyncio.to_thread(work, *args)
    except OSError as error:
        raise file_error(path, error) from None


class BackupWriter:
    """Writes one backup file: a temporary file first, linked to its name by `commit`."""

    def __init__(self, path: BackupPath, field_path: str) -> None:
        self._path = path
        self._field_path = field_path
        # Fixed length, whatever the target's: any name the file system takes must work,
        # and one of 255 bytes leaves no room for a prefix and a suffix around it.
        self._temporary = path.file.with_name(f".rf-{secrets.token_hex(8)}.partial")
        self._file: BinaryIO | None = None
        self._sha256 = hashlib.sha256()
        self.bytes = 0

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    async def open(self) -> None:
        self._file = await _in_thread(self._path, self._open)
        await self._write(MAGIC, b"")

    def _open(self) -> BinaryIO:
        if self._path.file.exists():
            raise already_exists(self._path, self._field_path)
        self._path.file.parent.mkdir(parents=True, exist_ok=True)
        # A directory on the way may have been replaced by a symlink since the path was
        # checked: check the resolved parent again before creating anything in it.
        if not self._path.file.parent.resolve().is_relative_to(self._path.root):
            raise _outside(self._field_path, self._path.relative)
        return open(self._temporary, "xb")

    async def write(self, message: pb.ExportBackupResponse) -> None:
        data = message.SerializeToString()
        await self._write(len(data).to_bytes(_LENGTH_BYTES, "big"), data)

    async def _write(self, prefix: bytes, data: bytes) -> None:
        assert self._file is not None
        self._sha256.update(prefix)
        self._sha256.update(data)
        self.bytes += len(prefix) + len(data)
        await _in_thread(self._path, _write_all, self._file, prefix, data)

    async def commit(self) -> None:
        """Makes the file durable and gives it its name; ALREADY_EXISTS if the name was taken."""
        assert self._file is not None
        file, self._file = self._file, None
        try:
            await _in_thread(self._path, _sync_and_close, file)
            await _in_thread(self._path, self._link)
        finally:
            await asyncio.to_thread(self._remove_temporary)

    def _link(self) -> None:
        try:
            # A hard link never replaces an existing file (rename would, silently).
            os.link(self._temporary, self._path.file)
        except FileExistsError:
            raise already_exists(self._path, self._field_path) from None
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A file system without hard links: rename, after a last look for the name.
            if self._path.file.exists():
                raise already_exists(self._path, self._field_path) from None
            os.rename(self._temporary, self._path.file)
        directory = os.open(self._path.file.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def abort(self) -> None:
        """Removes the temporary file; the target name was never taken."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(file.close)
        await asyncio.to_thread(self._remove_temporary)

    def _remove_temporary(self) -> None:
        try:
            self._temporary.unlink(missing_ok=True)
        except OSError as error:  # the backup failed anyway; the leftover is hidden
            log.warning("could not remove %s: %s", self._temporary, error)


def _write_all(file: BinaryIO, prefix: bytes, data: bytes) -> None:
    file.write(prefix)
    file.write(data)


def _sync_and_close(file: BinaryIO) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    finally:
        file.close()


class BackupReader:
    """Reads the messages of one backup file, checking its framing (not its checksums)."""

    def __init__(self, path: BackupPath, field_path: str) -> None:
        self._path = path
        self._field_path = field_path
        self._sha256 = hashlib.sha256()
        self.bytes = 0
        self.size = 0

    @property
    def sha256(self) -> str:
        """SHA-256 of the bytes read so far, lowercase hex: the whole file's, once read."""
        return self._sha256.hexdigest()

    async def messages(self) -> AsyncGenerator[pb.ExportBackupResponse, None]:
        file = await _in_thread(self._path, self._open)
        try:
            magic = await _in_thread(self._path, file.read, len(MAGIC))
            self._count(magic)
            if magic != MAGIC:
                raise malformed_file(self._path, "it does not start with the backup magic line")
            while True:
                record = await _in_thread(self._path, self._read_record, file)
                if record is None:
                    return
                try:
                    message = pb.ExportBackupResponse.FromString(record)
                except Exception:  # protobuf's DecodeError; the file is damaged
                    raise malformed_file(self._path, "a message does not parse") from None
                yield message
        finally:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(file.close)

    def _open(self) -> BinaryIO:
        # The path was resolved (symlinks followed) and checked when the job was made;
        # the name may have been swapped since. O_NOFOLLOW refuses a symlink put there,
        # O_NONBLOCK keeps a FIFO's open from waiting for a writer for ever, and the
        # descriptor's own fstat (not the name's) decides whether it is a regular file.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            descriptor = os.open(self._path.file, flags)
        except (FileNotFoundError, NotADirectoryError):
            raise not_found(self._path, self._field_path) from None
        except OSError as error:
            if error.errno == errno.ELOOP:  # a symlink, under O_NOFOLLOW
                raise not_found(self._path, self._field_path) from None
            raise
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise not_found(self._path, self._field_path)
            # Reads of a regular file never wait, so O_NONBLOCK changes nothing from here.
            file = os.fdopen(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise
        self.size = info.st_size
        return file

    def _read_record(self, file: BinaryIO) -> bytes | None:
        prefix = file.read(_LENGTH_BYTES)
        if not prefix:
            return None
        length = int.from_bytes(prefix, "big")
        if len(prefix) < _LENGTH_BYTES or length > MAX_MESSAGE_BYTES:
            raise malformed_file(self._path, "a message length is damaged")
        record = file.read(length)
        if len(record) < length:
            raise malformed_file(self._path, "it ends inside a message")
        self._count(prefix)
        self._count(record)
        return record

    def _count(self, data: bytes) -> None:
        self._sha256.update(data)
        self.bytes += len(data)
