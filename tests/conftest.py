"""Shared fixtures: system tools, free ports, a fresh database per test (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_ADMIN_URL = os.environ.get(
    "OSTEO_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


def require_tool(name: str) -> str:
    """Absolute path of a system tool; skip when missing (fail instead under CI=true)."""
    path = shutil.which(name, path="/usr/bin:/usr/sbin:/usr/local/bin:/bin")
    if path is None:
        message = f"{name} not installed (Debian: dcmtk, dicom3tools, orthanc)"
        if IN_CI:
            pytest.fail(f"{message}; CI must have it")
        pytest.skip(message)
    return path


#: This pytest-xdist worker's own block of ports, below Linux's ephemeral range (32768-60999).
#: A port from bind(("127.0.0.1", 0)) is free only until the next bind anywhere on the machine:
#: when a test stops a server to simulate an outage, another worker's server or an outgoing
#: connection could take its port before it starts again. Blocks per worker rule that out.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORT_BLOCK = range(21000 + 1000 * _WORKER, 22000 + 1000 * _WORKER)
_next_ports = itertools.cycle(_PORT_BLOCK)


def free_port() -> int:
    """A loopback port that is free now and that no other test worker hands out."""
    for _ in _PORT_BLOCK:
        port = next(_next_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORT_BLOCK}")


def _postgres_available() -> str | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(exc).__name__}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    problem = _postgres_available()
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    name = f"osteo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database per test: SQLite file, then the same test on PostgreSQL (a real server:
    the integration tier)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def e2e_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundle the end-to-end tests serve: the shipped reference when present, else a tiny one."""
    from osteo_node.bundle import BUNDLES_DIR

    if (BUNDLES_DIR / "reference" / "bundle.json").is_file():
        return "reference"
    from tinymodels import export_tiny_bundle

    return str(export_tiny_bundle(tmp_path_factory.mktemp("bundle"), "tiny-e2e"))


#: The simulated new site of the end-to-end tests (test_site_e2e, test_site_validation_e2e): one
#: cohort of the second rendering chain, rendered once per run. 140 images give about 110 screened
#: women with a DXA result, enough for the reference's low-BMD AUC CI to exclude 0.75 there.
SITE_IMAGES = 140
SITE_SEED = 7


@pytest.fixture(scope="session")
def site_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the site's images/ and manifest.csv (training.site_phantoms.generate_site)."""
    from training.site_phantoms import SiteOptions, generate_site

    out = tmp_path_factory.mktemp("site")
    generate_site(out, SITE_IMAGES, seed=SITE_SEED, options=SiteOptions(size=256), workers=2)
    return out


@contextlib.contextmanager
def served_web(settings: Any, engine: Any) -> Iterator[str]:
    """The web app over `engine`, served by uvicorn on loopback in a thread of this process, as
    `osteo-node web` serves it; yields its base URL and stops the server afterwards."""
    import uvicorn

    from osteo_node.web import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine=engine), host="127.0.0.1",
                                           port=settings.web.port, access_log=False,
                                           log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "web server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.web.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
