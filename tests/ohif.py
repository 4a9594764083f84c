"""The OHIF viewer for tests: its prebuilt `dist/` served on loopback with Orthanc behind it.

OHIF 3.x is a single-page application: every path it routes itself (`/viewer?...`) must answer
with `index.html`, and it reads DICOMweb from the same origin (Orthanc sends no CORS headers).
`OhifServer` serves `dist/` with that fallback, proxies `/dicom-web/` and `/wado/` to Orthanc, and
answers `/app-config.js` with one DICOMweb data source pointing at itself, so the installed
package is never modified. Threaded: the viewer opens many requests at once.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
#: Where scripts/setup.sh installs `npm pack @ohif/app@OHIF_VERSION`.
OHIF_HOME = ROOT / ".ohif"


def pinned_version() -> str:
    """The OHIF version scripts/setup.sh pins (its `OHIF_VERSION=` line): one place for the pin."""
    match = re.search(r"^OHIF_VERSION=(\S+)$", (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert match, "scripts/setup.sh has no OHIF_VERSION= line"
    return match.group(1)

#: Request headers passed on to Orthanc (the rest, e.g. the browser's cookies, stay here).
_FORWARD_REQUEST = ("Accept", "Content-Type", "Range", "Authorization")
#: Response headers passed back to the browser.
_FORWARD_RESPONSE = ("Content-Type", "Content-Length", "Content-Range", "Content-Encoding")


def require_ohif() -> Path:
    """The `dist/` folder of the pinned OHIF; skip when missing (fail instead under CI=true)."""
    dist = Path(os.environ.get("OSTEO_OHIF_DIST", OHIF_HOME / "package" / "dist"))
    manifest = dist.parent / "package.json"
    pinned = pinned_version()
    problem = None
    if not (dist / "index.html").is_file() or not manifest.is_file():
        problem = (f"OHIF viewer not installed at {dist} (scripts/setup.sh installs "
                   f"@ohif/app@{pinned} with npm into .ohif/)")
    else:
        version = json.loads(manifest.read_text())["version"]
        if version != pinned:
            problem = f"OHIF {version} at {dist}, scripts/setup.sh pins {pinned}"
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}; CI must have it")
        pytest.skip(problem)
    return dist


def forward(handler: BaseHTTPRequestHandler, upstream_port: int) -> None:
    """Pass the request `handler` holds to 127.0.0.1:`upstream_port` and its answer back."""
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else None
    headers = {k: v for k in _FORWARD_REQUEST if (v := handler.headers.get(k))}
    connection = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
    try:
        connection.request(handler.command, handler.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    handler.send_response(response.status)
    for key in _FORWARD_RESPONSE:
        if key != "Content-Length" and (value := response.getheader(key)):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


class HttpsProxy:
    """HTTPS on 127.0.0.1:`port` in front of an HTTP server (as a hospital's TLS proxy in front of
    Orthanc), with the certificate and key given; Authorization is passed through."""

    def __init__(self, upstream_port: int, port: int, cert: Path, key: Path) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                forward(self, upstream_port)

            def do_POST(self) -> None:
                forward(self, upstream_port)

        self.url = f"https://127.0.0.1:{port}"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HttpsProxy":
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def app_config(origin: str) -> str:
    """OHIF's `window.config` with one DICOMweb data source: Orthanc through this server."""
    root = f"{origin}/dicom-web"
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "extensions": [],
        "modes": [],
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "defaultDataSourceName": "orthanc",
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "orthanc",
            "configuration": {
                "friendlyName": "Orthanc (test)",
                "name": "orthanc",
                "wadoUriRoot": f"{origin}/wado",
                "qidoRoot": root,
                "wadoRoot": root,
                "qidoSupportsIncludeField": False,
                "supportsReject": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "staticWado": False,
                "singlepart": "bulkdata,video",
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                "omitQuotationForMultipartRequest": True,
            },
        }],
    }
    return f"window.config = {json.dumps(config, indent=1)};\n"


class OhifServer:
    """Serve `dist` and proxy DICOMweb to Orthanc's HTTP port, on 127.0.0.1:`port`."""

    def __init__(self, dist: Path, orthanc_http_port: int, port: int) -> None:
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_http_port
        self.origin = f"http://127.0.0.1:{port}"
        config = app_config(self.origin).encode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # the test's output stays readable
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_HEAD(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith(("/dicom-web/", "/wado")):
                    self._proxy()
                elif path == "/app-config.js":
                    self._reply(200, "application/javascript", config)
                else:
                    self._static(path)

            def _static(self, path: str) -> None:
                target = (server.dist / path.lstrip("/")).resolve()
                if not target.is_relative_to(server.dist) or not target.is_file():
                    target = server.dist / "index.html"  # SPA fallback: OHIF routes the path
                kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    kind = "application/wasm"
                self._reply(200, kind, target.read_bytes())

            def _reply(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                forward(self, server.orthanc_port)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "OhifServer":
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
