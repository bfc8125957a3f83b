"""Segment everything: segment-anything's automatic mask generator over any encoder and batched decoder.

`AutomaticMaskGenerator` is segment-anything's `SamAutomaticMaskGenerator` (point grid,
multimask outputs, predicted-IoU and stability-score filters, box NMS, optional crop layers, COCO
RLE output), its algorithm and `segment_anything.utils.amg` helpers used as they are. Only the
predictor underneath changes: `RunnerPredictor` answers the generator's SamPredictor calls with
a converted encoder file and a batched decoder file (or the PyTorch export wrappers), B grid
points per decoder call, upscaled exactly as SamPredictor does.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.transforms import ResizeLongestSide

from pipeline.contract import IMAGE_SIZE
from pipeline.predictor import BatchedDecoder, NamedRunner, embed
from pipeline.processing import PreparedImage, no_mask_input, padded_prompt_rows, prepare_image, upscale_mask_batch

GENERATOR_DEFAULTS = {
    "points_per_side": 32,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 0,
}
"""segment-anything's defaults (crop layers off)."""


@dataclass
class CallTimes:
    """Where a generation's time went: encoder calls, batched decoder calls (and prompts)."""

    encoder_s: float = 0.0
    decoder_s: float = 0.0
    encoder_calls: int = 0
    decoder_calls: int = 0
    prompts: int = 0


@dataclass(frozen=True)
class _MaskThreshold:
    """The one attribute of a Sam the generator reads through `predictor.model`."""

    mask_threshold: float = 0.0


@dataclass(frozen=True)
class _ImageSize:
    img_size: int = IMAGE_SIZE


@dataclass(frozen=True)
class _SamShape:
    """What SamAutomaticMaskGenerator's constructor reads from a Sam before we swap its predictor."""

    image_encoder: _ImageSize = field(default_factory=_ImageSize)


def _digest(*arrays: np.ndarray | bytes) -> bytes:
    digest = hashlib.sha1(usedforsecurity=False)
    for array in arrays:
        digest.update(array if isinstance(array, bytes) else np.ascontiguousarray(array).tobytes())
        digest.update(str(getattr(array, "shape", "")).encode())
    return digest.digest()


class RunnerPredictor:
    """The part of SamPredictor that SamAutomaticMaskGenerator calls (set_image, reset_image,
    transform, device, model.mask_threshold, predict_torch), over runners.

    With `remember`, each photo's embeddings and each point batch's decoder answers are kept, so
    generating again with other thresholds (which filter the same answers) runs nothing twice; a
    remembered call counts with the time it took when it ran, so the call times stay the file's."""

    def __init__(self, encoder: NamedRunner, decoder: BatchedDecoder, num_points: int, remember: bool = False) -> None:
        self.encoder, self.decoder, self.num_points = encoder, decoder, num_points
        self.transform = ResizeLongestSide(IMAGE_SIZE)
        self.device = torch.device("cpu")
        self.model = _MaskThreshold()
        self.times = CallTimes()
        self.prepared: PreparedImage | None = None
        self.embeddings: np.ndarray | None = None
        self.remember = remember
        self._image_key = b""
        self._embedded: dict[bytes, tuple[PreparedImage, np.ndarray, float]] = {}
        self._answered: dict[bytes, tuple[list[dict[str, np.ndarray]], float]] = {}

    def add_embeddings(self, image: np.ndarray, embeddings: np.ndarray, seconds: float = 0.0) -> None:
        """The encoder's answer for `image`, already computed elsewhere (validate's file scores)."""
        self._embedded[_digest(image)] = (prepare_image(image), embeddings, seconds)

    def set_image(self, image: np.ndarray) -> None:
        self._image_key = _digest(image)
        if self._image_key in self._embedded:
            self.prepared, self.embeddings, seconds = self._embedded[self._image_key]
            self.times.encoder_s += seconds
            self.times.encoder_calls += 1
            return
        prepared = prepare_image(image)
        start = time.perf_counter()
        self.embeddings = embed(self.encoder, prepared)
        seconds = time.perf_counter() - start
        self.times.encoder_s += seconds
        self.times.encoder_calls += 1
        self.prepared = prepared
        if self.remember:
            self._embedded[self._image_key] = (prepared, self.embeddings, seconds)

    def reset_image(self) -> None:
        self.prepared = self.embeddings = None

    def _rows(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """One-prompt decoder inputs per row: the row's points (1024 frame), then padding slots."""
        coords, labels = padded_prompt_rows(point_coords.numpy(), point_labels.numpy(), self.num_points)
        mask_input, has_mask_input = no_mask_input()
        return [
            {
                "image_embeddings": self.embeddings,
                "point_coords": coords[i : i + 1],
                "point_labels": labels[i : i + 1],
                "mask_input": mask_input,
                "has_mask_input": has_mask_input,
            }
            for i in range(len(labels))
        ]

    def predict_torch(
        self,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SamPredictor.predict_torch for point prompts (what the generator sends)."""
        if self.prepared is None:
            raise RuntimeError("call set_image before predict_torch")
        if boxes is not None or mask_input is not None:
            raise ValueError("the automatic mask generator sends points only")
        rows = self._rows(point_coords, point_labels)
        key = _digest(self._image_key, point_coords.numpy(), point_labels.numpy())
        if key in self._answered:
            answers, seconds = self._answered[key]
        else:
            start = time.perf_counter()
            answers = self.decoder.run_many(rows)
            seconds = time.perf_counter() - start
            if self.remember:
                self._answered[key] = (answers, seconds)
        self.times.decoder_s += seconds
        self.times.decoder_calls += -(-len(rows) // self.decoder.batch)
        self.times.prompts += len(rows)
        low_res = torch.from_numpy(np.concatenate([a["low_res_masks"] for a in answers]))
        iou = torch.from_numpy(np.concatenate([a["iou_predictions"] for a in answers]))
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        low_res, iou = low_res[:, chosen], iou[:, chosen]
        masks = upscale_mask_batch(low_res, self.prepared.input_size, self.prepared.original_size)
        return (masks if return_logits else masks > self.model.mask_threshold), iou, low_res


class AutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """SamAutomaticMaskGenerator over `RunnerPredictor`: points_per_batch is the decoder's B."""

    def __init__(self, predictor: RunnerPredictor, **options: Any) -> None:
        options = {**GENERATOR_DEFAULTS, "output_mode": "coco_rle", **options}
        # segment-anything's constructor wraps a Sam in a SamPredictor; ours is swapped in right after
        super().__init__(_SamShape(), points_per_batch=predictor.decoder.batch, **options)
        self.predictor = predictor

    @classmethod
    def over(
        cls, encoder: NamedRunner, batched_decoder: NamedRunner, batch: int, num_points: int, **options: Any
    ) -> AutomaticMaskGenerator:
        """The generator over an encoder and a batched decoder of B = `batch` prompts a call."""
        return cls(RunnerPredictor(encoder, BatchedDecoder(batched_decoder, batch), num_points), **options)


def reference_generator(sam: torch.nn.Module, **options: Any) -> SamAutomaticMaskGenerator:
    """segment-anything's own generator on the PyTorch model, with the same options and output."""
    return SamAutomaticMaskGenerator(sam, **{**GENERATOR_DEFAULTS, "output_mode": "coco_rle", **options})


MATCH_IOU = 0.95
"""A reference mask counts as reproduced when one of ours overlaps it at least this much."""


@dataclass(frozen=True)
class MaskSetMatch:
    """Two mask sets of one photo: for each reference mask the best IoU among ours."""

    reference_count: int
    our_count: int
    best_ious: tuple[float, ...]

    @property
    def matched(self) -> int:
        return sum(iou >= MATCH_IOU for iou in self.best_ious)

    @property
    def reproduced(self) -> bool:
        """Every reference mask matched at MATCH_IOU, and the same number of masks."""
        return self.matched == self.reference_count == self.our_count

    def to_json(self) -> dict[str, Any]:
        return {
            "reference_count": self.reference_count,
            "our_count": self.our_count,
            "matched": self.matched,
            "best_iou_mean": float(np.mean(self.best_ious)) if self.best_ious else None,
            "best_iou_min": float(np.min(self.best_ious)) if self.best_ious else None,
            "reproduced": self.reproduced,
        }


def decode_masks(records: list[dict[str, Any]]) -> np.ndarray:
    """K x H x W bool from coco_rle records (K may be 0)."""
    from pycocotools import mask as mask_utils

    if not records:
        return np.zeros((0, 0, 0), dtype=bool)
    return np.stack([mask_utils.decode(r["segmentation"]).astype(bool) for r in records])


def match_masks(reference: list[dict[str, Any]], ours: list[dict[str, Any]]) -> MaskSetMatch:
    expected, actual = decode_masks(reference), decode_masks(ours)
    best: list[float] = []
    if len(expected) and len(actual):
        a = actual.reshape(len(actual), -1).astype(np.float32)
        for mask in expected.reshape(len(expected), -1).astype(np.float32):
            intersection = a @ mask
            union = a.sum(axis=1) + mask.sum() - intersection
            best.append(float(np.max(np.where(union > 0, intersection / np.maximum(union, 1), 1.0))))
    else:
        best = [0.0] * len(expected)
    return MaskSetMatch(len(reference), len(ours), tuple(best))
