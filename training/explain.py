"""`osteo-train explain`: does the model look at bone? Saliency-vs-mask metrics and bone perturbation.

For every frontal image of a manifest that has bone masks (phantoms), through the node's own path
(decode -> prepare -> `osteo_node.infer.Inference`, map on the display grid):

- `iou_bone`: IoU of the salient region (ThresholdRule, default top 20 % of pixels) with the union
  of the bone masks (ribs, clavicles, spine, scapulae, humeri), and per structure;
- `bone_mass_fraction`: share of saliency mass inside bone, and per structure; chance baselines:
  the bone area fraction (and the IoU of an anatomy-blind region of the same size);
- `delta_bone`: low-BMD AUC (low BMD = osteopenia or osteoporosis vs normal, scored by
  P(osteopenia) + P(osteoporosis), as the node reports it) on the original images minus the AUC
  with all bone inpainted (training.perturb.inpaint_bone on the decoded image, before prepare);
  `recovered`: the AUC when all bone but one structure (ribs, clavicles or spine) is inpainted,
  minus the all-bone-inpainted AUC; the macro one-vs-rest AUCs are reported alongside;
- `faithfulness`: ROAD (pytorch_grad_cam.metrics.road, noisy linear imputation) on the model
  input grid: confidence in the predicted class as the most (MoRF) or least (LeRF) relevant pixels
  are removed, a deletion curve, and the ROAD combined score mean((LeRF - MoRF) / 2) (higher =
  the map points at what the model uses);
- the same saliency metrics with an alternative CAM method (default: Grad-CAM, or Grad-CAM++ when
  the primary method is Grad-CAM).

The saliency map is the one the node draws with each bundle (its bundle.json "cam" choice: method
and target block, picked by `osteo-train cam-select` on ROAD faithfulness without masks; Grad-CAM
at the last block when the bundle records none); `--method` overrides the method.

95 % CIs: percentile bootstrap over patients, stratified by class (osteo_node.metrics.bootstrap_many).

    osteo-train explain --bundle reference --manifest DATA/manifest.csv --split test --json
    osteo-train explain --bundle reference --manifest A.csv --control CTRL --control-manifest B.csv --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from osteo_node.bundle import LoadedBundle, load_bundle
from osteo_node.errors import BundleError, ImageError
from osteo_node.infer import CAM_METHODS, Inference
from osteo_node.metrics import bootstrap_many, low_bmd_auc, macro_auc
from osteo_node.pixels import prepare
from osteo_node.records import CLASS_NAMES, Heatmap, Prediction, PreparedImage
from training.data import load_image01, read_manifest
from training.explain_metrics import (
    BONE_STRUCTURES,
    DEFAULT_RULE,
    ThresholdRule,
    area_fraction,
    bone_mass_fraction,
    chance_iou,
    iou,
    salient_region,
    union_mask,
)
from training.perturb import inpaint_bone

logger = logging.getLogger(__name__)

#: Structures left intact, one at a time, to see how much AUC each alone recovers.
RECOVERY_STRUCTURES: tuple[str, ...] = ("ribs", "clavicles", "spine")
#: ROAD percentiles p: p % of the pixels are kept, the other (100 - p) % removed (imputed).
ROAD_PERCENTILES: tuple[int, ...] = (80, 60, 40, 20)
#: Perturbation variants: name -> structures inpainted.
VARIANTS: dict[str, tuple[str, ...]] = {
    "bone": BONE_STRUCTURES,
    **{f"keep_{s}": tuple(b for b in BONE_STRUCTURES if b != s) for s in RECOVERY_STRUCTURES},
}


# --------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Case:
    """One frontal image with its bone masks."""

    path: Path
    patient_id: str
    label: int
    masks: dict[str, Path]


def read_cases(manifest: Path, split: str) -> list[Case]:
    """Frontal rows of `manifest` (split 'all' or 'test') that have every bone mask column."""
    rows = read_manifest(manifest)
    base = manifest.parent
    with open(manifest, newline="", encoding="utf-8") as fh:
        raw = {(base / r["file"]).as_posix(): r for r in csv.DictReader(fh)}
    cases = []
    for row in rows:
        if split != "all" and row.split != split:
            continue
        rec = raw[row.path.as_posix()]
        paths = {s: (rec.get(f"mask_{s}") or "").strip() for s in BONE_STRUCTURES}
        if not all(paths.values()):
            continue
        cases.append(Case(row.path, row.patient_id, row.label, {s: base / p for s, p in paths.items()}))
    return cases


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A PNG mask (nonzero = structure) as bool on `shape` (area resampling, then >= 0.5)."""
    try:
        with Image.open(path) as img:
            values = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise ImageError(f"mask {str(path)!r} cannot be read: {exc}") from exc
    return resize_mask(values > 0.5, shape)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask onto another grid (area-weighted when shrinking, majority rule)."""
    if mask.shape == shape:
        return mask.astype(bool)
    resized = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return resized >= 0.5


def to_input_grid(heat: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A display-grid map placed back on the square model input (zero on the letterbox border)."""
    top, left, height, width = box
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + height, left : left + width] = cv2.resize(
        heat.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return out


# ----------------------------------------------------------------------------- per model


@dataclass(frozen=True)
class Settings:
    """What `explain_model` computes."""

    method: str | None = None  # None: the bundle's own choice (bundle.cam)
    alt_method: str | None = "auto"  # "auto": gradcam, or gradcam++ when the primary is gradcam
    rule: ThresholdRule = DEFAULT_RULE
    display_max: int = 1024
    faith_n: int = 12
    seed: int = 0
    bootstrap: int = 1000
    examples_per_class: int = 3

    def methods(self, bundle: LoadedBundle) -> tuple[str, str | None]:
        """The primary and alternative CAM methods for `bundle` (both at the bundle's block)."""
        method = self.method or bundle.cam.method
        alt = self.alt_method
        if alt == "auto":
            alt = "gradcam++" if method == "gradcam" else "gradcam"
        return method, (alt if alt != method else None)


@dataclass
class ImageResult:
    """Everything measured on one image (display grid)."""

    case: Case
    probs: dict[str, np.ndarray]  # variant ("original", "bone", "keep_ribs", ...) -> (3,)
    iou_bone: float
    mass: float
    area: float
    region_fraction: float
    structure_mass: dict[str, float]
    structure_iou: dict[str, float]
    structure_area: dict[str, float]
    alt_iou: float = float("nan")
    alt_mass: float = float("nan")
    road_morf: list[float] = field(default_factory=list)  # confidence after removal, per percentile
    road_lerf: list[float] = field(default_factory=list)
    road_start: float = float("nan")


@dataclass
class Example:
    """Kept for figures: display image, heatmap, bone mask, prediction."""

    case: Case
    display: np.ndarray
    heat: np.ndarray
    bone: np.ndarray
    prediction: Prediction
    mass: float


def _forward_probs(bundle: LoadedBundle, tensors: Sequence[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(tensors)).to(next(bundle.classifier.parameters()).device)
        return bundle.probabilities(bundle.classifier(batch)).cpu().numpy().astype(np.float64)


def _road(bundle: LoadedBundle, prepared: PreparedImage, heat: np.ndarray, target: int,
          percentiles: Sequence[int]) -> tuple[float, list[float], list[float]]:
    """Predicted-class probability before, and after MoRF / LeRF removal at each percentile."""
    from pytorch_grad_cam.metrics.road import (  # type: ignore[import-untyped]
        ROADLeastRelevantFirst,
        ROADMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # type: ignore[import-untyped]

    size = prepared.tensor.shape[-1]
    cam = to_input_grid(heat, prepared.box, size)[None]
    x = torch.from_numpy(prepared.tensor)[None]
    targets = [ClassifierOutputSoftmaxTarget(target)]
    model = bundle.classifier
    with torch.no_grad():
        start = float(torch.softmax(model(x), -1)[0, target])
    morf, lerf = [], []
    for p in percentiles:
        morf.append(start + float(ROADMostRelevantFirst(percentile=p)(x, cam, targets, model)[0]))
        lerf.append(start + float(ROADLeastRelevantFirst(percentile=p)(x, cam, targets, model)[0]))
    return start, morf, lerf


def explain_model(bundle: LoadedBundle, cases: Sequence[Case], settings: Settings,
                  device: str = "cpu") -> tuple[list[ImageResult], list[Example]]:
    """Measure every case with one bundle; keep a few examples per class for figures."""
    spec = bundle.spec
    method, alt_method = settings.methods(bundle)
    inference = Inference(bundle, device=device, cam_method=method)
    alt = Inference(bundle, device=device, cam_method=alt_method) if alt_method else None
    results: list[ImageResult] = []
    examples: list[Example] = []
    shown = {k: 0 for k in range(len(CLASS_NAMES))}
    started = time.perf_counter()
    for i, case in enumerate(cases):
        image = load_image01(case.path)
        full_masks = {s: load_mask(p, image.shape) for s, p in case.masks.items()}
        prepared = prepare(image, spec.input_size, spec.mean, spec.std, display_max=settings.display_max,
                           transform=spec.input_transform)
        prediction, heatmap = inference.run(prepared)
        heat = heatmap.values
        masks = {s: resize_mask(m, heat.shape) for s, m in full_masks.items()}
        bone = union_mask(masks)
        region = salient_region(heat, settings.rule)

        rng = np.random.default_rng([settings.seed, i])
        tensors = []
        for structures in VARIANTS.values():
            perturbed = inpaint_bone(image, union_mask(full_masks, structures), rng)
            tensors.append(prepare(np.clip(perturbed, 0, 1), spec.input_size, spec.mean, spec.std,
                                   display_max=1, transform=spec.input_transform).tensor)
        probs = {"original": np.asarray(prediction.probabilities, dtype=np.float64)}
        probs.update(zip(VARIANTS, _forward_probs(bundle, tensors)))

        result = ImageResult(
            case=case, probs=probs, iou_bone=iou(region, bone), mass=bone_mass_fraction(heat, bone),
            area=area_fraction(bone), region_fraction=float(region.mean()),
            structure_mass={s: bone_mass_fraction(heat, m) for s, m in masks.items()},
            structure_iou={s: iou(region, m) for s, m in masks.items()},
            structure_area={s: area_fraction(m) for s, m in masks.items()},
        )
        if alt is not None:
            alt_heat = alt.run(prepared)[1].values
            result.alt_iou = iou(salient_region(alt_heat, settings.rule), bone)
            result.alt_mass = bone_mass_fraction(alt_heat, bone)
        if i < settings.faith_n:
            target = CLASS_NAMES.index(prediction.category)
            result.road_start, result.road_morf, result.road_lerf = _road(
                bundle, prepared, heat, target, ROAD_PERCENTILES)
        results.append(result)
        if shown[case.label] < settings.examples_per_class:
            shown[case.label] += 1
            examples.append(Example(case, prepared.display, heat, bone, prediction, result.mass))
        if (i + 1) % 25 == 0:
            logger.info("%s: %d/%d images, %.1f s", bundle.identity.name, i + 1, len(cases),
                        time.perf_counter() - started)
    inference.close()
    if alt is not None:
        alt.close()
    return results, examples


# ------------------------------------------------------------------------------- summary


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarise(bundle: LoadedBundle, results: Sequence[ImageResult], settings: Settings,
              manifest: Path) -> dict[str, Any]:
    """The JSON summary of one model: point values with patient-level bootstrap CIs."""
    if not results:
        raise ValueError("summarise: no images were measured")
    y = np.array([r.case.label for r in results])
    pids = [r.case.patient_id for r in results]
    variants = ["original", *VARIANTS]
    # one row per image: [iou, mass, alt_iou, alt_mass, probs of each variant (3 each)]
    columns = {"iou": 0, "mass": 1, "alt_iou": 2, "alt_mass": 3}
    table = [np.array([[r.iou_bone, r.mass, r.alt_iou, r.alt_mass] for r in results])]
    for k, v in enumerate(variants):
        columns[v] = 4 + 3 * k
        table.append(np.stack([r.probs[v] for r in results]))
    structure_cols = {}
    for s in BONE_STRUCTURES:
        structure_cols[s] = sum(t.shape[1] for t in table)
        table.append(np.array([[r.structure_mass[s]] for r in results]))
    scores = np.concatenate(table, axis=1)

    def mean_of(col: int) -> Callable[[np.ndarray, np.ndarray], float]:
        return lambda _y, s: _nanmean(s[:, col])

    def auc_of(v: str, fn: Callable[[np.ndarray, np.ndarray], float] = low_bmd_auc) -> Callable[..., float]:
        c = columns[v]
        return lambda yy, s: fn(yy, s[:, c : c + 3])

    def diff(f: Callable[..., float], g: Callable[..., float]) -> Callable[..., float]:
        return lambda yy, s: f(yy, s) - g(yy, s)

    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "iou_bone": mean_of(columns["iou"]),
        "bone_mass_fraction": mean_of(columns["mass"]),
        "delta_bone": diff(auc_of("original"), auc_of("bone")),
        "auc_original": auc_of("original"),
        "auc_bone_perturbed": auc_of("bone"),
        "delta_bone_macro": diff(auc_of("original", macro_auc), auc_of("bone", macro_auc)),
    }
    for s in RECOVERY_STRUCTURES:
        fns[f"auc_keep_{s}"] = auc_of(f"keep_{s}")
        fns[f"recovered_{s}"] = diff(auc_of(f"keep_{s}"), auc_of("bone"))
    for s in BONE_STRUCTURES:
        fns[f"mass_{s}"] = mean_of(structure_cols[s])
    method, alt_method = settings.methods(bundle)
    if alt_method:
        fns["alt_iou_bone"] = mean_of(columns["alt_iou"])
        fns["alt_bone_mass_fraction"] = mean_of(columns["alt_mass"])
    ci = bootstrap_many(fns, y, scores, pids, n=settings.bootstrap, seed=settings.seed)

    def d(name: str) -> dict[str, float]:
        return ci[name].as_dict()

    area = np.array([r.area for r in results])
    q = np.array([r.region_fraction for r in results])
    per_structure = {
        s: {
            "bone_mass_fraction": d(f"mass_{s}"),
            "iou": _nanmean(np.array([r.structure_iou[s] for r in results])),
            "area_fraction": _nanmean(np.array([r.structure_area[s] for r in results])),
        }
        for s in BONE_STRUCTURES
    }
    faith = [r for r in results if r.road_morf]
    faithfulness: dict[str, Any] = {"method": "ROAD (pytorch_grad_cam.metrics.road, noisy linear imputation)",
                                    "n": len(faith)}
    if faith:
        morf = np.array([r.road_morf for r in faith])
        lerf = np.array([r.road_lerf for r in faith])
        start = np.array([r.road_start for r in faith])
        faithfulness.update({
            "target": "softmax probability of the predicted class",
            "removed_fraction": [round(1 - p / 100, 2) for p in ROAD_PERCENTILES],
            "start_confidence": float(start.mean()),
            "morf_confidence": morf.mean(axis=0).tolist(),
            "lerf_confidence": lerf.mean(axis=0).tolist(),
            "road_combined": float(((lerf - morf) / 2).mean()),
        })
    ident = bundle.identity
    return {
        "model": {"name": ident.name, "version": ident.version, "device_uid": ident.device_uid,
                  "backbone": ident.backbone, "method": ident.method, "path": str(bundle.path)},
        "manifest": str(manifest),
        "n": len(results),
        "n_patients": len(set(pids)),
        "class_counts": {c: int((y == k).sum()) for k, c in enumerate(CLASS_NAMES)},
        "method": method,
        "cam_block": bundle.cam.block,
        "threshold_rule": settings.rule.describe(),
        "auc_kind": "low-BMD AUC (osteopenia+osteoporosis vs normal, scored by P(osteopenia)+P(osteoporosis))",
        "iou_bone": d("iou_bone"),
        "bone_mass_fraction": d("bone_mass_fraction"),
        "delta_bone": d("delta_bone"),
        "auc_original": d("auc_original"),
        "auc_bone_perturbed": d("auc_bone_perturbed"),
        "delta_bone_macro": d("delta_bone_macro"),
        "recovered": {s: {"auc": d(f"auc_keep_{s}"), "recovered": d(f"recovered_{s}")}
                      for s in RECOVERY_STRUCTURES},
        "chance": {"bone_area_fraction": _nanmean(area),
                   "iou_bone": _nanmean(np.array([chance_iou(a, b) for a, b in zip(area, q)])),
                   "salient_area_fraction": _nanmean(q),
                   "auc": 0.5},
        "per_structure": per_structure,
        "alt_method": None if not alt_method else {
            "method": alt_method, "iou_bone": d("alt_iou_bone"),
            "bone_mass_fraction": d("alt_bone_mass_fraction")},
        "faithfulness": faithfulness,
        "bootstrap": {"resamples": settings.bootstrap, "level": 0.95, "unit": "patient",
                      "stratified_by": "class", "seed": settings.seed},
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------- figures


def _f(value: Any) -> float:
    """A JSON-safe number back to float (None -> NaN)."""
    return float("nan") if value is None else float(value)


def _err(entries: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(2, n) error bars from intervals (NaN-safe)."""
    return np.nan_to_num(np.array([[_f(e["value"]) - _f(e["ci_low"]), _f(e["ci_high"]) - _f(e["value"])]
                                   for e in entries]).T)


def _pct(interval: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    if interval["value"] is None or (isinstance(interval["value"], float) and math.isnan(interval["value"])):
        return "n/a"
    v, lo, hi = (interval[k] * scale if interval[k] is not None else float("nan")
                 for k in ("value", "ci_low", "ci_high"))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def montage_figure(examples_by_model: Mapping[str, Sequence[Example]], path: Path, dpi: int = 80) -> Path:
    """Per model: one row per class, heatmap (JET, alpha) over the display image, bone outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(examples_by_model)
    per_row = max(1, max((sum(1 for e in ex if e.case.label == 0) for ex in examples_by_model.values()), default=1))
    rows = len(models) * len(CLASS_NAMES)
    fig, axes = plt.subplots(rows, per_row, figsize=(2.2 * per_row, 2.3 * rows), squeeze=False)
    for m, name in enumerate(models):
        for k, cls in enumerate(CLASS_NAMES):
            picks = [e for e in examples_by_model[name] if e.case.label == k][:per_row]
            for j in range(per_row):
                ax = axes[m * len(CLASS_NAMES) + k, j]
                ax.axis("off")
                if j >= len(picks):
                    continue
                e = picks[j]
                ax.imshow(e.display, cmap="gray", vmin=0, vmax=255)
                ax.imshow(e.heat, cmap="jet", alpha=0.45 * np.clip(e.heat, 0.15, 1.0), vmin=0, vmax=1)
                ax.contour(e.bone.astype(np.float32), levels=[0.5], colors="white", linewidths=0.4)
                ax.set_title(f"{name}\nlabel {cls}, pred {e.prediction.category}\nbone mass {e.mass:.2f}",
                             fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def structure_bars_figure(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Per-structure saliency mass fraction (with CI) vs area fraction, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(BONE_STRUCTURES) + ["all bone"]
    x = np.arange(len(names))
    width = 0.8 / (2 * len(summaries))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for m, (model, s) in enumerate(summaries.items()):
        entries = [s["per_structure"][n]["bone_mass_fraction"] for n in BONE_STRUCTURES] + [s["bone_mass_fraction"]]
        values = np.array([_f(e["value"]) for e in entries])
        err = _err(entries)
        areas = [s["per_structure"][n]["area_fraction"] for n in BONE_STRUCTURES] + [s["chance"]["bone_area_fraction"]]
        ax.bar(x + (2 * m) * width - 0.4 + width / 2, values, width, yerr=err, capsize=2,
               label=f"{model}: saliency mass fraction")
        ax.bar(x + (2 * m + 1) * width - 0.4 + width / 2, areas, width, alpha=0.45, hatch="//",
               label=f"{model}: area fraction (chance)")
    ax.set_xticks(x, names)
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Where Grad-CAM mass falls, per bone structure (95% patient bootstrap CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def deletion_figure(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """ROAD deletion curves (MoRF and LeRF) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for model, s in summaries.items():
        f = s["faithfulness"]
        if "removed_fraction" not in f:
            continue
        xs = [0.0, *f["removed_fraction"]]
        line = ax.plot(xs, [f["start_confidence"], *f["morf_confidence"]], marker="o",
                       label=f"{model}: most relevant first (ROAD {f['road_combined']:.3f})")[0]
        ax.plot(xs, [f["start_confidence"], *f["lerf_confidence"]], marker="s", ls="--",
                color=line.get_color(), label=f"{model}: least relevant first")
    ax.set_xlabel("fraction of pixels removed (noisy linear imputation)")
    ax.set_ylabel("P(predicted class)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    ax.set_title("Deletion curves (ROAD)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def auc_figure(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Low-BMD AUC: original, all bone inpainted, one structure left intact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["original", "bone inpainted", *(f"keep {s}" for s in RECOVERY_STRUCTURES)]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(summaries))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for m, (model, s) in enumerate(summaries.items()):
        entries = [s["auc_original"], s["auc_bone_perturbed"], *(s["recovered"][r]["auc"] for r in RECOVERY_STRUCTURES)]
        values = np.array([_f(e["value"]) for e in entries])
        err = _err(entries)
        ax.bar(x + m * width - 0.4 + width / 2, values, width, yerr=err, capsize=2, label=model)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("low-BMD AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def rg1_overlays(bundles: Mapping[str, LoadedBundle], out: Path, settings: Settings,
                 device: str = "cpu") -> tuple[list[Path], dict[str, Example]]:
    """The node's SC rendering (encode.render_overlay) of the real RG1 chest CR per model and method.

    Also returns, per model, RG1 with the primary method's map (no bone mask: a real image)."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file

        rg1_path = get_testdata_file("RG1_UNCR.dcm")
    except (ImportError, ValueError, OSError) as exc:
        logger.warning("RG1_UNCR.dcm not available (pydicom-data): %s", exc)
        return [], {}
    if rg1_path is None:
        logger.warning("RG1_UNCR.dcm not available (install pydicom-data)")
        return [], {}
    from osteo_node.encode import render_overlay
    from osteo_node.pixels import decode

    image = decode(pydicom.dcmread(rg1_path))
    paths = []
    maps: dict[str, Example] = {}
    case = Case(Path(rg1_path), "RG1", -1, {})
    for name, bundle in bundles.items():
        spec = bundle.spec
        prepared = prepare(image, spec.input_size, spec.mean, spec.std, display_max=512,
                           transform=spec.input_transform)
        primary, alt_method = settings.methods(bundle)
        for method in filter(None, (primary, alt_method)):
            inference = Inference(bundle, device=device, cam_method=method)
            prediction, heatmap = inference.run(prepared)
            inference.close()
            path = out / f"rg1_{name}_{method.replace('+', 'p')}.png"
            Image.fromarray(render_overlay(prepared.display, heatmap, prediction)).save(path)
            paths.append(path)
            if method == primary:
                maps[name] = Example(case, prepared.display, heatmap.values,
                                     np.zeros(heatmap.values.shape, bool), prediction, float("nan"))
    return paths, maps


def compact_figure(examples: Mapping[str, Sequence[Example]], rg1: Mapping[str, Example],
                   path: Path) -> Path:
    """One row per model: a phantom of each class (bone outlined) and the real RG1 radiograph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(CLASS_NAMES) + (1 if rg1 else 0)
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.9 * cols, 2.3 * len(examples)), squeeze=False)
    for r, (name, ex) in enumerate(examples.items()):
        picks: list[Example | None] = [next((e for e in ex if e.case.label == k), None)
                                       for k in range(len(CLASS_NAMES))]
        if rg1:
            picks.append(rg1.get(name))
        for c, e in enumerate(picks):
            ax = axes[r, c]
            ax.axis("off")
            if e is None:
                continue
            ax.imshow(e.display, cmap="gray", vmin=0, vmax=255)
            ax.imshow(e.heat, cmap="jet", alpha=0.45 * np.clip(e.heat, 0.15, 1.0), vmin=0, vmax=1)
            if e.bone.any():
                ax.contour(e.bone.astype(np.float32), levels=[0.5], colors="white", linewidths=0.3)
            what = "RG1 (real CR)" if e.case.label < 0 else f"phantom, label {CLASS_NAMES[e.case.label]}"
            mass = "" if math.isnan(e.mass) else f", bone mass {e.mass:.2f}"
            ax.set_title(f"{name}\n{what}\npred {e.prediction.category}{mass}", fontsize=5.5, pad=2)
    fig.tight_layout(pad=0.4, h_pad=0.8)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    with Image.open(path) as img:  # a 256-colour palette keeps the montage small enough for docs
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path


def phantom_overlays(examples: Sequence[Example], name: str, method: str, out: Path,
                     limit: int = 3) -> list[Path]:
    """The node's SC rendering of a few phantoms."""
    from osteo_node.encode import render_overlay

    paths = []
    for e in examples[:limit]:
        path = out / f"phantom_{name}_{e.case.path.stem}.png"
        heatmap = Heatmap(values=e.heat, method=method, target_category=e.prediction.category)
        Image.fromarray(render_overlay(e.display, heatmap, e.prediction)).save(path)
        paths.append(path)
    return paths


def write_report(out: Path, summaries: Mapping[str, Mapping[str, Any]], figures: Sequence[Path],
                 command: str) -> Path:
    """report.md: one table per model plus the figures."""
    lines = ["# Explainability report: does the model look at bone?", "",
             f"Command: `{command}`", ""]
    for name, s in summaries.items():
        m = s["model"]
        lines += [f"## {name}: {m['name']} {m['version']} ({m['backbone']}/{m['method']}, "
                  f"device UID {m['device_uid']})", "",
                  (f"Manifest `{s['manifest']}`: {s['n']} frontal images, {s['n_patients']} patients, "
                   f"classes {s['class_counts']}. CAM: {s['method']} at block {s['cam_block']}; "
                   f"salient region: {s['threshold_rule']}. "
                   f"AUC: {s['auc_kind']}. 95% CI: patient-level stratified bootstrap, "
                   f"{s['bootstrap']['resamples']} resamples."), "",
                  "| metric | value [95% CI] | chance / reference |", "|---|---|---|",
                  f"| bone mass fraction | {_pct(s['bone_mass_fraction'])} | "
                  f"bone area fraction {s['chance']['bone_area_fraction']:.3f} |",
                  f"| IoU bone | {_pct(s['iou_bone'])} | anatomy-blind region {s['chance']['iou_bone']:.3f} |",
                  f"| AUC original | {_pct(s['auc_original'])} | 0.5 |",
                  f"| AUC bone inpainted | {_pct(s['auc_bone_perturbed'])} | 0.5 |",
                  f"| **Delta_bone** (low-BMD AUC) | {_pct(s['delta_bone'])} | 0 |",
                  f"| Delta_bone (macro AUC) | {_pct(s['delta_bone_macro'])} | 0 |"]
        for r in RECOVERY_STRUCTURES:
            rec = s["recovered"][r]
            lines.append(f"| AUC with only {r} intact (recovered) | {_pct(rec['auc'])} ({_pct(rec['recovered'])}) | |")
        for st in BONE_STRUCTURES:
            ps = s["per_structure"][st]
            lines.append(f"| mass fraction {st} | {_pct(ps['bone_mass_fraction'])} | area {ps['area_fraction']:.3f} |")
        if s["alt_method"]:
            a = s["alt_method"]
            lines += [f"| {a['method']} bone mass fraction | {_pct(a['bone_mass_fraction'])} | |",
                      f"| {a['method']} IoU bone | {_pct(a['iou_bone'])} | |"]
        f = s["faithfulness"]
        if "road_combined" in f:
            lines.append(f"| ROAD combined ({f['n']} images) | {f['road_combined']:.3f} | 0 |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder or shipped name (reference)")
    p.add_argument("--manifest", required=True, type=Path, help="manifest.csv with mask_* columns (phantoms)")
    p.add_argument("--split", choices=("all", "test"), default="test")
    p.add_argument("--n-max", type=int, help="at most this many images per model")
    p.add_argument("--method", choices=sorted(CAM_METHODS),
                   help="CAM method (default: the bundle's choice, bundle.json 'cam'; else gradcam)")
    p.add_argument("--alt-method", choices=[*sorted(CAM_METHODS), "auto", "none"], default="auto",
                   help="comparison method (auto: gradcam, or gradcam++ when the primary is gradcam)")
    p.add_argument("--threshold-top", type=float, default=0.2,
                   help="salient region = top fraction of pixels (default 0.2 = top 20%%)")
    p.add_argument("--threshold-abs", type=float, help="salient region = saliency >= this value instead")
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples")
    p.add_argument("--faith-n", type=int, default=12, help="images with the ROAD faithfulness check (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--display-max", type=int, default=1024, help="display grid: longer side (node default 1024)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--out", type=Path, help="write report.md and PNG figures here")
    p.add_argument("--control", help="a second bundle to compare (e.g. one trained on a leak)")
    p.add_argument("--control-manifest", type=Path, help="manifest for --control (default: --manifest)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    if args.bootstrap < 1 or args.faith_n < 0 or (args.n_max is not None and args.n_max < 1):
        print("osteo-train explain: --bootstrap and --n-max must be >= 1, --faith-n >= 0", file=sys.stderr)
        return 2
    try:
        rule = ThresholdRule(absolute=args.threshold_abs) if args.threshold_abs is not None \
            else ThresholdRule(top_fraction=args.threshold_top)
    except ValueError as exc:
        print(f"osteo-train explain: {exc}", file=sys.stderr)
        return 2
    settings = Settings(method=args.method, alt_method=None if args.alt_method == "none" else args.alt_method,
                        rule=rule, display_max=args.display_max, faith_n=args.faith_n, seed=args.seed,
                        bootstrap=args.bootstrap)
    jobs = [("model", args.bundle, args.manifest)]
    if args.control:
        jobs.append(("control", args.control, args.control_manifest or args.manifest))

    summaries: dict[str, dict[str, Any]] = {}
    examples: dict[str, list[Example]] = {}
    bundles: dict[str, LoadedBundle] = {}
    for role, bundle_ref, manifest in jobs:
        try:
            bundle = load_bundle(bundle_ref, device=args.device)
        except BundleError as exc:
            print(f"osteo-train explain: --{'bundle' if role == 'model' else 'control'}: {exc}", file=sys.stderr)
            return 2
        try:
            cases = read_cases(manifest, args.split)
        except (OSError, ValueError, KeyError) as exc:
            print(f"osteo-train explain: manifest {manifest}: {exc}", file=sys.stderr)
            return 2
        if args.n_max:
            cases = cases[: args.n_max]
        if not cases:
            print(f"osteo-train explain: manifest {manifest} has no frontal {args.split!r} images with "
                  "bone masks (mask_ribs ... mask_humeri)", file=sys.stderr)
            return 2
        logger.info("%s %s: %d images from %s", role, bundle.identity.name, len(cases), manifest)
        try:
            results, examples[role] = explain_model(bundle, cases, settings, device=args.device)
        except ImageError as exc:
            print(f"osteo-train explain: manifest {manifest}: {exc}", file=sys.stderr)
            return 2
        summaries[role] = _json_safe(summarise(bundle, results, settings, manifest))
        bundles[role] = bundle

    report = dict(summaries["model"])
    if "control" in summaries:
        report["control"] = summaries["control"]

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        names = {r: b.identity.name + (" (control)" if r == "control" else "") for r, b in bundles.items()}
        named = {names[r]: s for r, s in summaries.items()}
        figures = [montage_figure({names[r]: e for r, e in examples.items()}, args.out / "montage_per_class.png"),
                   structure_bars_figure(named, args.out / "per_structure.png"),
                   auc_figure(named, args.out / "auc_perturbation.png"),
                   deletion_figure(named, args.out / "deletion_curves.png")]
        rg1_paths, rg1_maps = rg1_overlays(bundles, args.out, settings, device=args.device)
        figures.insert(0, compact_figure({names[r]: e for r, e in examples.items()},
                                         {names[r]: m for r, m in rg1_maps.items()},
                                         args.out / "gradcam_overlays.png"))
        figures += rg1_paths
        for role, bundle in bundles.items():
            figures += phantom_overlays(examples[role], role, settings.methods(bundle)[0], args.out)
        (args.out / "explain.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        command = "osteo-train explain " + " ".join(sys.argv[2:] if argv is None else argv)
        logger.info("wrote %s", write_report(args.out, named, figures, command))
    if args.json:
        print(json.dumps(report))
    else:
        for role, s in summaries.items():
            print(f"{role} {s['model']['name']}: n={s['n']} bone_mass_fraction {_pct(s['bone_mass_fraction'])} "
                  f"(area {s['chance']['bone_area_fraction']:.3f}), iou_bone {_pct(s['iou_bone'])}, "
                  f"delta_bone {_pct(s['delta_bone'])} (AUC {_pct(s['auc_original'])} -> "
                  f"{_pct(s['auc_bone_perturbed'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
