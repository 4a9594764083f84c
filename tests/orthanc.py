"""A real Orthanc PACS for tests: own storage, loopback ports, REST helpers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port, require_tool

GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"


class Orthanc:
    """Start with `start()`, stop with `stop()`; `dicom_port` and AE `ORTHANC` receive results."""

    def __init__(self, folder: Path, node_port: int, node_ae: str = "OSTEO_NODE") -> None:
        self.folder = folder
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

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                         method=method)
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
