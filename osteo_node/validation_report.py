"""The site validation report as people read it: a text summary, PNG plots (ROC, calibration,
monthly drift; matplotlib, no display needed) and HTML, from osteo_node.validate's report.

The HTML body is one template (`web/templates/_performance.html`) shared with the web app's
Performance page, so the file report and the page show the same content.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from .validate import Validation

TEMPLATES = Path(__file__).resolve().parent / "web" / "templates"
PLOTS = ("roc", "calibration", "drift")


class Fmt:
    """Number formatting for the templates (None and NaN print as a dash)."""

    @staticmethod
    def num(value: float | None, digits: int = 3) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    @staticmethod
    def pct(value: float | None) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"

    @classmethod
    def ci(cls, interval: dict[str, Any] | None, pct: bool = False) -> str:
        if not interval or interval.get("ci_low") is None:
            return ""
        show = cls.pct if pct else cls.num
        mark = "†" if interval.get("small_sample") else ""
        return f"[{show(interval['ci_low'])}, {show(interval['ci_high'])}]{mark}"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


def _title(model: dict[str, Any]) -> str:
    return f"{model['name']} {model['version']} ({model['role']})"


def roc_png(validation: Validation, device_uid: str) -> bytes:
    """ROC curves (low BMD, osteoporosis) with the operating point in force marked."""
    data = validation.data[device_uid]
    model = next(m for m in validation.report["models"] if m["device_uid"] == device_uid)
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=1)
    y, p = data.labels, data.probs
    for truth, score, label in ((y >= 1, p[:, 1] + p[:, 2], "low BMD"), (y == 2, p[:, 2], "osteoporosis")):
        if truth.any() and (~truth).any():
            fpr, tpr, _ = roc_curve(truth, score)
            auc = model["low_bmd_auc" if label == "low BMD" else "osteoporosis_auc"]["value"]
            ax.plot(fpr, tpr, label=f"{label} (AUC {Fmt.num(auc)})")
    at = model.get("at_threshold")
    if at["sensitivity"] is not None and at["specificity"] is not None:
        ax.plot([1 - at["specificity"]], [at["sensitivity"]], "o", color="crimson",
                label="operating point")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC, n = {len(y)}")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(_title(model), fontsize=9)
    return _png(fig)


def calibration_png(validation: Validation, device_uid: str) -> bytes:
    """Reliability diagram of the top-label probability, with bin counts."""
    model = next(m for m in validation.report["models"] if m["device_uid"] == device_uid)
    bins = [b for b in model["calibration"]["bins"] if b["n"]]
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=1)
    if bins:
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-")
        for b in bins:
            ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    ax.set(xlabel="mean confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Calibration, ECE {Fmt.num(model['calibration']['ece'])}")
    fig.suptitle(_title(model), fontsize=9)
    return _png(fig)


def drift_png(validation: Validation, device_uid: str) -> bytes:
    """Low-BMD AUC per month of the image (with CI), sensitivity and flag rate."""
    model = next(m for m in validation.report["models"] if m["device_uid"] == device_uid)
    months = model["monthly"]
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.subplots()
    x = np.arange(len(months))
    auc = [m["low_bmd_auc"]["value"] for m in months]
    low = [m["low_bmd_auc"]["ci_low"] for m in months]
    high = [m["low_bmd_auc"]["ci_high"] for m in months]
    if months:
        values = np.array([np.nan if v is None else v for v in auc], dtype=float)
        errors = np.array([[0 if v is None or lo is None else v - lo for v, lo in zip(auc, low)],
                           [0 if v is None or hi is None else hi - v for v, hi in zip(auc, high)]])
        ax.errorbar(x, values, yerr=errors, fmt="o-", capsize=3, label="low-BMD AUC")
        for key, label in (("sensitivity", "sensitivity"), ("flag_rate", "flag rate")):
            series = [np.nan if m["at_threshold"][key] is None
                      else m["at_threshold"][key] for m in months]
            ax.plot(x, series, "s--", label=label, markersize=4)
        ax.set_xticks(x, [f"{m['month']}\nn={m['pairs']}" for m in months], fontsize=7)
    ax.axhline(validation.report["min_low_bmd_auc"], color="crimson", linewidth=1, linestyle=":")
    ax.set(ylim=(0, 1.01), title="By month of the image")
    ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(_title(model), fontsize=9)
    return _png(fig)


def plot(validation: Validation, device_uid: str, kind: str) -> bytes:
    """One of PLOTS as PNG bytes."""
    return {"roc": roc_png, "calibration": calibration_png, "drift": drift_png}[kind](validation, device_uid)


def environment() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))


def write_report(validation: Validation, out: Path) -> Path:
    """`out`/report.html and its PNG plots; returns the HTML file's path."""
    out.mkdir(parents=True, exist_ok=True)
    names: dict[tuple[str, str], str] = {}
    for index, model in enumerate(validation.report["models"], start=1):
        for kind in PLOTS:
            name = f"model{index}-{kind}.png"
            (out / name).write_bytes(plot(validation, model["device_uid"], kind))
            names[(model["device_uid"], kind)] = name
    body = environment().get_template("_performance.html").render(
        report=validation.report, fmt=Fmt, image_url=lambda uid, kind: names[(uid, kind)],
        editable=False, csrf_token="", history=None)
    html = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>osteo-node site validation</title><style>body{font-family:sans-serif;margin:2em}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
            ".status-failing{color:#b00}.status-passing{color:#070}</style></head><body>\n"
            "<h1>Site validation</h1>\n" + body + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def summary(report: dict[str, Any]) -> str:
    """A few lines per model for the terminal."""
    lines = [(f"{report['paired_dxa_results']} DXA results paired (window {report['match_window_days']} "
              f"days; CIs: {report['bootstrap_resamples']} patient-level bootstrap resamples)")]
    for m in report["models"]:
        auc, osteo = m["low_bmd_auc"], m["osteoporosis_auc"]
        lines.append(f"{m['name']} {m['version']} [{m['role']}] {m['device_uid']}: {m['status']}")
        lines.append(f"  pairs {m['pairs']} (patients {m['patients']}); low-BMD AUC "
                     f"{Fmt.num(auc['value'])} {Fmt.ci(auc)}; osteoporosis AUC "
                     f"{Fmt.num(osteo['value'])} {Fmt.ci(osteo)}; ECE {Fmt.num(m['ece'])}")
        point, at = m["operating_point"], m["at_threshold"]
        if point and at["n"]:
            lines.append(f"  at low BMD {Fmt.num(point['low_bmd_threshold'], 4)} / osteoporosis "
                         f"{Fmt.num(point['osteoporosis_threshold'], 4)} ({point['source']}): "
                         + ", ".join(f"{k} {Fmt.pct(at[k])} (n {at['n'][k]})"
                                     for k in ("sensitivity", "specificity", "ppv", "npv", "flag_rate")))
        for c in m["candidates"]:
            if c.get("requested") and "error" not in c:
                lines.append(f"  target {c['basis']} {c['target']:g}: low BMD "
                             f"{Fmt.num(c['low_bmd_threshold'], 4)} -> sensitivity {Fmt.pct(c['sensitivity'])}, "
                             f"specificity {Fmt.pct(c['specificity'])}, flag rate {Fmt.pct(c['flag_rate'])}, "
                             f"flags/week {Fmt.num(c['flags_per_week'], 1)}")
    for c in report["comparisons"]:
        diff = c["auc_difference"]
        lines.append(f"shadow {c['name']} {c['version']} vs live on {c['pairs']} pairs: AUC difference "
                     f"{Fmt.num(diff['value']) if diff else '–'} {Fmt.ci(diff)}; p {Fmt.num(c['p_value'], 4)} "
                     f"(DeLong {Fmt.num(c['delong_p_value'], 4)})")
    return "\n".join(lines)
