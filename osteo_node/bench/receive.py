"""Receive: images/s durably stored by the node's receiver (an in-process `Node` with its receiver
on a scratch database: SQLite, or PostgreSQL when the config's database is) from DCMTK storescu
over 1 and 4 associations, 512 x 512 DX and full-size CR, against DCMTK `storescp -od DIR` on the
same files, against the physical floor: the same bytes copied over loopback and fsynced
(`floor_rate`), and against the library's ceiling: pynetdicom answering without doing anything
(`library_rate`)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import evt

from ..config import Settings
from ..node import Node
from ..queue import INFER
from ..receive import build_ae, configure_pynetdicom, use_fast_socket
from .common import ScratchDatabases, free_port, node_settings
from .dcmtk import Dcmtk


@dataclass(frozen=True)
class ReceiveCase:
    images: str
    image_mb: float
    associations: int
    n: int
    node_images_per_s: float
    storescp_images_per_s: float
    floor_images_per_s: float
    library_images_per_s: float
    #: The receiver processes the node ran (`dicom.processes`).
    processes: int

    @property
    def ratio(self) -> float:
        return self.node_images_per_s / self.storescp_images_per_s

    @property
    def ratio_to_floor(self) -> float:
        return self.node_images_per_s / self.floor_images_per_s

    @property
    def ratio_to_library(self) -> float:
        return self.node_images_per_s / self.library_images_per_s


@dataclass(frozen=True)
class ReceiveResult:
    cases: tuple[ReceiveCase, ...]

    @property
    def ratio_vs_storescp(self) -> float:
        """Node / storescp, full-size CR over one association."""
        return next(c.ratio for c in self.cases if c.images == "cr" and c.associations == 1)

    def as_dict(self) -> dict[str, Any]:
        return {"ratio_vs_storescp": self.ratio_vs_storescp,
                "cases": [{**dataclasses.asdict(c), "ratio": c.ratio, "ratio_to_floor": c.ratio_to_floor,
                           "ratio_to_library": c.ratio_to_library} for c in self.cases]}


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


def _library_process(settings: Settings, port: int, ready: Any, stop: Any) -> None:
    """One process of `library_rate`: the node's AE on `port`, answering Success at once."""
    configure_pynetdicom()  # as the receiver has it
    server = build_ae(settings.dicom).start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000), (evt.EVT_CONN_OPEN, use_fast_socket)])
    assert server is not None  # block=False always returns the server
    ready.set()
    stop.wait()
    server.shutdown()


def library_rate(settings: Settings, dcmtk: Dcmtk, files: Sequence[Path], associations: int,
                 folder: Path) -> float:
    """Images/s of pynetdicom itself, set up as the node's receiver (its AE, data sets streamed to
    a file, its socket) with a C-STORE handler that answers Success at once: the most the node's
    receiver could reach with this library before it reads, stores or records anything. In as
    many processes as the node has (`dicom.processes`, at most one per association), each on a
    port of its own, with the associations spread evenly over them, as the node spreads them."""
    settings = node_settings(settings, folder, database_url="sqlite://")
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    processes = []
    try:
        ports = []
        for _ in range(min(settings.dicom.processes, associations)):
            ready, port = context.Event(), free_port()
            process = context.Process(target=_library_process, args=(settings, port, ready, stop))
            process.start()
            processes.append(process)
            if not ready.wait(60):
                raise RuntimeError("bench: a pynetdicom process did not start")
            ports.append(port)
        seconds = dcmtk.send(ports, files, associations, settings.dicom.ae_title)
    finally:
        stop.set()
        for process in processes:
            process.join()
    return len(files) / seconds


#: The floor writes what arrives in pieces of this size and starts their write-back at once, as
#: the receiver does (receive._WriteBack), so that its fsync waits for the last piece only.
_FLOOR_PIECE = 1 << 20


def _floor_receiver(connection: socket.socket, folder: Path, name: str) -> None:
    """Receive length-prefixed images on `connection`; each one streamed to a new file in `folder`
    (write-back started every MiB) and fsynced, then answered with one byte. Ends when the peer
    closes."""
    buffer = bytearray(_FLOOR_PIECE)
    with connection, memoryview(buffer) as view:
        count = 0
        while header := connection.recv(8, socket.MSG_WAITALL):
            left = struct.unpack("!Q", header)[0]
            fd = os.open(folder / f"{name}-{count}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                written = 0
                while left:
                    piece = connection.recv_into(view[:min(left, _FLOOR_PIECE)])
                    if not piece:
                        raise RuntimeError("floor: sender closed the connection mid-image")
                    os.write(fd, view[:piece])
                    if hasattr(os, "posix_fadvise") and (written + piece) // _FLOOR_PIECE > written // _FLOOR_PIECE:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start write-back
                    written += piece
                    left -= piece
                os.fsync(fd)
            finally:
                os.close(fd)
            connection.sendall(b"\x00")
            count += 1


def floor_rate(files: Sequence[Path], associations: int, folder: Path) -> float:
    """Images/s of the physical floor of a durable receive on this machine: each file's bytes read
    and sent over a loopback TCP connection, streamed into a new file on the store's disk with its
    write-back started as it arrives, and fsynced (one cache flush), then answered with one byte
    before the next is sent; `associations` connections at once, each sending its share of the
    files one at a time, as storescu does.
    No DICOM, no database, no folder fsync: what any receiver that answers only once the bytes
    are on disk pays at the least."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = [list(files[i::associations]) for i in range(associations)]
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        receivers: list[threading.Thread] = []

        def accept() -> None:
            for i in range(len(groups)):
                connection, _ = server.accept()
                thread = threading.Thread(target=_floor_receiver, args=(connection, folder, f"c{i}"))
                thread.start()
                receivers.append(thread)

        def send(group: list[Path]) -> None:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for path in group:
                    data = path.read_bytes()
                    connection.sendall(struct.pack("!Q", len(data)) + data)
                    if connection.recv(1) != b"\x00":
                        raise RuntimeError("floor: receiver closed the connection")

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        senders = [threading.Thread(target=send, args=(group,)) for group in groups]
        start = time.perf_counter()
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        seconds = time.perf_counter() - start
        acceptor.join()
        for thread in receivers:
            thread.join()
    stored = len(list(folder.iterdir()))
    if stored != len(files):
        raise RuntimeError(f"floor: {stored} of {len(files)} files written")
    return len(files) / seconds


def measure_receive(settings: Settings, dcmtk: Dcmtk, images: dict[str, Sequence[Path]], work: Path,
                    databases: ScratchDatabases, associations: Sequence[int] = (1, 4),
                    repeats: int = 3) -> ReceiveResult:
    """Node, storescp, floor and library receive rates for each image set and association count,
    same files.

    The four runs alternate `repeats` times; each rate is the median of its runs (the load of
    other processes on a shared machine drifts)."""
    cases = []
    for name, files in images.items():
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        for n_assoc in associations:
            node, scp, floor, library = [], [], [], []
            for i in range(repeats):
                run = work / f"receive-{name}-{n_assoc}-{i}"
                node.append(node_receive_rate(settings, dcmtk, files, n_assoc, run / "node", databases))
                scp.append(storescp_rate(dcmtk, files, n_assoc, run / "storescp"))
                floor.append(floor_rate(files, n_assoc, run / "floor"))
                library.append(library_rate(settings, dcmtk, files, n_assoc, run / "library"))
                shutil.rmtree(run, ignore_errors=True)
            cases.append(ReceiveCase(name, round(mb, 2), n_assoc, len(files), statistics.median(node),
                                     statistics.median(scp), statistics.median(floor),
                                     statistics.median(library), settings.dicom.processes))
    return ReceiveResult(tuple(cases))
