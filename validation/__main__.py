"""`python -m validation [--out DIR] [--config FILE] [--images DIR --annotations FILE] [--max-images K]`

Exits non-zero, naming each artifact, when any artifact is missing, unloadable, or below its gate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import run_main, setup_logging
from pipeline.config import add_run_arguments, config_from_args
from pipeline.datasets import CocoPhotos
from pipeline.files import atomic_write_bytes, atomic_write_json
from validation.gates import gates_from_config
from validation.html_report import write_html
from validation.run import ValidationSettings, failed_artifacts, summary_markdown, validate_run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--images", type=Path, help="folder of photos (default: ../shared/data/coco-cc-train)")
    parser.add_argument("--annotations", type=Path, help="COCO instances file for --images")
    parser.add_argument("--max-images", type=int, default=ValidationSettings.max_images)
    parser.add_argument("--threads", type=int, default=ValidationSettings.threads)
    args = parser.parse_args()
    setup_logging()
    config = config_from_args(args)
    if bool(args.images) != bool(args.annotations):
        parser.error("--images and --annotations go together")
    photos = CocoPhotos(args.images, args.annotations) if args.images else CocoPhotos.default()
    settings = ValidationSettings(max_images=args.max_images, threads=args.threads, seed=config.seed)
    masks: dict = {}
    report = validate_run(Path(config.out_dir), photos, settings, gates_from_config(config.gates), masks)
    out = Path(config.out_dir)
    summary = summary_markdown(report)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", f"# Validation report\n\n{summary}\n".encode())
    print(summary)
    write_html(report, photos, masks, out / "report.html")
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.html'}")
    failures = failed_artifacts(report)
    for line in failures:
        print(f"below its gate: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
