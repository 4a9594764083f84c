"""`osteo-train sweep` / `export` end to end on tiny backbones of all 4 families x 3 methods.

One phantom cohort (n=48 at 128 px), tiny random backbones saved with save_pretrained (tests/
tinymodels.py), 1 epoch per run at 56 px. Also: a training run interrupted after its first
checkpoint resumes to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from safetensors.torch import load_file

from osteo_node.bundle import load_bundle
from osteo_node.infer import Inference
from osteo_node.model import (
    FAMILIES,
    METHODS,
    build_classifier,
    trainable_parameter_count,
)
from osteo_node.pixels import decode, prepare
from training import train as train_mod
from training.calibration import softmax
from training.report import FIGURES

from tinymodels import CONFIGS, INPUT_SIZE, save_tiny_backbone, tiny_spec

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    _cli("phantoms", "--n", "48", "--seed", "3", "--out", str(out), "--size", "128")
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {f: save_tiny_backbone(f, root / f) for f in FAMILIES}


def _sweep_args(manifest: Path, out: Path, backbones: dict[str, Path], bootstrap: int) -> list[str]:
    return ["sweep", "--manifest", str(manifest), "--out", str(out),
            "--backbones", ",".join(f"{f}={p}" for f, p in backbones.items()), "--methods", ",".join(METHODS),
            "--epochs", "1", "--batch-size", "8", "--input-size", str(INPUT_SIZE), "--threads", "1",
            "--bootstrap", str(bootstrap)]


@pytest.fixture(scope="module")
def sweep(cohort, backbones, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    _cli(*_sweep_args(cohort, out, backbones, 1000))
    return out


def test_sweep_writes_report_and_figures(sweep):
    results = json.loads((sweep / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == [f"{f}-{m}" for f in FAMILIES for m in METHODS]
    assert results["n_bootstrap"] >= 1000
    report = (sweep / "report.md").read_text()
    assert "## Main table" in report and "DeLong" in report and "age band" in report
    for f in FAMILIES:
        for m in METHODS:
            assert f"| {f} | {m} |" in report
    for figure in FIGURES:
        png = sweep / "figures" / figure
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    first = results["models"][0]
    for key in ("macro_auc", "low_bmd_auc", "osteoporosis_auc", "accuracy", "low_bmd_sensitivity",
                "low_bmd_specificity", "low_bmd_ppv", "low_bmd_npv", "ece_before", "ece_after"):
        assert set(first[key]) == {"value", "ci_low", "ci_high"}
    assert set(results["subgroups"][first["name"]]) == {"40-49", "50-64", "65-74", "75+"}
    assert set(results["delong"]["low_bmd"][first["name"]]) == set(names) - {first["name"]}
    bundle = json.loads((sweep / "dinov2-lora" / "bundle" / "bundle.json").read_text())
    assert bundle["temperature"] > 0 and bundle["threshold_target"]["value"] == 0.9


def test_trainable_parameters_in_report_match_methods(sweep, backbones):
    results = {m["name"]: m for m in json.loads((sweep / "results.json").read_text())["models"]}
    report = (sweep / "report.md").read_text()
    hidden = CONFIGS["dinov2"]["hidden_size"]
    for f in FAMILIES:
        for method in METHODS:
            expected = trainable_parameter_count(build_classifier(tiny_spec(f, backbones[f], method)))
            assert results[f"{f}-{method}"]["trainable_parameters"] == expected
            assert f"| {f} | {method} | {expected:,} |" in report
        counts = {m: results[f"{f}-{m}"]["trainable_parameters"] for m in METHODS}
        assert counts["linear"] == hidden * 3 + 3  # the head only
        assert counts["linear"] < counts["lora"] < counts["partial"]


def test_exported_bundle_loads_in_the_node_with_training_side_probabilities(sweep, tmp_path):
    out = tmp_path / "exported"
    done = _cli("export", "--run", str(sweep), "--out", str(out), "--version", "1.0.0", "--threads", "1")
    picked = Path(json.loads(done.stdout.strip().splitlines()[-1])["run"])
    summaries = {p.name: json.loads((p / "train" / "summary.json").read_text())["best_val_auc"]
                 for p in sweep.iterdir() if (p / "train" / "summary.json").is_file()}
    assert summaries[picked.name] == max(summaries.values())
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Thresholds" in card and "macro AUC" in card and "## Limitations" in card and "Target" in card

    bundle = load_bundle(out)
    assert bundle.manifest["thresholds"] == json.loads((picked / "bundle" / "bundle.json").read_text())["thresholds"]
    cached = np.load(picked / "test_predictions.npz")
    expected = softmax(np.log(cached["probs_raw"]), bundle.temperature)
    spec = bundle.spec
    prepared = [prepare(decode(pydicom.dcmread(f)), spec.input_size, spec.mean, spec.std) for f in cached["files"]]
    predictions, _ = Inference(bundle).run_batch(prepared)
    node = np.array([p.probabilities for p in predictions])
    np.testing.assert_allclose(node, expected, atol=1e-5)


def test_resume_skips_finished_runs_and_continues_an_interrupted_one(sweep, cohort, backbones):
    victim = sweep / "openclip-partial"
    (victim / "train" / "summary.json").unlink()  # as if killed after its last checkpoint
    before = {p.name: (p / "train" / "train_log.jsonl").read_text() for p in sweep.iterdir() if p.is_dir()
              and (p / "train").is_dir()}
    done = _cli(*_sweep_args(cohort, sweep, backbones, 200))
    timings = json.loads(done.stdout.strip().splitlines()[-1])["timings"]
    assert timings.pop("openclip-partial") != "skipped"
    assert set(timings.values()) == {"skipped"} and len(timings) == 11
    assert "resuming" in done.stderr
    assert (victim / "train" / "summary.json").is_file()
    for name, log in before.items():  # no run trained again: epoch logs unchanged
        assert (sweep / name / "train" / "train_log.jsonl").read_text() == log


class _Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(cohort, backbones, tmp_path, monkeypatch):
    def argv(out: Path) -> list[str]:
        return ["--manifest", str(cohort), "--family", "openclip", "--source", str(backbones["openclip"]),
                "--method", "lora", "--input-size", str(INPUT_SIZE), "--epochs", "3", "--batch-size", "8",
                "--accumulate", "2", "--threads", "1", "--out", str(out / "bundle"), "--work-dir",
                str(out / "train"), "--resume", "--calibrate", "--target-sensitivity", "0.9"]

    assert train_mod.main(argv(tmp_path / "straight")) == 0
    real_save = train_mod.save_checkpoint

    def save_then_die(path, payload):
        real_save(path, payload)
        if payload["epoch"] == 1:
            raise _Interrupted

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        train_mod.main(argv(tmp_path / "resumed"))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert not (tmp_path / "resumed" / "bundle").exists()
    assert train_mod.main(argv(tmp_path / "resumed")) == 0

    logs = [[json.loads(x) for x in (tmp_path / d / "train" / "train_log.jsonl").read_text().splitlines()]
            for d in ("straight", "resumed")]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    for rel in ("bundle/head.safetensors", "bundle/adapter/adapter_model.safetensors"):
        x, y = (load_file(str(tmp_path / d / rel)) for d in ("straight", "resumed"))
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=0)


def test_data_parallel_training_with_torchrun_on_cpu(cohort, backbones, tmp_path):
    """WORLD_SIZE 2 (gloo): DDP wrapping, batch sharding, accumulation with no_sync, rank-0 export."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.cli", "train", "--manifest", str(cohort), "--family", "dinov2",
           "--source", str(backbones["dinov2"]), "--method", "lora", "--input-size", str(INPUT_SIZE),
           "--epochs", "2", "--batch-size", "8", "--accumulate", "2", "--threads", "1",
           "--out", str(out / "bundle"), "--work-dir", str(out / "train")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    log = [json.loads(x) for x in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert load_bundle(out / "bundle").spec.method == "lora"
