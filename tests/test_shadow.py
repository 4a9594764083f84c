"""Shadow models: roles (live, shadow), promote and rollback, and a worker that screens with the
shadows after the live work, stores their results and never sends or refers them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from osteo_node import migrate, roles, work
from osteo_node.bundle import load_bundle, read_manifest
from osteo_node.config import Settings, parse_settings
from osteo_node.db import (
    AuditEvent,
    Job,
    ModelAssignment,
    Referral,
    Result,
    make_engine,
)
from osteo_node.errors import ConfigError, JobError
from osteo_node.infer import Inference
from osteo_node.queue import DONE, INFER, QUEUED, SEND, SHADOW, Queue, Received
from osteo_node.store import FileStore
from osteo_node.work import Worker

from dicom_tools import synthetic_dx
from tinymodels import export_tiny_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    return {name: export_tiny_bundle(folder / name, name) for name in ("tiny-live", "tiny-shadow")}


@pytest.fixture(scope="module")
def inferences(bundles: dict[str, Path]) -> Iterator[dict[str, Inference]]:
    loaded = {name: Inference(load_bundle(path), device="cpu") for name, path in bundles.items()}
    yield loaded
    for inference in loaded.values():
        inference.close()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def node_settings(tmp_path: Path, bundles: dict[str, Path], **extra: object) -> Settings:
    raw: dict[str, object] = {
        "node": {"data_dir": str(tmp_path / "var")},
        "model": {"bundle": str(bundles["tiny-live"]), "shadow": [str(bundles["tiny-shadow"])]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "worker": {"prefetch": 0, "poll_interval_s": 0.01},
        "referral": {"low_bmd_threshold": 0.0, "osteoporosis_threshold": 0.0},  # refer everyone
    }
    raw.update(extra)
    return parse_settings(raw, tmp_path)


def device_uid(bundle: Path) -> str:
    return str(read_manifest(bundle)["device_uid"])


# --- roles ---------------------------------------------------------------------------------------


def test_config_lists_each_model_once(tmp_path: Path, bundles: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"model: .*model.shadow must list each bundle once"):
        parse_settings({"model": {"bundle": "reference", "shadow": ["reference"]}}, tmp_path)
    settings = node_settings(tmp_path, bundles)
    assert settings.model.shadow == (str(bundles["tiny-shadow"]),)


def test_promote_and_rollback_are_versioned_and_audited(
        engine: Engine, tmp_path: Path, bundles: dict[str, Path]) -> None:
    settings = node_settings(tmp_path, bundles)
    live_uid, shadow_uid = device_uid(bundles["tiny-live"]), device_uid(bundles["tiny-shadow"])
    start = roles.model_roles(settings, engine)
    assert (start.live.device_uid, [m.device_uid for m in start.shadows]) == (live_uid, [shadow_uid])
    assert start.role_of(shadow_uid) == roles.SHADOW and start.role_of("2.25.1") == roles.RETIRED
    with pytest.raises(roles.RoleError, match="nothing to roll back"):
        roles.rollback(settings, engine, actor="cli:test")
    with pytest.raises(roles.RoleError, match="already live"):
        roles.promote(settings, engine, "tiny-live", actor="cli:test")
    with pytest.raises(roles.RoleError, match="no configured model is called 'other'; configured: .*tiny-shadow"):
        roles.promote(settings, engine, "other", actor="cli:test")

    promoted = roles.promote(settings, engine, "tiny-shadow", actor="cli:test", reason="better AUC")
    assert promoted.live.device_uid == shadow_uid
    assert [m.device_uid for m in promoted.shadows] == [live_uid]  # the old live model is shadowed
    back = roles.rollback(settings, engine, actor="cli:test")
    assert back.live.device_uid == live_uid and back.assignment_id > promoted.assignment_id
    with Session(engine) as session:
        history = session.scalars(select(ModelAssignment).order_by(ModelAssignment.id)).all()
        assert [(h.action, h.live_device_uid, h.previous_device_uid) for h in history] == [
            ("promote", shadow_uid, live_uid), ("rollback", live_uid, shadow_uid)]
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [(e.action, e.object_id, e.actor) for e in events] == [
            ("model.promote", shadow_uid, "cli:test"), ("model.rollback", live_uid, "cli:test")]
        assert "reason: better AUC" in events[0].detail


def test_a_recorded_live_model_that_is_not_configured_falls_back_to_the_bundle(
        engine: Engine, tmp_path: Path, bundles: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path, bundles)
    roles.promote(settings, engine, "tiny-shadow", actor="cli:test")
    without_shadow = node_settings(tmp_path, bundles, model={"bundle": str(bundles["tiny-live"])})
    current = roles.model_roles(without_shadow, engine)
    assert current.live.device_uid == device_uid(bundles["tiny-live"]) and current.shadows == ()
    assert "is not configured any more" in caplog.text


# --- the worker ----------------------------------------------------------------------------------


def receive(queue: Queue, store: FileStore, folder: Path, seeds: range) -> list[int]:
    """Store one woman's chest DX per seed and queue its infer job, as the receiver does."""
    instance_ids = []
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = synthetic_dx(folder / f"{seed}.dcm", sex="F", age=70, size=96, seed=seed)
        ds = dcmread(path)
        relative = store.incoming_path(str(ds.SOPInstanceUID))
        store.write(relative, path.read_bytes())
        instance_id, job_id = queue.record_received(Received(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID), path=relative, size_bytes=path.stat().st_size,
            calling_ae="STORESCU", eligible=True, reason="test"))
        assert job_id is not None
        instance_ids.append(instance_id)
    return instance_ids


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the worker C-STOREs (the DICOM peer itself is exercised in test_e2e/test_send)."""
    paths: list[Path] = []
    monkeypatch.setattr(work, "send_files", lambda _destination, files, _ae: paths.extend(files))
    return paths


def make_worker(settings: Settings, engine: Engine, store: FileStore, inferences: dict[str, Inference]) -> Worker:
    current = roles.model_roles(settings, engine)
    shadow = inferences["tiny-shadow"]
    return Worker(settings, Queue(engine), store, inferences["tiny-live"],
                  shadows={shadow.identity.device_uid: shadow}, roles=current)


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [0, 2])
def test_shadow_results_are_stored_after_live_work_and_never_sent_or_referred(
        engine: Engine, tmp_path: Path, bundles: dict[str, Path], inferences: dict[str, Inference],
        sent: list[Path], prefetch: int) -> None:
    settings = node_settings(tmp_path, bundles, worker={"prefetch": prefetch, "poll_interval_s": 0.01})
    store = FileStore(tmp_path / "store")
    queue = Queue(engine)
    instance_ids = receive(queue, store, tmp_path / "in", range(3))
    make_worker(settings, engine, store, inferences).run(threading.Event(), until_idle=True)

    live_uid, shadow_uid = device_uid(bundles["tiny-live"]), device_uid(bundles["tiny-shadow"])
    with Session(engine) as session:
        results = session.scalars(select(Result)).all()
        assert sorted((r.instance_id, r.device_uid) for r in results) == sorted(
            (i, uid) for i in instance_ids for uid in (live_uid, shadow_uid))
        jobs = session.scalars(select(Job)).all()
        assert all(job.state == DONE for job in jobs), [(j.kind, j.state, j.last_error) for j in jobs]
        shadow_jobs = [j for j in jobs if j.kind == SHADOW]
        assert sorted(j.destination for j in shadow_jobs) == [shadow_uid] * 3
        # Lower priority: every live job (infer, send, refer) was done before the first shadow job.
        first_shadow = min(j.finished_at for j in shadow_jobs if j.finished_at is not None)
        assert all(j.finished_at is not None and j.finished_at <= first_shadow
                   for j in jobs if j.kind != SHADOW)
        live_files = {store.absolute(r.sr_path) for r in results if r.device_uid == live_uid} | {
            store.absolute(r.sc_path) for r in results if r.device_uid == live_uid}
        referrals = session.scalars(select(Referral)).all()
        assert len(referrals) == 3 and {r.device_uid for r in referrals} == {live_uid}
    assert len(sent) == 6 and set(sent) == live_files  # SR + SC of the live model only


@pytest.mark.slow
def test_send_takes_the_live_result_even_when_a_shadow_result_is_newer(
        engine: Engine, tmp_path: Path, bundles: dict[str, Path], inferences: dict[str, Inference],
        sent: list[Path]) -> None:
    """The old `_latest_result` sent the newest result of an instance, whatever the model."""
    settings = node_settings(tmp_path, bundles, referral={"enabled": False})
    store = FileStore(tmp_path / "store")
    queue = Queue(engine)
    [instance_id] = receive(queue, store, tmp_path / "in", range(1))
    worker = make_worker(settings, engine, store, inferences)
    assert worker.run_once()  # infer (live): queues send and shadow
    assert worker.run_once()  # send
    sent.clear()
    assert worker.run_once()  # shadow: a newer result row
    assert not worker.run_once()
    with Session(engine) as session, session.begin():
        send_job = session.scalar(select(Job).where(Job.kind == SEND))
        assert send_job is not None
        send_job.state = QUEUED  # deliver again (e.g. an operator's retry)
    assert worker.run_once()
    live = worker._live_result(instance_id)
    assert live.device_uid == device_uid(bundles["tiny-live"])
    assert set(sent) == {store.absolute(live.sr_path), store.absolute(live.sc_path)}


@pytest.mark.slow
def test_after_a_promote_a_running_worker_stops_screening_and_says_so(
        engine: Engine, tmp_path: Path, bundles: dict[str, Path], inferences: dict[str, Inference],
        sent: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    settings = node_settings(tmp_path, bundles, referral={"enabled": False})
    store = FileStore(tmp_path / "store")
    queue = Queue(engine)
    first, second = receive(queue, store, tmp_path / "in", range(2))
    worker = make_worker(settings, engine, store, inferences)
    infer = worker.claim()
    assert infer is not None and infer.kind == INFER
    worker.run_job(infer)  # screened by tiny-live: a live result, its send queued

    roles.promote(settings, engine, "tiny-shadow", actor="cli:test")
    caplog.set_level(logging.ERROR, logger="osteo_node")
    job = worker.claim()  # the send of the first instance; the second's infer stays queued
    assert job is not None and job.kind == SEND and worker.stale
    assert "it stops screening" in caplog.text
    with pytest.raises(JobError, match="which is not live: not sent or referred"):
        worker.run_job(job)
    assert sent == []
    assert worker.claim() is None  # no infer, no shadow job for a stale worker
    with Session(engine) as session:
        pending = session.scalars(select(Job).where(Job.kind == INFER, Job.state == QUEUED)).all()
        assert [j.instance_id for j in pending] == [second]
    assert first != second
