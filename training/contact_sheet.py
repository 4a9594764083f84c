"""`osteo-train contact-sheet`: a PNG grid of phantoms across the T-score range with mask outlines.

    osteo-train contact-sheet --manifest runs/phantoms/manifest.csv --out sheet.png --n 12
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image, ImageDraw

from osteo_node.pixels import decode

logger = logging.getLogger(__name__)

#: Outline colour (RGB) per mask column of the manifest.
OUTLINE_COLOURS: dict[str, tuple[int, int, int]] = {
    "ribs": (255, 80, 80),
    "clavicles": (255, 200, 0),
    "spine": (80, 220, 80),
    "scapulae": (80, 160, 255),
    "humeri": (220, 80, 255),
    "lungs": (0, 230, 230),
}


def tile(row: dict[str, str], root: Path, tile_px: int) -> Image.Image:
    """One captioned tile: the image as the node reads it (`pixels.decode`: its window, MONOCHROME1
    inverted) with each mask's outline in its colour."""
    display = (decode(pydicom.dcmread(root / row["file"])) * 255).astype(np.uint8)
    rgb = np.repeat(display[:, :, None], 3, axis=2)
    for name, colour in OUTLINE_COLOURS.items():
        path = row.get(f"mask_{name}")
        if not path:
            continue
        mask = np.asarray(Image.open(root / path)) > 0
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        rgb[edge] = colour
    image = Image.fromarray(rgb).resize((tile_px, tile_px), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (tile_px, tile_px + 30), (0, 0, 0))
    canvas.paste(image, (0, 30))
    caption = (
        f"T={float(row['t_score']):+.2f} {row.get('true_class', row['class'])}"
        f" (label {row['class']})\n{row['view']} {row['sex']} {row['age']}y {row['split']}"
    )
    ImageDraw.Draw(canvas).multiline_text((4, 2), caption, fill=(255, 255, 255))
    return canvas


def pick_rows(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """`n` rows spread evenly over the T-score range, sorted from high to low T-score."""
    ordered = sorted(rows, key=lambda r: -float(r["t_score"]))
    if n >= len(ordered):
        return ordered
    positions = np.linspace(0, len(ordered) - 1, n).round().astype(int)
    return [ordered[i] for i in positions]


def contact_sheet(manifest: Path, out: Path, n: int = 12, tile_px: int = 256, columns: int = 4) -> Path:
    """Write the contact sheet PNG for `n` phantoms of `manifest`; return its path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"manifest {manifest} has no rows")
    chosen = pick_rows(rows, n)
    tiles = [tile(row, manifest.parent, tile_px) for row in chosen]
    columns = min(columns, len(tiles))
    lines = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tile_px, lines * (tile_px + 30) + 24), (30, 30, 30))
    for i, image in enumerate(tiles):
        sheet.paste(image, ((i % columns) * tile_px, (i // columns) * (tile_px + 30)))
    draw = ImageDraw.Draw(sheet)
    x = 4
    for name, colour in OUTLINE_COLOURS.items():
        draw.text((x, lines * (tile_px + 30) + 6), name, fill=colour)
        x += 8 * len(name) + 16
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    logger.info("wrote contact sheet of %d phantoms to %s", len(tiles), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`osteo-train contact-sheet --manifest M --out sheet.png [--n 12]`."""
    parser = argparse.ArgumentParser(prog="osteo-train contact-sheet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    contact_sheet(args.manifest, args.out, args.n, args.tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
