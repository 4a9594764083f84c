"""`osteo-train evaluate` on the shipped reference bundle and a small fresh phantom cohort (subprocess).

The reference bundle ships in the repository: when it is missing these tests fail (they do not skip).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from training import evaluate

METRIC_KEYS = ("macro_auc", "low_bmd_auc", "osteoporosis_auc", "accuracy")
RATE_KEYS = ("sensitivity", "specificity", "ppv", "npv")


#: Each test runs osteo-train on a fresh phantom cohort (subprocesses that load torch).
pytestmark = pytest.mark.slow

def osteo_train(*args: str, timeout: float = 480) -> subprocess.CompletedProcess[str]:
    """`osteo-train ARGS` in a subprocess; the timeout only catches a hang (evaluating the reference on
    the 60-phantom cohort takes about a minute on 2 busy cores, twice that on a slow machine)."""
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 fresh phantoms at 256 px (a seed no training run uses); returns the manifest."""
    out = tmp_path_factory.mktemp("eval_cohort")
    done = osteo_train("phantoms", "--n", "60", "--seed", "60606", "--size", "256", "--out", str(out),
                       "--workers", "1")
    assert done.returncode == 0, done.stderr
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def reference_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval_out")
    done = osteo_train("evaluate", "--bundle", "reference", "--manifest", str(cohort), "--split", "all",
                       "--json", "--bootstrap", "1000", "--out", str(out))
    assert done.returncode == 0, f"osteo-train evaluate failed (is the reference bundle shipped?):\n{done.stderr}"
    return json.loads(done.stdout), out


def within(metric: dict[str, float]) -> bool:
    return metric["ci_low"] <= metric["value"] <= metric["ci_high"]


def test_evaluate_reference_json(cohort: Path, reference_run: tuple[dict, Path]) -> None:
    result, _ = reference_run
    with cohort.open(newline="") as fh:
        frontal = [r for r in csv.DictReader(fh) if r["view"] in ("PA", "AP")]
    assert result["n"] == len(frontal)
    assert result["bootstrap"]["resamples"] == 1000
    for key in METRIC_KEYS:
        assert within(result[key]), (key, result[key])
        assert 0.0 <= result[key]["value"] <= 1.0
    assert set(result["per_class_auc"]) == {"normal", "osteopenia", "osteoporosis"}
    for name, metric in result["per_class_auc"].items():
        assert within(metric), (name, metric)
    at = result["low_bmd_at_threshold"]
    for key in RATE_KEYS:
        if not math.isnan(at[key]["value"]):
            assert within(at[key]), (key, at[key])
    # the shipped model does find low BMD in phantoms it never saw (loose bound: n is small)
    assert result["low_bmd_auc"]["value"] > 0.7


def test_evaluate_writes_predictions(reference_run: tuple[dict, Path]) -> None:
    result, out = reference_run
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == result["n"]
    assert list(rows[0]) == ["file", "patient_id", "class", "p_normal", "p_osteopenia", "p_osteoporosis"]
    probs = np.array([[float(r[f"p_{c}"]) for c in ("normal", "osteopenia", "osteoporosis")] for r in rows])
    assert probs.sum(axis=1) == pytest.approx(np.ones(len(rows)), abs=1e-4)
    assert json.loads((out / "metrics.json").read_text())["n"] == result["n"]


def test_perturb_bone_changes_the_inputs_only_inside_bone(cohort: Path) -> None:
    from osteo_node.bundle import load_bundle

    bundle = load_bundle("reference")
    case = evaluate.read_cases(cohort, "all", need_masks=True)[0]
    assert len(case.bone_masks) == len(evaluate.BONE_MASK_COLUMNS)
    plain, no_ratio = evaluate.load_input(case, bundle)
    perturbed, ratio = evaluate.load_input(case, bundle, "bone", np.random.default_rng(0))
    assert plain.shape == perturbed.shape == (3, bundle.spec.input_size, bundle.spec.input_size)
    assert not np.allclose(plain, perturbed)
    assert np.isnan(no_ratio) and ratio == 1.0
    both = evaluate.predict(bundle, [case], perturb="bone")
    assert both.probs.shape == (1, 3)


def test_perturb_off_bone_region_is_clear_of_bone(cohort: Path) -> None:
    from scipy.ndimage import distance_transform_edt

    from training.perturb import OFF_BONE_MARGIN

    for case in evaluate.read_cases(cohort, "all", need_masks=True)[:4]:
        shape = (256, 256)
        bone = evaluate.bone_mask(case, shape, evaluate.DEFAULT_MASK_DILATION)
        region, bone_pixels = evaluate.perturbation_region(case, shape, "off-bone", np.random.default_rng(0))
        assert bone_pixels == int(bone.sum()) > 0
        assert case.body_mask is not None  # phantoms write mask_body: the region stays on the patient
        body = evaluate.read_mask(case.body_mask, shape)
        # farther than the margin from grown bone, and on the body
        clear = (distance_transform_edt(~bone) > OFF_BONE_MARGIN) & body
        assert region.any() and not (region & ~clear).any()
        # As large as the bone where the image has room, else all that is clear of it (chest phantoms:
        # the bone covers most of the image, so the region is smaller).
        assert int(region.sum()) == min(bone_pixels, int(clear.sum()))
        if region.sum() < bone_pixels:
            assert np.array_equal(region, clear)
        same, _ = evaluate.perturbation_region(case, shape, "bone", np.random.default_rng(0))
        assert np.array_equal(same, bone)


def test_evaluate_perturb_off_bone_changes_the_predictions(cohort: Path, reference_run: tuple[dict, Path],
                                                           tmp_path: Path) -> None:
    _, plain_out = reference_run
    done = osteo_train("evaluate", "--bundle", "reference", "--manifest", str(cohort), "--split", "all",
                       "--limit", "12", "--json", "--bootstrap", "50", "--perturb-off-bone", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["perturb_off_bone"] is True and result["perturb_bone"] is False
    assert result["off_bone_margin"] == 4 and result["mask_dilation"] == evaluate.DEFAULT_MASK_DILATION
    assert result["off_bone_within_body"] is True
    area = result["off_bone_area_ratio"]
    assert 0.0 < area["min"] <= area["mean"] <= area["max"] <= 1.0

    def probs(path: Path) -> np.ndarray:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))[:12]
        return np.array([[float(r[f"p_{c}"]) for c in ("normal", "osteopenia", "osteoporosis")] for r in rows])

    # The option is not ignored: the off-bone inpainting moves every prediction a little.
    changed = np.abs(probs(tmp_path / "predictions.csv") - probs(plain_out / "predictions.csv")).max(axis=1)
    assert (changed > 1e-6).all(), changed


def test_perturb_bone_and_off_bone_exclude_each_other(cohort: Path) -> None:
    done = osteo_train("evaluate", "--bundle", "reference", "--manifest", str(cohort), "--perturb-bone",
                       "--perturb-off-bone")
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr


def test_evaluate_refuses_a_missing_bundle(cohort: Path, tmp_path: Path) -> None:
    done = osteo_train("evaluate", "--bundle", str(tmp_path / "nope"), "--manifest", str(cohort))
    assert done.returncode == 2
    assert "no model bundle" in done.stderr


def test_by_attribute_gives_each_group_its_own_auc(cohort: Path, reference_run: tuple[dict, Path]) -> None:
    from osteo_node import metrics

    _, out = reference_run
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = ("normal", "osteopenia", "osteoporosis")
    cases = tuple(evaluate.Case(path=Path(r["file"]), patient_id=r["patient_id"], label=classes.index(r["class"]),
                                bone_masks=()) for r in rows)
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    predictions = evaluate.Predictions(cases=cases, probs=probs)
    by_sex = evaluate.by_attribute("PatientSex", predictions, n_bootstrap=200)
    assert by_sex["keyword"] == "PatientSex"
    sexes = [str(pydicom.dcmread(c.path, stop_before_pixels=True).PatientSex) for c in cases]
    assert set(by_sex["groups"]) == set(sexes)
    for sex, group in by_sex["groups"].items():
        rows_of = [i for i, s in enumerate(sexes) if s == sex]
        assert group["n"] == len(rows_of)
        expected = metrics.low_bmd_auc(predictions.labels[rows_of], probs[rows_of])
        if group["low_bmd_auc"] is None:
            assert math.isnan(expected)
        else:
            assert group["low_bmd_auc"]["value"] == pytest.approx(expected)
            assert within(group["low_bmd_auc"])
    # Phantoms carry no StationName: one group, named so.
    assert list(evaluate.by_attribute("StationName", predictions, n_bootstrap=50)["groups"]) == ["(absent)"]


def test_evaluate_by_names_a_bad_keyword_and_refuses_a_patient_identifier(cohort: Path) -> None:
    done = osteo_train("evaluate", "--bundle", "reference", "--manifest", str(cohort), "--by", "StationNam")
    assert done.returncode == 2
    assert "'StationNam' is not a DICOM attribute keyword" in done.stderr
    done = osteo_train("evaluate", "--bundle", "reference", "--manifest", str(cohort), "--by", "PatientID")
    assert done.returncode == 2
    assert "PatientID identifies patients" in done.stderr and "PHANTOM-" not in done.stderr + done.stdout


def test_by_refuses_what_identifies_a_patient_and_keeps_equipment() -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDsSequence", "AccessionNumber",
                    "StudyInstanceUID", "SOPInstanceUID", "ReferringPhysicianName", "StudyID"):
        assert evaluate.identifying(keyword), keyword
    for keyword in ("StationName", "Manufacturer", "ManufacturerModelName", "ViewPosition", "KVP", "PatientSex",
                    "PatientAge", "Modality", "InstitutionName"):
        assert not evaluate.identifying(keyword), keyword
