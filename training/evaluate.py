"""`osteo-train evaluate`: a bundle's discrimination on a manifest, with patient-level bootstrap CIs.

Frontal (PA/AP) rows go through the node's own pixel pipeline (osteo_node.pixels.decode ->
prepare) and the bundle's classifier (eval mode, batched, no grad). Reported: macro one-vs-rest
AUC, per-class AUC, low-BMD AUC (osteopenia + osteoporosis vs normal, score P1 + P2),
osteoporosis-vs-rest AUC, accuracy, and sensitivity / specificity / PPV / NPV of low BMD at the
bundle's thresholds["low_bmd"], each with a 95% CI from a class-stratified, patient-level bootstrap.

--perturb-bone is the control that the model reads bone: the union of the bone masks is
inpainted (training.perturb.inpaint_bone) on the decoded [0, 1] image before prepare(); a model
that uses bone should fall to chance.

--perturb-off-bone is its control: the same inpainting of a region off bone
(training.perturb.off_bone_region: pixels more than --off-bone-margin pixels from the grown bone
mask, the same area as that mask where the image has room, else all of them; random blobs drawn
from --seed when there is room). A model that reads bone should keep its AUC. In chest phantoms
there is no room: the grown bone masks cover about two thirds of the image, so the off-bone region
is all of the rest (soft tissue, intercostal spaces) and smaller; the output reports the ratio of
its area to the bone's (off_bone_area_ratio). Where the manifest has a mask_body column (phantoms
write one), the region stays inside the body: air beside the patient is not inpainted
(off_bone_within_body in the output).

--by KEYWORD also reports the low-BMD AUC per value of a DICOM attribute of the images, e.g.
StationName (the room), Manufacturer or ViewPosition: where a site's rooms or detectors differ, a
pooled AUC hides the one that fails. Each group gets its own class-stratified, patient-level
bootstrap (the same resamples count and seed).

Example::

    osteo-train evaluate --bundle reference --manifest HELDOUT/manifest.csv --split all
    osteo-train evaluate --bundle reference --manifest SITE/manifest.csv --split all --by StationName
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import torch
from PIL import Image

from osteo_node import metrics
from osteo_node.bundle import LoadedBundle, load_bundle
from osteo_node.deidentify import KEPT
from osteo_node.errors import BundleError, ImageError
from osteo_node.pixels import decode, prepare
from osteo_node.records import CLASS_NAMES
from training.data import read_manifest
from training.perturb import OFF_BONE_MARGIN, inpaint_bone, off_bone_region

logger = logging.getLogger(__name__)

#: Manifest mask columns whose union is "bone" for --perturb-bone (lungs are not bone).
BONE_MASK_COLUMNS: tuple[str, ...] = ("mask_ribs", "mask_clavicles", "mask_spine", "mask_scapulae", "mask_humeri")
#: Manifest mask column of the patient's outline (phantoms write it): the off-bone region stays inside.
BODY_MASK_COLUMN = "mask_body"
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
#: Bone mask dilation (pixels of the stored image) for --perturb-bone: takes the partial-volume rim
#: of each bone, which the masks leave out, with the bone.
DEFAULT_MASK_DILATION = 3
#: What can be inpainted before prepare(): the grown bone mask, or a region off it (its control).
PERTURBATIONS: tuple[str, ...] = ("bone", "off-bone")


@dataclass(frozen=True)
class Case:
    """One frontal image to evaluate."""

    path: Path
    patient_id: str
    label: int  # index into CLASS_NAMES
    bone_masks: tuple[Path, ...]  # empty when the manifest has no mask columns
    body_mask: Path | None = None  # mask_body: the patient, not the air beside her


@dataclass(frozen=True, eq=False)
class Predictions:
    """Class probabilities (N, 3) of the cases, in order."""

    cases: tuple[Case, ...]
    probs: np.ndarray
    #: Per case, inpainted pixels / pixels of the grown bone mask (None when nothing was perturbed).
    area_ratios: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.cases], dtype=np.int64)

    @property
    def patient_ids(self) -> list[str]:
        return [c.patient_id for c in self.cases]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder or shipped name (e.g. reference)")
    p.add_argument("--manifest", required=True, type=Path, help="manifest.csv (paths relative to it)")
    p.add_argument("--split", choices=SPLITS, default="test", help="rows to evaluate (default test; all: every row)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and inpainting seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--limit", type=int, help="evaluate at most this many rows (smoke tests)")
    perturb = p.add_mutually_exclusive_group()
    perturb.add_argument("--perturb-bone", action="store_true",
                         help="inpaint the bone masks before prepare (control: AUC should fall to chance)")
    perturb.add_argument("--perturb-off-bone", action="store_true",
                         help="inpaint a region off bone instead, as large as the bone where there is room "
                              "(control of --perturb-bone: a model that reads bone keeps its AUC)")
    p.add_argument("--mask-dilation", type=int, default=DEFAULT_MASK_DILATION,
                   help=f"pixels by which the bone masks grow for --perturb-bone and --perturb-off-bone "
                        f"(default {DEFAULT_MASK_DILATION})")
    p.add_argument("--off-bone-margin", type=int, default=OFF_BONE_MARGIN,
                   help=f"pixels kept clear between the grown bone masks and the --perturb-off-bone region "
                        f"(default {OFF_BONE_MARGIN})")
    p.add_argument("--by", metavar="KEYWORD",
                   help="also the low-BMD AUC per value of this DICOM attribute of the images "
                        "(e.g. StationName, Manufacturer, ViewPosition)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", type=Path, help="folder for predictions.csv and metrics.json")
    return p


def read_cases(manifest: Path, split: str, *, need_masks: bool) -> list[Case]:
    """Frontal rows of `manifest` in `split` ("all": every split) as Cases."""
    rows = read_manifest(manifest, frontal_only=True)
    masks: dict[str, tuple[Path, ...]] = {}
    bodies: dict[str, Path] = {}
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c for c in BONE_MASK_COLUMNS if c in (reader.fieldnames or [])]
        if need_masks and not columns:
            raise ValueError(f"manifest {manifest} has none of the bone mask columns {BONE_MASK_COLUMNS}")
        for rec in reader:
            key = str(manifest.parent / rec["file"])
            masks[key] = tuple(manifest.parent / rec[c] for c in columns if (rec.get(c) or "").strip())
            if (rec.get(BODY_MASK_COLUMN) or "").strip():
                bodies[key] = manifest.parent / rec[BODY_MASK_COLUMN]
    return [Case(path=r.path, patient_id=r.patient_id, label=r.label, bone_masks=masks.get(str(r.path), ()),
                 body_mask=bodies.get(str(r.path)))
            for r in rows if split == "all" or r.split == split]


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask PNG (nonzero = in) at `shape` (nearest-neighbour resize)."""
    with Image.open(path) as opened:
        img = opened.convert("L")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(img) > 0


def bone_mask(case: Case, shape: tuple[int, int], dilation: int = 0) -> np.ndarray:
    """Union of the case's bone masks (PNG, nonzero = bone) at `shape`, grown by `dilation` pixels."""
    if not case.bone_masks:
        raise ValueError(f"{case.path}: no bone masks in the manifest; --perturb-bone and --perturb-off-bone "
                         "need them")
    union = np.zeros(shape, dtype=bool)
    for path in case.bone_masks:
        union |= read_mask(path, shape)
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        union = cv2.dilate(union.astype(np.uint8), kernel).astype(bool)
    return union


def perturbation_region(case: Case, shape: tuple[int, int], perturb: str, rng: np.random.Generator, *,
                        mask_dilation: int = DEFAULT_MASK_DILATION,
                        off_bone_margin: int = OFF_BONE_MARGIN) -> tuple[np.ndarray, int]:
    """The pixels that `perturb` ("bone" or "off-bone") inpaints, and the grown bone mask's pixel
    count. The off-bone region stays inside the case's body mask when the manifest has one."""
    bone = bone_mask(case, shape, mask_dilation)
    if perturb == "bone":
        return bone, int(bone.sum())
    if perturb == "off-bone":
        body = read_mask(case.body_mask, shape) if case.body_mask is not None else None
        return off_bone_region(bone, rng, off_bone_margin, within=body), int(bone.sum())
    raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")


def load_input(case: Case, bundle: LoadedBundle, perturb: str | None = None, rng: np.random.Generator | None = None,
               *, mask_dilation: int = DEFAULT_MASK_DILATION,
               off_bone_margin: int = OFF_BONE_MARGIN) -> tuple[np.ndarray, float]:
    """The case's model tensor (3, S, S) through decode -> [inpaint `perturb`'s region, drawing from
    `rng`] -> prepare, and that region's area over the grown bone mask's (nan when `perturb` is None)."""
    try:
        ds = pydicom.dcmread(case.path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ImageError(f"{case.path}: not a readable DICOM file: {exc}") from exc
    image01 = decode(ds)
    ratio = float("nan")
    if perturb is not None:
        if rng is None:
            raise ValueError("load_input: perturb needs an rng")
        region, bone_pixels = perturbation_region(case, image01.shape, perturb, rng,
                                                  mask_dilation=mask_dilation, off_bone_margin=off_bone_margin)
        image01 = inpaint_bone(image01, region, rng)
        ratio = float(region.sum()) / max(1, bone_pixels)
    spec = bundle.spec
    # display_max only sizes the display copy, which evaluation does not use
    tensor = prepare(image01, spec.input_size, spec.mean, spec.std, display_max=64,
                     transform=spec.input_transform).tensor
    return tensor, ratio


@torch.no_grad()
def predict(bundle: LoadedBundle, cases: Sequence[Case], *, batch_size: int = 32,
            perturb: str | None = None, seed: int = 0, mask_dilation: int = DEFAULT_MASK_DILATION,
            off_bone_margin: int = OFF_BONE_MARGIN, calibrated: bool = True) -> Predictions:
    """Probabilities as the node reports them (temperature applied; calibrated=False: without it)
    for `cases` (eval mode, batched), with `perturb`'s region ("bone", "off-bone") inpainted if given."""
    if perturb is not None and perturb not in PERTURBATIONS:
        raise ValueError(f"perturb must be one of {PERTURBATIONS} or None, got {perturb!r}")
    model = bundle.classifier.eval()
    rng = np.random.default_rng(seed) if perturb else None
    out: list[np.ndarray] = []
    ratios: list[float] = []
    for start in range(0, len(cases), batch_size):
        inputs = [load_input(c, bundle, perturb, rng, mask_dilation=mask_dilation, off_bone_margin=off_bone_margin)
                  for c in cases[start : start + batch_size]]
        batch = np.stack([tensor for tensor, _ in inputs])
        ratios += [ratio for _, ratio in inputs]
        logits = model(torch.from_numpy(batch).to(bundle.device)).float().cpu()
        out.append(bundle.probabilities(logits, calibrated=calibrated).numpy().astype(np.float64))
    probs = np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)))
    return Predictions(cases=tuple(cases), probs=probs, area_ratios=np.array(ratios) if perturb else None)


def summarise(labels: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str], low_bmd_threshold: float,
              *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All reported metrics as Intervals (class-stratified, patient-level bootstrap, 95%)."""
    def rate(name: str) -> metrics.MetricFn:
        return lambda y, p: getattr(metrics.binary_rates(y >= 1, metrics.low_bmd_score(p), low_bmd_threshold), name)

    def class_auc(k: int) -> metrics.MetricFn:
        return lambda y, p: metrics.auc(y == k, p[:, k])

    fns: dict[str, metrics.MetricFn] = {
        "macro_auc": metrics.macro_auc,
        "low_bmd_auc": metrics.low_bmd_auc,
        "osteoporosis_auc": metrics.osteoporosis_auc,
        "accuracy": metrics.accuracy,
        **{f"auc_{name}": class_auc(k) for k, name in enumerate(CLASS_NAMES)},
        **{f"rate_{name}": rate(name) for name in ("sensitivity", "specificity", "ppv", "npv")},
    }
    ci = metrics.bootstrap_many(fns, labels, probs, patient_ids, n_bootstrap, seed)
    return {
        "n": int(len(labels)),
        "n_patients": len(set(patient_ids)),
        "class_counts": {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)},
        "macro_auc": ci["macro_auc"].as_dict(),
        "low_bmd_auc": ci["low_bmd_auc"].as_dict(),
        "osteoporosis_auc": ci["osteoporosis_auc"].as_dict(),
        "per_class_auc": {name: ci[f"auc_{name}"].as_dict() for name in CLASS_NAMES},
        "accuracy": ci["accuracy"].as_dict(),
        "low_bmd_at_threshold": {"threshold": float(low_bmd_threshold),
                                 **{name: ci[f"rate_{name}"].as_dict()
                                    for name in ("sensitivity", "specificity", "ppv", "npv")}},
        "bootstrap": {"resamples": int(n_bootstrap), "seed": int(seed),
                      "method": "percentile, patients resampled within class strata"},
    }


def identifying(keyword: str) -> bool:
    """Whether `keyword` names a patient or a study rather than equipment or acquisition: the
    patient attributes that de-identification removes (all but osteo_node.deidentify.KEPT's), the
    instance UIDs, accession number, study ID and physicians' names."""
    if keyword.startswith(("Patient", "OtherPatient", "IssuerOfPatient")):
        return keyword not in KEPT
    return (keyword.endswith(("InstanceUID", "PhysicianName", "PhysiciansName"))
            or keyword in ("AccessionNumber", "StudyID", "StudyDescription"))


def by_attribute(keyword: str, predictions: Predictions, *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Low-BMD AUC (bootstrap CI) per value of the DICOM attribute `keyword` (a DICOM keyword) of
    each case's image. Images without the attribute form the group "(absent)"; a group with one
    class only has no AUC (null)."""
    values = []
    for case in predictions.cases:
        ds = pydicom.dcmread(case.path, stop_before_pixels=True, specific_tags=[keyword])
        value = ds.get(keyword)
        values.append(str(value).strip() if value not in (None, "") else "(absent)")
    labels, ids = predictions.labels, predictions.patient_ids
    groups: dict[str, Any] = {}
    for value in sorted(set(values)):
        rows = [i for i, v in enumerate(values) if v == value]
        y, probs = labels[rows], predictions.probs[rows]
        entry: dict[str, Any] = {"n": len(rows), "n_low_bmd": int((y >= 1).sum()), "low_bmd_auc": None}
        if 0 < entry["n_low_bmd"] < len(rows):
            ci = metrics.bootstrap_many({"low_bmd_auc": metrics.low_bmd_auc}, y, probs, [ids[i] for i in rows],
                                        n_bootstrap, seed)
            entry["low_bmd_auc"] = ci["low_bmd_auc"].as_dict()
        groups[value] = entry
    return {"keyword": keyword, "groups": groups}


def area_summary(ratios: np.ndarray | None) -> dict[str, float]:
    """Mean, min and max of the per-image ratios of inpainted area to grown bone area."""
    if ratios is None or not len(ratios):
        raise ValueError("area_summary: no perturbed images")
    return {"mean": float(np.mean(ratios)), "min": float(np.min(ratios)), "max": float(np.max(ratios))}


def format_table(result: dict[str, Any]) -> str:
    """A readable table of `result` (from summarise, plus bundle / manifest keys)."""
    def row(label: str, m: dict[str, float]) -> str:
        return f"  {label:<28} {m['value']:6.3f}   [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    head = [f"bundle {result.get('bundle', '?')}  manifest {result.get('manifest', '?')}  "
            f"split {result.get('split', '?')}{'  BONE PERTURBED' if result.get('perturb_bone') else ''}"
            f"{'  OFF-BONE PERTURBED' if result.get('perturb_off_bone') else ''}",
            f"n = {result['n']} images, {result['n_patients']} patients, classes {result['class_counts']}",
            f"  {'metric':<28} {'value':>6}   95% CI ({result['bootstrap']['resamples']} patient-level resamples)"]
    if "off_bone_area_ratio" in result:
        area = result["off_bone_area_ratio"]
        head.insert(2, f"off-bone region / grown bone area: mean {area['mean']:.3f} "
                       f"(min {area['min']:.3f}, max {area['max']:.3f}), margin {result['off_bone_margin']} px"
                       f"{', inside the body' if result.get('off_bone_within_body') else ''}")
    lines = [row("macro one-vs-rest AUC", result["macro_auc"]),
             *(row(f"AUC {name} vs rest", m) for name, m in result["per_class_auc"].items()),
             row("low-BMD AUC", result["low_bmd_auc"]),
             row("osteoporosis-vs-rest AUC", result["osteoporosis_auc"]),
             row("accuracy (3 classes)", result["accuracy"])]
    at = result["low_bmd_at_threshold"]
    lines.append(f"  low BMD at threshold {at['threshold']:.3f}:")
    lines += [row(f"  {name}", at[name]) for name in ("sensitivity", "specificity", "ppv", "npv")]
    if "by" in result:
        lines.append(f"  low-BMD AUC by {result['by']['keyword']}:")
        for value, group in result["by"]["groups"].items():
            label = f"  {value} (n = {group['n']})"
            lines.append(row(label, group["low_bmd_auc"]) if group["low_bmd_auc"]
                         else f"  {label:<28} one class only, no AUC")
    return "\n".join(head + lines)


def write_predictions(path: Path, predictions: Predictions) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "patient_id", "class", *(f"p_{name}" for name in CLASS_NAMES)])
        for case, p in zip(predictions.cases, predictions.probs):
            # 9 significant digits keep float32 probabilities exactly (6 decimals tied the saturated
            # scores of a --perturb-bone run and changed its AUC in the third decimal)
            writer.writerow([str(case.path), case.patient_id, CLASS_NAMES[case.label], *(f"{v:.9g}" for v in p)])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.bootstrap < 1:
        print(f"osteo-train evaluate: --bootstrap must be >= 1, got {args.bootstrap}", file=sys.stderr)
        return 2
    if args.by and not pydicom.datadict.tag_for_keyword(args.by):
        print(f"osteo-train evaluate: --by: {args.by!r} is not a DICOM attribute keyword "
              "(e.g. StationName, Manufacturer, ViewPosition)", file=sys.stderr)
        return 2
    if args.by and identifying(args.by):
        print(f"osteo-train evaluate: --by: {args.by} identifies patients or studies, and its values would be "
              "printed; choose an equipment or acquisition attribute (e.g. StationName, Manufacturer)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"osteo-train evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        cases = read_cases(args.manifest, args.split, need_masks=args.perturb_bone or args.perturb_off_bone)
    except (OSError, ValueError) as exc:
        print(f"osteo-train evaluate: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        cases = cases[: args.limit]
    if not cases:
        print(f"osteo-train evaluate: no frontal rows in split {args.split!r} of {args.manifest}", file=sys.stderr)
        return 2
    threshold = float(bundle.manifest.get("thresholds", {}).get("low_bmd", 0.5))

    start = time.perf_counter()
    perturb = "bone" if args.perturb_bone else "off-bone" if args.perturb_off_bone else None
    predictions = predict(bundle, cases, batch_size=args.batch_size, perturb=perturb, seed=args.seed,
                          mask_dilation=args.mask_dilation, off_bone_margin=args.off_bone_margin)
    logger.info("predicted %d images in %.1f s", len(cases), time.perf_counter() - start)
    result = summarise(predictions.labels, predictions.probs, predictions.patient_ids, threshold,
                       n_bootstrap=args.bootstrap, seed=args.seed)
    if args.by:
        result["by"] = by_attribute(args.by, predictions, n_bootstrap=args.bootstrap, seed=args.seed)
    result = {"bundle": bundle.identity.name, "bundle_version": bundle.identity.version,
              "device_uid": bundle.identity.device_uid, "manifest": str(args.manifest), "split": args.split,
              "perturb_bone": args.perturb_bone, "perturb_off_bone": args.perturb_off_bone,
              **({"mask_dilation": args.mask_dilation} if perturb else {}),
              **({"off_bone_margin": args.off_bone_margin,
                  "off_bone_within_body": all(c.body_mask is not None for c in cases),
                  "off_bone_area_ratio": area_summary(predictions.area_ratios)} if args.perturb_off_bone else {}),
              **result}

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_predictions(args.out / "predictions.csv", predictions)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
