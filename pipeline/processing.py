"""What an app does around the two exported parts: image and prompt preparation, mask
post-processing and mask selection. Shared by the PyTorch reference and every runtime, so a
difference in a report is a difference of the converted file, never of the glue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from pipeline.contract import DEFAULT_NUM_POINTS, IMAGE_SIZE, LOW_RES_MASK_SIZE, PIXEL_MEAN, PointLabel
from pipeline.errors import PromptError

_RESIZE = ResizeLongestSide(IMAGE_SIZE)
_VALID_POINT_LABELS = (PointLabel.BACKGROUND, PointLabel.FOREGROUND)


@dataclass(frozen=True)
class PreparedImage:
    """The encoder input and the sizes needed to map masks back to the photo."""

    image: np.ndarray  # 1x3x1024x1024 float32, RGB 0..255, mean-padded
    original_size: tuple[int, int]  # (H, W) of the photo
    input_size: tuple[int, int]  # (H, W) after resizing, before padding

    def encoder_inputs(self) -> dict[str, np.ndarray]:
        """The image encoder's inputs by contract name."""
        return {"image": self.image}


@dataclass(frozen=True)
class Prompt:
    """Prompts in the photo's pixel frame: points (k x 2, x y) with labels 0/1, and/or a box, and
    optionally the low-res mask logits of an earlier pass to refine (SamPredictor's `mask_input`)."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None  # x0, y0, x1, y1
    mask_input: np.ndarray | None = None  # 256x256 (or 1x256x256) logits: an earlier low_res_masks entry

    @property
    def num_slots(self) -> int:
        return (0 if self.points is None else len(self.points)) + (0 if self.box is None else 2)


def prepare_image(image: np.ndarray, image_size: int = IMAGE_SIZE) -> PreparedImage:
    """Resize like SamPredictor (longest side 1024) and pad bottom-right with the pixel mean.

    Other sizes serve only the distill stage's small smoke runs; the contract is 1024."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PromptError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    resized = (_RESIZE if image_size == IMAGE_SIZE else ResizeLongestSide(image_size)).apply_image(image)
    height, width = resized.shape[:2]
    padded = np.empty((image_size, image_size, 3), dtype=np.float32)
    padded[...] = np.asarray(PIXEL_MEAN, dtype=np.float32)
    padded[:height, :width] = resized
    return PreparedImage(
        image=np.ascontiguousarray(padded.transpose(2, 0, 1)[None]),
        original_size=(image.shape[0], image.shape[1]),
        input_size=(height, width),
    )


def prompt_to_decoder_inputs(
    prompt: Prompt, original_size: tuple[int, int], num_points: int = DEFAULT_NUM_POINTS
) -> dict[str, np.ndarray]:
    """Points then box corners (labels 2, 3) in the 1024 frame, padded to N with label -1.

    Raises PromptError for more prompts than slots, coordinates outside the photo, unknown
    labels, or no prompt at all.
    """
    height, width = original_size
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if prompt.points is not None:
        points = np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)
        point_labels = np.asarray(prompt.labels if prompt.labels is not None else [], dtype=np.float32).reshape(-1)
        if len(point_labels) != len(points):
            raise PromptError(f"{len(points)} points but {len(point_labels)} labels; give one label per point")
        unknown = sorted({float(v) for v in point_labels} - {float(v) for v in _VALID_POINT_LABELS})
        if unknown:
            raise PromptError(f"unknown point labels {unknown}; expected 1 (foreground) or 0 (background)")
        coords.append(points)
        labels.append(point_labels)
    if prompt.box is not None:
        box = np.asarray(prompt.box, dtype=np.float32).reshape(-1)
        if box.shape != (4,) or box[2] < box[0] or box[3] < box[1]:
            raise PromptError(f"box must be x0, y0, x1, y1 with x0 <= x1 and y0 <= y1, got {box.tolist()}")
        coords.append(box.reshape(2, 2))
        labels.append(np.array([PointLabel.BOX_TOP_LEFT, PointLabel.BOX_BOTTOM_RIGHT], dtype=np.float32))
    if not coords:
        raise PromptError("no prompt: give at least one point or a box")
    all_coords = np.concatenate(coords)
    all_labels = np.concatenate(labels)
    if len(all_coords) > num_points:
        raise PromptError(f"{len(all_coords)} prompt slots (points + 2 per box) exceed the decoder's N = {num_points}")
    outside = (all_coords[:, 0] < 0) | (all_coords[:, 0] > width) | (all_coords[:, 1] < 0) | (all_coords[:, 1] > height)
    if outside.any() or not np.isfinite(all_coords).all():
        bad = all_coords[np.argmax(outside)] if outside.any() else all_coords[~np.isfinite(all_coords).all(1)][0]
        raise PromptError(f"prompt coordinate {bad.tolist()} lies outside the {width}x{height} image")
    point_coords, point_labels = padded_prompt_rows(
        _RESIZE.apply_coords(all_coords, original_size)[None], all_labels[None], num_points
    )
    mask_input, has_mask_input = no_mask_input()
    if prompt.mask_input is not None:
        previous = np.asarray(prompt.mask_input, dtype=np.float32)
        if previous.size != LOW_RES_MASK_SIZE**2 or previous.shape[-2:] != (LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE):
            raise PromptError(
                f"mask_input must be one {LOW_RES_MASK_SIZE}x{LOW_RES_MASK_SIZE} low-res logit mask (a low_res_masks "
                f"entry of an earlier pass), got shape {previous.shape}"
            )
        if not np.isfinite(previous).all():
            raise PromptError("mask_input holds non-finite values (NaN or Inf)")
        mask_input[0, 0] = previous.reshape(LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE)
        has_mask_input[0] = 1.0
    return {
        "point_coords": point_coords,
        "point_labels": point_labels,
        "mask_input": mask_input,
        "has_mask_input": has_mask_input,
    }


def padded_prompt_rows(coords: np.ndarray, labels: np.ndarray, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """K prompts of P slots each (K x P x 2 coordinates in the 1024 frame, K x P labels) as the
    decoder's K x N x 2 `point_coords` and K x N `point_labels`: the unused slots labelled -1."""
    count, points = np.shape(labels)
    if points > num_points:
        raise PromptError(f"{points} prompt slots exceed the decoder's N = {num_points}")
    point_coords = np.zeros((count, num_points, 2), dtype=np.float32)
    point_labels = np.full((count, num_points), float(PointLabel.PADDING), dtype=np.float32)
    point_coords[:, :points] = coords
    point_labels[:, :points] = labels
    return point_coords, point_labels


def no_mask_input() -> tuple[np.ndarray, np.ndarray]:
    """`mask_input` and `has_mask_input` of a prompt without an earlier pass to refine."""
    return (
        np.zeros((1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE), dtype=np.float32),
        np.zeros((1,), dtype=np.float32),
    )


def upscale_mask_batch(
    low_res_masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Mask logits Bx Cx256x256 -> BxCxHxW logits at the photo's size (Sam.postprocess_masks)."""
    masks = F.interpolate(low_res_masks.float(), (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def upscale_masks(low_res_masks: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Mask logits 1x4x256x256 -> 4xHxW logits at the photo's size (Sam.postprocess_masks)."""
    masks = torch.from_numpy(np.ascontiguousarray(low_res_masks, dtype=np.float32))
    return upscale_mask_batch(masks, input_size, original_size)[0].numpy()


def select_mask_index(iou_predictions: np.ndarray, multimask_output: bool) -> int:
    """SamPredictor's rule: the single-mask output (0), or the best-scored of the three (1..3)."""
    scores = np.asarray(iou_predictions).reshape(-1)
    return int(np.argmax(scores[1:4]) + 1) if multimask_output else 0


def default_multimask(prompt: Prompt) -> bool:
    """SAM's advice: ask for three masks when the prompt is ambiguous (one point, no box)."""
    return prompt.box is None and prompt.points is not None and len(prompt.points) == 1
