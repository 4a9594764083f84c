"""The `Node` lifecycle object: what `serve`/`receive`/`work`, the bench and the tests start."""

from __future__ import annotations

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification  # type: ignore[attr-defined]

from osteo_node import migrate
from osteo_node.config import Settings, parse_settings
from osteo_node.db import make_engine
from osteo_node.errors import SchemaError
from osteo_node.node import Node
from osteo_node.queue import INFER

from conftest import free_port
from dicom_tools import storescu, synthetic_dx
from node_process import wait_for


def settings(folder: Path, *, database_url: str = "", **dicom: object) -> Settings:
    return parse_settings({"node": {"data_dir": str(folder / "var")},
                           "database": {"url": database_url},
                           "dicom": {"port": free_port(), **dicom},
                           "metrics": {"port": 0, "receiver_port": 0},
                           "storage": {"min_free_disk_mb": 0}}, folder)


def echo(port: int) -> bool:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEO_NODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def test_a_receiving_node_answers_while_started_and_releases_everything(tmp_path: Path) -> None:
    config = settings(tmp_path)
    with Node(config, receive=True, work=False) as node:
        assert echo(config.dicom.port)
        assert node.runtime.queue.counts()["queued"] == 0  # migrated the empty database
        with pytest.raises(RuntimeError, match="no worker"):
            node.worker  # noqa: B018 - the property raises
    assert not echo(config.dicom.port)  # the receiver's port is closed
    with pytest.raises(RuntimeError, match="start"):
        node.runtime  # noqa: B018
    with Node(config, receive=True, work=False):  # the same port again: nothing was left behind
        assert echo(config.dicom.port)


def test_a_node_that_cannot_start_leaves_nothing_running(tmp_path: Path) -> None:
    from alembic import command

    config = settings(tmp_path)
    engine = make_engine(config.database_url)
    with engine.begin() as connection:  # an older osteo-node's database
        alembic = migrate.alembic_config(config.database_url)
        alembic.attributes["connection"] = connection
        command.upgrade(alembic, "0001")
    engine.dispose()
    node = Node(config, receive=True, work=False)
    with pytest.raises(SchemaError, match="osteo-node db upgrade --config FILE"):
        node.start()
    assert node.server is None and not echo(config.dicom.port)


def _received_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("osteo_received_total", {"outcome": outcome}) or 0.0


def _send_each_over_its_own_association(port: int, files: list[Path]) -> list[str]:
    with ThreadPoolExecutor(len(files)) as pool:
        return [status for statuses in pool.map(lambda f: storescu(port, f), files) for status in statuses]


def _open_counts(node: Node) -> list[int]:
    """Open associations of the node's process and of its second receiver process."""
    assert node.receivers is not None
    return [node.receivers.counts.open(index) for index in (0, 1)]


@pytest.mark.integration
def test_receiver_processes_take_the_associations_in_turn(database_url: str, tmp_path: Path) -> None:
    """`dicom.processes = 2`: the node's process accepts every connection and hands each to the
    process with the fewest open associations, so four associations open at once are two in each
    (the kernel's SO_REUSEPORT hash, used before, put 1 + 3 or 4 + 0 as often as 2 + 2). Every
    image is stored once, each process counts its associations closed again, and the node's one
    metrics counter includes what the other process received."""
    config = settings(tmp_path, database_url=database_url, processes=2)
    files = [synthetic_dx(tmp_path / f"dx-{i}.dcm", sex="F", size=64, seed=i) for i in range(4)]
    before = _received_total("eligible")
    with Node(config, receive=True, work=False) as node:
        receivers = node.receivers
        assert receivers is not None and node.server is not None
        ae = AE(ae_title="TEST_SCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        ae.acse_timeout = ae.network_timeout = 10
        associations = [ae.associate("127.0.0.1", config.dicom.port, ae_title="OSTEO_NODE") for _ in files]
        assert all(assoc.is_established for assoc in associations)
        assert _open_counts(node) == [2, 2]
        for assoc, path in zip(associations, files, strict=True):
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
            assoc.release()
        wait_for(lambda: _open_counts(node) == [0, 0], 30, "associations counted closed", 0.05)
        assert node.runtime.queue.counts(INFER)["queued"] == 4
        assert not node.server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    assert [totals.get("eligible") for totals in receivers.received().values()] == [2.0]
    assert _received_total("eligible") - before == 4  # this process's counter has them all


@pytest.mark.integration
def test_a_receiver_process_that_dies_is_started_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL of the second receiver process: associations opened at once, while it is dead or
    starting again, go to the node's process; then it serves its share again."""
    config = settings(tmp_path, processes=2, max_associations=16)
    files = [synthetic_dx(tmp_path / f"dx-{i}.dcm", sex="F", size=64, seed=i) for i in range(16)]
    with Node(config, receive=True, work=False) as node:
        receivers = node.receivers
        assert receivers is not None
        (first,) = receivers.received()
        os.kill(first, signal.SIGKILL)
        assert _send_each_over_its_own_association(config.dicom.port, files[:8]) == ["Success"] * 8
        wait_for(lambda: len(receivers.received()) == 2, 60, "a receiver process started again", 0.05)
        receivers.check()  # healthy again
        assert f"receiver process {first} exited with code -9; starting another" in caplog.text
        assert _send_each_over_its_own_association(config.dicom.port, files[8:]) == ["Success"] * 8
        assert node.runtime.queue.counts(INFER)["queued"] == 16
        wait_for(lambda: _open_counts(node) == [0, 0], 30, "associations counted closed", 0.05)
    second = [pid for pid in receivers.received() if pid != first]
    assert receivers.received()[second[0]].get("eligible", 0) > 0  # the new process took some


def test_one_receiver_process_does_not_share_its_port(tmp_path: Path) -> None:
    """The port is bound without SO_REUSEPORT, so that a second node started by mistake on the
    same port fails to start instead of taking half the associations."""
    config = settings(tmp_path)
    with Node(config, receive=True, work=False) as node:
        assert node.server is not None and node.receivers is None
        assert not node.server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        with pytest.raises(OSError, match="Address already in use"):
            Node(settings(tmp_path / "second", port=config.dicom.port), receive=True, work=False).start()
