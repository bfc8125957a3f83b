"""The ops of a Core ML package's `main`, read for the Neural Engine rules
(mobile_targets/neural_engine.py says what each rule is and where it comes from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobile_targets.coreml.emulator import decode_immediate, read_model_spec, tensor_type
from mobile_targets.neural_engine import EngineOp, census
from pipeline.errors import ArtifactError
from pipeline.manifest import NeuralEngineCensus


def _dtype(value_type: Any) -> str:
    try:
        return tensor_type(value_type).dtype
    except ArtifactError:  # not a tensor (a list, a state)
        return value_type.WhichOneof("type")


def mil_ops(package: Path) -> list[EngineOp]:
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
        ops.append(EngineOp(op.type, op.outputs[0].name if op.outputs else op.type, dtypes, small))
    return ops


def neural_engine_census(package: Path) -> NeuralEngineCensus:
    """Every op of the package's `main` against the Neural Engine rules."""
    return census(mil_ops(package))
