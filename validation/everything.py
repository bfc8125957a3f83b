"""The validate report's segment-everything section: each target's encoder file with its batched
decoder file run as segment-anything's automatic mask generator, against SamAutomaticMaskGenerator
on the PyTorch weights, on the same photos, grid and thresholds.

Two threshold settings: zero (every mask survives the quality filters, so the comparison sees
them all; box NMS as segment-anything's default) and segment-anything's defaults. fp32 files are
gated: every reference mask matched at IoU >= 0.95 and the same count; the others are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.contract import BATCHED_DECODER, ENCODER
from pipeline.errors import PipelineError, one_line
from pipeline.predictor import BatchedDecoder
from pipeline.segment_everything import (
    AutomaticMaskGenerator,
    CallTimes,
    RunnerPredictor,
    match_masks,
    reference_generator,
)
from validation.schema import EverythingPhoto, EverythingResult, GateResult

THRESHOLDS: dict[str, dict[str, float]] = {
    "zero thresholds": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    "default thresholds": {},
}
GATED_PRECISION = "fp32"

ReferenceMasks = dict[str, dict[int, list[dict[str, Any]]]]
"""thresholds name -> image id -> SamAutomaticMaskGenerator's records."""


def reference_masks(sam: torch.nn.Module, images: dict[int, np.ndarray], points_per_side: int) -> ReferenceMasks:
    with torch.inference_mode():
        return {
            name: {
                image_id: reference_generator(sam, points_per_side=points_per_side, **options).generate(image)
                for image_id, image in images.items()
            }
            for name, options in THRESHOLDS.items()
        }


def everything_pairs(records: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(encoder, batched decoder) of each batched decoder file: the encoder of its precision, or fp32."""
    runs = [a for a in records if a.result.selftest_only is None]  # files scored on their vectors only: not here
    encoders = {a.record.precision: a for a in runs if a.record.part == ENCODER}
    pairs = []
    for decoder in (a for a in runs if a.record.part == BATCHED_DECODER):
        encoder = encoders.get(decoder.record.precision) or encoders.get(GATED_PRECISION)
        if encoder is not None:
            pairs.append((encoder, decoder))
    return pairs


def score_everything(
    target: str,
    encoder: Any,
    decoder: Any,
    batch: int,
    num_points: int,
    images: dict[int, np.ndarray],
    reference: ReferenceMasks,
    points_per_side: int,
) -> list[EverythingResult]:
    """One result per threshold setting for an (encoder, batched decoder) pair of loaded files.

    The settings only filter the same answers: the photos' embeddings (the ones validate scored
    the encoder file with) and the grid's decoder answers are computed once for all of them."""
    results = []
    predictor = None
    if encoder.runner is not None and decoder.runner is not None:
        predictor = RunnerPredictor(encoder.runner, BatchedDecoder(decoder.runner, batch), num_points, remember=True)
        if encoder.embeddings is not None and len(encoder.embeddings) == len(images):
            for image, embeddings in zip(images.values(), encoder.embeddings, strict=True):
                predictor.add_embeddings(image, embeddings)
    for name, options in THRESHOLDS.items():
        result = EverythingResult(
            target=target,
            encoder_file=encoder.result.file,
            decoder_file=decoder.result.file,
            encoder_precision=encoder.record.precision,
            decoder_precision=decoder.record.precision,
            thresholds=name,
            options={"points_per_side": points_per_side, **options},
        )
        if predictor is None:
            result.error = f"not run: {encoder.result.error or decoder.result.error}"
        else:
            try:
                _run(result, predictor, images, reference[name], options)
            except Exception as error:  # one pair's failure never stops the others
                result.error = str(error) if isinstance(error, PipelineError) else f"running failed: {one_line(error)}"
        gated = result.encoder_precision == result.decoder_precision == GATED_PRECISION
        failures = [result.error] if result.error else []
        failures += [
            f"photo {p.image_id}: {p.matched} of {p.reference_count} reference masks matched at IoU >= 0.95, "
            f"{p.our_count} masks"
            for p in result.photos
            if not p.reproduced
        ]
        result.gate = GateResult(not failures, tuple(failures)) if gated else None
        results.append(result)
    return results


def _run(
    result: EverythingResult,
    predictor: RunnerPredictor,
    images: dict[int, np.ndarray],
    reference: dict[int, list[dict[str, Any]]],
    options: dict[str, float],
) -> None:
    predictor.times = CallTimes()  # this setting's calls (remembered ones at the time they took)
    generator = AutomaticMaskGenerator(predictor, points_per_side=result.options["points_per_side"], **options)
    for image_id, image in images.items():
        match = match_masks(reference[image_id], generator.generate(image))
        result.photos.append(EverythingPhoto(image_id=image_id, **match.to_json()))
    result.prompts = predictor.times.prompts
    result.decoder_calls = predictor.times.decoder_calls
    result.decoder_s = predictor.times.decoder_s
