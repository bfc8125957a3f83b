"""`python -m validation [--out DIR] [--quick] [--config FILE] [--checkpoint PATH] [--images DIR [--annotations FILE]]
[--teacher-checkpoint PATH [--teacher-type vit_h]]`

Exits 1, naming each failure, when a run cannot be validated, a conversion failed, or a file or a
pair of files is missing, unloadable, non-finite or below its gate; 2 on bad input. The reports
are written either way.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from mobile_targets import check_target_options
from pipeline.cli import exit_status, positive, run_main, setup_logging
from pipeline.config import add_run_arguments, config_from_args
from pipeline.datasets import photos_from_options
from pipeline.errors import one_line
from pipeline.files import atomic_write_bytes, atomic_write_json
from pipeline.model import TEACHER_TYPES
from validation.compat.matrix import read_report as read_compat_report
from validation.compat.text import compat_html, compat_markdown
from validation.gates import gates_from_config
from validation.html_report import write_html
from validation.run import TeacherSpec, ValidationSettings, validate_run
from validation.text_report import summary_markdown


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__)
    add_run_arguments(parser, convert=False)
    parser.add_argument(
        "--images",
        type=Path,
        help="folder of photos (default: the validation photos shipped in pipeline/sample_photos); "
        "without --annotations, prompts come from a seeded grid and PyTorch's own masks",
    )
    parser.add_argument("--annotations", type=Path, help="COCO instances file for --images (ground truth)")
    parser.add_argument("--max-images", type=positive, default=ValidationSettings.max_images)
    parser.add_argument("--threads", type=positive, default=ValidationSettings.threads)
    parser.add_argument(
        "--prompt-seed", type=int, default=ValidationSettings.prompt_seed, help="seed of the sampled prompt points"
    )
    parser.add_argument(
        "--skip-baselines", action="store_true", help="no PyTorch/ONNX Runtime/compute-floor timings (a quicker check)"
    )
    parser.add_argument(
        "--everything-points-per-side",
        type=int,
        default=ValidationSettings.everything_points_per_side,
        help="grid of the segment-everything section (K x K points per photo; 0 skips it)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="for iterating: one photo, one instance, no baselines, no segment everything, 3 timed runs "
        "(the defaults are what a shipped file is validated with)",
    )
    parser.add_argument("--teacher-checkpoint", type=Path, help="official SAM checkpoint: also score against SAM")
    parser.add_argument("--teacher-type", choices=TEACHER_TYPES, default="vit_h")
    args = parser.parse_args()
    setup_logging()
    config = config_from_args(args)
    check_target_options(config.target_options)
    gates = gates_from_config(config.gates)
    photos = photos_from_options(args.images, args.annotations, default="validation")
    settings = ValidationSettings(
        max_images=args.max_images,
        threads=args.threads,
        prompt_seed=args.prompt_seed,
        baselines=not args.skip_baselines,
        everything_points_per_side=max(0, args.everything_points_per_side),
    )
    if args.quick:
        settings = replace(
            settings,
            max_images=1,
            instances_per_image=1,
            baselines=False,
            everything_points_per_side=0,
            latency_runs=3,
            warmup_runs=1,
        )
    teacher = TeacherSpec(args.teacher_checkpoint, args.teacher_type) if args.teacher_checkpoint else None
    masks: dict = {}
    out = Path(config.out_dir)
    report = validate_run(out, photos, settings, gates, masks, checkpoint=config.checkpoint, teacher=teacher)
    summary = summary_markdown(report)
    compat = read_compat_report(out)
    if compat is not None:  # the matrix `nox -s compat` left beside the files
        summary += "\n\n" + compat_markdown(compat).replace("# Runtime compatibility", "## Runtime compatibility", 1)
    atomic_write_json(out / "report.json", report.to_json())
    atomic_write_bytes(out / "report.md", f"# Validation report\n\n{summary}\n".encode())
    print(summary)
    failures = report.failures() + (compat.gate_failures() if compat is not None else [])
    try:
        write_html(report, photos, masks, out / "report.html", compat_html(compat) if compat is not None else "")
        print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.html'}")
    except Exception as error:  # the JSON and Markdown reports stand without the page
        failures.append(f"report.html not written: {one_line(error)}")
        print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return exit_status(failures)


if __name__ == "__main__":
    run_main(main)
