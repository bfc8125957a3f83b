"""ExecuTorch target: `.pte` programs lowered to XNNPACK, run by ExecuTorch's own runtime.

fp32: the large convolutions made linear layers (`ConvolutionAsLinear`), then torch.export ->
to_edge_transform_and_lower(XnnpackPartitioner) -> .pte.
int8: the same linear layers, PT2E quantization with XNNPACK's quantizer (per-channel symmetric
int8 weights, activations quantized per row at run time; INT8_SCHEME says why), then the same
lowering.
fp16 is not offered: the encoder cast to half and lowered to XNNPACK came out far from fp32
PyTorch while eager fp16 on CPU stays close, so the fault is in that lowering, not in fp16
(docs/executorch.md).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import ConvNorm
from torch import nn

from mobile_targets.base import CompanionFile, PartToConvert, Runner, Target
from pipeline.contract import PartContract
from pipeline.errors import ArtifactError, PipelineError
from pipeline.selftest import SelftestCase

PTE_IDENTIFIER_OFFSET = 4
PTE_IDENTIFIER_PREFIX = b"ET"
BUNDLED_SUFFIX = ".bpte"
BUNDLED_ATOL_MARGIN = 4.0
"""A bundled case's `atol` is this many times the largest absolute error the file shows here
against PyTorch fp32 on it (plus `BUNDLED_ATOL_FLOOR` of the output's scale): a phone's kernels
round differently from this machine's, an answer in the wrong ballpark is far outside."""
BUNDLED_ATOL_FLOOR = 1e-5


INT8_SCHEME = (
    "dynamic int8 linear layers (large convolutions as linear layers) and MBConv 1x1 convolutions, "
    "fp32 other convolutions"
)
"""Both parts use XNNPACK's dynamically quantized linear layers: int8 per-channel weights,
activations quantized per row at run time (XNNPACK's QD8 kernels), so every row keeps its own
scale. Static per-tensor int8 activations (calibrated on real photos) were tried first and lost
too much: the decoder's mask logits fell apart and the encoder's embeddings moved the deployed
pair's masks below the int8 gate (docs/executorch.md has the figures)."""


def _quantize_int8(part: PartToConvert) -> torch.nn.Module:
    """PT2E dynamic int8 for XNNPACK on the linear layers and stage 0's convolutions (`int8_layers` says why)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(part.module, part.example_inputs, strict=True).module()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    prepared = prepare_pt2e(graph, int8_layers(XNNPACKQuantizer(), config))
    with torch.no_grad():
        prepared(*part.example_inputs)
    return convert_pt2e(prepared)


def int8_layers(quantizer: Any, config: Any) -> Any:
    """Quantize the linear layers (most of the FLOPs and weights, and the large convolutions once
    `large_convolutions_as_linear` has made them linear layers) and the convolutions inside
    `INT8_CONVOLUTION_MODULES`; the other convolutions keep fp32.

    Why: int8 convolution weights cost embedding PSNR on top of the linear layers' loss
    (docs/executorch.md), and outside stage 0 int8 convolutions bought no time or
    failed to lower (`INT8_CONVOLUTION_MODULES`).
    XNNPACK's quantizer selects by a filter over every node of a pattern: its module-type filter
    also rejects the weights' get_attr nodes, which carry no module stack, so no convolution
    would be quantized through `set_module_type`; the filter here passes them.
    """
    return quantizer.set_global(config).set_filter_function(_from_int8_module)


INT8_CONVOLUTION_MODULES = ("timm.models.tiny_vit.MBConv",)
"""Module types whose convolutions the int8 files compute in int8 (XNNPACK's QD8 convolution;
the depthwise ones stay fp32: its quantizer has no dynamic depthwise form). Stage 0's MBConv
blocks run at 256 x 256 pixels: their four 1x1 convolutions are 4.3 of the encoder's 38.8 GMAC.
Not the patch embedding (no time gained) nor the patch mergings (ExecuTorch 1.5.1's
ChannelsLastTaggedReshapePass fails on them): `benchmarks/executorch_encoder_variants.py`."""


def _from_int8_module(node: Any) -> bool:
    """A node the int8 scheme quantizes: a call inside a linear layer or an
    `INT8_CONVOLUTION_MODULES` block, or any non-call node of its pattern (weights, inputs)."""
    if node.op != "call_function":
        return True
    wanted = {"torch.nn.modules.linear.Linear", *INT8_CONVOLUTION_MODULES}
    stack = node.meta.get("nn_module_stack", {}).values()
    return any((t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}") in wanted for _, t in stack)


def xnnpack_partitioners(precision: str) -> list[Any]:
    """XNNPACK's partitioner; for int8, first one that takes each quantized linear layer
    alone (with its run-time quantization), then the fp32 partitioner for everything between.

    Why the linear-only first pass: XNNPACK's own XnnpackDynamicallyQuantizedPartitioner works op
    by op with every op config, so it also claimed the fp32 convolutions and GELUs one by one and
    cut the encoder into 140 delegate calls joined by layout transposes.
    """
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if precision != "int8":
        return [XnnpackPartitioner()]
    linear_alone = XnnpackPartitioner(
        configs=[LinearConfig], config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True
    )
    return [linear_alone, XnnpackPartitioner()]


class LayerNormAsGemm(nn.Module):
    """nn.LayerNorm over the last dim, its two means taken as products with a 1/C column.

    Why: ExecuTorch 1.5.1's XNNPACK partitioner has no LayerNorm, and its `mean.dim` takes only
    4-D spatial means, so the encoder's 20 LayerNorms ran as portable kernels outside the
    delegate (the int8 encoder's ETDump showed them; docs/benchmark.md). A product with a constant column is
    an XNNPACK fully connected layer; subtract, multiply, rsqrt and add are XNNPACK ops too.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        channels = norm.normalized_shape[-1]
        self.register_buffer("average", torch.full((channels, 1), 1.0 / channels), persistent=False)
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        """A 2-D product: a batched one would be exported with expand_copy kernels outside XNNPACK."""
        return (x.reshape(-1, x.shape[-1]) @ self.average).reshape(*x.shape[:-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        variance = self._mean(centred * centred)
        return centred * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class ChannelNormAsConv(nn.Module):
    """segment-anything's LayerNorm2d (over channels of NCHW), its means as 1x1 convolutions with
    weights 1/C: XNNPACK takes those, not a mean over dim 1 (`LayerNormAsGemm` says why)."""

    def __init__(self, norm: LayerNorm2d) -> None:
        super().__init__()
        channels = norm.weight.shape[0]
        self.register_buffer("average", torch.full((1, channels, 1, 1), 1.0 / channels), persistent=False)
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.conv2d(x, self.average)
        variance = F.conv2d(centred * centred, self.average)
        normalized = centred * torch.rsqrt(variance + self.eps)
        return self.weight[:, None, None] * normalized + self.bias[:, None, None]


LINEAR_CONVOLUTION_MIN_WEIGHTS = 50_000
"""Convolutions of at least this many weights become linear layers: the neck's two and the last
patch merging's two 1x1 (825k of the encoder's 1.0M convolution weights). The small ones (patch
embedding, MBConv, depthwise) stay convolutions, in the int8 files fp32 but for the MBConvs'
(`int8_layers`)."""


class ConvolutionAsLinear(nn.Module):
    """A stride-1, "same"-padded convolution (NCHW in and out) as one linear layer on
    channels-last pixels: a k x k kernel takes the k * k shifted copies of its padded input side
    by side (im2col from slices and one concat), its weight laid out to match.

    Why: the int8 files quantize linear layers and only stage 0's convolutions (`int8_layers`
    says why not the others), so the large convolutions' weights stayed fp32 (a large share of the int8 encoder). As
    linear layers they get int8 weights and XNNPACK's dynamically quantized GEMMs inside the same
    delegate partition as the rest. In the fp32 files the neck's 3x3 convolution as a linear
    layer (XNNPACK's fully connected GEMM after the im2col copies) runs faster than XNNPACK's
    IGEMM convolution (`benchmarks/executorch_encoder_variants.py` measured it; docs/benchmark.md).
    The arithmetic is the convolution's own.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not convolution_fits_linear(conv):
            raise PipelineError(f"{conv} is not a stride-1, same-padded, ungrouped convolution")
        self.kernel, self.padding = conv.kernel_size[0], conv.padding[0]
        self.linear = nn.Linear(conv.in_channels * self.kernel**2, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            # (out, in, dy, dx) -> (out, dy, dx, in): forward puts shift (dy, dx) at block dy * k + dx
            self.linear.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1)
        if self.kernel > 1:
            pad = self.padding
            padded = F.pad(pixels, (0, 0, pad, pad, pad, pad))
            shifts = range(self.kernel)
            pixels = torch.cat([padded[:, dy : dy + height, dx : dx + width, :] for dy in shifts for dx in shifts], -1)
        out = self.linear(pixels.reshape(batch * height * width, -1))
        return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def convolution_fits_linear(conv: nn.Conv2d) -> bool:
    kernel = conv.kernel_size[0]
    return (
        conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.kernel_size == (kernel, kernel)
        and kernel % 2 == 1
        and conv.padding == ((kernel - 1) // 2,) * 2
    )


def conv_norms_fused(module: nn.Module) -> nn.Module:
    """`module` with every timm ConvNorm (convolution + BatchNorm) as its fused convolution, in place.

    Why: XNNPACK's quantizer takes a dynamically quantized convolution as the convolution alone,
    so the int8 MBConv convolutions carry their norm folded in (in fp32 XNNPACK folds it anyway);
    and `large_convolutions_as_linear` then sees plain convolutions.
    """
    for name, child in list(module.named_modules()):
        if isinstance(child, ConvNorm):
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attribute, child.fuse())
    return module


def large_convolutions_as_linear(module: nn.Module, min_weights: int = LINEAR_CONVOLUTION_MIN_WEIGHTS) -> nn.Module:
    """`module` with every convolution of at least `min_weights` weights that fits as
    `ConvolutionAsLinear`, in place (run `conv_norms_fused` first: a ConvNorm's convolution
    alone would lose its norm)."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Conv2d) and child.weight.numel() >= min_weights and convolution_fits_linear(child):
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attribute, ConvolutionAsLinear(child))
    return module


def norms_as_xnnpack_ops(module: nn.Module) -> nn.Module:
    """`module` with its LayerNorms as `LayerNormAsGemm` / `ChannelNormAsConv` (holding the
    norms' parameters), in place."""
    for name, child in list(module.named_modules()):
        replacement = (
            LayerNormAsGemm(child)
            if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1
            else ChannelNormAsConv(child)
            if isinstance(child, LayerNorm2d)
            else None
        )
        if replacement is not None:
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attribute, replacement)
    return module


def graph_for_xnnpack(module: nn.Module) -> nn.Module:
    """A copy of `module` with this target's graph patches (the original, which the reference
    predictor runs, is left as it was), the same for both precisions: BatchNorms fused, the large
    convolutions as linear layers, then the norms."""
    patched = large_convolutions_as_linear(conv_norms_fused(copy.deepcopy(module)))
    return norms_as_xnnpack_ops(patched).eval()


class ExecuTorchRunner(Runner):
    """A `.pte` loaded by `executorch.runtime` with the XNNPACK delegate."""

    def __init__(self, path: Path, contract: PartContract, threads: int | None = None) -> None:
        super().__init__(path, contract)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime, Verification

        check_pte_header(self.path)
        if threads:
            _unsafe_reset_threadpool(threads)
        try:
            program = Runtime.get().load_program(self.path, verification=Verification.InternalConsistency)
            self.method = program.load_method("forward")
        except (RuntimeError, ValueError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ArtifactError(f"{self.path} is not a loadable ExecuTorch program: {first}") from None
        if self.method is None:
            raise ArtifactError(f"{self.path} has no 'forward' method")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the program without the pybindings' output clone and copies the outputs with numpy.

        `Method.execute` clones every output with torch's parallel `aten::clone`; that wakes
        libgomp's OpenMP workers, whose spin-wait then takes a core from XNNPACK's threadpool on
        the next call, so two threads timed barely faster than one. An app's C++ runtime has no
        such clone. The outputs alias the program's buffers until the next call, hence the copy.
        """
        tensors = [torch.from_numpy(x) for x in self.ordered_inputs(inputs)]
        outputs = self.method._method(tensors, clone_outputs=False)
        return {name: out.numpy().copy() for name, out in zip(self.contract.output_names, outputs, strict=True)}


def check_pte_header(path: Path) -> None:
    """Reject what is clearly not a .pte before the runtime sees it."""
    if not path.is_file():
        raise ArtifactError(f"ExecuTorch program not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(8)
    identifier = head[PTE_IDENTIFIER_OFFSET:8]
    if len(head) < 8 or not identifier.startswith(PTE_IDENTIFIER_PREFIX):
        raise ArtifactError(f"{path} is not an ExecuTorch program (file identifier {identifier!r}, expected 'ET..')")


class ExecuTorchTarget(Target):
    name = "executorch"
    extension = ".pte"
    precisions = ("fp32", "int8")
    runtime_name = "executorch.runtime (XNNPACK delegate)"

    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        from executorch.exir import to_edge_transform_and_lower

        part = replace(part, module=graph_for_xnnpack(part.module))
        if precision == "fp32":
            module = part.module
        elif precision == "int8":
            module = _quantize_int8(part)
        else:
            raise PipelineError(f"executorch does not support precision {precision!r}")
        with torch.no_grad():
            program = torch.export.export(module, part.example_inputs, strict=precision != "int8")
        lowered = to_edge_transform_and_lower(program, partitioner=xnnpack_partitioners(precision))
        executorch_program = lowered.to_executorch()
        path.write_bytes(executorch_program.buffer)
        delegated, total = _delegation_summary(lowered)
        details: dict[str, Any] = {"xnnpack_delegated_nodes": delegated, "edge_nodes": total}
        if precision == "int8":
            details["int8_scheme"] = INT8_SCHEME
        return details

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        return ExecuTorchRunner(path, contract, threads)

    def companion_files(self, path: Path, part: PartToConvert) -> tuple[CompanionFile, ...]:
        """`<stem>.bpte`: ExecuTorch's BundledProgram of the file with its self-test cases, so an
        app that links ExecuTorch runs the check its runtime already has."""
        content, tolerances = bundled_program(path, part.contract, part.selftest)
        name = path.name[: -len(path.suffix)] + BUNDLED_SUFFIX
        details = {"format": "executorch BundledProgram", "method": "forward", "rtol": 0.0, "atol": tolerances}
        return (CompanionFile(name, content, details),)

    def verify_companion(self, path: Path, details: dict[str, Any]) -> str:
        verify_bundled_program(path.read_bytes(), list(details["atol"]), path.name)
        return f"{path.name}: {len(details['atol'])} bundled cases verified by ExecuTorch"

    def tool_packages(self) -> tuple[str, ...]:
        return ("executorch", "torchao")


def bundled_program(path: Path, contract: PartContract, cases: tuple[SelftestCase, ...]) -> tuple[bytes, list[float]]:
    """The `.pte` at `path` bundled with `cases` (inputs and PyTorch fp32's outputs, the self-test
    vectors), and each case's `atol`; checked here by ExecuTorch's own
    `verify_result_with_bundled_expected_output` before it is returned.

    The tolerance is absolute and per case (`BUNDLED_ATOL_MARGIN`): ExecuTorch's check compares
    element by element, which a PSNR gate does not, so it is set from what this file computes."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    if not cases:
        raise PipelineError(f"{path.name}: no self-test cases to bundle")
    runner = ExecuTorchRunner(path, contract)
    tests, tolerances = [], []
    for case in cases:
        actual = runner.run(case.inputs)
        error = max(float(np.abs(actual[name] - case.expected[name]).max()) for name in contract.output_names)
        scale = max(float(np.abs(case.expected[name]).max()) for name in contract.output_names)
        tolerances.append(float(f"{BUNDLED_ATOL_MARGIN * error + BUNDLED_ATOL_FLOOR * scale:.3g}"))
        inputs = [torch.from_numpy(np.ascontiguousarray(case.inputs[name])) for name in contract.input_names]
        expected = [torch.from_numpy(np.ascontiguousarray(case.expected[name])) for name in contract.output_names]
        tests.append(MethodTestCase(inputs=inputs, expected_outputs=expected))
    bundle = BundledProgram(None, [MethodTestSuite("forward", tests)], pte_file_path=str(path))
    content = bytes(serialize_from_bundled_program_to_flatbuffer(bundle))
    verify_bundled_program(content, tolerances, path.name)
    return content, tolerances


def verify_bundled_program(content: bytes, tolerances: list[float], name: str) -> None:
    """ExecuTorch's own check of every bundled case (`verify_result_with_bundled_expected_output`:
    it loads the bundled inputs, runs `forward` and compares); one line naming the case on a miss."""
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    try:
        bundle = _load_bundled_program_from_buffer(content)
    except (RuntimeError, ValueError) as error:
        raise ArtifactError(f"{name} is not a loadable ExecuTorch BundledProgram: {error}") from None
    for index, atol in enumerate(tolerances):
        try:
            bundle.verify_result_with_bundled_expected_output("forward", index, 0.0, atol)
        except RuntimeError as error:
            raise ArtifactError(f"{name}: bundled case {index} misses atol {atol}: {error}") from None


def _delegation_summary(lowered: Any) -> tuple[int, int]:
    """How many call nodes of the lowered graph remain outside XNNPACK, for the manifest."""
    graph = lowered.exported_program().graph
    calls = [node for node in graph.nodes if node.op == "call_function"]
    delegated = sum(1 for node in calls if "executorch_call_delegate" in str(node.target))
    return delegated, len(calls)


TARGET = ExecuTorchTarget()
