"""`python -m distillation [cache|verify|run] --config FILE [options]` (also under `torchrun`).

cache:  the teacher's embeddings of every image, each rank a share of the shards (resumable);
        writes `<out>/cache_report.json`.
verify: hash every shard of the cache against the sha256 recorded when it was written.
run:    cache, then train the student, evaluate it on held-out images before and after, and write
        `<out>/mobile_sam.pt` (official layout) and `<out>/distill_report.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from distillation.config import DistillConfig, load_distill_config
from distillation.data import discover_images, split_held_out
from distillation.evaluate import evaluate_student
from distillation.models import assemble_mobile_sam, build_student, load_teacher
from distillation.teacher_cache import build_teacher_cache, load_teacher_cache, verify_teacher_cache
from distillation.train import all_gather, init_world, train_student
from pipeline.checkpoints import save_checkpoint
from pipeline.cli import run_main, setup_logging
from pipeline.errors import PipelineError
from pipeline.files import atomic_write_json

log = logging.getLogger("distillation")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distillation", description=__doc__)
    parser.add_argument("command", choices=("cache", "verify", "run"))
    parser.add_argument("--config", type=Path, help="TOML with a [distill] table (see distillation/config.py)")
    parser.add_argument("--teacher-checkpoint", type=Path, help="official SAM checkpoint (sam_vit_h_4b8939.pth, ...)")
    parser.add_argument("--teacher-type", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--images", type=Path, help="image folder or folder of SA-1B sa_*.tar files")
    parser.add_argument("--out", dest="out_dir", type=Path)
    parser.add_argument("--cache-dir", type=Path, help="teacher cache folder (default <out>/teacher_cache)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--accumulation", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--image-size", type=int, help="1024 with a real teacher; smaller for smoke runs")
    parser.add_argument("--shard-size", type=int)
    parser.add_argument("--loader-workers", type=int, help="DataLoader worker processes per rank")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (tests)")
    return parser


def _config(args: argparse.Namespace) -> DistillConfig:
    overrides = {
        key: getattr(args, key)
        for key in (
            "teacher_checkpoint",
            "teacher_type",
            "images",
            "out_dir",
            "epochs",
            "batch_size",
            "accumulation",
            "checkpoint_every",
            "max_images",
            "image_size",
            "shard_size",
            "loader_workers",
        )
    }
    return load_distill_config(args.config, **overrides)


def main() -> int:
    args = _parser().parse_args()
    setup_logging()
    config = _config(args)
    world = init_world(config.process_group_timeout_minutes)
    gather = all_gather(world)
    out = Path(config.out_dir)
    cache_dir = args.cache_dir or out / "teacher_cache"
    if args.command == "verify":
        _verify(cache_dir, world.rank, world.size, gather)
        _finish(world)
        return 0
    if config.random_teacher and world.is_main:
        log.warning(
            "SMOKE RUN: no teacher checkpoint, so the teacher is SAM %s with seeded random weights (seed %d) at "
            "%d px. The student learns to imitate a random network: the numbers test the machinery, not "
            "segmentation quality. Pass --teacher-checkpoint for a real distillation.",
            config.teacher_type,
            config.seed,
            config.image_size,
        )
    sources = discover_images(config.images)[: config.max_images]
    train_sources, held_out = split_held_out(sources, config.held_out)
    teacher, teacher_description, teacher_sha256 = load_teacher(
        config.teacher_type, config.teacher_checkpoint, config.image_size, config.seed
    )
    gather(None)  # every rank has its teacher: the cache's wall time is the embedding work alone
    cache = build_teacher_cache(
        teacher.image_encoder,
        teacher_description,
        sources,
        cache_dir,
        config.image_size,
        config.cache_dtype,
        config.shard_size,
        device=str(world.device),
        rank=world.rank,
        world_size=world.size,
        gather=gather,
    )
    if world.is_main:
        print(
            f"teacher cache {cache.folder}: {cache.computed} computed, {cache.reused} reused in {cache.seconds:.1f} s "
            f"by {cache.world_size} process(es) ({cache.images_per_second:.2f} images/s)"
        )
        for work in cache.ranks:
            print(f"  rank {work.rank}: {work.photos} photos embedded, busy {work.busy_seconds:.1f} s")
    if args.command == "cache":
        if world.is_main:
            atomic_write_json(out / "cache_report.json", cache.to_json())
        _finish(world)
        return 0
    targets = load_teacher_cache(cache_dir)
    student = build_student(config.student, config.image_size, config.seed)
    report: dict = {
        "config": config.to_json(),
        "teacher": teacher_description,
        "random_teacher": config.random_teacher,
        "train_images": len(train_sources),
        "held_out_images": [s.key for s in held_out],
    }
    report["cache"] = cache.to_json()
    evaluate = world.is_main and not args.no_eval
    if evaluate:
        report["before"] = evaluate_student(
            student, teacher, held_out, targets, config.image_size, config.eval_prompts_per_image
        )
    report["training"] = train_student(
        student, train_sources, targets, config, out, world, teacher_sha256=teacher_sha256
    )
    student = student.cpu().eval()
    if world.is_main:
        if evaluate:
            report["after"] = evaluate_student(
                student, teacher, held_out, targets, config.image_size, config.eval_prompts_per_image
            )
        if config.student == "tiny_vit":
            path = out / "mobile_sam.pt"
            report["checkpoint"] = {
                "path": str(path),
                "sha256": save_checkpoint(assemble_mobile_sam(student, teacher), "vit_t", path),
            }
            print(f"wrote {path} (official mobile_sam.pt layout: load with --checkpoint {path})")
        atomic_write_json(out / "distill_report.json", report)
        _print_summary(report)
    _finish(world)
    return 0


def _finish(world) -> None:
    if world.size > 1:
        dist.barrier()
        dist.destroy_process_group()


def _verify(cache_dir: Path, rank: int, world_size: int, gather) -> None:
    bad = verify_teacher_cache(cache_dir, rank, world_size, gather)
    if bad:
        raise PipelineError(
            f"{len(bad)} teacher cache shard(s) in {cache_dir} are missing or damaged ({', '.join(bad[:5])}); "
            "rerun `python -m distillation cache` to recompute them"
        )
    if rank == 0:
        print(f"teacher cache {cache_dir}: every shard matches its sha256")


def _print_summary(report: dict) -> None:
    training = report["training"]
    steps = training["steps"] - training["resumed_from_step"]
    print(
        f"trained {steps} steps ({training['world_size']} process(es)), {training['images_per_second']:.2f} "
        f"images/s; loss {training['first_loss']:.4f} -> {training['last_loss']:.4f}"
    )
    if "before" in report:
        before, after = report["before"], report["after"]
        print(
            f"held-out embedding MSE {before['embedding_mse']:.4f} -> {after['embedding_mse']:.4f} "
            f"({after['embedding_mse'] / before['embedding_mse']:.2f}x) on {after['images']} images"
        )
        for kind, values in after["mask_iou_vs_teacher"].items():
            print(
                f"mask IoU vs teacher ({kind}, {values['count']} prompts): "
                f"{before['mask_iou_vs_teacher'][kind]['mean']:.3f} -> {values['mean']:.3f}"
            )
    print(json.dumps({"random_teacher": report["random_teacher"], "teacher": report["teacher"]}))


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
