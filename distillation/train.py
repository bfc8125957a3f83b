"""Student training: MSE to the teacher's cached embeddings, AdamW, warm-up + cosine schedule.

Runs as one process or under `torchrun` with DistributedDataParallel (nccl on GPUs, gloo on
CPU). Every step consumes one global batch in a fixed order (a permutation seeded by
seed + epoch), split into world_size x accumulation micro-batches; rank r runs micro-batches
r*A .. r*A+A-1. So 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the same micro-batches
and average the same gradients: the model does not depend on how the work is spread.

BatchNorm (TinyViT's convolutional stages) normalises each micro-batch with its own statistics,
as DDP without SyncBatchNorm does; its running statistics are averaged over all micro-batches of
the step (not rank 0's alone, DDP's default), which a single process reproduces exactly.

Input pipeline: a DataLoader whose batch sampler yields this rank's micro-batches step after step
(`StepBatches`), so worker processes decode photos and read embeddings ahead of the step while
the order stays the pure function of the step above: with or without workers, the same weights.

Fault tolerance: every `checkpoint_every` steps rank 0 writes `train_state.pt` atomically
(student, optimizer, schedule, step). A restarted run resumes from it and, the data order being a
function of the step, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from distillation.config import DistillConfig
from distillation.data import ImageSource, image_list_digest, prepare_for_encoder
from pipeline.errors import ConfigError, PipelineError
from pipeline.files import atomic_write_bytes

log = logging.getLogger(__name__)
STATE_NAME = "train_state.pt"
STUDENT_NAME = "student_encoder.pt"


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(timeout_minutes: float = 60.0) -> World:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process. `timeout_minutes`
    bounds every collective (a barrier waits at most that long for the slowest rank)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank() if size > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return World(rank, size, device)


def learning_rate_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def micro_batches(config: DistillConfig, count: int, step: int, world: World, steps_per_epoch: int) -> list[list[int]]:
    """Indices of this rank's micro-batches for a global step (a pure function of the step)."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    batch = order[position * config.batch_size : (position + 1) * config.batch_size]
    size = config.batch_size // (world.size * config.accumulation)
    first = world.rank * config.accumulation
    return [batch[(first + i) * size : (first + i + 1) * size] for i in range(config.accumulation)]


def all_gather(world: World):
    """A gather of one picklable object per rank (what the teacher cache needs to merge records)."""

    def gather(value: object) -> list:
        if world.size == 1:
            return [value]
        parts: list = [None] * world.size
        dist.all_gather_object(parts, value)
        return parts

    return gather


class DistillSamples(Dataset):
    """(prepared photo, teacher embedding as float32) by position in the training list."""

    def __init__(self, sources: list[ImageSource], targets: Mapping[str, torch.Tensor], image_size: int) -> None:
        self.sources, self.targets, self.image_size = sources, targets, image_size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.sources[index]
        return prepare_for_encoder(source.read_rgb(), self.image_size), self.targets[source.key].float()


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches for steps `first_step` .. `total_steps - 1`, in training order."""

    def __init__(self, config: DistillConfig, count: int, world: World, first_step: int, total_steps: int) -> None:
        self.config, self.count, self.world = config, count, world
        self.first_step, self.total_steps = first_step, total_steps
        self.steps_per_epoch = count // config.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step, self.total_steps):
            yield from micro_batches(self.config, self.count, step, self.world, self.steps_per_epoch)

    def __len__(self) -> int:
        return (self.total_steps - self.first_step) * self.config.accumulation


def _loader(
    sources: list[ImageSource],
    targets: Mapping[str, torch.Tensor],
    config: DistillConfig,
    world: World,
    first_step: int,
    total_steps: int,
) -> DataLoader:
    return DataLoader(
        DistillSamples(sources, targets, config.image_size),
        batch_sampler=StepBatches(config, len(sources), world, first_step, total_steps),
        num_workers=config.loader_workers,
        pin_memory=world.device.type == "cuda",
    )


def _batch_norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        buffer
        for module in model.modules()
        if isinstance(module, _BatchNorm)
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]


def _autocast(config: DistillConfig, device: torch.device) -> Any:
    mode = config.mixed_precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


IDENTITY_FIELDS = (
    "teacher_type",
    "student",
    "image_size",
    "cache_dtype",
    "epochs",
    "batch_size",
    "accumulation",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "seed",
    "mixed_precision",
)
"""Every config field that changes the trained weights (with the teacher's checkpoint sha256 and the
image list's digest, which stand for teacher_checkpoint, images, max_images and held_out)."""
NOT_IN_IDENTITY = (
    "teacher_checkpoint",
    "images",
    "max_images",
    "held_out",
    "out_dir",
    "shard_size",
    "checkpoint_every",
    "eval_prompts_per_image",
    "loader_workers",
    "process_group_timeout_minutes",
)
"""Fields that do not change the weights by themselves: paths and counts that the sha256 and the
image digest stand for, where files go, how often a state is saved, the evaluation, and how the
work is spread (loader workers, collective timeout)."""


def state_identity(config: DistillConfig, sources: list[ImageSource], teacher_sha256: str | None) -> dict[str, Any]:
    """What a saved state must agree on to be resumed: the teacher (type, checkpoint sha256 or
    random seed), the training images (count and a digest of the ordered list) and the schedule."""
    return {
        **{k: getattr(config, k) for k in IDENTITY_FIELDS},
        "teacher_sha256": teacher_sha256,
        "train_images": len(sources),
        "train_images_sha256": image_list_digest(sources),
    }


def train_student(
    student: nn.Module,
    sources: list[ImageSource],
    targets: Mapping[str, torch.Tensor],
    config: DistillConfig,
    out_dir: Path,
    world: World | None = None,
    stop_after_steps: int | None = None,
    teacher_sha256: str | None = None,
) -> dict[str, Any]:
    """Train `student` in place; returns a summary (steps, losses, images/s).

    `teacher_sha256` (None for a random teacher, whose seed is in the config) is part of the
    identity a saved state must match to be resumed."""
    world = world or init_world()
    out_dir = Path(out_dir)
    if config.batch_size % (world.size * config.accumulation):
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by world_size {world.size} x accumulation "
            f"{config.accumulation}"
        )
    missing = [s.key for s in sources if s.key not in targets]
    if missing:
        raise PipelineError(f"{len(missing)} training images have no teacher embedding (first: {missing[0]})")
    steps_per_epoch = len(sources) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {len(sources)} training images")
    total_steps = steps_per_epoch * config.epochs
    student = student.to(world.device).train()
    model: nn.Module = student
    if world.size > 1:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(student, device_ids=device_ids, broadcast_buffers=False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(enabled=config.mixed_precision == "fp16" and world.device.type == "cuda")
    identity = state_identity(config, sources, teacher_sha256)
    step = _resume(out_dir / STATE_NAME, identity, student, optimizer, schedule, world)
    losses: list[float] = []
    start_step, start_time = step, time.perf_counter()
    progress = tqdm(
        total=total_steps, initial=step, desc="distill", unit="step", disable=not world.is_main, dynamic_ncols=True
    )
    buffers = _batch_norm_buffers(student)
    batches = iter(_loader(sources, targets, config, world, step, total_steps))
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        before = [b.clone() for b in buffers]
        after = [torch.zeros_like(b, dtype=torch.float64) for b in buffers]
        step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
        micro = [next(batches) for _ in range(config.accumulation)]
        for index, (images, target) in enumerate(micro):
            for buffer, saved in zip(buffers, before, strict=True):
                buffer.copy_(saved)
            target = target.to(world.device)
            last = index == len(micro) - 1
            sync = contextlib.nullcontext() if last or world.size == 1 else model.no_sync()
            with sync:
                with _autocast(config, world.device):
                    prediction = model(images.to(world.device))
                loss = nn.functional.mse_loss(prediction.float(), target) / len(micro)
                scaler.scale(loss).backward()
            step_loss += loss.detach().double()
            for total, buffer in zip(after, buffers, strict=True):
                total += buffer.double() / len(micro)
        if world.size > 1:
            for total in after:
                dist.all_reduce(total)
                total /= world.size
            dist.all_reduce(step_loss)
            step_loss /= world.size
        for buffer, total in zip(buffers, after, strict=True):
            buffer.copy_(total.round() if not buffer.is_floating_point() else total)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        step += 1
        losses.append(float(step_loss))
        elapsed = time.perf_counter() - start_time
        progress.update(1)
        progress.set_postfix(
            loss=f"{losses[-1]:.4f}", img_s=f"{(step - start_step) * config.batch_size / max(elapsed, 1e-9):.2f}"
        )
        if step % config.checkpoint_every == 0 or step == total_steps:
            _save_state(out_dir / STATE_NAME, identity, student, optimizer, schedule, step, world)
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
            break
    del batches  # stops the workers
    progress.close()
    elapsed = time.perf_counter() - start_time
    if world.is_main:
        atomic_write_bytes(out_dir / STUDENT_NAME, _to_bytes(student.state_dict()))
    return {
        "steps": step,
        "total_steps": total_steps,
        "resumed_from_step": start_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "seconds": elapsed,
        "images_per_second": (step - start_step) * config.batch_size / elapsed if elapsed else None,
        "world_size": world.size,
    }


def _to_bytes(payload: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _save_state(
    path: Path,
    identity: dict,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    step: int,
    world: World,
) -> None:
    if world.is_main:
        state = {
            "identity": identity,
            "step": step,
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        }
        atomic_write_bytes(path, _to_bytes(state))
    if world.size > 1:
        dist.barrier()


def _resume(
    path: Path, identity: dict, student: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, world: World
) -> int:
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location=world.device, weights_only=True)
    except Exception as error:  # an unreadable state is reported, never silently replaced
        raise PipelineError(f"cannot resume from {path}: {error}; delete it to start over") from None
    if state.get("identity") != identity:
        raise PipelineError(
            f"{path} belongs to a different run ({json.dumps(state.get('identity'))}); "
            "use another --out or delete it to start over"
        )
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if world.is_main:
        log.info("resuming from %s at step %d", path, state["step"])
    return int(state["step"])
