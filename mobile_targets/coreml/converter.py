"""Core ML target: ML Program `.mlpackage` files from coremltools, for Xcode.

fp16 (the default on Apple devices) and fp32 come from `ct.convert`; int8 (8-bit linear weight
quantization) and palettize6 (6-bit k-means palettization) from `coremltools.optimize.coreml`
applied to the fp16 package, so compute stays fp16 and only the stored weights shrink. w8a8
(on request) adds int8 activations for the Neural Engine, calibrated on photos in the emulator
(`mobile_targets.coreml.activation_quantization`).

Each converter workaround is a function below with a docstring naming what it avoids. Core ML
cannot run on Linux, so `load_runner` gives `MLModel.predict` on macOS and the MIL emulator
(`mobile_targets.coreml.emulator`) elsewhere; both behind the same `Runner` interface.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_targets.base import PartToConvert, Runner, Target, replace_options
from mobile_targets.coreml.activation_quantization import (
    activation_plan,
    exported_node,
    module_paths,
    quantize_activations_and_weights,
)
from mobile_targets.coreml.neural_engine import neural_engine_census
from mobile_targets.graph_patches import without_bias_gathers
from pipeline.config import parse_bool
from pipeline.contract import (
    BATCHED_DECODER,
    DECODER,
    DECODER_PARTS,
    IMAGE_SIZE,
    LABEL_MEANINGS,
    PADDING_RULE,
    PIXEL_MEAN,
    PIXEL_STD,
    PartContract,
)
from pipeline.errors import ArtifactError, ConfigError, PipelineError
from pipeline.export_wrappers import exported_program
from pipeline.threads import torch_threads

DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18")
ENCODER_INPUTS = ("tensor", "image")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
WEIGHT_THRESHOLD = 2048
"""Tensors with fewer elements stay fp16 in the int8/palettized variants (biases, norms)."""

POINT_ENCODING_OPS = ("sin", "cos")
"""The ops that end the point positional encoding: everything from `point_coords` to them stays fp32."""


@dataclass(frozen=True)
class CoreMLOptions:
    """What an app developer picks; `[target_options.coreml]` in the config or --target-option."""

    minimum_deployment_target: str = "iOS17"
    encoder_input: str = "tensor"
    """"tensor": a float MLMultiArray of RGB 0..255; "image": an RGB CVPixelBuffer (ImageType)."""
    compute_units: str = "ALL"
    """For MLModel.predict on macOS; the Linux emulator ignores it."""
    fp32_point_encoding: bool = True
    """Keep point_coords -> sin/cos in fp32 in fp16 packages (benchmarks/coreml_point_encoding.py)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "fp32_point_encoding", parse_bool(self.fp32_point_encoding, "coreml option fp32_point_encoding")
        )
        for name, allowed in (
            ("minimum_deployment_target", DEPLOYMENT_TARGETS),
            ("encoder_input", ENCODER_INPUTS),
            ("compute_units", COMPUTE_UNITS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"coreml option {name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")


# --- graph patches ---------------------------------------------------------------------------


def fresh_tensor_types(contract: PartContract) -> tuple[list[Any], list[Any]]:
    """New `ct.TensorType`s for every conversion, fp32 at the boundary.

    Why: `ct.convert` mutates the TensorType objects it is given (after an fp16 conversion their
    dtype is fp16), so reused objects silently change the next package's interface. And with
    fp16 precision on iOS16+, inputs and outputs default to fp16, where pixel coordinates above
    512 have 0.5 px resolution; the contract's fp32 interface is kept explicitly.
    """
    import coremltools as ct

    inputs = [ct.TensorType(name=spec.name, shape=spec.shape, dtype=np.float32) for spec in contract.inputs]
    outputs = [ct.TensorType(name=spec.name, dtype=np.float32) for spec in contract.outputs]
    return inputs, outputs


class MeanSubtractedImageEncoder(torch.nn.Module):
    """The encoder for an ImageType input whose bias already subtracted the pixel mean."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.image_encoder = encoder.image_encoder
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image / self.pixel_std)


def image_input(module: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """Encoder with an RGB ImageType input: Core ML subtracts the mean as the image's bias.

    Why not all of the normalization in scale/bias: ImageType has one scale for all channels,
    and SAM's std differs per channel (58.395, 57.12, 57.375); folding it into one scale would
    be 1-2% off. So bias = -mean, scale = 1, and the per-channel divide stays in the graph.
    """
    import coremltools as ct

    image_type = ct.ImageType(
        name="image",
        shape=(1, 3, IMAGE_SIZE, IMAGE_SIZE),
        color_layout=ct.colorlayout.RGB,
        scale=1.0,
        bias=[-value for value in PIXEL_MEAN],
    )
    return MeanSubtractedImageEncoder(module).eval(), image_type


def keep_point_encoding_fp32(op: Any) -> bool:
    """FP16ComputePrecision op selector: False (stay fp32) on the path point_coords -> sin/cos.

    Why: in fp16, 2*pi is stored as 6.28125 and coordinates up to 1024 lose precision, which
    puts about 1.4% error into the point positional encoding's sin/cos arguments. That path is
    a handful of tiny ops, so keeping it fp32 costs nothing on device.
    """
    return not (_depends_on_input(op, "point_coords", {}) and _feeds_point_encoding(op, {}))


def _depends_on_input(op: Any, input_name: str, memo: dict[int, bool]) -> bool:
    if id(op) in memo:
        return memo[id(op)]
    memo[id(op)] = False
    found = False
    for value in op.inputs.values():
        for var in value if isinstance(value, list | tuple) else [value]:
            if (var.op is None and var.name == input_name) or (
                var.op is not None and _depends_on_input(var.op, input_name, memo)
            ):
                found = True
    memo[id(op)] = found
    return found


def _feeds_point_encoding(op: Any, memo: dict[int, bool]) -> bool:
    if op.op_type in POINT_ENCODING_OPS:
        return True
    if id(op) in memo:
        return memo[id(op)]
    memo[id(op)] = False
    found = any(_feeds_point_encoding(child, memo) for output in op.outputs for child in output.child_ops)
    memo[id(op)] = found
    return found


def compress_weights(model: Any, precision: str) -> Any:
    """8-bit symmetric per-channel linear quantization, or 6-bit k-means palettization."""
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        config = cto.OptimizationConfig(
            global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD
            )
        )
        return cto.linear_quantize_weights(model, config=config)
    if precision == "palettize6":
        config = cto.OptimizationConfig(
            global_config=cto.OpPalettizerConfig(
                mode="kmeans", nbits=6, granularity="per_tensor", weight_threshold=WEIGHT_THRESHOLD
            )
        )
        try:
            return cto.palettize_weights(model, config=config)
        except ModuleNotFoundError as error:  # k-means lives in scikit-learn
            raise PipelineError(f"6-bit palettization needs a package that is not installed: {error}") from None
    raise PipelineError(f"coreml has no weight compression called {precision!r}")


# --- metadata --------------------------------------------------------------------------------


def add_metadata(model: Any, part: PartToConvert, precision: str, options: CoreMLOptions) -> None:
    """What Xcode shows: description, author, license, version, every input and output, and the
    contract (labels, coordinate frame, padding rule, N) as user-defined metadata."""
    from importlib.metadata import version

    contract = part.contract
    what = {
        "image_encoder": f"{part.architecture}: image encoder, a 1024x1024 RGB image to a 256x64x64 embedding.",
        DECODER: f"{part.architecture}: SAM prompt encoder + mask decoder, an image embedding and "
        "point/box prompts to four low-resolution mask logits and their predicted IoU.",
        BATCHED_DECODER: f"{part.architecture}: SAM prompt encoder + mask decoder, batched: an image embedding "
        "and B prompts (one per row) to four low-resolution mask logits and their predicted IoU per prompt "
        "(segment everything).",
    }[contract.part]
    model.short_description = f"{what} {describe_precision(precision, options)}."
    model.author = "mobilesam-mobile pipeline; model: MobileSAM (Zhang et al. 2023) and Segment Anything (Meta AI)"
    model.license = "Apache-2.0 (MobileSAM and Segment Anything code and weights)"
    model.version = version("mobilesam-mobile")
    for spec in contract.inputs:
        description = spec.description
        if spec.name == "image" and options.encoder_input == "image":
            description = (
                "RGB image 1024x1024, longest side resized to 1024 and padded bottom-right with the pixel mean; "
                "the model subtracts the mean (image bias) and divides by the std"
            )
        model.input_description[spec.name] = description
    for spec in contract.outputs:
        model.output_description[spec.name] = spec.description
    metadata = {
        "com.github.mobilesam-mobile.part": contract.part,
        "com.github.mobilesam-mobile.precision": precision,
        "com.github.mobilesam-mobile.architecture": part.architecture,
        "com.github.mobilesam-mobile.weights": part.weights_description or "unknown",
        "com.github.mobilesam-mobile.contract": json.dumps(contract.to_json(), separators=(",", ":")),
        "com.github.mobilesam-mobile.padding_rule": PADDING_RULE,
    }
    if contract.part in DECODER_PARTS:
        metadata["com.github.mobilesam-mobile.num_points"] = str(contract.spec("point_coords").shape[1])
        metadata["com.github.mobilesam-mobile.point_labels"] = json.dumps(LABEL_MEANINGS)
        metadata["com.github.mobilesam-mobile.coordinate_frame"] = (
            "x, y pixels in the 1024 frame of the resized image (scale by 1024 / longest side)"
        )
    model.user_defined_metadata.update(metadata)


def describe_precision(precision: str, options: CoreMLOptions) -> str:
    """What was actually done to weights and compute, as the metadata and the manifest say it."""
    if precision == "fp32":
        return "fp32 weights and compute"
    compute = "fp16 compute, point positional encoding fp32" if options.fp32_point_encoding else "fp16 compute"
    weights = {
        "fp16": "fp16 weights",
        "int8": "int8 per-channel symmetric weights",
        "palettize6": "6-bit k-means palettized weights (one table per tensor)",
        "w8a8": (
            "int8 per-channel symmetric weights, int8 per-tensor symmetric activations calibrated on photos "
            "(adds and the encoder's residual-trunk layers float)"
        ),
    }[precision]
    return f"{weights}, {compute}"


def make_readable(path: Path) -> None:
    """coremltools saves 0600/0700 files; a deliverable is readable as other files (umask)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, directories, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in directories:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~mask)


# --- runners ---------------------------------------------------------------------------------


def _check_inputs(path: Path, found: list[str], contract: PartContract) -> None:
    if sorted(found) != sorted(contract.input_names):
        raise ArtifactError(
            f"{path} has inputs {sorted(found)}, expected the contract's {sorted(contract.input_names)}"
        )


class EmulatedCoreMLRunner(Runner):
    """The package's MIL program in the torch emulator (fp16 rounding where the program says fp16)."""

    def __init__(
        self,
        path: Path,
        contract: PartContract,
        threads: int | None = None,
        mode: str = "fp16",
        output_names: list[str] | None = None,
    ) -> None:
        """`output_names`: the program's names for the contract's outputs, in order, where they
        differ (a Core ML payload inside a `.pte` names them after ExecuTorch's graph nodes)."""
        from mobile_targets.coreml.emulator import MilProgram

        super().__init__(path, contract)
        self.program = MilProgram(self.path)
        self.mode = mode
        self.threads = threads
        self.output_names = list(output_names or contract.output_names)
        _check_inputs(self.path, list(self.program.inputs), contract)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = dict(zip(self.contract.input_names, self.ordered_inputs(inputs), strict=True))
        with torch_threads(self.threads):
            outputs = self.program.run(arrays, self.mode)
        return {
            name: np.asarray(outputs[program_name], dtype=np.float32)
            for name, program_name in zip(self.contract.output_names, self.output_names, strict=True)
        }


class MLModelRunner(Runner):  # pragma: no cover - needs macOS
    """Core ML itself (macOS): `MLModel.predict` with the chosen compute units."""

    def __init__(self, path: Path, contract: PartContract, compute_units: str = "ALL") -> None:
        import coremltools as ct

        super().__init__(path, contract)
        try:
            self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, compute_units))
        except Exception as error:
            raise ArtifactError(f"{self.path} is not a loadable Core ML package: {error}") from None
        self.image_inputs = {i.name for i in self.model.get_spec().description.input if i.type.HasField("imageType")}
        _check_inputs(self.path, [i.name for i in self.model.get_spec().description.input], contract)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        feed: dict[str, Any] = {}
        for name, array in zip(self.contract.input_names, self.ordered_inputs(inputs), strict=True):
            if name in self.image_inputs:
                pixels = np.clip(np.rint(array[0].transpose(1, 2, 0)), 0, 255).astype(np.uint8)
                feed[name] = Image.fromarray(pixels, "RGB")
            else:
                feed[name] = array
        outputs = self.model.predict(feed)
        return {name: np.asarray(outputs[name], dtype=np.float32) for name in self.contract.output_names}


class CoreMLTarget(Target):
    name = "coreml"
    extension = ".mlpackage"
    precisions = ("fp16", "fp32", "int8", "palettize6", "w8a8")
    fp16_precisions = ("fp16", "int8", "palettize6", "w8a8")  # compressed weights, fp16 compute
    keeps_ops_fp32 = True

    def __init__(self, options: CoreMLOptions | None = None) -> None:
        self.options = options or CoreMLOptions()

    @property
    def runtime_name(self) -> str:  # type: ignore[override]
        if sys.platform == "darwin":
            return f"Core ML MLModel.predict ({self.options.compute_units})"
        return "Core ML emulation on Linux (MIL program run op by op in torch, fp16 rounding as declared)"

    def with_options(self, options: Mapping[str, Any]) -> CoreMLTarget:
        return CoreMLTarget(replace_options(self.options, options, self.name))

    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        import coremltools as ct

        if precision not in self.precisions:
            raise PipelineError(f"coreml does not support precision {precision!r}")
        inputs, outputs = fresh_tensor_types(part.contract)
        module = self.module_to_export(part, precision)
        image_typed = part.name == "image_encoder" and self.options.encoder_input == "image"
        if image_typed:
            module, inputs[0] = image_input(module)
        program = exported_program(module, part.example_inputs)
        if part.fp32_ops and image_typed:
            raise PipelineError(
                f"{part.name} {precision}: keeping ops in fp32 (fp16 headroom) needs encoder_input=tensor"
            )
        compute_precision = (
            ct.precision.FLOAT32
            if precision == "fp32"
            else ct.transform.FP16ComputePrecision(
                op_selector=partial(self._computes_in_fp16, part.fp32_ops, {node.name for node in program.graph.nodes})
            )
        )
        model = ct.convert(
            program,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, self.options.minimum_deployment_target),
            compute_precision=compute_precision,
        )
        w8a8_details: dict[str, float] = {}
        if precision in ("int8", "palettize6"):
            model = compress_weights(model, precision)
        elif precision == "w8a8":
            if image_typed or part.calibration is None:
                raise PipelineError("w8a8 needs a tensor-input part with calibration photos (encoder_input=tensor)")
            plan = activation_plan(model, module_paths(program))
            model = quantize_activations_and_weights(
                model, part.calibration(), WEIGHT_THRESHOLD, self.options.minimum_deployment_target, plan
            )
            w8a8_details["int8_activation_mac_share"] = round(plan.int8_mac_share, 4)
        add_metadata(model, part, precision, self.options)
        model.save(str(path))
        make_readable(path)
        return {
            **w8a8_details,
            "neural_engine": neural_engine_census(path),
            "quantization": describe_precision(precision, self.options),
            "fp32_point_encoding": precision != "fp32" and self.options.fp32_point_encoding,
            "minimum_deployment_target": self.options.minimum_deployment_target,
            "encoder_input": "image (RGB ImageType, bias -mean)" if image_typed else "tensor",
        }

    def module_to_export(self, part: PartToConvert, precision: str) -> torch.nn.Module:
        """The part with the encoder's bias gathers as one-hot products: exact, and gather is among
        the ops the Neural Engine is known not to run (neural_engine.py)."""
        return without_bias_gathers(part.module)

    def _computes_in_fp16(self, fp32_ops: frozenset[str], nodes: set[str], op: Any) -> bool:
        """FP16ComputePrecision's op selector: every op but the point encoding's (unless the option
        is off) and the exported nodes the fp16 headroom keeps in fp32."""
        if self.options.fp32_point_encoding and not keep_point_encoding_fp32(op):
            return False
        return exported_node(op.name, nodes) not in fp32_ops

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        if sys.platform == "darwin":  # pragma: no cover - needs macOS
            return MLModelRunner(path, contract, self.options.compute_units)
        return EmulatedCoreMLRunner(path, contract, threads)

    def tool_packages(self) -> tuple[str, ...]:
        return ("coremltools",)

    def emulation_note(self) -> str | None:
        if sys.platform == "darwin":  # pragma: no cover - needs macOS
            return None
        return "Core ML runs only on Apple devices; the Linux emulator's time says nothing about them"


TARGET = CoreMLTarget()
