"""Training images: plain folders and SA-1B's layout, prepared exactly as SAM's encoder expects.

SA-1B ships as `sa_000000.tar`, ... each holding `sa_<id>.jpg` with `sa_<id>.json`; extracted,
the same pairs sit in folders. Both are read here (the JSON masks are not needed: decoupled
distillation only uses the images). Every image gets a stable key (relative path, or
`tarname/member`) so the teacher cache and the training order never depend on file system order.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.contract import PIXEL_MEAN, PIXEL_STD
from pipeline.datasets import IMAGE_SUFFIXES, SAMPLE_DIR
from pipeline.errors import PipelineError
from pipeline.processing import prepare_image


@dataclass(frozen=True)
class ImageSource:
    key: str
    path: Path
    member: str | None = None
    """Member name inside the tar at `path` (SA-1B tars); None for a plain file."""
    offset: int = 0
    size: int | None = None
    """Where a tar member's bytes lie: read directly, since reopening a tar of thousands of
    members to find one by name scans the whole archive on every image of every epoch."""

    def read_rgb(self) -> np.ndarray:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read() if self.size is None else handle.read(self.size)
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise PipelineError(f"cannot read image {self.key}: {error}") from None


def discover_images(root: Path | None) -> list[ImageSource]:
    """Images under `root`, sorted by key: SA-1B tars if there are any, else image files."""
    root = Path(root) if root is not None else SAMPLE_DIR  # calibration/ sorts before validation/
    if not root.is_dir():
        raise PipelineError(f"image folder not found: {root}")
    tars = sorted(root.rglob("sa_*.tar"))
    sources: list[ImageSource] = []
    for tar in tars:
        try:
            with tarfile.open(tar) as archive:
                members = [m for m in archive.getmembers() if m.isfile() and _is_image(m.name)]
        except tarfile.TarError as error:
            raise PipelineError(f"{tar} is not a readable SA-1B tar: {error}") from None
        sources += [
            ImageSource(f"{tar.relative_to(root)}/{m.name}", tar, m.name, m.offset_data, m.size) for m in members
        ]
    if not tars:
        sources = [ImageSource(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if _is_image(p.name)]
    if not sources:
        raise PipelineError(f"no images under {root} (expected {', '.join(IMAGE_SUFFIXES)} files or SA-1B sa_*.tar)")
    return sorted(sources, key=lambda s: s.key)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def prepare_for_encoder(image: np.ndarray, image_size: int) -> torch.Tensor:
    """3xSxS float32 as SAM's encoders take it: the contract's mean-padded image, normalized
    (padding becomes exactly 0, as in SamPredictor)."""
    pixels = torch.from_numpy(prepare_image(image, image_size).image[0])
    return (pixels - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)


def split_held_out(sources: list[ImageSource], held_out: int) -> tuple[list[ImageSource], list[ImageSource]]:
    if len(sources) <= held_out:
        raise PipelineError(f"{len(sources)} images leave none to train on with held_out={held_out}")
    return sources[:-held_out], sources[-held_out:]


def image_list_digest(sources: list[ImageSource]) -> str:
    """sha256 of the ordered image keys (with tar offsets): the data a resumed run must see again."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.key}\0{source.offset}\0{source.size}\n".encode())
    return digest.hexdigest()
