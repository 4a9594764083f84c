"""Fault injection, load and multi-worker tests: every accepted instance is accounted for and
no result reaches the PACS twice (checked in Orthanc)."""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text
from test_e2e import results_by_source

from conftest import free_port, require_tool
from dicom_tools import storescu, synthetic_dx
from node_process import NodeProcess, jobs, jobs_done, wait_for, write_config
from orthanc import Orthanc

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def women(folder: Path, n: int, start: int = 0) -> list[Path]:
    """n small chest DX images of women aged 50-89, each its own patient and study."""
    folder.mkdir(parents=True, exist_ok=True)
    return [synthetic_dx(folder / f"w{i}.dcm", sex="F", age=50 + i % 40, size=128, seed=1000 + i)
            for i in range(start, start + n)]


def uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def exactly_once(pacs: Orthanc, sources: set[str]) -> None:
    found = results_by_source(pacs)
    assert set(found) == sources
    duplicates = {uid: c for uid, c in found.items() if c != Counter(sr=1, sc=1)}
    assert not duplicates, duplicates


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'node.sqlite3'}"


def stack(tmp_path: Path, database_url: str, bundle: str, processes: int = 1,
          lease_s: float = 4.0) -> Iterator[tuple[Orthanc, Path]]:
    """Orthanc (not started) and a node config pointing at it; referrals off (not under test).
    `processes`: the receiver's processes on its port (dicom.processes). `lease_s`: short, so that
    a killed worker's job is taken up again within seconds."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    config = write_config(tmp_path, database_url=database_url, bundle=bundle,
                          pacs_port=pacs.dicom_port,
                          dicom={"port": node_port, "max_associations": 20, "processes": processes},
                          worker={"lease_s": lease_s}, referral={"enabled": False})
    try:
        yield pacs, config
    finally:
        pacs.stop()


@pytest.fixture
def pacs_and_config(tmp_path: Path, database_url: str, e2e_bundle: str) -> Iterator[tuple[Orthanc, Path]]:
    """On SQLite, then on PostgreSQL."""
    yield from stack(tmp_path, database_url, e2e_bundle)


@pytest.fixture
def pacs_and_postgres(tmp_path: Path, postgres_url: str, e2e_bundle: str) -> Iterator[tuple[Orthanc, Path]]:
    """Several workers share one PostgreSQL database (SQLite serves a single host's worker); the
    receiver runs two processes on its port (dicom.processes = 2)."""
    yield from stack(tmp_path, postgres_url, e2e_bundle, processes=2)


@pytest.fixture
def pacs_and_postgres_under_load(tmp_path: Path, postgres_url: str,
                                 e2e_bundle: str) -> Iterator[tuple[Orthanc, Path]]:
    """As pacs_and_postgres, with the default lease (300 s): no worker is killed here, and with 10
    senders, two receiver processes and two workers on two cores a job can take longer than the
    4 s lease of the fault tests, which would hand it to the other worker (attempts 2) and fail
    the exactly-once count for a reason that is not under test."""
    yield from stack(tmp_path, postgres_url, e2e_bundle, processes=2, lease_s=300.0)


@pytest.fixture
def pacs_and_sqlite(tmp_path: Path, sqlite_url: str, e2e_bundle: str) -> Iterator[tuple[Orthanc, Path]]:
    yield from stack(tmp_path, sqlite_url, e2e_bundle)


def test_load_ten_associations_two_workers(pacs_and_postgres_under_load: tuple[Orthanc, Path], tmp_path: Path,
                                           postgres_url: str) -> None:
    """10 concurrent associations x 50 images into two receiver processes, processed by two
    worker processes; no job twice."""
    pacs, config = pacs_and_postgres_under_load
    database_url = postgres_url
    pacs.start()
    receiver = NodeProcess(config, "receive").start()
    workers = [NodeProcess(config, "work").start(wait_for_echo=False) for _ in range(2)]
    try:
        batches = [women(tmp_path / f"batch{b}", 50, start=50 * b) for b in range(10)]
        tool = require_tool("storescu")
        senders = [subprocess.Popen([tool, "-aet", f"MOD{b}", "-aec", "OSTEO_NODE", "127.0.0.1",
                                     str(receiver.port), *map(str, files)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for b, files in enumerate(batches)]
        for sender in senders:
            output = sender.communicate(timeout=600)[0].decode()
            assert sender.returncode == 0 and "Error" not in output, output[-2000:]
        wait_for(lambda: jobs_done(database_url, 1000), 1500, "500 infer + 500 send jobs", interval=2)
        infer = [j for j in jobs(database_url) if j.kind == "infer"]
        assert len(infer) == 500 and all(j.attempts == 1 for j in infer)
        done_by = Counter()
        for worker in workers:
            for job in infer:
                if f"job {job.id}: instance " in worker.log():
                    done_by[job.id] += 1
        assert set(done_by.values()) == {1} and len(done_by) == 500  # each job run exactly once
        per_worker = [sum(f"job {j.id}: instance " in w.log() for j in infer) for w in workers]
        assert min(per_worker) > 0, per_worker  # both workers shared the load
        exactly_once(pacs, set().union(*(uids(b) for b in batches)))
        assert re.search(r"receiver process \d+ ready", receiver.log())
    finally:
        for worker in workers:
            worker.stop()
        receiver.stop()


def test_worker_sigkilled_at_random_points(pacs_and_sqlite: tuple[Orthanc, Path], tmp_path: Path,
                                           sqlite_url: str) -> None:
    """20 runs: a new image, a worker started and SIGKILLed at a random point of its life:
    while starting, while a job is running (at a random moment), or after its jobs finished."""
    pacs, config = pacs_and_sqlite
    database_url = sqlite_url
    pacs.start()
    receiver = NodeProcess(config, "receive").start()
    rng = random.Random(7)
    images = women(tmp_path / "images", 20)
    points = Counter()
    try:
        for n, image in enumerate(images, start=1):
            assert storescu(receiver.port, image) == ["Success"]
            worker = NodeProcess(config, "work").start(wait_for_echo=False)
            point = rng.choice(["starting", "running", "running", "finished"])

            def finished(n: int = n) -> bool:
                found = jobs(database_url)
                return len(found) == 2 * n and all(j.state == "done" for j in found)

            if point == "starting":
                time.sleep(rng.uniform(0.0, 1.0))
            elif point == "running":
                # A job runs for ~0.2 s: polling under load may miss it; the run then counts as
                # finished.
                wait_for(lambda: any(j.state == "running" for j in jobs(database_url)) or finished(),
                         120, "a job in hand", interval=0.01)
                time.sleep(rng.uniform(0.0, 0.05))
                if finished():
                    point = "finished"
            else:
                wait_for(finished, 120, "this run's jobs done")
            worker.kill()
            points[point] += 1
        worker = NodeProcess(config, "work").start(wait_for_echo=False)
        wait_for(lambda: jobs_done(database_url, 40), 600, "every job done after the kills", interval=1)
        exactly_once(pacs, uids(images))
        assert points["running"] > 0 and any(j.attempts > 1 for j in jobs(database_url))
    finally:
        worker.stop()
        receiver.stop()


def test_pacs_down_with_fifty_studies_in_flight(pacs_and_config: tuple[Orthanc, Path], tmp_path: Path,
                                                database_url: str) -> None:
    pacs, config = pacs_and_config  # not started
    node = NodeProcess(config).start()
    try:
        images = women(tmp_path / "images", 50)
        assert storescu(node.port, *images) == ["Success"] * 50
        wait_for(lambda: sum(j.kind == "infer" and j.state == "done" for j in jobs(database_url)) == 50
                 and all(j.attempts >= 1 for j in jobs(database_url) if j.kind == "send"),
                 600, "inference done, sends failing", interval=1)
        pacs.start()
        wait_for(lambda: jobs_done(database_url, 100), 600, "all delivered once the PACS is back", interval=1)
        exactly_once(pacs, uids(images))
    finally:
        node.stop()


def test_database_connections_dropped(pacs_and_postgres: tuple[Orthanc, Path], tmp_path: Path,
                                      postgres_url: str) -> None:
    """The server drops every connection of the node after each image; work goes on."""
    pacs, config = pacs_and_postgres
    database_url = postgres_url
    pacs.start()
    node = NodeProcess(config).start()
    try:
        images = women(tmp_path / "images", 10)
        name = database_url.rsplit("/", 1)[1]
        admin = create_engine(database_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        for image in images:
            assert storescu(node.port, image) == ["Success"]
            with admin.connect() as connection:  # drop every connection the node holds
                connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
        admin.dispose()
        wait_for(lambda: jobs_done(database_url, 20), 300, "all jobs done after the drops", interval=1)
        exactly_once(pacs, uids(images))
    finally:
        node.stop()
