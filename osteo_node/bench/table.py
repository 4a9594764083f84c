"""The bench's report as a plain-text table (what `osteo-node bench` prints without --json)."""

from __future__ import annotations

from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what `osteo-node bench` prints without --json)."""
    m = report["machine"]
    lines = [(f"machine: {m['cores']} cores, {m['cpu']}, GPU {m['gpu'] or 'none'}, torch {m['torch']} "
              f"({m['torch_threads']} threads), database {m['database']}, load {m['load_average']} -> "
              f"{m.get('load_average_after')}")]
    if "model" in report:
        md = report["model"]
        lines.append(f"model: {md['name']} {md['version']} ({md['backbone']}/{md['method']}, "
                     f"{md['input_size']} px, {md['parameters']:,} parameters)")
    if "receive" in report:
        lines += ["", (f"{'receive':10} {'MB':>6} {'assoc':>5} {'n':>4} {'procs':>5} {'node img/s':>11} "
                       f"{'storescp img/s':>15} {'ratio':>6} {'floor img/s':>12} {'node/floor':>10} "
                       f"{'pynetdicom img/s':>17} {'node/pynetdicom':>15}")]
        for c in report["receive"]["cases"]:
            lines.append(f"{c['images']:10} {c['image_mb']:>6.2f} {c['associations']:>5} {c['n']:>4} "
                         f"{c['processes']:>5} {c['node_images_per_s']:>11.1f} "
                         f"{c['storescp_images_per_s']:>15.1f} {c['ratio']:>6.2f} "
                         f"{c['floor_images_per_s']:>12.1f} {c['ratio_to_floor']:>10.2f} "
                         f"{c['library_images_per_s']:>17.1f} {c['ratio_to_library']:>15.2f}")
        lines.append(f"ratio_vs_storescp (CR, 1 association): {report['receive']['ratio_vs_storescp']:.2f}")
    pipeline = report.get("pipeline", {})
    if "stages" in pipeline:
        lines += ["", f"{'stage':14} {'median s':>9} {'p95 s':>9}"]
        for stage, v in pipeline["stages"].items():
            lines.append(f"{stage:14} {v['median']:>9.3f} {v['p95']:>9.3f}")
        lines.append(f"floor (bare forward+backward): {pipeline['floor_s']:.3f} s; "
                     f"ratio_to_floor {pipeline['ratio_to_floor']:.2f}")
    if "end_to_end" in pipeline:
        e = pipeline["end_to_end"]["seconds"]
        lines.append(f"end to end (received -> accepted by PACS), n={pipeline['end_to_end']['n']}: "
                     f"median {e['median']:.2f} s, p95 {e['p95']:.2f} s")
    if "throughput" in report:
        t = report["throughput"]
        lines.append(f"throughput: {t['images_per_s']:.2f} images/s draining {t['n']} jobs on "
                     f"{t['device']} (batch {t['batch_size']}, prefetch {t['prefetch']}); "
                     f"{t['seconds_per_image']:.3f} s per image, {t['steady_ratio_to_floor']:.1f}x floor")
        if t.get("gpu_fraction_of_floor") is not None:
            lines.append(f"GPU: bare batched forward+backward {t['floor_images_per_s']:.1f} images/s; "
                         f"gpu_fraction_of_floor {t['gpu_fraction_of_floor']:.2f}, peak GPU memory "
                         f"{t.get('gpu_peak_mb', 0):.0f} MB")
    if "memory" in report:
        mem = report["memory"]
        lines.append(f"peak RSS: receiver {mem['receiver_peak_rss_mb']:.0f} MB, "
                     f"worker {mem['worker_peak_rss_mb']:.0f} MB ({mem['images']} CR images, "
                     f"bundle loaded {mem['worker_bundle_loads']}x)")
    if "workers" in report:
        w = report["workers"]
        lines.append("workers (osteo-node work processes, full queue): " + ", ".join(
            f"{c['processes']} -> {c['images_per_s']:.2f} images/s" for c in w["cases"])
            + f"; scaling {w['scaling']:.2f}x")
    lines.append(f"bench took {report['seconds']:.0f} s")
    return "\n".join(lines)
