"""The path of one radiograph through the node, in order, in one module.

read -> decode -> preprocess -> infer + explain (one forward+backward) -> report (SR) -> capture (SC)
-> flag (KOS).
Stages never call each other; this module is the only place that knows their order. The path is
cut in three parts so that a worker can overlap them across images (osteo_node.work): `load`
(read, decode, preprocess), `examine` (the model, one batch of images at a time) and `report`
(SR, SC). `screen` runs the three in a row.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset

from . import encode, pixels
from .infer import Inference
from .model import ModelSpec
from .records import Heatmap, Prediction, PreparedImage
from .synthetic import synthetic_dx


class _Laps:
    """Seconds per stage, each measured from the end of the previous one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self.clock
        self.clock = now


@dataclass(frozen=True, eq=False)
class Loaded:
    """A radiograph read, decoded and prepared for the model (`source` without its Pixel Data)."""

    source: Dataset
    prepared: PreparedImage
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Examined:
    """A loaded radiograph with the model's prediction and saliency map."""

    loaded: Loaded
    prediction: Prediction
    heatmap: Heatmap
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Screening:
    """What the pipeline made of one radiograph, with seconds spent per stage, and the source
    header (without pixels) that the worker records the screened image's facts from."""

    prediction: Prediction
    sr: Dataset
    sc: Dataset
    kos: Dataset
    seconds: dict[str, float] = field(default_factory=dict)
    source: Dataset | None = None


def load(path: Path, spec: ModelSpec, display_max: int) -> Loaded:
    """Read, decode and preprocess the stored radiograph at `path` for a model with `spec`."""
    laps = _Laps()
    source = dcmread(path)
    image = pixels.decode(source)
    # The reports need the header only: drop the stored pixels (and pydicom's decoded copy) so
    # that an image waiting in the worker's pipeline holds ~14 MB less for a full-size CR.
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in source:
            delattr(source, keyword)
    laps.lap("decode")
    prepared = pixels.prepare(image, spec.input_size, spec.mean, spec.std, display_max=display_max,
                              transform=spec.input_transform)
    laps.lap("preprocess")
    return Loaded(source, prepared, laps.seconds)


def examine(loaded: Sequence[Loaded], inference: Inference) -> list[Examined]:
    """Predictions and saliency maps of loaded radiographs, in one forward + backward pass. Each
    image's "model" seconds are the pass's share per image."""
    laps = _Laps()
    predictions, heatmaps = inference.run_batch([item.prepared for item in loaded])
    laps.lap("model")
    share = {"model": laps.seconds["model"] / max(1, len(loaded))}
    return [Examined(item, prediction, heatmap, {**item.seconds, **share})
            for item, prediction, heatmap in zip(loaded, predictions, heatmaps)]


def report(examined: Examined) -> Screening:
    """The SR (TID 1500), the SC with the saliency overlay and the KOS flagging the source image,
    for an examined radiograph."""
    laps = _Laps()
    source = examined.loaded.source
    sr = encode.build_sr(source, examined.prediction)
    laps.lap("sr")
    sc = encode.build_sc(source, examined.loaded.prepared.display, examined.heatmap, examined.prediction)
    laps.lap("sc")
    kos = encode.build_kos(source, sr, sc, examined.prediction)
    laps.lap("kos")
    return Screening(examined.prediction, sr, sc, kos, {**examined.seconds, **laps.seconds}, source)


def screen(path: Path, inference: Inference, display_max: int) -> Screening:
    """Screen the stored radiograph at `path` with a loaded model."""
    return report(examine([load(path, inference.bundle.spec, display_max)], inference)[0])


def warm_up(inference: Inference, display_max: int) -> float:
    """Screen one synthetic radiograph and discard the result; return the seconds it took.

    The first image through a process pays for what its libraries load lazily: highdicom's tables
    of the standard (~0.4 s at the first SR), the first pass of the model (on a GPU, the CUDA
    context and kernels), fonts. A worker does this before it claims a job, so that no patient's
    image waits for it.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="osteo-warm-up-") as folder:
        screen(synthetic_dx(Path(folder) / "warm-up.dcm", sex="F", size=512), inference, display_max)
    return time.perf_counter() - start
