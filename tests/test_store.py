"""File store: durable writes, names never taken from DICOM values."""

from __future__ import annotations

from pathlib import Path

import pytest

from osteo_node.errors import StoreError
from osteo_node.store import FileStore


def test_crafted_uid_cannot_escape(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    relative = store.incoming_path("../../x")
    written = store.write(relative, b"data")
    assert (tmp_path / "store") in written.parents and written.read_bytes() == b"data"
    assert ".." not in relative and "x" != written.stem
    with pytest.raises(StoreError, match="outside the store"):
        store.absolute("../escape.dcm")


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    path = store.output_path("1.2.3", "4.5.6", "sr")
    store.write(path, b"one")
    store.write(path, b"two")
    assert store.absolute(path).read_bytes() == b"two"
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.output_path("1.2.3", "4.5.6", "sc") != path
    with pytest.raises(ValueError, match="kind must be"):
        store.output_path("1.2.3", "4.5.6", "xx")
