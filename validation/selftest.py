"""`python -m validation.selftest --out DIR`: every file's self-test vectors through the file.

Runs each artifact's `<stem>.selftest.npz` (written by the convert stage; format in
pipeline.selftest and docs/contract.md) in the target's desktop runtime and checks the tolerances its
manifest record names. One line per file; exit 1 when any case misses, 2 on bad input. This is
the check an app's own unit test repeats on the device.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mobile_targets import get_target, load_artifact_runner
from pipeline.cli import exit_status, run_main, setup_logging
from pipeline.errors import PipelineError, one_line
from pipeline.locking import reading
from pipeline.manifest import ArtifactRecord, Manifest, find_manifests, read_manifest
from pipeline.selftest import Tolerance, read_vectors, run_vectors


@dataclass(frozen=True)
class SelftestOutcome:
    artifact: str
    passed: bool
    detail: str


def selftest_artifact(manifest_path: Path, manifest: Manifest, record: ArtifactRecord, threads: int) -> SelftestOutcome:
    """Run one file's vectors; any failure (missing vectors, unloadable file, a miss) is one line."""
    name = f"{record.target} {record.part} {record.precision}"
    info = record.details.selftest
    if info is None:
        return SelftestOutcome(name, False, "no self-test vectors in the manifest (converted before they existed?)")
    try:
        contract = manifest.contract(record.part)
        runner = load_artifact_runner(manifest_path, manifest, record, threads)  # file and vectors as recorded
        cases = read_vectors(manifest_path.parent / info.file, info.cases, contract)
        tolerance = Tolerance(**info.tolerance)
        results = run_vectors(runner, cases, tolerance)
        target = get_target(record.target)
        folder = manifest_path.parent
        companions = [target.verify_companion(folder / c.file, c.model_dump()) for c in record.details.companions]
    except Exception as error:  # one file's failure never stops the others
        return SelftestOutcome(name, False, one_line(error))
    misses = [miss for result in results for miss in result.misses]
    if misses:
        return SelftestOutcome(name, False, "; ".join(misses))
    worst = []
    for output in contract.output_names:
        worst.append(f"{output} PSNR >= {min(r.psnr_db[output] for r in results):.1f} dB")
    ious = [r.mask_iou_min for r in results if r.mask_iou_min is not None]
    if ious:
        worst.append(f"mask IoU >= {min(ious):.4f}")
    summary = f"{len(results)} cases ({', '.join(c.kind for c in cases)}): " + ", ".join(worst)
    return SelftestOutcome(name, True, "; ".join([summary, *companions]))


def selftest_folder(out: Path, threads: int = 2) -> list[SelftestOutcome]:
    manifests = find_manifests(out)
    if not manifests:
        raise PipelineError(f"no manifests under {out}; run a convert session first")
    with reading([m.parent for m in manifests], "a selftest run"):
        return [outcome for manifest_path in manifests for outcome in _selftest_manifest(manifest_path, threads)]


def _selftest_manifest(manifest_path: Path, threads: int) -> list[SelftestOutcome]:
    try:
        manifest = read_manifest(manifest_path)
    except PipelineError as error:
        return [SelftestOutcome(manifest_path.parent.name, False, str(error))]
    return [selftest_artifact(manifest_path, manifest, record, threads) for record in manifest.artifacts]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.selftest", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="convert output folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    outcomes = selftest_folder(args.out, args.threads)
    for outcome in outcomes:
        print(f"{'pass' if outcome.passed else 'FAIL'} {outcome.artifact}: {outcome.detail}")
    failed = [o for o in outcomes if not o.passed]
    print(f"selftest: {len(outcomes) - len(failed)} of {len(outcomes)} files met their tolerances")
    return exit_status([f"{outcome.artifact}: {outcome.detail}" for outcome in failed])


if __name__ == "__main__":
    run_main(main)
