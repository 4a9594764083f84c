"""Memory: peak RSS (VmHWM) of `osteo-node receive` and `osteo-node work` subprocesses, read
while they run."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..db import make_engine
from ..queue import Queue
from .common import ScratchDatabases, all_jobs_done, node_settings, send_jobs_done, wait_until
from .dcmtk import Dcmtk
from .processes import NodeProcess, write_config


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


def measure_memory(settings: Settings, dcmtk: Dcmtk, files: Sequence[Path], work: Path,
                   databases: ScratchDatabases) -> MemoryResult:
    """Peak RSS of `osteo-node receive` (receiving `files` over 4 associations) and of
    `osteo-node work` (screening them and sending to storescp), read before they stop."""
    with dcmtk.storescp_running(work / "pacs") as pacs_port:
        settings = node_settings(settings, work, database_url=databases.url(work), pacs_port=pacs_port,
                                 poll_s=0.2)
        config = write_config(work / "node.toml", settings)
        receiver = NodeProcess(config, "receive").start()
        worker = None
        try:
            receiver.wait_ready(lambda: dcmtk.echo(settings.dicom.port, settings.dicom.ae_title), 120,
                                "C-ECHO answer")
            dcmtk.send(settings.dicom.port, files, min(4, len(files)), settings.dicom.ae_title)
            receiver_mb = peak_rss_mb(receiver.pid)
            worker = NodeProcess(config, "work").start()
            engine = make_engine(settings.database_url)
            queue = Queue(engine)
            try:
                def drained() -> bool:
                    assert worker is not None
                    worker.check()
                    return send_jobs_done(queue) == len(files) and all_jobs_done(queue)

                wait_until(drained, 1200, "osteo-node work to drain the queue", 0.2)
            finally:
                engine.dispose()
            worker_mb = peak_rss_mb(worker.pid)
        finally:
            receiver.stop()
            if worker is not None:
                worker.stop()
    loads = worker.log().count("loaded bundle")
    return MemoryResult(round(receiver_mb, 1), round(worker_mb, 1), len(files), loads)
