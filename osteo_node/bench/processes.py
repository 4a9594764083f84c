"""`osteo-node COMMAND --config FILE` as a subprocess, and the config file it reads: the one
place the bench and the tests start the node as users do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ..config import Settings


def settings_config(settings: Settings) -> dict[str, Any]:
    """`settings` as the tables of a config file (what `load_settings` reads back), without the
    web section (the node's commands don't read it)."""
    data = settings.model_dump(mode="json", exclude_none=True)
    data.pop("web", None)
    # Sections as flat tables (nested ones such as TLS are left out); destinations as [[destinations]].
    return {section: values if section == "destinations" else
            {k: v for k, v in values.items() if not isinstance(v, dict)}
            for section, values in data.items()}


def write_config(path: Path, config: Mapping[str, Any] | Settings) -> Path:
    """Write a config file: its tables, or `Settings` (settings_config)."""
    tables = settings_config(config) if isinstance(config, Settings) else config
    path.write_text(tomli_w.dumps(dict(tables)), encoding="utf-8")
    return path


class NodeProcess:
    """One `osteo-node COMMAND --config FILE` process (this interpreter, `-m osteo_node.cli`);
    its output goes to a log file next to the config."""

    def __init__(self, config: Path, command: str = "serve", *, name: str | None = None) -> None:
        self.config = config
        self.command = command
        self.log_path = config.parent / f"{name or command}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "osteo_node.cli", self.command, "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("NodeProcess.start() has not been called")
        return self.process.pid

    def check(self) -> None:
        """Raise RuntimeError, with the end of its log, when the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"osteo-node {self.command} exited ({self.process.returncode}):\n"
                               f"{self.log()[-3000:]}")

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `ready` until true; RuntimeError (with the log) when the process exits or time
        runs out, after stopping it (no process outlives a failed start)."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"osteo-node {self.command}: no {what} within {timeout:.0f} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM (graceful shutdown), SIGKILL after 60 s; the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
