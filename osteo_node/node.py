"""Assembles the node's parts from the settings: database, queue, store, model, receiver, worker.

`serve` runs receiver + worker + scheduler in one process (the embedded default); `receive` and
`work` run the parts separately (what the systemd units start). All stop cleanly on SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.engine import Engine

from . import migrate
from .config import Settings
from .db import make_engine
from .housekeeping import start_scheduler
from .observe import MODEL, start_http
from .queue import Queue
from .receive import ReceiveLimits, start_receiver
from .store import FileStore

if TYPE_CHECKING:
    from .infer import Inference

# The model stack (torch, transformers, grad-cam: ~0.9 GB resident, ~10 s to import on 2 cores)
# is imported only where a worker needs it, so that `osteo-node receive` stays small.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    queue: Queue
    store: FileStore


def open_runtime(settings: Settings, *, create_schema: bool = True) -> Runtime:
    """Connect to the database (creating the schema on an empty one) and open the file store."""
    engine = make_engine(settings.database_url)
    if create_schema and migrate.is_empty(engine):
        log.info("empty database: applying migrations")
        migrate.upgrade(engine)
    store = FileStore(settings.node.data_dir / "store")
    return Runtime(settings, engine, Queue(engine), store)


def resolve_device(settings: Settings) -> str:
    """The configured device ("auto": CUDA when available); applies model.torch_threads."""
    import torch

    if settings.model.torch_threads:
        torch.set_num_threads(settings.model.torch_threads)
    device = settings.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_inference(settings: Settings, bundle_entry: str | None = None) -> Inference:
    """Load a bundle (default: the configured `model.bundle`) once and warm it up
    (pipeline.warm_up); raises BundleError when it is missing or altered."""
    from .bundle import load_bundle
    from .infer import Inference
    from .pipeline import warm_up

    device = resolve_device(settings)
    bundle = load_bundle(bundle_entry or settings.model.bundle, device=device, merged=True)
    log.info("model %s %s (Device UID %s) on %s, precision %s, batch size %d", bundle.identity.name,
             bundle.identity.version, bundle.identity.device_uid, device, settings.model.precision,
             settings.worker.batch_size)
    inference = Inference(bundle, device=device, cam_method=cam_override(settings),
                          precision=settings.model.precision)
    log.info("warmed up on a synthetic image in %.2f s", warm_up(inference, settings.model.display_max))
    return inference


def cam_override(settings: Settings) -> str | None:
    """The configured saliency method, or None for the bundle's own choice."""
    return None if settings.model.cam_method == "bundle" else settings.model.cam_method


def receive_limits(settings: Settings) -> ReceiveLimits:
    return ReceiveLimits(
        min_free_bytes=settings.storage.min_free_disk_mb << 20,
        max_instance_bytes=settings.dicom.max_instance_mb << 20,
    )


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (graceful shutdown)."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _listening(server: ThreadedAssociationServer) -> None:
    """Health check: raise when the receiver's socket is closed."""
    if server.socket is None or server.socket.fileno() < 0:
        raise OSError("receiver socket closed")


def run(settings: Settings, stop: threading.Event, *, receive: bool, work: bool) -> None:
    """Run the receiver and/or the worker (+ scheduler) until `stop` is set."""
    runtime = open_runtime(settings)
    inference = roles = None
    shadows: dict[str, Inference] = {}
    if work:
        from .roles import model_roles

        roles = model_roles(settings, runtime.engine)
        log.info("live model: %s %s (Device UID %s); shadows: %s", roles.live.name, roles.live.version,
                 roles.live.device_uid, ", ".join(f"{m.name} {m.version} ({m.device_uid})"
                                                  for m in roles.shadows) or "none")
        inference = load_inference(settings, roles.live.entry)
        shadows = {m.device_uid: load_inference(settings, m.entry) for m in roles.shadows}
    server = scheduler = metrics = None
    checks: dict[str, Callable[[], object]] = {"database": runtime.queue.counts}
    if inference is not None:
        identity = inference.identity
        MODEL.info({"name": identity.name, "version": identity.version,
                    "device_uid": identity.device_uid, "backbone": identity.backbone})
    if receive:
        server = start_receiver(settings.dicom, runtime.queue, runtime.store,
                                settings.eligibility.rules(), receive_limits(settings))
        checks["receiver"] = lambda: _listening(server)
    port = settings.metrics.port if work else settings.metrics.receiver_port
    if port:
        try:
            metrics = start_http(settings.metrics.host, port, runtime.queue, checks)
        except OSError as exc:  # e.g. a second worker on this host with the same config
            log.error("metrics endpoint not started: %s:%d: %s (set metrics.port / "
                      "metrics.receiver_port per process); continuing without it",
                      settings.metrics.host, port, exc.strerror)
    if work:
        scheduler = start_scheduler(runtime.engine, runtime.store, runtime.queue,
                                    settings.storage.retention_days)
    try:
        if work:
            from .work import Worker

            Worker(settings, runtime.queue, runtime.store, inference, shadows=shadows, roles=roles).run(stop)
        else:
            stop.wait()
    finally:
        if server is not None:
            server.shutdown()
        if metrics is not None:
            metrics.shutdown()
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        runtime.engine.dispose()
        log.info("stopped")
