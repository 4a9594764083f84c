"""A real Orthanc PACS for tests: own storage, loopback ports, REST helpers."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, free_port, require_tool

GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"
#: Debian package orthanc-dicomweb: QIDO-RS, WADO-RS, STOW-RS under /dicom-web/, WADO-URI under /wado.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def require_dicomweb_plugin() -> str:
    """The DICOMweb plugin's path; skip when missing (fail instead under CI=true)."""
    if not Path(DICOMWEB_PLUGIN).exists():
        message = f"{DICOMWEB_PLUGIN} missing (Debian: apt-get install orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(f"{message}; CI must have it")
        pytest.skip(message)
    return DICOMWEB_PLUGIN


class Orthanc:
    """Start with `start()`, stop with `stop()`; `dicom_port` and AE `ORTHANC` receive results.

    `dicomweb`: load the DICOMweb plugin; its base URL is `dicomweb_url`. `http_user`: require
    HTTP basic authentication with this (user, password) on the REST API and DICOMweb.
    A stopped Orthanc starts again on the same ports and storage.
    """

    def __init__(self, folder: Path, node_port: int, node_ae: str = "OSTEO_NODE", *,
                 dicomweb: bool = False, http_user: tuple[str, str] | None = None) -> None:
        self.folder = folder
        self.dicomweb = dicomweb
        self.http_user = http_user
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.node_port = node_port
        self.node_ae = node_ae
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        (self.folder / "log").mkdir(exist_ok=True)
        config = {
            "Name": "osteo-test-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAssociationCloseDelay": 0,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"node": [self.node_ae, "127.0.0.1", self.node_port]},
            "Plugins": [GDCM_PLUGIN] if Path(GDCM_PLUGIN).exists() else [],
            "StableAge": 1,
        }
        if self.dicomweb:
            config["Plugins"].append(require_dicomweb_plugin())
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                  "WadoRoot": "/wado/", "Ssl": False}
        if self.http_user is not None:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {self.http_user[0]: self.http_user[1]}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        return path

    def start(self) -> "Orthanc":
        tool = require_tool("Orthanc")
        config = self._config()
        self.process = subprocess.Popen(
            [tool, f"--logdir={self.folder / 'log'}", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; "
                                   f"see {self.folder / 'log'}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                         method=method)
        if self.http_user is not None:
            token = base64.b64encode(":".join(self.http_user).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance's simplified tags."""
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def upload(self, path: Path) -> str:
        """Store a file through REST (as if a modality had sent it); returns the Orthanc id."""
        return str(self.post("/instances", path.read_bytes())["ID"])

    def file(self, orthanc_id: str) -> bytes:
        return bytes(self.get(f"/instances/{orthanc_id}/file"))

    def route_to_node(self, orthanc_id: str) -> dict[str, Any]:
        """PACS -> node routing: C-STORE the instance to the node as a PACS would."""
        return dict(self.post("/modalities/node/store", {"Resources": [orthanc_id], "Synchronous": True}))
