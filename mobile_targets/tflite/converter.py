"""TFLite target: `.tflite` files from litert-torch, run by the LiteRT interpreter (XNNPACK).

fp32: litert_torch.convert with the contract's names as keyword inputs and dict outputs, so
an Android developer sees `image`, `point_coords`, ... and `low_res_masks`, not `args_0`.
fp16: ai-edge-quantizer weight-only float casting (fp16 weights); the encoder also asks XNNPACK
for fp16 arithmetic (`arithmetic`), which phones run it in, with GELU in its tanh form.
int8: ai-edge-quantizer; fully connected layers and the large convolutions compute in int8 with
activations quantized on the fly, the others keep fp32 compute (`int8_recipe` says which and why).
w8a8 (on request): full-integer static int8, every op on int8 tensors with ranges calibrated by
the LiteRT interpreter on real photos, the form NPU delegates take (`quantize_full_integer`);
float or int8 inputs and outputs (option `integer_io`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.tiny_vit import Attention as TinyVitAttention

from mobile_targets.base import PartToConvert, Runner, Target, replace_options
from mobile_targets.tflite.arithmetic import ForcedFp16Signature, declared_arithmetic, mark_fp16_arithmetic
from mobile_targets.tflite.gpu_ready import gpu_ready
from mobile_targets.tflite.mixed_precision import MixedPlan, plan_float_regions, scope_pattern, target_for
from mobile_targets.tflite.op_versions import declare_required_versions
from pipeline.config import parse_bool
from pipeline.contract import ENCODER, PartContract
from pipeline.errors import ArtifactError, PipelineError
from pipeline.export_wrappers import PromptDecoderForExport
from pipeline.gates import DEFAULT_GATES

SIGNATURE = "serving_default"
QUANTIZATION = {
    "fp32": "none",
    "fp16": "fp16 weights",
    "int8": "int8 fully connected, MBConv 1x1 and neck convolutions (dynamic range), fp16 other convolutions",
    "w8a8": "static int8 weights and activations, calibrated on real photos; where int8 costs the part its "
    "target, the costliest regions keep float activations (details.mixed_precision)",
}
FP16_ARITHMETIC_QUANTIZATION = "fp16 weights, fp16 arithmetic where XNNPACK computes fp16 natively (tanh GELU)"
"""The fp16 encoder's scheme (`computes_in_fp16`)."""
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
    """int8 compute (int8 weights, activations quantized on the fly) for the fully connected
    layers, the MBConv blocks' 1x1 convolutions and the neck's two; fp16 weights with fp32 compute
    for the other convolutions (later rules win).

    Why: the MBConvs' 1x1 convolutions run at 256 x 256 pixels and, with the neck's, are a large
    share of the encoder's multiply-adds; in dynamic range int8 XNNPACK runs them on its int8
    GEMMs, which saves time for little embedding PSNR. The patch embedding, patch-merging and
    depthwise convolutions hold few parameters, yet int8 weights on them cost accuracy, and
    dynamic range on them bought no time (`benchmarks/tflite_int8_recipes.py` measures each
    choice; docs/tflite.md has the figures). Weights under `INT8_MIN_WEIGHTS` elements stay float.
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
    rules = [
        weight_only,
        {**dynamic, "operation": "FULLY_CONNECTED"},
        {**fp16_weights, "operation": "CONV_2D"},
        {**fp16_weights, "operation": "DEPTHWISE_CONV_2D"},
        *({**dynamic, "regex": regex, "operation": "CONV_2D"} for regex in INT8_CONVOLUTIONS),
    ]
    return [{**rule, "op_config": {**rule["op_config"], "min_weight_elements": INT8_MIN_WEIGHTS}} for rule in rules]


INT8_MIN_WEIGHTS = 2048
"""Weights with fewer elements keep float in `int8_recipe`: the prompt encoder's label table (a
one-hot product in the GPU-ready graph, `gpu_ready`) and Fourier Gaussians, the IoU head's last
layer, the small one-hot matrices; a few KB. Quantized, they moved the decoder's box prompts enough
for validate to fail the int8 pair on held-out photos (docs/tflite.md)."""


INT8_CONVOLUTIONS = (".*MBConv.*", ".*Sequential_neck.*")
"""Tensor-name patterns (litert-torch's module paths) of the convolutions `int8_recipe` computes
in int8: the MBConv blocks' and the neck's."""


@dataclass(frozen=True)
class TFLiteOptions:
    """`[target_options.tflite]` in the config or --target-option tflite.KEY=VALUE."""

    integer_io: bool = False
    """The w8a8 image encoder takes and returns int8 tensors (scale and zero point in the file)
    instead of float32 ones: the image's 0..255 fit exactly. The decoder keeps float32 inputs and
    outputs (its point coordinates, 0..1024, do not fit int8). The runner quantizes and
    dequantizes by the file's own parameters."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "integer_io", parse_bool(self.integer_io, "tflite option integer_io"))


def gelu_as_tanh_approximation(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose GELUs use the tanh approximation (at most 5e-4 from the exact one,
    under fp16's resolution).

    Why: in fp16 arithmetic the XNNPACK that LiteRT ships has a vectorized kernel for the tanh
    GELU only; its exact GELU falls back to scalar code, which took most of the fp16 encoder's
    call (docs/tflite.md). The tanh form runs at memory speed."""
    patched = copy.deepcopy(module)
    for parent in list(patched.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.GELU) and child.approximate == "none":
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
    return patched


def computes_in_fp16(part: PartToConvert, precision: str) -> bool:
    """The fp16 encoder asks for fp16 arithmetic; the decoder keeps fp32 arithmetic.

    Why not the decoder: forced to fp16, its masks fell under the fp16 gate's mask IoU against
    PyTorch on the self-test prompts for little time saved, while the encoder, which takes most of
    the time, stays far above its gate (docs/tflite.md)."""
    return precision == "fp16" and part.name == ENCODER


def attention_exp_as_sigmoids(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose attention (TinyViT's in the encoder, the two-way transformer's in
    the decoder) normalizes after the product with the values, with exp and max built from ops
    that full-integer quantization takes (`exp_weighted_values`, `exp_weighted_kept_values`)."""
    patched = copy.deepcopy(module)
    for child in patched.modules():
        if isinstance(child, TinyVitAttention):
            child.weighted_values = exp_weighted_values
        elif isinstance(child, PromptDecoderForExport):
            child.weighted_values = exp_weighted_kept_values
    return patched


def exp_below_row_max(scores: torch.Tensor) -> torch.Tensor:
    """exp(scores - max over the last axis) as sigmoid(z) / sigmoid(-z), z <= 0, the max a max pool.

    Why: ai-edge-quantizer has no int8 EXP or REDUCE_MAX; LOGISTIC, DIV and MAX_POOL_2D are
    integer ops. The result is in [0, 1] with the row's largest exactly 1."""
    keys = scores.shape[-1]
    flat = scores.reshape(-1, 1, 1, keys)
    z = flat - F.max_pool2d(flat, kernel_size=(1, keys))
    return (torch.sigmoid(z) / torch.sigmoid(-z)).view(scores.shape)


def exp_weighted_values(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ values as (e @ values) / sum(e), e = `exp_below_row_max(scores)`.

    Why: an int8 SOFTMAX has the fixed output scale 1/256, and attention over 49 to 196 tokens
    has weights near 1/tokens, a few steps each: the full-integer encoder lost most of its
    embedding PSNR to it, and the int16 form was worse (docs/tflite.md). Normalizing after the
    product keeps e in [0, 1] (the largest is 1) and divides well-scaled sums. In fp32 it is the
    same arithmetic up to rounding.
    """
    weights = exp_below_row_max(scores)
    return torch.bmm(weights, values) / weights.sum(dim=-1, keepdim=True)


def exp_weighted_kept_values(logits: torch.Tensor, values: torch.Tensor, key_keep: torch.Tensor | None) -> torch.Tensor:
    """The decoder's softmax over the kept keys @ values, as (e * keep) @ values / sum(e * keep).

    Why: the float decoder masks a key by adding -1e4 to its logit, which in a per-tensor int8
    logit tensor leaves steps of about 40 for logits of a few units (every kept weight equal),
    and its token-to-image softmax spreads over 4096 keys, far under int8 SOFTMAX's step of
    1/256. Masking by a product and normalizing after the values avoids both (as
    `exp_weighted_values` does for the encoder)."""
    weights = exp_below_row_max(logits)
    if key_keep is not None:
        weights = weights * key_keep[:, None, None, :]
    return (weights @ values) / weights.sum(dim=-1, keepdim=True)


def calibration_ranges(float_model: bytes, recipe: list[dict[str, Any]], samples: list[dict[str, np.ndarray]]) -> dict:
    """Per tensor the recipe quantizes, its min and max over every calibration sample, as the
    LiteRT interpreter computes them on the float model.

    Why not `Quantizer.calibrate`: ai-edge-quantizer 0.10 merges each sample into a moving average
    (0.95 of the ranges so far, 0.05 of the new sample's), so the first sample's ranges all but
    decide, and a later photo or prompt whose values reach further is clipped (docs/tflite.md).
    The union is the range every sample fits in; its own `min_max_update` computes it."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    union = calibrator.Calibrator(float_model, num_threads=2, qsv_update_func=qsv_utils.min_max_update)
    union.calibrate({SIGNATURE: samples}, manager)
    return union.get_model_qsvs()


def full_integer_recipe(
    float_scopes: Sequence[str] = (),
    integer_boundary: bool = False,
    int16_scopes: Sequence[str] = (),
    int8_ops: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """ai-edge-quantizer's static recipe: int8 weights per channel, int8 activations per tensor;
    `int16_scopes` with int16 activations instead (w8a16) except the op types in `int8_ops`;
    `float_scopes` left float; float32 inputs and outputs unless `integer_boundary`. The convert
    stage's w8a8 uses the first two; benchmarks/tflite_w8a16.py measures the others."""
    from ai_edge_quantizer import recipe_manager
    from ai_edge_quantizer.qtyping import TFLOperationName

    manager = recipe_manager.RecipeManager()
    manager.add_static_config(
        regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8
    )
    if int16_scopes:
        # one regex for both: a later regex overrides an earlier one whatever its op names, and
        # within one regex a later op config overrides an earlier one
        pattern = scope_pattern(int16_scopes)
        manager.add_static_config(
            regex=pattern, operation_name=TFLOperationName.ALL_SUPPORTED, activation_num_bits=16, weight_num_bits=8
        )
        for op in int8_ops:
            manager.add_static_config(
                regex=pattern, operation_name=TFLOperationName(op), activation_num_bits=8, weight_num_bits=8
            )
    if float_scopes:
        pattern = scope_pattern(float_scopes)
        manager.add_quantization_config(pattern, TFLOperationName.ALL_SUPPORTED, algorithm_key="no_quantize")
    if not integer_boundary:
        for boundary in (TFLOperationName.INPUT, TFLOperationName.OUTPUT):
            manager.add_quantization_config(regex=".*", operation_name=boundary, algorithm_key="no_quantize")
    return manager.get_quantization_recipe()


def quantize_full_integer(float_model: bytes, part: PartToConvert, integer_io: bool) -> tuple[bytes, MixedPlan]:
    """ai-edge-quantizer's static int8 recipe (per-channel int8 weights, per-tensor int8
    activations), its ranges the min/max that the LiteRT interpreter sees over all of the part's
    calibration inputs (the first real photos, and point, box and refinement prompts:
    `calibration_ranges`); where the all-int8 file misses its target on those inputs, the
    regions int8 costs the most keep float activations (`mixed_precision`)."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.utils.tfl_flatbuffer_utils import get_op_scope

    if part.calibration is None:
        raise PipelineError(f"tflite w8a8 {part.name}: no calibration inputs")

    samples = [{name: sample[name] for name in part.contract.input_names} for sample in part.calibration()]
    ranges = calibration_ranges(float_model, full_integer_recipe(), samples)

    def quantize(float_scopes: Sequence[str], integer_boundary: bool = False) -> bytes:
        engine = quantizer.Quantizer(float_model, full_integer_recipe(float_scopes, integer_boundary))
        return bytes(engine.quantize(ranges, enable_progress_report=False).quantized_model)

    def answers(model: bytes) -> list[dict[str, np.ndarray]]:
        runner = load_interpreter_class()(model_content=model).get_signature_runner(SIGNATURE)
        return [{name: np.asarray(value) for name, value in runner(**sample).items()} for sample in samples]

    graph = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model)).subgraphs[0]
    scopes = [get_op_scope(op, graph.tensors) for op in graph.operators]
    target = target_for(part.contract, DEFAULT_GATES["w8a8"])
    plan, model = plan_float_regions(scopes, quantize, answers, answers(float_model), part.contract, target)
    return (quantize(plan.float_ops, integer_boundary=True) if integer_io else model), plan


def short_tensor_names(model_content: bytes) -> bytes:
    """The model with its inner tensors named `t<index>`; the inputs' and outputs' names (and the
    signature, which names them by the contract) stay.

    Why: litert-torch names every tensor by its module path ("mobile_targets.tflite.converter.
    NamedInputsOutputs/pipeline.export_wrappers.ImageEncoderForExport_inner/..."): a noticeable
    share of the fp16 encoder's size (docs/file-sizes.md). Run last: the quantization recipes
    select layers by these names. The arithmetic is untouched (outputs bit-identical)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))
    for subgraph in model.subgraphs:
        boundary = {*subgraph.inputs, *subgraph.outputs}
        for index, tensor in enumerate(subgraph.tensors):
            if index not in boundary:
                tensor.name = f"t{index}".encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


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


def xnnpack_delegation(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(ops XNNPACK takes, ops left to LiteRT's reference kernels), by op name, for one `.tflite`.

    Counted in the interpreter the runner uses, without running the file (`profiler` times them):
    with delegate node fusion off every delegated op becomes its own DELEGATE node, and an op is
    delegated when all of its outputs are some DELEGATE node's outputs.
    """
    interpreter = load_interpreter_class()(model_path=str(path), experimental_disable_delegate_node_fusion=True)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()  # the only view of the delegated graph LiteRT's Python API gives
    from_delegate = {int(t) for op in ops if op["op_name"] == "DELEGATE" for t in op["outputs"]}
    delegated: dict[str, int] = {}
    outside: dict[str, int] = {}
    for op in ops:
        if op["op_name"] == "DELEGATE":
            continue
        counts = delegated if {int(t) for t in op["outputs"]} <= from_delegate else outside
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return delegated, outside


def float_tflite(part: PartToConvert, precision: str) -> bytes:
    """The float `.tflite` of the graph a precision starts from, before any quantization: the
    GPU-ready graph, or for w8a8 the graph whose attention full-integer quantization takes."""
    import litert_torch

    # w8a8 is for NPUs: its int8 activations would quantize the GPU graph's one-hot products
    module = attention_exp_as_sigmoids(part.module) if precision == "w8a8" else gpu_ready(part.module)
    if computes_in_fp16(part, precision):
        module = gelu_as_tanh_approximation(module)
    named = NamedInputsOutputs(module, part.contract).eval()
    sample = dict(zip(part.contract.input_names, part.example_inputs, strict=True))
    return bytes(litert_torch.convert(named, sample_args=(), sample_kwargs=sample).model_content())


class TFLiteRunner(Runner):
    """A `.tflite` in the LiteRT interpreter (XNNPACK delegate by default), called by signature; a
    file that asks for fp16 arithmetic runs in LiteRT's CompiledModel with XNNPACK forced to fp16,
    as a phone runs it (`arithmetic` module)."""

    def __init__(self, path: Path, contract: PartContract, threads: int | None = None) -> None:
        super().__init__(path, contract)
        if not self.path.is_file():
            raise ArtifactError(f"TFLite model not found: {self.path}")
        with self.path.open("rb") as handle:
            identifier = handle.read(8)[4:8]
        if identifier != TFLITE_IDENTIFIER:
            raise ArtifactError(f"{self.path} is not a TFLite model (file identifier {identifier!r}, expected b'TFL3')")
        self.arithmetic = declared_arithmetic(self.path)
        try:
            if self.arithmetic == "fp16":
                self.signature = ForcedFp16Signature(self.path, threads or 1)
            else:
                interpreter = load_interpreter_class()(model_path=str(self.path), num_threads=threads or 1)
                self.signature = interpreter.get_signature_runner(SIGNATURE)
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ArtifactError(f"{self.path} is not a loadable TFLite model: {first}") from None
        expected = set(contract.input_names)
        found = set(self.signature.get_input_details())
        if found != expected:
            raise ArtifactError(f"{self.path} has inputs {sorted(found)}, expected the contract's {sorted(expected)}")

        self.input_details = self.signature.get_input_details()
        self.output_details = self.signature.get_output_details()

    def file_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The contract's float inputs in the file's dtypes (quantized where its inputs are int8)."""
        return {
            name: to_file_dtype(array, self.input_details[name])
            for name, array in zip(self.contract.input_names, self.ordered_inputs(inputs), strict=True)
        }

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.signature(**self.file_inputs(inputs))
        return {name: to_float(outputs[name], self.output_details[name]) for name in self.contract.output_names}


def to_file_dtype(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A float32 input as the file takes it: quantized by its scale and zero point if it is integer."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return array
    scale, zero_point = detail["quantization"]
    limits = np.iinfo(dtype)
    return np.clip(np.round(array / scale + zero_point), limits.min, limits.max).astype(dtype)


def to_float(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An output as float32, dequantized by the file's scale and zero point if it is integer."""
    array = np.asarray(array)
    if array.dtype == np.float32:
        return array
    scale, zero_point = detail["quantization"]
    return ((array.astype(np.float32) - zero_point) * scale).astype(np.float32)


class TFLiteTarget(Target):
    name = "tflite"
    extension = ".tflite"
    precisions = ("fp32", "fp16", "int8", "w8a8")
    fp16_precisions = ("fp16",)  # the GPU delegate's file; XNNPACK can run it in fp16 too
    runtime_name = "ai_edge_litert Interpreter (XNNPACK); fp16-arithmetic files: CompiledModel, XNNPACK forced to fp16"

    def __init__(self, options: TFLiteOptions | None = None) -> None:
        self.options = options or TFLiteOptions()

    def with_options(self, options: Mapping[str, Any]) -> TFLiteTarget:
        return TFLiteTarget(replace_options(self.options, options, self.name))

    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        if precision not in self.precisions:
            raise PipelineError(f"tflite does not support precision {precision!r}")
        data = float_tflite(part, precision)
        details: dict[str, Any] = {"quantization": QUANTIZATION[precision]}
        if precision == "w8a8":
            integer_io = self.options.integer_io and part.name == ENCODER
            data, plan = quantize_full_integer(data, part, integer_io)
            details["io"] = "int8" if integer_io else "float32"
            details["mixed_precision"] = plan.details()
        elif precision != "fp32":
            data = _quantize(data, precision)
        data = declare_required_versions(data)
        data = short_tensor_names(data)
        if computes_in_fp16(part, precision):
            data = mark_fp16_arithmetic(data)
            details["quantization"] = FP16_ARITHMETIC_QUANTIZATION
            details["arithmetic"] = "fp16"
        path.write_bytes(data)
        return details

    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        return TFLiteRunner(path, contract, threads)

    def tool_packages(self) -> tuple[str, ...]:
        return ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")


TARGET = TFLiteTarget()
