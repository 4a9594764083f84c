"""`osteo-node` commands run as subprocesses, as an operator would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from node_process import write_config
from orthanc import Orthanc
from osteo_node.db import make_engine
from osteo_node.queue import Queue, Received, RetryPolicy


def osteo_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osteo_node.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[model]\ndevice = "tpu"\n[dicom]\nport = 0\n')
    result = osteo_node("check", "--config", str(config))
    assert result.returncode == 2
    assert "model.device: Input should be 'cpu', 'cuda' or 'auto' (got 'tpu')" in result.stderr
    assert "dicom.port" in result.stderr


def test_serve_refuses_a_missing_bundle(tmp_path: Path) -> None:
    config = write_config(tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite3",
                          bundle=str(tmp_path / "no-such-bundle"), pacs_port=4242)
    result = osteo_node("serve", "--config", str(config))
    assert result.returncode == 2
    assert "no model bundle at" in result.stderr and "no-such-bundle" in result.stderr


@pytest.mark.integration
def test_check_reports_each_part(tmp_path: Path, e2e_bundle: str) -> None:
    pacs = Orthanc(tmp_path / "orthanc", free_port())
    config = write_config(tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite3", bundle=e2e_bundle,
                          pacs_port=pacs.dicom_port)
    down = osteo_node("check", "--config", str(config))
    assert down.returncode == 1
    assert "FAIL database: schema missing: run `osteo-node db upgrade" in down.stdout
    assert "FAIL destination pacs (C-ECHO)" in down.stdout
    assert osteo_node("db", "upgrade", "--config", str(config)).returncode == 0
    assert "models and migrations agree" in osteo_node("db", "check", "--config", str(config)).stdout
    pacs.start()
    try:
        ok = osteo_node("check", "--config", str(config))
    finally:
        pacs.stop()
    assert ok.returncode == 0, ok.stdout
    assert "ok   database" in ok.stdout and "ok   destination pacs (C-ECHO)" in ok.stdout
    assert "ok   model bundle" in ok.stdout


def test_jobs_list_show_retry(tmp_path: Path, database_url: str) -> None:
    config = write_config(tmp_path, database_url=database_url, bundle="reference", pacs_port=4242)
    assert osteo_node("db", "upgrade", "--config", str(config)).returncode == 0
    engine = make_engine(database_url)
    queue = Queue(engine)
    queue.record_received(Received("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "incoming/x.dcm",
                                   1, "STORESCU", True, "eligible"))
    job = queue.claim("w", 60)
    queue.fail(job, "decode failed: test", RetryPolicy(1, 1, 1))
    engine.dispose()
    listed = osteo_node("jobs", "list", "--state", "failed", "--config", str(config))
    assert "failed" in listed.stdout and "decode failed: test" in listed.stdout
    shown = osteo_node("jobs", "show", str(job.id), "--config", str(config))
    assert '"sop_instance_uid": "1.2.3.4"' in shown.stdout
    assert osteo_node("jobs", "retry", str(job.id), "--config", str(config)).returncode == 0
    assert "queued" in osteo_node("jobs", "list", "--config", str(config)).stdout
    assert osteo_node("jobs", "retry", str(job.id), "--config", str(config)).returncode == 1
