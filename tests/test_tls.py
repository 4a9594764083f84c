"""DICOM TLS: the receiver with DCMTK `storescu +tls`, the sender with DCMTK `storescp +tls`."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from osteo_node import migrate
from osteo_node.config import DicomSettings, TlsSettings, parse_settings
from osteo_node.db import make_engine
from osteo_node.eligibility import EligibilityRules
from osteo_node.errors import ConfigError, SendError
from osteo_node.node import Node
from osteo_node.queue import INFER, Queue
from osteo_node.receive import ReceiveLimits, start_receiver
from osteo_node.send import echo, send_files
from osteo_node.store import FileStore

from conftest import free_port, require_tool
from dicom_tools import storescu, synthetic_dx
from node_process import wait_for

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1, a client certificate, and a rogue one."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-subj", "/CN=osteo test CA", "-days", "2", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.crt", "-subj", "/CN=rogue", "-days", "2", cwd=d)
    return d


@pytest.fixture
def tls_receiver(pki: Path, tmp_path: Path) -> Iterator[tuple[int, FileStore]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate.upgrade(engine)
    port = free_port()
    tls = TlsSettings(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")
    store = FileStore(tmp_path / "store")
    server = start_receiver(DicomSettings(port=port, tls=tls), Queue(engine), store,
                            EligibilityRules(), ReceiveLimits(min_free_bytes=0))
    yield port, store
    server.shutdown()
    engine.dispose()


def test_receiver_accepts_only_tls_with_a_trusted_client_certificate(
    pki: Path, tls_receiver: tuple[int, FileStore]
) -> None:
    port, _ = tls_receiver
    chest = Path(get_testdata_file("RG1_UNCR.dcm"))
    trusted = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    assert storescu(port, chest, extra=trusted) == ["Success"]
    assert storescu(port, chest) != ["Success"]  # plain TCP refused
    rogue = ("+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"), "+cf", str(pki / "ca.crt"))
    assert storescu(port, chest, extra=rogue) != ["Success"]  # certificate not signed by our CA


def test_sender_stores_over_tls_to_dcmtk_storescp(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen(
        [require_tool("storescp"), "+tls", str(pki / "server.key"), str(pki / "server.crt"),
         "+cf", str(pki / "ca.crt"), "-rc", "-aet", "ARCHIVE", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        raw = {"destinations": [{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                                 "port": port, "tls": {"ca": "ca.crt", "cert": "client.crt",
                                                       "key": "client.key"}}]}
        (destination,) = parse_settings(raw, pki).destinations  # relative paths: config folder
        for _ in range(50):
            try:
                echo(destination, "OSTEO_NODE")
                break
            except SendError:
                time.sleep(0.1)
        send_files(destination, [Path(get_testdata_file("RG1_UNCR.dcm"))], "OSTEO_NODE")
        assert len(list(out.iterdir())) == 1
        plain = destination.model_copy(update={"tls": None})
        with pytest.raises(SendError, match="association rejected or no answer"):
            send_files(plain, [Path(get_testdata_file("RG1_UNCR.dcm"))], "OSTEO_NODE", timeout_s=5)
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def test_tls_config_errors_name_the_key(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.tls\.cert: Value error, file not found"):
        parse_settings({"dicom": {"tls": {"cert": "missing.crt", "key": "server.key"}}}, pki)
    with pytest.raises(ConfigError, match="tls.cert and tls.key must be given together"):
        parse_settings({"dicom": {"tls": {"cert": "server.crt"}}}, pki)


def test_receiver_processes_each_do_their_own_tls(pki: Path, tmp_path: Path) -> None:
    """`dicom.processes = 2` with TLS: the node's process hands each connection over before the
    handshake, and the process that serves it does the handshake. Four TLS associations open at
    once are two in each process and all store; plain TCP (DCMTK storescu) is refused; every
    connection, the refused ones too, is counted closed again."""
    raw = {"node": {"data_dir": str(tmp_path / "var")}, "metrics": {"port": 0, "receiver_port": 0},
           "storage": {"min_free_disk_mb": 0},
           "dicom": {"port": free_port(), "processes": 2,
                     "tls": {"cert": "server.crt", "key": "server.key", "ca": "ca.crt"}}}
    config = parse_settings(raw, pki)
    files = [synthetic_dx(tmp_path / f"dx-{i}.dcm", sex="F", size=64, seed=i) for i in range(4)]
    client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    client.check_hostname = False  # the server certificate names 127.0.0.1 as an IP SAN
    client.load_cert_chain(pki / "client.crt", pki / "client.key")
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.acse_timeout = ae.network_timeout = 10
    with Node(config, receive=True, work=False) as node:
        receivers = node.receivers
        assert receivers is not None

        def open_counts() -> list[int]:
            return [receivers.counts.open(index) for index in (0, 1)]

        associations = [ae.associate("127.0.0.1", config.dicom.port, ae_title="OSTEO_NODE",
                                     tls_args=(client, None)) for _ in files]
        assert all(assoc.is_established for assoc in associations)
        assert open_counts() == [2, 2]
        for assoc, path in zip(associations, files, strict=True):
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
            assoc.release()
        assert storescu(config.dicom.port, files[0]) != ["Success"]  # plain TCP
        assert storescu(config.dicom.port, files[1]) != ["Success"]
        wait_for(lambda: open_counts() == [0, 0], 30, "connections counted closed", 0.05)
        assert sum(receivers.counts.handed[index] for index in (0, 1)) == 6
        assert node.runtime.queue.counts(INFER)["queued"] == 4
    assert [totals.get("eligible") for totals in receivers.received().values()] == [2.0]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_peer_that_never_finishes_the_tls_handshake_holds_nothing_up(pki: Path, tmp_path: Path,
                                                                         processes: int) -> None:
    """Plain TCP connections that send nothing to a TLS receiver: a TLS association from another
    peer is served while they wait (the handshake runs in each connection's own thread; pynetdicom
    does it in the thread that accepts, without a timeout), and they are closed when the ACSE
    timeout runs out; with several processes, counted closed."""
    raw = {"node": {"data_dir": str(tmp_path / "var")}, "metrics": {"port": 0, "receiver_port": 0},
           "storage": {"min_free_disk_mb": 0},
           "dicom": {"port": free_port(), "processes": processes, "acse_timeout_s": 10.0,
                     "tls": {"cert": "server.crt", "key": "server.key", "ca": "ca.crt"}}}
    config = parse_settings(raw, pki)
    chest = synthetic_dx(tmp_path / "dx.dcm", sex="F", size=64, seed=0)
    trusted = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    with Node(config, receive=True, work=False) as node:
        silent = [socket.create_connection(("127.0.0.1", config.dicom.port)) for _ in range(2)]
        try:
            assert storescu(config.dicom.port, chest, extra=trusted) == ["Success"]
            for peer in silent:  # still waiting: the association above did not wait for them
                peer.setblocking(False)
                with pytest.raises(BlockingIOError):
                    peer.recv(1)
            for peer in silent:
                peer.settimeout(30)
                assert peer.recv(1) == b""  # closed by the node at the ACSE timeout
        finally:
            for peer in silent:
                peer.close()
        if node.receivers is not None:
            counts = node.receivers.counts
            wait_for(lambda: [counts.open(index) for index in (0, 1)] == [0, 0], 15,
                     "connections counted closed", 0.05)
            assert sum(counts.handed[index] for index in (0, 1)) == 3
