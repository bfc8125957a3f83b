"""Do two validate runs agree on every figure? Compares two report.json files value by value,
leaving out what measures time or the machine (latencies, memory, section times, baselines,
dates, commands): after a change meant to make validate faster, every figure must be the same.

    PYTHONPATH=. python benchmarks/compare_reports.py BEFORE/report.json AFTER/report.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

TIMING_KEYS = {
    "latency",
    "memory",
    "seconds",
    "created",
    "command",
    "machine",
    "load_s",
    "decoder_s",
    "baselines",
    "photos",
}


def differences(before: Any, after: Any, path: str = "") -> tuple[int, list[str]]:
    """(values compared, where they differ) over two parsed reports."""
    if isinstance(before, dict) and isinstance(after, dict):
        compared, found = 0, []
        for key in sorted(set(before) | set(after)):
            if key in TIMING_KEYS:
                continue
            if key not in before or key not in after:
                found.append(f"{path}/{key}: only in {'after' if key in after else 'before'}")
                continue
            count, more = differences(before[key], after[key], f"{path}/{key}")
            compared, found = compared + count, found + more
        return compared, found
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return 1, [f"{path}: {len(before)} entries before, {len(after)} after"]
        compared, found = 0, []
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            count, more = differences(a, b, f"{path}[{index}]")
            compared, found = compared + count, found + more
        return compared, found
    same = before == after or (
        isinstance(before, float) and isinstance(after, float) and math.isnan(before) and math.isnan(after)
    )
    return 1, [] if same else [f"{path}: {before!r} before, {after!r} after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    compared, found = differences(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    print(f"{compared} figures compared, {len(found)} differ")
    for line in found[:50]:
        print(line)


if __name__ == "__main__":
    main()
