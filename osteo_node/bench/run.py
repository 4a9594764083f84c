"""`run_bench`: the sections asked for, on synthetic images, gathered into one JSON-ready dict."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import Settings, parse_settings
from ..synthetic import cr_copies, synthetic_dx
from .common import FULL, QUICK, Counts, ScratchDatabases
from .dcmtk import Dcmtk
from .memory import measure_memory
from .node import measure_node
from .pipeline import measure_pipeline, model_floor
from .receive import measure_receive
from .workers import measure_workers, worker_counts


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cores": os.cpu_count(), "cpu": cpu or platform.processor(), "gpu": gpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def model_info(bundle: Any) -> dict[str, Any]:
    return {"name": bundle.identity.name, "version": bundle.identity.version,
            "backbone": bundle.identity.backbone, "method": bundle.spec.method,
            "input_size": bundle.spec.input_size, "path": str(bundle.path),
            "parameters": sum(p.numel() for p in bundle.classifier.parameters()), "cam": bundle.cam.to_dict()}


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


SECTIONS = ("receive", "pipeline", "node", "memory")  # the default
#: Measured only when named: it starts several model-loading processes per worker count.
OPTIONAL_SECTIONS = ("workers",)


def run_bench(settings: Settings, *, bundle: str | None = None, quick: bool = False,
              sections: Sequence[str] = SECTIONS, counts: Counts | None = None,
              progress: Callable[[str], None] | None = None, workers: int = 2) -> dict[str, Any]:
    """Run the measurements named in `sections` and return one JSON-ready dict. `workers`: the most
    worker processes the workers section runs (it measures 1, 2, 4 ... up to it)."""
    from pydicom import dcmread

    from ..bundle import load_bundle
    from ..infer import Inference
    from ..pixels import decode, prepare

    dcmtk = Dcmtk.find(settings.bench.dcmtk_dir)
    counts = counts or (QUICK if quick else FULL)
    say = progress or (lambda _msg: None)
    if bundle is not None:
        raw = settings.model_dump(mode="json")
        raw["model"]["bundle"] = str(Path(bundle).resolve()) if "/" in bundle or bundle.startswith(".") \
            else bundle
        settings = parse_settings(raw, Path.cwd())
    report: dict[str, Any] = {"quick": quick, "machine": machine(), "counts": dataclasses.asdict(counts)}
    started = time.perf_counter()
    databases = ScratchDatabases(settings.database_url)
    report["machine"]["database"] = databases.backend
    with tempfile.TemporaryDirectory(prefix="osteo-bench-") as tmp, databases:
        work = Path(tmp)
        n_drain = max(counts.throughput, 4 * settings.worker.batch_size)  # a few full batches
        processes = worker_counts(workers) if "workers" in sections else []
        n_workers = {k: max(counts.throughput, 2 * settings.worker.batch_size * k) for k in processes}
        n_cr = max(counts.cr_receive, counts.pipeline + 1, n_drain + counts.end_to_end,
                   counts.memory_cr, *n_workers.values())
        n_dx = counts.dx_receive if "receive" in sections else 0
        say(f"writing {n_dx} DX 512x512 and {n_cr} CR images")
        (work / "dx").mkdir()
        dx = [synthetic_dx(work / "dx" / f"dx-{i:04d}.dcm", sex="F", size=512, seed=i) for i in range(n_dx)]
        cr = cr_copies(work / "cr", n_cr)
        if "receive" in sections:
            say("receive: node and storescp, 1 and 4 associations")
            report["receive"] = measure_receive(
                settings, dcmtk, {"dx512": dx, "cr": cr[:counts.cr_receive]}, work, databases).as_dict()
        if "pipeline" in sections or "node" in sections:
            from ..node import cam_override, resolve_device
            from ..pipeline import warm_up

            say(f"loading bundle {settings.model.bundle}")
            loaded = load_bundle(settings.model.bundle, device=resolve_device(settings), merged=True)
            report["model"] = model_info(loaded)
            report["machine"]["torch_threads"] = _torch_threads()
            spec = loaded.spec
            tensor = prepare(decode(dcmread(cr[0])), spec.input_size, spec.mean, spec.std,
                             display_max=settings.model.display_max).tensor
            floor_model = copy.deepcopy(loaded.classifier)  # the same weights without CAM hooks
            precision, batch = settings.model.precision, settings.worker.batch_size
            floor_s = model_floor(floor_model, tensor, counts.floor_repeats, cam_block=loaded.cam.block,
                                  precision=precision)
            batch_floor_s = None
            if loaded.device.startswith("cuda"):  # the GPU's bare throughput at the worker's batch size
                batch_floor_s = model_floor(floor_model, tensor, counts.floor_repeats, batch=batch,
                                            cam_block=loaded.cam.block, precision=precision) / batch
            inference = Inference(loaded, device=loaded.device, cam_method=cam_override(settings),
                                  precision=precision)
            warm_up(inference, settings.model.display_max)  # as a worker does before its first job
            if "pipeline" in sections:
                say(f"pipeline: {counts.pipeline} CR images")
                with dcmtk.storescp_running(work / "pipeline-pacs") as pacs_port:
                    pipeline = measure_pipeline(inference, floor_model, cr[1:counts.pipeline + 1],
                                                settings.model.display_max, pacs_port, work / "pipeline")
                report["pipeline"] = pipeline.as_dict()
                floor_s = pipeline.floor_s
            del floor_model
            if "node" in sections:
                say(f"throughput ({n_drain} CR) and end to end ({counts.end_to_end} CR)")
                throughput, end_to_end = measure_node(
                    settings, dcmtk, inference, cr[:n_drain], cr[n_drain:n_drain + counts.end_to_end],
                    work / "node", databases, floor_s, batch_floor_s)
                report["throughput"] = throughput.as_dict()
                if str(inference.device).startswith("cuda"):
                    import torch

                    report["throughput"]["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
                report.setdefault("pipeline", {}).setdefault("floor_s", floor_s)
                report["pipeline"]["end_to_end"] = end_to_end.as_dict()
                report["pipeline"]["end_to_end_p95_s"] = end_to_end.seconds["p95"]
        if "memory" in sections:
            say(f"memory: osteo-node receive and work subprocesses, {counts.memory_cr} CR images")
            report["memory"] = measure_memory(settings, dcmtk, cr[:counts.memory_cr], work / "memory",
                                              databases).as_dict()
        if processes:
            cases = []
            for k in processes:
                say(f"workers: {k} osteo-node work processes, {n_workers[k]} CR images")
                cases.append(measure_workers(settings, dcmtk, cr[:n_workers[k]], work / f"workers-{k}", databases, k))
            report["workers"] = {"batch_size": settings.worker.batch_size,
                                 "cases": [c.as_dict() for c in cases],
                                 "scaling": cases[-1].images_per_s / cases[0].images_per_s}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report
