"""Real DICOM peers for tests: DCMTK storescu/echoscu and a synthetic chest DX factory."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from osteo_node.synthetic import DX_FOR_PRESENTATION, synthetic_dx

from conftest import require_tool

__all__ = ["DX_FOR_PRESENTATION", "synthetic_dx", "storescu", "echoscu", "dciodvfy_errors"]


def storescu(port: int, *files: Path, called: str = "OSTEO_NODE", calling: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> list[str]:
    """Send `files` with DCMTK storescu over one association; returns one status text per file."""
    tool = require_tool("storescu")
    out = subprocess.run(
        [tool, "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
         *[str(f) for f in files]],
        capture_output=True, text=True, timeout=300,
    )
    text = out.stdout + out.stderr
    return re.findall(r"Received Store Response \(([^)]*)\)", text) or [text.strip()[-300:]]


def echoscu(port: int, called: str = "OSTEO_NODE", calling: str = "ECHOSCU") -> bool:
    tool = require_tool("echoscu")
    out = subprocess.run([tool, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                         capture_output=True, text=True, timeout=60)
    return out.returncode == 0


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy reports for the object at `path` (IOD validation)."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in result.stderr.splitlines() if "Error" in line]
