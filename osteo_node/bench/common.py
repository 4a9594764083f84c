"""What every bench section shares: image counts, summaries, scratch databases, the node's
settings for one run, and the queue's progress."""

from __future__ import annotations

import math
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from ..config import Settings, parse_settings
from ..queue import DONE, FAILED, SEND, Queue


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and p95 (nearest rank) of `values`, in the same unit."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p95": p95}


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


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

    def __enter__(self) -> ScratchDatabases:
        return self

    def __exit__(self, *_exc: object) -> None:
        while self.created:
            self._execute(f'DROP DATABASE IF EXISTS "{self.created.pop()}" WITH (FORCE)')


def node_settings(base: Settings, folder: Path, *, database_url: str, pacs_port: int | None = None,
                  poll_s: float = 0.05) -> Settings:
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
    raw["worker"]["poll_interval_s"] = poll_s
    raw["web"] = {}
    raw["destinations"] = ([{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
                           if pacs_port else [])
    return parse_settings(raw, folder)


def send_jobs_done(queue: Queue) -> int:
    """Send jobs done so far; raises RuntimeError as soon as any job was dead-lettered."""
    failed = queue.counts()[FAILED]
    if failed:
        raise RuntimeError(f"bench: {failed} jobs were dead-lettered")
    return queue.counts(SEND)[DONE]


def all_jobs_done(queue: Queue) -> bool:
    counts = queue.counts()
    return counts[DONE] == sum(counts.values())
