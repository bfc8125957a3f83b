"""Held-out evaluation: embedding MSE to the teacher, and mask IoU of student vs teacher.

Both SAMs share the teacher's prompt encoder and mask decoder (decoupled distillation), so any
mask difference comes from the student's embeddings. Prompts: for photos with COCO annotations
beside the image folder, a point inside each instance and its box; otherwise a fixed grid of
points and a central box. Masks are compared at the photo's resolution (SamPredictor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from distillation.data import ImageSource, prepare_for_encoder
from distillation.models import sam_at_size
from pipeline.datasets import CocoPhotos
from pipeline.metrics import mask_iou


@dataclass(frozen=True)
class EvalPrompt:
    kind: str
    point: np.ndarray | None = None
    box: np.ndarray | None = None


@dataclass(frozen=True)
class Annotations:
    """COCO instances beside the image folder, found by file name."""

    coco: CocoPhotos
    image_ids: dict[str, int]


def prompts_for(
    source: ImageSource, image: np.ndarray, annotations: Annotations | None, count: int
) -> list[EvalPrompt]:
    """A point and a box per annotated instance (largest first), or a grid for unannotated photos."""
    prompts: list[EvalPrompt] = []
    if annotations is not None:
        coco = annotations.coco
        image_id = annotations.image_ids.get(source.path.name)
        if image_id is not None:
            instances = sorted(coco.instances(image_id), key=lambda inst: -int(inst.mask.sum()))[:count]
            for instance in instances:
                ys, xs = np.nonzero(instance.mask)
                middle = len(xs) // 2
                x, y, w, h = instance.bbox
                prompts.append(EvalPrompt("point", point=np.array([[xs[middle], ys[middle]]], dtype=np.float32)))
                prompts.append(EvalPrompt("box", box=np.array([x, y, x + w, y + h], dtype=np.float32)))
            if prompts:
                return prompts
    height, width = image.shape[:2]
    for fx, fy in ((0.5, 0.5), (0.25, 0.25), (0.75, 0.75), (0.25, 0.75))[:count]:
        prompts.append(EvalPrompt("point", point=np.array([[fx * width, fy * height]], dtype=np.float32)))
    prompts.append(EvalPrompt("box", box=np.array([0.25 * width, 0.25 * height, 0.75 * width, 0.75 * height])))
    return prompts


def _annotations(sources: list[ImageSource]) -> Annotations | None:
    if not sources or sources[0].member is not None:
        return None
    folder = sources[0].path.parent
    for candidate in (folder / "instances.json", folder.parent / "instances.json"):
        if candidate.is_file():
            coco = CocoPhotos(folder, candidate)
            return Annotations(coco, {coco.image_path(i).name: i for i in coco.image_ids()})
    return None


def evaluate_student(
    student: torch.nn.Module,
    teacher: Sam,
    sources: list[ImageSource],
    targets: dict[str, torch.Tensor],
    image_size: int,
    prompts_per_image: int = 4,
    with_masks: bool = True,
) -> dict:
    """Embedding MSE (mean over held-out images) and mask IoU per prompt kind."""
    student = student.eval()
    errors = []
    with torch.no_grad():
        for source in sources:
            prediction = student(prepare_for_encoder(source.read_rgb(), image_size)[None])[0]
            errors.append(float(torch.mean((prediction - targets[source.key].float()) ** 2)))
    result: dict = {"images": len(sources), "embedding_mse": float(np.mean(errors)), "embedding_mse_per_image": errors}
    if not with_masks:
        return result
    student_predictor = SamPredictor(sam_at_size(student, teacher, image_size))
    teacher_predictor = SamPredictor(sam_at_size(teacher.image_encoder, teacher, image_size))
    annotations = _annotations(sources)
    ious: dict[str, list[float]] = {"point": [], "box": []}
    for source in sources:
        image = source.read_rgb()
        student_predictor.set_image(image)
        teacher_predictor.set_image(image)
        for prompt in prompts_for(source, image, annotations, prompts_per_image):
            arguments = {
                "point_coords": prompt.point,
                "point_labels": None if prompt.point is None else np.ones(len(prompt.point)),
                "box": prompt.box,
                "multimask_output": False,
            }
            student_mask = student_predictor.predict(**arguments)[0][0]
            teacher_mask = teacher_predictor.predict(**arguments)[0][0]
            ious[prompt.kind].append(mask_iou(teacher_mask, student_mask))
    result["mask_iou_vs_teacher"] = {
        kind: {"mean": float(np.mean(values)), "min": float(np.min(values)), "count": len(values)}
        for kind, values in ious.items()
        if values
    }
    return result
