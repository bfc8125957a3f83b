"""Throughput of the distill stage on this machine: teacher caching and student training steps.

Prints images/s for the teacher encoder (embedding cache) and for a full student training step
(forward, MSE, backward, AdamW) at the given image size, and what that means for the paper's
run: 1% of SA-1B (about 110k images) cached once, then 8 epochs of training.

    PYTHONPATH=. python benchmarks/distill_throughput.py [--teacher vit_h] [--size 1024] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from distillation.models import build_student, load_teacher

PAPER_IMAGES = 110_000  # 1% of SA-1B's 11M images
PAPER_EPOCHS = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(run, batch: int, repeats: int, device: torch.device) -> float:
    run()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)

    teacher, _, _ = load_teacher(args.teacher, None, args.size, seed=0)
    encoder = teacher.image_encoder.to(device)

    def cache_step() -> None:
        with torch.no_grad(), autocast:
            encoder(images)

    cache_rate = images_per_second(cache_step, args.batch, args.repeats, device)

    student = build_student("tiny_vit", args.size, seed=0).to(device).train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    target = torch.randn(args.batch, 256, args.size // 16, args.size // 16, device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            prediction = student(images)
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
        optimizer.step()

    train_rate = images_per_second(train_step, args.batch, args.repeats, device)
    cache_hours = PAPER_IMAGES / cache_rate / 3600
    train_hours = PAPER_IMAGES * PAPER_EPOCHS / train_rate / 3600
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; image size {args.size}; batch {args.batch}")
    print(f"teacher {args.teacher} embedding cache: {cache_rate:.3f} images/s")
    print(f"student TinyViT training step: {train_rate:.3f} images/s")
    print(
        f"paper run (1% SA-1B = {PAPER_IMAGES} images, {PAPER_EPOCHS} epochs) on this device: cache "
        f"{cache_hours:.1f} h + training {train_hours:.1f} h = {cache_hours + train_hours:.1f} h"
    )


if __name__ == "__main__":
    main()
