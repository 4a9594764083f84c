"""The path of one radiograph through the node, in order, in one function.

read -> decode -> preprocess -> infer + explain (one forward+backward) -> report (SR) -> capture (SC).
Stages never call each other; this function is the only place that knows their order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from . import encode, pixels
from .infer import Inference
from .records import Prediction


@dataclass(frozen=True, eq=False)
class Screening:
    """What the pipeline made of one radiograph, with seconds spent per stage."""

    prediction: Prediction
    sr: Dataset
    sc: Dataset
    seconds: dict[str, float] = field(default_factory=dict)


def screen(path: Path, inference: Inference, display_max: int) -> Screening:
    """Screen the stored radiograph at `path` with a loaded model."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    source = dcmread(path)
    image = pixels.decode(source)
    lap("decode")
    spec = inference.bundle.spec
    prepared = pixels.prepare(image, spec.input_size, spec.mean, spec.std, display_max=display_max)
    lap("preprocess")
    prediction, heatmap = inference.run(prepared)
    lap("model")
    sr = encode.build_sr(source, prediction)
    lap("sr")
    sc = encode.build_sc(source, prepared.display, heatmap, prediction)
    lap("sc")
    return Screening(prediction, sr, sc, seconds)
