"""Inference: one forward + one backward pass gives the class probabilities and the Grad-CAM map.

Built once per loaded bundle. The CAM library's forward pass already computes the logits (kept in
its `outputs` attribute), so the prediction is read from that same pass; the backward pass for the
predicted class then gives the gradients at the target layer (the bundle's CamChoice: method and
block, see osteo_node.model.cam_target). Only the target layer's parameters require gradients, so
backward stops there instead of running through the whole backbone.

Several images go through in one pass (`run_batch`): the CAM library sums each image's
predicted-class logit before the backward pass, and images do not interact in a ViT, so every
image gets its own gradients. On CUDA the batch is copied from pinned memory without blocking and
the pass runs under bf16 autocast unless the precision is "fp32" (osteo_node.model.autocast).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenGradCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM

from osteo_node.bundle import LoadedBundle
from osteo_node.model import CAM_METHOD_NAMES, PRECISIONS, autocast, cam_target, gradients_down_to
from osteo_node.records import CLASS_NAMES, Heatmap, Prediction, PreparedImage

logger = logging.getLogger(__name__)

#: CAM method name -> grad-cam class. All use one forward + one backward pass.
CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigengradcam": EigenGradCAM,
}
assert tuple(CAM_METHODS) == CAM_METHOD_NAMES


class Inference:
    """Prediction + saliency for prepared images with one loaded bundle."""

    def __init__(self, bundle: LoadedBundle, device: str = "cpu", cam_method: str | None = None,
                 precision: str = "auto") -> None:
        """cam_method: None uses the bundle's choice (bundle.cam); a name overrides its method only.
        precision: one of osteo_node.model.PRECISIONS."""
        cam_method = cam_method or bundle.cam.method
        if cam_method not in CAM_METHODS:
            raise ValueError(f"cam_method must be one of {sorted(CAM_METHODS)}, got {cam_method!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.bundle = bundle
        self.identity = bundle.identity
        self.device = torch.device(device)
        self.cam_method = cam_method
        self.precision = precision
        model = bundle.classifier.to(self.device).eval()
        target_layers, reshape = cam_target(model, bundle.cam.block)
        gradients_down_to(model, target_layers)
        self.model = model
        self._cam = CAM_METHODS[cam_method](model=model, target_layers=target_layers, reshape_transform=reshape)
        self._input_size = bundle.spec.input_size

    def close(self) -> None:
        """Remove the CAM hooks from the model (several Inference objects may share one bundle)."""
        self._cam.activations_and_grads.release()

    def run(self, prepared: PreparedImage) -> tuple[Prediction, Heatmap]:
        """Probabilities and the CAM of the predicted class on the display grid."""
        predictions, heatmaps = self.run_batch([prepared])
        return predictions[0], heatmaps[0]

    def run_batch(self, prepared: Sequence[PreparedImage]) -> tuple[list[Prediction], list[Heatmap]]:
        """run() for several images in one pass (all must have the bundle's input size)."""
        if not prepared:
            return [], []
        for item in prepared:
            if item.tensor.shape != (3, self._input_size, self._input_size):
                raise ValueError(
                    f"prepared tensor has shape {item.tensor.shape}, bundle expects "
                    f"(3, {self._input_size}, {self._input_size})"
                )
        batch = torch.from_numpy(np.stack([p.tensor for p in prepared]))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        # targets=None: the library picks the argmax class of each image from its own forward.
        with autocast(self.device, self.precision):
            cams = self._cam(input_tensor=batch, targets=None)
        logits = self._cam.outputs.detach().float().cpu()
        probs = self.bundle.probabilities(logits).numpy().astype(np.float64)
        predictions: list[Prediction] = []
        heatmaps: list[Heatmap] = []
        for item, p, cam in zip(prepared, probs, cams):
            p = p / p.sum()
            index = int(np.argmax(p))
            category = CLASS_NAMES[index]
            predictions.append(Prediction(
                probabilities=(float(p[0]), float(p[1]), float(p[2])), category=category, model=self.identity,
            ))
            heatmaps.append(Heatmap(
                values=to_display_grid(cam, item.box, item.display.shape[:2]),
                method=self.cam_method, target_category=category,
            ))
        return predictions, heatmaps


def to_display_grid(cam: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """Crop a map on the model input grid to `box` and resize it onto the display grid, in [0, 1]."""
    top, left, height, width = box
    crop = np.asarray(cam, dtype=np.float32)[top : top + height, left : left + width]
    resized = Image.fromarray(crop, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    values = np.asarray(resized, dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return np.clip(values, 0.0, 1.0).astype(np.float32)
