"""Which ops of a TFLite w8a8 file keep float activations: the regions int8 costs the most.

Per-op error is a poor guide here: the ops that lose most to int8 by themselves (a LayerNorm's
variance, a quantized input) matter little downstream, while the decoder's prompt encoding loses
a few dB and ruins every mask after it (sin and cos of coordinates quantized in 4-pixel steps).
So the search measures what a region costs the part's output: the graph in operator order is cut
into `REGIONS` runs of ops, each is made int8 alone (every other op float) and scored on the
calibration inputs against the float model, and the costliest regions are kept float, one at a
time, until the int8 rest holds the target. Float, not int16: an int16 ADD whose inputs' scales
differ by 2^11 aborts LiteRT's process, and int16 activations lift the encoder only a few dB
(benchmarks/tflite_w8a16.py, docs/tflite.md).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.contract import ENCODER, PartContract
from pipeline.gates import Gate
from pipeline.metrics import mask_iou, psnr_db

REGIONS = 8
"""Runs of consecutive ops the search scores (more: a finer plan, one more quantize-and-run each)."""
MAX_FLOAT_SHARE = 0.5
"""A plan that keeps more of the ops float than this is not a mostly-integer file: not made."""
ENCODER_MARGIN_DB = 3.0
"""The encoder's target over its gate, as the calibration photos are the ones it was calibrated on."""


@dataclass(frozen=True)
class RegionScore:
    """One run of ops (indices into the float model's operators) and the score with it alone int8."""

    first: int
    last: int
    alone_int8: float


def float_op_count(model: bytes) -> tuple[int, int]:
    """(ops computing on float tensors, all ops) of a quantized `.tflite`, the QUANTIZE and
    DEQUANTIZE at the float/int8 boundaries not counted: what the file runs outside int8, the
    plan's float ops and the ops ai-edge-quantizer has no int8 form of (SIN, COS, CAST, ...)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    boundary = {schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE}
    graph = tflite.subgraphs[0]
    ops = [op for op in graph.operators if tflite.operatorCodes[op.opcodeIndex].builtinCode not in boundary]
    on_float = [
        op
        for op in ops
        if any(graph.tensors[i].type == schema.TensorType.FLOAT32 for i in [*op.inputs, *op.outputs] if i >= 0)
    ]
    return len(on_float), len(ops)


@dataclass(frozen=True)
class MixedPlan:
    """The ops a w8a8 file keeps float, and what the search measured."""

    float_ops: tuple[str, ...]
    """Op scopes (their output tensors' names, as ai-edge-quantizer's recipes match them)."""
    target: float
    score: float
    """The final file's score on the calibration inputs (min mask IoU or embeddings PSNR)."""
    all_int8_score: float
    """What the file scored with every op int8."""
    file_float_ops: tuple[int, int] = (0, 0)
    """`float_op_count` of the file made: its ops outside int8, and all of its ops."""
    regions: tuple[RegionScore, ...] = ()
    """Every region's score alone int8 (empty: the all-int8 file held the target, no search)."""
    kept_float: tuple[RegionScore, ...] = ()
    """The regions the file keeps float, costliest first."""

    @property
    def int8_op_share(self) -> float:
        """Of the file's ops, the share on int8 tensors."""
        outside, total = self.file_float_ops
        return 1 - outside / total if total else 1.0

    def details(self) -> dict[str, object]:
        """What the manifest records of the plan."""
        return {
            "int8_op_share": round(self.int8_op_share, 4),
            "ops_outside_int8": self.file_float_ops[0],
            "ops": self.file_float_ops[1],
            "planned_float_ops": len(self.float_ops),
            "float_regions": [f"ops {r.first}-{r.last}" for r in self.kept_float],
            "calibration_score": round(float(self.score), 4),
            "all_int8_score": round(float(self.all_int8_score), 4),
            "calibration_target": round(float(self.target), 4),
        }


def target_for(contract: PartContract, gate: Gate) -> float:
    """The score a w8a8 part must reach on its calibration inputs: the encoder's embeddings PSNR
    gate plus a margin; for a decoder, the gate's mean mask IoU as the minimum over its prompts."""
    return gate.embeddings_psnr_db + ENCODER_MARGIN_DB if contract.part == ENCODER else gate.mask_iou_mean


def score(contract: PartContract, expected: list[dict[str, np.ndarray]], answers: list[dict[str, np.ndarray]]) -> float:
    """Worst over the inputs: PSNR of every output for an encoder, each mask's IoU for a decoder."""
    if contract.part == ENCODER:
        return min(psnr_db(e[name], a[name]) for e, a in zip(expected, answers, strict=True) for name in e)
    return min(
        mask_iou(e["low_res_masks"][row, mask] > 0, a["low_res_masks"][row, mask] > 0)
        for e, a in zip(expected, answers, strict=True)
        for row in range(e["low_res_masks"].shape[0])
        for mask in range(e["low_res_masks"].shape[1])
    )


def scope_pattern(scopes: Sequence[str]) -> str:
    """One regular expression matching exactly these op scopes (ai-edge-quantizer's `regex`)."""
    return "^(" + "|".join(re.escape(scope) for scope in scopes) + ")$"


def plan_float_regions(
    scopes: Sequence[str],
    quantize: Callable[[Sequence[str]], bytes],
    run: Callable[[bytes], list[dict[str, np.ndarray]]],
    expected: list[dict[str, np.ndarray]],
    contract: PartContract,
    target: float,
) -> tuple[MixedPlan, bytes]:
    """The plan and its file: all int8 when that holds `target`, else the costliest regions float.

    `scopes` are the float model's ops in order; `quantize(float_scopes)` makes the file with those
    ops float; `run(file)` answers the calibration inputs whose float answers are `expected`."""
    model = quantize(())
    all_int8 = reached = score(contract, expected, run(model))
    if reached >= target:
        return MixedPlan((), target, reached, all_int8, float_op_count(model)), model
    bounds = np.linspace(0, len(scopes), REGIONS + 1).astype(int)
    regions = []
    for first, end in itertools.pairwise(bounds):
        if end == first:  # fewer ops than regions
            continue
        alone = [*scopes[:first], *scopes[end:]]
        regions.append(RegionScore(int(first), int(end) - 1, score(contract, expected, run(quantize(alone)))))
    kept: list[RegionScore] = []
    float_ops: tuple[str, ...] = ()
    for region in sorted(regions, key=lambda r: r.alone_int8):
        candidate = (*float_ops, *scopes[region.first : region.last + 1])
        if len(candidate) / len(scopes) > MAX_FLOAT_SHARE:
            break  # not a mostly-integer file any more: the file keeps what it has, and misses its gate
        kept.append(region)
        float_ops = candidate
        model = quantize(float_ops)
        reached = score(contract, expected, run(model))
        if reached >= target:
            break
    return MixedPlan(float_ops, target, reached, all_int8, float_op_count(model), tuple(regions), tuple(kept)), model
