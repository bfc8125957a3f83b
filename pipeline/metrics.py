"""Agreement metrics between a converted file's outputs and the PyTorch reference."""

from __future__ import annotations

import numpy as np

from pipeline.errors import ArtifactError


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64))))


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio with the reference's largest magnitude as the peak."""
    reference = np.asarray(reference, np.float64)
    mse = float(np.mean((reference - np.asarray(test, np.float64)) ** 2))
    peak = float(np.max(np.abs(reference)))
    if mse == 0.0:
        return float("inf")
    return 10.0 * np.log10(peak**2 / mse) if peak > 0 else float("-inf")


def cosine_similarity(reference: np.ndarray, test: np.ndarray) -> float:
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(test, np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else float("nan")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def count_non_finite(array: np.ndarray) -> int:
    return int(np.size(array) - np.count_nonzero(np.isfinite(array)))


def require_finite(array: np.ndarray, what: str) -> None:
    """Raise one line naming `what` when it holds NaN or Inf: no metric may average them away."""
    bad = count_non_finite(array)
    if bad:
        raise ArtifactError(f"{what} has {bad} non-finite values (NaN or Inf) out of {np.size(array)}")
