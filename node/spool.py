"""The spool: received instances written durably before they are acknowledged.

Layout: ``<root>/<study uid>/<series uid>/<sop instance uid>.dcm``; UIDs are validated
(:func:`node.uids.is_valid_uid`) before they become part of a path. A write goes to a temporary
file in ``<root>/.tmp`` on the same file system, is fsynced, renamed over its final name
atomically, and the directory is fsynced, so an acknowledged instance survives a crash or
``kill -9``; a crash mid-write leaves only a temporary file, which :meth:`Spool.clean_temporary`
removes at start-up.

Errors: :class:`SpoolError` (base) -> :class:`SpoolFullError` (free space below the watermark or
ENOSPC), :class:`UnsafePathError` (a UID that is not a UID).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from node.uids import is_valid_uid


class SpoolError(Exception):
    """The spool could not store an instance."""


class SpoolFullError(SpoolError):
    def __init__(self, free_bytes: int, total_bytes: int) -> None:
        super().__init__(f"spool below its free-space watermark ({free_bytes} of {total_bytes} bytes free)")
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes


class UnsafePathError(SpoolError):
    def __init__(self, value: str) -> None:
        super().__init__("a UID that is not digits and dots cannot name a spool path")
        self.value = value


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    directory: Path
    min_free_bytes: int = 2 * 1024**3
    min_free_fraction: float = 0.05


@dataclass(frozen=True, slots=True)
class StoredFile:
    relative_path: str  # relative to the spool root, "/" separated
    size_bytes: int
    sha256: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Spool:
    def __init__(self, config: SpoolConfig) -> None:
        self.config = config
        self.root = config.directory
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def disk_usage(self) -> tuple[int, int]:
        """(free bytes, total bytes) of the spool's file system."""
        usage = shutil.disk_usage(self.root)
        return usage.free, usage.total

    def below_watermark(self) -> bool:
        free, total = self.disk_usage()
        return free < self.config.min_free_bytes or free < self.config.min_free_fraction * total

    def check_space(self) -> None:
        if self.below_watermark():
            free, total = self.disk_usage()
            raise SpoolFullError(free, total)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise UnsafePathError(uid)
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path(self, relative_path: str) -> Path:
        return self.root / relative_path

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Write ``data`` durably at the instance's path (replacing an older copy atomically)."""
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        self.check_space()
        try:
            write_durably(self.root / relative, data, tmp_dir=self._tmp, stop=self.root)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                free, total = self.disk_usage()
                raise SpoolFullError(free, total) from exc
            raise SpoolError(f"could not write the instance to the spool: {exc.strerror}") from exc
        return StoredFile(relative, len(data), sha256_hex(data))

    def read(self, relative_path: str) -> bytes:
        return (self.root / relative_path).read_bytes()

    def discard(self, relative_path: str) -> None:
        """Remove a file that was written but never acknowledged (its database row could not be
        written), and the series and study directories it leaves empty. Raises OSError."""
        final = self.root / relative_path
        final.unlink(missing_ok=True)
        directory = final.parent
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                break  # not empty (another instance of the series), or already gone
            directory = directory.parent

    def probe_write(self) -> None:
        """Create, write and remove a small file in the spool's temporary folder (readiness);
        raises OSError when the spool cannot be written."""
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix=".probe-", suffix=".part")
        try:
            os.write(fd, b"fracnode")
        finally:
            os.close(fd)
            Path(name).unlink(missing_ok=True)

    def clean_temporary(self) -> int:
        """Remove partial writes left by a crash; they were never acknowledged."""
        removed = 0
        for part in self._tmp.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed


def write_durably(final: Path, data: bytes, *, tmp_dir: Path | None = None, stop: Path | None = None) -> None:
    """Write ``data`` at ``final`` so that after return it survives a crash: temporary file on
    the same file system, fsync, atomic rename, fsync of the directory (and of every directory
    created for it). Raises OSError."""
    created = _make_dirs(final.parent, stop=stop)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir or final.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    for directory in created:
        _fsync_dir(directory.parent)


def _make_dirs(directory: Path, stop: Path | None) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    missing: list[Path] = []
    current = directory
    while not current.exists() and current != stop:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
