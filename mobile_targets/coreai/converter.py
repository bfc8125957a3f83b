"""Core AI target (iOS 27+ / macOS 27+): `.aimodel` assets from coreai-torch, run by Apple's own
Core AI runtime (`coreai.runtime`; its Linux build ships in the `coreai-core` wheel).

fp32: the export wrapper, `torch.export` with coreai-torch's decomposition table, then
`TorchConverter().add_exported_program(...).to_coreai().save_asset(...)`, one `main` function
per asset whose inputs and outputs carry the contract's names.
fp16: the same wrapper cast to half (`HalfPrecision`), its float inputs and outputs kept float32
at the boundary, the decoder's point encoding in fp32 (`Fp32PointEncoding` says why).
int8: the fp32 program with int8 weights (per output channel, symmetric) by Apple's coreai-opt
(`int8_weights`), decompressed by the runtime: a quarter of the fp32 file, scored in Apple's
runtime on every photo like fp32 (an int8-weight fp16 program would be emulated on Linux).

On Linux the runtime lowers the asset to its portable form (ODIX) when loaded and runs fp32 at
CPU speed; fp16 is emulated and slow (the runner's time says nothing about a phone either way).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from mobile_targets.base import PartToConvert, Runner, Target
from mobile_targets.coreai.neural_engine import neural_engine_census
from mobile_targets.graph_patches import without_bias_gathers
from pipeline.contract import PartContract
from pipeline.errors import ArtifactError, PipelineError
from pipeline.export_wrappers import PromptDecoderForExport

FUNCTION = "main"
ASSET_FILES = ("main.mlirb", "main.hash", "metadata.json")
"""What `save_asset` writes into an `.aimodel` folder: the program, its sha256, the metadata."""
LICENSE = "Apache-2.0"
Result = TypeVar("Result")


def _run_sync(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """coreai.runtime's API is async; the pipeline's runners are not."""
    return asyncio.run(coroutine)


class Fp32PointEncoding(nn.Module):
    """The prompt encoder's random Fourier point encoding in fp32 inside an fp16 decoder.

    Why: point coordinates reach 1024, where fp16 resolves 0.5 px, and the encoding multiplies
    them by a Gaussian matrix before sin/cos: in fp16 the decoder's masks moved away from PyTorch's
    (the Core ML target keeps the same ops in fp32 for the same reason, `fp32_point_encoding`)."""

    def __init__(self, pe_layer: nn.Module) -> None:
        super().__init__()
        self.inner = pe_layer

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        return self.inner._pe_encoding(coords.float()).half()


class HalfPrecision(nn.Module):
    """A part in fp16 with float32 inputs and outputs (the contract's); `point_coords` stays fp32."""

    def __init__(self, module: nn.Module, contract: PartContract) -> None:
        super().__init__()
        fp32_pe = None
        if isinstance(module, PromptDecoderForExport):
            fp32_pe = copy.deepcopy(module.prompt_encoder.pe_layer).float()
        self.inner = copy.deepcopy(module).half()
        if fp32_pe is not None:
            self.inner.prompt_encoder.pe_layer = Fp32PointEncoding(fp32_pe)
        self.input_names = contract.input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [x if name == "point_coords" else x.half() for name, x in zip(self.input_names, inputs, strict=True)]
        outputs = self.inner(*cast)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return tuple(output.float() for output in outputs)


def asset_metadata(part: PartToConvert, precision: str) -> Any:
    """Who made the asset, its license and what it is: the architecture, the weights, the I/O."""
    from coreai.runtime import AIModelAssetMetadata

    metadata = AIModelAssetMetadata()
    metadata.author = "mobilesam-mobile pipeline"
    metadata.license = LICENSE
    metadata.model_description = f"MobileSAM {part.name} ({precision}): {part.architecture}"
    metadata.set_custom("weights", part.weights_description or "unknown")
    metadata.set_custom("part", part.name)
    metadata.set_custom("precision", precision)
    metadata.set_custom("contract", part.contract.to_json())
    return metadata


def int8_weights(program: Any) -> Any:
    """The program with every large weight stored as int8, one scale per output channel.

    Why: a quarter of the fp32 asset's bytes for apps that ship the encoder in their bundle;
    coreai-opt rewrites the Core AI graph itself (no PyTorch), and the runtime decompresses the
    weights when it loads the function, so compute and I/O stay the fp32 program's."""
    from coreai_opt.coreai_utils import CompressionGranularity, DType, QScheme, quantize_weights

    return quantize_weights(
        coreai_program=program,
        dtype=DType.INT8,
        qscheme=QScheme.SYMMETRIC,
        granularity=CompressionGranularity.PER_CHANNEL,
        in_place=False,
    )


class CoreAIRunner(Runner):
    """An `.aimodel` in Apple's Core AI runtime: its `main` function, named inputs and outputs."""

    def __init__(self, path: Path, contract: PartContract, threads: int | None = None) -> None:
        super().__init__(path, contract)
        check_asset(self.path)
        from coreai.authoring.asset import AIModelAsset

        self._context = None
        try:
            asset = AIModelAsset.load(self.path)
            self._context = asset.executable()
            self._model = _run_sync(self._context.__aenter__())
            self._function = self._model.load_function(FUNCTION)
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ArtifactError(f"{self.path} is not a loadable Core AI asset: {first}") from None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coreai.runtime import NDArray

        ordered = self.ordered_inputs(inputs)
        arrays = {name: NDArray(array) for name, array in zip(self.contract.input_names, ordered, strict=True)}
        outputs = _run_sync(self._function(arrays))
        return {name: np.array(outputs[name].numpy(), dtype=np.float32) for name in self.contract.output_names}


def check_asset(path: Path) -> None:
    """One line for what is not a loadable `.aimodel` (missing, a file, a folder without its
    program, a program that does not match the sha256 the asset records) before the runtime sees it."""
    if not path.exists():
        raise ArtifactError(f"Core AI asset not found: {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a Core AI asset (expected an .aimodel folder)")
    missing = [name for name in ASSET_FILES if not (path / name).is_file()]
    if missing:
        raise ArtifactError(f"{path} is not a complete Core AI asset (missing {', '.join(missing)})")
    # the runtime aborts the process on a damaged program: check it against the digest the asset keeps
    if hashlib.sha256((path / "main.mlirb").read_bytes()).digest() != (path / "main.hash").read_bytes():
        raise ArtifactError(f"{path} is a damaged Core AI asset (main.mlirb does not match its main.hash)")


class CoreAITarget(Target):
    name = "coreai"
    extension = ".aimodel"
    precisions = ("fp32", "fp16", "int8")
    fp16_precisions = ("fp16",)  # int8 stores int8 weights over the fp32 program
    runtime_name = "coreai.runtime (Apple's Core AI runtime; on Linux its own Linux build)"

    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        import coreai_torch

        if precision not in self.precisions:
            raise PipelineError(f"coreai does not support precision {precision!r}")
        # the encoder's bias gathers as one-hot products: exact, and gather is among the ops the
        # Neural Engine is known not to run (mobile_targets/neural_engine.py)
        module = without_bias_gathers(part.module)
        module = module.eval() if precision != "fp16" else HalfPrecision(module, part.contract).eval()
        with torch.no_grad():
            program = torch.export.export(module, part.example_inputs, strict=False)
        program = program.run_decompositions(coreai_torch.get_decomp_table())
        converter = coreai_torch.TorchConverter()
        converter.add_exported_program(
            program, input_names=list(part.contract.input_names), output_names=list(part.contract.output_names)
        )
        program = converter.to_coreai()
        if precision == "int8":
            program = int8_weights(program)
        program.save_asset(path, asset_metadata(part, precision))
        details: dict[str, Any] = {
            "function": FUNCTION,
            "minimum_os": "iOS 27, macOS 27",
            "neural_engine": neural_engine_census(path),
        }
        if precision == "fp16":
            details["compute"] = "fp16, float32 inputs and outputs" + (
                ", point encoding fp32" if isinstance(part.module, PromptDecoderForExport) else ""
            )
        if precision == "int8":
            details["compute"] = "fp32; weights stored int8 per output channel (coreai-opt), decompressed at load"
        return details

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        return CoreAIRunner(path, contract, threads)

    def tool_packages(self) -> tuple[str, ...]:
        return ("coreai-torch", "coreai-core", "coreai-opt")

    def emulation_note(self) -> str | None:
        return "Core AI's Linux runtime (fp16 emulated): its time says nothing about an iPhone or a Mac"

    def selftest_only(self, part: str, precision: str) -> str | None:
        if precision != "fp16":
            return None
        return (
            "Core AI's Linux runtime emulates fp16 (minutes a call): scored in Apple's runtime on its self-test "
            "vectors when converted (`nox -s selftest` runs them again), not on every photo"
        )


TARGET = CoreAITarget()
