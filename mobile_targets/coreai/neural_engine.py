"""The ops of a Core AI asset's `main` graph, read for the Neural Engine rules
(mobile_targets/neural_engine.py says what each rule is and where it comes from).

The asset's program is MLIR (coreai's dialect): its ops are renamed to MIL's names where a rule
names them (`coreai.gather_along_axis` -> `gather_along_axis`, `coreai.conv2d` -> `conv`), and its
element types to MIL's (`f32` -> `FLOAT32`). A call of a composite (`coreai.invoke` of a LayerNorm
graph) counts as one op, as the runtime places it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobile_targets.neural_engine import EngineOp, census
from pipeline.errors import ArtifactError
from pipeline.manifest import NeuralEngineCensus

FUNCTION = "main"
NOT_COMPUTING = ("coreai.constant", "coreai.output")
MIL_NAMES = {"coreai.conv2d": "conv", "coreai.cast": "cast"}
CONV_DILATION_OPERAND = 3
"""coreai's conv2d takes (input, weight, stride, dilation, groups)."""
MIL_DTYPES = {"f32": "FLOAT32", "f16": "FLOAT16", "bf16": "BFLOAT16", "i1": "BOOL"}


def _dtype(value_type: Any) -> str:
    element = str(getattr(value_type, "element_type", value_type))
    return MIL_DTYPES.get(element, element.upper())


def _constant(value: Any) -> np.ndarray | None:
    """The value of an operand a `coreai.constant` makes, else None."""
    owner = value.owner
    if getattr(owner, "name", None) != "coreai.constant" or "value" not in owner.attributes:
        return None
    attribute = owner.attributes["value"]
    if getattr(attribute, "is_splat", False):
        return np.asarray([attribute.get_splat_value().value])
    return np.asarray(list(attribute))


def program_ops(asset: Path) -> list[EngineOp]:
    """The ops of the asset's `main` graph that compute (not its constants), in order."""
    from coreai.authoring.asset import AIModelAsset

    module = AIModelAsset.load(asset).program._module._mlir_module  # the program's MLIR, read only
    graphs = [op.operation for op in module.body.operations if "sym_name" in op.operation.attributes]
    main = [graph for graph in graphs if str(graph.attributes["sym_name"]).strip('"') == FUNCTION]
    if not main:
        raise ArtifactError(f"{asset}: no {FUNCTION!r} graph in the Core AI program")
    ops = []
    for index, operation in enumerate(main[0].regions[0].blocks[0].operations):
        op = operation.operation
        if op.name in NOT_COMPUTING:
            continue
        immediate = {}
        if op.name == "coreai.conv2d":
            dilations = _constant(op.operands[CONV_DILATION_OPERAND])
            if dilations is not None:
                immediate["dilations"] = dilations
        mil_type = MIL_NAMES.get(op.name, op.name.removeprefix("coreai.").removeprefix("decomposable."))
        dtypes = tuple(_dtype(result.type) for result in op.results)
        ops.append(EngineOp(mil_type, f"op {index} of {FUNCTION}", dtypes, immediate))
    return ops


def neural_engine_census(asset: Path) -> NeuralEngineCensus:
    """Every op of the asset's `main` graph against the Neural Engine rules."""
    return census(program_ops(asset))
