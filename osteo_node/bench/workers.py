"""Workers (only when asked for): images/s of 1, 2, 4 ... `osteo-node work` processes sharing
one queue, each run with a full queue: how many workers a host (a GPU host) needs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..node import Node
from ..queue import SEND
from .common import ScratchDatabases, all_jobs_done, node_settings, send_jobs_done, wait_until
from .dcmtk import Dcmtk
from .processes import NodeProcess, write_config


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


def measure_workers(settings: Settings, dcmtk: Dcmtk, files: Sequence[Path], work: Path,
                    databases: ScratchDatabases, processes: int) -> WorkersCase:
    """Images/s of `processes` `osteo-node work` processes sharing the bench's queue, storescp as
    the PACS. The workers start first and wait on an empty queue (model loading is not counted);
    `files` are then received over one association by an in-process receiver (a `Node`, which
    also migrates the database before any worker opens it), which outpaces the workers, and the
    time runs from the first image received to the last send job done."""
    with dcmtk.storescp_running(work / "pacs") as pacs_port:
        settings = node_settings(settings, work, database_url=databases.url(work), pacs_port=pacs_port)
        with Node(settings, receive=True, work=False) as node:
            queue = node.runtime.queue
            config = write_config(work / "node.toml", settings)
            workers = [NodeProcess(config, "work", name=f"work-{i}").start() for i in range(processes)]
            try:
                def started() -> bool:
                    for worker in workers:
                        worker.check()
                    return all(re.search(r"worker \S+ started", w.log()) for w in workers)

                def drained() -> bool:
                    for worker in workers:
                        worker.check()
                    return send_jobs_done(queue) == len(files) and all_jobs_done(queue)

                wait_until(started, 600, f"{processes} osteo-node work processes to start", 0.2)
                dcmtk.send(settings.dicom.port, files, 1, settings.dicom.ae_title)
                wait_until(drained, 3600, f"{processes} osteo-node work processes to drain the queue", 0.05)
                times = queue.turnaround(SEND)
            finally:
                for worker in workers:
                    worker.stop()
    first = min(received for received, _ in times)
    last = max(done for _, done in times if done is not None)
    seconds = (last - first).total_seconds()
    return WorkersCase(processes, len(files), len(files) / seconds, seconds)
