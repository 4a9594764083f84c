"""An infer job records who and what it screened (screened_images) with the live model's result, in
the same transaction, once per instance, whichever way the worker runs; no patient ID is logged.
On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from osteo_node import migrate
from osteo_node.bundle import load_bundle
from osteo_node.config import parse_settings
from osteo_node.db import Result, ScreenedImage, make_engine
from osteo_node.infer import Inference
from osteo_node.queue import Queue, Received
from osteo_node.store import FileStore
from osteo_node.work import Worker

from dicom_tools import synthetic_dx
from tinymodels import export_tiny_bundle


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    loaded = Inference(load_bundle(export_tiny_bundle(tmp_path_factory.mktemp("b"), "tiny-screen")),
                       device="cpu")
    yield loaded
    loaded.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_each_screened_instance_gets_one_row_with_its_header_facts(
        database_url: str, inference: Inference, tmp_path: Path, prefetch: int,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="osteo_node")
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    queue, store = Queue(engine), FileStore(tmp_path / "store")
    for seed, (issuer, study_date, view) in enumerate([("HOSP", "20260115", "PA"),
                                                       ("", "", "AP")]):
        path = synthetic_dx(tmp_path / f"{seed}.dcm", sex="F", age=72, size=96, seed=seed, view=view)
        ds = dcmread(path)
        if issuer:
            ds.IssuerOfPatientID = issuer
        ds.StudyDate = study_date  # the second: no StudyDate, so its AcquisitionDate counts
        ds.AcquisitionDate = "20260110"
        ds.save_as(path)
        relative = store.incoming_path(str(ds.SOPInstanceUID))
        store.write(relative, path.read_bytes())
        queue.record_received(Received(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                       str(ds.StudyInstanceUID), relative, path.stat().st_size,
                                       "STORESCU", True, "test"))
    settings = parse_settings({"node": {"data_dir": str(tmp_path / "var")},
                               "worker": {"prefetch": prefetch, "poll_interval_s": 0.01}}, tmp_path)
    Worker(settings, queue, store, inference).run(threading.Event(), until_idle=True)
    with Session(engine) as session:
        found = {(r.patient_id, r.issuer_of_patient_id, r.image_date, r.age, r.manufacturer,
                  r.modality, r.view_position)
                 for r in session.scalars(select(ScreenedImage).order_by(ScreenedImage.id))}
        pairs = {(r.instance_id, s.instance_id) for r, s in session.execute(
            select(Result, ScreenedImage).join(ScreenedImage,
                                               ScreenedImage.instance_id == Result.instance_id))}
    engine.dispose()
    assert found == {("SYN-F-0", "HOSP", dt.date(2026, 1, 15), 72.0, "osteo-node tests", "DX", "PA"),
                     ("SYN-F-1", "", dt.date(2026, 1, 10), 72.0, "osteo-node tests", "DX", "AP")}
    assert len(pairs) == 2  # one per result, same instance
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SYN-F" not in logged
