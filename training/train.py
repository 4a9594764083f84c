"""`osteo-train train`: train a classifier on a manifest and export it as a bundle.

Frontal rows only; images through osteo_node.pixels, decoded once and cached; AdamW with linear
warm-up then cosine decay, class-weighted cross-entropy, early stopping on validation macro AUC
(one-vs-rest), fixed seeds, one JSON line per epoch; the best epoch is exported with
osteo_node.bundle.export_bundle.

Also: gradient accumulation (--accumulate), bf16 autocast on CUDA (--precision), a checkpoint
after every epoch (WORK/checkpoint.pt: trainable weights, optimizer, scheduler, epoch, early-stopping
state, RNG states) and --resume from it, tqdm progress bars (on a terminal), patient-level splits
when the manifest has no split column (--split-seed), temperature scaling fitted on the validation
split (--calibrate; the temperature goes into the bundle manifest and the node applies it), and
thresholds chosen on the validation split for a target sensitivity (--target-sensitivity).

Several GPUs: launch with ``torchrun --nproc_per_node N -m training.cli train ...`` or
``accelerate launch --multi_gpu --num_processes N -m training.cli train ...``: with WORLD_SIZE > 1
the model is wrapped in DistributedDataParallel (NCCL on CUDA, gloo on CPU), each rank takes its
share of every batch, and only rank 0 writes logs, checkpoints and the bundle.

Thresholds not given on the command line are chosen on the validation split (the highest with
sensitivity >= --target-sensitivity, default 0.90).

Example (the shipped reference model, trained on synthetic phantoms only)::

    osteo-train phantoms --n 3000 --seed 1 --out DATA --workers 2
    osteo-train train --manifest DATA/manifest.csv --random-init vit-tiny --input-size 112 \
        --epochs 10 --lr 5e-4 --patience 10 --export-reference
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from osteo_node.bundle import BUNDLES_DIR, export_bundle, load_bundle
from osteo_node.errors import BundleError
from osteo_node.metrics import expected_calibration_error
from osteo_node.model import (
    DEFAULT_NORMALISATION,
    FAMILIES,
    METHODS,
    POOLINGS,
    PRECISIONS,
    Classifier,
    ModelSpec,
    autocast,
    backbone_blocks,
    build_classifier,
    trainable_parameter_count,
)
from osteo_node.pixels import INPUT_TRANSFORMS
from osteo_node.records import CLASS_NAMES
from training.calibration import fit_temperature, nll, softmax
from training.data import CachedImages, augment, normalise, read_manifests

logger = logging.getLogger(__name__)

#: DINOv2-architecture ViTs built from random initialisation (no pretrained weights here).
PRESETS: dict[str, dict[str, Any]] = {
    "vit-micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      image_size=112, patch_size=14),
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                     image_size=224, patch_size=14, drop_path_rate=0.05),
    "vit-small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                      image_size=224, patch_size=14, drop_path_rate=0.1),
    #: ViT-B/14, the DINOv2-base / RAD-DINO architecture (86.6 M parameters): for sizing and timing.
    "vit-b14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=518, patch_size=14),
}

DEFAULT_THRESHOLDS = {"low_bmd": 0.5, "osteoporosis": 0.5}
CHECKPOINT = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_INTENDED_USE = (
    "Research prototype: estimates the probability of low bone mineral density (osteopenia or "
    "osteoporosis) from a frontal chest radiograph of an adult, for opportunistic referral to DXA. "
    "Not a diagnosis; not for clinical use; every output must be reviewed by a physician."
)
#: Intended use of the shipped reference bundle (--export-reference), which never saw a patient.
REFERENCE_INTENDED_USE = (
    "Reference model trained only on synthetic phantoms (digitally reconstructed chest radiographs "
    "rendered from one CT with simulated bone loss; see training/phantoms.py). For trying and testing "
    "the osteo-node system end to end. Not for clinical use: it was never trained or validated on real "
    "patients, and its outputs on real radiographs are meaningless."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train train", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, type=Path, action="append",
                   help="manifest.csv (paths relative to it); repeat it to train on several cohorts at once: "
                        "each keeps its splits, and its patient ids are prefixed with its position (1:, 2:, ...)")
    p.add_argument("--family", choices=FAMILIES, default="dinov2")
    p.add_argument("--source", help="hub id or local transformers checkpoint of the backbone")
    p.add_argument("--random-init", metavar="PRESET_OR_JSON",
                   help=f"train a DINOv2-architecture ViT from scratch: a preset {sorted(PRESETS)} or a "
                        "JSON file of Dinov2Config fields; implies method partial over all blocks")
    p.add_argument("--init-bundle", metavar="BUNDLE",
                   help="start from a trained bundle (name or folder: backbone, head, input size, "
                        "normalisation and pooling) and fine-tune every weight; a curriculum, e.g. "
                        "from the exaggerated phantom effect to the realistic one")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--partial-blocks", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--pooling", choices=POOLINGS, default="cls",
                   help="cls, or cls+mean (CLS + mean patch token, as DINOv2's own classifier)")
    p.add_argument("--input-size", type=int, help="model input size (default: preset image_size or 224)")
    p.add_argument("--input-transform", choices=INPUT_TRANSFORMS,
                   help="transform of the resized image before normalisation, applied in training and "
                        "at the node: none, or lcn (local contrast normalisation, "
                        "osteo_node.pixels.local_contrast); default none, or the --init-bundle's")
    p.add_argument("--allow-download", action="store_true", help="let from_pretrained use the hub")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 head-only/LoRA, 3e-4 full)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--patience", type=int, default=6, help="epochs without a better val AUC before stopping")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--augment-strength", type=float, default=1.0,
                   help="scale of the random affine / photometric augmentation (default 1.0)")
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
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast on CPU too")
    p.add_argument("--resume", action="store_true", help="continue from WORK/checkpoint.pt when it exists")
    p.add_argument("--split-seed", type=int, help="seed of the patient-level split when the manifest has "
                   "no split column (default: --seed)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the validation split and store it in the bundle")
    p.add_argument("--target-sensitivity", type=float,
                   help="choose the low-BMD and osteoporosis thresholds on the validation split for this "
                        "sensitivity (overrides --threshold-*)")
    return p


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def random_init_config(preset_or_json: str, family: str = "dinov2") -> dict[str, Any]:
    """A preset's Dinov2Config fields, or those read from a JSON file, for a `family` whose
    backbone has the DINOv2 architecture (ValueError otherwise)."""
    if family not in ("dinov2", "rad-dino"):
        raise ValueError("--random-init builds a DINOv2-architecture ViT; use --family dinov2")
    if preset_or_json in PRESETS:
        return dict(PRESETS[preset_or_json])
    path = Path(preset_or_json)
    if not path.is_file():
        raise ValueError(f"--random-init {preset_or_json!r} is neither a preset {sorted(PRESETS)} nor a JSON file")
    return dict(json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True, eq=False)
class BundleStart:
    """A trained bundle to fine-tune (--init-bundle): its classifier, every weight trainable."""

    classifier: Classifier
    spec: ModelSpec
    origin: dict[str, str]  # name, version, device UID of the starting bundle


def bundle_start(name_or_path: str, input_size: int | None = None,
                 input_transform: str | None = None) -> BundleStart:
    """Load a bundle as the starting point of training: method partial over every block (all
    weights trainable, head included), its normalisation and pooling; `input_size` may change the
    input resolution (DINOv2 interpolates its position embeddings) and `input_transform` the
    input transform (osteo_node.pixels.INPUT_TRANSFORMS). LoRA bundles are refused: their
    adapters would need merging first."""
    loaded = load_bundle(name_or_path)
    if loaded.spec.method == "lora":
        raise ValueError(f"--init-bundle {name_or_path}: LoRA bundles are not supported as a start")
    depth = len(backbone_blocks(loaded.classifier.backbone))
    spec = dataclasses.replace(loaded.spec, method="partial", partial_blocks=depth,
                               input_size=input_size or loaded.spec.input_size,
                               input_transform=input_transform or loaded.spec.input_transform)
    classifier = loaded.classifier
    classifier.spec = spec
    classifier.requires_grad_(True)
    classifier.train()
    identity = loaded.identity
    return BundleStart(classifier, spec, {"name": identity.name, "version": identity.version,
                                          "device_uid": identity.device_uid})


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
def predict_logits(model: torch.nn.Module, data: CachedImages, spec: ModelSpec, batch_size: int,
                   device: torch.device, precision: str = "auto") -> torch.Tensor:
    """Float32 logits (N, C) of the cached images, in order."""
    model.eval()
    logits = []
    for i in range(0, len(data), batch_size):
        x = normalise(data.images[i : i + batch_size], spec.mean, spec.std).to(device)
        with autocast(device, precision):
            logits.append(model(x).float().cpu())
    return torch.cat(logits) if logits else torch.zeros((0, spec.num_classes))


def evaluate(model: Classifier, data: CachedImages, spec: ModelSpec, batch_size: int,
             device: torch.device, class_weights: torch.Tensor, precision: str = "auto") -> dict[str, float]:
    out = predict_logits(model, data, spec, batch_size, device, precision)
    probs = torch.softmax(out, -1).numpy()
    labels = data.labels.numpy()
    return {
        "loss": float(F.cross_entropy(out, data.labels, weight=class_weights)),
        "auc": macro_auc(labels, probs),
        "accuracy": float((probs.argmax(1) == labels).mean()),
    }


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that training changes (frozen ones come from the source)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load trainable_state() output; refuse a state that does not match the model."""
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trainable - set(state):
        raise ValueError(f"checkpoint does not match the model: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {sorted(trainable - set(state))[:5]}")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename): an interrupted save leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun / accelerate launch (world 1: a plain process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistContext, str]:
    """Join the process group when launched with WORLD_SIZE > 1; return the context and the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank), device


def finish_distributed(ctx: DistContext) -> None:
    """Leave the process group joined by init_distributed (no-op in a plain process)."""
    if ctx.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def train(model: Classifier, spec: ModelSpec, train_set: CachedImages, val_set: CachedImages,
          args: argparse.Namespace, generator: torch.Generator, log_path: Path,
          dist_ctx: DistContext | None = None) -> dict[str, Any]:
    """Train in place; load the best epoch's weights back into `model`; return the summary.

    A checkpoint goes next to `log_path` after every epoch; with args.resume an existing one is
    continued (the epoch log is cut back to the checkpoint's epoch).
    """
    ctx = dist_ctx or DistContext()
    device = torch.device(args.device)
    precision = getattr(args, "precision", "auto")
    accumulate = max(1, int(getattr(args, "accumulate", 1) or 1))
    model.to(device)
    counts = torch.bincount(train_set.labels, minlength=len(CLASS_NAMES)).float()
    class_weights = (counts.sum() / (len(CLASS_NAMES) * counts.clamp(min=1))).to(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    lr = args.lr or (3e-4 if spec.method == "partial" else 1e-3)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    batches_per_epoch = max(1, math.ceil(len(train_set) / args.batch_size))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accumulate))
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    net: Any = model  # DistributedDataParallel(model) when launched with several processes
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    best: dict[str, Any] = {"auc": -1.0, "epoch": 0}
    best_state: dict[str, torch.Tensor] = {}
    stale, start_epoch, finished = 0, 1, False
    ckpt_path = log_path.with_name(CHECKPOINT)
    records: list[str] = []
    if getattr(args, "resume", False) and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["spec"] != spec.to_dict():
            raise ValueError(f"checkpoint {ckpt_path} was made for another model spec; remove it or drop --resume")
        load_trainable_state(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        best, best_state, stale, finished = ckpt["best"], ckpt["best_state"], ckpt["stale"], ckpt["finished"]
        set_rng_state(ckpt["rng"], generator)
        start_epoch = int(ckpt["epoch"]) + 1
        if log_path.is_file():
            records = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                       if line.strip() and json.loads(line)["epoch"] < start_epoch]
        logger.info("resuming from %s after epoch %d (best epoch %d)", ckpt_path, ckpt["epoch"], best["epoch"])
    epoch = start_epoch - 1
    log = open(log_path, "w", encoding="utf-8") if ctx.is_main else open(os.devnull, "w", encoding="utf-8")
    with log:
        for line in records:
            log.write(line + "\n")
        for epoch in range(start_epoch, args.epochs + 1):
            if finished:
                epoch -= 1
                break
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(train_set), generator=generator)
            batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
            running, seen = 0.0, 0
            bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{args.epochs}", unit="batch",
                       disable=None if ctx.is_main else True, leave=False)
            for g in range(0, len(batches), accumulate):
                group = batches[g : g + accumulate]
                optimizer.zero_grad(set_to_none=True)
                for j, idx in enumerate(group):
                    x01 = train_set.images[idx]
                    if not args.no_augment:
                        x01 = augment(x01, generator, args.augment_strength)  # every rank draws the same numbers
                    mine = slice(ctx.rank, None, ctx.world)  # this rank's share of the batch
                    x = normalise(x01[mine], spec.mean, spec.std).to(device)
                    y = train_set.labels[idx][mine].to(device)
                    sync = ctx.world == 1 or j == len(group) - 1
                    with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device, precision):
                        loss = F.cross_entropy(net(x).float(), y, weight=class_weights.to(device))
                    (loss / len(group)).backward()
                    running += loss.item() * len(y)
                    seen += len(y)
                    bar.update(1)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
            bar.close()
            if ctx.world > 1:  # the epoch's mean loss over every rank's share
                import torch.distributed as dist

                totals = torch.tensor([running, float(seen)], dtype=torch.float64, device=device)
                dist.all_reduce(totals)
                running, seen = float(totals[0]), int(totals[1])
            train_seconds = time.perf_counter() - start
            val = evaluate(model, val_set, spec, args.batch_size * 2, device, class_weights, precision)
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
                best_state = trainable_state(model)
                stale = 0
            else:
                stale += 1
                if stale >= args.patience:
                    logger.info("early stop after epoch %d (best epoch %d)", epoch, best["epoch"])
                    finished = True
            if ctx.is_main:
                save_checkpoint(ckpt_path, {
                    "epoch": epoch, "spec": spec.to_dict(), "model": trainable_state(model),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "best": best, "best_state": best_state, "stale": stale,
                    "finished": finished or epoch == args.epochs, "rng": rng_state(generator)})
            if finished:
                break
    load_trainable_state(model, best_state)
    model.eval()
    return {"best_epoch": best["epoch"], "best_val_auc": best["auc"], "epochs_run": epoch,
            "learning_rate": lr, "class_weights": class_weights.tolist(), "accumulate": accumulate,
            "effective_batch_size": args.batch_size * accumulate}


def calibrate_and_threshold(model: Classifier, spec: ModelSpec, val_set: CachedImages,
                            args: argparse.Namespace) -> dict[str, Any]:
    """Temperature (--calibrate) and thresholds (--target-sensitivity) from the validation split."""
    from osteo_node.metrics import threshold_for_sensitivity

    device = torch.device(args.device)
    logits = predict_logits(model, val_set, spec, args.batch_size * 2, device,
                            getattr(args, "precision", "auto")).numpy().astype(np.float64)
    labels = val_set.labels.numpy()
    out: dict[str, Any] = {"thresholds": {"low_bmd": args.threshold_low_bmd,
                                          "osteoporosis": args.threshold_osteoporosis},
                           "temperature": None, "threshold_target": None, "calibration": None}
    temperature = 1.0
    if args.calibrate:
        temperature = fit_temperature(logits, labels)
        out["temperature"] = temperature
        out["calibration"] = {
            "split": "val", "n": int(len(labels)), "temperature": temperature,
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature),
            "ece15_before": expected_calibration_error(softmax(logits), labels),
            "ece15_after": expected_calibration_error(softmax(logits, temperature), labels)}
        logger.info("temperature %.4f fitted on %d validation images", temperature, len(labels))
    if args.target_sensitivity is not None:
        probs = softmax(logits, temperature)
        thresholds = dict(out["thresholds"])
        for key, positive, score in (("low_bmd", labels >= 1, probs[:, 1] + probs[:, 2]),
                                     ("osteoporosis", labels == 2, probs[:, 2])):
            if positive.any():
                thresholds[key] = threshold_for_sensitivity(positive, score, args.target_sensitivity)
            else:
                logger.warning("no %s cases in the validation split: its threshold stays %.3f",
                               key, thresholds[key])
        out["thresholds"] = thresholds
        out["threshold_target"] = {"metric": "sensitivity", "value": args.target_sensitivity, "split": "val",
                                   "n_val": int(len(labels)),
                                   "scores": {"low_bmd": "P(osteopenia) + P(osteoporosis)",
                                              "osteoporosis": "P(osteoporosis)"},
                                   "calibrated": bool(args.calibrate)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    if args.accumulate < 1:
        print(f"osteo-train train: --accumulate must be >= 1, got {args.accumulate}", file=sys.stderr)
        return 2
    if args.target_sensitivity is not None and not 0.0 < args.target_sensitivity <= 1.0:
        print(f"osteo-train train: --target-sensitivity must be in (0, 1], got {args.target_sensitivity}",
              file=sys.stderr)
        return 2
    dist_ctx, args.device = init_distributed(args.device)
    generator = seed_everything(args.seed)

    starts = [name for name, value in (("--source", args.source), ("--random-init", args.random_init),
                                       ("--init-bundle", args.init_bundle)) if value]
    if len(starts) != 1:
        print("osteo-train train: give exactly one of --source (pretrained backbone), --random-init or "
              f"--init-bundle (got {starts or 'none'})", file=sys.stderr)
        return 2
    try:
        init_cfg = random_init_config(args.random_init, args.family) if args.random_init else None
        initial = (bundle_start(args.init_bundle, args.input_size, args.input_transform)
                   if args.init_bundle else None)
    except (ValueError, BundleError) as exc:
        print(f"osteo-train train: {exc}", file=sys.stderr)
        return 2
    input_size = args.input_size or int((init_cfg or {}).get("image_size", 224))
    mean, std = DEFAULT_NORMALISATION[args.family]
    if initial is not None:
        spec = initial.spec
        input_size = spec.input_size
    elif init_cfg is not None:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        spec = ModelSpec(family=args.family, source=f"random-init:{args.random_init}", method="partial",
                         partial_blocks=int(init_cfg["num_hidden_layers"]), input_size=input_size,
                         mean=mean, std=std, pooling=args.pooling,
                         input_transform=args.input_transform or "none")
    else:
        spec = ModelSpec(family=args.family, source=args.source, method=args.method,
                         partial_blocks=args.partial_blocks, lora_rank=args.lora_rank,
                         lora_alpha=2 * args.lora_rank, input_size=input_size, mean=mean, std=std,
                         pooling=args.pooling, input_transform=args.input_transform or "none")

    manifests = " + ".join(map(str, args.manifest))  # as before for one manifest
    rows = read_manifests(args.manifest, split_seed=args.seed if args.split_seed is None else args.split_seed)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    if args.limit:
        by_split = {s: r[: args.limit] for s, r in by_split.items()}
    if not by_split["train"] or not by_split["val"]:
        print(f"osteo-train train: manifest {manifests} needs frontal train and val rows "
              f"(got {len(by_split['train'])} train, {len(by_split['val'])} val)", file=sys.stderr)
        return 2
    train_set = CachedImages(by_split["train"], input_size, spec.input_transform)
    val_set = CachedImages(by_split["val"], input_size, spec.input_transform)

    if initial is not None:
        model = initial.classifier
    else:
        model = build_classifier(spec, random_init_config=init_cfg, local_files_only=not args.allow_download)
    logger.info("spec %s; %d trainable parameters", spec, trainable_parameter_count(model))

    out = BUNDLES_DIR / "reference" if args.export_reference else args.out
    name = args.name or ("reference" if args.export_reference else out.name)
    work = args.work_dir or out.with_name(out.name + ".train")
    work.mkdir(parents=True, exist_ok=True)
    summary = train(model, spec, train_set, val_set, args, generator, work / LOG_FILE, dist_ctx)
    finish_distributed(dist_ctx)
    if not dist_ctx.is_main:
        return 0
    chosen = calibrate_and_threshold(model, spec, val_set, args)
    summary.update(trainable_parameters=trainable_parameter_count(model), temperature=chosen["temperature"],
                   thresholds=chosen["thresholds"], threshold_target=chosen["threshold_target"],
                   calibration=chosen["calibration"])

    counts = {s: dict(Counter(CLASS_NAMES[r.label] for r in rs)) for s, rs in by_split.items()}
    data_summary = {"manifest": manifests, "frontal_rows_per_split": counts,
                    "patients_train": len({r.patient_id for r in by_split["train"]}),
                    "seed": args.seed, "random_init": args.random_init, **summary}
    if initial is not None:
        data_summary["init_bundle"] = initial.origin
    intended_use = REFERENCE_INTENDED_USE if args.export_reference else DEFAULT_INTENDED_USE
    if args.export_reference:
        data_summary["data"] = "synthetic phantoms (osteo-train phantoms: DRRs of one CT); no patient data"
    card = model_card(name, args.version, spec, data_summary, intended_use)
    export_bundle(model.cpu(), spec, out, name=name, version=args.version,
                  thresholds=chosen["thresholds"],
                  intended_use=intended_use, clinical_use=args.clinical_use,
                  data_summary=data_summary, model_card_md=card,
                  temperature=chosen["temperature"], threshold_target=chosen["threshold_target"])
    (work / SUMMARY_FILE).write_text(json.dumps({"bundle": str(out), **data_summary}, indent=2) + "\n")
    print(json.dumps({"bundle": str(out), **summary}))
    return 0


def model_card(name: str, version: str, spec: ModelSpec, data_summary: dict[str, Any],
               intended_use: str = DEFAULT_INTENDED_USE) -> str:
    return "\n".join([
        f"# Model card: {name} {version}", "",
        "## Intended use", "", intended_use, "",
        "## Model", "",
        f"- Backbone family: {spec.family} (source `{spec.source}`), adaptation: {spec.method}",
        f"- Input: {spec.input_size} px letterboxed frontal chest radiograph, input transform "
        f"{spec.input_transform}, mean {spec.mean}, std {spec.std}",
        f"- Classes: {', '.join(CLASS_NAMES)}", "",
        "## Training data", "", "```json", json.dumps(data_summary, indent=2), "```", "",
        "## Limitations", "",
        "Trained and validated only on the data above; performance on real patients is unknown.", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
