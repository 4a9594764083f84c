"""Tiny randomly initialised backbones for every family, saved and loaded back through from_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from osteo_node.model import ModelSpec, load_backbone

TINY: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, image_size=56, patch_size=14)

#: family -> random-init config (rad-dino exercises the DINOv2-with-registers path).
CONFIGS: dict[str, dict[str, Any]] = {
    "dinov2": dict(TINY),
    "rad-dino": dict(TINY, model_type="dinov2_with_registers", num_register_tokens=4),
    "openclip": dict(TINY, model_type="clip_vision_model"),
    "chexagent": dict(TINY, model_type="siglip_vision_model"),
}
INPUT_SIZE = 56


def save_tiny_backbone(family: str, directory: Path, seed: int = 0) -> Path:
    """Write a tiny random backbone of `family` with save_pretrained and return its folder."""
    torch.manual_seed(seed)
    spec = ModelSpec(family=family, source=str(directory), method="linear", input_size=INPUT_SIZE)
    load_backbone(spec, random_init_config=CONFIGS[family]).save_pretrained(directory)
    return directory


def tiny_spec(family: str, source: Path, method: str, **kw: Any) -> ModelSpec:
    return ModelSpec(family=family, source=str(source), method=method, input_size=INPUT_SIZE, **kw)


def export_tiny_bundle(folder: Path, name: str) -> Path:
    """A tiny random DINOv2 + LoRA bundle exported through the real export path (tests only)."""
    from osteo_node.bundle import export_bundle
    from osteo_node.model import build_classifier

    spec = tiny_spec("dinov2", save_tiny_backbone("dinov2", folder / "backbone"), "lora")
    return export_bundle(build_classifier(spec), spec, folder / name, name=name, version="0.0.1",
                         thresholds={"low_bmd": 0.5, "osteoporosis": 0.5}, intended_use="tests only",
                         clinical_use=False, data_summary="none: random weights")
