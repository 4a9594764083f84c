"""The pipelined worker (worker.prefetch > 0, worker.batch_size > 1) against the sequential one, on
SQLite and PostgreSQL: same results, each job once, jobs claimed ahead handed back on stop, failures
as before, a failing batch rerun image by image."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from osteo_node import migrate
from osteo_node.bundle import load_bundle
from osteo_node.config import Settings, parse_settings
from osteo_node.db import Instance, Job, Result, make_engine
from osteo_node.infer import Inference
from osteo_node.pipeline import Examined, Loaded
from osteo_node.queue import DONE, FAILED, INFER, QUEUED, REFER, RUNNING, JobRecord, Queue, Received
from osteo_node.store import FileStore
from osteo_node.work import Worker

from dicom_tools import synthetic_dx
from tinymodels import export_tiny_bundle


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    bundle = export_tiny_bundle(tmp_path_factory.mktemp("bundle"), "tiny-work")
    loaded = Inference(load_bundle(bundle), device="cpu")
    yield loaded
    loaded.close()


@pytest.fixture
def queue(database_url: str) -> Iterator[Queue]:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    yield Queue(engine)
    engine.dispose()


def settings(tmp_path: Path, prefetch: int, batch_size: int = 1) -> Settings:
    return parse_settings({"node": {"data_dir": str(tmp_path / "var")}, "destinations": [],
                           "worker": {"prefetch": prefetch, "batch_size": batch_size,
                                      "poll_interval_s": 0.01}}, tmp_path)


def receive(queue: Queue, store: FileStore, folder: Path, seeds: range, *, tag: str = "",
            broken: frozenset[int] = frozenset()) -> list[int]:
    """Store one woman's chest DX per seed and queue its infer job (as the receiver does); the
    pixel data of `broken` seeds is cut short. `tag` gives the same pixels new UIDs. Job ids."""
    job_ids = []
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = synthetic_dx(folder / f"{tag}{seed}.dcm", sex="F", age=70, size=96, seed=seed)
        ds = dcmread(path)
        if tag:
            uid = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), tag])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.PatientID = f"{ds.PatientID}-{tag}"
        if seed in broken:
            ds.PixelData = ds.PixelData[:100]
        ds.save_as(path)
        relative = store.incoming_path(str(ds.SOPInstanceUID))
        store.write(relative, path.read_bytes())
        _, job_id = queue.record_received(Received(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID), path=relative, size_bytes=path.stat().st_size,
            calling_ae="STORESCU", eligible=True, reason="test"))
        assert job_id is not None
        job_ids.append(job_id)
    return job_ids


def jobs(queue: Queue, kind: str = INFER) -> dict[int, Job]:
    with Session(queue.engine) as session:
        rows = session.scalars(select(Job).where(Job.kind == kind)).all()
        session.expunge_all()
    return {job.id: job for job in rows}


def results(queue: Queue) -> dict[int, Result]:
    """instance id -> its result (exactly one each)."""
    with Session(queue.engine) as session:
        rows = session.scalars(select(Result)).all()
        session.expunge_all()
    found = {row.instance_id: row for row in rows}
    assert len(found) == len(rows)
    return found


def test_prefetch_gives_the_sequential_results_each_job_once(
        queue: Queue, inference: Inference, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="osteo_node")
    store = FileStore(tmp_path / "store")
    seeds = range(7)
    sequential_ids = receive(queue, store, tmp_path / "a", seeds)
    Worker(settings(tmp_path, 0), queue, store, inference).run(threading.Event(), until_idle=True)
    pipelined_ids = receive(queue, store, tmp_path / "b", seeds, tag="9")
    worker = Worker(settings(tmp_path, 2), queue, store, inference)
    worker.run(threading.Event(), until_idle=True)

    infer = jobs(queue)
    assert all(infer[i].state == DONE and infer[i].attempts == 1 for i in sequential_ids + pipelined_ids)
    refer = jobs(queue, REFER)  # the follow-up jobs were queued and run too
    assert len(refer) == 2 * len(seeds) and all(j.state == DONE for j in refer.values())
    for job_id in pipelined_ids:  # each job ran once: one result line in the log
        assert sum(f"job {job_id}: instance " in r.getMessage() for r in caplog.records) == 1
    found = results(queue)
    for a, b in zip(sequential_ids, pipelined_ids):
        first, second = found[infer[a].instance_id], found[infer[b].instance_id]
        assert (second.p_normal, second.p_osteopenia, second.p_osteoporosis, second.category) == \
            (first.p_normal, first.p_osteopenia, first.p_osteoporosis, first.category)
        for kind in ("sr_path", "sc_path"):
            ours, theirs = (dcmread(store.absolute(getattr(r, kind))) for r in (first, second))
            assert theirs.SOPInstanceUID != ours.SOPInstanceUID  # another source, another object
            if kind == "sc_path":
                assert theirs.PixelData == ours.PixelData
            else:
                assert len(theirs.ContentSequence) == len(ours.ContentSequence)


def test_batches_give_the_sequential_results_and_a_failing_batch_is_rerun_image_by_image(
        queue: Queue, inference: Inference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    store = FileStore(tmp_path / "store")
    seeds = range(7)
    sequential_ids = receive(queue, store, tmp_path / "a", seeds)
    Worker(settings(tmp_path, 0), queue, store, inference).run(threading.Event(), until_idle=True)
    batched_ids = receive(queue, store, tmp_path / "b", seeds, tag="9")
    with Session(queue.engine) as session:
        culprit = session.get(Instance, jobs(queue)[batched_ids[4]].instance_id).sop_instance_uid
    worker = Worker(settings(tmp_path, 1, batch_size=3), queue, store, inference)
    examine, batches = worker.examine, []

    def examine_or_fail(loaded: list[Loaded]) -> list[Examined]:
        batches.append(len(loaded))
        if any(str(item.source.SOPInstanceUID) == culprit for item in loaded):
            raise RuntimeError("the device ran out of memory")
        return examine(loaded)

    monkeypatch.setattr(worker, "examine", examine_or_fail)
    worker.run(threading.Event(), until_idle=True)

    assert max(batches) == 3 and 1 in batches  # batches of 3; the failing one rerun image by image
    assert "a batch of 3 images failed (RuntimeError); running them one by one" in caplog.text
    infer = jobs(queue)
    failed = infer[batched_ids[4]]
    assert (failed.state, failed.attempts) == (QUEUED, 1)  # only the culprit, retried with backoff
    assert "the device ran out of memory" in (failed.last_error or "")
    ok = [(a, b) for a, b in zip(sequential_ids, batched_ids) if b != batched_ids[4]]
    assert all(infer[b].state == DONE and infer[b].attempts == 1 for _, b in ok)
    found = results(queue)
    for a, b in ok:
        first, second = found[infer[a].instance_id], found[infer[b].instance_id]
        assert second.category == first.category
        assert (second.p_normal, second.p_osteopenia, second.p_osteoporosis) == pytest.approx(
            (first.p_normal, first.p_osteopenia, first.p_osteoporosis), abs=1e-5)
        ours, theirs = (dcmread(store.absolute(r.sc_path)).pixel_array.astype(int) for r in (first, second))
        assert abs(ours - theirs).max() <= 1  # the same overlay, up to rounding of the map


def test_stop_hands_back_jobs_claimed_ahead(queue: Queue, inference: Inference, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="osteo_node")
    store = FileStore(tmp_path / "store")
    job_ids = receive(queue, store, tmp_path, range(5))
    stop = threading.Event()
    worker = Worker(settings(tmp_path, 2), queue, store, inference)
    examine = worker.examine

    def examine_then_stop(loaded: list[Loaded]) -> list[Examined]:
        stop.set()  # SIGTERM while the model runs on the first image, two more claimed ahead
        return examine(loaded)

    monkeypatch.setattr(worker, "examine", examine_then_stop)
    worker.run(stop)

    infer = jobs(queue)
    assert infer[job_ids[0]].state == DONE  # started: finished and recorded before run returned
    assert list(results(queue)) == [infer[job_ids[0]].instance_id]
    for job_id in job_ids[1:]:  # claimed ahead (two of them) or never claimed: all back in the queue
        job = infer[job_id]
        assert (job.state, job.attempts, job.lease_owner, job.lease_expires_at) == (QUEUED, 0, None, None)
    assert caplog.text.count("handed back to the queue") == 2
    assert queue.claim("next", 60, [INFER]).attempts == 1


def test_a_broken_image_fails_permanently_and_the_others_complete(
        queue: Queue, inference: Inference, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FileStore(tmp_path / "store")
    job_ids = receive(queue, store, tmp_path, range(5), broken=frozenset({1}))
    Worker(settings(tmp_path, 2), queue, store, inference).run(threading.Event(), until_idle=True)
    infer = jobs(queue)
    assert infer[job_ids[1]].state == FAILED and infer[job_ids[1]].attempts == 1
    assert "pixel data cannot be decoded" in (infer[job_ids[1]].last_error or "")
    assert [infer[i].state for i in job_ids if i != job_ids[1]] == [DONE] * 4
    assert f"job {job_ids[1]} failed permanently" in caplog.text
    assert "Synthetic^F" not in caplog.text and "SYN-F" not in caplog.text  # no patient data


def test_an_error_while_reporting_is_retried_and_the_others_complete(
        queue: Queue, inference: Inference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "store")
    job_ids = receive(queue, store, tmp_path, range(4))
    worker = Worker(settings(tmp_path, 2), queue, store, inference)
    record = worker.record

    def record_or_fail(job: JobRecord, *args: Any) -> None:
        if job.id == job_ids[2]:
            raise OSError("disk gone")
        record(job, *args)

    monkeypatch.setattr(worker, "record", record_or_fail)
    worker.run(threading.Event(), until_idle=True)
    infer = jobs(queue)
    failed = infer[job_ids[2]]
    assert (failed.state, failed.attempts, failed.last_error) == (QUEUED, 1, "OSError: disk gone")
    assert failed.next_attempt_at > failed.updated_at  # retried later, with backoff
    assert [infer[i].state for i in job_ids if i != job_ids[2]] == [DONE] * 3


def test_database_error_while_recording_leaves_the_job_to_its_lease(
        queue: Queue, inference: Inference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The database is gone when the finisher records one result: the loop logs it and goes on."""
    store = FileStore(tmp_path / "store")
    job_ids = receive(queue, store, tmp_path, range(4))
    complete, fail = queue.complete, queue.fail

    def gone(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(job: JobRecord, *args: Any, **kwargs: Any) -> Any:
            if job.id == job_ids[0]:
                raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection"))
            return original(job, *args, **kwargs)
        return call

    monkeypatch.setattr(queue, "complete", gone(complete))
    monkeypatch.setattr(queue, "fail", gone(fail))
    stop = threading.Event()
    worker = threading.Thread(target=Worker(settings(tmp_path, 2), queue, store, inference).run,
                              args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not all(jobs(queue)[i].state == DONE for i in job_ids[1:]):
            assert time.monotonic() < deadline, "the other jobs were not done"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive()
    lost = jobs(queue)[job_ids[0]]
    assert (lost.state, lost.attempts) == (RUNNING, 1)  # taken up again when its lease expires
    assert "database unavailable (OperationalError)" in caplog.text


def test_a_loaded_image_keeps_its_header_and_not_its_pixels(inference: Inference, tmp_path: Path) -> None:
    from osteo_node import pipeline

    path = synthetic_dx(tmp_path / "dx.dcm", sex="F", age=70, size=96, seed=1)
    loaded = pipeline.load(path, inference.bundle.spec, 512)
    assert "PixelData" not in loaded.source and getattr(loaded.source, "_pixel_array", None) is None
    assert loaded.source.SOPInstanceUID == dcmread(path).SOPInstanceUID
    assert loaded.prepared.display.shape == (96, 96)
    screening = pipeline.report(pipeline.examine([loaded], inference)[0])  # the reports need no pixels
    assert screening.sc.Rows >= 96 and screening.sr.ContentSequence


def test_load_inference_warms_up_on_a_synthetic_image_and_keeps_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from osteo_node.node import load_inference

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the synthetic image is written
    bundle = export_tiny_bundle(tmp_path / "bundle", "tiny-warm")
    config = parse_settings({"model": {"bundle": str(bundle)}}, tmp_path)
    with caplog.at_level(logging.INFO, logger="osteo_node.node"):
        inference = load_inference(config)
    try:
        assert any(r.getMessage().startswith("warmed up on a synthetic image in ") for r in caplog.records)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the synthetic image is gone
        assert inference.identity.name == "tiny-warm"
    finally:
        inference.close()
