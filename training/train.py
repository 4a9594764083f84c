"""`osteo-train train`: train a classifier on a manifest and export it as a bundle.

Frontal rows only; images through osteo_node.pixels, decoded once and cached; AdamW with linear
warm-up then cosine decay, class-weighted cross-entropy, early stopping on validation macro AUC
(one-vs-rest), fixed seeds, one JSON line per epoch; the best epoch is exported with
osteo_node.bundle.export_bundle.

Example (the shipped reference model)::

    osteo-train train --manifest DATA/manifest.csv --random-init vit-small --export-reference
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from osteo_node.bundle import BUNDLES_DIR, export_bundle
from osteo_node.model import (
    DEFAULT_NORMALISATION,
    FAMILIES,
    METHODS,
    Classifier,
    ModelSpec,
    build_classifier,
    trainable_parameter_count,
)
from osteo_node.records import CLASS_NAMES
from training.data import CachedImages, augment, normalise, read_manifest

logger = logging.getLogger(__name__)

#: Small DINOv2-architecture ViTs trained from random initialisation (no pretrained weights here).
PRESETS: dict[str, dict[str, Any]] = {
    "vit-micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      image_size=112, patch_size=14),
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                     image_size=224, patch_size=14, drop_path_rate=0.05),
    "vit-small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                      image_size=224, patch_size=14, drop_path_rate=0.1),
}

DEFAULT_THRESHOLDS = {"low_bmd": 0.5, "osteoporosis": 0.5}
DEFAULT_INTENDED_USE = (
    "Research prototype: estimates the probability of low bone mineral density (osteopenia or "
    "osteoporosis) from a frontal chest radiograph of an adult, for opportunistic referral to DXA. "
    "Not a diagnosis; not for clinical use; every output must be reviewed by a physician."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train train", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, type=Path, help="manifest.csv (paths relative to it)")
    p.add_argument("--family", choices=FAMILIES, default="dinov2")
    p.add_argument("--source", help="hub id or local transformers checkpoint of the backbone")
    p.add_argument("--random-init", metavar="PRESET_OR_JSON",
                   help=f"train a DINOv2-architecture ViT from scratch: a preset {sorted(PRESETS)} or a "
                        "JSON file of Dinov2Config fields; implies method partial over all blocks")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--partial-blocks", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--input-size", type=int, help="model input size (default: preset image_size or 224)")
    p.add_argument("--allow-download", action="store_true", help="let from_pretrained use the hub")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 head-only/LoRA, 3e-4 full)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--patience", type=int, default=6, help="epochs without a better val AUC before stopping")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--limit", type=int, help="use at most this many rows per split (smoke tests)")
    p.add_argument("--work-dir", type=Path, help="epoch log and summary (default: OUT.train/)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="bundle folder to write")
    out.add_argument("--export-reference", action="store_true",
                     help=f"write the shipped reference bundle ({BUNDLES_DIR / 'reference'})")
    p.add_argument("--name", help="bundle name (default: reference with --export-reference, else the out folder name)")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--threshold-low-bmd", type=float, default=DEFAULT_THRESHOLDS["low_bmd"])
    p.add_argument("--threshold-osteoporosis", type=float, default=DEFAULT_THRESHOLDS["osteoporosis"])
    p.add_argument("--clinical-use", action="store_true", help="mark the bundle as cleared for clinical use")
    p.add_argument("--device", default="cpu")
    return p


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def random_init_config(preset_or_json: str) -> dict[str, Any]:
    """A preset's Dinov2Config fields, or those read from a JSON file."""
    if preset_or_json in PRESETS:
        return dict(PRESETS[preset_or_json])
    path = Path(preset_or_json)
    if not path.is_file():
        raise ValueError(f"--random-init {preset_or_json!r} is neither a preset {sorted(PRESETS)} nor a JSON file")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest macro AUC over the classes that have positives and negatives (NaN if none)."""
    aucs = [roc_auc_score(labels == k, probs[:, k]) for k in range(probs.shape[1])
            if 0 < int((labels == k).sum()) < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: Classifier, data: CachedImages, spec: ModelSpec, batch_size: int,
             device: torch.device, class_weights: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = []
    for i in range(0, len(data), batch_size):
        x = normalise(data.images[i : i + batch_size], spec.mean, spec.std).to(device)
        logits.append(model(x).float().cpu())
    out = torch.cat(logits)
    probs = torch.softmax(out, -1).numpy()
    labels = data.labels.numpy()
    return {
        "loss": float(F.cross_entropy(out, data.labels, weight=class_weights)),
        "auc": macro_auc(labels, probs),
        "accuracy": float((probs.argmax(1) == labels).mean()),
    }


def train(model: Classifier, spec: ModelSpec, train_set: CachedImages, val_set: CachedImages,
          args: argparse.Namespace, generator: torch.Generator, log_path: Path) -> dict[str, Any]:
    """Train in place; load the best epoch's weights back into `model`; return the summary."""
    device = torch.device(args.device)
    model.to(device)
    counts = torch.bincount(train_set.labels, minlength=len(CLASS_NAMES)).float()
    class_weights = (counts.sum() / (len(CLASS_NAMES) * counts.clamp(min=1))).to(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    lr = args.lr or (3e-4 if spec.method == "partial" else 1e-3)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = max(1, math.ceil(len(train_set) / args.batch_size))
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))

    best: dict[str, Any] = {"auc": -1.0, "epoch": 0}
    best_state: dict[str, torch.Tensor] = {}
    stale = 0
    with open(log_path, "w", encoding="utf-8") as log:
        for epoch in range(1, args.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(train_set), generator=generator)
            running, seen = 0.0, 0
            for i in range(0, len(order), args.batch_size):
                idx = order[i : i + args.batch_size]
                x01 = train_set.images[idx]
                if not args.no_augment:
                    x01 = augment(x01, generator)
                x = normalise(x01, spec.mean, spec.std).to(device)
                y = train_set.labels[idx].to(device)
                loss = F.cross_entropy(model(x), y, weight=class_weights.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                running += loss.item() * len(idx)
                seen += len(idx)
            train_seconds = time.perf_counter() - start
            val = evaluate(model, val_set, spec, args.batch_size * 2, device, class_weights)
            record = {"epoch": epoch, "train_loss": running / max(1, seen), "val_loss": val["loss"],
                      "val_auc": val["auc"], "val_accuracy": val["accuracy"],
                      "lr": scheduler.get_last_lr()[0], "train_seconds": round(train_seconds, 2),
                      "seconds": round(time.perf_counter() - start, 2)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("epoch %d: %s", epoch, record)
            improved = not math.isnan(val["auc"]) and val["auc"] > best["auc"]
            if improved or not best_state:
                best = {"auc": val["auc"], "epoch": epoch, "val_accuracy": val["accuracy"]}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                stale = 0
            else:
                stale += 1
                if stale >= args.patience:
                    logger.info("early stop after epoch %d (best epoch %d)", epoch, best["epoch"])
                    break
    model.load_state_dict(best_state)
    model.eval()
    return {"best_epoch": best["epoch"], "best_val_auc": best["auc"], "epochs_run": epoch,
            "learning_rate": lr, "class_weights": class_weights.tolist()}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    generator = seed_everything(args.seed)

    if args.random_init is None and not args.source:
        print("osteo-train train: give --source (pretrained backbone) or --random-init", file=sys.stderr)
        return 2
    init_cfg = random_init_config(args.random_init) if args.random_init else None
    input_size = args.input_size or int((init_cfg or {}).get("image_size", 224))
    mean, std = DEFAULT_NORMALISATION[args.family]
    if init_cfg is not None:
        if args.family not in ("dinov2", "rad-dino"):
            print("osteo-train train: --random-init builds a DINOv2-architecture ViT; use --family dinov2",
                  file=sys.stderr)
            return 2
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        spec = ModelSpec(family=args.family, source=f"random-init:{args.random_init}", method="partial",
                         partial_blocks=int(init_cfg["num_hidden_layers"]), input_size=input_size,
                         mean=mean, std=std)
    else:
        spec = ModelSpec(family=args.family, source=args.source, method=args.method,
                         partial_blocks=args.partial_blocks, lora_rank=args.lora_rank,
                         lora_alpha=2 * args.lora_rank, input_size=input_size, mean=mean, std=std)

    rows = read_manifest(args.manifest)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    if args.limit:
        by_split = {s: r[: args.limit] for s, r in by_split.items()}
    if not by_split["train"] or not by_split["val"]:
        print(f"osteo-train train: manifest {args.manifest} needs frontal train and val rows "
              f"(got {len(by_split['train'])} train, {len(by_split['val'])} val)", file=sys.stderr)
        return 2
    train_set = CachedImages(by_split["train"], input_size)
    val_set = CachedImages(by_split["val"], input_size)

    model = build_classifier(spec, random_init_config=init_cfg, local_files_only=not args.allow_download)
    logger.info("spec %s; %d trainable parameters", spec, trainable_parameter_count(model))

    out = BUNDLES_DIR / "reference" if args.export_reference else args.out
    name = args.name or ("reference" if args.export_reference else out.name)
    work = args.work_dir or out.with_name(out.name + ".train")
    work.mkdir(parents=True, exist_ok=True)
    summary = train(model, spec, train_set, val_set, args, generator, work / "train_log.jsonl")

    counts = {s: dict(Counter(CLASS_NAMES[r.label] for r in rs)) for s, rs in by_split.items()}
    data_summary = {"manifest": str(args.manifest), "frontal_rows_per_split": counts,
                    "patients_train": len({r.patient_id for r in by_split["train"]}),
                    "seed": args.seed, "random_init": args.random_init, **summary}
    card = model_card(name, args.version, spec, data_summary)
    export_bundle(model.cpu(), spec, out, name=name, version=args.version,
                  thresholds={"low_bmd": args.threshold_low_bmd, "osteoporosis": args.threshold_osteoporosis},
                  intended_use=DEFAULT_INTENDED_USE, clinical_use=args.clinical_use,
                  data_summary=data_summary, model_card_md=card)
    (work / "summary.json").write_text(json.dumps({"bundle": str(out), **data_summary}, indent=2) + "\n")
    print(json.dumps({"bundle": str(out), **summary}))
    return 0


def model_card(name: str, version: str, spec: ModelSpec, data_summary: dict[str, Any]) -> str:
    return "\n".join([
        f"# Model card: {name} {version}", "",
        "## Intended use", "", DEFAULT_INTENDED_USE, "",
        "## Model", "",
        f"- Backbone family: {spec.family} (source `{spec.source}`), adaptation: {spec.method}",
        f"- Input: {spec.input_size} px letterboxed frontal chest radiograph, mean {spec.mean}, std {spec.std}",
        f"- Classes: {', '.join(CLASS_NAMES)}", "",
        "## Training data", "", "```json", json.dumps(data_summary, indent=2), "```", "",
        "## Limitations", "",
        "Trained and validated only on the data above; performance on real patients is unknown.", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
