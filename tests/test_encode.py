"""SR and SC encoding: every object is written to bytes, read back and validated."""

from __future__ import annotations

import io
import math
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

from osteo_node import codes
from osteo_node.encode import (
    HEAT_FLOOR,
    KOS_SERIES_NUMBER,
    SC_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    build_kos,
    build_sc,
    build_sr,
    kos_description,
    summary_lines,
    to_bytes,
)
from osteo_node.records import CLASS_NAMES, BoneAttention, Heatmap, ModelIdentity, Prediction

from conftest import require_tool

DEVICE_UID = "1.2.826.0.1.3680043.8.498.777001"
OTHER_DEVICE_UID = "1.2.826.0.1.3680043.8.498.777002"
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
)


def model(device_uid: str = DEVICE_UID, clinical_use: bool = False) -> ModelIdentity:
    return ModelIdentity(
        name="reference", version="1.0.0", device_uid=device_uid, backbone="dinov2",
        method="lora", manufacturer="osteo-node project", software_version="0.1.0",
        clinical_use=clinical_use,
    )


def prediction(device_uid: str = DEVICE_UID, clinical_use: bool = False) -> Prediction:
    # float32 softmax output, as the model gives it
    logits = np.array([0.2, 1.1, 1.7], dtype=np.float32)
    probs = np.exp(logits) / np.exp(logits).sum()
    return Prediction(
        probabilities=tuple(float(p) for p in probs),  # type: ignore[arg-type]
        category="osteoporosis",
        model=model(device_uid, clinical_use),
    )


def rg1() -> pydicom.Dataset:
    """Real female chest CR, MONOCHROME1, no ImagerPixelSpacing (pydicom-data)."""
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def synthetic_dx() -> pydicom.Dataset:
    """Small male chest DX with ImagerPixelSpacing (so highdicom builds the image library)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.100.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.100.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.100.2"
    ds.PatientName = "Test^Male"
    ds.PatientID = "DX-001"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "M"
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.AccessionNumber, ds.StudyID = "ACC42", "S42"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.Modality = "DX"
    ds.Manufacturer = "Synthetic"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows, ds.Columns = 96, 80
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(96 * 80, dtype=np.uint16) % 4096).tobytes()
    return ds


SOURCES = {"rg1_cr": rg1, "synthetic_dx": synthetic_dx}


@pytest.fixture(params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> pydicom.Dataset:
    return SOURCES[request.param]()


def read_sr(data: bytes) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(io.BytesIO(data))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def report_of(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The TID 1500 root of an SR read back from bytes."""
    return hd.sr.MeasurementReport.from_sequence([sr])


def display_and_heat(rows: int = 120, cols: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A gradient 'radiograph' and a hot blob in the top-left quadrant."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    display = ((yy * 2 + xx) % 256).astype(np.uint8)
    heat = np.exp(-(((yy - 30) / 12.0) ** 2 + ((xx - 25) / 12.0) ** 2)).astype(np.float32)
    return display, heat


# --------------------------------------------------------------------------------------------
# SR
# --------------------------------------------------------------------------------------------


def test_sr_round_trip(source: pydicom.Dataset) -> None:
    pred = prediction()
    sr = read_sr(to_bytes(build_sr(source, pred)))

    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesNumber == SR_SERIES_NUMBER and sr.InstanceNumber == 1
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in PATIENT_STUDY:
        assert sr.get(keyword) == source.get(keyword), keyword

    report = report_of(sr)
    (group,) = report.get_image_measurement_groups()
    values = [
        group.get_measurements(name=codes.PROBABILITY_CODES[name])[0].value
        for name in CLASS_NAMES
    ]
    assert math.isclose(math.fsum(values), 1.0, abs_tol=1e-6)
    assert values == pytest.approx(pred.probabilities, abs=1e-9)
    assert all(
        m.unit == codes.concept(codes.UNIT_ONE) for m in group.get_measurements()
    )
    (category,) = group.get_qualitative_evaluations(name=codes.PREDICTED_CATEGORY)
    assert category.value == codes.concept(codes.OSTEOPOROSIS)
    assert category.value.value == "64859006"

    (ref,) = group.source_images
    assert ref.referenced_sop_instance_uid == source.SOPInstanceUID
    assert ref.referenced_sop_class_uid == source.SOPClassUID
    evidence_uids = {e[2] for e in sr.get_evidence()}
    assert evidence_uids == {source.SOPInstanceUID}

    # highdicom adds the source's acquisition equipment and itself; ours carries the Device UID
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
    assert equipment.DeviceUID == DEVICE_UID
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.Manufacturer == "osteo-node project"
    assert "1.0.0" in equipment.SoftwareVersions

    (observer,) = report.get_observer_contexts(observer_type=codes.OBSERVER_DEVICE)
    assert observer.observer_identifying_attributes.uid == DEVICE_UID

    names = _algorithm_texts(sr)
    assert names["Algorithm Name"] == ["reference"]
    assert names["Algorithm Version"] == ["1.0.0"]
    texts = names["Comment"]
    assert any("Unverified" in t for t in texts)
    assert any("NOT FOR CLINICAL USE" in t for t in texts)
    (status,) = group.get_qualitative_evaluations(name=codes.RESULT_STATUS)
    assert status.value == codes.concept(codes.UNVERIFIED_AI_RESULT)


def _algorithm_texts(sr: pydicom.Dataset) -> dict[str, list[str]]:
    """TEXT content items anywhere in the tree, by concept name meaning."""
    found: dict[str, list[str]] = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                found.setdefault(meaning, []).append(item.TextValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_sr_clinical_model_omits_not_for_clinical_use() -> None:
    sr = read_sr(to_bytes(build_sr(rg1(), prediction(clinical_use=True))))
    texts = _algorithm_texts(sr)["Comment"]
    assert any("Unverified" in t for t in texts)
    assert not any("NOT FOR CLINICAL USE" in t for t in texts)
    assert len(texts) == 4


def test_sr_comments_state_the_result_in_words() -> None:
    """The first five TEXT "Comment" items of the classification group (what OHIF prints as the
    group's label) carry category, probabilities, model name and version, and the disclaimers."""
    pred = prediction()
    sr = read_sr(to_bytes(build_sr(rg1(), pred)))
    (group,) = report_of(sr).get_image_measurement_groups()
    comments = [item.TextValue for item in group[0].ContentSequence
                if item.ValueType == "TEXT"
                and item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments == summary_lines(pred)
    p = pred.probabilities
    assert comments == [
        f"AI: osteoporosis (p = {p[2]:.2f})",
        f"normal {p[0]:.2f}, osteopenia {p[1]:.2f}",
        "Model: reference 1.0.0",
        "Unverified AI result",
        "NOT FOR CLINICAL USE",
    ]
    assert max(len(c) for c in comments) <= 34  # short enough to sit beside the image in OHIF


def test_sr_measurements_are_placed_on_the_source_image(source: pydicom.Dataset) -> None:
    """Every TID 300 measurement is INFERRED FROM a SCOORD outlining the whole source image, so
    that viewers which place measurement groups on images (OHIF) can show the report."""
    attention = BoneAttention(0.6, 0.3, {"ribs": 0.4})
    sr = read_sr(to_bytes(build_sr(source, prediction(), attention)))
    groups = report_of(sr).get_image_measurement_groups()
    assert len(groups) == 2
    outline = [0.0, 0.0, source.Columns, 0.0, source.Columns, source.Rows, 0.0, source.Rows,
               0.0, 0.0]
    count = 0
    for group in groups:
        for item in group[0].ContentSequence:
            if item.ValueType != "NUM":
                continue
            (scoord,) = [c for c in item.ContentSequence if c.ValueType == "SCOORD"]
            assert scoord.RelationshipType == "INFERRED FROM"
            assert scoord.GraphicType == "POLYLINE"
            assert [float(v) for v in scoord.GraphicData] == outline
            (image,) = scoord.ContentSequence
            (ref,) = image.ReferencedSOPSequence
            assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert ref.ReferencedSOPClassUID == source.SOPClassUID
            count += 1
    assert count == 3 + 3  # three probabilities; bone mass, IoU, ribs


def test_sr_image_library_only_when_highdicom_can_describe_the_image() -> None:
    """highdicom 0.28.2 pitfall: CR without ImagerPixelSpacing -> no TID 1600 library."""
    def has_library(ds: pydicom.Dataset) -> bool:
        return any(
            item.ConceptNameCodeSequence[0].CodeValue == "111028"  # DCM Image Library
            for item in ds.ContentSequence
        )

    assert not has_library(read_sr(to_bytes(build_sr(rg1(), prediction()))))
    assert has_library(read_sr(to_bytes(build_sr(synthetic_dx(), prediction()))))


def test_sr_attention_measurements() -> None:
    attention = BoneAttention(0.71, 0.42, {"ribs": 0.5, "spine": 0.15, "pelvis rim": 0.06})
    sr = read_sr(to_bytes(build_sr(rg1(), prediction(), attention)))
    report = report_of(sr)
    classification, bone = report.get_image_measurement_groups()
    assert bone.get_measurements(name=codes.BONE_MASS_FRACTION)[0].value == pytest.approx(0.71)
    assert bone.get_measurements(name=codes.IOU_BONE)[0].value == pytest.approx(0.42)
    per_structure = {
        m.finding_sites[0].value.meaning: m.value
        for m in bone.get_measurements(name=codes.STRUCTURE_MASS_FRACTION)
    }
    assert len(per_structure) == 3
    assert per_structure[codes.STRUCTURE_CODES["ribs"].meaning] == pytest.approx(0.5)
    assert per_structure["Bone structure pelvis rim"] == pytest.approx(0.06)
    assert bone.source_images[0].referenced_sop_instance_uid == sr.get_evidence()[0][2]
    # without attention there is no second group
    sr = read_sr(to_bytes(build_sr(rg1(), prediction())))
    assert len(
        report_of(sr).get_image_measurement_groups()
    ) == 1


def test_uids_are_deterministic(source: pydicom.Dataset) -> None:
    display, heat = display_and_heat()
    first = build_sr(source, prediction()), build_sc(source, display, Heatmap(heat), prediction())
    again = build_sr(source, prediction()), build_sc(source, display, Heatmap(heat), prediction())
    other = (
        build_sr(source, prediction(OTHER_DEVICE_UID)),
        build_sc(source, display, Heatmap(heat), prediction(OTHER_DEVICE_UID)),
    )
    for a, b, c in zip(first, again, other, strict=True):
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert a.SeriesInstanceUID == b.SeriesInstanceUID
        assert a.SOPInstanceUID != c.SOPInstanceUID
        assert a.SeriesInstanceUID != c.SeriesInstanceUID
    sr, sc = first
    assert len({sr.SOPInstanceUID, sc.SOPInstanceUID, source.SOPInstanceUID}) == 3
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID


@pytest.mark.parametrize(
    ("probabilities", "category", "match"),
    [
        ((0.5, 0.5), "normal", "3 values"),
        ((0.2, 0.3, 0.6), "osteoporosis", "sum to 1"),
        ((-0.1, 0.5, 0.6), "osteoporosis", r"\[0, 1\]"),
        ((0.2, 0.2, 0.6), "severe", "category"),
    ],
)
def test_invalid_prediction_is_refused(
    probabilities: tuple[float, ...], category: str, match: str
) -> None:
    bad = Prediction(probabilities, category, model())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        build_sr(rg1(), bad)


# --------------------------------------------------------------------------------------------
# KOS
# --------------------------------------------------------------------------------------------


def test_kos_flags_the_source_and_references_sr_and_sc(source: pydicom.Dataset) -> None:
    display, heat = display_and_heat()
    pred = prediction()
    sr, sc = build_sr(source, pred), build_sc(source, display, Heatmap(heat), pred)
    kos = pydicom.dcmread(io.BytesIO(to_bytes(build_kos(source, sr, sc, pred))))
    assert kos.SOPClassUID == pydicom.uid.KeyObjectSelectionDocumentStorage
    assert kos.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert kos.SeriesNumber == KOS_SERIES_NUMBER and kos.Modality == "KO"
    assert kos.SeriesDescription == "osteo-node AI result available"
    for keyword in PATIENT_STUDY:
        assert kos.get(keyword) == source.get(keyword), keyword
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # DCM Of Interest (CID 7010)
    items = list(kos.ContentSequence)
    (description,) = [i for i in items if i.ValueType == "TEXT"
                      and i.ConceptNameCodeSequence[0].CodeValue == "113012"]  # Key Object Description
    assert description.TextValue == kos_description(pred)
    assert description.TextValue.startswith("AI result available: AI: osteoporosis (p = ")
    assert "Model: reference 1.0.0" in description.TextValue
    assert "Unverified AI result" in description.TextValue
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items
                  if "ReferencedSOPSequence" in i}
    assert referenced == {source.SOPInstanceUID, sr.SOPInstanceUID, sc.SOPInstanceUID}
    evidence = {ref.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == referenced
    # derived UIDs: the same KOS again, another model another KOS
    again = build_kos(source, sr, sc, pred)
    other_pred = prediction(OTHER_DEVICE_UID)
    other = build_kos(source, build_sr(source, other_pred),
                      build_sc(source, display, Heatmap(heat), other_pred), other_pred)
    assert again.SOPInstanceUID == kos.SOPInstanceUID != other.SOPInstanceUID
    assert len({kos.SeriesInstanceUID, sr.SeriesInstanceUID, sc.SeriesInstanceUID}) == 3


# --------------------------------------------------------------------------------------------
# SC
# --------------------------------------------------------------------------------------------


def test_sc_round_trip(source: pydicom.Dataset) -> None:
    display, heat = display_and_heat()
    built = build_sc(source, display, Heatmap(heat), prediction())
    sc = pydicom.dcmread(io.BytesIO(to_bytes(built)))

    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesNumber == SC_SERIES_NUMBER
    assert sc.BodyPartExamined == "CHEST"
    for keyword in PATIENT_STUDY:
        assert sc.get(keyword) == source.get(keyword), keyword
    (equipment,) = [
        e for e in sc.ContributingEquipmentSequence if e.get("DeviceUID") == DEVICE_UID
    ]
    assert equipment.ManufacturerModelName.startswith("reference 1.0.0")

    pixels = sc.pixel_array
    rows, cols = display.shape
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] > rows and pixels.shape[1] > cols  # banner below, legend right
    image = pixels[:rows, :cols].astype(int)
    cold = heat < HEAT_FLOOR
    # cold: pure grayscale, identical to the display
    for channel in range(3):
        assert np.array_equal(image[..., channel][cold], display[cold])
    # hot: coloured (channels differ) and red dominant at the peak
    hot = heat > 0.9
    assert hot.any()
    spread = image.max(axis=2) - image.min(axis=2)
    assert (spread[hot] > 40).all()
    peak = image[30, 25]
    assert peak[0] > peak[2]
    # banner carries text (non-black pixels)
    assert pixels[rows:].max() > 200


def test_sc_rejects_mismatched_heatmap() -> None:
    display, heat = display_and_heat()
    with pytest.raises(ValueError, match="shape"):
        build_sc(rg1(), display, Heatmap(heat[:-1]), prediction())
    with pytest.raises(ValueError, match="uint8"):
        build_sc(rg1(), display.astype(np.float32), Heatmap(heat), prediction())


def test_sc_example_image_for_review(tmp_path: Path) -> None:
    """Renders the real radiograph at display size (1024 px) and saves it as PNG."""
    source = rg1()
    raw = source.pixel_array.astype(np.float32)
    step = 2  # ~978 x 921
    raw = raw[::step, ::step]
    display = (255 * (raw.max() - raw) / np.ptp(raw)).astype(np.uint8)  # MONOCHROME1
    rows, cols = display.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    heat = np.exp(-(((yy - rows * 0.55) / 110) ** 2 + ((xx - cols * 0.3) / 90) ** 2))
    sc = build_sc(source, display, Heatmap(heat.astype(np.float32)), prediction())
    from PIL import Image

    Image.fromarray(sc.pixel_array).save(tmp_path / "sc_example.png")
    assert (tmp_path / "sc_example.png").stat().st_size > 10_000


# --------------------------------------------------------------------------------------------
# External validators and timings
# --------------------------------------------------------------------------------------------


def _outputs(source: pydicom.Dataset) -> dict[str, bytes]:
    display, heat = display_and_heat()
    attention = BoneAttention(0.6, 0.3, {"ribs": 0.4})
    sr = build_sr(source, prediction())
    sc = build_sc(source, display, Heatmap(heat), prediction())
    return {
        "sr": to_bytes(sr),
        "sr_attention": to_bytes(build_sr(source, prediction(), attention)),
        "sc": to_bytes(sc),
        "kos": to_bytes(build_kos(source, sr, sc, prediction())),
    }


@pytest.mark.integration
def test_dciodvfy_reports_no_errors(source: pydicom.Dataset, tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    for name, data in _outputs(source).items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        result = subprocess.run(
            [dciodvfy, str(path)], capture_output=True, text=True, timeout=60
        )
        errors = [line for line in result.stderr.splitlines() if "Error" in line]
        assert errors == [], f"{name}: {errors}"


@pytest.mark.integration
def test_dsrdump_prints_the_tree(tmp_path: Path) -> None:
    dsrdump = require_tool("dsrdump")
    path = tmp_path / "sr.dcm"
    path.write_bytes(to_bytes(build_sr(rg1(), prediction(), BoneAttention(0.6, 0.3))))
    result = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Imaging Measurement Report" in result.stdout
    assert "Probability of osteoporosis" in result.stdout
    assert "Osteoporosis" in result.stdout
    assert "error" not in result.stderr.lower(), result.stderr


@pytest.mark.integration
def test_dsr2html_renders_the_report(tmp_path: Path) -> None:
    """DCMTK's dsr2html (a generic SR renderer) shows the result in words."""
    dsr2html = require_tool("dsr2html")
    path = tmp_path / "sr.dcm"
    pred = prediction()
    path.write_bytes(to_bytes(build_sr(rg1(), pred, BoneAttention(0.6, 0.3))))
    result = subprocess.run([dsr2html, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    assert "<html" in result.stdout.lower()
    for line in summary_lines(pred):
        assert line in result.stdout, line


def test_build_and_serialise_timings(capsys: pytest.CaptureFixture[str]) -> None:
    """Warm build + to_bytes time (reported, loosely bounded so a busy CI box passes)."""
    source = rg1()
    raw = source.pixel_array[::2, ::2].astype(np.float32)
    display = (255 * (raw.max() - raw) / np.ptp(raw)).astype(np.uint8)
    heat = np.zeros(display.shape, np.float32)
    heat[200:400, 200:400] = 1.0
    pred = prediction()
    attention = BoneAttention(0.6, 0.3, {"ribs": 0.4})
    to_bytes(build_sr(source, pred, attention))  # warm-up
    to_bytes(build_sc(source, display, Heatmap(heat), pred))

    def best(fn: object, n: int = 5) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    sr_s = best(lambda: to_bytes(build_sr(source, pred, attention)))
    sc_s = best(lambda: to_bytes(build_sc(source, display, Heatmap(heat), pred)))
    with capsys.disabled():
        print(f"\nSR build+serialise {sr_s * 1000:.0f} ms; "
              f"SC {display.shape} build+serialise {sc_s * 1000:.0f} ms")
    assert sr_s < 2.0 and sc_s < 2.0


@pytest.mark.parametrize("method,label", [("gradcam", "Grad-CAM"), ("layercam", "LayerCAM")])
def test_outputs_name_the_saliency_method(method: str, label: str) -> None:
    display, heat = display_and_heat()
    sc = build_sc(rg1(), display, Heatmap(heat, method=method), prediction())
    assert sc.DerivationDescription.startswith(f"{label} heatmap of ")
    sr = build_sr(rg1(), prediction(), BoneAttention(0.6, 0.3, method=method))
    parameters = _algorithm_texts(sr)["Algorithm Parameters"]
    assert f"saliency={label}" in parameters
