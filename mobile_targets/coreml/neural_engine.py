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

from mobile_targets.coreml.emulator import MilProgram, Operation
from pipeline.manifest import NeuralEngineCensus

HOLLANCE = "https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md"
TYPED_EXECUTION = "https://apple.github.io/coremltools/docs-guides/source/typed-execution-example.html"

EXAMPLES_KEPT = 3
"""Op names recorded per rule (the count is always complete)."""


@dataclass(frozen=True)
class NeuralEngineRule:
    name: str
    source: str
    says: str
    """What the source says, in a few words."""
    matches: Callable[[Operation, MilProgram], bool]


def _constant(program: MilProgram, argument: Any) -> Any:
    kind, value = argument
    return program.constants.get(value) if kind == "var" else value


def _is_gather(op: Operation, program: MilProgram) -> bool:
    return op.type in ("gather", "gather_nd", "gather_along_axis")


def _computes_in_fp32(op: Operation, program: MilProgram) -> bool:
    """A float32-typed op (a cast to the fp32 outputs excepted: the interface's, not a computation)."""
    return op.type != "cast" and any(output.dtype == "FLOAT32" for _, output in op.outputs)


def _is_dilated_convolution(op: Operation, program: MilProgram) -> bool:
    if op.type != "conv" or "dilations" not in op.arguments:
        return False
    dilations = _constant(program, op.arguments["dilations"])
    return dilations is not None and bool(np.any(np.asarray(dilations) != 1))


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


def neural_engine_census(package: Path) -> NeuralEngineCensus:
    """Every op of the package's `main` against RULES: how many ops, and per rule how many match."""
    program = MilProgram(package)
    outside: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for op in program.operations:
        for rule in RULES:
            if rule.matches(op, program):
                outside[rule.name] = outside.get(rule.name, 0) + 1
                if len(examples.setdefault(rule.name, [])) < EXAMPLES_KEPT:
                    examples[rule.name].append(f"{op.type} {op.name}")
    return NeuralEngineCensus(
        ops=len(program.operations),
        outside=outside,
        examples=examples,
        sources={rule.name: f"{rule.says} ({rule.source})" for rule in RULES},
    )
