"""Per-precision gates: the agreement an artifact must reach, or the validate stage fails.

Defaults sit under what was measured on real photos with seeded random weights (report.json of
`nox -s validate`, see README): fp32 files matched PyTorch exactly (mask IoU 1.000, embeddings
127 dB); fp16 (TFLite) gave mask IoU >= 0.998 and 68.5 dB; int8 gave mean mask IoU 0.976-0.992
per prompt kind (min 0.961), confident-pixel IoU 1.000, embeddings 27.7-34.7 dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Gate:
    """Minimums for one precision; a decoder is checked on every prompt kind."""

    embeddings_psnr_db: float
    mask_iou_mean: float
    mask_iou_min: float
    confident_iou_mean: float


DEFAULT_GATES = {
    "fp32": Gate(embeddings_psnr_db=60.0, mask_iou_mean=0.99, mask_iou_min=0.98, confident_iou_mean=0.99),
    "fp16": Gate(embeddings_psnr_db=40.0, mask_iou_mean=0.98, mask_iou_min=0.95, confident_iou_mean=0.98),
    "int8": Gate(embeddings_psnr_db=25.0, mask_iou_mean=0.95, mask_iou_min=0.90, confident_iou_mean=0.95),
    # Core ML 6-bit palettes measured 27.0 dB embeddings and mask IoU mean 0.958-0.984 (min 0.939)
    "palettize6": Gate(embeddings_psnr_db=22.0, mask_iou_mean=0.93, mask_iou_min=0.85, confident_iou_mean=0.95),
}


def gates_from_config(raw: dict[str, dict[str, float]] | None) -> dict[str, Gate]:
    """DEFAULT_GATES with the TOML `[gates.<precision>]` tables laid over them."""
    gates = dict(DEFAULT_GATES)
    known = {f.name for f in fields(Gate)}
    for precision, values in (raw or {}).items():
        if precision not in gates:
            raise ConfigError(f"gates for unknown precision {precision!r}; expected some of {sorted(gates)}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"gates.{precision}: unknown keys {unknown}; expected some of {sorted(known)}")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(
                    f"gates.{precision}.{key} must be a finite number, got {type(value).__name__} {value!r}"
                )
        gates[precision] = Gate(**{**gates[precision].__dict__, **values})
    return gates


def gate_failures(artifact: dict[str, Any], gate: Gate) -> list[str]:
    """Why an artifact falls below its gate (empty when it passes)."""
    if "error" in artifact:
        return [artifact["error"]]
    agreement = artifact["agreement"]
    failures = [
        f"output {name} had {count} non-finite values (NaN or Inf)"
        for name, count in artifact.get("non_finite_outputs", {}).items()
        if count
    ]
    if artifact["part"] == "image_encoder":
        psnr = agreement["embeddings"]["psnr_db_min"]
        if not psnr >= gate.embeddings_psnr_db:  # NaN fails
            failures.append(f"embeddings PSNR {psnr:.1f} dB < {gate.embeddings_psnr_db}")
        return failures
    for kind, values in agreement.items():
        confident = values["mask_iou_confident"]  # None: no prompt of this kind had a confident pixel
        checks = (
            ("mask IoU mean", values["mask_iou"]["mean"], gate.mask_iou_mean),
            ("mask IoU min", values["mask_iou"]["min"], gate.mask_iou_min),
            ("confident IoU mean", None if confident is None else confident["mean"], gate.confident_iou_mean),
        )
        for label, value, minimum in checks:
            if value is not None and (math.isnan(value) or value < minimum):
                failures.append(f"{kind}: {label} {value:.3f} < {minimum}")
    return failures
