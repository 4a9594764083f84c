"""Time and peak memory of one training step of the real-size backbone (random init, no download).

ViT-B/14 as in DINOv2-base / RAD-DINO (hidden 768, 12 layers, 12 heads, patch 14), built from its
config with random weights, one optimizer step (forward, class-weighted cross-entropy, backward,
AdamW) per repetition. Each (size, method) runs in a fresh subprocess so that its peak RSS
(getrusage ru_maxrss) is its own. Prints one JSON line per configuration and a Markdown table.

    python -m training.measure_step --sizes 224,518 --methods linear,lora,partial --batch 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any


def one(size: int, method: str, batch: int, steps: int, threads: int, partial_blocks: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from osteo_node.model import ModelSpec, build_classifier, trainable_parameter_count
    from training.train import PRESETS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = ModelSpec(family="dinov2", source="random-init:vit-b14", method=method, input_size=size,
                     partial_blocks=partial_blocks)
    model = build_classifier(spec, random_init_config=PRESETS["vit-b14"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % 3
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"size": size, "method": method, "batch": batch, "threads": threads,
            "partial_blocks": partial_blocks if method == "partial" else None,
            "trainable_parameters": trainable_parameter_count(model),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "step_seconds": [round(t, 2) for t in times],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.measure_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="224,518")
    p.add_argument("--methods", default="linear,lora,partial")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per configuration (the first includes warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--partial-blocks", type=int, default=12, help="k for partial (12: every block)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "size,method": measure in this process
    args = p.parse_args(argv)
    if args.one:
        size, method = args.one.split(",")
        print(json.dumps(one(int(size), method, args.batch, args.steps, args.threads, args.partial_blocks)))
        return 0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "training.measure_step", "--one", f"{size},{method}",
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--partial-blocks", str(args.partial_blocks)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| input px | method | trainable params | batch | s / step (last) | peak RSS MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['method']} | {r['trainable_parameters']:,} | {r['batch']} | "
              f"{r['step_seconds'][-1]:.2f} | {r['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
