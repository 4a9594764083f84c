"""The node end to end: DCMTK storescu as the modality, Orthanc as the PACS, the node in between.

Each test runs on SQLite and again on PostgreSQL.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from osteo_node.codes import CATEGORY_CODES
from osteo_node.records import CLASS_NAMES

from conftest import free_port
from dicom_tools import dciodvfy_errors, storescu, synthetic_dx
from node_process import NodeProcess, jobs, jobs_done, wait_for, write_config
from orthanc import Orthanc

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


@pytest.fixture
def stack(tmp_path: Path, database_url: str, e2e_bundle: str) -> Iterator[tuple[Orthanc, Path]]:
    """Orthanc started; a node config pointing at it (the node itself is started by the test)."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    config = write_config(tmp_path, database_url=database_url, bundle=e2e_bundle,
                          pacs_port=pacs.dicom_port, dicom={"port": node_port})
    try:
        yield pacs, config
    finally:
        pacs.stop()


def results_by_source(pacs: Orthanc) -> dict[str, Counter[str]]:
    """source SOP Instance UID -> count of SR and SC objects the node stored in the PACS."""
    found: dict[str, Counter[str]] = {}
    for orthanc_id in pacs.get("/instances"):
        ds = dcmread(__import__("io").BytesIO(pacs.file(orthanc_id)))
        if ds.SOPClassUID == SR_CLASS:
            source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            found.setdefault(source, Counter())["sr"] += 1
        elif ds.SOPClassUID == SC_CLASS:
            source = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            found.setdefault(source, Counter())["sc"] += 1
    return found


def test_chest_radiographs_come_back_as_sr_and_sc(stack: tuple[Orthanc, Path], tmp_path: Path,
                                                  database_url: str, e2e_bundle: str) -> None:
    pacs, config = stack
    config = write_config(tmp_path, database_url=database_url, bundle=e2e_bundle,
                          pacs_port=pacs.dicom_port, dicom={"port": pacs.node_port},
                          node={"log_format": "json"})
    pacs.start()
    node = NodeProcess(config).start()
    try:
        chest, chest_j2k = Path(get_testdata_file("RG1_UNCR.dcm")), Path(get_testdata_file("RG1_J2KR.dcm"))
        tibia = Path(get_testdata_file("RG3_UNCR.dcm"))
        man = synthetic_dx(tmp_path / "man.dcm", sex="M")
        assert storescu(node.port, chest, tibia, man) == ["Success"] * 3
        assert storescu(node.port, chest_j2k, extra=("-xv",)) == ["Success"]
        # PACS -> node routing of a woman's DX that Orthanc holds
        woman = synthetic_dx(tmp_path / "woman.dcm", sex="F", age=71, seed=3)
        routed = pacs.route_to_node(pacs.upload(woman))
        assert routed.get("FailedInstancesCount", 0) == 0, routed
        eligible = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (chest, chest_j2k, woman)}
        wait_for(lambda: jobs_done(database_url, 9), 240, "3 infer, 3 send and 3 refer jobs done")
        by_source = results_by_source(pacs)
        assert set(by_source) == eligible, node.log()[-3000:]
        assert all(c == Counter({"sr": 1, "sc": 1}) for c in by_source.values())
        for orthanc_id in pacs.get("/instances"):
            path = tmp_path / f"{orthanc_id}.dcm"
            path.write_bytes(pacs.file(orthanc_id))
            ds = dcmread(path)
            if ds.SOPClassUID not in (SR_CLASS, SC_CLASS):
                continue
            assert dciodvfy_errors(path) == [], ds.SOPClassUID
            if ds.SOPClassUID == SR_CLASS:
                check_sr(ds)
        assert node.http("/healthz") == (200, "ok\n")
        status, metrics = node.http("/metrics")
        assert status == 200
        for line in ('osteo_received_total{outcome="eligible"} 3.0',
                     'osteo_received_total{outcome="ineligible"} 2.0',
                     'osteo_sent_total{destination="pacs"} 3.0',
                     'osteo_queue_jobs{state="done"} 9.0',
                     'osteo_stage_seconds_count{stage="model"} 3.0'):
            assert line in metrics, line
        assert "osteo_model_info{" in metrics and "osteo_processed_total{" in metrics
    finally:
        assert node.stop() == 0
    log = node.log()
    patients = [dcmread(p, stop_before_pixels=True) for p in (chest, tibia, man, woman)]
    for ds in patients:  # no patient name or ID anywhere in a full run's log
        assert str(ds.PatientName) not in log and str(ds.PatientID) not in log, ds.PatientID
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    results = [r for r in records if "job_id" in r]
    assert len(results) == 3 and {r["sop_instance_uid"] for r in results} == eligible
    assert all(r["levelname"] and r["name"].startswith("osteo_node") for r in results)


def sr_probabilities(ds: object) -> tuple[str, list[float]]:
    """(source SOP Instance UID, [P(normal), P(osteopenia), P(osteoporosis)]) read from an SR."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    values: dict = {}
    for item in sr.ContentSequence:
        _collect(item, values)
    source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return str(source), [values[name] for name in CLASS_NAMES]


def check_sr(ds: object) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    values = {}
    for item in sr.ContentSequence:
        _collect(item, values)
    probabilities = sr_probabilities(ds)[1]
    assert abs(sum(probabilities) - 1.0) < 1e-4
    predicted = CLASS_NAMES[max(range(3), key=lambda i: probabilities[i])]
    assert CATEGORY_CODES[predicted].value in values["codes"]


def _collect(item: object, values: dict) -> None:
    """Walk the SR tree: numeric items by concept meaning, coded values in `codes`."""
    values.setdefault("codes", set())
    if getattr(item, "ValueType", "") == "NUM":
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning.lower()
        for name in CLASS_NAMES:
            if name in meaning and "probability" in meaning:
                values[name] = float(item.MeasuredValueSequence[0].NumericValue)
    if getattr(item, "ValueType", "") == "CODE":
        values["codes"].add(item.ConceptCodeSequence[0].CodeValue)
    for child in getattr(item, "ContentSequence", []):
        _collect(child, values)


def test_worker_killed_mid_job_completes_after_restart_without_duplicates(
    stack: tuple[Orthanc, Path], database_url: str
) -> None:
    """The job is held in progress: its stored file is swapped for a named pipe, so the worker
    that claims it blocks reading it (a screening takes ~0.2 s, too short to catch reliably by
    polling under load), and is SIGKILLed there; the file is put back and a new worker finishes."""
    pacs, config = stack
    pacs.start()
    receiver = NodeProcess(config, "receive").start()
    worker = None
    try:
        chest = Path(get_testdata_file("RG1_UNCR.dcm"))
        assert storescu(receiver.port, chest) == ["Success"]
        (job,) = jobs(database_url)
        stored = _stored_path(config, database_url, job.instance_id)
        kept = stored.with_name("kept")
        os.replace(stored, kept)
        os.mkfifo(stored)
        worker = NodeProcess(config, "work").start(wait_for_echo=False)
        wait_for(lambda: jobs(database_url)[0].state == "running", 120, "the worker to claim the job")
        worker.kill()  # SIGKILL while the job is in progress
        (job,) = jobs(database_url)
        assert (job.state, job.attempts) == ("running", 1)
        os.replace(kept, stored)
        worker = NodeProcess(config, "work").start(wait_for_echo=False)
        wait_for(lambda: jobs_done(database_url, 3), 180, "infer, send, refer done after restart")
        infer = jobs(database_url)[0]
        assert infer.attempts == 2  # the killed attempt, then the one that finished
        assert results_by_source(pacs) == {str(dcmread(chest).SOPInstanceUID): Counter(sr=1, sc=1)}
        # A worker that dies after sending but before recording sends again: same UIDs, one copy.
        from sqlalchemy import update
        from sqlalchemy.orm import Session

        from osteo_node.db import Job, make_engine

        engine = make_engine(database_url)
        with Session(engine) as session, session.begin():
            session.execute(update(Job).where(Job.kind == "send").values(state="queued"))
        engine.dispose()
        wait_for(lambda: jobs_done(database_url, 3), 60, "the repeated send")
        assert len(pacs.get("/instances")) == 2
    finally:
        if worker is not None:
            worker.stop()
        receiver.stop()


def _stored_path(config: Path, database_url: str, instance_id: int) -> Path:
    """Absolute path of a received instance's stored file."""
    from osteo_node.config import load_settings
    from osteo_node.db import make_engine
    from osteo_node.results import stored_file

    engine = make_engine(database_url)
    try:
        _, relative = stored_file(engine, instance_id)
    finally:
        engine.dispose()
    return load_settings(config).node.store_dir / relative


def test_results_wait_for_a_pacs_that_is_down(stack: tuple[Orthanc, Path], database_url: str) -> None:
    pacs, config = stack  # not started: the PACS is down
    node = NodeProcess(config).start()
    try:
        chest = Path(get_testdata_file("RG1_UNCR.dcm"))
        assert storescu(node.port, chest) == ["Success"]
        wait_for(lambda: any(j.kind == "send" and j.attempts >= 2 and j.state == "queued"
                             for j in jobs(database_url)), 120, "failed send attempts")
        (send,) = [j for j in jobs(database_url) if j.kind == "send"]
        assert "association rejected or no answer" in (send.last_error or "")
        pacs.start()
        wait_for(lambda: jobs_done(database_url, 3), 120, "delivery once the PACS is back")
        assert results_by_source(pacs) == {str(dcmread(chest).SOPInstanceUID): Counter(sr=1, sc=1)}
    finally:
        node.stop()
