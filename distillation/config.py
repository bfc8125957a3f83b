"""The distill run's configuration: teacher, images, cache, student, optimisation, checkpoints.

Read from TOML (`[distill]` keys are DistillConfig's fields, all optional) and overridden by
command-line options. The defaults are the paper's recipe (MSE on the teacher's 256x64x64
embeddings, AdamW, 8 epochs) at 1024; `distillation/configs/smoke.toml` is the short CPU run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline.config import read_toml_table
from pipeline.errors import ConfigError
from pipeline.model import TEACHER_TYPES
from pipeline.records import STRICT, one_line_errors

STUDENT_DEFAULT = "tiny_vit"


@dataclass(frozen=True, config=STRICT)
class DistillConfig:
    teacher_type: str = "vit_h"
    teacher_checkpoint: Path | None = Field(default=None, strict=False)
    """Official SAM checkpoint; without one, a seeded random teacher (a smoke run, said plainly)."""
    images: Path | None = Field(default=None, strict=False)
    """A folder of images (recursive) or of SA-1B `sa_*.tar` files; default: the 13 sample photos shipped
    in pipeline/sample_photos (calibration/ then validation/, so held_out = 4 holds out the validation split)."""
    max_images: int | None = None
    held_out: int = 8
    """The last images (sorted order) are never trained on; the evaluation uses them."""
    image_size: int = 1024
    """1024 with a real teacher; smaller sizes only for random-teacher smoke runs."""
    out_dir: Path = Field(default=Path("distill_out"), strict=False)
    cache_dtype: str = "float16"
    shard_size: int = 64
    student: str = STUDENT_DEFAULT
    """`tiny_vit` (MobileSAM's TinyViT-5M, official layout) or any timm backbone name (+ a neck)."""
    epochs: int = 8
    batch_size: int = 8
    accumulation: int = 1
    """Micro-batches per rank per step: batch_size = world_size * accumulation * micro-batch."""
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    checkpoint_every: int = 50
    seed: int = 0
    mixed_precision: str = "auto"
    """auto: bf16 autocast on GPU, none on CPU; or "bf16", "fp16", "none"."""
    eval_prompts_per_image: int = 4
    loader_workers: int = 4
    """DataLoader worker processes per rank decoding photos and reading embeddings (0: in the
    training process). The weights do not depend on it."""
    process_group_timeout_minutes: float = 60.0
    """How long a rank waits for the others (torchrun): a teacher cache shard or a checkpoint
    must take less."""
    _errors = one_line_errors("distill config key ", ConfigError)

    def __post_init__(self) -> None:
        if self.teacher_type not in TEACHER_TYPES:
            raise ConfigError(f"teacher_type {self.teacher_type!r}; expected one of {', '.join(TEACHER_TYPES)}")
        if self.image_size % 16 or not 64 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be a multiple of 16 in 64..1024, got {self.image_size}")
        if self.teacher_checkpoint is not None and self.image_size != 1024:
            raise ConfigError(
                f"a real teacher runs at 1024 (its position embeddings), got image_size {self.image_size}"
            )
        if self.cache_dtype not in ("float16", "float32"):
            raise ConfigError(f"cache_dtype must be float16 or float32, got {self.cache_dtype!r}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "none"):
            raise ConfigError(f"mixed_precision must be auto, bf16, fp16 or none, got {self.mixed_precision!r}")
        for name in ("epochs", "batch_size", "accumulation", "shard_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.loader_workers < 0:
            raise ConfigError(f"loader_workers must be 0 or more, got {self.loader_workers}")
        if not self.process_group_timeout_minutes > 0:
            raise ConfigError(
                f"process_group_timeout_minutes must be positive, got {self.process_group_timeout_minutes}"
            )
        if self.held_out < 1:
            raise ConfigError(f"held_out must be at least 1 (the evaluation needs images), got {self.held_out}")

    @property
    def random_teacher(self) -> bool:
        return self.teacher_checkpoint is None

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


_PATHS = {"teacher_checkpoint", "images", "out_dir"}


def load_distill_config(path: Path | None, **overrides: Any) -> DistillConfig:
    """A `[distill]` table (or top-level keys) from TOML, then the command line's overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_toml_table(path, {f.name for f in fields(DistillConfig)}, table="distill")
        for key in _PATHS & set(raw):
            if not isinstance(raw[key], str):
                raise ConfigError(f"{path}: {key} must be a path string, got {type(raw[key]).__name__} {raw[key]!r}")
        raw = {k: (Path(os.path.normpath(path.parent / v)) if k in _PATHS and v else v) for k, v in raw.items()}
    config = DistillConfig(**raw)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
