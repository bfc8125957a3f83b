"""`python -m validation.compat --out DIR [--runtimes NAME ...] [--no-manifest-update]`

Runs every file's self-test vectors under DIR in each runtime build (`runtimes.CATALOG`), each
in its own environment built on first use, and writes DIR/compat.json and DIR/compat.md; each
manifest record gets `details.runtimes` (where its file passes, is refused, answers wrong).
Exits 1 when any file runs and answers wrong, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import exit_status, run_main, setup_logging
from validation.compat.matrix import build_matrix, record_in_manifests, write_report
from validation.compat.runtimes import DEFAULT_RUNTIMES, runtime_spec


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.compat", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="convert output folder")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        default=list(DEFAULT_RUNTIMES),
        help=f"default: {', '.join(DEFAULT_RUNTIMES)}",
    )
    parser.add_argument("--no-manifest-update", action="store_true", help="leave the manifests as they are")
    args = parser.parse_args()
    setup_logging()
    report = build_matrix(args.out, [runtime_spec(name) for name in args.runtimes])
    for path in write_report(args.out, report):
        print(f"wrote {path}")
    if not args.no_manifest_update:
        record_in_manifests(args.out, report)
    for cell in report.cells:
        print(f"{cell.verdict:8s} {cell.target} {cell.file} in {cell.runtime}: {cell.detail}")
    return exit_status(report.gate_failures())


if __name__ == "__main__":
    run_main(main)
