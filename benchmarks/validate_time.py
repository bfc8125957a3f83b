"""How long `nox -s validate` takes with its defaults on a Core ML convert folder, section by
section, and the Core ML emulator's time per call for each file (the cost the sections add up).

    PYTHONPATH=. python benchmarks/validate_time.py --out DIR [--calls 3] [--skip-validate]

Converts Core ML with the convert session's defaults into DIR first when DIR/coreml is missing
(and times that), then times `calls` emulator calls of every file on its own self-test inputs,
then runs validate with its defaults (the shipped held-out photos, prompts and gates) and prints
the report's section times. Writes DIR/validate_time.json and validate's DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mobile_targets import load_artifact_runner
from mobile_targets.convert import convert_target
from pipeline.config import RunConfig
from pipeline.datasets import CocoPhotos
from pipeline.files import atomic_write_json
from pipeline.manifest import read_manifest
from pipeline.provenance import command_line
from pipeline.selftest import read_vectors
from validation.reference import ValidationSettings
from validation.run import validate_run
from validation.schema import ValidateCost


def emulator_calls(out: Path, calls: int) -> dict[str, float]:
    """Median seconds of one emulator call per Core ML file, on its first self-test case."""
    manifest_path = out / "coreml" / "manifest.json"
    manifest = read_manifest(manifest_path)
    seconds = {}
    for record in manifest.artifacts:
        runner = load_artifact_runner(manifest_path, manifest, record, threads=2)
        info = record.details.selftest
        case = read_vectors(manifest_path.parent / info.file, info.cases, manifest.contract(record.part))[0]
        timings = []
        for _ in range(calls):
            start = time.perf_counter()
            runner.run(case.inputs)
            timings.append(time.perf_counter() - start)
        seconds[f"{record.part} {record.precision}"] = float(np.median(timings))
        print(f"{record.part} {record.precision}: {seconds[f'{record.part} {record.precision}']:.2f} s a call")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--skip-validate", action="store_true", help="only the emulator's per-call times")
    args = parser.parse_args()
    result = ValidateCost(command=command_line())
    if not (args.out / "coreml" / "manifest.json").is_file():
        start = time.perf_counter()
        convert_target("coreml", RunConfig(out_dir=args.out))
        result.convert_s = time.perf_counter() - start
        print(f"convert_coreml: {result.convert_s:.0f} s")
    result.emulator_call_s = emulator_calls(args.out, args.calls)
    if not args.skip_validate:
        start = time.perf_counter()
        report = validate_run(args.out, CocoPhotos.sample("validation"), ValidationSettings())
        result.validate_s = time.perf_counter() - start
        result.sections_s = report.seconds
        result.failures = report.failures()
        atomic_write_json(args.out / "report.json", report.to_json())  # the figures, to compare runs by
        for section, seconds in report.seconds.items():
            print(f"{section}: {seconds:.0f} s")
        print(f"validate: {result.validate_s / 60:.1f} min, {len(result.failures)} failures")
    atomic_write_json(args.out / "validate_time.json", result.to_json())
    print(json.dumps({k: v for k, v in result.to_json().items() if k != "failures"}, indent=1)[:2000])


if __name__ == "__main__":
    main()
