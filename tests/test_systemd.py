"""systemd units: `systemd-analyze verify` is clean on every unit we ship."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))
INSTALLED = "/opt/osteo-node/.venv/bin/osteo-node"


@pytest.mark.integration
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    # The units name the installed location; point them at this checkout's console script.
    here = str(Path(sys.executable).parent / "osteo-node")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED, here))
    result = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_units_are_hardened() -> None:
    assert len(UNITS) >= 2
    for unit in UNITS:
        text = unit.read_text()
        for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes"):
            assert option in text, f"{unit.name}: {option} missing"
