"""`python -m validation.results --from DIR [DIR ...] [--page docs/results.md]`: the results page
from the result files the stages wrote under each DIR (validate's report.json, the benchmark's
benchmark.json, compat's compat.json), each section with the machine, date and command that made
it, so every published figure can be reproduced."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import run_main
from pipeline.files import atomic_write_bytes
from pipeline.provenance import command_line
from validation.results.page import results_markdown


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.results", description=__doc__)
    parser.add_argument("--from", dest="folders", type=Path, nargs="+", required=True, help="stage output folders")
    parser.add_argument("--page", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    page = results_markdown(args.folders, command_line())
    atomic_write_bytes(args.page, page.encode())
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    run_main(main)
