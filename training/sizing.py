"""`osteo-train sizing-bundle`: an untrained bundle of a real-size backbone, for sizing hardware.

    osteo-train sizing-bundle --random-init vit-b14 --input-size 518 --out /tmp/vit-b14-518
    osteo-node bench --bundle /tmp/vit-b14-518 --sections pipeline,node,memory

Speed and memory depend on the architecture, the input size and the method, not on the weights, so
a hospital can answer "what hardware does a ViT-B/14 model need" before it has trained one. The
bundle is written by osteo_node.bundle.export_bundle like a trained one (same layout, LoRA adapters
for --method lora), from a random-init preset (training.train.PRESETS; `vit-b14` is the DINOv2-base
/ RAD-DINO architecture) or from a local pretrained checkpoint (--source). Its head is untrained:
its outputs are meaningless, and the manifest says so and refuses clinical use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from osteo_node.bundle import export_bundle
from osteo_node.model import DEFAULT_NORMALISATION, FAMILIES, METHODS, ModelSpec, build_classifier
from training.train import PRESETS, random_init_config

SIZING_INTENDED_USE = (
    "Sizing only: an untrained model of a real-size architecture, for measuring speed and memory "
    "(osteo-node bench). Its outputs are meaningless; never route patient images to it."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osteo-train sizing-bundle", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--random-init", metavar="PRESET_OR_JSON",
                        help=f"random weights of a preset {sorted(PRESETS)} or of a JSON Dinov2Config")
    source.add_argument("--source", help="local transformers checkpoint of the backbone")
    p.add_argument("--family", choices=FAMILIES, default="dinov2")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--input-size", type=int, help="model input size (default: the preset's image_size or 224)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced)")
    p.add_argument("--name", help="bundle name (default: the out folder name)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        init_cfg = random_init_config(args.random_init, args.family) if args.random_init else None
    except ValueError as exc:
        print(f"osteo-train sizing-bundle: {exc}", file=sys.stderr)
        return 2
    input_size = args.input_size or int((init_cfg or {}).get("image_size", 224))
    mean, std = DEFAULT_NORMALISATION[args.family]
    spec = ModelSpec(family=args.family, source=args.source or f"random-init:{args.random_init}",
                     method=args.method, input_size=input_size, mean=mean, std=std)
    torch.manual_seed(args.seed)
    model = build_classifier(spec, random_init_config=init_cfg)
    name = args.name or args.out.name
    summary = {"data": "none: untrained (sizing only)", "random_init": args.random_init,
               "source": args.source, "seed": args.seed}
    export_bundle(model.eval(), spec, args.out, name=name, version="0.0.0",
                  thresholds={"low_bmd": 0.5, "osteoporosis": 0.5}, intended_use=SIZING_INTENDED_USE,
                  clinical_use=False, data_summary=summary)
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"bundle": str(args.out), "name": name, "family": args.family, "method": args.method,
                      "input_size": input_size, "parameters": parameters}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
