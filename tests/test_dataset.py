"""`osteo-node dataset export`: DXA pairing, de-identified copies and a manifest training reads."""

from __future__ import annotations

import csv
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from osteo_node import dxa, migrate
from osteo_node.dataset import MANIFEST_COLUMNS, export, pair_dxa, split_of
from osteo_node.db import Instance, ScreenedImage, make_engine
from osteo_node.deidentify import Pseudonymizer, deidentify, load_key
from osteo_node.errors import ImageError
from osteo_node.store import FileStore
from osteo_node.synthetic import synthetic_dx
from tests.conftest import require_tool
from training.data import read_manifest

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def add_image(engine: Engine, store: FileStore, source: Path, patient: str, image_date: dt.date,
              issuer: str = "") -> int:
    """Store `source` as a received, screened instance of `patient` (as the worker records it)."""
    ds = pydicom.dcmread(source)
    uid = str(ds.SOPInstanceUID)
    relative = store.incoming_path(uid)
    store.write(relative, source.read_bytes())
    with Session(engine) as session, session.begin():
        instance = Instance(sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID),
                            study_instance_uid=str(ds.StudyInstanceUID), path=relative,
                            size_bytes=source.stat().st_size, calling_ae="TEST", eligible=True,
                            reason="eligible")
        session.add(instance)
        session.flush()
        session.add(ScreenedImage(instance_id=instance.id, patient_id=patient, issuer_of_patient_id=issuer,
                                  image_date=image_date, age=67.0, manufacturer=str(ds.get("Manufacturer", "")),
                                  modality=str(ds.Modality), view_position=str(ds.get("ViewPosition", ""))))
        return instance.id


def add_dxa(engine: Engine, patient: str, day: dt.date, spine: float, hip: float | None = None,
            supersedes: int | None = None, issuer: str = "") -> int:
    reading = dxa.DxaReading(patient, issuer, day, spine, None, hip, "csv", "test")
    return dxa.record(engine, reading, supersedes_id=supersedes).id


@pytest.fixture
def site(engine: Engine, tmp_path: Path) -> tuple[Engine, FileStore, dict[str, int]]:
    """Four patients: A (two images, one DXA between them), B (DXA beyond the window), C (a
    corrected DXA), D (no DXA)."""
    store = FileStore(tmp_path / "store")
    images = tmp_path / "sources"
    images.mkdir()
    ids = {
        "A1": add_image(engine, store, synthetic_dx(images / "a1.dcm", sex="F", seed=1), "PAT-A", dt.date(2025, 1, 10)),
        "A2": add_image(engine, store, synthetic_dx(images / "a2.dcm", sex="F", seed=2), "PAT-A", dt.date(2025, 6, 1)),
        "B": add_image(engine, store, synthetic_dx(images / "b.dcm", sex="F", seed=3), "PAT-B", dt.date(2025, 1, 10)),
        "D": add_image(engine, store, synthetic_dx(images / "d.dcm", sex="F", seed=5), "PAT-D", dt.date(2025, 1, 10)),
    }
    cr = get_testdata_file("RG1_UNCR.dcm")
    assert cr is not None, "pydicom-data is a test dependency"
    ids["C"] = add_image(engine, store, Path(cr), "PAT-C", dt.date(2025, 3, 1), issuer="HOSP")
    add_dxa(engine, "PAT-A", dt.date(2025, 5, 1), -2.7, -1.9)  # 31 days from A2, 111 from A1
    add_dxa(engine, "PAT-A", dt.date(2023, 1, 1), 0.5)  # beyond the window for both
    add_dxa(engine, "PAT-B", dt.date(2026, 2, 1), -1.5)  # 387 days after B
    wrong = add_dxa(engine, "PAT-C", dt.date(2025, 3, 5), -3.0, issuer="HOSP")
    add_dxa(engine, "PAT-C", dt.date(2025, 3, 5), -0.4, supersedes=wrong, issuer="HOSP")
    add_dxa(engine, "PAT-C", dt.date(2025, 3, 5), -3.5)  # same id, other issuer: another patient
    return engine, store, ids


def test_pairing_takes_the_nearest_dxa_within_the_window(site: tuple[Engine, FileStore, dict[str, int]]) -> None:
    engine, _, ids = site
    pairs = {p.instance_id: p for p in pair_dxa(engine, 365)}
    assert set(pairs) == {ids["A2"], ids["C"]}  # A's DXA pairs with A2, the nearer of her images
    assert pairs[ids["A2"]].lowest_t == -2.7 and pairs[ids["A2"]].interval_days == -31
    assert pairs[ids["C"]].lowest_t == -0.4  # the correction, not the superseded result
    assert {p.instance_id for p in pair_dxa(engine, 400)} == {ids["A2"], ids["B"], ids["C"]}
    assert {p.instance_id for p in pair_dxa(engine, 60)} == {ids["A2"], ids["C"]}


def test_export_writes_deidentified_copies_and_a_manifest_training_reads(
        site: tuple[Engine, FileStore, dict[str, int]], tmp_path: Path) -> None:
    engine, store, _ = site
    out = tmp_path / "export"
    summary = export(engine, store, out, Pseudonymizer(KEY), 365)
    assert (summary.exported, summary.patients, summary.skipped) == (2, 2, {})
    with summary.manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        assert tuple(rows[0]) == MANIFEST_COLUMNS
    by_class = sorted((r["class"], r["t_score"]) for r in rows)
    assert by_class == [("normal", "-0.40"), ("osteoporosis", "-2.70")]
    training_rows = read_manifest(summary.manifest)
    assert len(training_rows) == 2 and all(r.path.is_file() for r in training_rows)
    splits: dict[str, set[str]] = {}
    for r in training_rows:
        splits.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 2

    originals = {"PAT-A", "PAT-C", "SYN-F-1", "SYN-F-2", "Synthetic^F1", "ACC00001", "HOSP"}
    for row in rows:
        assert row["patient_id"].startswith("ANON-")
        raw = (out / row["file"]).read_bytes()
        for identifier in originals:
            assert identifier.encode() not in raw, identifier
        copy = pydicom.dcmread(out / row["file"])
        assert copy.PatientIdentityRemoved == "YES"
        assert copy.PatientID == copy.PatientName == row["patient_id"]
        assert copy.PatientBirthDate == "" and copy.AccessionNumber == ""
        assert not any(element.tag.is_private for element in copy)
        codes = {item.CodeValue for item in copy.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113108", "113107"}
        assert copy.PatientSex == "F" and copy.Modality in ("DX", "CR")
    # RG1 (a real CR with institution, station, serial number, other IDs and comments) loses them;
    # its pixels are untouched.
    cr_row = next(r for r in rows if r["t_score"] == "-0.40")
    original = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    copy = pydicom.dcmread(out / cr_row["file"])
    raw = (out / cr_row["file"]).read_bytes()
    for keyword in ("InstitutionName", "StationName", "DeviceSerialNumber", "OtherPatientIDs",
                    "ImageComments", "InstanceCreatorUID", "PatientBirthDate"):
        assert keyword in original
        assert not copy.get(keyword), keyword
    for value in (str(original.PatientName), str(original.PatientID), str(original.InstitutionName)):
        assert value.encode() not in raw, value
    assert copy.PixelData == original.PixelData
    assert copy.SOPInstanceUID != original.SOPInstanceUID
    assert copy.StudyInstanceUID != original.StudyInstanceUID


def test_pseudonyms_uids_and_date_offsets_are_consistent_per_key() -> None:
    one, other = Pseudonymizer(KEY), Pseudonymizer(bytes(32))
    assert one.patient("P1", "") == one.patient("P1", "") != one.patient("P1", "ISSUER")
    assert one.patient("P1", "") != other.patient("P1", "")
    assert one.uid("1.2.3") == one.uid("1.2.3") != other.uid("1.2.3")
    offsets = {one.date_offset(one.patient(f"P{i}", "")).days for i in range(50)}
    assert min(offsets) >= 1 and max(offsets) <= 365 and len(offsets) > 30
    assert Pseudonymizer(KEY, dates="keep").date_offset("ANON-X").days == 0
    with pytest.raises(ValueError, match="dates must be one of"):
        Pseudonymizer(KEY, dates="drop")
    assert split_of(one.patient("P1", "")) in ("train", "val", "test")
    shares = [split_of(one.patient(f"P{i}", "")) for i in range(2000)]
    assert 0.65 < shares.count("train") / 2000 < 0.75


def test_dates_shift_within_a_patient_keep_intervals(tmp_path: Path) -> None:
    pseudonymizer = Pseudonymizer(KEY)
    ds = pydicom.dcmread(synthetic_dx(tmp_path / "x.dcm", sex="F"))
    block = ds.private_block(0x0019, "ACME 1.1", create=True)
    block.add_new(0x01, "LO", "patient's nickname")
    pseudonym = pseudonymizer.patient(str(ds.PatientID), "")
    copy = deidentify(ds, pseudonym, pseudonymizer)
    shifted = dt.datetime.strptime(copy.StudyDate, "%Y%m%d").date()
    assert dt.date(2026, 1, 15) - shifted == pseudonymizer.date_offset(pseudonym)
    assert not any(element.tag.is_private for element in copy)
    kept = deidentify(ds, pseudonym, Pseudonymizer(KEY, dates="keep"))
    assert kept.StudyDate == "20260115"
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(ImageError, match="BurnedInAnnotation"):
        deidentify(ds, pseudonym, pseudonymizer)


def test_key_is_created_once_and_private(tmp_path: Path) -> None:
    key = load_key(tmp_path / "data")
    assert load_key(tmp_path / "data") == key and len(key) == 32
    assert (tmp_path / "data" / "deidentify.key").stat().st_mode & 0o077 == 0


@pytest.mark.integration
def test_deidentification_adds_no_dciodvfy_error(site: tuple[Engine, FileStore, dict[str, int]],
                                                 tmp_path: Path) -> None:
    """dciodvfy finds nothing in a copy that it does not find in the sources (the synthetic DX
    and RG1 have errors of their own); the Type 2 patient/study attributes stay present."""
    tool = require_tool("dciodvfy")
    engine, store, _ = site

    def errors(path: Path) -> set[str]:
        run = subprocess.run([tool, str(path)], check=False, capture_output=True, text=True)
        return {line for line in run.stderr.splitlines() if line.startswith("Error")}

    sources = [*(tmp_path / "sources").glob("*.dcm"), Path(str(get_testdata_file("RG1_UNCR.dcm")))]
    known = set().union(*(errors(path) for path in sources))
    export(engine, store, tmp_path / "export", Pseudonymizer(KEY), 365)
    for copy in (tmp_path / "export" / "images").glob("*.dcm"):
        assert errors(copy) <= known, errors(copy) - known


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_exports_and_refuses_a_non_empty_folder(site: tuple[Engine, FileStore, dict[str, int]],
                                                    tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{database_url}"\n'
                      "[validation]\nmatch_window_days = 400\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "osteo_node.cli", "dataset", "export", "--config", str(config)]
    run = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env=env, check=False)
    assert run.returncode == 0, run.stderr
    assert "exported 3 images of 3 patients" in run.stdout
    assert "PAT-" not in run.stdout + run.stderr
    again = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                           env=env, check=False)
    assert again.returncode == 2 and "is not empty" in again.stderr
