"""Assembles the node's parts from the settings: database, queue, store, model, receiver, worker.

`serve` runs receiver + worker + scheduler (+ the HL7 listener for DXA results when
`[hl7] enabled`) in one process (the embedded default); `receive` and
`work` run the parts separately (what the systemd units start). All stop cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import send_handle
from types import FrameType
from typing import TYPE_CHECKING, cast

from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.engine import Engine

from . import migrate
from .config import Settings
from .db import make_engine
from .housekeeping import start_scheduler
from .observe import MODEL, RECEIVED, setup_logging, start_http
from .queue import Queue
from .receive import OpenAssociations, ReceiveLimits, serve_handed, start_receiver
from .store import FileStore

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from apscheduler.schedulers.base import BaseScheduler

    from .hl7_listener import Listener
    from .infer import Inference
    from .work import Worker

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
    """Connect to the database and open the file store. With `create_schema` (the node's
    processes): migrate an empty database, refuse (SchemaError) one that is not at the newest
    revision, which only `osteo-node db upgrade` migrates (with every process stopped)."""
    engine = make_engine(settings.database_url)
    if create_schema:
        try:
            if migrate.is_empty(engine):
                log.info("empty database: applying migrations")
                migrate.upgrade(engine)
            else:
                migrate.require_head(engine)
        except BaseException:
            engine.dispose()
            raise
    store = FileStore(settings.node.store_dir)
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


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (graceful shutdown); the previous handlers come back on
    exit (so that `cli.main` can run in a test's process)."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _received_totals() -> dict[str, float]:
    """This process's osteo_received_total by outcome."""
    return {sample.labels["outcome"]: sample.value
            for metric in RECEIVED.collect() for sample in metric.samples
            if sample.name == "osteo_received_total"}


def _receiver_process(settings: Settings, parent: Connection, counts: OpenAssociations, index: int) -> None:
    """One further receiver process (`dicom.processes` > 1), run by `ReceiverProcesses`: it serves
    the connections that the node's process hands it over `parent` until SIGTERM or until the
    parent is gone. Sends "ready" once it can serve, then its C-STORE outcome totals every second
    and on exit, which the parent adds to its own osteo_received_total (one metrics endpoint for
    all of them)."""
    setup_logging(settings)
    parent_pid = os.getppid()
    with stop_on_signals() as stop:
        runtime = open_runtime(settings, create_schema=False)
        server = serve_handed(settings.dicom, runtime.queue, runtime.store, settings.eligibility,
                              receive_limits(settings), parent, counts, index)
        try:
            parent.send("ready")
            while not stop.wait(1.0) and os.getppid() == parent_pid:
                parent.send(_received_totals())
        finally:
            server.shutdown()  # associations in progress finish first (their threads are joined)
            with contextlib.suppress(OSError):  # the parent is gone
                parent.send(_received_totals())
            runtime.engine.dispose()


@dataclass
class _Child:
    process: BaseProcess
    index: int  # its slot in OpenAssociations


class ReceiverProcesses:
    """The receiver's further processes (`dicom.processes` - 1; the node's own process is the
    first). The node's process alone listens on the port; it hands each connection it accepts to
    the process with the fewest open associations (`take`, itself included), so that
    associations spread evenly over the processes and each process has as few as can be: in one
    process, associations share one core under the GIL, and their polling threads make each
    other slower (docs/performance.md). Started before `start` returns, each one ready; one that
    dies is logged and started again, and connections go to the others meanwhile; stopped with
    SIGTERM, each finishing its associations.

    Processes, not threads: the receiver is CPU-bound Python (pynetdicom's PDU handling, the
    header read, SQLAlchemy)."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.counts = OpenAssociations(count + 1)
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._children: dict[Connection, _Child] = {}
        self._reported: dict[int, dict[str, float]] = {}  # pid -> C-STORE outcome totals
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._turn = 0  # where the search for the least busy process starts (ties take turns)
        self._reader: threading.Thread | None = None
        try:
            for index in range(1, count + 1):
                self._start_one(index)
        except BaseException:
            self.stop()
            raise
        self._reader = threading.Thread(target=self._read, name="receiver-processes", daemon=True)
        self._reader.start()

    def _start_one(self, index: int) -> None:
        ours, theirs = self._context.Pipe()  # a socket pair: it carries socket handles to the child
        process = self._context.Process(target=_receiver_process, args=(self.settings, theirs, self.counts, index),
                                        name="osteo-node-receiver", daemon=True)
        process.start()
        theirs.close()
        try:
            ready = ours.poll(60) and ours.recv() == "ready"
        except EOFError:  # it exited before it was ready (its log says why)
            ready = False
        if not ready:
            process.terminate()
            raise RuntimeError(f"receiver process {process.pid} did not start "
                               f"(exit code {process.exitcode}); see its log lines above")
        log.info("receiver process %d ready", process.pid)
        with self._lock:
            self._children[ours] = _Child(process, index)
            self._reported[cast(int, process.pid)] = {}
        if self._stopping.is_set():  # started again while the node was stopping
            process.terminate()

    def take(self, connection: socket.socket) -> bool:
        """Hand an accepted connection to the process with the fewest open associations; False
        when that is the node's own process (the caller serves it). A child that cannot take it
        (it has just died; `_read` starts another) is passed over."""
        gone: set[Connection] = set()
        while True:
            with self._lock:
                slots = [(0, None)] + [(c.index, pipe) for pipe, c in self._children.items() if pipe not in gone]
                self._turn = (self._turn + 1) % len(slots)
                index, pipe = min(slots[self._turn:] + slots[:self._turn], key=lambda s: self.counts.open(s[0]))
                self.counts.handed[index] += 1
            if pipe is None:
                return False
            try:
                send_handle(pipe, connection.fileno(), 0)
            except OSError:
                with self._lock:
                    if pipe in self._children:  # else _restart has reset its counts already
                        self.counts.handed[index] -= 1
                gone.add(pipe)
                continue
            connection.close()  # the child has its own copy
            return True

    def _read(self) -> None:
        """Add the children's C-STORE counts to this process's counter; restart a dead child."""
        while not self._stopping.is_set():
            with self._lock:
                connections = list(self._children)
            for connection in wait(connections, timeout=0.5):
                conn = cast(Connection, connection)
                child = self._children[conn]
                try:
                    self._count(conn, cast(int, child.process.pid))
                except (EOFError, OSError):  # the child exited
                    self._restart(conn, child)

    def _restart(self, connection: Connection, child: _Child) -> None:
        with self._lock:
            del self._children[connection]
            self.counts.reset(child.index)  # its associations are gone with it
        child.process.join()
        connection.close()
        if not self._stopping.is_set():
            log.error("receiver process %d exited with code %s; starting another",
                      child.process.pid, child.process.exitcode)
            try:
                self._start_one(child.index)
            except RuntimeError as exc:  # the health check reports it missing
                log.error("%s", exc)

    def _count(self, connection: Connection, pid: int) -> None:
        seen = self._reported[pid]
        for outcome, total in connection.recv().items():
            RECEIVED.labels(outcome).inc(total - seen.get(outcome, 0.0))
            seen[outcome] = total

    def received(self) -> dict[int, dict[str, float]]:
        """The C-STORE outcome totals each process has reported so far (every second, and when
        it stops), by process id; those of processes that exited are kept."""
        with self._lock:
            return {pid: dict(totals) for pid, totals in self._reported.items()}

    def check(self) -> None:
        """Health check: raise unless every process is alive."""
        with self._lock:
            dead = [c.process.pid for c in self._children.values() if not c.process.is_alive()]
        if dead or len(self._children) < self.settings.dicom.processes - 1:
            raise OSError(f"receiver processes not running: {dead}")

    def stop(self) -> None:
        """SIGTERM to each process; each finishes its associations and exits."""
        self._stopping.set()
        if self._reader is not None:
            self._reader.join()  # it returns within 0.5 s; then only this thread reads the pipes
        with self._lock:
            children = list(self._children.items())
            self._children.clear()
        for _, child in children:
            child.process.terminate()
        for connection, child in children:
            process = child.process
            process.join(timeout=self.settings.dicom.network_timeout_s + 10)
            if process.is_alive():
                log.error("receiver process %d did not stop; killing it", process.pid)
                process.kill()
                process.join()
            with contextlib.suppress(EOFError, OSError):
                while connection.poll():
                    self._count(connection, cast(int, process.pid))


def _listening(server: ThreadedAssociationServer) -> None:
    """Health check: raise when the receiver's socket is closed."""
    if server.socket is None or server.socket.fileno() < 0:
        raise OSError("receiver socket closed")


class Node:
    """The node's parts for one process, started and stopped together: the database and the
    file store always; the receiver with `receive`; the model, the worker and the housekeeping
    scheduler with `work`; the metrics endpoint when its port is set.

    `serve`, `receive` and `work` run one (`with Node(...) as node: node.run(stop)`); the bench
    and the tests start one in-process and drive `node.worker` themselves. `inference`: a model
    already loaded (the bench's), else `start` loads the configured bundle when `work`.
    """

    def __init__(self, settings: Settings, *, receive: bool, work: bool,
                 inference: Inference | None = None, housekeeping: bool = True) -> None:
        self.settings = settings
        self.receive = receive
        self.work = work
        self.housekeeping = housekeeping
        self.inference = inference
        self._runtime: Runtime | None = None
        self._worker: Worker | None = None
        self.server: ThreadedAssociationServer | None = None
        #: The receiver's further processes when `dicom.processes` > 1 (started with the receiver).
        self.receivers: ReceiverProcesses | None = None
        self._metrics: WSGIServer | None = None
        self._scheduler: BaseScheduler | None = None
        self._hl7: Listener | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("Node.start() has not been called")
        return self._runtime

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("this node has no worker (Node(work=True), then start())")
        return self._worker

    def start(self) -> Node:
        """Open the database (refusing an outdated schema), load the model, start the parts."""
        settings = self.settings
        try:
            self._runtime = runtime = open_runtime(settings)
            if self.work:
                from .roles import model_roles
                from .work import Worker

                roles = model_roles(settings, runtime.engine)
                log.info("live model: %s %s (Device UID %s); shadows: %s", roles.live.name,
                         roles.live.version, roles.live.device_uid,
                         ", ".join(f"{m.name} {m.version} ({m.device_uid})" for m in roles.shadows)
                         or "none")
                if self.inference is None:
                    self.inference = load_inference(settings, roles.live.entry)
                shadows = {m.device_uid: load_inference(settings, m.entry) for m in roles.shadows}
                identity = self.inference.identity
                MODEL.info({"name": identity.name, "version": identity.version,
                            "device_uid": identity.device_uid, "backbone": identity.backbone})
                self._worker = Worker(settings, runtime.queue, runtime.store, self.inference,
                                      shadows=shadows, roles=roles)
            checks: dict[str, Callable[[], object]] = {"database": runtime.queue.counts}
            if self.receive and self.work and settings.hl7.enabled:  # `serve`
                from .hl7_listener import Listener

                self._hl7 = Listener(runtime.engine, settings.hl7,
                                     settings.validation.match_window_days).start()
                checks["hl7"] = self._hl7.check
            if self.receive:
                if settings.dicom.processes > 1:
                    receivers = self.receivers = ReceiverProcesses(settings, settings.dicom.processes - 1)
                    checks["receiver processes"] = receivers.check
                server = self.server = start_receiver(settings.dicom, runtime.queue, runtime.store,
                                                      settings.eligibility, receive_limits(settings),
                                                      hand_off=self.receivers)
                checks["receiver"] = lambda: _listening(server)
            port = settings.metrics.port if self.work else settings.metrics.receiver_port
            if port:
                try:
                    self._metrics = start_http(settings.metrics.host, port, runtime.queue, checks)
                except OSError as exc:  # e.g. a second worker on this host with the same config
                    log.error("metrics endpoint not started: %s:%d: %s (set metrics.port / "
                              "metrics.receiver_port per process); continuing without it",
                              settings.metrics.host, port, exc.strerror)
            if self.work and self.housekeeping:
                self._scheduler = start_scheduler(runtime.engine, runtime.store, runtime.queue,
                                                  settings.storage.retention_days)
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, stop: threading.Event) -> None:
        """Work (in this thread) or, for a receiver alone, wait, until `stop` is set."""
        if self._worker is not None:
            self._worker.run(stop)
        else:
            stop.wait()

    def stop(self) -> None:
        """Stop what was started, receiver first (nothing new arrives), database last."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics = None
        if self._hl7 is not None:
            self._hl7.shutdown()
            self._hl7 = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._runtime is not None:
            self._runtime.engine.dispose()
            self._runtime = None

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def run(settings: Settings, *, receive: bool, work: bool) -> None:
    """Run the receiver and/or the worker (+ scheduler) until SIGTERM or SIGINT."""
    try:
        with stop_on_signals() as stop, Node(settings, receive=receive, work=work) as node:
            node.run(stop)
    finally:
        log.info("stopped")
