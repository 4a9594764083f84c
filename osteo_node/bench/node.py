"""Node: an in-process node (`osteo_node.node.Node`: receiver + worker on the bench's loaded
model) with storescp as the PACS. Throughput: the worker's own loop, with the configured
`worker.prefetch` and `worker.batch_size`, draining a full queue. End to end: one image at a
time, C-STORE received -> results accepted by the PACS (instances.received_at -> finished_at of
the send job)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..node import Node
from ..queue import SEND
from .common import ScratchDatabases, all_jobs_done, node_settings, send_jobs_done, summary, wait_until
from .dcmtk import Dcmtk

if TYPE_CHECKING:
    from ..infer import Inference


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


def measure_node(settings: Settings, dcmtk: Dcmtk, inference: Inference, drain_files: Sequence[Path],
                 latency_files: Sequence[Path], work: Path, databases: ScratchDatabases, floor_s: float,
                 batch_floor_s: float | None = None) -> tuple[ThroughputResult, EndToEndResult]:
    """Receiver + worker in this process, storescp as the PACS.

    Throughput: `drain_files` are received with no worker running, then one worker drains the
    queue (infer, send and refer jobs) in batches of `worker.batch_size`. End to end: each of
    `latency_files` is sent alone and timed from instances.received_at to finished_at of its send
    job. `batch_floor_s`: the bare pass's seconds per image at that batch size, given on a GPU only
    (gpu_fraction_of_floor)."""
    with dcmtk.storescp_running(work / "pacs", fork=False) as pacs_port:
        settings = node_settings(settings, work, database_url=databases.url(work), pacs_port=pacs_port)
        with Node(settings, receive=True, work=True, inference=inference, housekeeping=False) as node:
            queue, worker = node.runtime.queue, node.worker
            dcmtk.send(settings.dicom.port, drain_files, 1, settings.dicom.ae_title)
            start = time.perf_counter()
            worker.run(threading.Event(), until_idle=True)  # the worker's own loop, as configured
            drained = time.perf_counter() - start
            if not all_jobs_done(queue):
                raise RuntimeError("bench: the worker stopped with jobs not done")
            per_image = drained / len(drain_files)
            throughput = ThroughputResult(
                len(drain_files), str(inference.device), worker.batch_size, len(drain_files) / drained,
                drained, gpu_fraction_of_floor=batch_floor_s / per_image if batch_floor_s else None,
                floor_images_per_s=1 / batch_floor_s if batch_floor_s else None,
                prefetch=worker.prefetch, seconds_per_image=per_image,
                steady_ratio_to_floor=per_image / floor_s)

            # The worker runs in this (main) thread, as in `osteo-node work`: torch's intra-op
            # threading behaves differently in other threads, which would flatter the figure.
            for path in latency_files:
                before = send_jobs_done(queue)
                sender = dcmtk.start_storescu(settings.dicom.port, [path], settings.dicom.ae_title)
                deadline = time.monotonic() + 600
                while send_jobs_done(queue) <= before:
                    if time.monotonic() > deadline:
                        raise TimeoutError("bench: results did not reach the PACS within 600 s")
                    worker.run(threading.Event(), until_idle=True)
                    time.sleep(settings.worker.poll_interval_s)  # idle: the worker's poll
                dcmtk.finish_storescu([sender], 1)
            worker.run(threading.Event(), until_idle=True)  # the refer jobs
            wait_until(lambda: all_jobs_done(queue), 120, "the refer jobs")
            rows = queue.turnaround(SEND)
    latencies = [(done - received).total_seconds()
                 for received, done in rows[len(drain_files):] if done is not None]
    stats = summary(latencies)
    return throughput, EndToEndResult(len(latencies), {"median": stats["median"], "p95": stats["p95"],
                                                       "max": max(latencies)})
