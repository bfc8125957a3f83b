"""Which ops of a Core ML package the Neural Engine is known not to run, each rule with its source.

Core ML decides per op where a package runs (Neural Engine, GPU or CPU), and every op it cannot
place on the Neural Engine cuts the graph there: the rest waits for a copy between processors. No
public list is complete (Apple publishes none), so each rule here names the public source it comes
from; a file with none of these ops can still be placed elsewhere by Core ML's cost model, and
only a Mac or iPhone (Xcode's performance report) says where each op really ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobile_targets.coreml.emulator import decode_immediate, read_model_spec, tensor_type
from pipeline.errors import ArtifactError
from pipeline.manifest import NeuralEngineCensus

HOLLANCE = "https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md"
TYPED_EXECUTION = "https://apple.github.io/coremltools/docs-guides/source/typed-execution-example.html"

EXAMPLES_KEPT = 3
"""Op names recorded per rule (the count is always complete)."""


@dataclass(frozen=True)
class MilOp:
    """What the rules read of one op of the package's spec (no weight is decoded: a census of a
    large package costs a protobuf walk)."""

    type: str
    name: str
    output_dtypes: tuple[str, ...]
    immediate: dict[str, Any]
    """Inputs bound to small constants (immediate values), decoded; others absent."""


@dataclass(frozen=True)
class NeuralEngineRule:
    name: str
    source: str
    says: str
    """What the source says, in a few words."""
    matches: Callable[[MilOp], bool]


def _is_gather(op: MilOp) -> bool:
    return op.type in ("gather", "gather_nd", "gather_along_axis")


def _computes_in_fp32(op: MilOp) -> bool:
    """A float32-typed op (a cast to the fp32 outputs excepted: the interface's, not a computation)."""
    return op.type != "cast" and "FLOAT32" in op.output_dtypes


def _is_dilated_convolution(op: MilOp) -> bool:
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


def _dtype(value_type: Any) -> str:
    try:
        return tensor_type(value_type).dtype
    except ArtifactError:  # not a tensor (a list, a state)
        return value_type.WhichOneof("type")


def mil_ops(package: Path) -> list[MilOp]:
    """The ops of the package's `main` that compute (not its constants), in order."""
    spec = read_model_spec(package)
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    immediates = {}
    for op in block.operations:
        if op.type == "const" and op.attributes["val"].WhichOneof("value") == "immediateValue":
            immediates[op.outputs[0].name] = op.attributes["val"]
    ops = []
    for op in block.operations:
        if op.type == "const" or op.type.startswith("constexpr_"):  # weights, decompressed at load
            continue
        small = {}
        for key, argument in op.inputs.items():
            (binding, *more) = argument.arguments or (None,)
            if binding is None or more:
                continue
            value = immediates.get(binding.name) if binding.WhichOneof("binding") == "name" else binding.value
            if value is not None and value.WhichOneof("value") == "immediateValue":
                small[key] = decode_immediate(value)
        dtypes = tuple(_dtype(output.type) for output in op.outputs)
        ops.append(MilOp(op.type, op.outputs[0].name if op.outputs else op.type, dtypes, small))
    return ops


def neural_engine_census(package: Path) -> NeuralEngineCensus:
    """Every op of the package's `main` against RULES: how many ops, and per rule how many match."""
    ops = mil_ops(package)
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
