"""ExecuTorch target: `.pte` programs lowered to XNNPACK, run by ExecuTorch's own runtime.

fp32: torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte.
int8: PT2E quantization with XNNPACK's quantizer (per-channel symmetric int8 weights, activations
quantized per row at run time; INT8_SCHEME says why), then the same lowering.
fp16 is not offered: the encoder cast to half and lowered to XNNPACK came out at 11.8 dB PSNR
against fp32 PyTorch (eager fp16 on CPU: 67 dB), so the fault is in that lowering, not in fp16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_targets.base import PartToConvert, Runner, Target
from pipeline.contract import PartContract
from pipeline.errors import ArtifactError, PipelineError

PTE_IDENTIFIER_OFFSET = 4
PTE_IDENTIFIER_PREFIX = b"ET"


INT8_SCHEME = {"image_encoder": "dynamic", "prompt_decoder": "dynamic"}
"""How each part is quantized to int8. Both use XNNPACK's dynamically quantized linear layers:
int8 per-channel weights, activations quantized per row at run time (XNNPACK's QD8 kernels), so
every row keeps its own scale. Static per-tensor int8 activations were tried first and lost too
much: the decoder's mask logits fell apart and the encoder's embeddings moved the deployed pair's
masks below the int8 gate (README, "ExecuTorch target", has the figures)."""

INT8_CONVOLUTIONS = ".neck."
"""Only convolutions inside this module path are quantized; the others keep fp32 weights."""


def keep_small_convolutions_fp32(graph: torch.fx.GraphModule) -> int:
    """Drop the int8 annotation of every convolution outside the encoder's neck.

    Why: the patch embedding and the patch-merging convolutions hold few parameters but their
    int8 weights cost more of the embeddings' accuracy than all the linear layers together; the
    neck's 3x3 convolution is the one large convolution and quantizes well. XNNPACK's quantizer
    has no per-module opt-out in dynamic mode (`set_module_name(name, None)` is refused), so the
    annotation is removed after `annotate`. Returns how many convolutions were kept fp32.
    """
    kept = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or "conv" not in str(node.target):
            continue
        if "quantization_annotation" not in node.meta:
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        owner = stack[-1][0] if stack else ""
        if INT8_CONVOLUTIONS not in owner:
            del node.meta["quantization_annotation"]
            kept += 1
    return kept


def _quantize_int8(part: PartToConvert) -> torch.nn.Module:
    """PT2E int8 for XNNPACK: static with real-photo calibration, or dynamic (INT8_SCHEME)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class Int8Quantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            keep_small_convolutions_fp32(model)
            return model

    dynamic = INT8_SCHEME[part.name] == "dynamic"
    if not dynamic and not part.calibration:
        raise PipelineError(f"int8 {part.name} needs calibration inputs from real photos; none were given")
    graph = torch.export.export(part.module, part.example_inputs, strict=True).module()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    prepared = prepare_pt2e(graph, Int8Quantizer().set_global(config))
    with torch.no_grad():
        for inputs in (part.example_inputs,) if dynamic else part.calibration:
            prepared(*inputs)
    return convert_pt2e(prepared)


def xnnpack_partitioners(precision: str, part_name: str) -> list[Any]:
    """XNNPACK's partitioners; for int8, the dynamic-quantization one first where the part uses
    it, and no constant-pad support.

    Why: TinyViT pads windows (F.pad) on int8 tensors, and XNNPACK in ExecuTorch 1.5.1 accepts
    the pad at partition time but fails to compile it ("Failed to create StaticConstantPad
    node ... xnn_status_invalid_parameter"), so the program does not load. Left to the
    portable kernels the pads run, at the cost of splitting the delegate into more segments.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, ConstantPadConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )

    if precision != "int8":
        return [XnnpackPartitioner()]
    without_pad = XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c is not ConstantPadConfig])
    if INT8_SCHEME[part_name] == "dynamic":
        return [XnnpackDynamicallyQuantizedPartitioner(), without_pad]
    return [without_pad]


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
        tensors = [torch.from_numpy(x) for x in self.ordered_inputs(inputs)]
        outputs = self.method.execute(tensors)
        return {name: out.numpy() for name, out in zip(self.contract.output_names, outputs, strict=True)}


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

        if precision == "fp32":
            module = part.module
        elif precision == "int8":
            module = _quantize_int8(part)
        else:
            raise PipelineError(f"executorch does not support precision {precision!r}")
        with torch.no_grad():
            program = torch.export.export(module, part.example_inputs, strict=precision != "int8")
        lowered = to_edge_transform_and_lower(program, partitioner=xnnpack_partitioners(precision, part.name))
        executorch_program = lowered.to_executorch()
        path.write_bytes(executorch_program.buffer)
        delegated, total = _delegation_summary(lowered)
        details: dict[str, Any] = {"xnnpack_delegated_nodes": delegated, "edge_nodes": total}
        if precision == "int8":
            details["int8_scheme"] = INT8_SCHEME[part.name]
        return details

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        return ExecuTorchRunner(path, contract, threads)

    def tool_packages(self) -> tuple[str, ...]:
        return ("executorch", "torchao")


def _delegation_summary(lowered: Any) -> tuple[int, int]:
    """How many call nodes of the lowered graph remain outside XNNPACK, for the manifest."""
    graph = lowered.exported_program().graph
    calls = [node for node in graph.nodes if node.op == "call_function"]
    delegated = sum(1 for node in calls if "executorch_call_delegate" in str(node.target))
    return delegated, len(calls)


TARGET = ExecuTorchTarget()
