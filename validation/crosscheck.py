"""Core ML's emulator against Apple's own Core AI runtime: the Core ML file and the Core AI file of
the same part, precision and weights, on the same photos and prompts (or, where a file is scored
on its self-test vectors only, on those same vectors), side by side. Two independent runtimes that
agree make the emulator's figures trustworthy; where they disagree, one of them is wrong."""

from __future__ import annotations

import numpy as np

from pipeline.contract import ENCODER
from pipeline.gates import Gate
from pipeline.manifest import ArtifactRecord, Manifest
from pipeline.metrics import psnr_db
from validation.gates import gate_failures
from validation.schema import ArtifactResult, CrossCheck

EMULATED, APPLE = "coreml", "coreai"


def _selftest_figure(record: ArtifactRecord) -> tuple[str, bool]:
    """A record's self-test measurement (in its runtime, at conversion) and whether it met its tolerance."""
    info = record.details.selftest
    if info is None or not info.measured.get("psnr_db_min"):
        return "no self-test measurement", False
    psnrs = info.measured["psnr_db_min"]
    iou = info.measured.get("mask_iou_min")
    tolerance = info.tolerance
    passed = all(psnrs.get(name, float("nan")) >= minimum for name, minimum in tolerance.get("min_psnr_db", {}).items())
    if tolerance.get("min_mask_iou") is not None:
        passed = passed and iou is not None and iou >= tolerance["min_mask_iou"]
    figure = f"PSNR {min(psnrs.values()):.1f} dB" + ("" if iou is None else f", mask IoU {iou:.3f}")
    return figure, passed


def _photo_figure(result: ArtifactResult, gate: Gate) -> tuple[str, bool]:
    from validation.text_report import agreement_figure

    return agreement_figure(result), not gate_failures(result, gate)


def cross_check(
    manifests: dict[str, Manifest],
    results: dict[tuple[str, str, str], ArtifactResult],
    embeddings: dict[tuple[str, str], list[np.ndarray]],
    gates: dict[str, Gate],
) -> list[CrossCheck]:
    """One row per part and precision both targets made from the same weights; `results` by
    (target, part, precision), `embeddings` (encoders run on every photo) by (target, precision)."""
    if EMULATED not in manifests or APPLE not in manifests:
        return []
    emulated, apple = manifests[EMULATED], manifests[APPLE]
    if (emulated.weights.sha256, emulated.weights.seed) != (apple.weights.sha256, apple.weights.seed):
        return []
    theirs = {(r.part, r.precision): r for r in apple.artifacts}
    rows = []
    for record in emulated.artifacts:
        other = theirs.get((record.part, record.precision))
        gate = gates.get(record.precision)
        if other is None or gate is None:
            continue
        ours_result = results.get((EMULATED, record.part, record.precision))
        their_result = results.get((APPLE, record.part, record.precision))
        on_photos = (
            ours_result is not None
            and their_result is not None
            and not ours_result.error
            and not their_result.error
            and ours_result.selftest_only is None
            and their_result.selftest_only is None
        )
        if on_photos:
            (coreml, coreml_ok), (coreai, coreai_ok) = (
                _photo_figure(ours_result, gate),
                _photo_figure(their_result, gate),
            )
            basis = "held-out photos"
        else:
            (coreml, coreml_ok), (coreai, coreai_ok) = _selftest_figure(record), _selftest_figure(other)
            basis = "self-test vectors"
        between = None
        if on_photos and record.part == ENCODER:
            ours, their = embeddings.get((EMULATED, record.precision)), embeddings.get((APPLE, record.precision))
            if ours and their:
                between = min(psnr_db(a, b) for a, b in zip(ours, their, strict=True))
        verdict = "agree"
        if coreml_ok != coreai_ok:
            verdict = (
                f"DISAGREE: Core ML (emulator) {'passes' if coreml_ok else 'fails'} its gate, "
                f"Core AI (Apple's runtime) {'passes' if coreai_ok else 'fails'}"
            )
        elif between is not None and not between >= gate.embeddings_psnr_db:
            verdict = (
                f"DISAGREE: their embeddings are {between:.1f} dB apart, under the {gate.embeddings_psnr_db} dB gate"
            )
        rows.append(CrossCheck(record.part, record.precision, basis, coreml, coreai, between, verdict))
    return rows
