"""Per-precision gates: the agreement a converted file must reach against PyTorch.

The validate stage fails a file below its gate; the self-test vectors that travel with each file
carry the same numbers as tolerances an app can check on the device. Defaults sit under what was
measured on real photos with seeded random weights (docs/validation.md).
"""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from pipeline.records import STRICT
from pipeline.selftest import Tolerance


@dataclass(frozen=True, config=STRICT)
class Gate:
    """Minimums for one precision; a decoder is checked on every prompt kind."""

    embeddings_psnr_db: float
    mask_iou_mean: float
    mask_iou_min: float
    confident_iou_mean: float
    conversion_psnr_db: float
    """The convert stage's check right after each conversion: every output of the fresh file on
    the example photo (embeddings, mask logits, IoU scores) at least this PSNR against PyTorch. A
    floor that catches a broken conversion at once; the fields above are what validate demands on
    held-out photos (a decoder's logits may sit under the embeddings' figure while its masks hold)."""


def selftest_tolerance(gate: Gate, part: str) -> Tolerance:
    """The gate as the self-test check: embeddings PSNR for an encoder, the single-mask output's
    IoU for a decoder."""
    if part == "image_encoder":
        return Tolerance(min_psnr_db={"image_embeddings": gate.embeddings_psnr_db})
    return Tolerance(min_mask_iou=gate.mask_iou_min)


DEFAULT_GATES = {
    "fp32": Gate(
        embeddings_psnr_db=60.0, mask_iou_mean=0.99, mask_iou_min=0.98, confident_iou_mean=0.99, conversion_psnr_db=60.0
    ),
    "fp16": Gate(
        embeddings_psnr_db=40.0, mask_iou_mean=0.98, mask_iou_min=0.95, confident_iou_mean=0.98, conversion_psnr_db=30.0
    ),
    "int8": Gate(
        embeddings_psnr_db=25.0, mask_iou_mean=0.95, mask_iou_min=0.90, confident_iou_mean=0.95, conversion_psnr_db=10.0
    ),
    "w8a8": Gate(
        embeddings_psnr_db=25.0, mask_iou_mean=0.95, mask_iou_min=0.90, confident_iou_mean=0.95, conversion_psnr_db=10.0
    ),
    # 6-bit palettes: looser than int8 (docs/coreml.md has what they measure)
    "palettize6": Gate(
        embeddings_psnr_db=22.0, mask_iou_mean=0.93, mask_iou_min=0.85, confident_iou_mean=0.95, conversion_psnr_db=10.0
    ),
}
