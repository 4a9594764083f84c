"""The synthetic phantom cohort: files, DICOM realism, determinism, masks and label information."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training import phantoms
from training.perturb import inpaint_bone

SIZE = 256
OPTIONS = phantoms.GenerationOptions(size=SIZE, lateral_fraction=0.3, male_fraction=0.3)
DCIODVFY = Path("/usr/bin/dciodvfy")


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten phantoms at 256 px (seed 3: PA and lateral views, both sexes)."""
    out = tmp_path_factory.mktemp("phantoms")
    phantoms.generate(out, 10, 3, OPTIONS)
    return out


@pytest.fixture(scope="module")
def rows(cohort: Path) -> list[dict[str, str]]:
    return read_manifest(cohort / "manifest.csv")


def test_manifest_has_exact_columns_and_files(cohort: Path, rows: list[dict[str, str]]) -> None:
    with (cohort / "manifest.csv").open() as handle:
        header = handle.readline().strip().split(",")
    assert header == list(phantoms.MANIFEST_COLUMNS)
    assert header[:15] == (
        "file,patient_id,t_score,class,age,sex,view,split,mask_ribs,mask_clavicles,"
        "mask_spine,mask_scapulae,mask_humeri,mask_lungs,mask_body"
    ).split(",")
    assert header[15] == "true_class"
    assert len(rows) == 10
    for row in rows:
        assert (cohort / row["file"]).is_file()
        assert row["class"] in phantoms.CLASS_NAMES and row["true_class"] in phantoms.CLASS_NAMES
        assert row["true_class"] == phantoms.category_from_t_score(float(row["t_score"]))
        assert row["split"] in ("train", "val", "test")
        assert 40 <= int(row["age"]) <= 90
        for name in phantoms.MASK_NAMES:
            mask = np.asarray(Image.open(cohort / row[f"mask_{name}"]))
            assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
    assert {row["view"] for row in rows} == {"PA", "LATERAL"}
    assert {row["sex"] for row in rows} == {"F", "M"}


def test_cohort_splits_by_patient_and_covers_classes() -> None:
    specs, splits = phantoms.draw_cohort(600, 0, phantoms.GenerationOptions())
    by_patient: dict[int, list[phantoms.PhantomSpec]] = defaultdict(list)
    for spec in specs:
        by_patient[spec.patient_index].append(spec)
    repeats = [p for p, studies in by_patient.items() if len(studies) == 2]
    assert repeats, "some patients should have a repeat study"
    for patient in repeats:
        first, second = by_patient[patient]
        assert first.patient_id == second.patient_id and second.study_date > first.study_date
    shares = {name: sum(s == name for s in splits.values()) / len(splits) for name in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.70, abs=0.02)
    assert shares["val"] == pytest.approx(0.15, abs=0.02)
    true_classes = [spec.true_class for spec in specs]
    for name in phantoms.CLASS_NAMES:
        assert true_classes.count(name) > 0.25 * len(specs)
    t_scores = [spec.t_score for spec in specs]
    assert min(t_scores) < -4.0 and max(t_scores) > 1.5
    noisy = sum(spec.label_class != spec.true_class for spec in specs) / len(specs)
    assert 0.02 < noisy < 0.09


def test_same_seed_is_identical_and_other_seed_differs(tmp_path: Path, cohort: Path) -> None:
    again = tmp_path / "again"
    other = tmp_path / "other"
    phantoms.generate(again, 10, 3, OPTIONS, workers=2)
    phantoms.generate(other, 3, 4, OPTIONS)
    assert (again / "manifest.csv").read_bytes() == (cohort / "manifest.csv").read_bytes()
    for row in read_manifest(again / "manifest.csv"):
        assert (again / row["file"]).read_bytes() == (cohort / row["file"]).read_bytes()
        assert (again / row["mask_ribs"]).read_bytes() == (cohort / row["mask_ribs"]).read_bytes()
    first = pydicom.dcmread(cohort / "images" / "000000.dcm")
    changed = pydicom.dcmread(other / "images" / "000000.dcm")
    assert first.PixelData != changed.PixelData
    assert first.SOPInstanceUID != changed.SOPInstanceUID
    assert (other / "manifest.csv").read_bytes() != (cohort / "manifest.csv").read_bytes()


def test_dicom_header_is_a_dx_for_presentation(cohort: Path, rows: list[dict[str, str]]) -> None:
    for row in rows:
        ds = pydicom.dcmread(cohort / row["file"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition == ("PA" if row["view"] == "PA" else "LL")
        assert ds.PatientSex == row["sex"]
        assert ds.PatientAge == f"{int(row['age']):03d}Y"
        birth = (int(ds.PatientBirthDate[:4]), ds.PatientBirthDate[4:])
        study = (int(ds.StudyDate[:4]), ds.StudyDate[4:])
        assert study[0] - birth[0] - (study[1] < birth[1]) == int(row["age"])
        number = row["patient_id"].split("-")[1]
        assert str(ds.PatientName) == f"PHANTOM^{number}" and ds.PatientID == row["patient_id"]
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert len(ds.ImagerPixelSpacing) == 2 and len(ds.PixelSpacing) == 2
        assert float(ds.WindowWidth) > 0 and 0 < float(ds.WindowCenter) < 4096
        assert ds.ImageLaterality == "U"
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and int(pixels.max()) <= 4095


@pytest.mark.integration
def test_dciodvfy_reports_no_errors(cohort: Path, rows: list[dict[str, str]]) -> None:
    if not DCIODVFY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy is required in CI (apt-get install dicom3tools)")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    for row in rows:
        result = subprocess.run([str(DCIODVFY), str(cohort / row["file"])], capture_output=True, text=True)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert not errors, f"{row['file']}: {errors}"


def test_eligibility_accepts_female_pa_and_refuses_male_and_lateral(
    cohort: Path, rows: list[dict[str, str]]
) -> None:
    eligibility = pytest.importorskip("osteo_node.eligibility")
    rules = eligibility.EligibilityRules()
    seen = {"female_pa": 0, "male": 0, "lateral": 0}
    for row in rows:
        decision = eligibility.decide(pydicom.dcmread(cohort / row["file"]), rules)
        if row["sex"] == "F" and row["view"] == "PA" and int(row["age"]) >= 50:
            assert decision.eligible, decision.reason
            seen["female_pa"] += 1
        if row["sex"] == "M":
            assert not decision.eligible
            seen["male"] += 1
        if row["view"] == "LATERAL":
            assert not decision.eligible
            seen["lateral"] += 1
    assert all(seen.values()), seen


def _local_contrast(pixels: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    """Mean high-pass value (image minus its 8-px Gaussian blur) inside minus outside."""
    detail = pixels - cv2.GaussianBlur(pixels, (0, 0), 8)
    return float(detail[inside].mean() - detail[outside].mean())


def test_bone_masks_are_brighter_than_lungs(cohort: Path, rows: list[dict[str, str]]) -> None:
    checked = 0
    for row in rows:
        pixels = pydicom.dcmread(cohort / row["file"]).pixel_array.astype(np.float32)
        masks = {name: np.asarray(Image.open(cohort / row[f"mask_{name}"])) > 0 for name in phantoms.MASK_NAMES}
        assert masks["spine"].any() and masks["ribs"].any() and masks["lungs"].any()
        for name in ("spine", "ribs", "lungs"):  # the patient's outline holds her anatomy
            assert (masks[name] & masks["body"]).sum() >= 0.99 * masks[name].sum()
        assert pixels[masks["spine"]].mean() > pixels[masks["lungs"]].mean() + 100
        if float(row["t_score"]) <= -2.5:
            continue  # osteoporotic ribs are nearly transparent: alignment is measured on the others
        # Ribs over the lungs: brighter than the rib-free lung (locally), and less so when the
        # mask is moved by half a rib spacing (the masks sit on the ribs).
        lungs, ribs = masks["lungs"], masks["ribs"]
        aligned = _local_contrast(pixels, ribs & lungs, lungs & ~ribs)
        moved = np.roll(ribs, 8, axis=0)
        assert aligned > 5.0
        assert aligned > _local_contrast(pixels, moved & lungs, lungs & ~moved)
        checked += 1
    assert checked >= 3

def _bone_contrast(rendering: phantoms.Rendering) -> float:
    """Mean value in the spine and rib masks minus the mean of the soft tissue around them."""
    pixels = rendering.pixels.astype(np.float64)
    bone = rendering.masks["spine"] | rendering.masks["ribs"]
    near = cv2.dilate(bone.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    ring = near & ~cv2.dilate(bone.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return float(pixels[bone].mean() - pixels[ring].mean())


def test_lower_t_score_gives_less_bone_contrast() -> None:
    specs, _ = phantoms.draw_cohort(3, 7, phantoms.GenerationOptions(lateral_fraction=0.0))
    for spec in specs:
        contrasts = [
            _bone_contrast(phantoms.render(dataclasses.replace(spec, t_score=t), SIZE)) for t in (1.5, -1.5, -4.0)
        ]
        assert contrasts[0] > contrasts[1] > contrasts[2], contrasts
        unchanged = dataclasses.replace(spec, bone_change=False)
        assert _bone_contrast(phantoms.render(dataclasses.replace(unchanged, t_score=1.5), SIZE)) == pytest.approx(
            _bone_contrast(phantoms.render(dataclasses.replace(unchanged, t_score=-4.0), SIZE))
        )


def _pixel_features(pixels: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Windowed image downsampled to 16 x 16."""
    windowed = (pixels.astype(np.float32) - centre) / width
    return cv2.resize(windowed, (16, 16), interpolation=cv2.INTER_AREA).ravel()


@pytest.mark.slow
def test_label_information_lives_in_bone_only() -> None:
    """Low-BMD is linearly predictable from pixels, but not once bone is inpainted away."""
    size = 128
    options = phantoms.GenerationOptions(size=size, lateral_fraction=0.0, label_noise=0.0)
    specs, _ = phantoms.draw_cohort(240, 11, options)
    rng = np.random.default_rng(0)
    original, inpainted, low_bmd = [], [], []
    for spec in specs:
        rendering = phantoms.render(spec, size, options.spacing_mm)
        bone = np.zeros((size, size), bool)
        for name in phantoms.BONE_GROUPS:
            bone |= rendering.masks[name]
        bone = cv2.dilate(bone.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        filled = inpaint_bone(rendering.pixels.astype(np.float32), bone, rng)
        original.append(_pixel_features(rendering.pixels, rendering.window_center, rendering.window_width))
        inpainted.append(_pixel_features(filled, rendering.window_center, rendering.window_width))
        low_bmd.append(spec.t_score < -1.0)
    labels = np.array(low_bmd)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)

    def cross_validated_auc(features: list[np.ndarray]) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        scores = cross_val_predict(model, np.array(features), labels, cv=folds, method="predict_proba")[:, 1]
        return float(roc_auc_score(labels, scores))

    auc_original, auc_inpainted = cross_validated_auc(original), cross_validated_auc(inpainted)
    assert auc_original > 0.8, auc_original
    assert auc_inpainted < 0.65, auc_inpainted


def test_soft_tissue_leak_moves_the_signal_out_of_bone() -> None:
    options = phantoms.GenerationOptions(leak="soft-tissue", lateral_fraction=0.0)
    spec = phantoms.draw_cohort(1, 5, options)[0][0]
    assert not spec.bone_change
    high, low = (phantoms.render(dataclasses.replace(spec, t_score=t), 128) for t in (1.5, -4.0))
    assert np.array_equal(high.pixels, low.pixels)  # bone mineral no longer follows the T-score
    leaky = phantoms.draw_cohort(60, 5, options)[0]
    t_scores = np.array([s.t_score for s in leaky])
    densities = np.array([s.soft_density for s in leaky])
    assert np.corrcoef(t_scores, densities)[0, 1] < -0.9


def test_options_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="label_noise.*1.5"):
        phantoms.GenerationOptions(label_noise=1.5)
    with pytest.raises(ValueError, match="leak.*bones"):
        phantoms.GenerationOptions(leak="bones")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        phantoms.draw_cohort(0, 0, phantoms.GenerationOptions())


def test_command_line_writes_a_cohort(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "phantoms", "--n", "2", "--seed", "1", "--out", str(out),
         "--size", "128", "--workers", "1"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(out / "manifest.csv")) == 2
    sheet = tmp_path / "sheet.png"
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "contact-sheet", "--manifest", str(out / "manifest.csv"),
         "--out", str(sheet), "--n", "2"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(sheet).size[0] > 0
    shutil.rmtree(out)


def test_contact_sheet_shows_a_monochrome1_image_as_the_node_reads_it(
    tmp_path: Path, cohort: Path, rows: list[dict[str, str]]
) -> None:
    """A MONOCHROME1 copy (stored values inverted) gives the same tile as its MONOCHROME2 original."""
    from training.contact_sheet import tile

    row = rows[0]
    ds = pydicom.dcmread(cohort / row["file"])
    ds.PixelData = (4095 - ds.pixel_array).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter = 4095 - float(ds.WindowCenter)
    (tmp_path / "images").mkdir()
    ds.save_as(tmp_path / row["file"], enforce_file_format=True)
    for name in phantoms.MASK_NAMES:
        (tmp_path / row[f"mask_{name}"]).parent.mkdir(exist_ok=True)
        shutil.copy(cohort / row[f"mask_{name}"], tmp_path / row[f"mask_{name}"])
    original = np.asarray(tile(row, cohort, 128)).astype(int)
    inverted = np.asarray(tile(row, tmp_path, 128)).astype(int)
    assert np.abs(original - inverted).max() <= 2


def test_off_bone_leak_changes_only_soft_tissue_that_no_bone_overlies() -> None:
    options = phantoms.GenerationOptions(leak="off-bone", lateral_fraction=0.0)
    spec = phantoms.draw_cohort(1, 5, options)[0][0]
    assert not spec.bone_change
    plain, leaky = (phantoms.render(dataclasses.replace(spec, off_bone_density=d), 128) for d in (1.0, 1.15))
    bone = np.zeros((128, 128), bool)
    for name in phantoms.BONE_GROUPS:
        bone |= plain.masks[name]
    inner_bone = cv2.erode(bone.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    far_from_bone = ~cv2.dilate(bone.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    diff = np.abs(leaky.pixels.astype(np.float32) - plain.pixels.astype(np.float32))
    assert inner_bone.sum() > 500 and far_from_bone.sum() > 500
    assert diff[far_from_bone].mean() > 10 * max(diff[inner_bone].mean(), 0.5)
    assert (leaky.window_center, leaky.window_width) == (plain.window_center, plain.window_width)
    drawn = phantoms.draw_cohort(60, 5, options)[0]
    t_scores = np.array([s.t_score for s in drawn])
    assert np.corrcoef(t_scores, [s.off_bone_density for s in drawn])[0, 1] < -0.9


def test_realistic_effect_is_the_documented_one_and_halves_the_bone_contrast_change() -> None:
    assert phantoms.parse_bone_change("realistic") == phantoms.BONE_EFFECTS["realistic"] == (0.09, 0.16)
    assert phantoms.parse_bone_change("exaggerated") == phantoms.BONE_CHANGE_PER_SD
    assert phantoms.parse_bone_change("0.1,0.2") == (0.1, 0.2)
    assert phantoms.bone_factors(-2.0, (0.09, 0.16)) == pytest.approx((0.82, 0.68))
    with pytest.raises(ValueError, match="'strong'"):
        phantoms.parse_bone_change("strong")
    with pytest.raises(ValueError, match="0..0.5"):
        phantoms.GenerationOptions(bone_change_per_sd=(0.9, 0.1))
    spec = phantoms.draw_cohort(1, 7, phantoms.GenerationOptions(lateral_fraction=0.0))[0][0]
    changes = {}
    for name, per_sd in phantoms.BONE_EFFECTS.items():
        high, low = (
            _bone_contrast(phantoms.render(dataclasses.replace(spec, t_score=t, bone_change_per_sd=per_sd), SIZE))
            for t in (1.5, -4.0)
        )
        changes[name] = high - low
    # Half the change per SD gives about half the contrast change (the DX chain is ~linear in mineral).
    assert 0.4 < changes["realistic"] / changes["exaggerated"] < 0.65, changes


def test_randomise_changes_nothing_that_carries_a_label() -> None:
    plain_options = phantoms.GenerationOptions(bone_change_per_sd=(0.09, 0.16))
    random_options = dataclasses.replace(plain_options, randomise=True)
    plain, plain_splits = phantoms.draw_cohort(200, 21, plain_options)
    randomised, random_splits = phantoms.draw_cohort(200, 21, random_options)
    assert random_splits == plain_splits
    label_fields = ("patient_id", "t_score", "label_class", "sex", "birth_date", "study_date", "view",
                    "bone_change", "bone_change_per_sd")
    for a, b in zip(plain, randomised):
        assert [getattr(a, f) for f in label_fields] == [getattr(b, f) for f in label_fields]
    assert {s.response for s in randomised} == {"log", "gamma", "linear"}
    assert any(s.clahe_clip for s in randomised) and any(s.lut for s in randomised)
    t_scores = np.array([s.t_score for s in randomised])
    for field in ("soft_density", "fat_fraction", "photons", "zoom", "dn_low", "gamma", "lut", "edge_amount"):
        values = np.array([getattr(s, field) for s in randomised], dtype=float)
        assert values.std() > 0, field
        assert abs(np.corrcoef(t_scores, values)[0, 1]) < 0.25, field
    # Every randomised chain renders 12-bit pixels, and bone still gets darker with a lower T-score.
    for spec in [s for s in randomised if s.view == "PA"][:3]:
        rendering = phantoms.render(spec, SIZE)
        assert rendering.pixels.dtype == np.uint16 and int(rendering.pixels.max()) <= 4095
        assert rendering.pixels.std() > 50
    spec = next(s for s in randomised if s.view == "PA" and s.response != "log" and not s.clahe_clip)
    contrasts = [_bone_contrast(phantoms.render(dataclasses.replace(spec, t_score=t), SIZE)) for t in (1.5, -4.0)]
    assert contrasts[0] > contrasts[1], contrasts


def test_randomise_physics_changes_nothing_that_carries_a_label_nor_randomise_draws() -> None:
    options = phantoms.GenerationOptions(bone_change_per_sd=(0.09, 0.16), randomise=True)
    physics_options = dataclasses.replace(options, randomise_physics=True)
    plain, plain_splits = phantoms.draw_cohort(200, 22, options)
    physics, physics_splits = phantoms.draw_cohort(200, 22, physics_options)
    assert physics_splits == plain_splits
    physics_fields = {"beam_kev", "scatter_ratio", "scatter_sigma_mm", "halo_weight", "halo_mm",
                      "gain_nonuniformity", "collimation_mm", "shutter_bright", "marker_corner", "aspect",
                      "aspect_shift"}
    for a, b in zip(plain, physics):
        assert {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)} <= physics_fields
    assert {s.marker_corner for s in physics} == {-1, 0, 1, 2, 3}
    assert any(s.beam_kev == 0 for s in physics) and any(any(s.collimation_mm) for s in physics)
    t_scores = np.array([s.t_score for s in physics])
    for field in ("beam_kev", "scatter_ratio", "halo_weight", "gain_nonuniformity"):
        values = np.array([getattr(s, field) for s in physics], dtype=float)
        assert values.std() > 0, field
        assert abs(np.corrcoef(t_scores, values)[0, 1]) < 0.25, field


def test_physics_scatter_lowers_and_a_softer_beam_raises_the_bone_contrast() -> None:
    spec = phantoms.draw_cohort(1, 7, phantoms.GenerationOptions(lateral_fraction=0.0))[0][0]
    plain = phantoms.render(spec, SIZE)
    scattered = phantoms.render(dataclasses.replace(spec, scatter_ratio=1.2), SIZE)
    soft_beam, hard_beam = (phantoms.render(dataclasses.replace(spec, beam_kev=kev), SIZE) for kev in (45.0, 66.0))
    # Scatter is a veil over everything: the mapping keeps the soft tissue's range, and bone loses
    # contrast against its surroundings.
    assert _bone_contrast(scattered) < 0.8 * _bone_contrast(plain)
    assert _bone_contrast(soft_beam) > _bone_contrast(plain) > _bone_contrast(hard_beam)
    assert phantoms.energy_scales(0.0) == (1.0, 1.0)
    assert phantoms.energy_scales(60.0) == pytest.approx((1.0, 1.0))
    soft_45, mineral_45 = phantoms.energy_scales(45.0)
    assert mineral_45 / soft_45 > 1.5  # mineral's attenuation falls far faster with energy than water's
    # Bone still gets darker with a lower T-score through scatter and a soft beam.
    physics = dataclasses.replace(spec, scatter_ratio=0.9, beam_kev=48.0, halo_weight=0.2, gain_nonuniformity=0.02)
    contrasts = [_bone_contrast(phantoms.render(dataclasses.replace(physics, t_score=t), SIZE)) for t in (1.5, -4.0)]
    assert contrasts[0] > contrasts[1], contrasts


def test_physics_collimation_and_marker_show_and_the_masks_stay_inside_the_field() -> None:
    spec = phantoms.draw_cohort(1, 7, phantoms.GenerationOptions(lateral_fraction=0.0))[0][0]
    shuttered = dataclasses.replace(spec, collimation_mm=(20.0, 0.0, 30.0, 0.0), shutter_bright=True)
    rendering = phantoms.render(shuttered, SIZE)
    top, left = round(20.0 / (phantoms.FIELD_OF_VIEW_MM / SIZE)), round(30.0 / (phantoms.FIELD_OF_VIEW_MM / SIZE))
    assert (rendering.pixels[:top] == 4095).all() and (rendering.pixels[:, :left] == 4095).all()
    assert rendering.pixels[top:, left:].std() > 50
    assert not any(mask[:top].any() or mask[:, :left].any() for mask in rendering.masks.values())
    dark = phantoms.render(dataclasses.replace(shuttered, shutter_bright=False), SIZE)
    assert (dark.pixels[:top] == int(spec.dn_low)).all()
    marked = phantoms.render(dataclasses.replace(spec, marker_corner=0), SIZE)
    plain = phantoms.render(spec, SIZE)
    letter = phantoms._marker(0, SIZE)
    assert 20 < letter.sum() and letter[: SIZE // 4, : SIZE // 4].sum() == letter.sum()
    # The lead letter stops the beam: it shows as bright as dense bone, far above what was there.
    assert np.median(marked.pixels[letter].astype(float) - plain.pixels[letter]) > 500
    portrait = phantoms.render(dataclasses.replace(spec, aspect=0.8, aspect_shift=0.0), SIZE)
    assert portrait.pixels.shape == (SIZE, round(0.8 * SIZE))
    assert np.array_equal(portrait.pixels, plain.pixels[:, : round(0.8 * SIZE)])
    assert all(mask.shape == portrait.pixels.shape for mask in portrait.masks.values())
    assert np.array_equal(marked.pixels[SIZE // 2:], plain.pixels[SIZE // 2:])


def test_command_line_names_a_bad_bone_change(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "phantoms", "--n", "1", "--out", str(tmp_path / "x"),
         "--bone-change-per-sd", "strong"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False,
    )
    assert result.returncode == 2 and "--bone-change-per-sd" in result.stderr and "'strong'" in result.stderr
