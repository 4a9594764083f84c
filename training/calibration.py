"""Calibration: temperature scaling fitted on validation logits.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides
the logits by one scalar T > 0 chosen to minimise the negative log-likelihood on the validation
split; it changes confidences, never the most probable class. The expected calibration error that
measures it lives with the other metrics in osteo_node.metrics (the node computes it on site data).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
