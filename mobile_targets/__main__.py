"""`python -m mobile_targets TARGET [--config FILE] [--checkpoint PATH] [--out DIR] ...`"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from mobile_targets import target_names
from mobile_targets.convert import convert_target
from pipeline.cli import run_main, setup_logging
from pipeline.config import add_run_arguments, config_from_args
from pipeline.datasets import photos_from_options


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mobile_targets", description=__doc__)
    parser.add_argument("target", choices=target_names())
    add_run_arguments(parser)
    parser.add_argument("--precisions", nargs="+", help="subset of the config's precisions")
    parser.add_argument(
        "--images",
        type=Path,
        help="photos for the example and the self-test vectors (default: pipeline/sample_photos/calibration)",
    )
    parser.add_argument("--annotations", type=Path, help="COCO instances file for --images (prompts from instances)")
    args = parser.parse_args()
    setup_logging()
    config = config_from_args(args)
    if args.precisions:
        config = replace(config, precisions=tuple(args.precisions))
    photos = photos_from_options(args.images, args.annotations, default="calibration")
    convert_target(args.target, config, photos=photos)
    return 0


if __name__ == "__main__":
    run_main(main)
