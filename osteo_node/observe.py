"""Observability: the log's set-up, Prometheus metrics (defined once, here) and the /metrics +
/healthz endpoint.

Each process (serve, receive, work) exposes its own counters; queue depth is read from the
database at scrape time, so every process reports the same, current value.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Histogram, Info, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import Settings
from .queue import Queue

log = logging.getLogger(__name__)

#: Loggers of libraries that quote DICOM values (a PatientName, a ReferringPhysicianName) in
#: their messages, and `py.warnings`, where captured Python warnings land (highdicom and pydicom
#: warn about person names by quoting them).
_QUOTING_LOGGERS = ("py.warnings", "highdicom", "pydicom")


class PatientDataFilter(logging.Filter):
    """Keeps patient data out of the log: a record from a library that may quote DICOM values
    keeps its level, logger and source line, but its text is replaced.

    Our own log lines name referral ids and UIDs only (by review); library text cannot be
    reviewed, so it is withheld rather than pattern-matched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if any(name == prefix or name.startswith(prefix + ".") for prefix in _QUOTING_LOGGERS):
            where = f"{os.path.basename(record.pathname)}:{record.lineno}"
            if name == "py.warnings":  # logging formats a warning as "file:line: Category: text"
                where = _warning_origin(record.getMessage())
            record.msg = f"library message withheld (it may quote patient data); from {where}"
            record.args = None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _warning_origin(text: str) -> str:
    """'file.py:12: UserWarning: text' -> 'file.py:12 UserWarning' (without the text)."""
    head = text.split(": ", 2)
    if len(head) >= 2 and head[1]:
        return f"{os.path.basename(head[0])} {head[1].split()[0]}"
    return "a library warning"


def setup_logging(settings: Settings) -> None:
    """Root handler (text or JSON), quiet third-party loggers, and Python warnings routed into
    the log through PatientDataFilter (issue 16: highdicom warned with the patient's name)."""
    handler = logging.StreamHandler()
    handler.addFilter(PatientDataFilter())
    logging.captureWarnings(False)  # re-armed, so that a second set-up in one process routes them too
    logging.captureWarnings(True)
    if settings.node.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.node.log_level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


RECEIVED = Counter("osteo_received", "C-STORE requests by outcome", ["outcome"])
PROCESSED = Counter("osteo_processed", "Radiographs screened (infer jobs done)", ["category"])
SENT = Counter("osteo_sent", "Result sets delivered, by destination", ["destination"])
FAILED = Counter("osteo_failed", "Job attempts that failed, by job kind", ["kind"])
STAGE_SECONDS = Histogram(
    "osteo_stage_seconds", "Seconds spent per pipeline stage", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MODEL = Info("osteo_model", "The model bundle this worker serves")


class QueueDepth(Collector):
    """Jobs per kind-independent state, read from the database when scraped."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("osteo_queue_jobs", "Jobs in the queue by state", labels=["state"])
        try:
            for state, count in self.queue.counts().items():
                family.add_metric([state], count)
        except Exception as exc:  # the database is down: report no depth rather than fail the scrape
            log.warning("queue depth unavailable: %s", type(exc).__name__)
        yield family


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log lines
        pass


def health_app(checks: dict[str, Callable[[], object]]) -> Callable[..., Iterable[bytes]]:
    """WSGI app: /metrics (Prometheus), /healthz (200 when every check passes, else 503)."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path != "/healthz":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        problems = []
        for name, check in checks.items():
            try:
                check()
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__}")
        status = "503 Service Unavailable" if problems else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [("\n".join(problems) if problems else "ok").encode() + b"\n"]

    return app


def start_http(host: str, port: int, queue: Queue, checks: dict[str, Callable[[], object]]) -> WSGIServer:
    """Serve /metrics and /healthz on host:port in a daemon thread; `.shutdown()` stops it."""
    try:
        REGISTRY.register(QueueDepth(queue))
    except ValueError:  # already registered in this process (serve runs receiver and worker)
        pass
    server = make_server(host, port, health_app(checks), server_class=_Server,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics and /healthz", host, port)
    return server
