"""TFLite target: `.tflite` files from litert-torch, run by the LiteRT interpreter (XNNPACK).

fp32: litert_torch.convert with the contract's names as keyword inputs and dict outputs, so
an Android developer sees `image`, `point_coords`, ... and `low_res_masks`, not `args_0`.
fp16: ai-edge-quantizer weight-only float casting (fp16 weights, fp32 compute).
int8: ai-edge-quantizer; fully connected layers compute in int8 with activations quantized on the
fly, the convolutions keep fp32 compute (`int8_recipe` says which weights are int8 and why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_targets.base import PartToConvert, Runner, Target
from pipeline.contract import PartContract
from pipeline.errors import ArtifactError, PipelineError

SIGNATURE = "serving_default"
QUANTIZATION = {
    "fp32": "none",
    "fp16": "fp16 weights",
    "int8": "int8 fully connected (dynamic range) and neck, fp16 small convolutions",
}
TFLITE_IDENTIFIER = b"TFL3"


class NamedInputsOutputs(torch.nn.Module):
    """Keyword inputs and a dict of outputs named by the contract: litert-torch names the
    model's signature inputs after the keywords and its outputs after the dict keys."""

    def __init__(self, module: torch.nn.Module, contract: PartContract) -> None:
        super().__init__()
        self.inner = module
        self.input_names = contract.input_names
        self.output_names = contract.output_names

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.inner(*(inputs[name] for name in self.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.output_names, outputs, strict=True))


def _quantize(float_model: bytes, precision: str) -> bytes:
    """Post-training quantization of a float .tflite with ai-edge-quantizer."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    if precision == "int8":
        model_recipe = int8_recipe()
    elif precision == "fp16":
        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=recipe_manager.AlgorithmName.FLOAT_CASTING,
        )
        model_recipe = manager.get_quantization_recipe()
    else:
        raise PipelineError(f"tflite does not support precision {precision!r}")
    engine = quantizer.Quantizer(float_model, model_recipe)
    return bytes(engine.quantize().quantized_model)


def int8_recipe() -> list[dict[str, Any]]:
    """Int8 weights for the fully connected layers (computed in int8, activations quantized on the
    fly) and the neck's convolutions; fp16 weights for the other convolutions (later rules win).

    Why: the patch embedding, patch-merging and depthwise convolutions hold few parameters, yet
    int8 weights on them cost about 1.5 dB of embedding PSNR; the neck's convolutions are the large ones
    and cost almost nothing in int8 (README, "TFLite target", has the figures). Dynamic range on
    the convolutions bought no time, so they compute in fp32.
    """
    from ai_edge_quantizer import recipe

    (weight_only,) = recipe.weight_only_wi8_afp32()
    (dynamic,) = recipe.dynamic_wi8_afp32()
    fp16_weights = {
        **weight_only,
        "algorithm_key": "float_casting",
        "op_config": {
            **weight_only["op_config"],
            "weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT", "symmetric": True, "granularity": "TENSORWISE"},
        },
    }
    return [
        weight_only,
        {**dynamic, "operation": "FULLY_CONNECTED"},
        {**fp16_weights, "operation": "CONV_2D"},
        {**fp16_weights, "operation": "DEPTHWISE_CONV_2D"},
        {**weight_only, "regex": ".*Sequential_neck.*", "operation": "CONV_2D"},
    ]


def load_interpreter_class() -> Any:
    """ai-edge-litert's Interpreter, or tflite-runtime's (same API) where only that is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise PipelineError("no LiteRT interpreter: pip install ai-edge-litert (or tflite-runtime)") from None
    return Interpreter


class TFLiteRunner(Runner):
    """A `.tflite` in the LiteRT interpreter (XNNPACK delegate by default), called by signature."""

    def __init__(self, path: Path, contract: PartContract, threads: int | None = None) -> None:
        super().__init__(path, contract)
        if not self.path.is_file():
            raise ArtifactError(f"TFLite model not found: {self.path}")
        with self.path.open("rb") as handle:
            identifier = handle.read(8)[4:8]
        if identifier != TFLITE_IDENTIFIER:
            raise ArtifactError(f"{self.path} is not a TFLite model (file identifier {identifier!r}, expected b'TFL3')")
        try:
            interpreter = load_interpreter_class()(model_path=str(self.path), num_threads=threads or 1)
            self.signature = interpreter.get_signature_runner(SIGNATURE)
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ArtifactError(f"{self.path} is not a loadable TFLite model: {first}") from None
        expected = set(contract.input_names)
        found = set(self.signature.get_input_details())
        if found != expected:
            raise ArtifactError(f"{self.path} has inputs {sorted(found)}, expected the contract's {sorted(expected)}")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = dict(zip(self.contract.input_names, self.ordered_inputs(inputs), strict=True))
        outputs = self.signature(**arrays)
        return {name: np.asarray(outputs[name]) for name in self.contract.output_names}


class TFLiteTarget(Target):
    name = "tflite"
    extension = ".tflite"
    precisions = ("fp32", "fp16", "int8")
    runtime_name = "ai_edge_litert.interpreter (XNNPACK)"

    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        import litert_torch

        if precision not in self.precisions:
            raise PipelineError(f"tflite does not support precision {precision!r}")
        named = NamedInputsOutputs(part.module, part.contract).eval()
        sample = dict(zip(part.contract.input_names, part.example_inputs, strict=True))
        model = litert_torch.convert(named, sample_args=(), sample_kwargs=sample)
        data = bytes(model.model_content())
        if precision != "fp32":
            data = _quantize(data, precision)
        path.write_bytes(data)
        return {"quantization": QUANTIZATION[precision]}

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        return TFLiteRunner(path, contract, threads)

    def tool_packages(self) -> tuple[str, ...]:
        return ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")


TARGET = TFLiteTarget()
