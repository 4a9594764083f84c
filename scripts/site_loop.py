"""The site-validation loop on a simulated new site, measured: what docs/site-validation.md
("Measured") reports.

1. Render `--n` site phantoms (training.site_phantoms: the second rendering chain).
2. Screen them with the shipped reference model through an in-process node (receiver + worker,
   `osteo_node.node.Node`; DCMTK storescu as the modality, no PACS destination).
3. Record each patient's DXA result (the manifest's T-score as the lumbar spine T-score, 10 days
   after her first image) with `osteo_node.dxa.record`.
4. `validate`: low-BMD AUC with its CI, status, and the figures at the bundle's operating point;
   then a site operating point for a target sensitivity (`operating_point.set_point`) and the
   figures again.
5. `osteo-node dataset export`, `osteo-train train` on the exported manifest (fine-tuning the
   reference: `--init-bundle reference`) and `osteo-train evaluate` of the retrained and of the
   reference bundle on the export's held-out test split.

    nice -n 10 python scripts/site_loop.py --n 320 --work /tmp/site-loop [--epochs 4] [--lr 3e-4]

Prints each figure, and writes everything it measured to WORK/site_loop.json. Run again on the same
WORK with other --epochs / --lr to retrain only (the site, its validation and export are kept).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread

from osteo_node.bench.common import free_port
from osteo_node.bench.dcmtk import Dcmtk
from osteo_node.bench.processes import write_config
from osteo_node.config import load_settings
from osteo_node.dxa import DxaReading, record
from osteo_node.node import Node
from osteo_node.operating_point import Choice, set_point
from osteo_node.validate import validate
from training.site_phantoms import SiteOptions, generate_site

REFERENCE = "reference"


def node_config(work: Path, min_pairs: int) -> Path:
    """A node on SQLite in WORK, serving the reference, sending nowhere."""
    return write_config(work / "node.toml", {
        "node": {"data_dir": str(work / "var"), "log_level": "WARNING"},
        "dicom": {"port": free_port(), "bind_address": "127.0.0.1"},
        "database": {"url": f"sqlite:///{work / 'node.sqlite3'}"},
        "model": {"bundle": REFERENCE, "torch_threads": 2},
        "worker": {"poll_interval_s": 0.05},
        "storage": {"min_free_disk_mb": 0},
        "metrics": {"port": 0, "receiver_port": 0},
        "validation": {"min_pairs": min_pairs},
        "destinations": [],
    })


def screen(config: Path, images: list[Path]) -> float:
    """Receive every image and drain the queue in this process; wall seconds."""
    settings = load_settings(config)
    start = time.perf_counter()
    with Node(settings, receive=True, work=True, housekeeping=False) as node:
        Dcmtk.find().send(settings.dicom.port, images, 1, settings.dicom.ae_title)
        node.worker.run(threading.Event(), until_idle=True)
    return time.perf_counter() - start


def dxa_readings(site: Path) -> list[DxaReading]:
    """One DXA result per patient: her (measured) T-score, 10 days after her first image."""
    first: dict[str, tuple[dt.date, float, str]] = {}
    with (site / "manifest.csv").open() as handle:
        for row in csv.DictReader(handle):
            ds = dcmread(site / row["file"], stop_before_pixels=True)
            day = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()
            if row["patient_id"] not in first or day < first[row["patient_id"]][0]:
                first[row["patient_id"]] = (day, float(row["t_score"]), str(ds.get("IssuerOfPatientID", "")))
    return [DxaReading(patient_id=pid, issuer_of_patient_id=issuer, dxa_date=day + dt.timedelta(days=10),
                       t_lumbar_spine=t, t_femoral_neck=None, t_total_hip=None, source="csv",
                       source_ref="site_loop")
            for pid, (day, t, issuer) in sorted(first.items())]


def reference_figures(config: Path) -> dict[str, Any]:
    settings = load_settings(config)
    from osteo_node.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        report = validate(engine, settings).report
    finally:
        engine.dispose()
    [model] = [m for m in report["models"] if m["name"] == REFERENCE]
    return model


def show(label: str, model: dict[str, Any]) -> None:
    auc = model["low_bmd_auc"]
    at = model["at_threshold"]

    def value(x: Any) -> str:
        x = x.get("value") if isinstance(x, dict) else x
        return "n/a" if x is None else f"{x:.3f}"

    print(f"[{label}] pairs {model['pairs']}, status {model['status']}, low-BMD AUC {value(auc)} "
          f"[{value(auc.get('ci_low'))}, {value(auc.get('ci_high'))}]")
    print(f"[{label}] at the operating point: " + ", ".join(
        f"{k} {value(at.get(k))}" for k in ("sensitivity", "specificity", "ppv", "npv", "flag_rate")))


def run(command: list[str], log: Path) -> float:
    """Run a command (output to `log`); wall seconds. Raises on failure."""
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def measure_site(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Steps 1-4 and the export: the reference on the site, before and after a site operating point."""
    out: dict[str, Any] = {"n": args.n, "seed": args.seed, "size": args.size}
    start = time.perf_counter()
    if not (work / "site" / "manifest.csv").is_file():
        generate_site(work / "site", args.n, args.seed, SiteOptions(size=args.size), workers=args.threads)
    out["render_s"] = time.perf_counter() - start
    print(f"rendered {args.n} site images in {out['render_s']:.0f} s", flush=True)

    config = node_config(work, min_pairs=100)
    images = sorted((work / "site" / "images").glob("*.dcm"))
    out["screen_s"] = screen(config, images)
    print(f"screened through the node in {out['screen_s']:.0f} s", flush=True)

    settings = load_settings(config)
    from osteo_node.db import make_engine

    engine = make_engine(settings.database_url)
    readings = dxa_readings(work / "site")
    for reading in readings:
        record(engine, reading, actor="site_loop")
    out["dxa_results"] = len(readings)

    before = reference_figures(config)
    show("bundle operating point", before)
    point = set_point(engine, settings, before["device_uid"],
                      Choice(target_sensitivity=args.target_sensitivity), actor="site_loop")
    print(f"site operating point: low-BMD threshold {point.low_bmd_threshold:.3f} "
          f"(target sensitivity {args.target_sensitivity})")
    engine.dispose()
    after = reference_figures(config)
    show("site operating point", after)
    out["validate_before"], out["validate_after"] = before, after
    out["site_low_bmd_threshold"] = point.low_bmd_threshold

    export = work / "export"
    out["export_s"] = run([sys.executable, "-m", "osteo_node.cli", "dataset", "export", "--config", str(config),
                           "--out", str(export)], work / "export.log")
    print((work / "export.log").read_text().strip(), flush=True)
    with (export / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    out["export_rows"] = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    print(f"exported {len(rows)} pairs: {out['export_rows']}", flush=True)
    return out


def retrain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Step 5: fine-tune the reference on the export's train split; evaluate it and the reference
    on the export's test split."""
    python = sys.executable
    manifest = work / "export" / "manifest.csv"
    retrained = work / f"retrained-e{args.epochs}-lr{args.lr:g}"
    out: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr}
    out["train_s"] = run([python, "-m", "training.cli", "train", "--manifest", str(manifest),
                          "--init-bundle", REFERENCE, "--epochs", str(args.epochs), "--lr", f"{args.lr:g}",
                          "--batch-size", "16", "--threads", str(args.threads), "--out", str(retrained),
                          "--name", "site-retrained", "--calibrate", "--target-sensitivity", "0.9"],
                         work / f"{retrained.name}.train.log")
    print(f"retrained ({args.epochs} epochs, lr {args.lr:g}) in {out['train_s']:.0f} s", flush=True)
    for name, bundle in (("retrained", str(retrained)), ("reference", REFERENCE)):
        log = work / f"eval-{name}-{retrained.name}.log"
        run([python, "-m", "training.cli", "evaluate", "--bundle", bundle, "--manifest", str(manifest),
             "--split", "test", "--threads", str(args.threads)], log)
        out[f"evaluate_{name}"] = log.read_text()[-1500:]
        print(f"--- osteo-train evaluate {name} (test split)\n{out[f'evaluate_{name}']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=320, help="site images (default 320)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--size", type=int, default=256, help="detector pixels, long side (default 256)")
    parser.add_argument("--work", type=Path, required=True,
                        help="a folder for everything; when it holds an export already, only retrain")
    parser.add_argument("--target-sensitivity", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=4, help="retraining epochs (default 4)")
    parser.add_argument("--lr", type=float, default=3e-4, help="retraining peak learning rate (default 3e-4)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results = work / "site_loop.json"
    out = json.loads(results.read_text()) if results.is_file() else {}
    if not (work / "export" / "manifest.csv").is_file():
        out = measure_site(args, work)
    out.setdefault("retraining", []).append(retrain(args, work))
    results.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
