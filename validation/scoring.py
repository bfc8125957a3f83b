"""Scores: a file's (or a pair's) answers against PyTorch's on the same photos and prompts.

Every decoder score goes through `pipeline.predictor.Segmenter` (decode, upscale, select), the
same chain PyTorch's reference used, so a difference is a difference of the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.metrics import cosine_similarity, count_non_finite, mask_iou, max_abs_error, psnr_db
from pipeline.predictor import BatchedDecoder, NamedRunner, Prediction, Segmenter, embed
from validation.reference import ReferenceCase, ReferenceImage
from validation.schema import EncoderScores, KindScores, Summary, nan_max, nan_min

CONFIDENT_MARGIN_IN_STD = 1.0
"""The 'confident' IoU counts only pixels whose PyTorch logit is farther than this many standard
deviations (of that mask's logits) from 0. With random weights the logits hug 0 (std about 0.1)
and fp16/int8 rounding flips signs there without any conversion bug; a fixed margin such as
0.5 would leave no pixel at all. With no confident pixel the value is undefined (left out), never
a free 1.0."""

OVERLAY_KINDS = ("box_point", "mask_box_point")
OVERLAY_IMAGES = 3
"""The HTML report shows, for the first photos, the first box+point prompt's mask."""


def overlay_case(reference: ReferenceImage) -> ReferenceCase | None:
    """The prompt whose masks the HTML report draws for a photo: its first box+point."""
    return next((c for c in reference.cases if c.case.kind in OVERLAY_KINDS), None)


def confident_pixels(reference_logits: np.ndarray) -> np.ndarray:
    return np.abs(reference_logits) > CONFIDENT_MARGIN_IN_STD * float(np.std(reference_logits))


def confident_iou(reference_mask: np.ndarray, test_mask: np.ndarray, confident: np.ndarray) -> float | None:
    """IoU over confident pixels only; None (undefined, left out) where no confident pixel is
    foreground in either mask. Never NaN: NaN is kept for broken numbers, which fail."""
    union = np.logical_or(reference_mask, test_mask) & confident
    if not union.any():
        return None
    return float((reference_mask & test_mask & confident).sum() / union.sum())


def score_encoder(
    runner: NamedRunner, references: list[ReferenceImage], non_finite: dict[str, int]
) -> tuple[EncoderScores, list[np.ndarray]]:
    """Embeddings against PyTorch's on every photo; also returns them, for the pairs."""
    rows, outputs = [], []
    for reference in references:
        embeddings = embed(runner, reference.prepared)
        non_finite["image_embeddings"] = non_finite.get("image_embeddings", 0) + count_non_finite(embeddings)
        outputs.append(embeddings)
        rows.append(
            (
                psnr_db(reference.embeddings, embeddings),
                max_abs_error(reference.embeddings, embeddings),
                cosine_similarity(reference.embeddings, embeddings),
            )
        )
    scores = EncoderScores(
        psnr_db_min=nan_min([r[0] for r in rows]),
        max_abs_error=nan_max([r[1] for r in rows]),
        cosine_min=nan_min([r[2] for r in rows]),
        images=len(rows),
    )
    return scores, outputs


def case_metrics(
    expected: Prediction, actual: Prediction, truth: np.ndarray | None, teacher: Prediction | None
) -> dict[str, float | None]:
    """Everything one prompt says about a file's answer (None where undefined)."""
    mask = actual.mask_logits[actual.selected] > 0
    confident = confident_pixels(expected.mask_logits[expected.selected])
    return {
        "mask_iou": mask_iou(expected.mask, mask),
        "mask_iou_all4": float(
            np.mean([mask_iou(expected.mask_logits[i] > 0, actual.mask_logits[i] > 0) for i in range(4)])
        ),
        "mask_iou_confident": confident_iou(expected.mask, actual.mask_logits[expected.selected] > 0, confident),
        "same_index": float(actual.selected == expected.selected),
        "logits_psnr_db": psnr_db(expected.low_res_masks, actual.low_res_masks),
        "logits_max_abs_error": max_abs_error(expected.low_res_masks, actual.low_res_masks),
        "logits_cosine": cosine_similarity(expected.low_res_masks, actual.low_res_masks),
        "iou_predictions_psnr_db": psnr_db(expected.iou_predictions, actual.iou_predictions),
        "iou_predictions_max_abs_error": max_abs_error(expected.iou_predictions, actual.iou_predictions),
        "ground_truth_iou_pytorch": None if truth is None else mask_iou(truth, expected.mask),
        "ground_truth_iou_file": None if truth is None else mask_iou(truth, mask),
        "teacher_iou_pytorch": None if teacher is None else mask_iou(teacher.mask, expected.mask),
        "teacher_iou_file": None if teacher is None else mask_iou(teacher.mask, mask),
    }


def kind_scores(rows: list[dict[str, float | None]]) -> KindScores:
    def column(key: str) -> list:
        return [row[key] for row in rows]

    return KindScores(
        prompts=len(rows),
        mask_iou=Summary.of(column("mask_iou")),
        mask_iou_all4=Summary.of(column("mask_iou_all4")),
        mask_iou_confident=Summary.of(column("mask_iou_confident")),
        same_index_rate=float(np.mean(column("same_index"))),
        logits_psnr_db_min=nan_min(column("logits_psnr_db")),
        logits_max_abs_error=nan_max(column("logits_max_abs_error")),
        logits_cosine_min=nan_min(column("logits_cosine")),
        iou_predictions_psnr_db_min=nan_min(column("iou_predictions_psnr_db")),
        iou_predictions_max_abs_error=nan_max(column("iou_predictions_max_abs_error")),
        ground_truth_iou_pytorch=Summary.of(column("ground_truth_iou_pytorch")),
        ground_truth_iou_file=Summary.of(column("ground_truth_iou_file")),
        teacher_iou_pytorch=Summary.of(column("teacher_iou_pytorch")),
        teacher_iou_file=Summary.of(column("teacher_iou_file")),
    )


def score_prompts(
    decoder: NamedRunner,
    references: list[ReferenceImage],
    embeddings: Sequence[np.ndarray] | None,
    non_finite: dict[str, int],
    overlays: dict[int, np.ndarray] | None = None,
) -> dict[str, KindScores]:
    """A decoder on every prompt, per prompt kind: on PyTorch's embeddings (`embeddings` None)
    or on an encoder file's (a pair, end to end from the photo)."""
    segmenter = Segmenter(decoder)
    per_kind: dict[str, list[dict[str, float | None]]] = {}
    for index, reference in enumerate(references):
        image_embeddings = reference.embeddings if embeddings is None else embeddings[index]
        segmenter.set_embeddings(reference.prepared, image_embeddings)
        if isinstance(decoder, BatchedDecoder):  # every prompt of the photo in B-row calls, then read back
            decoder.prefetch([{"image_embeddings": image_embeddings, **item.inputs} for item in reference.cases])
        drawn = overlay_case(reference)
        for item in reference.cases:
            actual = segmenter.decode({"image_embeddings": image_embeddings, **item.inputs}, item.case.multimask)
            for name in ("low_res_masks", "iou_predictions"):
                non_finite[name] = non_finite.get(name, 0) + count_non_finite(getattr(actual, name))
            if overlays is not None and index < OVERLAY_IMAGES and item is drawn:
                overlays[reference.image_id] = actual.mask
            truth = reference.ground_truth.get(item.case.annotation_id)
            per_kind.setdefault(item.case.kind, []).append(case_metrics(item.expected, actual, truth, item.teacher))
    return {kind: kind_scores(rows) for kind, rows in per_kind.items()}


def pytorch_against_teacher(references: list[ReferenceImage]) -> dict[str, KindScores] | None:
    """The PyTorch student's masks against the teacher's (the paper's student-vs-teacher mIoU)."""
    if all(item.teacher is None for reference in references for item in reference.cases):
        return None
    per_kind: dict[str, list[dict[str, float | None]]] = {}
    for reference in references:
        for item in reference.cases:
            rows = per_kind.setdefault(item.case.kind, [])
            rows.append(case_metrics(item.teacher, item.expected, None, None))
    return {kind: kind_scores(rows) for kind, rows in per_kind.items()}
