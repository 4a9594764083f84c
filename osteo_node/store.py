"""The file store: the only code that writes files under the node's data folder.

Received instances live under `incoming/`, results under `outputs/`. File names are derived from
a SHA-256 of the SOP Instance UID, never from DICOM values directly, so a crafted UID such as
`../../x` cannot escape the store. Writes are durable: temporary file, fsync, atomic rename,
fsync of the folder. `adopt` moves a finished file written elsewhere (the receiver's streamed
C-STORE data set) into the store with the same guarantee, renaming instead of copying.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import StoreError


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

    def adopt(self, relative: str, source: Path) -> Path:
        """Move the finished file `source` durably to `relative`; returns the absolute path.

        The same guarantee as `write` (fsync of the file, atomic rename, fsync of the folder)
        without copying the bytes when `source` is on the store's filesystem. The receiver has
        pynetdicom stream each data set into a temporary file while it arrives (receive.py).
        From another filesystem (a tmpfs /tmp, a bind mount) the file is copied in like `write`.
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
                return self._copy_in(source, target)
            _fsync(target.parent)
        except OSError as exc:
            raise StoreError(f"could not store {relative}: {exc.strerror}") from exc
        return target

    @staticmethod
    def _folder(folder: Path) -> None:
        """Make sure a bucket folder (e.g. incoming/ab/) exists durably: one removed since the
        store was opened is made again and its entry in the folder above fsynced (the file's own
        folder fsync does not cover it)."""
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        _fsync(folder.parent)

    def _copy_in(self, source: Path, target: Path) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            _fsync(tmp)
            os.replace(tmp, target)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(target.parent)
        return target

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
