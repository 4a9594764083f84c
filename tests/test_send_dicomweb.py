"""DICOMweb destinations: STOW-RS to Orthanc's DICOMweb plugin, with auth, re-sends and an outage."""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from test_tls import pki  # noqa: F401  (the test CA and certificates fixture)

from osteo_node.config import Destination
from osteo_node.errors import SendError
from osteo_node.send import echo, send_files

from conftest import free_port
from dicom_tools import storescu
from node_process import NodeProcess, jobs, jobs_done, wait_for, write_config
from ohif import HttpsProxy
from orthanc import Orthanc

pytestmark = pytest.mark.integration

USER, PASSWORD = "node", "pw-7c1d0e5b"


def dicomweb(pacs: Orthanc, **keys: object) -> Destination:
    return Destination.model_validate({"name": "web", "kind": "dicomweb", "url": pacs.dicomweb_url, **keys})


def files() -> list[Path]:
    return [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]


def test_stow_stores_once_and_a_resend_keeps_one_copy(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True).start()
    try:
        destination = dicomweb(pacs)
        echo(destination, "OSTEO_NODE")  # the QIDO-RS probe of `osteo-node check`
        send_files(destination, files(), "OSTEO_NODE")
        send_files(destination, files(), "OSTEO_NODE")  # a re-send after a lost answer
        stored = Counter(i["SOPInstanceUID"] for i in pacs.instances())
        expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files()}
        assert stored == Counter({uid: 1 for uid in expected})
    finally:
        pacs.stop()


def test_basic_auth_and_refusals_name_no_secret(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True, http_user=(USER, PASSWORD)).start()
    try:
        good = dicomweb(pacs, auth={"user": USER, "password": PASSWORD})
        echo(good, "OSTEO_NODE")
        send_files(good, files()[:1], "OSTEO_NODE")
        assert len(pacs.get("/instances")) == 1
        for auth, secret in (({"user": USER, "password": "wrong-password-1"}, "wrong-password-1"),
                             ({"token": "bearer-token-42"}, "bearer-token-42"), (None, PASSWORD)):
            bad = dicomweb(pacs, auth=auth)
            for attempt in (partial(echo, bad, "OSTEO_NODE"),
                            partial(send_files, bad, files(), "OSTEO_NODE")):
                with pytest.raises(SendError) as info:
                    attempt()
                assert "HTTP 401" in str(info.value) and "authentication refused" in str(info.value)
                assert secret not in str(info.value) and PASSWORD not in str(info.value)
        assert len(pacs.get("/instances")) == 1
    finally:
        pacs.stop()


def test_https_verifies_the_server_certificate(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    """verify_tls (default true) checks the server's certificate against `ca`, else the system
    trust store; a certificate from another CA is refused; verify_tls = false is the opt-out.
    The HTTPS server is a TLS proxy in front of Orthanc (Debian's Orthanc 1.10 drops HTTPS
    connections here), with basic auth passed through."""
    pacs = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True, http_user=(USER, PASSWORD)).start()
    auth = {"user": USER, "password": PASSWORD}
    try:
        with HttpsProxy(pacs.http_port, free_port(), pki / "server.crt", pki / "server.key") as proxy:
            url = f"{proxy.url}/dicom-web"
            send_files(dicomweb(pacs, url=url, auth=auth, ca=str(pki / "ca.crt")), files()[:1], "OSTEO_NODE")
            for keys in ({}, {"ca": str(pki / "rogue.crt")}):  # system trust store; another CA
                with pytest.raises(SendError, match="STOW-RS failed: SSLError"):
                    send_files(dicomweb(pacs, url=url, auth=auth, **keys), files(), "OSTEO_NODE")
            send_files(dicomweb(pacs, url=url, auth=auth, verify_tls=False), files(), "OSTEO_NODE")
        assert len(pacs.get("/instances")) == 2
    finally:
        pacs.stop()


def test_unreachable_server_is_a_send_error(tmp_path: Path) -> None:
    destination = Destination.model_validate(
        {"name": "web", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web"})
    with pytest.raises(SendError, match=r"'web' \(DICOMweb http://127\.0\.0\.1:\d+/dicom-web\): "
                                        r"STOW-RS failed: ConnectionError"):
        send_files(destination, files(), "OSTEO_NODE")
    with pytest.raises(SendError, match="QIDO-RS query failed: ConnectionError"):
        echo(destination, "OSTEO_NODE")


@pytest.mark.e2e
@pytest.mark.slow
def test_results_reach_a_dicomweb_pacs_after_an_outage(tmp_path: Path, database_url: str,
                                                      e2e_bundle: str) -> None:
    """Orthanc down: the send job retries with backoff; Orthanc back: SR, SC and KOS delivered
    exactly once."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port, dicomweb=True, http_user=(USER, PASSWORD))
    config = write_config(tmp_path, database_url=database_url, bundle=e2e_bundle, pacs_port=0,
                          dicom={"port": node_port}, destinations=[{
                              "name": "vna", "kind": "dicomweb", "url": pacs.dicomweb_url,
                              "send": ["sr", "sc", "kos"], "auth": {"user": USER, "password": PASSWORD}}])
    node = NodeProcess(config).start()
    try:
        chest = Path(get_testdata_file("RG1_UNCR.dcm"))
        assert storescu(node.port, chest) == ["Success"]
        wait_for(lambda: any(j.kind == "send" and j.attempts >= 2 and j.state == "queued"
                             for j in jobs(database_url)), 120, "failed send attempts")
        (send,) = [j for j in jobs(database_url) if j.kind == "send"]
        assert "STOW-RS failed: ConnectionError" in (send.last_error or "")
        pacs.start()
        wait_for(lambda: jobs_done(database_url, 3), 120, "delivery once the PACS is back")
        classes = Counter(i["SOPClassUID"] for i in pacs.instances())
        assert classes == Counter({"1.2.840.10008.5.1.4.1.1.88.34": 1,  # SR
                                   "1.2.840.10008.5.1.4.1.1.7": 1,  # SC
                                   "1.2.840.10008.5.1.4.1.1.88.59": 1})  # KOS
        sr = next(i for i in pacs.instances() if i["SOPClassUID"].endswith(".88.34"))
        assert sr["StudyInstanceUID"] == str(dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    finally:
        node.stop()
        pacs.stop()
    assert PASSWORD not in node.log()


@pytest.mark.slow
def test_check_probes_a_dicomweb_destination_without_showing_its_secret(tmp_path: Path) -> None:
    """`osteo-node check` runs the QIDO-RS probe: FAIL with the reason while Orthanc is down or the
    password is wrong, ok once both are right; the password is never printed."""
    import subprocess
    import sys

    pacs = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True, http_user=(USER, PASSWORD))

    def check(password: str) -> subprocess.CompletedProcess[str]:
        config = write_config(tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite3", bundle="reference",
                              pacs_port=0, destinations=[{"name": "vna", "kind": "dicomweb",
                                                          "url": pacs.dicomweb_url,
                                                          "auth": {"user": USER, "password": password}}])
        return subprocess.run([sys.executable, "-m", "osteo_node.cli", "check", "--config", str(config)],
                              capture_output=True, text=True, timeout=300)

    down = check(PASSWORD)
    assert "FAIL destination vna (QIDO-RS): destination 'vna' (DICOMweb " in down.stdout, down.stdout
    assert "QIDO-RS query failed: ConnectionError" in down.stdout
    pacs.start()
    try:
        refused, ok = check("wrong-password-2"), check(PASSWORD)
    finally:
        pacs.stop()
    assert "FAIL destination vna (QIDO-RS)" in refused.stdout and "HTTP 401" in refused.stdout
    assert "ok   destination vna (QIDO-RS)" in ok.stdout, ok.stdout
    for result in (down, refused, ok):
        assert PASSWORD not in result.stdout + result.stderr
        assert "wrong-password-2" not in result.stdout + result.stderr
