"""`osteo-node bench`: what this machine does with the node's real parts, one measurement each.

- receive: images/s durably stored by the node's receiver (start_receiver + FileStore + Queue on a
  scratch database: SQLite, or PostgreSQL when the config's database is) from DCMTK storescu over 1
  and 4 associations, 512 x 512 DX and
  full-size CR, against DCMTK `storescp -od DIR` on the same files.
- pipeline: per-stage seconds of `pipeline.screen` (+ send to a local storescp), and the floor:
  the classifier's bare forward + backward (down to the Grad-CAM target layer) on the same tensor.
- node: in-process receiver + worker + storescp as the PACS: a worker (its own loop, with the
  configured `worker.prefetch`) draining a full queue (throughput) and, one image at a time,
  C-STORE received -> results accepted by the PACS (instances.received_at -> finished_at of the
  send job).
- memory: peak RSS (VmHWM) of `osteo-node receive` and `osteo-node work` subprocesses.
- workers (only when asked for): images/s of 1, 2, 4 ... `osteo-node work` processes sharing one
  queue, each with a full queue: how many workers a host (a GPU host) needs.

Every function returns a small frozen dataclass; `run_bench` gathers them into one JSON-ready dict.
Nothing here is kept: every database (ScratchDatabases), store and port is temporary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from sqlalchemy import create_engine, func, make_url, select, text
from sqlalchemy.orm import Session

from .config import Settings, parse_settings
from .synthetic import cr_copies, synthetic_dx

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
CALLING_AE = "BENCH_SCU"
#: DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; with it on, each
#: small C-STORE-RSP / last PDU waits for the peer's delayed ACK (~40 ms per image on loopback),
#: which caps storescp at ~15-20 images/s whatever the image size. Both DCMTK tools get it off.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class Counts:
    """How many images each measurement uses (`--quick` or full)."""

    dx_receive: int
    cr_receive: int
    pipeline: int
    throughput: int
    end_to_end: int
    memory_cr: int
    floor_repeats: int


QUICK = Counts(dx_receive=40, cr_receive=10, pipeline=4, throughput=4, end_to_end=3, memory_cr=3,
               floor_repeats=3)
FULL = Counts(dx_receive=200, cr_receive=30, pipeline=12, throughput=12, end_to_end=8, memory_cr=8,
              floor_repeats=7)


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and p95 (nearest rank) of `values`, in the same unit."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p95": p95}


def require_dcmtk() -> None:
    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not os.access(tool, os.X_OK):
            raise FileNotFoundError(f"{tool} not found: install DCMTK (Debian: apt-get install dcmtk)")


def echo(port: int, called: str = "ANY-SCP") -> bool:
    done = subprocess.run([ECHOSCU, "-aet", CALLING_AE, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, timeout=30, check=False, env=DCMTK_ENV)
    return done.returncode == 0


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def start_storescu(port: int, files: Sequence[Path], called: str) -> subprocess.Popen[str]:
    """One DCMTK storescu process sending `files` over one association (not waited for)."""
    return subprocess.Popen([STORESCU, "-v", "-aet", CALLING_AE, "-aec", called, "127.0.0.1",
                             str(port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)


def finish_storescu(procs: Sequence[subprocess.Popen[str]], expected: int) -> None:
    """Wait for storescu processes; raise RuntimeError unless `expected` files got Success."""
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    ok = sum(len(re.findall(r"Received Store Response \(Success\)", out)) for out in outputs)
    if ok != expected:
        raise RuntimeError(f"storescu: {ok} of {expected} stored with Success; last output:\n"
                           f"{outputs[-1][-800:]}")


def storescu(port: int, files: Sequence[Path], associations: int = 1, called: str = "OSTEO_NODE") -> float:
    """Send `files` with `associations` concurrent DCMTK storescu processes; wall seconds.

    Raises RuntimeError unless every file was answered Success."""
    groups = [list(files[i::associations]) for i in range(associations)]
    start = time.perf_counter()
    procs = [start_storescu(port, group, called) for group in groups if group]
    finish_storescu(procs, len(files))
    return time.perf_counter() - start


@contextlib.contextmanager
def dcmtk_storescp(folder: Path, *, fork: bool = False) -> Iterator[int]:
    """DCMTK `storescp -od folder PORT` (one child per association with `fork`); yields the port."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [STORESCP, "-od", str(folder), *(["--fork"] if fork else []), str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=DCMTK_ENV)
    try:
        wait_until(lambda: echo(port), 30, "storescp to answer C-ECHO", 0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: storescp and its forked children
        proc.wait(timeout=30)


class ScratchDatabases:
    """A fresh, empty database for each of the bench's runs, all gone on exit: a SQLite file in the
    run's folder, or, when the configured database is PostgreSQL, a new database on that server
    (`osteo_bench_...`, created and dropped with the configured user, who needs CREATEDB; dropped
    WITH (FORCE), PostgreSQL 13 or later)."""

    def __init__(self, configured_url: str) -> None:
        self.configured = make_url(configured_url)
        self.backend = self.configured.get_backend_name()
        self.created: list[str] = []

    def url(self, folder: Path) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{folder / 'node.sqlite3'}"
        name = f"osteo_bench_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.configured.set(database=name).render_as_string(hide_password=False)

    def _execute(self, statement: str) -> None:
        admin = create_engine(self.configured, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(statement))
        finally:
            admin.dispose()

    def __enter__(self) -> "ScratchDatabases":
        return self

    def __exit__(self, *_exc: object) -> None:
        while self.created:
            self._execute(f'DROP DATABASE IF EXISTS "{self.created.pop()}" WITH (FORCE)')


def node_settings(base: Settings, folder: Path, *, bundle: str, database_url: str,
                  pacs_port: int | None = None, poll_s: float = 0.05) -> Settings:
    """`base` with a temporary data folder, the database at `database_url` (ScratchDatabases.url),
    free ports, no metrics endpoint, fast polling and (when `pacs_port`) one destination `pacs` on
    127.0.0.1."""
    raw = base.model_dump(mode="json")
    raw["node"].update(data_dir=str(folder / "var"), log_level="INFO", log_format="text")
    raw["database"]["url"] = database_url
    raw["dicom"].update(port=free_port(), bind_address="127.0.0.1", allowed_calling_aes=[])
    raw["dicom"].pop("tls", None)
    raw["metrics"].update(port=0, receiver_port=0)
    raw["storage"]["min_free_disk_mb"] = 0
    raw["model"]["bundle"] = bundle
    raw["worker"]["poll_interval_s"] = poll_s
    raw["web"] = {}
    raw["destinations"] = ([{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
                           if pacs_port else [])
    return parse_settings(raw, folder)


# ---------------------------------------------------------------- receive


@dataclass(frozen=True)
class ReceiveCase:
    images: str
    image_mb: float
    associations: int
    n: int
    node_images_per_s: float
    storescp_images_per_s: float

    @property
    def ratio(self) -> float:
        return self.node_images_per_s / self.storescp_images_per_s


@dataclass(frozen=True)
class ReceiveResult:
    cases: tuple[ReceiveCase, ...]

    @property
    def ratio_vs_storescp(self) -> float:
        """Node / storescp, full-size CR over one association."""
        return next(c.ratio for c in self.cases if c.images == "cr" and c.associations == 1)

    def as_dict(self) -> dict[str, Any]:
        return {"ratio_vs_storescp": self.ratio_vs_storescp,
                "cases": [{**dataclasses.asdict(c), "ratio": c.ratio} for c in self.cases]}


def node_receive_rate(settings: Settings, files: Sequence[Path], associations: int, folder: Path,
                      databases: ScratchDatabases) -> float:
    """Images/s stored and recorded by the node's receiver (fresh store and database)."""
    from . import migrate
    from .db import Instance, make_engine
    from .node import receive_limits
    from .queue import Queue
    from .receive import start_receiver
    from .store import FileStore

    settings = node_settings(settings, folder, bundle=settings.model.bundle, database_url=databases.url(folder))
    engine = make_engine(settings.database_url)
    migrate.upgrade(engine)
    store = FileStore(settings.node.data_dir / "store")
    server = start_receiver(settings.dicom, Queue(engine), store, settings.eligibility.rules(),
                            receive_limits(settings))
    try:
        seconds = storescu(settings.dicom.port, files, associations, settings.dicom.ae_title)
    finally:
        server.shutdown()
    with Session(engine) as session:
        stored = session.scalar(select(func.count()).select_from(Instance).where(Instance.eligible))
    engine.dispose()
    if stored != len(files):
        raise RuntimeError(f"receiver stored {stored} of {len(files)} images as eligible: "
                           "check the eligibility rules in the config")
    return len(files) / seconds


def storescp_rate(files: Sequence[Path], associations: int, folder: Path) -> float:
    """Images/s written by DCMTK storescp (forking per association when there are several)."""
    with dcmtk_storescp(folder, fork=associations > 1) as port:
        seconds = storescu(port, files, associations, "STORESCP")
    return len(files) / seconds


def measure_receive(settings: Settings, images: dict[str, Sequence[Path]], work: Path,
                    databases: ScratchDatabases, associations: Sequence[int] = (1, 4),
                    repeats: int = 3) -> ReceiveResult:
    """Node and storescp receive rates for each image set and association count, same files.

    Node and storescp runs alternate `repeats` times; each rate is the median of its runs (the
    load of other processes on a shared machine drifts)."""
    cases = []
    for name, files in images.items():
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        for n_assoc in associations:
            node, scp = [], []
            for i in range(repeats):
                run = work / f"receive-{name}-{n_assoc}-{i}"
                node.append(node_receive_rate(settings, files, n_assoc, run / "node", databases))
                scp.append(storescp_rate(files, n_assoc, run / "storescp"))
                shutil.rmtree(run, ignore_errors=True)
            cases.append(ReceiveCase(name, round(mb, 2), n_assoc, len(files), statistics.median(node),
                                     statistics.median(scp)))
    return ReceiveResult(tuple(cases))


# ---------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class PipelineResult:
    n: int
    stages: dict[str, dict[str, float]]
    floor_s: float
    ratio_to_floor: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_floor(classifier: Any, tensor: Any, repeats: int, *, warmup: bool = True, cam_block: int = -1,
                batch: int = 1, precision: str = "fp32") -> float:
    """Median seconds of the classifier's bare forward + backward of each image's top logit on a
    batch of `batch` copies of `tensor`, with gradients only down to the Grad-CAM target layer
    (what Inference needs), under the same autocast, no CAM hooks. Sets the same requires_grad
    pattern that Inference sets; pass a classifier without CAM hooks (a copy)."""
    import torch

    from .model import autocast, cam_target, gradients_down_to

    gradients_down_to(classifier, cam_target(classifier, cam_block)[0])
    device = next(classifier.parameters()).device
    x = torch.from_numpy(tensor[None]).repeat(batch, 1, 1, 1).to(device)
    times = []
    for _ in range(repeats + int(warmup)):
        start = time.perf_counter()
        with autocast(device, precision):
            logits = classifier(x)
        logits.max(dim=1).values.sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        classifier.zero_grad(set_to_none=True)
    return statistics.median(times[int(warmup):])


def measure_pipeline(inference: Any, floor_model: Any, files: Sequence[Path], display_max: int,
                     pacs_port: int, work: Path) -> PipelineResult:
    """Per-stage seconds of pipeline.screen on each file, plus sending SR + SC to `pacs_port`,
    each image preceded by one floor pass (model_floor on `floor_model`) on its own input tensor,
    so that a drifting machine load affects both alike. The first file is a warm-up, untimed."""
    from pydicom import dcmread

    from .config import Destination
    from .encode import to_bytes
    from .pipeline import screen
    from .pixels import decode, prepare
    from .send import send_files

    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port)
    spec = inference.bundle.spec
    screen(files[0], inference, display_max)
    per_stage: dict[str, list[float]] = {}
    totals, floors = [], []
    work.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        tensor = prepare(decode(dcmread(path)), spec.input_size, spec.mean, spec.std,
                         display_max=display_max).tensor
        floors.append(model_floor(floor_model, tensor, 1, warmup=False, cam_block=inference.bundle.cam.block,
                                  precision=inference.precision))
        result = screen(path, inference, display_max)
        outputs = [work / f"{i}.sr.dcm", work / f"{i}.sc.dcm"]
        outputs[0].write_bytes(to_bytes(result.sr))
        outputs[1].write_bytes(to_bytes(result.sc))
        start = time.perf_counter()
        send_files(destination, outputs, "OSTEO_BENCH")
        seconds = {**result.seconds, "send": time.perf_counter() - start}
        for stage, value in seconds.items():
            per_stage.setdefault(stage, []).append(value)
        totals.append(sum(result.seconds[s] for s in ("decode", "preprocess", "model", "sr", "sc")))
    stages = {stage: summary(values) for stage, values in per_stage.items()}
    stages["screen_total"] = summary(totals)
    floor_s = statistics.median(floors)
    return PipelineResult(len(files), stages, floor_s, statistics.median(totals) / floor_s)


# ---------------------------------------------------------------- node: throughput and end to end


@dataclass(frozen=True)
class ThroughputResult:
    n: int
    device: str
    batch_size: int
    images_per_s: float
    seconds: float
    gpu_fraction_of_floor: float | None = None
    #: The worker's `worker.prefetch` (0: one job at a time; > 0: load, model and report overlap).
    prefetch: int = 0
    #: Worker seconds per image draining a full queue (infer + send + refer jobs).
    seconds_per_image: float = 0.0
    #: seconds_per_image / floor: the steady-state cost of an image next to the bare model, with
    #: the stages overlapped (pipeline.ratio_to_floor adds up the stages of one image instead).
    steady_ratio_to_floor: float = 0.0
    #: Images/s of the bare batched forward + backward at `batch_size` (measured on a GPU only).
    floor_images_per_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EndToEndResult:
    n: int
    seconds: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _send_jobs_done(engine: Any) -> int:
    from .db import Job
    from .queue import DONE, FAILED, SEND

    with Session(engine) as session:
        failed = session.scalar(select(func.count()).select_from(Job).where(Job.state == FAILED))
        if failed:
            raise RuntimeError(f"bench: {failed} jobs were dead-lettered")
        return int(session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.kind == SEND, Job.state == DONE)) or 0)


def _all_jobs_done(engine: Any) -> bool:
    from .db import Job
    from .queue import DONE

    with Session(engine) as session:
        pending = session.scalar(select(func.count()).select_from(Job).where(Job.state != DONE))
    return pending == 0


def measure_node(settings: Settings, inference: Any, drain_files: Sequence[Path],
                 latency_files: Sequence[Path], work: Path, databases: ScratchDatabases, floor_s: float,
                 batch_floor_s: float | None = None) -> tuple[ThroughputResult, EndToEndResult]:
    """Receiver + worker in this process, storescp as the PACS.

    Throughput: `drain_files` are received with no worker running, then one worker drains the
    queue (infer, send and refer jobs) in batches of `worker.batch_size`. End to end: each of
    `latency_files` is sent alone and timed from instances.received_at to finished_at of its send
    job. `batch_floor_s`: the bare pass's seconds per image at that batch size, given on a GPU only
    (gpu_fraction_of_floor)."""
    from .db import Instance, Job
    from .node import open_runtime, receive_limits
    from .queue import SEND
    from .receive import start_receiver
    from .work import Worker

    with dcmtk_storescp(work / "pacs", fork=False) as pacs_port:
        settings = node_settings(settings, work, bundle=settings.model.bundle,
                                 database_url=databases.url(work), pacs_port=pacs_port)
        runtime = open_runtime(settings)
        server = start_receiver(settings.dicom, runtime.queue, runtime.store,
                                settings.eligibility.rules(), receive_limits(settings))
        worker = Worker(settings, runtime.queue, runtime.store, inference)
        try:
            storescu(settings.dicom.port, drain_files, 1, settings.dicom.ae_title)
            start = time.perf_counter()
            worker.run(threading.Event(), until_idle=True)  # the worker's own loop, as configured
            drained = time.perf_counter() - start
            if not _all_jobs_done(runtime.engine):
                raise RuntimeError("bench: the worker stopped with jobs not done")
            device = str(inference.device)
            per_image = drained / len(drain_files)
            throughput = ThroughputResult(
                len(drain_files), device, worker.batch_size, len(drain_files) / drained, drained,
                gpu_fraction_of_floor=batch_floor_s / per_image if batch_floor_s else None,
                floor_images_per_s=1 / batch_floor_s if batch_floor_s else None,
                prefetch=worker.prefetch, seconds_per_image=per_image,
                steady_ratio_to_floor=per_image / floor_s)

            # The worker runs in this (main) thread, as in `osteo-node work`: torch's intra-op
            # threading behaves differently in other threads, which would flatter the figure.
            for path in latency_files:
                before = _send_jobs_done(runtime.engine)
                sender = start_storescu(settings.dicom.port, [path], settings.dicom.ae_title)
                deadline = time.monotonic() + 600
                while _send_jobs_done(runtime.engine) <= before:
                    if time.monotonic() > deadline:
                        raise TimeoutError("bench: results did not reach the PACS within 600 s")
                    worker.run(threading.Event(), until_idle=True)
                    time.sleep(settings.worker.poll_interval_s)  # idle: the worker's poll
                finish_storescu([sender], 1)
            worker.run(threading.Event(), until_idle=True)  # the refer jobs
            wait_until(lambda: _all_jobs_done(runtime.engine), 120, "the refer jobs")
            with Session(runtime.engine) as session:
                rows = session.execute(
                    select(Instance.received_at, Job.finished_at).join(Job, Job.instance_id == Instance.id)
                    .where(Job.kind == SEND).order_by(Instance.id)
                ).all()
            latencies = [(done - received).total_seconds()
                         for received, done in rows[len(drain_files):] if done is not None]
        finally:
            server.shutdown()
            runtime.engine.dispose()
    stats = summary(latencies)
    return throughput, EndToEndResult(len(latencies), {"median": stats["median"], "p95": stats["p95"],
                                                       "max": max(latencies)})


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryResult:
    receiver_peak_rss_mb: float
    worker_peak_rss_mb: float
    images: int
    #: "loaded bundle" lines in the worker's log: 1 means no per-image model reloads.
    worker_bundle_loads: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a running process, in MB (10^6 bytes)."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
    return int(found.group(1)) * 1024 / 1e6


def write_toml(settings: Settings, path: Path) -> Path:
    """Write `settings` as a TOML config file (the keys `osteo-node` reads)."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data.pop("web", None)
    # Sections as flat tables (nested ones such as TLS are left out); destinations as [[destinations]].
    tables = {section: values if section == "destinations" else
              {k: v for k, v in values.items() if not isinstance(v, dict)}
              for section, values in data.items()}
    path.write_text(tomli_w.dumps(tables), encoding="utf-8")
    return path


class _NodeProcess:
    """`osteo-node COMMAND --config FILE` as a subprocess, logging to a file."""

    def __init__(self, command: str, config: Path, name: str | None = None) -> None:
        self.log = config.parent / f"{name or command}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "osteo_node.cli", command, "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"osteo-node exited ({self.proc.returncode}):\n"
                               f"{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure_memory(settings: Settings, files: Sequence[Path], work: Path,
                   databases: ScratchDatabases) -> MemoryResult:
    """Peak RSS of `osteo-node receive` (receiving `files` over 4 associations) and of
    `osteo-node work` (screening them and sending to storescp), read before they stop."""
    from .db import make_engine

    with dcmtk_storescp(work / "pacs") as pacs_port:
        settings = node_settings(settings, work, bundle=settings.model.bundle,
                                 database_url=databases.url(work), pacs_port=pacs_port, poll_s=0.2)
        config = write_toml(settings, work / "node.toml")
        receiver = _NodeProcess("receive", config)
        worker = None
        try:
            def ready() -> bool:
                receiver.check()
                return echo(settings.dicom.port, settings.dicom.ae_title)

            wait_until(ready, 120, "osteo-node receive to answer C-ECHO", 0.2)
            storescu(settings.dicom.port, files, min(4, len(files)), settings.dicom.ae_title)
            receiver_mb = peak_rss_mb(receiver.proc.pid)
            worker = _NodeProcess("work", config)
            engine = make_engine(settings.database_url)
            try:
                def drained() -> bool:
                    worker.check()
                    return _send_jobs_done(engine) == len(files) and _all_jobs_done(engine)

                wait_until(drained, 1200, "osteo-node work to drain the queue", 0.2)
            finally:
                engine.dispose()
            worker_mb = peak_rss_mb(worker.proc.pid)
        finally:
            receiver.stop()
            if worker is not None:
                worker.stop()
    loads = worker.log.read_text(errors="replace").count("loaded bundle")
    return MemoryResult(round(receiver_mb, 1), round(worker_mb, 1), len(files), loads)


# ---------------------------------------------------------------- several worker processes


@dataclass(frozen=True)
class WorkersCase:
    processes: int
    n: int
    images_per_s: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def worker_counts(most: int) -> list[int]:
    """1, 2, 4, ... and `most` itself: the numbers of worker processes to measure."""
    if most < 1:
        raise ValueError(f"--workers must be >= 1, got {most}")
    counts = [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return sorted(set(counts + [most]))


def measure_workers(settings: Settings, files: Sequence[Path], work: Path, databases: ScratchDatabases,
                    processes: int) -> WorkersCase:
    """Images/s of `processes` `osteo-node work` processes sharing the bench's queue, storescp as
    the PACS. The workers start first and wait on an empty queue (model loading is not counted);
    `files` are then received over one association by an in-process receiver, which outpaces the
    workers, and the time runs from the first image received to the last send job done."""
    from .db import Instance, Job
    from .node import open_runtime, receive_limits
    from .queue import SEND
    from .receive import start_receiver

    with dcmtk_storescp(work / "pacs") as pacs_port:
        settings = node_settings(settings, work, bundle=settings.model.bundle,
                                 database_url=databases.url(work), pacs_port=pacs_port)
        runtime = open_runtime(settings)  # migrates the database before any worker opens it
        server = start_receiver(settings.dicom, runtime.queue, runtime.store,
                                settings.eligibility.rules(), receive_limits(settings))
        config = write_toml(settings, work / "node.toml")
        workers = [_NodeProcess("work", config, name=f"work-{i}") for i in range(processes)]
        try:
            def started() -> bool:
                for worker in workers:
                    worker.check()
                return all(re.search(r"worker \S+ started", w.log.read_text(errors="replace")) for w in workers)

            def drained() -> bool:
                for worker in workers:
                    worker.check()
                return _send_jobs_done(runtime.engine) == len(files) and _all_jobs_done(runtime.engine)

            wait_until(started, 600, f"{processes} osteo-node work processes to start", 0.2)
            storescu(settings.dicom.port, files, 1, settings.dicom.ae_title)
            wait_until(drained, 3600, f"{processes} osteo-node work processes to drain the queue", 0.05)
            with Session(runtime.engine) as session:
                first = session.scalar(select(func.min(Instance.received_at)))
                last = session.scalar(select(func.max(Job.finished_at)).where(Job.kind == SEND))
        finally:
            for worker in workers:
                worker.stop()
            server.shutdown()
            runtime.engine.dispose()
    seconds = (last - first).total_seconds()
    return WorkersCase(processes, len(files), len(files) / seconds, seconds)


# ---------------------------------------------------------------- machine and model


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cores": os.cpu_count(), "cpu": cpu or platform.processor(), "gpu": gpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def model_info(bundle: Any) -> dict[str, Any]:
    return {"name": bundle.identity.name, "version": bundle.identity.version,
            "backbone": bundle.identity.backbone, "method": bundle.spec.method,
            "input_size": bundle.spec.input_size, "path": str(bundle.path),
            "parameters": sum(p.numel() for p in bundle.classifier.parameters()), "cam": bundle.cam.to_dict()}


# ---------------------------------------------------------------- all together


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())



SECTIONS = ("receive", "pipeline", "node", "memory")  # the default
#: Measured only when named: it starts several model-loading processes per worker count.
OPTIONAL_SECTIONS = ("workers",)


def run_bench(settings: Settings, *, bundle: str | None = None, quick: bool = False,
              sections: Sequence[str] = SECTIONS, counts: Counts | None = None,
              progress: Any = None, workers: int = 2) -> dict[str, Any]:
    """Run the measurements named in `sections` and return one JSON-ready dict. `workers`: the most
    worker processes the workers section runs (it measures 1, 2, 4 ... up to it)."""
    from pydicom import dcmread

    from .bundle import load_bundle
    from .infer import Inference
    from .pixels import decode, prepare

    require_dcmtk()
    counts = counts or (QUICK if quick else FULL)
    say = progress or (lambda _msg: None)
    if bundle is not None:
        raw = settings.model_dump(mode="json")
        raw["model"]["bundle"] = str(Path(bundle).resolve()) if "/" in bundle or bundle.startswith(".") \
            else bundle
        settings = parse_settings(raw, Path.cwd())
    report: dict[str, Any] = {"quick": quick, "machine": machine(), "counts": dataclasses.asdict(counts)}
    started = time.perf_counter()
    databases = ScratchDatabases(settings.database_url)
    report["machine"]["database"] = databases.backend
    with tempfile.TemporaryDirectory(prefix="osteo-bench-") as tmp, databases:
        work = Path(tmp)
        n_drain = max(counts.throughput, 4 * settings.worker.batch_size)  # a few full batches
        processes = worker_counts(workers) if "workers" in sections else []
        n_workers = {k: max(counts.throughput, 2 * settings.worker.batch_size * k) for k in processes}
        n_cr = max(counts.cr_receive, counts.pipeline + 1, n_drain + counts.end_to_end,
                   counts.memory_cr, *n_workers.values())
        n_dx = counts.dx_receive if "receive" in sections else 0
        say(f"writing {n_dx} DX 512x512 and {n_cr} CR images")
        (work / "dx").mkdir()
        dx = [synthetic_dx(work / "dx" / f"dx-{i:04d}.dcm", sex="F", size=512, seed=i) for i in range(n_dx)]
        cr = cr_copies(work / "cr", n_cr)
        if "receive" in sections:
            say("receive: node and storescp, 1 and 4 associations")
            report["receive"] = measure_receive(
                settings, {"dx512": dx, "cr": cr[:counts.cr_receive]}, work, databases).as_dict()
        if "pipeline" in sections or "node" in sections:
            from .node import cam_override, resolve_device
            from .pipeline import warm_up

            say(f"loading bundle {settings.model.bundle}")
            loaded = load_bundle(settings.model.bundle, device=resolve_device(settings), merged=True)
            report["model"] = model_info(loaded)
            report["machine"]["torch_threads"] = _torch_threads()
            spec = loaded.spec
            tensor = prepare(decode(dcmread(cr[0])), spec.input_size, spec.mean, spec.std,
                             display_max=settings.model.display_max).tensor
            floor_model = copy.deepcopy(loaded.classifier)  # the same weights without CAM hooks
            precision, batch = settings.model.precision, settings.worker.batch_size
            floor_s = model_floor(floor_model, tensor, counts.floor_repeats, cam_block=loaded.cam.block,
                                  precision=precision)
            batch_floor_s = None
            if loaded.device.startswith("cuda"):  # the GPU's bare throughput at the worker's batch size
                batch_floor_s = model_floor(floor_model, tensor, counts.floor_repeats, batch=batch,
                                            cam_block=loaded.cam.block, precision=precision) / batch
            inference = Inference(loaded, device=loaded.device, cam_method=cam_override(settings),
                                  precision=precision)
            warm_up(inference, settings.model.display_max)  # as a worker does before its first job
            if "pipeline" in sections:
                say(f"pipeline: {counts.pipeline} CR images")
                with dcmtk_storescp(work / "pipeline-pacs") as pacs_port:
                    pipeline = measure_pipeline(inference, floor_model, cr[1:counts.pipeline + 1],
                                                settings.model.display_max, pacs_port, work / "pipeline")
                report["pipeline"] = pipeline.as_dict()
                floor_s = pipeline.floor_s
            del floor_model
            if "node" in sections:
                say(f"throughput ({n_drain} CR) and end to end ({counts.end_to_end} CR)")
                throughput, end_to_end = measure_node(
                    settings, inference, cr[:n_drain], cr[n_drain:n_drain + counts.end_to_end],
                    work / "node", databases, floor_s, batch_floor_s)
                report["throughput"] = throughput.as_dict()
                if str(inference.device).startswith("cuda"):
                    import torch

                    report["throughput"]["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
                report.setdefault("pipeline", {}).setdefault("floor_s", floor_s)
                report["pipeline"]["end_to_end"] = end_to_end.as_dict()
                report["pipeline"]["end_to_end_p95_s"] = end_to_end.seconds["p95"]
        if "memory" in sections:
            say(f"memory: osteo-node receive and work subprocesses, {counts.memory_cr} CR images")
            report["memory"] = measure_memory(settings, cr[:counts.memory_cr], work / "memory",
                                              databases).as_dict()
        if processes:
            cases = []
            for k in processes:
                say(f"workers: {k} osteo-node work processes, {n_workers[k]} CR images")
                cases.append(measure_workers(settings, cr[:n_workers[k]], work / f"workers-{k}", databases, k))
            report["workers"] = {"batch_size": settings.worker.batch_size,
                                 "cases": [c.as_dict() for c in cases],
                                 "scaling": cases[-1].images_per_s / cases[0].images_per_s}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what `osteo-node bench` prints without --json)."""
    m = report["machine"]
    lines = [(f"machine: {m['cores']} cores, {m['cpu']}, GPU {m['gpu'] or 'none'}, torch {m['torch']} "
              f"({m['torch_threads']} threads), database {m['database']}, load {m['load_average']} -> "
              f"{m.get('load_average_after')}")]
    if "model" in report:
        md = report["model"]
        lines.append(f"model: {md['name']} {md['version']} ({md['backbone']}/{md['method']}, "
                     f"{md['input_size']} px, {md['parameters']:,} parameters)")
    if "receive" in report:
        lines += ["", (f"{'receive':10} {'MB':>6} {'assoc':>5} {'n':>4} {'node img/s':>11} "
                       f"{'storescp img/s':>15} {'ratio':>6}")]
        for c in report["receive"]["cases"]:
            lines.append(f"{c['images']:10} {c['image_mb']:>6.2f} {c['associations']:>5} {c['n']:>4} "
                         f"{c['node_images_per_s']:>11.1f} {c['storescp_images_per_s']:>15.1f} "
                         f"{c['ratio']:>6.2f}")
        lines.append(f"ratio_vs_storescp (CR, 1 association): {report['receive']['ratio_vs_storescp']:.2f}")
    pipeline = report.get("pipeline", {})
    if "stages" in pipeline:
        lines += ["", f"{'stage':14} {'median s':>9} {'p95 s':>9}"]
        for stage, v in pipeline["stages"].items():
            lines.append(f"{stage:14} {v['median']:>9.3f} {v['p95']:>9.3f}")
        lines.append(f"floor (bare forward+backward): {pipeline['floor_s']:.3f} s; "
                     f"ratio_to_floor {pipeline['ratio_to_floor']:.2f}")
    if "end_to_end" in pipeline:
        e = pipeline["end_to_end"]["seconds"]
        lines.append(f"end to end (received -> accepted by PACS), n={pipeline['end_to_end']['n']}: "
                     f"median {e['median']:.2f} s, p95 {e['p95']:.2f} s")
    if "throughput" in report:
        t = report["throughput"]
        lines.append(f"throughput: {t['images_per_s']:.2f} images/s draining {t['n']} jobs on "
                     f"{t['device']} (batch {t['batch_size']}, prefetch {t['prefetch']}); "
                     f"{t['seconds_per_image']:.3f} s per image, {t['steady_ratio_to_floor']:.1f}x floor")
        if t.get("gpu_fraction_of_floor") is not None:
            lines.append(f"GPU: bare batched forward+backward {t['floor_images_per_s']:.1f} images/s; "
                         f"gpu_fraction_of_floor {t['gpu_fraction_of_floor']:.2f}, peak GPU memory "
                         f"{t.get('gpu_peak_mb', 0):.0f} MB")
    if "memory" in report:
        mem = report["memory"]
        lines.append(f"peak RSS: receiver {mem['receiver_peak_rss_mb']:.0f} MB, "
                     f"worker {mem['worker_peak_rss_mb']:.0f} MB ({mem['images']} CR images, "
                     f"bundle loaded {mem['worker_bundle_loads']}x)")
    if "workers" in report:
        w = report["workers"]
        lines.append("workers (osteo-node work processes, full queue): " + ", ".join(
            f"{c['processes']} -> {c['images_per_s']:.2f} images/s" for c in w["cases"])
            + f"; scaling {w['scaling']:.2f}x")
    lines.append(f"bench took {report['seconds']:.0f} s")
    return "\n".join(lines)
