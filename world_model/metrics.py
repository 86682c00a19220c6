"""Label-agreement and signal metrics used by evaluation (DESIGN.md §9)."""

from __future__ import annotations

import numpy as np


def contingency(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(P, L) counts of (predicted cluster, true label) pairs."""
    pred, true = np.asarray(pred).ravel(), np.asarray(true).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred and true differ in size: {pred.shape} vs {true.shape}")
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(true, return_inverse=True)
    table = np.zeros((p.max(initial=-1) + 1, t.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def normalized_mutual_info(pred: np.ndarray, true: np.ndarray) -> float:
    """NMI with arithmetic-mean normalisation; 1 = the clusters determine the labels and vice versa."""
    table = contingency(pred, true)
    n = table.sum()
    if n == 0:
        return 0.0
    h_pred, h_true = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_pred == 0 and h_true == 0:
        return 1.0
    joint = table[table > 0] / n
    outer = (table.sum(1, keepdims=True) * table.sum(0, keepdims=True))[table > 0] / n**2
    mutual = float((joint * np.log(joint / outer)).sum())
    return mutual / max((h_pred + h_true) / 2, 1e-12)


def purity(pred: np.ndarray, true: np.ndarray) -> float:
    """Share of items whose cluster's majority label is their own label."""
    table = contingency(pred, true)
    return float(table.max(axis=1).sum() / max(table.sum(), 1))


def si_snr_db(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant signal-to-noise ratio in dB (higher is better)."""
    estimate = np.asarray(estimate, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    estimate, reference = estimate - estimate.mean(), reference - reference.mean()
    projection = (estimate @ reference) / (reference @ reference + eps) * reference
    noise = estimate - projection
    return float(10 * np.log10((projection @ projection + eps) / (noise @ noise + eps)))


def psnr_db(estimate: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(estimate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2))
    return float(10 * np.log10(peak**2 / max(mse, 1e-12)))
