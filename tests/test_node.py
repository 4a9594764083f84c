"""The `Node` lifecycle object: what `serve`/`receive`/`work`, the bench and the tests start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import free_port
from osteo_node import migrate
from osteo_node.config import Settings, parse_settings
from osteo_node.db import make_engine
from osteo_node.errors import SchemaError
from osteo_node.node import Node


def settings(folder: Path) -> Settings:
    return parse_settings({"node": {"data_dir": str(folder / "var")},
                           "dicom": {"port": free_port()},
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
