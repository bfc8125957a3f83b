"""`python -m validation [--out DIR] [--images DIR --annotations FILE] [--max-images K] [--threads T]`"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import run_main, setup_logging
from pipeline.config import add_run_arguments, config_from_args
from pipeline.datasets import CocoPhotos
from pipeline.files import atomic_write_json
from validation.run import ValidationSettings, summary_rows, validate_run


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
    report = validate_run(Path(config.out_dir), photos, settings)
    report_path = Path(config.out_dir) / "report.json"
    atomic_write_json(report_path, report)
    header = ["artifact", "MB", "ms (median)", "x PyTorch", "agreement (IoU mean/min, confident IoU, logits PSNR)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in summary_rows(report):
        print("| " + " | ".join(row) + " |")
    for run in report["runs"]:
        print(
            f"{run['target']}: weights {run['weights']}; PyTorch eager median "
            f"encoder {run['pytorch_latency']['image_encoder']['median_s'] * 1000:.0f} ms, "
            f"decoder {run['pytorch_latency']['prompt_decoder']['median_s'] * 1000:.0f} ms"
        )
    print(f"wrote {report_path}")
    failed = [a for run in report["runs"] for a in run["artifacts"] if "error" in a]
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
