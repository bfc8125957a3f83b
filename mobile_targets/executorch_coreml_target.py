"""ExecuTorch with the Core ML delegate: `.pte` programs whose whole graph is one Core ML model.

This is how ExecuTorch apps reach Apple's Neural Engine: `to_edge_transform_and_lower` with
ExecuTorch's `CoreMLPartitioner` converts the graph with coremltools and stores the ML Program
inside the `.pte`; on the device ExecuTorch's Core ML backend compiles and runs it. fp16 (the
Neural Engine's precision) and fp32 are offered.

On Apple platforms the runner is ExecuTorch's runtime (its Core ML backend registered). Elsewhere
no runtime can execute the delegate, so the runner takes the Core ML payload out of the `.pte`
(ExecuTorch's own `extract_coreml_models`) and runs it in this project's MIL emulator, mapping
the delegate's tensor names back to the contract's: the file that is validated is the one
shipped, byte for byte.

The payload leaves out the delegate's debug maps (`without_debug_maps` says why).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_targets.base import PartToConvert, Runner, Target
from mobile_targets.executorch_target import ExecuTorchRunner, check_pte_header
from pipeline.contract import PartContract
from pipeline.errors import ArtifactError, PipelineError

COREML_BACKEND = "CoreMLBackend"
PAYLOAD_METADATA = Path("lowered_module/metadata.json")
PAYLOAD_PACKAGE = Path("lowered_module/model.mlpackage")


def _compile_specs(precision: str) -> list[Any]:
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend

    compute = {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}[precision]
    return CoreMLBackend.generate_compile_specs(compute_precision=compute, minimum_deployment_target=ct.target.iOS17)


@contextlib.contextmanager
def without_debug_maps() -> Iterator[None]:
    """Lower without the Core ML delegate's debug maps in the payload.

    Why: ExecuTorch 1.5.1's Core ML backend stores two JSON maps from its graph's debug handles
    to Core ML op names in every payload (coremltools writes `executorch_debug_handle_mapping.json`
    into the package whenever the MIL program still knows its EXIR debug handles; the backend adds
    `debug_info.json`): a few percent of the file (docs/file-sizes.md), read on the device only by
    ETDump's per-op profiling of the delegate (its runtime treats a missing map as none). The
    backend saves the package from the converted model; with the model's MIL program dropped
    after conversion there is no debug-handle scope to write, so neither map is made. The
    package itself (spec and weights) is what coremltools wrote.
    """
    from executorch.backends.apple.coreml.compiler import CoreMLBackend

    original = CoreMLBackend.__dict__["_convert_to_mlmodel"]

    def convert_and_forget_program(*args: Any, **kwargs: Any) -> Any:
        model = original.__func__(*args, **kwargs)
        model._mil_program = None
        return model

    CoreMLBackend._convert_to_mlmodel = staticmethod(convert_and_forget_program)
    try:
        yield
    finally:
        CoreMLBackend._convert_to_mlmodel = original


def _undelegated_ops(lowered: Any) -> list[str]:
    """Call nodes left outside the Core ML delegate (there must be none: the delegate is the model)."""
    graph = lowered.exported_program().graph
    return [
        str(node.target)
        for node in graph.nodes
        if node.op == "call_function"
        and "executorch_call_delegate" not in str(node.target)
        and "getitem" not in str(node.target)
    ]


class CoreMLPayloadRunner(Runner):
    """The Core ML model inside a `.pte`, run by the MIL emulator (Linux, Windows)."""

    def __init__(self, path: Path, contract: PartContract, threads: int | None = None) -> None:
        from executorch.examples.apple.coreml.scripts.extract_coreml_models import extract_coreml_models

        from mobile_targets.coreml.converter import EmulatedCoreMLRunner

        super().__init__(path, contract)
        check_pte_header(self.path)
        self._folder = tempfile.TemporaryDirectory(prefix="pte-coreml-")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints where it extracted to
                extracted = extract_coreml_models(self.path.read_bytes(), self._folder.name)
        except Exception as error:
            raise ArtifactError(f"{self.path}: cannot read its Core ML payload: {error}") from None
        if len(extracted) != 1:
            raise ArtifactError(f"{self.path} holds {len(extracted)} Core ML models, expected exactly one")
        metadata = json.loads((extracted[0] / PAYLOAD_METADATA).read_text())
        outputs = list(metadata["outputNames"])
        if len(outputs) != len(contract.output_names):
            raise ArtifactError(f"{self.path}: its Core ML model has outputs {outputs}")
        self.emulated = EmulatedCoreMLRunner(extracted[0] / PAYLOAD_PACKAGE, contract, threads, output_names=outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.emulated.run(inputs)


class ExecuTorchCoreMLTarget(Target):
    name = "executorch_coreml"
    extension = ".pte"
    precisions = ("fp32", "fp16")
    fp16_precisions = ("fp16",)

    @property
    def runtime_name(self) -> str:  # type: ignore[override]
        if sys.platform == "darwin":
            return "executorch.runtime (Core ML delegate)"
        return "Core ML payload of the .pte in the MIL emulator (ExecuTorch's Core ML delegate runs only on Apple)"

    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        from executorch.exir import to_edge_transform_and_lower

        if precision not in self.precisions:
            raise PipelineError(f"executorch_coreml does not support precision {precision!r}")
        with torch.no_grad():
            program = torch.export.export(part.module, part.example_inputs, strict=True)
        partitioner = CoreMLPartitioner(compile_specs=_compile_specs(precision))
        with without_debug_maps():
            lowered = to_edge_transform_and_lower(program, partitioner=[partitioner])
        left = _undelegated_ops(lowered)
        if left:
            raise PipelineError(f"{len(left)} ops stayed outside the Core ML delegate: {sorted(set(left))[:5]}")
        path.write_bytes(lowered.to_executorch().buffer)
        return {"delegate": COREML_BACKEND, "compute_precision": precision, "minimum_deployment_target": "iOS17"}

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        if sys.platform == "darwin":  # pragma: no cover - needs macOS
            return ExecuTorchRunner(path, contract, threads)
        return CoreMLPayloadRunner(path, contract, threads)

    def tool_packages(self) -> tuple[str, ...]:
        return ("executorch", "coremltools")

    def emulation_note(self) -> str | None:
        if sys.platform == "darwin":  # pragma: no cover - needs macOS
            return None
        return "Core ML runs only on Apple devices; the Linux emulator's time says nothing about them"


TARGET = ExecuTorchCoreMLTarget()
