"""`python -m mobile_targets TARGET [--config FILE] [--checkpoint PATH] [--out DIR] ...`"""

from __future__ import annotations

import argparse

from mobile_targets import target_names
from mobile_targets.convert import convert_target
from pipeline.cli import run_main, setup_logging
from pipeline.config import add_run_arguments, config_from_args


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mobile_targets", description=__doc__)
    parser.add_argument("target", choices=target_names())
    add_run_arguments(parser)
    parser.add_argument("--precisions", nargs="+", help="subset of the config's precisions")
    parser.add_argument("--calibration-images", type=int, default=8, help="real photos for int8 calibration")
    args = parser.parse_args()
    setup_logging()
    config = config_from_args(args)
    if args.precisions:
        from dataclasses import replace

        config = replace(config, precisions=tuple(args.precisions))
    convert_target(args.target, config, calibration_images=args.calibration_images)
    return 0


if __name__ == "__main__":
    run_main(main)
