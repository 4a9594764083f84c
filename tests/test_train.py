"""training.train / training.data: the `osteo-train train` command end to end on tiny data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osteo_node.bundle import load_bundle
from training.data import augment, read_manifest, read_manifests
from training.train import lr_factor, macro_auc

COLUMNS = ["file", "patient_id", "t_score", "class", "age", "sex", "view", "split", "mask_ribs"]


def _manifest(tmp_path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(n):
        label = i % 3
        image = (rng.random((80, 64)) * (0.3 + 0.3 * label) * 65535).astype(np.uint16)
        name = f"images/{i:03d}.png"
        Image.fromarray(image).save(tmp_path / name)
        rows.append({"file": name, "patient_id": f"P{i}", "t_score": ["0.5", "-1.8", "-3.0"][label],
                     "class": ["normal", "osteopenia", "osteoporosis"][label], "age": "70", "sex": "F",
                     "view": "LATERAL" if i % 8 == 7 else "PA", "split": "val" if i % 4 == 0 else "train",
                     "mask_ribs": ""})
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_read_manifest_keeps_frontal_rows(tmp_path):
    rows = read_manifest(_manifest(tmp_path))
    assert len(rows) == 21 and all(r.view == "PA" for r in rows)
    assert rows[0].path == tmp_path / "images/000.png" and rows[2].label == 2


def test_augment_keeps_shape_and_range():
    x = torch.rand(4, 56, 56)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert not torch.equal(x, y)


def test_schedule_and_auc():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-9)
    labels = np.array([0, 1, 2, 0, 1, 2])
    assert macro_auc(labels, np.eye(3)[labels]) == 1.0


def test_several_manifests_are_one_cohort_whose_patients_stay_apart(tmp_path):
    first, second = (tmp_path / "a", tmp_path / "b")
    first.mkdir(), second.mkdir()
    one = read_manifests([_manifest(first)])
    assert one == read_manifest(first / "manifest.csv")  # one manifest: as before
    both = read_manifests([first / "manifest.csv", _manifest(second)])
    assert len(both) == 42 and both[0].patient_id == "1:P0" and both[21].patient_id == "2:P0"
    assert both[21].path == second / "images/000.png"  # paths relative to their own manifest
    assert [r.split for r in both] == [r.split for r in one] * 2  # each keeps its splits


@pytest.mark.slow
def test_train_command_exports_a_loadable_bundle(tmp_path):
    """Trained on two manifests at once (`--manifest A --manifest B`)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    manifests = [_manifest(tmp_path / "a"), _manifest(tmp_path / "b")]
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "training.cli", "train", "--manifest", str(manifests[0]),
           "--manifest", str(manifests[1]), "--random-init", "vit-micro", "--input-size", "56",
           "--epochs", "2", "--batch-size", "8", "--out", str(out),
           "--name", "smoke", "--version", "0.0.1", "--threads", "1", "--input-transform", "lcn"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "bundle.train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("val_auc" in r for r in log)
    bundle = load_bundle(out)
    assert bundle.identity.name == "smoke" and bundle.spec.method == "partial"
    assert bundle.spec.input_transform == "lcn" and "input transform lcn" in (out / "MODEL_CARD.md").read_text()
    summary = bundle.manifest["data_summary"]
    assert summary["manifest"] == f"{manifests[0]} + {manifests[1]}"
    assert sum(summary["frontal_rows_per_split"]["val"].values()) == 12  # 6 from each manifest
    assert summary["patients_train"] == 30  # P1 of one cohort and P1 of the other: two women
    assert (out / "MODEL_CARD.md").is_file()


def test_train_command_refuses_missing_source(tmp_path, capsys):
    from training.cli import main

    assert main(["train", "--manifest", str(_manifest(tmp_path)), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--random-init" in err and "--init-bundle" in err


def test_sizing_bundle_command_refuses_an_unknown_preset(tmp_path, capsys):
    from training.cli import main

    assert main(["sizing-bundle", "--random-init", "vit-huge", "--out", str(tmp_path / "x")]) == 2
    assert "vit-b14" in capsys.readouterr().err


@pytest.mark.slow
def test_sizing_bundle_command_exports_an_untrained_lora_bundle(tmp_path):
    config = tmp_path / "vit.json"
    config.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 64, "patch_size": 14, "image_size": 56}))
    out = tmp_path / "sizing"
    done = subprocess.run([sys.executable, "-m", "training.cli", "sizing-bundle", "--random-init", str(config),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.splitlines()[-1])
    assert printed["input_size"] == 56 and printed["method"] == "lora" and printed["name"] == "sizing"
    bundle = load_bundle(out, merged=True)
    assert bundle.spec.input_size == 56 and bundle.spec.method == "lora"
    assert bundle.identity.clinical_use is False
    assert "Sizing only" in bundle.manifest["intended_use"]
    assert bundle.classifier(torch.zeros(1, 3, 56, 56)).shape == (1, 3)


def test_init_bundle_starts_from_a_bundle_with_every_weight_trainable(tmp_path):
    from osteo_node.bundle import export_bundle
    from osteo_node.model import ModelSpec, build_classifier
    from training.train import PRESETS, bundle_start

    config = {**PRESETS["vit-micro"], "image_size": 56}
    spec = ModelSpec(family="dinov2", source="random-init:vit-micro", method="partial", partial_blocks=2,
                     input_size=56, mean=(0.5,) * 3, std=(0.25,) * 3, pooling="cls+mean")
    torch.manual_seed(0)
    model = build_classifier(spec, random_init_config=config)
    export_bundle(model, spec, tmp_path / "start", name="start", version="1.0.0",
                  thresholds={"low_bmd": 0.5, "osteoporosis": 0.5}, intended_use="test", clinical_use=False,
                  data_summary="test")
    start = bundle_start(str(tmp_path / "start"))
    assert start.spec.input_size == 56 and start.spec.pooling == "cls+mean" and start.spec.mean == (0.5,) * 3
    assert start.origin["name"] == "start" and start.origin["device_uid"]
    assert all(p.requires_grad for p in start.classifier.parameters())
    x = torch.rand(2, 3, 56, 56)
    model.eval()
    start.classifier.eval()
    with torch.no_grad():
        assert torch.allclose(start.classifier(x), model(x), atol=1e-5)  # the bundle's weights, not new ones
    assert bundle_start(str(tmp_path / "start"), 84).spec.input_size == 84
    assert start.spec.input_transform == "none"
    assert bundle_start(str(tmp_path / "start"), input_transform="lcn").spec.input_transform == "lcn"


def test_cached_images_apply_the_input_transform(tmp_path):
    from osteo_node.pixels import prepare
    from training.data import CachedImages, load_image01

    rows = read_manifest(_manifest(tmp_path))[:3]
    plain, lcn = CachedImages(rows, 56), CachedImages(rows, 56, "lcn")
    for i, row in enumerate(rows):
        expected = prepare(load_image01(row.path), 56, (0.0,) * 3, (1.0,) * 3, transform="lcn").tensor[0]
        np.testing.assert_allclose(lcn.images[i].float().numpy(), expected, atol=1e-3)  # float16 cache
    assert not torch.allclose(lcn.images.float(), plain.images.float(), atol=0.05)


def test_train_command_wants_exactly_one_start(tmp_path, capsys):
    from training.cli import main

    assert main(["train", "--manifest", str(_manifest(tmp_path)), "--random-init", "vit-micro",
                 "--init-bundle", "reference", "--out", str(tmp_path / "b")]) == 2
    assert "exactly one of" in capsys.readouterr().err
