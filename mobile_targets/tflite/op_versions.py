"""Operator versions a quantized `.tflite` must declare, so that a runtime too old for an op's
kernel refuses the file at load instead of computing something else.

A TFLite runtime picks each op's kernel by (builtin, version) and refuses a version it does not
register ("Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'"). TensorFlow's
converter writes each op's version from its signature (`tensorflow/lite/tools/versioning/
op_version.cc`); ai-edge-quantizer rewrites weights and types but keeps the float model's
versions. Its dynamic-range FULLY_CONNECTED (float input, per-channel int8 weights) thus kept
version 5, and tflite-runtime 2.14, whose FULLY_CONNECTED kernel predates per-channel hybrid
weights (version 12), loaded it and read the per-channel scales as one per-tensor scale: zero
outputs, no error, wrong masks (docs: "Runtime compatibility").

`declare_required_versions` raises every op code to the version its ops' signatures require,
by the same rules as op_version.cc for the signatures the quantizer writes; versions are only
raised (a newer kernel still runs every older version), never lowered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ArtifactError


@dataclass(frozen=True)
class TensorSignature:
    """What op_version.cc reads of an op's tensor: its type and whether it is per-channel."""

    type: int
    per_channel: bool


Signatures = list[TensorSignature | None]
"""An op's inputs or outputs in order (None for an omitted optional input)."""


def _hybrid(inputs: Signatures, outputs: Signatures, weight_index: int) -> bool:
    """Float activations with int8 weights (dynamic range or weight-only quantization)."""
    from ai_edge_litert import schema_py_generated as schema

    float32, int8 = schema.TensorType.FLOAT32, schema.TensorType.INT8
    weight = inputs[weight_index] if len(inputs) > weight_index else None
    return (
        inputs[0] is not None
        and inputs[0].type == float32
        and weight is not None
        and weight.type == int8
        and bool(outputs)
        and outputs[0] is not None
        and outputs[0].type == float32
    )


def fully_connected_version(inputs: Signatures, outputs: Signatures, options: Any) -> int:
    """op_version.cc: per-channel hybrid 12; hybrid with asymmetric inputs 9; hybrid 3."""
    if not _hybrid(inputs, outputs, 1):
        return 1
    if inputs[1] is not None and inputs[1].per_channel:
        return 12
    if options is not None and getattr(options, "asymmetricQuantizeInputs", False):
        return 9
    return 3


def conv_2d_version(inputs: Signatures, outputs: Signatures, options: Any) -> int:
    """op_version.cc: per-channel hybrid 5; hybrid 2."""
    if not _hybrid(inputs, outputs, 1):
        return 1
    return 5 if inputs[1] is not None and inputs[1].per_channel else 2


def depthwise_conv_2d_version(inputs: Signatures, outputs: Signatures, options: Any) -> int:
    """op_version.cc: per-channel hybrid 6; hybrid 4."""
    if not _hybrid(inputs, outputs, 1):
        return 1
    return 6 if inputs[1] is not None and inputs[1].per_channel else 4


def dequantize_version(inputs: Signatures, outputs: Signatures, options: Any) -> int:
    """op_version.cc: fp16 or int16 input 3; per-channel int8 5; int8 2."""
    from ai_edge_litert import schema_py_generated as schema

    source = inputs[0] if inputs else None
    if source is None:
        return 1
    if source.type in (schema.TensorType.FLOAT16, schema.TensorType.INT16):
        return 3
    if source.type == schema.TensorType.INT8:
        return 5 if source.per_channel else 2
    return 1


VersionRule = Callable[[Signatures, Signatures, Any], int]


def _rules() -> dict[int, VersionRule]:
    from ai_edge_litert import schema_py_generated as schema

    return {
        schema.BuiltinOperator.FULLY_CONNECTED: fully_connected_version,
        schema.BuiltinOperator.CONV_2D: conv_2d_version,
        schema.BuiltinOperator.DEPTHWISE_CONV_2D: depthwise_conv_2d_version,
        schema.BuiltinOperator.DEQUANTIZE: dequantize_version,
    }


def _signature(subgraph: Any, index: int) -> TensorSignature | None:
    if index < 0:
        return None
    tensor = subgraph.tensors[index]
    scales = tensor.quantization.scale if tensor.quantization is not None else None
    return TensorSignature(int(tensor.type), scales is not None and len(scales) > 1)


def required_versions(model: Any) -> dict[int, int]:
    """Op code index -> the highest version any of its ops' signatures requires (only the
    builtins with a rule; the others keep what the converter wrote)."""
    rules = _rules()
    required: dict[int, int] = {}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            rule = rules.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if rule is None:
                continue
            inputs = [_signature(subgraph, int(i)) for i in op.inputs]
            outputs = [_signature(subgraph, int(i)) for i in op.outputs]
            version = rule(inputs, outputs, op.builtinOptions)
            required[op.opcodeIndex] = max(required.get(op.opcodeIndex, 1), version)
    return required


def declare_required_versions(model_content: bytes) -> bytes:
    """The model with every op code's version raised to what its ops require; the tensors,
    weights and ops are untouched (a runtime that loads both computes the same)."""
    from ai_edge_litert.tools import flatbuffer_utils

    try:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))
    except Exception as error:  # the flatbuffer reader raises whatever its parser hits
        raise ArtifactError(f"not a TFLite flatbuffer: {error}") from None
    for index, version in required_versions(model).items():
        code = model.operatorCodes[index]
        code.version = max(int(code.version), version)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def declared_versions(model_content: bytes) -> dict[str, int]:
    """Builtin name -> the highest version the file declares (the manifest records them)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))
    versions: dict[str, int] = {}
    for code in model.operatorCodes:
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        versions[name] = max(versions.get(name, 0), int(code.version))
    return dict(sorted(versions.items()))
