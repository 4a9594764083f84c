"""`osteo-node` commands as an operator runs them: `cli.main` in this process for what needs no
server (arguments, config, jobs), a subprocess where the real entry point matters."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from osteo_node import cli
from osteo_node.db import make_engine
from osteo_node.queue import Queue, Received, RetryPolicy

from conftest import free_port
from node_process import write_config
from orthanc import Orthanc


def osteo_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osteo_node.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def main(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """`osteo-node ARGS` in this process: (exit status, stdout, stderr); the root logger that
    `cli.main` configures is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str, str]:
        status = cli.main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


def test_bad_config_names_the_key(tmp_path: Path, main: Callable[..., tuple[int, str, str]]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[model]\ndevice = "tpu"\n[dicom]\nport = 0\n')
    status, _, err = main("check", "--config", str(config))
    assert status == 2
    assert "model.device: Input should be 'cpu', 'cuda' or 'auto' (got 'tpu')" in err
    assert "dicom.port" in err


def test_serve_refuses_a_missing_bundle(tmp_path: Path, main: Callable[..., tuple[int, str, str]]) -> None:
    config = write_config(tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite3",
                          bundle=str(tmp_path / "no-such-bundle"), pacs_port=4242)
    status, _, err = main("serve", "--config", str(config))
    assert status == 2
    assert "no model bundle at" in err and "no-such-bundle" in err


@pytest.mark.slow
def test_the_console_entry_point_refuses_a_bad_config(tmp_path: Path) -> None:
    """The same refusal through the real entry point, as a subprocess (exit status and stderr)."""
    config = tmp_path / "bad.toml"
    config.write_text('[model]\ndevice = "tpu"\n')
    result = osteo_node("check", "--config", str(config))
    assert result.returncode == 2 and "model.device" in result.stderr


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


def test_jobs_list_show_retry(tmp_path: Path, database_url: str,
                             main: Callable[..., tuple[int, str, str]]) -> None:
    config = str(write_config(tmp_path, database_url=database_url, bundle="reference", pacs_port=4242))
    assert main("db", "upgrade", "--config", config)[0] == 0
    engine = make_engine(database_url)
    queue = Queue(engine)
    queue.record_received(Received("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "incoming/x.dcm",
                                   1, "STORESCU", True, "eligible"))
    job = queue.claim("w", 60)
    queue.fail(job, "decode failed: test", RetryPolicy(1, 1, 1))
    engine.dispose()
    listed = main("jobs", "list", "--state", "failed", "--config", config)[1]
    assert "failed" in listed and "decode failed: test" in listed
    status, shown, _ = main("jobs", "show", str(job.id), "--config", config)
    assert status == 0 and '"sop_instance_uid": "1.2.3.4"' in shown
    assert main("jobs", "show", "999", "--config", config)[0] == 1
    assert main("jobs", "retry", str(job.id), "--config", config)[0] == 0
    assert "queued" in main("jobs", "list", "--config", config)[1]
    assert main("jobs", "retry", str(job.id), "--config", config)[0] == 1


def test_work_refuses_an_outdated_schema_and_names_the_command(
        tmp_path: Path, main: Callable[..., tuple[int, str, str]]) -> None:
    from alembic import command

    from osteo_node import migrate

    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    config = str(write_config(tmp_path, database_url=url, bundle="reference", pacs_port=4242))
    engine = make_engine(url)
    with engine.begin() as connection:  # a database left by an older osteo-node: revision 0002
        alembic = migrate.alembic_config(url)
        alembic.attributes["connection"] = connection
        command.upgrade(alembic, "0002")
    engine.dispose()
    for process in ("work", "receive"):
        status, _, err = main(process, "--config", config)
        assert status == 2
        assert "schema is at revision 0002" in err and f"`osteo-node db upgrade --config {config}`" in err
    assert main("db", "upgrade", "--config", config)[0] == 0
    engine = make_engine(url)
    current, head = migrate.revisions(engine)
    engine.dispose()
    assert current == head is not None
