"""Throughput of the distill stage: how it scales over processes, and what the paper's run costs.

1. Scaling (the real CLI under torchrun, gloo, one thread per process): the teacher cache and
   the training steps with 1 and 2 processes on `--scaling-photos` photos (the shipped sample
   repeated under other names: content-defined shards of unequal sizes), seeded random ViT-B
   teacher at `--scaling-size`; each rank's photo count from the cache report. Ratios of wall
   times (cache phase as the command reports it, and the whole command with start-up).
2. Per-image rates at 1024 (the paper's size) on `--device`: the teacher's embedding and a full
   student training step (forward, MSE, backward, AdamW; bf16 autocast on a GPU).
3. The paper's run (1% of SA-1B, about 110k photos, 8 epochs) extrapolated from 2 with the
   scaling efficiency of 1.

    PYTHONPATH=. python benchmarks/distill_throughput.py [--out DIR] [--teacher vit_h] [--device cuda]
        [--scaling-photos 125] [--scaling-size 256] [--cache-only]

Writes DIR/distill_throughput.json and .md (default benchmarks/out/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distillation.models import build_student, load_teacher
from pipeline.datasets import SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
PAPER_IMAGES = 110_000  # 1% of SA-1B's 11M images
PAPER_EPOCHS = 8
SMOKE_CONFIG = REPO / "distillation" / "configs" / "smoke.toml"


@dataclass(frozen=True)
class ScalingRun:
    phase: str
    processes: int
    phase_seconds: float
    command_seconds: float
    images: int
    photos_per_rank: tuple[int, ...] = ()

    @property
    def images_per_second(self) -> float:
        return self.images / self.phase_seconds


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(processes: int, arguments: list[str]) -> float:
    """Run `python -m distillation ...` (under torchrun for several processes); its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={_free_port()}"]
    command = [sys.executable, *launcher, "-m", "distillation", *arguments]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - start


def photo_folder(folder: Path, count: int) -> Path:
    """`count` photos: the shipped sample photos (both splits) repeated under other names, so the
    content-defined shards come out of unequal sizes as they do on a real set."""
    shipped = sorted(p for split in ("calibration", "validation") for p in (SAMPLE_DIR / split / "images").iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        source = shipped[number % len(shipped)]
        (folder / f"photo_{number:05d}{source.suffix}").symlink_to(source.resolve())
    return folder


def scaling(
    work: Path, size: int, epochs: int, photos: int, with_training: bool, shard_size: int | None = None
) -> list[ScalingRun]:
    runs = []
    images = photo_folder(work / "photos", photos)
    common = ["--config", str(SMOKE_CONFIG), "--image-size", str(size), "--images", str(images)]
    common += ["--shard-size", str(shard_size)] if shard_size else []
    for processes in (1, 2):
        out, cache = work / f"p{processes}", work / f"p{processes}" / "cache"
        seconds = _cli(processes, ["cache", *common, "--out", str(out), "--cache-dir", str(cache)])
        report = json.loads((out / "cache_report.json").read_text())
        shares = tuple(rank["photos"] for rank in report["ranks"])
        runs.append(ScalingRun("teacher cache", processes, report["seconds"], seconds, report["computed"], shares))
        if not with_training:
            continue
        arguments = ["run", *common, "--out", str(out), "--cache-dir", str(cache), "--no-eval", "--epochs", str(epochs)]
        arguments += ["--batch-size", "4", "--accumulation", str(2 // processes), "--loader-workers", "1"]
        seconds = _cli(processes, arguments)
        training = json.loads((out / "distill_report.json").read_text())["training"]
        trained = (training["steps"] - training["resumed_from_step"]) * 4
        runs.append(ScalingRun("training", processes, training["seconds"], seconds, trained))
    return runs


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


def paper_size_rates(teacher_type: str, size: int, batch: int, repeats: int, device: torch.device) -> dict:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    images = torch.randn(batch, 3, size, size, device=device)
    teacher, _, _ = load_teacher(teacher_type, None, size, seed=0)
    encoder = teacher.image_encoder.to(device)

    def cache_step() -> None:
        with torch.no_grad(), autocast:
            encoder(images)

    cache_rate = images_per_second(cache_step, batch, repeats, device)
    student = build_student("tiny_vit", size, seed=0).to(device).train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    target = torch.randn(batch, 256, size // 16, size // 16, device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            prediction = student(images)
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
        optimizer.step()

    train_rate = images_per_second(train_step, batch, repeats, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": where, "size": size, "teacher": teacher_type, "cache_rate": cache_rate, "train_rate": train_rate}


def paper_hours(cache_rate: float, train_rate: float, processes: int, cache_eff: float, train_eff: float) -> dict:
    cache = PAPER_IMAGES / (cache_rate * processes * cache_eff) / 3600
    train = PAPER_IMAGES * PAPER_EPOCHS / (train_rate * processes * train_eff) / 3600
    return {"processes": processes, "cache_hours": cache, "train_hours": train, "total_hours": cache + train}


def markdown(runs: list[ScalingRun], ratios: dict, rates: dict | None, extrapolation: list[dict], size: int) -> str:
    lines = [
        "# Distill throughput",
        "",
        f"## Scaling: `torchrun -m distillation`, gloo, 1 thread per process, ViT-B teacher at {size} px",
        "",
        "| phase | processes | images | photos per rank | phase s | images/s | command s (with start-up) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.phase} | {r.processes} | {r.images} | {' / '.join(map(str, r.photos_per_rank)) or '-'} "
        f"| {r.phase_seconds:.1f} | {r.images_per_second:.2f} | {r.command_seconds:.1f} |"
        for r in runs
    ]
    lines += ["", "2 processes / 1 process, wall time (goal for the cache, whole command: <= 0.65x):", ""]
    lines += [f"- {phase}: **{value:.2f}x**" for phase, value in ratios.items()]
    if rates is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"## Per-image rates at {rates['size']} px on {rates['device']}",
        "",
        f"- teacher {rates['teacher']} embedding: {rates['cache_rate']:.3f} images/s",
        f"- TinyViT training step: {rates['train_rate']:.3f} images/s",
        "",
        f"## The paper's run ({PAPER_IMAGES} photos cached once, {PAPER_EPOCHS} epochs), extrapolated",
        "",
        "| processes like this one | cache h | training h | total h |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {e['processes']} | {e['cache_hours']:.1f} | {e['train_hours']:.1f} | {e['total_hours']:.1f} |"
        for e in extrapolation
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--teacher", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--size", type=int, default=1024, help="image size of the per-image rates")
    parser.add_argument("--scaling-size", type=int, default=512, help="image size of the scaling runs")
    parser.add_argument("--scaling-photos", type=int, default=125, help="photos of the scaling runs (sample repeated)")
    parser.add_argument("--scaling-epochs", type=int, default=2)
    parser.add_argument("--cache-only", action="store_true", help="the teacher cache's scaling alone")
    parser.add_argument("--scaling-shard-size", type=int, help="teacher cache shard size (default: the config's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill_scaling_") as work:
        runs = scaling(
            Path(work),
            args.scaling_size,
            args.scaling_epochs,
            args.scaling_photos,
            not args.cache_only,
            args.scaling_shard_size,
        )
    by = {(r.phase, r.processes): r for r in runs}
    phases = ("teacher cache",) if args.cache_only else ("teacher cache", "training")
    ratios = {phase: by[(phase, 2)].phase_seconds / by[(phase, 1)].phase_seconds for phase in phases}
    ratios["teacher cache, whole command"] = (
        by[("teacher cache", 2)].command_seconds / by[("teacher cache", 1)].command_seconds
    )
    payload: dict = {
        "scaling": [{**asdict(r), "images_per_second": r.images_per_second} for r in runs],
        "ratios_two_over_one": ratios,
    }
    rates, extrapolation = None, []
    if not args.cache_only:
        rates = paper_size_rates(args.teacher, args.size, args.batch, args.repeats, torch.device(args.device))
        cache_eff, train_eff = 0.5 / ratios["teacher cache"], 0.5 / ratios["training"]
        extrapolation = [paper_hours(rates["cache_rate"], rates["train_rate"], 1, 1.0, 1.0)]
        extrapolation += [
            paper_hours(rates["cache_rate"], rates["train_rate"], n, cache_eff, train_eff) for n in (2, 8)
        ]
        payload |= {
            "scaling_efficiency": {"teacher cache": cache_eff, "training": train_eff},
            "per_image_rates": rates,
            "paper_run": extrapolation,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill_throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(runs, ratios, rates, extrapolation, args.scaling_size)
    (args.out / "distill_throughput.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'distill_throughput.json'} and {args.out / 'distill_throughput.md'}")


if __name__ == "__main__":
    main()
