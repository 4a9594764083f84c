"""Calibration: temperature scaling fitted on validation logits, expected calibration error (ECE).

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides
the logits by one scalar T > 0 chosen to minimise the negative log-likelihood on the validation
split; it changes confidences, never the most probable class. The ECE here is the usual top-label
ECE: images binned by their highest probability into `n_bins` equal-width bins, and the
bin-size-weighted mean of |accuracy - mean confidence|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_BINS = 15


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin counts, accuracy and mean confidence (NaN for empty bins) of a top-label ECE."""

    edges: np.ndarray  # (n_bins + 1,)
    counts: np.ndarray  # (n_bins,)
    accuracy: np.ndarray
    confidence: np.ndarray
    ece: float


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), np.asarray(labels)], 1e-300, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The T in `bounds` minimising the NLL of softmax(logits / T) (LBFGS on log T).

    Returns 1.0 when there are no samples. Raises ValueError on shape mismatch.
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if z.dim() != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"fit_temperature: logits {tuple(z.shape)} and labels {tuple(y.shape)} do not match")
    if z.shape[0] == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return float(min(max(t, bounds[0]), bounds[1]))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Top-label reliability bins and ECE of `probs` (N, C) against class-index `labels`."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins are (lo, hi]; a confidence of exactly 0 falls in the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    acc = np.full(n_bins, np.nan)
    conf = np.full(n_bins, np.nan)
    for b in np.nonzero(counts)[0]:
        acc[b] = correct[index == b].mean()
        conf[b] = confidence[index == b].mean()
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(acc[filled] - conf[filled])) / max(1, len(y))) if len(y) else float("nan")
    return ReliabilityBins(edges=edges, counts=counts, accuracy=acc, confidence=conf, ece=ece)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE with `n_bins` equal-width bins (0 for a perfectly calibrated model)."""
    return reliability(probs, labels, n_bins).ece
