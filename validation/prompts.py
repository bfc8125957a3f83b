"""Prompts, recorded so a run can be repeated exactly: derived from ground-truth instance masks,
or, for a user's own photos without ground truth, from a seeded grid and PyTorch's own masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from pipeline.processing import Prompt

PROMPT_KINDS = ("center_point", "random_point", "box", "box_point", "multi_point", "refine")
GRID_PROMPT_KINDS = ("grid_point", "mask_box", "mask_box_point", "refine")
"""Without ground truth: a grid point, then a box around PyTorch's mask for it, alone and with the point."""
REFINED_KIND = {"center_point": "refine", "grid_point": "refine"}
"""A second pass after these kinds: the same point with the first pass's best low-res mask as
`mask_input` (has_mask_input = 1), as SamPredictor's `mask_input`; one mask out."""
GRID_SIDE = 4


@dataclass(frozen=True)
class PromptCase:
    """One prompt on one instance, in JSON-friendly form."""

    image_id: int
    annotation_id: int | None  # None: no ground truth behind this prompt
    kind: str
    points: list[list[float]] | None
    labels: list[float] | None
    box: list[float] | None
    refines: str | None = None
    """For a refinement: the kind whose first-pass best low-res mask is the `mask_input`."""

    def prompt(self, mask_input: np.ndarray | None = None) -> Prompt:
        return Prompt(
            points=None if self.points is None else np.asarray(self.points, np.float32),
            labels=None if self.labels is None else np.asarray(self.labels, np.float32),
            box=None if self.box is None else np.asarray(self.box, np.float32),
            mask_input=mask_input,
        )

    def refinement(self) -> PromptCase | None:
        """The second-pass case that refines this one's mask, if its kind has one."""
        kind = REFINED_KIND.get(self.kind)
        if kind is None:
            return None
        return PromptCase(self.image_id, self.annotation_id, kind, self.points, self.labels, self.box, self.kind)

    @property
    def multimask(self) -> bool:
        """SAM's advice: three masks for a single ambiguous point, one otherwise."""
        return self.kind in ("center_point", "random_point", "grid_point")


def most_interior_pixel(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel farthest from the mask's border."""
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def prompt_cases(
    image_id: int, annotation_id: int, mask: np.ndarray, bbox: tuple[float, float, float, float], seed: int
) -> list[PromptCase]:
    """The five prompt kinds for one instance; random choices seeded by (seed, annotation id)."""
    rng = np.random.default_rng([seed, annotation_id])
    ys, xs = np.nonzero(mask)
    center = most_interior_pixel(mask)
    pick = rng.integers(len(xs))
    random_point = (int(xs[pick]), int(ys[pick]))
    x, y, w, h = bbox
    box = [float(x), float(y), float(x + w), float(y + h)]
    extra = rng.choice(len(xs), size=2, replace=len(xs) < 2)
    background = _background_point(mask, rng)
    multi = [list(center), [int(xs[extra[0]]), int(ys[extra[0]])], list(background)]

    def case(kind: str, points: list | None, labels: list | None, with_box: bool) -> PromptCase:
        return PromptCase(
            image_id=image_id,
            annotation_id=annotation_id,
            kind=kind,
            points=None if points is None else [[float(a), float(b)] for a, b in points],
            labels=labels,
            box=box if with_box else None,
        )

    return [
        case("center_point", [center], [1.0], False),
        case("random_point", [random_point], [1.0], False),
        case("box", None, None, True),
        case("box_point", [center], [1.0], True),
        case("multi_point", multi, [1.0, 1.0, 0.0], False),
    ]


def _background_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(~mask)
    if len(xs) == 0:
        return 0, 0
    pick = rng.integers(len(xs))
    return int(xs[pick]), int(ys[pick])


def grid_point_cases(image_id: int, size: tuple[int, int], count: int, seed: int) -> list[PromptCase]:
    """`count` distinct cells of a GRID_SIDE x GRID_SIDE grid over the photo, chosen with
    (seed, image id); one foreground point at each cell's centre."""
    height, width = size
    rng = np.random.default_rng([seed, image_id])
    cells = rng.choice(GRID_SIDE * GRID_SIDE, size=min(count, GRID_SIDE * GRID_SIDE), replace=False)
    cases = []
    for cell in sorted(int(c) for c in cells):
        row, column = divmod(cell, GRID_SIDE)
        x, y = (column + 0.5) * width / GRID_SIDE, (row + 0.5) * height / GRID_SIDE
        cases.append(PromptCase(image_id, None, "grid_point", [[float(x), float(y)]], [1.0], None))
    return cases


def cases_around_mask(point_case: PromptCase, mask: np.ndarray) -> list[PromptCase]:
    """A box around PyTorch's mask for a grid point, alone and with the point (none for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    return [
        PromptCase(point_case.image_id, None, "mask_box", None, None, box),
        PromptCase(point_case.image_id, None, "mask_box_point", point_case.points, point_case.labels, box),
    ]
