"""Real photos: the sample shipped in `pipeline/sample_photos`, any COCO set, or a plain folder.

The sample makes every stage run on a fresh clone: its `calibration` split gives the convert
stage's example photo (and self-test vectors), its `validation` split (held out) the validate
stage's photos. Larger sets are options (`--images DIR [--annotations FILE]`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_photos"
SampleSplit = Literal["calibration", "validation"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 50_000_000
"""Larger photos are refused before decoding (a decompression bomb costs gigabytes): 50 MP is
above any phone camera's JPEG and far under PIL's own 179 MP hard limit."""


def sample_dir(split: SampleSplit) -> Path:
    return SAMPLE_DIR / split


def load_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grayscale and RGBA photos are converted); one line naming a bad file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise PipelineError(
                        f"image {path} is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (a decompression bomb or an unusually large photo); "
                        "downscale it first"
                    )
                return np.asarray(image.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PipelineError(f"image {path} is refused as a decompression bomb: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise PipelineError(f"cannot read image {path}: {error}") from None


def list_images(folder: Path, warn_skipped: bool = False) -> list[Path]:
    """Image files in a folder, recursively, sorted so every run sees the same order.

    Files without an image suffix are skipped (with one warning line each when asked)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"image folder not found: {folder}")
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif warn_skipped and not path.name.startswith("."):
            log.warning("skipping %s: not an image (expected one of %s)", path, ", ".join(IMAGE_SUFFIXES))
    return images


@dataclass(frozen=True)
class Instance:
    annotation_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h
    mask: np.ndarray  # HxW bool


class Photos(Protocol):
    """What the stages read from a photo set: ids, pixels, and ground truth when there is some."""

    has_ground_truth: bool

    def image_ids(self) -> list[int]: ...

    def image_path(self, image_id: int) -> Path: ...

    def image(self, image_id: int) -> np.ndarray: ...

    def instances(self, image_id: int) -> list[Instance]: ...

    def describe(self) -> str: ...


class CocoPhotos:
    """A folder of images with a COCO instances file; masks decoded by pycocotools."""

    has_ground_truth = True

    def __init__(self, images: Path, annotations: Path) -> None:
        self.images_dir = Path(images)
        self.annotations = Path(annotations)
        if not self.images_dir.is_dir():
            raise PipelineError(f"image folder not found: {self.images_dir}")
        if not self.annotations.is_file():
            raise PipelineError(f"annotations file not found: {self.annotations} (expected a COCO instances JSON)")

    @classmethod
    def sample(cls, split: SampleSplit) -> CocoPhotos:
        """The photos shipped with the project (see pipeline/sample_photos/README.md)."""
        root = sample_dir(split)
        return cls(root / "images", root / "instances.json")

    @cached_property
    def coco(self):  # pycocotools.coco.COCO
        from pycocotools.coco import COCO

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(str(self.annotations))
        except Exception as error:  # pycocotools raises bare AssertionError/KeyError/JSONDecodeError
            raise PipelineError(
                f"{self.annotations} is not a COCO instances file ({type(error).__name__}: {error})"
            ) from None

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

    def describe(self) -> str:
        return f"{self.images_dir} with ground truth {self.annotations}"


class FolderPhotos:
    """A user's own photos, no ground truth: ids are positions in the sorted file list."""

    has_ground_truth = False

    def __init__(self, images: Path) -> None:
        self.images_dir = Path(images)
        self.paths = list_images(self.images_dir, warn_skipped=True)
        if not self.paths:
            raise PipelineError(
                f"no images in {self.images_dir} (expected files ending in {', '.join(IMAGE_SUFFIXES)})"
            )

    def image_ids(self) -> list[int]:
        return list(range(len(self.paths)))

    def image_path(self, image_id: int) -> Path:
        return self.paths[image_id]

    def image(self, image_id: int) -> np.ndarray:
        return load_rgb(self.paths[image_id])

    def instances(self, image_id: int) -> list[Instance]:
        return []

    def describe(self) -> str:
        return f"{self.images_dir} (no ground truth)"


def photos_from_options(images: Path | None, annotations: Path | None, default: SampleSplit) -> Photos:
    """`--images [--annotations]`, or the shipped sample's split when neither is given."""
    if images is None:
        if annotations is not None:
            raise PipelineError("--annotations needs --images (the folder its file names refer to)")
        return CocoPhotos.sample(default)
    return CocoPhotos(images, annotations) if annotations is not None else FolderPhotos(images)
