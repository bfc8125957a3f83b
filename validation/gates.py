"""Gates from the config and the reasons a validated file falls below its gate (the gates
themselves live in pipeline.gates, shared with the self-test vectors)."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.gates import DEFAULT_GATES, Gate, selftest_tolerance
from pipeline.records import describe_validation_error
from validation.schema import ArtifactResult, PairResult, SelftestScores

__all__ = ["DEFAULT_GATES", "Gate", "gate_failures", "gates_from_config", "looser_gate"]


def gates_from_config(raw: dict[str, dict[str, float]] | None) -> dict[str, Gate]:
    """DEFAULT_GATES with the TOML `[gates.<precision>]` tables laid over them."""
    gates = dict(DEFAULT_GATES)
    known = {f.name for f in fields(Gate)}
    for precision, values in (raw or {}).items():
        if precision not in gates:
            raise ConfigError(f"gates for unknown precision {precision!r}; expected some of {sorted(gates)}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"gates.{precision}: unknown keys {unknown}; expected some of {sorted(known)}")
        try:
            gates[precision] = Gate(**{**asdict(gates[precision]), **values})
        except ValidationError as error:
            raise ConfigError(describe_validation_error(error, f"gates.{precision}.")) from None
    return gates


def looser_gate(a: Gate, b: Gate) -> Gate:
    """A pair of files of two precisions is held to the looser of their gates, field by field."""
    return Gate(**{f.name: min(getattr(a, f.name), getattr(b, f.name)) for f in fields(Gate)})


def selftest_failures(scores: SelftestScores, part: str, gate: Gate) -> list[str]:
    """A file scored on its self-test vectors: the gate as the vectors' tolerance (selftest_tolerance)."""
    tolerance = selftest_tolerance(gate, part)
    failures = [
        f"self-test {name} PSNR {scores.psnr_db_min.get(name, float('nan')):.1f} dB < {minimum}"
        for name, minimum in tolerance.min_psnr_db.items()
        if not scores.psnr_db_min.get(name, float("nan")) >= minimum
    ]
    if tolerance.min_mask_iou is not None and not (scores.mask_iou_min or float("nan")) >= tolerance.min_mask_iou:
        failures.append(f"self-test mask IoU {scores.mask_iou_min} < {tolerance.min_mask_iou}")
    return failures


def gate_failures(result: ArtifactResult | PairResult, gate: Gate) -> list[str]:
    """Why a file (or a pair) falls below its gate (empty when it passes). NaN never passes."""
    if result.error:
        return [result.error]
    if isinstance(result, ArtifactResult) and result.selftest_only is not None:
        return selftest_failures(result.selftest_only, result.part, gate)
    failures = [
        f"output {name} had {count} non-finite values (NaN or Inf)"
        for name, count in result.non_finite_outputs.items()
        if count
    ]
    if failures and isinstance(result, PairResult):
        return failures  # every score of a pair fed NaN embeddings fails too; one reason is enough
    if isinstance(result, ArtifactResult) and result.part == "image_encoder":
        psnr = result.encoder.psnr_db_min
        if not psnr >= gate.embeddings_psnr_db:
            failures.append(f"embeddings PSNR {psnr:.1f} dB < {gate.embeddings_psnr_db}")
        return failures
    for kind, scores in (result.decoder or {}).items():
        confident = scores.mask_iou_confident  # None: no prompt of this kind had a confident pixel
        checks = (
            ("mask IoU mean", scores.mask_iou.mean, gate.mask_iou_mean),
            ("mask IoU min", scores.mask_iou.min, gate.mask_iou_min),
            ("confident IoU mean", None if confident is None else confident.mean, gate.confident_iou_mean),
        )
        for label, value, minimum in checks:
            if value is not None and (math.isnan(value) or value < minimum):
                failures.append(f"{kind}: {label} {value:.3f} < {minimum}")
    return failures
