"""`osteo-train sweep`: train, evaluate and compare the backbone x method grid in one command.

    osteo-train sweep --manifest DATA/manifest.csv --out runs/sweep \\
        --backbones dinov2=facebook/dinov2-base,rad-dino=microsoft/rad-dino,openclip=DIR,chexagent=DIR \\
        --methods linear,partial,lora --epochs 30

Each (backbone, method) run lives in OUT/<family>-<method>/ (bundle/, train/ with the epoch log,
checkpoint and summary, test_predictions.npz). A run whose train/summary.json and bundle exist is
skipped; an interrupted run continues from train/checkpoint.pt (`osteo-train train --resume`).
Then every bundle is evaluated on the test split (training.evaluate.predict: the node's pixel
pipeline and the bundle's classifier; the bundle's temperature applied), compared
(training.compare) and reported (training.report: OUT/report.md, OUT/figures/*.png,
OUT/results.json).

Several GPUs (torch.cuda.device_count() > 1): each run is launched as
``torchrun --nproc_per_node N -m training.cli train ...`` (--launcher torchrun, the default then)
or ``accelerate launch --multi_gpu --num_processes N -m training.cli train ...``
(--launcher accelerate); training.train wraps the model in DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from osteo_node.bundle import load_bundle
from osteo_node.model import FAMILIES, METHODS, PRECISIONS
from training import compare as compare_mod
from training import evaluate, report, train
from training.data import read_manifest

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "test_predictions.npz"
LAUNCHERS = ("inprocess", "subprocess", "torchrun", "accelerate")


@dataclass(frozen=True)
class RunPlan:
    """One cell of the grid."""

    family: str
    source: str
    method: str
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.family}-{self.method}"

    @property
    def bundle(self) -> Path:
        return self.folder / "bundle"

    @property
    def work(self) -> Path:
        return self.folder / "train"

    @property
    def finished(self) -> bool:
        return (self.work / train.SUMMARY_FILE).is_file() and (self.bundle / "bundle.json").is_file()


def parse_backbones(text: str) -> dict[str, str]:
    """"family=source,family=source" -> {family: source}, families checked."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        family, sep, source = item.partition("=")
        if not sep or not source:
            raise ValueError(f"--backbones item {item!r} must be FAMILY=SOURCE")
        if family not in FAMILIES:
            raise ValueError(f"--backbones family {family!r} not in {FAMILIES}")
        out[family] = source
    if not out:
        raise ValueError("--backbones is empty")
    return out


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods {text!r}: each must be one of {METHODS}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="sweep folder (one subfolder per run)")
    p.add_argument("--backbones", required=True, help="FAMILY=SOURCE,... (hub id or save_pretrained folder)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--lr", type=float)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--input-size", type=int, help="model input size (default 224)")
    p.add_argument("--partial-blocks", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--target-sensitivity", type=float, default=0.90,
                   help="thresholds chosen on the validation split for this sensitivity (default 0.90)")
    p.add_argument("--no-calibrate", action="store_true", help="skip temperature scaling")
    p.add_argument("--seed", type=int, default=0, help="training seed and patient-level split seed")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (>= 1000 for reports)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--allow-download", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--limit", type=int, help="rows per split (smoke tests)")
    p.add_argument("--launcher", choices=LAUNCHERS,
                   help="how runs are started (default: torchrun when several GPUs are visible, else inprocess)")
    p.add_argument("--gpus", type=int, help="processes per run for torchrun/accelerate (default: all visible GPUs)")
    p.add_argument("--report-only", action="store_true", help="skip training; evaluate and report finished runs")
    return p


def train_argv(plan: RunPlan, args: argparse.Namespace) -> list[str]:
    """`osteo-train train` arguments of one run."""
    argv = ["--manifest", str(args.manifest), "--family", plan.family, "--source", plan.source,
            "--method", plan.method, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--accumulate", str(args.accumulate), "--patience", str(args.patience),
            "--partial-blocks", str(args.partial_blocks), "--lora-rank", str(args.lora_rank),
            "--seed", str(args.seed), "--split-seed", str(args.seed), "--threads", str(args.threads),
            "--device", args.device, "--precision", args.precision,
            "--out", str(plan.bundle), "--work-dir", str(plan.work), "--name", plan.name, "--resume",
            "--target-sensitivity", str(args.target_sensitivity)]
    if not args.no_calibrate:
        argv.append("--calibrate")
    for flag, value in (("--lr", args.lr), ("--input-size", args.input_size), ("--limit", args.limit)):
        if value is not None:
            argv += [flag, str(value)]
    if args.allow_download:
        argv.append("--allow-download")
    if args.no_augment:
        argv.append("--no-augment")
    return argv


def run_training(plan: RunPlan, args: argparse.Namespace, launcher: str) -> None:
    """Train one run (resuming from its checkpoint) with the chosen launcher; raise on failure."""
    argv = train_argv(plan, args)
    plan.folder.mkdir(parents=True, exist_ok=True)
    if launcher == "inprocess":
        code = train.main(argv)
    else:
        gpus = str(args.gpus or max(1, torch.cuda.device_count()))
        prefix = {
            "subprocess": [sys.executable, "-m", "training.cli", "train"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", gpus, "-m", "training.cli", "train"],
            "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", gpus,
                           "-m", "training.cli", "train"],
        }[launcher]
        with open(plan.folder / "train.out", "a", encoding="utf-8") as out:
            code = subprocess.run(prefix + argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise RuntimeError(f"training run {plan.name} failed with exit status {code} (see {plan.folder})")


def test_cases(manifest: Path, seed: int, limit: int | None) -> tuple[list[evaluate.Case], np.ndarray]:
    """Frontal test rows (same patient-level split as training) and their ages (NaN if unknown)."""
    rows = [r for r in read_manifest(manifest, split_seed=seed) if r.split == "test"]
    if limit:
        rows = rows[:limit]
    cases = [evaluate.Case(path=r.path, patient_id=r.patient_id, label=r.label, bone_masks=()) for r in rows]
    ages = np.array([np.nan if r.age is None else r.age for r in rows], dtype=np.float64)
    return cases, ages


def predict_run(plan: RunPlan, cases: Sequence[evaluate.Case], batch_size: int) -> Path:
    """Test-split probabilities of the run's bundle (training.evaluate.predict), cached on disk."""
    path = plan.folder / PREDICTIONS_FILE
    if path.is_file():
        cached = np.load(path, allow_pickle=False)
        if list(cached["patient_ids"]) == [c.patient_id for c in cases]:
            return path
    bundle = load_bundle(plan.bundle)
    predictions = evaluate.predict(bundle, cases, batch_size=batch_size, calibrated=False)
    np.savez(path, probs_raw=predictions.probs, labels=predictions.labels,
             patient_ids=np.array(predictions.patient_ids), files=np.array([str(c.path) for c in cases]))
    return path


def load_predictions(plan: RunPlan, ages: np.ndarray) -> compare_mod.ModelPredictions:
    data = np.load(plan.folder / PREDICTIONS_FILE, allow_pickle=False)
    manifest = json.loads((plan.bundle / "bundle.json").read_text(encoding="utf-8"))
    summary = json.loads((plan.work / train.SUMMARY_FILE).read_text(encoding="utf-8"))
    return compare_mod.ModelPredictions(
        name=plan.name, family=plan.family, method=plan.method,
        trainable_parameters=int(summary["trainable_parameters"]),
        labels=data["labels"], patient_ids=tuple(str(p) for p in data["patient_ids"]), ages=ages,
        probs_raw=data["probs_raw"], temperature=float(manifest.get("temperature", 1.0) or 1.0),
        thresholds=manifest["thresholds"], threshold_target=manifest.get("threshold_target"))


def plan_runs(out: Path, backbones: dict[str, str], methods: Sequence[str]) -> list[RunPlan]:
    return [RunPlan(family=f, source=src, method=m, folder=out / f"{f}-{m}")
            for f, src in backbones.items() for m in methods]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        backbones = parse_backbones(args.backbones)
        methods = parse_methods(args.methods)
    except ValueError as exc:
        print(f"osteo-train sweep: {exc}", file=sys.stderr)
        return 2
    if args.bootstrap < 1:
        print(f"osteo-train sweep: --bootstrap must be >= 1, got {args.bootstrap}", file=sys.stderr)
        return 2
    launcher = args.launcher or ("torchrun" if torch.cuda.device_count() > 1 else "inprocess")
    torch.set_num_threads(max(1, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    plans = plan_runs(args.out, backbones, methods)
    record = {"manifest": str(args.manifest), "backbones": backbones, "methods": methods,
              "runs": [p.name for p in plans], "launcher": launcher,
              "train_argv_example": train_argv(plans[0], args)}
    (args.out / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    timings: dict[str, float | str] = {}
    for plan in plans:
        if plan.finished:
            logger.info("run %s finished earlier: skipped", plan.name)
            timings[plan.name] = "skipped"
            continue
        if args.report_only:
            logger.warning("run %s is not finished: left out of the report", plan.name)
            continue
        resumed = (plan.work / train.CHECKPOINT).is_file()
        logger.info("run %s: %s", plan.name, "resuming from its checkpoint" if resumed else "training")
        start = time.perf_counter()
        run_training(plan, args, launcher)
        timings[plan.name] = round(time.perf_counter() - start, 2)
    done = [p for p in plans if p.finished]
    if not done:
        print("osteo-train sweep: no finished runs to report", file=sys.stderr)
        return 1

    cases, ages = test_cases(args.manifest, args.seed, args.limit)
    if not cases:
        print(f"osteo-train sweep: no frontal test rows in {args.manifest}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    for plan in done:
        predict_run(plan, cases, args.batch_size)
    models = [load_predictions(p, ages) for p in done]
    results = compare_mod.compare(models, n_bootstrap=args.bootstrap, seed=args.seed)
    results["runs"] = {p.name: {"folder": str(p.folder), "source": p.source,
                                "summary": json.loads((p.work / train.SUMMARY_FILE).read_text())} for p in done}
    results["timings_seconds"] = {"train": timings, "evaluate": round(time.perf_counter() - start, 2)}
    results["manifest"] = str(args.manifest)
    (args.out / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    report_path = report.write_report(args.out, results, {p.name: p.work for p in done})
    print(json.dumps({"report": str(report_path), "runs": [p.name for p in done], "timings": timings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
