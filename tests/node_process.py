"""Run the node as users do: `osteo-node serve|receive|work --config FILE` in a subprocess
(osteo_node.bench.processes, shared with the bench)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from osteo_node.bench import processes
from osteo_node.db import Job, make_engine

from conftest import free_port
from dicom_tools import echoscu


def write_config(folder: Path, *, database_url: str, bundle: str, pacs_port: int,
                 destinations: list[dict[str, Any]] | None = None,
                 **sections: dict[str, Any]) -> Path:
    """A node config for tests: fast polling and retries, one destination `pacs` (C-STORE to
    ORTHANC on `pacs_port`) unless `destinations` are given."""
    port = free_port()
    base: dict[str, Any] = {
        "node": {"data_dir": str(folder / "var"), "log_level": "INFO"},
        "dicom": {"port": port},
        "database": {"url": database_url},
        "model": {"bundle": bundle, "torch_threads": 1},
        "worker": {"poll_interval_s": 0.2, "lease_s": 4.0, "retry_base_s": 0.5, "retry_max_s": 2.0,
                   "max_attempts": 50},
        "storage": {"min_free_disk_mb": 0},
        "metrics": {"port": free_port(), "receiver_port": free_port()},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    base["destinations"] = destinations if destinations is not None else [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}]
    return processes.write_config(folder / "node.toml", base)


class NodeProcess(processes.NodeProcess):
    """One `osteo-node COMMAND` process; by default `start` waits until it answers C-ECHO."""

    @property
    def port(self) -> int:
        from osteo_node.config import load_settings

        return load_settings(self.config).dicom.port

    def start(self, wait_for_echo: bool = True) -> "NodeProcess":
        super().start()
        if wait_for_echo:
            self.wait_ready(lambda: echoscu(self.port), 180, "C-ECHO answer")
        return self

    def http(self, path: str) -> tuple[int, str]:
        """GET the node's metrics/health endpoint: (status, body)."""
        import urllib.error
        import urllib.request

        from osteo_node.config import load_settings

        metrics = load_settings(self.config).metrics
        port = metrics.receiver_port if self.command == "receive" else metrics.port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def jobs_done(database_url: str, expected: int) -> bool:
    """True once `expected` jobs exist and all are done; raises as soon as one is dead-lettered."""
    found = jobs(database_url)
    failed = [(j.id, j.kind, j.last_error) for j in found if j.state == "failed"]
    if failed:
        raise AssertionError(f"dead-lettered jobs: {failed}")
    return len(found) == expected and all(j.state == "done" for j in found)


def jobs(database_url: str) -> list[Job]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(Job).order_by(Job.id)))
    finally:
        engine.dispose()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
