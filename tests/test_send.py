"""The sender's connections to DCMTK `storescp` as the PACS."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from osteo_node.bench.dcmtk import Dcmtk
from osteo_node.config import Destination
from osteo_node.send import _associate, send_files

from conftest import require_tool

pytestmark = pytest.mark.integration


def test_sender_turns_nagle_off_and_stores(tmp_path: Path) -> None:
    """With Nagle on, each C-STORE's last data segment waits for the peer's delayed ACK of the
    command PDU (~40 ms per object here, 108 -> 33 ms for an SR + SC); the sender turns it off."""
    require_tool("storescp")
    received = tmp_path / "pacs"
    received.mkdir()
    with Dcmtk.find().storescp_running(received) as port:
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        ae = AE(ae_title="OSTEO_NODE")
        ae.add_requested_context(Verification)
        assoc = _associate(ae, destination)
        try:
            raw = assoc.dul.socket.socket
            assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            assoc.release()
        send_files(destination, [Path(get_testdata_file("CT_small.dcm"))], "OSTEO_NODE")
    assert len(list(received.iterdir())) == 1
