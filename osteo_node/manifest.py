"""A bundle's manifest (bundle.json), read without loading the model or torch.

Validation, operating points and the web app need a bundle's identity (Device UID) and its
validated thresholds, not its weights: importing torch for that would cost seconds and a
gigabyte. osteo_node.bundle loads the model itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BundleError
from .records import CLASS_NAMES

MANIFEST = "bundle.json"
#: Where the shipped bundles live; `load_bundle("reference")` reads BUNDLES_DIR / "reference".
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"

#: How to produce the reference bundle (quoted in the error when it is missing).
REFERENCE_COMMAND = (
    "osteo-train phantoms --n 3000 --seed 2 --randomise --out D2 && "
    "osteo-train phantoms --n 1500 --seed 3 --out D3 && "
    "osteo-train phantoms --n 6000 --seed 4 --randomise --out D4 && "
    "osteo-train phantoms --n 3000 --seed 5 --out D5 && "
    "osteo-train phantoms --n 6000 --seed 6 --randomise --out D6 && "
    "osteo-train phantoms --n 4500 --seed 7 --out D7 && "
    "osteo-train train --manifest D2/manifest.csv --manifest D3/manifest.csv --manifest D4/manifest.csv "
    "--manifest D5/manifest.csv --manifest D6/manifest.csv --manifest D7/manifest.csv "
    "--random-init vit-tiny --input-size 112 --pooling cls+mean --input-transform lcn --epochs 20 --lr 5e-4 "
    "--warmup-epochs 1 --augment-strength 0.3 --patience 10 --target-sensitivity 0.9 --seed 0 "
    "--version 0.3.0 --export-reference && "
    "osteo-train phantoms --n 150 --seed 31 --out CAMSEL && "
    "osteo-train cam-select --bundle reference --manifest CAMSEL/manifest.csv --split all --n 24 "
    "--write --version 0.3.1"
)


def resolve_bundle_path(name_or_path: str | Path) -> Path:
    """A bundle folder: a path, or a shipped bundle's name ("reference") under BUNDLES_DIR."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.is_dir() or "/" in text or text.startswith("."):
        path = candidate
    else:
        path = BUNDLES_DIR / text
    if not (path / MANIFEST).is_file():
        if text == "reference":
            raise BundleError(
                f"the reference bundle is missing ({path / MANIFEST} not found). Produce it with: "
                f"{REFERENCE_COMMAND}"
            )
        raise BundleError(f"no model bundle at {text!r}: {path / MANIFEST} not found")
    return path.resolve()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, with its required keys checked."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"bundle {path}: {MANIFEST} is missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {path}: {MANIFEST} is unreadable: {exc}") from exc
    required = ("name", "version", "device_uid", "backbone", "spec", "class_names", "files")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"bundle {path}: {MANIFEST} lacks keys {missing}")
    if tuple(manifest["class_names"]) != CLASS_NAMES:
        raise BundleError(
            f"bundle {path}: class_names {manifest['class_names']} differ from {list(CLASS_NAMES)}"
        )
    return manifest
