"""`osteo-train export`: one trained model as a node bundle with a model card, checked after writing.

    osteo-train export --run runs/sweep --out bundles/osteo-v1 [--pick rad-dino-lora] [--version 1.0.0]

--run is a sweep folder (default pick: the run with the best validation macro AUC) or one run
folder (with bundle/ and train/). The model is re-exported through osteo_node.bundle.export_bundle
(new Device UID) with its thresholds, threshold target and temperature, and a model card: data
summary, test metrics with 95% CIs (from the sweep's results.json when there is one), intended use,
limitations, thresholds and their target. The written bundle is then loaded with
osteo_node.bundle.load_bundle and its test-split probabilities are compared with the ones the
training side computed (training.evaluate.predict + temperature); the command fails when they
differ by more than --atol.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osteo_node.bundle import export_bundle, load_bundle
from osteo_node.errors import BundleError
from training import evaluate, train
from training.calibration import softmax
from training.report import _ci
from training.sweep import PREDICTIONS_FILE, RESULTS_FILE, SWEEP_FILE

logger = logging.getLogger(__name__)

LIMITATIONS = (
    "- Trained and evaluated only on the data summarised above; performance on other hospitals, "
    "detectors, populations or paediatric patients is unknown and must be measured locally.\n"
    "- Thresholds were chosen on the validation split for the stated target; the achieved sensitivity "
    "on new data can be lower. Re-check them on local data before any use.\n"
    "- The temperature was fitted on the validation split; calibration can drift with case mix.\n"
    "- Screening aid only: DXA remains the reference standard; outputs are unverified by a human.\n"
    "- Synthetic (phantom) training data, if used, does not establish clinical validity."
)


def choose_run(run_dir: Path, pick: str | None) -> Path:
    """The run folder to export: `pick`, or the best validation macro AUC of a sweep folder."""
    if (run_dir / "bundle" / "bundle.json").is_file() and pick is None:
        return run_dir
    if not (run_dir / SWEEP_FILE).is_file():
        raise ValueError(f"--run {run_dir} is neither a run folder (bundle/bundle.json) "
                         f"nor a sweep folder ({SWEEP_FILE})")
    names = json.loads((run_dir / SWEEP_FILE).read_text(encoding="utf-8"))["runs"]
    if pick is not None:
        if pick not in names:
            raise ValueError(f"--pick {pick!r} is not a run of {run_dir} ({names})")
        return run_dir / pick
    best: tuple[float, str] | None = None
    for name in names:
        summary = run_dir / name / "train" / train.SUMMARY_FILE
        if summary.is_file():
            auc = float(json.loads(summary.read_text(encoding="utf-8"))["best_val_auc"])
            if not np.isnan(auc) and (best is None or auc > best[0]):
                best = (auc, name)
    if best is None:
        raise ValueError(f"no finished run with a validation AUC in {run_dir}")
    logger.info("picked %s (validation macro AUC %.4f)", best[1], best[0])
    return run_dir / best[1]


def test_metrics(sweep_dir: Path, name: str) -> dict[str, Any] | None:
    path = sweep_dir / RESULTS_FILE
    if not path.is_file():
        return None
    for m in json.loads(path.read_text(encoding="utf-8"))["models"]:
        if m["name"] == name:
            return m
    return None


def model_card(manifest: dict[str, Any], run_name: str, metrics: dict[str, Any] | None, version: str) -> str:
    spec = manifest["spec"]
    target = manifest.get("threshold_target")
    lines = [f"# Model card: {manifest['name']} {version}", "",
             "## Intended use", "", str(manifest["intended_use"]), "",
             "## Model", "",
             f"- Run: {run_name}; backbone family {spec['family']}, adaptation {spec['method']}",
             f"- Input: {spec['input_size']} px letterboxed frontal chest radiograph, "
             f"mean {spec['mean']}, std {spec['std']}",
             f"- Temperature (softmax(logits / T), fitted on validation): {manifest.get('temperature', 1.0)}", "",
             "## Thresholds", ""]
    for key, value in manifest["thresholds"].items():
        lines.append(f"- {key}: {value:.4f}")
    lines.append("- Target: " + (json.dumps(target) if target else "none (fixed thresholds)"))
    lines += ["", "## Test metrics (95% CI, patient-level stratified bootstrap)", ""]
    if metrics:
        lines += [f"Test split: {metrics['n']} images, {metrics['n_patients']} patients, {metrics['class_counts']}", "",
                  "| metric | value [95% CI] |", "|---|---|"]
        for key, label in (("macro_auc", "macro AUC"), ("low_bmd_auc", "low-BMD AUC"),
                           ("osteoporosis_auc", "osteoporosis AUC"), ("accuracy", "accuracy"),
                           ("low_bmd_sensitivity", "low-BMD sensitivity at threshold"),
                           ("low_bmd_specificity", "low-BMD specificity at threshold"),
                           ("low_bmd_ppv", "low-BMD PPV"), ("low_bmd_npv", "low-BMD NPV"),
                           ("osteoporosis_sensitivity", "osteoporosis sensitivity at threshold"),
                           ("osteoporosis_specificity", "osteoporosis specificity at threshold"),
                           ("ece_after", "ECE (15 bins, after temperature)")):
            lines.append(f"| {label} | {_ci(metrics.get(key))} |")
    else:
        lines.append("Not evaluated here (no sweep results.json); run `osteo-train evaluate`.")
    lines += ["", "## Training data", "", "```json", json.dumps(manifest.get("data_summary"), indent=2), "```", "",
              "## Limitations", "", LIMITATIONS, ""]
    return "\n".join(lines)


def check_probabilities(bundle_dir: Path, run: Path, atol: float) -> float:
    """Max |p_node - p_training| on the run's cached test cases; raise when above `atol`."""
    cached = run / PREDICTIONS_FILE
    if not cached.is_file():
        logger.warning("no %s in %s: probability check skipped", PREDICTIONS_FILE, run)
        return float("nan")
    data = np.load(cached, allow_pickle=False)
    source = json.loads((run / "bundle" / "bundle.json").read_text(encoding="utf-8"))
    expected = softmax(np.log(np.clip(data["probs_raw"], 1e-300, None)), float(source.get("temperature", 1.0) or 1.0))
    cases = [evaluate.Case(path=Path(f), patient_id=str(p), label=int(y), bone_masks=())
             for f, p, y in zip(data["files"], data["patient_ids"], data["labels"])]
    bundle = load_bundle(bundle_dir)
    got = evaluate.predict(bundle, cases).probs  # as the node reports them: temperature applied
    diff = float(np.max(np.abs(got - expected))) if len(cases) else 0.0
    if diff > atol:
        raise ValueError(f"exported bundle {bundle_dir} gives probabilities {diff:.2e} away from training-side "
                         f"evaluation (atol {atol})")
    return diff


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-train export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="sweep folder or run folder")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--pick", help="run name in a sweep (default: best validation macro AUC)")
    p.add_argument("--name", help="bundle name (default: the run name)")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    try:
        run = choose_run(args.run, args.pick)
        source = load_bundle(run / "bundle")
    except (ValueError, BundleError) as exc:
        print(f"osteo-train export: {exc}", file=sys.stderr)
        return 2
    manifest = source.manifest
    name = args.name or run.name
    metrics = test_metrics(run.parent, run.name) or test_metrics(run, run.name)
    card = model_card({**manifest, "name": name}, run.name, metrics, args.version)
    spec = source.spec
    export_bundle(source.classifier, spec, args.out, name=name, version=args.version,
                  thresholds=manifest["thresholds"], intended_use=manifest["intended_use"],
                  clinical_use=bool(manifest.get("clinical_use", False)), data_summary=manifest["data_summary"],
                  model_card_md=card, manufacturer=manifest.get("manufacturer", "osteo-node project"),
                  temperature=manifest.get("temperature"), threshold_target=manifest.get("threshold_target"))
    try:
        diff = check_probabilities(args.out, run, args.atol)
    except (ValueError, BundleError) as exc:
        print(f"osteo-train export: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"bundle": str(args.out), "run": str(run), "max_abs_probability_difference": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
