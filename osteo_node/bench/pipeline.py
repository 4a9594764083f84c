"""Pipeline: per-stage seconds of `pipeline.screen` (+ send to a local storescp), and the floor:
the classifier's bare forward + backward (down to the Grad-CAM target layer) on the same tensor."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import summary


@dataclass(frozen=True)
class PipelineResult:
    n: int
    stages: dict[str, dict[str, float]]
    floor_s: float
    ratio_to_floor: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_floor(classifier: Any, tensor: Any, repeats: int, *, warmup: bool = True, cam_block: int = -1,
                batch: int = 1, precision: str = "fp32") -> float:
    """Median seconds of the classifier's bare forward + backward of each image's top logit on a
    batch of `batch` copies of `tensor`, with gradients only down to the Grad-CAM target layer
    (what Inference needs), under the same autocast, no CAM hooks. Sets the same requires_grad
    pattern that Inference sets; pass a classifier without CAM hooks (a copy)."""
    import torch

    from ..model import autocast, cam_target, gradients_down_to

    gradients_down_to(classifier, cam_target(classifier, cam_block)[0])
    device = next(classifier.parameters()).device
    x = torch.from_numpy(tensor[None]).repeat(batch, 1, 1, 1).to(device)
    times = []
    for _ in range(repeats + int(warmup)):
        start = time.perf_counter()
        with autocast(device, precision):
            logits = classifier(x)
        logits.max(dim=1).values.sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        classifier.zero_grad(set_to_none=True)
    return statistics.median(times[int(warmup):])


def measure_pipeline(inference: Any, floor_model: Any, files: Sequence[Path], display_max: int,
                     pacs_port: int, work: Path) -> PipelineResult:
    """Per-stage seconds of pipeline.screen on each file, plus sending SR + SC to `pacs_port`,
    each image preceded by one floor pass (model_floor on `floor_model`) on its own input tensor,
    so that a drifting machine load affects both alike. The first file is a warm-up, untimed."""
    from pydicom import dcmread

    from ..config import Destination
    from ..encode import to_bytes
    from ..pipeline import screen
    from ..pixels import decode, prepare
    from ..send import send_files

    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port)
    spec = inference.bundle.spec
    screen(files[0], inference, display_max)
    per_stage: dict[str, list[float]] = {}
    totals, floors = [], []
    work.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        tensor = prepare(decode(dcmread(path)), spec.input_size, spec.mean, spec.std,
                         display_max=display_max).tensor
        floors.append(model_floor(floor_model, tensor, 1, warmup=False, cam_block=inference.bundle.cam.block,
                                  precision=inference.precision))
        result = screen(path, inference, display_max)
        outputs = [work / f"{i}.sr.dcm", work / f"{i}.sc.dcm"]
        outputs[0].write_bytes(to_bytes(result.sr))
        outputs[1].write_bytes(to_bytes(result.sc))
        start = time.perf_counter()
        send_files(destination, outputs, "OSTEO_BENCH")
        seconds = {**result.seconds, "send": time.perf_counter() - start}
        for stage, value in seconds.items():
            per_stage.setdefault(stage, []).append(value)
        totals.append(sum(result.seconds[s] for s in ("decode", "preprocess", "model", "sr", "sc")))
    stages = {stage: summary(values) for stage, values in per_stage.items()}
    stages["screen_total"] = summary(totals)
    floor_s = statistics.median(floors)
    return PipelineResult(len(files), stages, floor_s, statistics.median(totals) / floor_s)
