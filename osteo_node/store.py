"""The file store: the only code that writes files under the node's data folder.

Received instances live under `incoming/`, results under `outputs/`. File names are derived from
a SHA-256 of the SOP Instance UID, never from DICOM values directly, so a crafted UID such as
`../../x` cannot escape the store. Writes are durable: temporary file, fsync, atomic rename,
fsync of the folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import StoreError


def _fsync_dir(path: Path) -> None:
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

    @staticmethod
    def _key(uid: str) -> str:
        return hashlib.sha256(uid.encode("utf-8")).hexdigest()

    def incoming_path(self, sop_instance_uid: str) -> str:
        key = self._key(sop_instance_uid)
        return f"incoming/{key[:2]}/{key}.dcm"

    def output_path(self, source_uid: str, device_uid: str, kind: str) -> str:
        if kind not in ("sr", "sc"):
            raise ValueError(f"kind must be 'sr' or 'sc', got {kind!r}")
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
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"could not write {relative}: {exc.strerror}") from exc
        return target

    def delete(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
