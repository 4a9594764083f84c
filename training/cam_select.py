"""`osteo-train cam-select`: choose the saliency map a bundle draws, by faithfulness, without masks.

    osteo-train cam-select --bundle B --manifest M [--split val] [--n 24] [--write] [--json]

A candidate is a grad-cam method (`--methods`, default gradcam, gradcam++, layercam) at the first
LayerNorm of one transformer block (`--blocks`, default every block). For each candidate the
command computes ROAD (`pytorch_grad_cam.metrics.road.ROADCombined`, noisy linear imputation) of
the predicted class on the first `--n` frontal images of `--split`: the mean over the removal
percentiles of (LeRF - MoRF) / 2, i.e. how much faster the prediction falls when the pixels the
map calls important are removed first than when they are removed last. A random map gives the
floor (about 0). The candidate with the highest mean ROAD wins.

No bone mask and no label is used, so the choice cannot be tuned towards the bone metrics that
`osteo-train explain` then reports. `--write` records the winner in the bundle's bundle.json
("cam": method, block and how it was chosen); the node (`[model] cam_method = "bundle"`) and
`osteo-train explain` use it. The secondary captures change with it, so `--write` also gives the
bundle a new Device UID (outputs are identified by it) and, with `--version`, a new version.
Grad-CAM at the last block is what a bundle without a choice uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osteo_node.bundle import MANIFEST, LoadedBundle, load_bundle
from osteo_node.errors import BundleError, ImageError
from osteo_node.infer import CAM_METHODS
from osteo_node.model import CamChoice, backbone_blocks, cam_target, gradients_down_to
from osteo_node.pixels import prepare
from osteo_node.uids import new_uid
from training.data import load_image01, read_manifest

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam")
#: ROAD removal percentiles (the same as `osteo-train explain` uses for its deletion curves).
PERCENTILES = (20, 40, 60, 80)


def road_scores(bundle: LoadedBundle, inputs: torch.Tensor, maps: np.ndarray, targets: Sequence[int],
                seed: int, batch_size: int = 8) -> np.ndarray:
    """ROAD combined per image for saliency maps on the model input grid (N, S, S)."""
    from pytorch_grad_cam.metrics.road import ROADCombined  # type: ignore[import-untyped]
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # type: ignore[import-untyped]

    torch.manual_seed(seed)  # the imputation noise: the same for every candidate
    metric = ROADCombined(percentiles=list(PERCENTILES))
    scores = []
    for start in range(0, len(inputs), batch_size):
        stop = start + batch_size
        chosen = [ClassifierOutputSoftmaxTarget(t) for t in targets[start:stop]]
        with torch.no_grad():
            scores.append(np.asarray(metric(inputs[start:stop], maps[start:stop], chosen, bundle.classifier)))
    return np.concatenate(scores).astype(np.float64)


def candidate_maps(bundle: LoadedBundle, inputs: torch.Tensor, choice: CamChoice, targets: Sequence[int],
                   batch_size: int = 8) -> np.ndarray:
    """The candidate's maps of the given classes on the model input grid."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # type: ignore[import-untyped]

    model = bundle.classifier
    layers, reshape = cam_target(model, choice.block)
    gradients_down_to(model, layers)
    cam = CAM_METHODS[choice.method](model=model, target_layers=layers, reshape_transform=reshape)
    try:
        maps = [cam(input_tensor=inputs[i:i + batch_size],
                    targets=[ClassifierOutputTarget(t) for t in targets[i:i + batch_size]])
                for i in range(0, len(inputs), batch_size)]
    finally:
        cam.activations_and_grads.release()
        model.requires_grad_(False)
    return np.concatenate(maps).astype(np.float32)


def select(bundle: LoadedBundle, inputs: torch.Tensor, candidates: Sequence[CamChoice],
           seed: int = 0) -> dict[str, Any]:
    """ROAD of every candidate and of a random map; candidates sorted best first."""
    with torch.no_grad():
        targets = [int(t) for t in bundle.classifier(inputs).argmax(-1)]
    rng = np.random.default_rng(seed)
    random_maps = rng.random((len(inputs), *inputs.shape[-2:])).astype(np.float32)
    rows = []
    for choice in candidates:
        scores = road_scores(bundle, inputs, candidate_maps(bundle, inputs, choice, targets), targets, seed)
        rows.append({**choice.to_dict(), "road": float(scores.mean()),
                     "road_se": float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0})
        logger.info("%s block %d: ROAD %.4f", choice.method, choice.block, rows[-1]["road"])
    rows.sort(key=lambda r: -r["road"])
    random_road = float(road_scores(bundle, inputs, random_maps, targets, seed).mean())
    return {"n": len(inputs), "percentiles": list(PERCENTILES), "random_map_road": random_road,
            "candidates": rows, "best": {"method": rows[0]["method"], "block": rows[0]["block"]}}


def write_choice(bundle: LoadedBundle, result: dict[str, Any], provenance: dict[str, Any],
                 version: str | None = None) -> Path:
    """Record the winner in the bundle's bundle.json (atomically) with a new Device UID; the file
    hashes are untouched."""
    path = bundle.path / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["device_uid"] = str(new_uid())
    if version:
        manifest["version"] = version
    best = result["best"]
    manifest["cam"] = {**best, "selected_by": {
        "metric": "ROAD combined (pytorch_grad_cam.metrics.road), predicted class, no masks",
        "road": result["candidates"][0]["road"], "random_map_road": result["random_map_road"],
        "percentiles": result["percentiles"], "n": result["n"], **provenance}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_table(result: dict[str, Any]) -> str:
    lines = [f"ROAD combined on {result['n']} images (higher = more faithful; "
             f"random map {result['random_map_road']:.4f})", "", "| method | block | ROAD | s.e. |",
             "|---|---:|---:|---:|"]
    for row in result["candidates"]:
        lines.append(f"| {row['method']} | {row['block']} | {row['road']:.4f} | {row['road_se']:.4f} |")
    lines.append(f"\nbest: {result['best']['method']} at block {result['best']['block']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train cam-select", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder or shipped name (reference)")
    p.add_argument("--manifest", required=True, type=Path, help="manifest.csv (no masks needed)")
    p.add_argument("--split", choices=("train", "val", "test", "all"), default="val")
    p.add_argument("--n", type=int, default=24, help="images (the first N frontal rows of the split)")
    p.add_argument("--methods", nargs="+", choices=sorted(CAM_METHODS), default=list(DEFAULT_METHODS))
    p.add_argument("--blocks", nargs="+", type=int, help="block indices (default: every block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--write", action="store_true",
                   help="record the winner in the bundle's bundle.json (with a new Device UID)")
    p.add_argument("--version", help="with --write: the bundle's new version")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 2:
        print("osteo-train cam-select: --n must be >= 2", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"osteo-train cam-select: --bundle: {exc}", file=sys.stderr)
        return 2
    depth = len(backbone_blocks(bundle.classifier.backbone))
    blocks = args.blocks if args.blocks is not None else list(range(-depth, 0))
    try:
        candidates = [CamChoice(method, block) for method in args.methods for block in blocks]
        for choice in candidates:
            cam_target(bundle.classifier, choice.block)
        rows = [r for r in read_manifest(args.manifest) if args.split == "all" or r.split == args.split]
        spec = bundle.spec
        inputs = torch.from_numpy(np.stack([
            prepare(load_image01(r.path), spec.input_size, spec.mean, spec.std,
                    transform=spec.input_transform).tensor for r in rows[:args.n]
        ])) if rows else None
    except (OSError, ValueError, KeyError, ImageError) as exc:
        print(f"osteo-train cam-select: {exc}", file=sys.stderr)
        return 2
    if inputs is None or len(inputs) < 2:
        print(f"osteo-train cam-select: manifest {args.manifest} has fewer than 2 frontal "
              f"{args.split!r} images", file=sys.stderr)
        return 2
    result = select(bundle, inputs.to(bundle.device), candidates, seed=args.seed)
    result["bundle"] = bundle.identity.name
    if args.write:
        path = write_choice(bundle, result, {"manifest": str(args.manifest), "split": args.split}, args.version)
        logger.info("wrote cam %s to %s", result["best"], path)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
