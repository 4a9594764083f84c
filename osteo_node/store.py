"""The file store: the only code that writes files under the node's data folder.

Received instances live under `incoming/`, results under `outputs/`. File names are derived from
a SHA-256 of the SOP Instance UID, never from DICOM values directly, so a crafted UID such as
`../../x` cannot escape the store. Writes are durable: temporary file, fsync, atomic rename,
fsync of the folder. `adopt` moves a finished file written elsewhere (the receiver's streamed
C-STORE data set) into the store with the same guarantee, renaming instead of copying, and syncs
the folder while the database records the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .errors import StoreError

T = TypeVar("T")

#: Threads that fsync a folder while the caller goes on (`adopt`'s `alongside`); fsync releases
#: the GIL. One per association in flight is plenty.
_FOLDER_SYNC = ThreadPoolExecutor(max_workers=16, thread_name_prefix="folder-fsync")


def _fsync(path: Path | str) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Durable files under `root`; paths handed out are relative to `root` (what the database keeps)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("incoming", "outputs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("incoming", "outputs"):  # all 256 buckets up front: no write has to make one
            buckets = [self.root / sub / f"{i:02x}" for i in range(256)]
            missing = [folder for folder in buckets if not folder.is_dir()]
            for folder in missing:
                folder.mkdir(exist_ok=True)
            if missing:
                _fsync(self.root / sub)

    @staticmethod
    def _key(uid: str) -> str:
        return hashlib.sha256(uid.encode("utf-8")).hexdigest()

    def incoming_path(self, sop_instance_uid: str) -> str:
        key = self._key(sop_instance_uid)
        return f"incoming/{key[:2]}/{key}.dcm"

    def output_path(self, source_uid: str, device_uid: str, kind: str) -> str:
        if kind not in ("sr", "sc", "kos"):
            raise ValueError(f"kind must be 'sr', 'sc' or 'kos', got {kind!r}")
        key = self._key(f"{source_uid}|{device_uid}")
        return f"outputs/{key[:2]}/{key}.{kind}.dcm"

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise StoreError(f"path {relative!r} is outside the store")
        return path

    def write(self, relative: str, data: bytes | memoryview) -> Path:
        """Write `data` durably at `relative`; returns the absolute path."""
        target = self.absolute(relative)
        try:
            self._folder(target.parent)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync(target.parent)
        except OSError as exc:
            raise StoreError(f"could not write {relative}: {exc.strerror}") from exc
        return target

    def adopt(self, relative: str, source: Path, alongside: Callable[[], T]) -> T:
        """Move the finished file `source` durably to `relative`, running `alongside()` (the
        database transaction that records it) while the folder's fsync is under way; returns
        what `alongside()` returns once both are done.

        The same guarantee as `write` without copying the bytes when `source` is on the store's
        filesystem (the receiver has pynetdicom stream each data set into a temporary file while
        it arrives, receive.py): the file's bytes are fsynced before its rename, so the name never
        points at bytes that are not on disk; the folder's fsync, which makes the rename durable,
        and the commit then wait for the disk together: one cache flush less per image (a flush
        costs ~4 ms on the bench's disk; docs/performance.md). After a power loss between the two,
        the database can hold an instance whose file is missing (never a file with missing bytes):
        the sender, which got no answer, sends it again and the receiver stores it again
        (receive.py). From another filesystem (a tmpfs /tmp, a bind mount) the file is copied in.
        When `alongside()` raises, the file is removed again and the error propagates.
        """
        target = self.absolute(relative)
        try:
            self._folder(target.parent)
            _fsync(source)
            try:
                os.replace(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_in(source, target)
        except OSError as exc:
            raise StoreError(f"could not store {relative}: {exc.strerror}") from exc
        folder_synced = _FOLDER_SYNC.submit(_fsync, target.parent)
        try:
            result = alongside()
        except BaseException:
            folder_synced.exception()  # let the fsync finish before the file goes
            target.unlink(missing_ok=True)
            raise
        try:
            folder_synced.result()
        except OSError as exc:
            raise StoreError(f"could not store {relative}: {exc.strerror}") from exc
        return result

    @staticmethod
    def _folder(folder: Path) -> None:
        """Make sure a bucket folder (e.g. incoming/ab/) exists durably: one removed since the
        store was opened is made again and its entry in the folder above fsynced (the file's own
        folder fsync does not cover it)."""
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        _fsync(folder.parent)

    def _copy_in(self, source: Path, target: Path) -> None:
        """Copy `source` to `target` through tmp/: copy, fsync, rename (the caller fsyncs the folder)."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            _fsync(tmp)
            os.replace(tmp, target)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise

    def sweep_tmp(self, older_than_s: float) -> int:
        """Delete the files left in tmp/ by writes and transfers that were cut short (a crash, a
        killed process): partial copies of patient data. Only files untouched for `older_than_s`
        seconds go; a write or a transfer in progress touches its file all the time. Returns how
        many were deleted."""
        cutoff = time.time() - older_than_s
        removed = 0
        with os.scandir(self.root / "tmp") as entries:
            for entry in entries:
                try:
                    stale = entry.stat(follow_symlinks=False).st_mtime < cutoff
                    if entry.is_file(follow_symlinks=False) and stale:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:  # renamed into the store or deleted meanwhile
                    continue
        return removed

    def delete(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
