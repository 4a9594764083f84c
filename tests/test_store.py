"""File store: durable writes, names never taken from DICOM values."""

from __future__ import annotations

import threading
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


def test_bucket_folders_are_made_durable_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from osteo_node import store as module

    synced: list[Path] = []
    real_fsync = module._fsync
    monkeypatch.setattr(module, "_fsync", lambda path: (synced.append(Path(path)), real_fsync(path)))
    store = FileStore(tmp_path)
    assert synced == [tmp_path / "incoming", tmp_path / "outputs"]  # once each, for 256 buckets each
    assert len(list((tmp_path / "incoming").iterdir())) == len(list((tmp_path / "outputs").iterdir())) == 256
    synced.clear()
    FileStore(tmp_path)  # opened again: nothing to make, nothing to flush
    first = store.incoming_path("1.2.3")
    store.write(first, b"one")
    bucket = store.absolute(first).parent
    assert synced == [bucket]  # the file's folder only
    synced.clear()
    bucket.joinpath(Path(first).name).unlink()
    bucket.rmdir()  # a bucket removed while the node runs is made again, durably
    source = tmp_path / "streamed.dcm"
    source.write_bytes(b"two")
    store.adopt(first, source, lambda: None)
    assert synced == [tmp_path / "incoming", source, bucket]


def test_adopt_renames_a_file_on_the_same_filesystem(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    source = tmp_path / "streamed.dcm"
    source.write_bytes(b"dataset")
    inode = source.stat().st_ino
    target = store.absolute(store.incoming_path("1.2.3"))
    store.adopt(store.incoming_path("1.2.3"), source, lambda: None)
    assert target.read_bytes() == b"dataset" and target.stat().st_ino == inode  # moved, not copied
    assert not source.exists() and list((tmp_path / "store" / "tmp").iterdir()) == []


def test_adopt_copies_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from osteo_node import store as store_module

    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(src).parent == tmp_path:  # the streamed file "lives on another mount"
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", replace)
    store = FileStore(tmp_path / "store")
    source = tmp_path / "streamed.dcm"
    source.write_bytes(b"dataset")
    target = store.absolute(store.incoming_path("1.2.3"))
    store.adopt(store.incoming_path("1.2.3"), source, lambda: None)
    assert target.read_bytes() == b"dataset" and source.exists()  # pynetdicom deletes its own file
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    with pytest.raises(StoreError, match="could not store"):
        store.adopt(store.incoming_path("1.2.4"), tmp_path / "missing.dcm", lambda: None)


def test_adopt_records_while_the_folder_syncs_and_undoes_a_failed_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's bytes are fsynced before its rename; the folder's fsync (which makes the rename
    durable) overlaps the database commit (`alongside`), so both wait for one cache flush."""
    from osteo_node import store as module

    store = FileStore(tmp_path / "store")
    relative = store.incoming_path("1.2.3")
    target = store.absolute(relative)
    recording = threading.Event()
    synced: list[Path] = []
    real_fsync = module._fsync

    def fsync(path: Path | str) -> None:
        if Path(path).is_dir():
            assert recording.wait(5), "the folder's fsync did not overlap the commit"
        synced.append(Path(path))
        real_fsync(path)

    def record() -> int:
        assert target.read_bytes() == b"dataset"  # renamed in before the commit
        recording.set()
        return 7

    monkeypatch.setattr(module, "_fsync", fsync)
    source = tmp_path / "streamed.dcm"
    source.write_bytes(b"dataset")
    assert store.adopt(relative, source, record) == 7
    assert synced == [source, target.parent]

    def database_down() -> None:
        raise ConnectionError("database gone")

    source.write_bytes(b"other")
    with pytest.raises(ConnectionError):
        store.adopt(store.incoming_path("1.2.4"), source, database_down)
    assert not store.absolute(store.incoming_path("1.2.4")).exists()
