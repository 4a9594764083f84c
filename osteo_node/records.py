"""Frozen data objects passed between the stages of the node.

receive -> store -> infer -> explain -> encode -> send -> refer: each stage takes and returns
these small records, never another stage's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Class order used everywhere: model outputs, SR content, manifests, reports.
CLASS_NAMES: tuple[str, str, str] = ("normal", "osteopenia", "osteoporosis")


def category_from_t_score(t_score: float) -> str:
    """WHO category: normal T >= -1.0, osteopenia -2.5 < T < -1.0, osteoporosis T <= -2.5."""
    if t_score >= -1.0:
        return "normal"
    if t_score > -2.5:
        return "osteopenia"
    return "osteoporosis"


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result: written into every SR and SC (IHE AIR Contributing Equipment)."""

    name: str  # bundle name, e.g. "reference"
    version: str  # bundle version, e.g. "1.0.0"
    device_uid: str  # DICOM UID; changes whenever the weights change
    backbone: str  # family: dinov2, rad-dino, openclip, chexagent
    method: str  # adaptation: linear, partial, lora
    manufacturer: str  # who trained / ships the model
    software_version: str  # osteo-node version that ran it
    clinical_use: bool  # False: SR and SC say "not for clinical use"


@dataclass(frozen=True, eq=False)
class Prediction:
    """Class probabilities (order CLASS_NAMES, summing to 1) and the predicted category."""

    probabilities: tuple[float, float, float]
    category: str
    model: ModelIdentity

    @property
    def low_bmd_probability(self) -> float:
        """P(osteopenia) + P(osteoporosis)."""
        return self.probabilities[1] + self.probabilities[2]


#: Saliency methods (grad-cam library, see osteo_node.infer.CAM_METHODS) and how outputs name them.
CAM_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "hirescam": "HiResCAM",
    "layercam": "LayerCAM", "eigengradcam": "EigenGrad-CAM",
}


@dataclass(frozen=True, eq=False)
class Heatmap:
    """Saliency map on the display image grid: float32 rows x cols, values in [0, 1]."""

    values: np.ndarray
    method: str = "gradcam"
    target_category: str = ""


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """A radiograph ready for the model and for display.

    display: uint8 rows x cols grayscale as a radiologist would see it (VOI applied,
    MONOCHROME2, possibly downsampled so the longer side is at most a configured size).
    tensor: float32 (3, S, S) normalised model input (letterboxed to square, no distortion).
    box: (top, left, height, width) of the display image inside the S x S model input, so a
    map on the model grid can be cropped and resized back onto the display grid.
    """

    display: np.ndarray
    tensor: np.ndarray
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class BoneAttention:
    """Where saliency fell relative to bone masks (only when masks exist at inference)."""

    bone_mass_fraction: float
    iou_bone: float
    per_structure: dict[str, float] = field(default_factory=dict)
    method: str = "gradcam"  # the saliency method (a CAM_LABELS key)
