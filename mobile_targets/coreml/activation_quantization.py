"""Core ML W8A8: coremltools' activation quantization, calibrated on real photos by the emulator.

What an app on an A17 / M4 or later wants for the Neural Engine's int8 compute: int8 weights and
int8 activations, as quantize/dequantize pairs around the convolutions and linear layers
(`coremltools.optimize.coreml.linear_quantize_activations`, iOS17+; adds and the layers that
read or write TinyViT's residual trunk stay float, `FLOAT_MODULES`), then int8 weights
(`linear_quantize_weights`). coremltools measures the activation ranges with `MLModel.predict`,
which exists only on macOS; here the same saved program runs in the MIL emulator instead
(`calibration_ranges`), so the ranges come from the very ops Core ML will run.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobile_targets.coreml.emulator import MilProgram
from pipeline.errors import PipelineError
from pipeline.fp16_range import module_of

MINIMUM_DEPLOYMENT_TARGETS = ("iOS17", "iOS18")
"""quantize / dequantize ops are iOS17 ops."""


def calibration_ranges(model: Any, package: Path, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Per tensor, the min and max over every calibration sample, in coremltools' stats form.

    The tensors are those coremltools would record (`ModelDebugger`'s intermediate outputs, plus
    the inputs), run by the emulator on the saved package (same ops, fp16 rounding where it says
    fp16). Each range keeps its tensor's dtype (MLModel.predict answers fp16 tensors in float16),
    because the quantize op's scale takes the range's dtype and must match its input's. A tensor
    that is zero on every sample gets the range [-1, 1]: coremltools refuses a zero scale, and
    zeros stay exact under any scale (fresh TinyViT weights zero the last BatchNorm of each
    MBConv block).
    """
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    program = MilProgram(package)
    outputs = set(program.output_names)
    debugger = ModelDebugger(model)
    names = [n for n in debugger.get_intermediate_output_names(lambda op: op.spec.type != "const") if n not in outputs]
    fp16_names = {name for op in program.operations for name, kind in op.outputs if kind.dtype == "FLOAT16"}
    ranges: dict[str, dict] = {}
    for sample in samples:
        values = {**sample, **program.run(sample, "fp16", intermediates=names)}
        for name, value in values.items():
            if name in outputs:
                continue
            dtype = np.float16 if name in fp16_names else np.float32
            low, high = dtype(np.min(value)), dtype(np.max(value))
            seen = ranges.setdefault(name, {"rmin": low, "rmax": high})
            seen["rmin"], seen["rmax"] = min(seen["rmin"], low), max(seen["rmax"], high)
    for seen in ranges.values():
        if seen["rmin"] == seen["rmax"] == 0:  # zeros on every sample: any scale keeps them exact
            seen["rmin"], seen["rmax"] = -type(seen["rmax"])(1), type(seen["rmax"])(1)
    _adjust_concat_surrounding_activation_stats(debugger._get_concat_op_info(), ranges)
    return ranges


@contextmanager
def calibrated_by(ranges: dict[str, dict]) -> Iterator[None]:
    """Hand `linear_quantize_activations` ranges measured here instead of by its own calibration.

    Why: coremltools 9.0 calibrates through `MLModel.predict`, which needs macOS's Core ML
    framework, and its running min/max assigns each sample's range before comparing, so only the
    last sample counts. `calibration_ranges` runs the emulator and takes the union over samples;
    the passes that insert the quantize/dequantize pairs stay coremltools' own.
    """
    import coremltools.optimize.coreml._post_training_quantization as post_training

    original = post_training._get_activation_calibration_stats
    post_training._get_activation_calibration_stats = lambda *_: ranges
    try:
        yield
    finally:
        post_training._get_activation_calibration_stats = original


QUANTIZED_OP_TYPES = ("conv", "linear", "add")
"""The ops coremltools puts quantize/dequantize pairs around."""


def fp32_compute_ops(model: Any) -> list[str]:
    """Names of the quantizable ops an fp16 package computes in fp32 (the decoder's point
    positional encoding, kept fp32 on purpose): their activations stay float.

    Why: coremltools' concat handling shares one range between the tensors around a concat, so
    an fp32 tensor can get an fp16 range, and the quantize op it inserts then has an fp16 scale
    on an fp32 input, which its own type check refuses.
    """
    from coremltools.converters.mil.mil import types

    main = model._mil_program.functions["main"]
    return [
        op.name
        for op in main.operations
        if op.op_type in QUANTIZED_OP_TYPES and any(output.dtype == types.fp32 for output in op.outputs)
    ]


FLOAT_OP_TYPES = ("add",)
"""Ops whose inputs stay float: their convolutions' and linear layers' inputs still go int8.

Why: the adds join tensors of very different ranges (positional encodings in [-1, 1] onto token
and image streams, residuals), and one int8 range per input cost accuracy: with the adds
quantized both the decoder's self-test masks and the encoder's embeddings fell further from
PyTorch (docs/coreml.md, w8a8)."""


FLOAT_MODULES = (
    r"\.local_conv\.",
    r"\.attn\.(.*\.)?proj$",
    r"\.downsample\.conv2\.",
    r"\.stages\.1\.downsample\.",
)
"""Module paths (regular expressions) whose convolutions and linear layers keep float activations.

Why: per-tensor int8 on TinyViT's residual trunk costs far more than anywhere else. A block's
`local_conv` (depthwise) reads and writes the trunk itself, each attention's `proj` writes into
it, and the patch mergings' depthwise convolutions and all of the first merging (stage 0's
64-channel trunk at 256x256 into stage 1) carry it between stages. Found by quantizing one group
of layers at a time on held-out photos (docs/coreml.md, w8a8); these layers hold few of
the encoder's multiply-adds (`ActivationPlan.int8_mac_share`)."""


@dataclass(frozen=True)
class ActivationPlan:
    """Which quantizable ops keep float activations, and how much compute the int8 ones hold."""

    float_ops: tuple[str, ...]
    """MIL op names whose activations stay float (fp32-compute ops and `FLOAT_MODULES`' layers)."""
    int8_mac_share: float
    """Fraction of the convolutions' and linear layers' multiply-adds with int8 activations."""


def module_paths(program: Any) -> dict[str, str]:
    """FX node name -> innermost module path, from a torch.export program.

    coremltools names each MIL op after the node it came from (`exported_node`), so this is how a
    MIL op finds its module: a convolution fused with its BatchNorm carries the BatchNorm node's
    name, which sits in the same parent module."""
    return {node.name: module_of(node) for node in program.graph.nodes if node.meta.get("nn_module_stack")}


def exported_node(op_name: str, nodes: Container[str]) -> str:
    """The exported node (one of `nodes`) a MIL op came from: the op's name without `_cast_fp16`
    (added once fp16), and without the `_0` coremltools appends to a node named like its op type
    (the first `linear` node becomes `linear_0`)."""
    name = op_name.removesuffix("_cast_fp16")
    return name if name in nodes else name.removesuffix("_0")


def module_path(op_name: str, paths: Mapping[str, str]) -> str:
    """The module path of a MIL op ("" when none)."""
    return paths.get(exported_node(op_name, paths), "")


def activation_plan(model: Any, paths: Mapping[str, str]) -> ActivationPlan:
    """The ops of `model` (an fp16 ML Program) whose activations stay float, given `paths` from
    `module_paths` on the program it was converted from."""
    main = model._mil_program.functions["main"]
    quantizable = [op for op in main.operations if op.op_type in ("conv", "linear")]
    in_float_modules = {
        op.name for op in quantizable if any(re.search(p, module_path(op.name, paths)) for p in FLOAT_MODULES)
    }
    float_ops = tuple(fp32_compute_ops(model)) + tuple(sorted(in_float_modules))
    macs = {op.name: _multiply_adds(op) for op in quantizable}
    total = sum(macs.values())
    int8 = sum(count for name, count in macs.items() if name not in float_ops)
    return ActivationPlan(float_ops=float_ops, int8_mac_share=int8 / total if total else 0.0)


def _multiply_adds(op: Any) -> int:
    """Output elements times each output's reduction length (conv weight O x I/g x kH x kW,
    linear weight O x I)."""
    return int(np.prod(op.outputs[0].shape)) * int(np.prod(op.inputs["weight"].shape[1:]))


def quantize_activations_and_weights(
    model: Any,
    samples: Sequence[dict[str, np.ndarray]],
    weight_threshold: int,
    deployment_target: str,
    plan: ActivationPlan,
) -> Any:
    """An fp16 ML Program with int8 activations (per tensor, symmetric) except the plan's float
    ops, and int8 weights (per channel, symmetric); `samples` are the calibration inputs, by
    input name."""
    import coremltools.optimize.coreml as cto

    if deployment_target not in MINIMUM_DEPLOYMENT_TARGETS:
        raise PipelineError(
            f"w8a8 needs minimum_deployment_target iOS17 or later (quantize/dequantize ops), got {deployment_target}"
        )
    if not samples:
        raise PipelineError("w8a8 needs calibration samples (photos), got none")
    activations = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"),
        op_name_configs=dict.fromkeys(plan.float_ops),
        op_type_configs=dict.fromkeys(FLOAT_OP_TYPES),
    )
    weights = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=weight_threshold
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "float.mlpackage"
        model.save(str(package))
        ranges = calibration_ranges(model, package, samples)
    with calibrated_by(ranges):
        quantized = cto.linear_quantize_activations(model, activations, [dict(s) for s in samples])
    return cto.linear_quantize_weights(quantized, weights)
