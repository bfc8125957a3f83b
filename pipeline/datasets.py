"""Real photos with COCO instance masks (`../shared/data/coco-cc-train` by default)."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "coco-cc-train"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def default_dataset_dir() -> Path:
    return Path(os.environ.get("MOBILESAM_DATASET", DEFAULT_DATASET))


def load_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grayscale and RGBA photos are converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read image {path}: {error}") from None


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder, recursively, sorted so every run sees the same order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Instance:
    annotation_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h
    mask: np.ndarray  # HxW bool


class CocoPhotos:
    """A folder of images with a COCO instances file; masks decoded by pycocotools."""

    def __init__(self, images: Path, annotations: Path | None) -> None:
        self.images_dir = Path(images)
        self.annotations = Path(annotations) if annotations else None
        if not self.images_dir.is_dir():
            raise PipelineError(f"image folder not found: {self.images_dir}")
        if self.annotations is not None and not self.annotations.is_file():
            raise PipelineError(f"annotations file not found: {self.annotations}")

    @classmethod
    def default(cls) -> CocoPhotos:
        root = default_dataset_dir()
        return cls(root / "images", root / "instances.json")

    @cached_property
    def coco(self):  # pycocotools.coco.COCO
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(self.annotations))

    def image_ids(self) -> list[int]:
        return sorted(self.coco.getImgIds())

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.coco.loadImgs(image_id)[0]["file_name"]

    def image(self, image_id: int) -> np.ndarray:
        return load_rgb(self.image_path(image_id))

    def instances(self, image_id: int, include_crowd: bool = False) -> list[Instance]:
        annotation_ids = self.coco.getAnnIds(imgIds=image_id, iscrowd=None if include_crowd else False)
        return [
            Instance(
                annotation_id=ann["id"],
                category_id=ann["category_id"],
                bbox=tuple(ann["bbox"]),
                mask=self.coco.annToMask(ann).astype(bool),
            )
            for ann in self.coco.loadAnns(annotation_ids)
        ]
