"""Every kernel of the Core ML emulator against an independent reference.

Each case builds a one-op MIL program with coremltools' builder, saves it as a real
`.mlpackage` (no graph passes, so the op is what the file holds) and runs it in the emulator.
The reference is coremltools' own `value_inference` of the same op on the same constants,
or, for ops that have none (conv, conv_transpose, instance_norm), a torch function with the
same meaning. Compressed weights (constexpr_*) are checked against coremltools' decompression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import coremltools as ct  # a core dependency: a missing install fails here, never skips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from mobile_targets.coreml.emulator import MilProgram, UnsupportedOpError
from mobile_targets.coreml.mil_ops import KERNELS

RNG = np.random.default_rng(0)


def _x(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


@dataclass
class Case:
    op: str
    tensors: dict[str, np.ndarray]
    """Inputs fed at run time (program inputs)."""
    constants: dict[str, Any] = field(default_factory=dict)
    torch_reference: Callable[..., Any] | None = None
    """Used where coremltools has no value_inference for the op, or where it is wrong (see why)."""
    id: str = ""
    why_not_value_inference: str = ""


X = _x(2, 3, 4)
Y = _x(2, 3, 4)
POSITIVE = _x(2, 3, 4, low=0.1, high=3.0)
CONV_WEIGHT = _x(6, 3, 3, 3)
CONV_BIAS = _x(6)

CASES = [
    *(Case(name, {"x": X, "y": Y}) for name in ("add", "sub", "mul", "maximum", "minimum")),
    Case("real_div", {"x": X, "y": POSITIVE}),
    Case("pow", {"x": POSITIVE, "y": Y}),
    Case("floor_div", {"x": X * 3, "y": POSITIVE}),
    Case("mod", {"x": POSITIVE * 3, "y": POSITIVE}),
    *(
        Case(name, {"x": np.round(X), "y": np.round(Y)})
        for name in ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")
    ),
    Case("add", {"x": X}, {"y": _x(4)}, id="add-broadcast-const"),
    *(Case(name, {"x": X}) for name in ("sin", "cos", "tan", "exp", "exp2", "tanh", "sigmoid", "relu", "abs")),
    *(Case(name, {"x": X}) for name in ("floor", "ceil", "round", "sign", "square", "erf")),
    Case("silu", {"x": X}, torch_reference=lambda x: F.silu(x)),
    Case("sqrt", {"x": POSITIVE}),
    Case("rsqrt", {"x": POSITIVE}, {"epsilon": 1e-6}),
    Case("inverse", {"x": POSITIVE}, {"epsilon": 1e-4}),
    Case("log", {"x": POSITIVE}, {"epsilon": 1e-6}),
    Case("clip", {"x": X}, {"alpha": -0.5, "beta": 0.7}),
    *(Case("gelu", {"x": X}, {"mode": mode}, id=f"gelu-{mode}") for mode in ("EXACT", "TANH_APPROXIMATION")),
    Case("gelu", {"x": X}, {"mode": "SIGMOID_APPROXIMATION"}, id="gelu-SIGMOID_APPROXIMATION"),
    Case("softmax", {"x": X}, {"axis": 1}),
    *(
        Case(name, {"x": X}, {"axes": [0, 2], "keep_dims": keep}, id=f"{name}-{keep}")
        for name in ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod")
        for keep in (True, False)
    ),
    Case("reduce_argmax", {"x": X}, {"axis": 1, "keep_dims": False}),
    Case("layer_norm", {"x": X}, {"axes": [-1], "gamma": _x(4), "beta": _x(4), "epsilon": 1e-5}),
    Case("layer_norm", {"x": X}, {"axes": [1, 2], "epsilon": 1e-3}, id="layer_norm-2axes-no-affine"),
    Case(
        "batch_norm",
        {"x": _x(2, 3, 5, 5)},
        {"mean": _x(3), "variance": _x(3, low=0.5, high=2.0), "gamma": _x(3), "beta": _x(3), "epsilon": 1e-4},
        torch_reference=lambda x, mean, variance, gamma, beta, epsilon: F.batch_norm(
            x, mean, variance, gamma, beta, training=False, eps=epsilon
        ),
    ),
    Case(
        "instance_norm",
        {"x": _x(2, 3, 5, 5)},
        {"gamma": _x(3), "beta": _x(3), "epsilon": 1e-5},
        torch_reference=lambda x, gamma, beta, epsilon: F.instance_norm(x, weight=gamma, bias=beta, eps=epsilon),
    ),
    Case("cumsum", {"x": X}, {"axis": 1, "exclusive": False, "reverse": False}),
    Case(
        "cumsum",
        {"x": X},
        {"axis": 2, "exclusive": True, "reverse": True},
        torch_reference=lambda x, axis, exclusive, reverse: torch.flip(torch.cumsum(torch.flip(x, [2]), 2), [2]) - x,
        id="cumsum-exclusive-reverse",
        why_not_value_inference="coremltools 9.0's cumsum.value_inference raises TypeError when exclusive=True "
        "(np.zeros(zero_shape, data))",
    ),
    Case("linear", {"x": X}, {"weight": _x(5, 4), "bias": _x(5)}),
    Case("matmul", {"x": X, "y": _x(2, 4, 5)}, {"transpose_x": False, "transpose_y": False}),
    Case("matmul", {"x": X, "y": _x(2, 5, 4)}, {"transpose_x": False, "transpose_y": True}, id="matmul-transpose-y"),
    Case("matmul", {"x": _x(2, 4, 3), "y": _x(4, 5)}, {"transpose_x": True, "transpose_y": False}, id="matmul-tx"),
    Case(
        "conv",
        {"x": _x(1, 3, 9, 8)},
        {"weight": CONV_WEIGHT, "bias": CONV_BIAS, "strides": [2, 1], "pad_type": "custom", "pad": [1, 0, 2, 1]},
        torch_reference=lambda x, weight, bias, strides, pad_type, pad: F.conv2d(
            F.pad(x, [2, 1, 1, 0]), weight, bias, stride=strides
        ),
    ),
    Case(
        "conv",
        {"x": _x(1, 6, 7, 7)},
        {"weight": _x(6, 1, 3, 3), "groups": 6, "pad_type": "same", "dilations": [2, 2]},
        torch_reference=lambda x, weight, groups, pad_type, dilations: F.conv2d(
            x, weight, groups=groups, padding="same", dilation=dilations
        ),
        id="conv-depthwise-same-dilated",
    ),
    Case(
        "conv_transpose",
        {"x": _x(1, 4, 5, 5)},
        {"weight": _x(4, 3, 2, 2), "bias": _x(3), "strides": [2, 2], "pad_type": "valid"},
        torch_reference=lambda x, weight, bias, strides, pad_type: F.conv_transpose2d(x, weight, bias, stride=strides),
    ),
    Case(
        "conv_transpose",
        {"x": _x(1, 4, 5, 5)},
        {"weight": _x(4, 3, 3, 3), "strides": [2, 2], "pad_type": "custom", "pad": [1, 1, 1, 1]},
        torch_reference=lambda x, weight, strides, pad_type, pad: F.conv_transpose2d(x, weight, stride=2, padding=1),
        id="conv_transpose-custom-pad",
    ),
    Case("cast", {"x": X}, {"dtype": "int32"}),
    Case("cast", {"x": X}, {"dtype": "fp16"}, id="cast-fp16"),
    Case("reshape", {"x": X}, {"shape": [3, -1]}),
    Case("reshape", {"x": X}, {"shape": [0, 12, 1]}, id="reshape-copy-dim"),
    Case("transpose", {"x": X}, {"perm": [2, 0, 1]}),
    Case("expand_dims", {"x": X}, {"axes": [0, -1]}),
    Case("squeeze", {"x": _x(2, 1, 4, 1)}, {"axes": [1, 3]}),
    Case("concat", {"values": [X, Y]}, {"axis": 1, "interleave": False}),
    Case(
        "concat",
        {"values": [X, Y]},
        {"axis": 1, "interleave": True},
        torch_reference=lambda values, axis, interleave: torch.stack(values, dim=2).reshape(2, 6, 4),
        id="concat-interleave",
        why_not_value_inference="coremltools 9.0's concat.value_inference ignores interleave (plain concat), "
        "while its docstring defines output[0::2] = in1, output[1::2] = in2",
    ),
    Case("stack", {"values": [X, Y]}, {"axis": 2}),
    Case("split", {"x": _x(2, 6, 4)}, {"axis": 1, "num_splits": 3}),
    Case("split", {"x": _x(2, 6, 4)}, {"axis": 1, "split_sizes": [1, 5]}, id="split-sizes"),
    Case("slice_by_index", {"x": _x(4, 6, 5)}, {"begin": [1, 0, 4], "end": [3, 6, 0], "stride": [1, 2, -1]}),
    Case(
        "slice_by_index",
        {"x": _x(4, 6, 5)},
        {"begin": [1, 2, 0], "end": [0, 5, 3], "end_mask": [True, False, False], "squeeze_mask": [False, False, True]},
        id="slice-masks",
    ),
    Case("pad", {"x": X}, {"pad": [1, 2, 0, 3], "mode": "constant", "constant_val": 1.5}),
    Case("pad", {"x": _x(1, 2, 4, 5)}, {"pad": [1, 1, 2, 2], "mode": "reflect"}, id="pad-reflect"),
    Case("pad", {"x": _x(1, 2, 4, 5)}, {"pad": [0, 2, 1, 0], "mode": "replicate"}, id="pad-replicate"),
    Case("fill_like", {"ref_tensor": X}, {"value": 2.5}),
    Case("fill", {}, {"shape": [2, 3], "value": -1.5}),
    Case("tile", {"x": X}, {"reps": [1, 2, 3]}),
    Case("gather", {"x": X}, {"indices": np.array([[2, 0], [1, -1]], dtype=np.int32), "axis": 1}),
    Case("select", {"a": X, "b": Y}, {"cond": X > 0}),
    Case("logical_and", {}, {"x": X > 0, "y": Y > 0}),
    Case("logical_or", {}, {"x": X > 0, "y": Y > 0}),
    Case("logical_xor", {}, {"x": X > 0, "y": Y > 0}),
    Case("logical_not", {}, {"x": X > 0}),
    Case("shape", {"x": X}),
    Case("identity", {"x": X}),
]

# A boolean-only case needs one float input so the program has something to feed.
_DUMMY = "unused_input"


def _case_id(case: Case) -> str:
    return case.id or case.op


def _build_program(case: Case, opset: Any = None) -> Any:
    opset = opset or ct.target.iOS17
    tensors = case.tensors
    flat: list[tuple[str, int | None, np.ndarray]] = []
    for name, value in tensors.items():
        if isinstance(value, list):
            flat.extend((name, i, v) for i, v in enumerate(value))
        else:
            flat.append((name, None, value))
    specs = [mb.TensorSpec(shape=v.shape) for _, _, v in flat] or [mb.TensorSpec(shape=(1,))]

    def body(*variables):
        arguments: dict[str, Any] = dict(case.constants)
        for (name, index, _), variable in zip(flat, variables, strict=False):
            if index is None:
                arguments[name] = variable
            else:
                arguments.setdefault(name, []).append(variable)
        out = getattr(mb, case.op)(**arguments)
        outs = list(out) if isinstance(out, list | tuple) else [out]
        if not flat:  # outputs must depend on an input: add the dummy input times zero
            outs = [mb.add(x=o, y=mb.mul(x=variables[0], y=0.0)) if o.dtype.__name__ == "fp32" else o for o in outs]
        return tuple(outs)

    # mb.program reads the function's argument count, so the body gets a fixed-arity front
    fronts = {
        1: lambda a: body(a),
        2: lambda a, b: body(a, b),
        3: lambda a, b, c: body(a, b, c),
    }
    return mb.program(input_specs=specs, opset_version=opset)(fronts[len(specs)]), flat


def _save(program: Any, path, opset: Any = None) -> None:
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=opset or ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
        pass_pipeline=ct.PassPipeline.EMPTY,
    )
    model.save(str(path))


def _value_inference(case: Case) -> list[np.ndarray] | None:
    """coremltools' own result for the op on constants, or None where it has none."""
    if case.why_not_value_inference:
        return None
    result: dict[str, Any] = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS17)
    def holder(dummy):
        arguments = {**case.constants, **case.tensors}
        out = getattr(mb, case.op)(**arguments)
        outs = list(out) if isinstance(out, list | tuple) else [out]
        result["values"] = [o.val for o in outs]
        return dummy

    values = result["values"]
    if any(v is None for v in values):
        return None
    return [np.asarray(v) for v in values]


def _torch_reference(case: Case) -> list[np.ndarray]:
    arguments: dict[str, Any] = {
        k: [torch.as_tensor(x) for x in v] if isinstance(v, list) else torch.as_tensor(v)
        for k, v in case.tensors.items()
    }
    for key, value in case.constants.items():
        arguments[key] = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    out = case.torch_reference(**arguments)
    return [out.numpy()]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case: Case, tmp_path):
    program, flat = _build_program(case)
    _save(program, tmp_path / "op.mlpackage")
    emulated = MilProgram(tmp_path / "op.mlpackage")
    assert case.op in emulated.op_types or case.op == "identity"
    names = list(emulated.inputs)
    feed = {name: value for name, (_, _, value) in zip(names, flat, strict=False)} or {
        names[0]: np.zeros(1, np.float32)
    }
    outputs = emulated.run(feed, mode="fp16")  # an fp32 program: fp16 mode rounds only explicit fp16 casts
    expected = _value_inference(case)
    if case.torch_reference is None:
        assert expected is not None, f"{case.op} has no value_inference in coremltools: give a torch reference"
    else:
        if not case.why_not_value_inference:
            assert expected is None, f"{case.op} has a value_inference: use it"
        expected = _torch_reference(case)
    assert len(outputs) == len(expected)
    for actual, reference in zip(outputs.values(), expected, strict=True):
        reference = np.asarray(reference)
        assert actual.shape == reference.shape, (actual.shape, reference.shape)
        np.testing.assert_allclose(actual, reference.astype(np.float32), rtol=2e-5, atol=2e-5)


def test_every_kernel_has_a_case():
    tested = {case.op for case in CASES} | {
        "constexpr_affine_dequantize",
        "constexpr_blockwise_shift_scale",
        "constexpr_lut_to_dense",
        "quantize",  # test_activation_quantize_dequantize_matches_coremltools
        "dequantize",
    }
    assert set(KERNELS) == tested


COMPRESSIONS = [
    ("iOS17", "int8"),  # constexpr_affine_dequantize
    ("iOS17", "palettize6"),  # constexpr_lut_to_dense, iOS16 form: packed indices + shape
    ("iOS18", "int8"),  # constexpr_blockwise_shift_scale
    ("iOS18", "palettize6"),  # constexpr_lut_to_dense, iOS18 form
    ("iOS18", "palettize4_grouped"),  # one table per group of 16 channels (iOS18 only)
    ("iOS18", "int4_blocks"),  # int4 per block of 32 (iOS18 only)
]


@pytest.mark.parametrize(("opset_name", "compression"), COMPRESSIONS)
def test_compressed_weights_match_coremltools(opset_name, compression, tmp_path):
    """constexpr_* decompression equals coremltools' own, and the linear op uses it."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    opset = getattr(ct.target, opset_name)
    weight = _x(64, 96)
    configs = {
        "int8": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0),
        "palettize6": cto.OpPalettizerConfig(mode="kmeans", nbits=6, weight_threshold=0),
        "palettize4_grouped": cto.OpPalettizerConfig(
            mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16, weight_threshold=0
        ),
        "int4_blocks": cto.OpLinearQuantizerConfig(
            mode="linear", dtype="int4", granularity="per_block", block_size=32, weight_threshold=0
        ),
    }

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 96))], opset_version=opset)
    def program(x):
        return mb.linear(x=x, weight=weight)

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=opset)  # fp16 weights
    optimizer = cto.linear_quantize_weights if "int" in compression else cto.palettize_weights
    model = optimizer(model, cto.OptimizationConfig(global_config=configs[compression]))
    path = tmp_path / "compressed.mlpackage"
    model.save(str(path))

    spec = model.get_spec()
    reference_program = milproto_load(spec, spec.specificationVersion, model.weights_dir)
    constexpr_ops = [op for op in reference_program.functions["main"].operations if op.op_type.startswith("constexpr")]
    assert constexpr_ops
    # Core ML materializes the weight in the op's output dtype (fp16 here)
    expected_weight = np.asarray(constexpr_ops[-1].materialized_val_inference()).astype(np.float16).astype(np.float32)
    assert np.abs(expected_weight - weight).max() > 0  # really compressed

    emulated = MilProgram(path)
    assert not any(op.type.startswith("constexpr") for op in emulated.operations)
    decoded = [v for v in emulated.constants.values() if getattr(v, "shape", None) == (64, 96)]
    np.testing.assert_array_equal(decoded[-1].numpy(), expected_weight)
    x = _x(2, 96)
    out = next(iter(emulated.run({next(iter(emulated.inputs)): x}, mode="fp32").values()))
    np.testing.assert_allclose(out, x @ expected_weight.T, rtol=1e-4, atol=1e-3)


QUANTIZE_SETTINGS = [
    ("int8-per-tensor", np.float32(0.013), None, None, "int8"),
    ("uint8-per-axis", _x(3, low=0.005, high=0.02), np.array([120, 128, 135], np.uint8), 1, "uint8"),
]


@pytest.mark.parametrize(
    ("name", "scale", "zero_point", "axis", "dtype"), QUANTIZE_SETTINGS, ids=[s[0] for s in QUANTIZE_SETTINGS]
)
def test_activation_quantize_dequantize_matches_coremltools(name, scale, zero_point, axis, dtype, tmp_path):
    """A W8A8 package's quantize -> dequantize pair: the integers equal coremltools' own
    quantize value inference (saturation included), the floats (q - zero_point) * scale."""
    x = _x(2, 3, 4, low=-3.0, high=3.0)
    settings = {"scale": scale, "output_dtype": dtype}
    if zero_point is not None:
        settings.update(zero_point=zero_point, axis=axis)
    dequantize_settings = {k: v for k, v in settings.items() if k != "output_dtype"}

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def program(data):
        return mb.dequantize(input=mb.quantize(input=data, **settings), **dequantize_settings)

    _save(program, tmp_path / "qdq.mlpackage")
    emulated = MilProgram(tmp_path / "qdq.mlpackage")
    assert {"quantize", "dequantize"} <= emulated.op_types
    out = next(iter(emulated.run({next(iter(emulated.inputs)): x}, mode="fp32").values()))

    inferred: dict[str, Any] = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS17)
    def holder(dummy):
        inferred["integers"] = mb.quantize(input=x, **settings).val
        return dummy

    integers = np.asarray(inferred["integers"]).astype(np.float32)
    low, high = (-128, 127) if dtype == "int8" else (0, 255)
    assert integers.min() == low or integers.max() == high  # the range saturates somewhere
    shape = [1, -1, 1] if axis is not None else [1]
    zero = np.zeros(1, np.float32) if zero_point is None else zero_point.astype(np.float32).reshape(shape)
    expected = (integers - zero) * np.asarray(scale, np.float32).reshape(shape)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_unknown_op_is_one_clear_line(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8))], opset_version=ct.target.iOS17)
    def program(x):
        return mb.topk(x=x, k=3, axis=-1)

    _save(program, tmp_path / "topk.mlpackage")
    with pytest.raises(UnsupportedOpError) as info:
        MilProgram(tmp_path / "topk.mlpackage")
    message = str(info.value)
    assert "'topk'" in message and "not implemented" in message and "\n" not in message


def test_fp16_mode_rounds_where_the_program_says_fp16(tmp_path):
    """A fp16 program: fp16 mode equals numpy fp16 arithmetic, fp32 mode does not round."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(1000,))], opset_version=ct.target.iOS17)
    def program(x):
        half = mb.cast(x=x, dtype="fp16")
        product = mb.mul(x=half, y=np.float16(1.0009765625))  # 1 + 2**-10
        return mb.cast(x=mb.add(x=product, y=np.float16(0.1)), dtype="fp32")

    _save(program, tmp_path / "half.mlpackage")
    x = _x(1000, low=1.0, high=100.0)
    emulated = MilProgram(tmp_path / "half.mlpackage")
    half = x.astype(np.float16)
    expected = (half * np.float16(1.0009765625)).astype(np.float16) + np.float16(0.1)
    out_fp16 = next(iter(emulated.run({"x": x}, mode="fp16").values()))
    np.testing.assert_array_equal(out_fp16, expected.astype(np.float32))
    out_fp32 = next(iter(emulated.run({"x": x}, mode="fp32").values()))
    assert np.abs(out_fp32 - out_fp16).max() > 0


def test_fp16_rounding_in_place_equals_a_rounded_copy_and_spares_shared_values(tmp_path):
    """The emulator rounds fresh fp16 outputs in place (any dimension order), leaves views of
    fp16-exact values as they are, and rounds a view of an fp32 value into a new tensor: the
    same bits as `.half().float()` everywhere, and the fp32 value it viewed untouched."""
    from mobile_targets.coreml.emulator import _round_to

    fresh = torch.from_numpy(_x(8, 9, 10, low=-70000.0, high=70000.0)).permute(2, 0, 1).contiguous().permute(1, 2, 0)
    expected = fresh.half().float()
    assert not fresh.is_contiguous()
    rounded = _round_to(fresh, "FLOAT16", "fp16")
    assert rounded.data_ptr() == fresh.data_ptr() and torch.equal(rounded, expected)  # overflow to inf included
    source = torch.from_numpy(_x(6, 7, low=-3.0, high=3.0))
    view = source.t()
    storage = {source.untyped_storage().data_ptr()}
    copied = _round_to(view, "FLOAT16", "fp16", shared=storage)
    assert torch.equal(copied, view.half().float()) and copied.data_ptr() != source.data_ptr()
    assert not torch.equal(source, source.half().float())  # the fp32 input it viewed kept its bits
    exact = source.half().float()
    kept = _round_to(
        exact.t(),
        "FLOAT16",
        "fp16",
        shared={exact.untyped_storage().data_ptr()},
        exact=storage | {exact.untyped_storage().data_ptr()},
    )
    assert kept.data_ptr() == exact.data_ptr() and torch.equal(kept, exact.t())

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 250))], opset_version=ct.target.iOS17)
    def program(x):
        half = mb.cast(x=x, dtype="fp16")
        flipped = mb.transpose(x=half, perm=[1, 0])  # a view of an fp16 value
        summed = mb.add(x=flipped, y=np.float16(0.1))  # a fresh output, in the view's order
        return mb.cast(x=mb.reshape(x=summed, shape=[1000]), dtype="fp32")

    _save(program, tmp_path / "views.mlpackage")
    x = _x(4, 250, low=1.0, high=100.0)
    emulated = MilProgram(tmp_path / "views.mlpackage")
    expected = (x.astype(np.float16).T + np.float16(0.1)).reshape(1000)
    for _ in range(2):  # the second run proves no constant or input was rounded over
        out = next(iter(emulated.run({"x": x.copy()}, mode="fp16").values()))
        np.testing.assert_array_equal(out, expected.astype(np.float32))
