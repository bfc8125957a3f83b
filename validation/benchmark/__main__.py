"""`python -m validation.benchmark --out DIR`: how fast every converted file is, in ratios.

Every artifact under DIR in its desktop runtime at 1 and 2 threads (warm median and p90 over its
own self-test inputs: a real photo, real prompts), against PyTorch eager, ONNX Runtime and the
compute floor (encoder FLOPs over the measured fp32 and int8 matmul rates); peak memory and size;
the decoder's latency against the number of points N (decoders converted at each N); and a
per-op profile of each ExecuTorch and TFLite encoder (ETDump; LiteRT's profiler), naming the ops
outside XNNPACK's fast kernels. Writes DIR/benchmark.json, DIR/benchmark.md and DIR/benchmark.png.
Ratios, not pass/fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import run_main, setup_logging
from pipeline.errors import ConfigError
from validation.benchmark.measure import run_benchmark
from validation.benchmark.report import write_benchmark
from validation.gates import DEFAULT_GATES


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.benchmark", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="convert output folder")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per file and thread count")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--points",
        type=int,
        nargs="*",
        default=[3, 5, 16],
        help="decoder point counts N to sweep (at least 3: the self-test box+point case takes three; none: skip)",
    )
    parser.add_argument("--sweep-precisions", nargs="+", default=["fp32", "int8"], choices=sorted(DEFAULT_GATES))
    args = parser.parse_args()
    if any(t < 1 for t in args.threads) or args.runs < 1 or args.warmup < 0 or any(n < 3 for n in args.points):
        raise ConfigError("--threads and --runs must be positive, --points at least 3, --warmup not negative")
    setup_logging()
    result = run_benchmark(args.out, args.threads, args.warmup, args.runs, args.points, args.sweep_precisions)
    for path in write_benchmark(result, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
