"""`osteo-train explain` as a subprocess on a tiny bundle and tiny phantoms; Grad-CAM for every family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from osteo_node.bundle import export_bundle, load_bundle
from osteo_node.infer import Inference
from osteo_node.model import FAMILIES, build_classifier
from osteo_node.pixels import prepare_dataset

from tinymodels import INPUT_SIZE, save_tiny_backbone, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
OSTEO_TRAIN = [sys.executable, "-m", "training.cli"]


def _tiny_bundle(folder: Path, family: str = "dinov2", method: str = "partial") -> Path:
    spec = tiny_spec(family, save_tiny_backbone(family, folder / f"src-{family}", seed=3), method)
    torch.manual_seed(3)
    clf = build_classifier(spec)
    with torch.no_grad():  # move away from the initialisation so that the head is not flat
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return export_bundle(clf, spec, folder / f"bundle-{family}", name=f"tiny-{family}", version="0.0.1",
                         thresholds={"low_bmd": 0.5, "osteoporosis": 0.5}, intended_use="tests only",
                         clinical_use=False, data_summary="none: random weights")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    # seed 9: 11 frontal images with all three classes (4 normal, 4 osteopenia, 3 osteoporosis)
    subprocess.run([*OSTEO_TRAIN, "phantoms", "--n", "12", "--seed", "9", "--size", "256",
                    "--workers", "1", "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    return out / "manifest.csv"


def _interval_ok(entry: dict) -> None:
    assert set(entry) >= {"value", "ci_low", "ci_high"}
    assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


@pytest.mark.slow
def test_explain_cli_json_and_report(tmp_path: Path, phantoms: Path) -> None:
    bundle = _tiny_bundle(tmp_path)
    out = tmp_path / "report"
    proc = subprocess.run(
        [*OSTEO_TRAIN, "explain", "--bundle", str(bundle), "--manifest", str(phantoms), "--split", "all",
         "--bootstrap", "50", "--faith-n", "2", "--json", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=480, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # one JSON object, nothing else on stdout
    result = json.loads(lines[0])
    for key in ("iou_bone", "bone_mass_fraction", "delta_bone"):
        _interval_ok(result[key])
    for key in ("iou_bone", "bone_mass_fraction"):
        assert 0.0 <= result[key]["ci_low"] and result[key]["ci_high"] <= 1.0
    assert -1.0 <= result["delta_bone"]["value"] <= 1.0
    assert result["n"] == 11 and result["method"] == "gradcam"
    assert result["threshold_rule"] == "top 20% of pixels"
    assert 0.0 < result["chance"]["bone_area_fraction"] < 1.0
    for structure in ("ribs", "clavicles", "spine", "scapulae", "humeri"):
        entry = result["per_structure"][structure]
        _interval_ok(entry["bone_mass_fraction"])
        assert 0.0 <= entry["bone_mass_fraction"]["value"] <= 1.0
        assert 0.0 < entry["area_fraction"] < 1.0
    for structure in ("ribs", "clavicles", "spine"):
        _interval_ok(result["recovered"][structure]["auc"])
    alt = result["alt_method"]
    assert alt["method"] == "gradcam++" and 0.0 <= alt["bone_mass_fraction"]["value"] <= 1.0
    faith = result["faithfulness"]
    assert faith["n"] == 2 and len(faith["morf_confidence"]) == len(faith["removed_fraction"])
    assert all(0.0 <= v <= 1.0 for v in faith["morf_confidence"] + faith["lerf_confidence"])
    # the report and its figures
    report = (out / "report.md").read_text()
    assert "Delta_bone" in report and "bone mass fraction" in report
    for name in ("montage_per_class.png", "per_structure.png", "deletion_curves.png", "auc_perturbation.png"):
        assert (out / name).stat().st_size > 1000
    assert json.loads((out / "explain.json").read_text())["n"] == 11


@pytest.mark.slow
def test_explain_cli_refuses_a_manifest_without_masks(tmp_path: Path, phantoms: Path) -> None:
    bundle = _tiny_bundle(tmp_path)
    lines = phantoms.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, h in enumerate(header) if not h.startswith("mask_")]
    bare = tmp_path / "manifest.csv"
    bare.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines) + "\n")
    for sub in ("images",):
        (tmp_path / sub).symlink_to(phantoms.parent / sub)
    proc = subprocess.run([*OSTEO_TRAIN, "explain", "--bundle", str(bundle), "--manifest", str(bare),
                           "--split", "all", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "bone masks" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcam_and_gradcam_pp_for_every_family(tmp_path: Path, family: str) -> None:
    bundle = load_bundle(_tiny_bundle(tmp_path, family))
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    prepared = prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=128)
    for method in ("gradcam", "gradcam++"):
        inference = Inference(bundle, cam_method=method)
        prediction, heatmap = inference.run(prepared)
        inference.close()
        assert heatmap.method == method and heatmap.values.shape == prepared.display.shape
        assert np.isfinite(heatmap.values).all()
        assert 0.0 <= heatmap.values.min() and heatmap.values.max() <= 1.0
        assert heatmap.values.max() > 0.0, f"{family}/{method}: flat map"
        assert heatmap.target_category == prediction.category
