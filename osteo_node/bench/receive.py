"""Receive: images/s durably stored by the node's receiver (an in-process `Node` with its receiver
on a scratch database: SQLite, or PostgreSQL when the config's database is) from DCMTK storescu
over 1 and 4 associations, 512 x 512 DX and full-size CR, against DCMTK `storescp -od DIR` on the
same files."""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..node import Node
from ..queue import INFER
from .common import ScratchDatabases, node_settings
from .dcmtk import Dcmtk


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


def node_receive_rate(settings: Settings, dcmtk: Dcmtk, files: Sequence[Path], associations: int,
                      folder: Path, databases: ScratchDatabases) -> float:
    """Images/s stored and recorded by the node's receiver (fresh store and database)."""
    settings = node_settings(settings, folder, database_url=databases.url(folder))
    with Node(settings, receive=True, work=False) as node:
        seconds = dcmtk.send(settings.dicom.port, files, associations, settings.dicom.ae_title)
        stored = sum(node.runtime.queue.counts(INFER).values())  # one infer job per eligible image
    if stored != len(files):
        raise RuntimeError(f"receiver stored {stored} of {len(files)} images as eligible: "
                           "check the eligibility rules in the config")
    return len(files) / seconds


def storescp_rate(dcmtk: Dcmtk, files: Sequence[Path], associations: int, folder: Path) -> float:
    """Images/s written by DCMTK storescp (forking per association when there are several)."""
    with dcmtk.storescp_running(folder, fork=associations > 1) as port:
        seconds = dcmtk.send(port, files, associations, "STORESCP")
    return len(files) / seconds


def measure_receive(settings: Settings, dcmtk: Dcmtk, images: dict[str, Sequence[Path]], work: Path,
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
                node.append(node_receive_rate(settings, dcmtk, files, n_assoc, run / "node", databases))
                scp.append(storescp_rate(dcmtk, files, n_assoc, run / "storescp"))
                shutil.rmtree(run, ignore_errors=True)
            cases.append(ReceiveCase(name, round(mb, 2), n_assoc, len(files), statistics.median(node),
                                     statistics.median(scp)))
    return ReceiveResult(tuple(cases))
