"""Which ops of an Apple file (Core ML package, Core AI asset) the Neural Engine is known not to
run, each rule with its public source.

Core ML and Core AI decide per op where a file runs (Neural Engine, GPU or CPU), and every op they
cannot place on the Neural Engine cuts the graph there: the rest waits for a copy between
processors. No public list is complete (Apple publishes none), so each rule here names the public
source it comes from; a file with none of these ops can still be placed elsewhere by the runtime's
cost model, and only a Mac or iPhone (Xcode's performance report) says where each op really ran.
Each target reads its own format into `EngineOp`s, named in Core ML's MIL vocabulary, which the
sources use (mobile_targets/coreml/neural_engine.py, mobile_targets/coreai/neural_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.manifest import NeuralEngineCensus

HOLLANCE = "https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md"
TYPED_EXECUTION = "https://apple.github.io/coremltools/docs-guides/source/typed-execution-example.html"

EXAMPLES_KEPT = 3
"""Op names recorded per rule (the count is always complete)."""


@dataclass(frozen=True)
class EngineOp:
    """What the rules read of one op (no weight is decoded: a census of a large file costs a walk
    of its program)."""

    type: str
    """The op's MIL name (`gather`, `conv`, `cast`, ...)."""
    name: str
    output_dtypes: tuple[str, ...]
    """MIL's element type names (`FLOAT32`, `FLOAT16`, ...)."""
    immediate: dict[str, Any]
    """Inputs bound to small constants, decoded (a convolution's `dilations`); others absent."""


@dataclass(frozen=True)
class NeuralEngineRule:
    name: str
    source: str
    says: str
    """What the source says, in a few words."""
    matches: Callable[[EngineOp], bool]


def _is_gather(op: EngineOp) -> bool:
    return op.type in ("gather", "gather_nd", "gather_along_axis")


def _computes_in_fp32(op: EngineOp) -> bool:
    """A float32-typed op (a cast to the fp32 outputs excepted: the interface's, not a computation)."""
    return op.type != "cast" and "FLOAT32" in op.output_dtypes


def _is_dilated_convolution(op: EngineOp) -> bool:
    dilations = op.immediate.get("dilations")
    return op.type == "conv" and dilations is not None and bool(np.any(np.asarray(dilations) != 1))


RULES = (
    NeuralEngineRule("gather", HOLLANCE, "gather is listed among the layers known not to run on the ANE", _is_gather),
    NeuralEngineRule(
        "fp32 compute",
        TYPED_EXECUTION,
        "a float 32 typed model executes on a combination of the GPU and CPU (the Neural Engine computes in fp16)",
        _computes_in_fp32,
    ),
    NeuralEngineRule(
        "dilated convolution",
        HOLLANCE,
        "dilated convolutions are listed as not running on the ANE",
        _is_dilated_convolution,
    ),
)


def census(ops: Sequence[EngineOp]) -> NeuralEngineCensus:
    """Every op against RULES: how many ops, and per rule how many match."""
    outside: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for op in ops:
        for rule in RULES:
            if rule.matches(op):
                outside[rule.name] = outside.get(rule.name, 0) + 1
                if len(examples.setdefault(rule.name, [])) < EXAMPLES_KEPT:
                    examples[rule.name].append(f"{op.type} {op.name}")
    return NeuralEngineCensus(
        ops=len(ops),
        outside=outside,
        examples=examples,
        sources={rule.name: f"{rule.says} ({rule.source})" for rule in RULES},
    )
