"""The wheel, as a site installs it: built from the tracked files, installed (not editable) into a
fresh virtual environment, it migrates a database and serves until its receiver answers C-ECHO.

The new environment gets this environment's site-packages as a plain path (a .pth line: their
own .pth files, among them this checkout's editable install, are not run), so that torch and the
other dependencies are not downloaded again; osteo_node itself comes from the wheel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import tomli_w

from conftest import free_port, require_tool
from dicom_tools import echoscu

ROOT = Path(__file__).resolve().parents[1]
#: Not part of a source tree: what a checkout, a venv or an earlier build leaves next to it.
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                  ".pytest_cache", ".ruff_cache", ".mypy_cache", "var", "runs",
                                  "test-artifacts")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _environment() -> dict[str, str]:
    """This environment without PYTHONPATH (which would put the checkout's osteo_node first)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUNBUFFERED": "1"}


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=_environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "osteo-node"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source,
         cwd=out)
    (found,) = out.glob("osteo_node-*.whl")
    return found


def test_the_wheel_carries_migrations_and_bundle_but_not_the_training_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "osteo_node/migrations/env.py" in names and "osteo_node/migrations/script.py.mako" in names
    assert any(n.startswith("osteo_node/migrations/versions/0001_") for n in names)
    assert "osteo_node/bundles/reference/bundle.json" in names
    assert "osteo_node/bench/run.py" in names and "training/cli.py" in names
    assert not [n for n in names if n.startswith("training/data/")]


def test_installed_wheel_upgrades_the_database_and_serves(wheel: Path, tmp_path: Path) -> None:
    require_tool("echoscu")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
         cwd=tmp_path)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                     cwd=tmp_path).stdout.strip())
    (site / "osteo-node-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = _run(python, "-c", "import osteo_node; print(osteo_node.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's code, not the checkout's

    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(tomli_w.dumps({
        "node": {"data_dir": str(tmp_path / "var")},
        "dicom": {"port": port},
        "model": {"torch_threads": 1},
        "metrics": {"port": 0, "receiver_port": 0},
        "storage": {"min_free_disk_mb": 0},
    }))
    osteo_node = venv / "bin" / "osteo-node"
    assert "up to date" in _run(osteo_node, "db", "upgrade", "--config", config, cwd=tmp_path).stdout
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([str(osteo_node), "serve", "--config", str(config)], cwd=tmp_path,
                                 env=_environment(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not echoscu(port):
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        serve.send_signal(signal.SIGTERM)
        status = serve.wait(timeout=60)
    assert status == 0, log.read_text()[-3000:]
    assert "stopped" in log.read_text()
