"""DCMTK, the bench's reference modality (storescu, echoscu) and receiver (storescp).

Found in the config's `bench.dcmtk_dir`, else on PATH. pynetdicom installs Python console scripts
with the same names into the environment's bin folder (often first on PATH): those are skipped,
so that the node is measured against DCMTK itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .common import free_port, wait_until

TOOLS = ("storescu", "storescp", "echoscu")
CALLING_AE = "BENCH_SCU"
#: DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; with it on, each
#: small C-STORE-RSP / last PDU waits for the peer's delayed ACK (~40 ms per image on loopback),
#: which caps storescp at ~15-20 images/s whatever the image size. Both DCMTK tools get it off.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _is_python_script(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(200)
    return first.startswith(b"#!") and b"python" in first


def find_tool(name: str, directory: Path | None = None) -> str | None:
    """The DCMTK program `name`: in `directory` when given, else the first on PATH that is not a
    Python script (pynetdicom's namesakes). None when not found."""
    if directory is not None:
        path = directory / name
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which(name, path=folder) if folder else None
        if found and not _is_python_script(Path(found)):
            return found
    return None


@dataclass(frozen=True)
class Dcmtk:
    """Paths of DCMTK's storescu, storescp and echoscu, and the runs the bench makes of them."""

    storescu: str
    storescp: str
    echoscu: str

    @classmethod
    def find(cls, directory: Path | None = None) -> Dcmtk:
        """From `directory` (the config's bench.dcmtk_dir) or PATH; ConfigError naming what is missing."""
        found = {name: find_tool(name, directory) for name in TOOLS}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            where = (f"bench.dcmtk_dir ({directory})" if directory is not None
                     else "PATH (or set bench.dcmtk_dir in the config)")
            raise ConfigError(f"DCMTK {', '.join(missing)} not found in {where}: install DCMTK "
                              "(Debian: apt-get install dcmtk)")
        return cls(**{name: str(path) for name, path in found.items()})

    def echo(self, port: int, called: str = "ANY-SCP") -> bool:
        done = subprocess.run([self.echoscu, "-aet", CALLING_AE, "-aec", called, "127.0.0.1", str(port)],
                              capture_output=True, timeout=30, check=False, env=DCMTK_ENV)
        return done.returncode == 0

    def start_storescu(self, port: int, files: Sequence[Path], called: str) -> subprocess.Popen[str]:
        """One storescu process sending `files` over one association (not waited for)."""
        return subprocess.Popen([self.storescu, "-v", "-aet", CALLING_AE, "-aec", called, "127.0.0.1",
                                 str(port), *map(str, files)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV)

    @staticmethod
    def finish_storescu(procs: Sequence[subprocess.Popen[str]], expected: int) -> None:
        """Wait for storescu processes; raise RuntimeError unless `expected` files got Success."""
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        ok = sum(len(re.findall(r"Received Store Response \(Success\)", out)) for out in outputs)
        if ok != expected:
            raise RuntimeError(f"storescu: {ok} of {expected} stored with Success; last output:\n"
                               f"{outputs[-1][-800:]}")

    def send(self, port: int | Sequence[int], files: Sequence[Path], associations: int = 1,
             called: str = "OSTEO_NODE") -> float:
        """Send `files` with `associations` concurrent storescu processes; wall seconds. With
        several ports, the associations go to them in turn.

        Raises RuntimeError unless every file was answered Success."""
        ports = [port] if isinstance(port, int) else list(port)
        groups = [list(files[i::associations]) for i in range(associations)]
        start = time.perf_counter()
        procs = [self.start_storescu(ports[i % len(ports)], group, called)
                 for i, group in enumerate(groups) if group]
        self.finish_storescu(procs, len(files))
        return time.perf_counter() - start

    @contextlib.contextmanager
    def storescp_running(self, folder: Path, *, fork: bool = False) -> Iterator[int]:
        """`storescp -od folder PORT` (one child per association with `fork`); yields the port."""
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [self.storescp, "-od", str(folder), *(["--fork"] if fork else []), str(port)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=DCMTK_ENV)
        try:
            wait_until(lambda: self.echo(port), 30, "storescp to answer C-ECHO", 0.1)
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: storescp and its forked children
            proc.wait(timeout=30)
