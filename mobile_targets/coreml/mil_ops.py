"""Kernels of the MIL operations the Core ML emulator runs, in torch (fp32 compute).

Each kernel takes the op's named arguments (inputs and constant attributes, already decoded)
and returns a tensor or a tuple of tensors. Semantics follow the MIL op reference of
coremltools (`coremltools.converters.mil.mil.ops.defs`); `tests/test_coreml_ops.py`
checks every kernel against coremltools' own `value_inference` where the op has one and
against a torch function with the same meaning where it does not (conv, norms, ...).

Precision is not handled here: the interpreter upcasts fp16 inputs to fp32 and rounds the
outputs to the dtype the program declares, as Core ML's fp16 compute would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Kernel = Callable[..., Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*names: str) -> Callable[[Kernel], Kernel]:
    def register(function: Kernel) -> Kernel:
        for name in names:
            KERNELS[name] = function
        return function

    return register


def _ints(value: Any) -> list[int]:
    return [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]


def _int(value: Any) -> int:
    return int(torch.as_tensor(value).reshape(-1)[0])


def _float(value: Any) -> float:
    return float(torch.as_tensor(value).reshape(-1)[0])


def _bool(value: Any, default: bool = False) -> bool:
    return default if value is None else bool(torch.as_tensor(value).reshape(-1)[0])


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- elementwise -------------------------------------------------------------------------

_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "real_div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "floor_div": lambda x, y: torch.div(x, y, rounding_mode="floor"),
    "mod": torch.remainder,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}

_UNARY = {
    "sqrt": torch.sqrt,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "abs": torch.abs,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "round": torch.round,
    "sign": torch.sign,
    "square": torch.square,
    "erf": torch.erf,
    "logical_not": torch.logical_not,
}


def _binary(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Kernel:
    return lambda x, y: function(torch.as_tensor(x), torch.as_tensor(y))


def _unary(function: Callable[[torch.Tensor], torch.Tensor]) -> Kernel:
    return lambda x: function(torch.as_tensor(x))


for _name, _function in _BINARY.items():
    KERNELS[_name] = _binary(_function)
for _name, _function in _UNARY.items():
    KERNELS[_name] = _unary(_function)


@kernel("rsqrt")
def rsqrt(x: torch.Tensor, epsilon: Any = None) -> torch.Tensor:
    return torch.rsqrt(x + (1e-12 if epsilon is None else _float(epsilon)))


@kernel("inverse")
def inverse(x: torch.Tensor, epsilon: Any = None) -> torch.Tensor:
    return 1.0 / (x + (1e-4 if epsilon is None else _float(epsilon)))


@kernel("log")
def log(x: torch.Tensor, epsilon: Any = None) -> torch.Tensor:
    return torch.log(x + (1e-45 if epsilon is None else _float(epsilon)))


@kernel("clip")
def clip(x: torch.Tensor, alpha: Any, beta: Any) -> torch.Tensor:
    return torch.clamp(x, _float(alpha), _float(beta))


@kernel("select")
def select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.as_tensor(cond).bool(), torch.as_tensor(a), torch.as_tensor(b))


@kernel("gelu")
def gelu(x: torch.Tensor, mode: str = "EXACT") -> torch.Tensor:
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu mode {mode!r} is not one of EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION")


@kernel("silu")
def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


@kernel("softmax")
def softmax(x: torch.Tensor, axis: Any = -1) -> torch.Tensor:
    return torch.softmax(x, dim=_int(axis))


# --- reductions and normalization ----------------------------------------------------------


def _reduce(function: Callable[..., torch.Tensor]) -> Kernel:
    def reduce(x: torch.Tensor, axes: Any = None, keep_dims: Any = None) -> torch.Tensor:
        dims = list(range(x.dim())) if axes is None else _ints(axes)
        return function(x, dim=dims, keepdim=_bool(keep_dims))

    return reduce


KERNELS["reduce_mean"] = _reduce(torch.mean)
KERNELS["reduce_sum"] = _reduce(torch.sum)
KERNELS["reduce_max"] = _reduce(torch.amax)
KERNELS["reduce_min"] = _reduce(torch.amin)
KERNELS["reduce_prod"] = _reduce(lambda x, dim, keepdim: _prod(x, dim, keepdim))


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for dim in sorted((_axis(d, x.dim()) for d in dims), reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keepdim)
    return x


@kernel("reduce_argmax")
def reduce_argmax(x: torch.Tensor, axis: Any = -1, keep_dims: Any = None, output_dtype: Any = None) -> torch.Tensor:
    return torch.argmax(x, dim=_int(axis), keepdim=_bool(keep_dims)).int()


@kernel("layer_norm")
def layer_norm(
    x: torch.Tensor, axes: Any = None, gamma: Any = None, beta: Any = None, epsilon: Any = None
) -> torch.Tensor:
    dims = list(range(x.dim())) if axes is None else [_axis(a, x.dim()) for a in _ints(axes)]
    eps = 1e-5 if epsilon is None else _float(epsilon)
    mean = x.mean(dim=dims, keepdim=True)
    variance = (x - mean).square().mean(dim=dims, keepdim=True)
    out = (x - mean) / torch.sqrt(variance + eps)
    if gamma is not None or beta is not None:
        # gamma and beta have the shape of the normalized (trailing) dims
        shape = [x.shape[d] if d in dims else 1 for d in range(x.dim())]
        if gamma is not None:
            out = out * torch.as_tensor(gamma).reshape(shape)
        if beta is not None:
            out = out + torch.as_tensor(beta).reshape(shape)
    return out


@kernel("batch_norm")
def batch_norm(
    x: torch.Tensor, mean: Any, variance: Any, gamma: Any = None, beta: Any = None, epsilon: Any = None
) -> torch.Tensor:
    """Inference batch norm over channel axis 1; coremltools fuses x * w + b into it."""
    eps = 1e-5 if epsilon is None else _float(epsilon)
    return F.batch_norm(x, mean, variance, weight=gamma, bias=beta, training=False, eps=eps)


@kernel("instance_norm")
def instance_norm(x: torch.Tensor, gamma: Any = None, beta: Any = None, epsilon: Any = None) -> torch.Tensor:
    eps = 1e-5 if epsilon is None else _float(epsilon)
    return F.instance_norm(x, weight=gamma, bias=beta, eps=eps)


@kernel("cumsum")
def cumsum(x: torch.Tensor, axis: Any = 0, exclusive: Any = None, reverse: Any = None) -> torch.Tensor:
    dim = _int(axis)
    if _bool(reverse):
        x = torch.flip(x, [dim])
    out = torch.cumsum(x, dim=dim).to(x.dtype)
    if _bool(exclusive):  # shift by one rather than subtract x, which would add rounding error
        out = torch.cat([torch.zeros_like(out.narrow(dim, 0, 1)), out.narrow(dim, 0, out.shape[dim] - 1)], dim=dim)
    if _bool(reverse):
        out = torch.flip(out, [dim])
    return out


# --- linear algebra and convolution --------------------------------------------------------


@kernel("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@kernel("matmul")
def matmul(x: torch.Tensor, y: torch.Tensor, transpose_x: Any = None, transpose_y: Any = None) -> torch.Tensor:
    if _bool(transpose_x) and x.dim() >= 2:
        x = x.transpose(-1, -2)
    if _bool(transpose_y) and y.dim() >= 2:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def _conv_padding(
    pad_type: str, pad: Any, spatial: list[int], kernel_size: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """[before_0, after_0, before_1, after_1, ...] per spatial dim, as MIL's conv defines it."""
    if pad_type == "valid":
        return [0] * (2 * len(spatial))
    if pad_type == "custom":
        return _ints(pad) if pad is not None else [0] * (2 * len(spatial))
    if pad_type in ("same", "same_lower"):
        result = []
        for size, k, s, d in zip(spatial, kernel_size, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            result += [small, large] if pad_type == "same" else [large, small]
        return result
    raise ValueError(f"conv pad_type {pad_type!r} is not one of valid, custom, same, same_lower")


def _conv_settings(weight: torch.Tensor, strides: Any, dilations: Any, groups: Any) -> tuple[int, list, list, int]:
    """Spatial rank, strides, dilations and groups with MIL's defaults (1s, one group)."""
    rank = weight.dim() - 2
    return (
        rank,
        _ints(strides) if strides is not None else [1] * rank,
        _ints(dilations) if dilations is not None else [1] * rank,
        1 if groups is None else _int(groups),
    )


@kernel("conv")
def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Any = None,
    strides: Any = None,
    pad_type: str = "valid",
    pad: Any = None,
    dilations: Any = None,
    groups: Any = None,
) -> torch.Tensor:
    spatial_rank, strides_, dilations_, groups_ = _conv_settings(weight, strides, dilations, groups)
    padding = _conv_padding(pad_type, pad, list(x.shape[2:]), list(weight.shape[2:]), strides_, dilations_)
    torch_pad = [p for i in reversed(range(spatial_rank)) for p in padding[2 * i : 2 * i + 2]]
    if any(torch_pad):
        x = F.pad(x, torch_pad)
    function = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial_rank]
    return function(x, weight, bias, stride=strides_, dilation=dilations_, groups=groups_)


@kernel("conv_transpose")
def conv_transpose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Any = None,
    pad: Any = None,
    output_shape: Any = None,
    pad_type: str = "valid",
    strides: Any = None,
    dilations: Any = None,
    groups: Any = None,
) -> torch.Tensor:
    """Weight is [C_in, C_out/groups, *kernel], as torch's; a custom pad crops the full output."""
    spatial_rank, strides_, dilations_, groups_ = _conv_settings(weight, strides, dilations, groups)
    function = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial_rank]
    full = function(x, weight, bias, stride=strides_, dilation=dilations_, groups=groups_)
    if pad_type == "custom" and pad is not None:
        crops = _ints(pad)
    elif pad_type == "valid":
        crops = [0] * (2 * spatial_rank)
    else:
        raise ValueError(f"conv_transpose pad_type {pad_type!r} is not supported (valid, custom)")
    index = [slice(None), slice(None)]
    for i in range(spatial_rank):
        size = full.shape[2 + i]
        index.append(slice(crops[2 * i], size - crops[2 * i + 1]))
    out = full[tuple(index)]
    if output_shape is not None:
        wanted = _ints(output_shape)[-spatial_rank:]
        if list(out.shape[2:]) != wanted:
            raise ValueError(f"conv_transpose output {list(out.shape[2:])} differs from output_shape {wanted}")
    return out


# --- shape and data movement ---------------------------------------------------------------


@kernel("cast")
def cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The interpreter applies the declared output dtype; here only integer casts truncate."""
    x = torch.as_tensor(x)
    if dtype in ("int8", "uint8", "int16", "uint16", "int32", "int64"):
        return torch.trunc(x.double()).to(torch.int64) if x.is_floating_point() else x.to(torch.int64)
    if dtype == "bool":
        return x != 0
    return x.float() if x.dtype == torch.bool else x


@kernel("reshape")
def reshape(x: torch.Tensor, shape: Any) -> torch.Tensor:
    wanted = _ints(shape)
    if len(wanted) == x.dim():
        wanted = [x.shape[i] if size == 0 else size for i, size in enumerate(wanted)]
    return torch.reshape(x, wanted)


@kernel("transpose")
def transpose(x: torch.Tensor, perm: Any) -> torch.Tensor:
    return x.permute(_ints(perm))


@kernel("expand_dims")
def expand_dims(x: torch.Tensor, axes: Any) -> torch.Tensor:
    rank = x.dim() + len(_ints(axes))
    for axis in sorted(_axis(a, rank) for a in _ints(axes)):
        x = x.unsqueeze(axis)
    return x


@kernel("squeeze")
def squeeze(x: torch.Tensor, axes: Any = None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    for axis in sorted((_axis(a, x.dim()) for a in _ints(axes)), reverse=True):
        x = x.squeeze(axis)
    return x


@kernel("concat")
def concat(values: list[torch.Tensor], axis: Any, interleave: Any = None) -> torch.Tensor:
    dim = _int(axis)
    if not _bool(interleave):
        return torch.cat([torch.as_tensor(v) for v in values], dim=dim)
    dim = _axis(dim, values[0].dim())
    stacked = torch.stack(list(values), dim=dim + 1)
    shape = list(values[0].shape)
    shape[dim] *= len(values)
    return stacked.reshape(shape)


@kernel("stack")
def stack(values: list[torch.Tensor], axis: Any) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v) for v in values], dim=_int(axis))


@kernel("split")
def split(x: torch.Tensor, axis: Any, num_splits: Any = None, split_sizes: Any = None) -> tuple[torch.Tensor, ...]:
    dim = _int(axis)
    if split_sizes is not None:
        return tuple(torch.split(x, _ints(split_sizes), dim=dim))
    return tuple(torch.chunk(x, _int(num_splits), dim=dim))


@kernel("slice_by_index")
def slice_by_index(
    x: torch.Tensor,
    begin: Any,
    end: Any,
    stride: Any = None,
    begin_mask: Any = None,
    end_mask: Any = None,
    squeeze_mask: Any = None,
) -> torch.Tensor:
    rank = x.dim()
    begins, ends = _ints(begin), _ints(end)
    strides = _ints(stride) if stride is not None else [1] * rank
    begin_masks = _ints(begin_mask) if begin_mask is not None else [0] * rank
    end_masks = _ints(end_mask) if end_mask is not None else [0] * rank
    squeeze_masks = _ints(squeeze_mask) if squeeze_mask is not None else [0] * rank
    index: list[Any] = []
    for axis in range(rank):
        if squeeze_masks[axis]:
            index.append(begins[axis])
            continue
        start = None if begin_masks[axis] else begins[axis]
        stop = None if end_masks[axis] else ends[axis]
        index.append(slice(start, stop, strides[axis]))
    if any(s < 0 for s in strides):
        return _slice_with_negative_strides(x, index)
    return x[tuple(index)]


def _slice_with_negative_strides(x: torch.Tensor, index: list[Any]) -> torch.Tensor:
    """torch tensors reject negative steps; numpy's slicing has the same meaning as MIL's."""
    return torch.from_numpy(np.ascontiguousarray(x.numpy()[tuple(index)]))


@kernel("pad")
def pad(x: torch.Tensor, pad: Any, mode: str = "constant", constant_val: Any = None) -> torch.Tensor:
    """MIL lists (before, after) from the first padded dim on; torch's F.pad from the last."""
    amounts = _ints(pad)
    pairs = [amounts[i : i + 2] for i in range(0, len(amounts), 2)]
    torch_pad = [p for pair in reversed(pairs) for p in pair]
    if mode == "constant":
        value = 0.0 if constant_val is None else _float(constant_val)
        return F.pad(x, torch_pad, mode="constant", value=value)
    if mode in ("reflect", "replicate"):
        return F.pad(x, torch_pad, mode=mode)
    raise ValueError(f"pad mode {mode!r} is not one of constant, reflect, replicate")


@kernel("fill_like")
def fill_like(ref_tensor: torch.Tensor, value: Any = None) -> torch.Tensor:
    fill = torch.as_tensor(0.0 if value is None else value)
    return torch.full(tuple(ref_tensor.shape), fill.item(), dtype=fill.dtype)


@kernel("fill")
def fill(shape: Any, value: Any = None) -> torch.Tensor:
    fill = torch.as_tensor(0.0 if value is None else value)
    return torch.full(tuple(_ints(shape)), fill.item(), dtype=fill.dtype)


@kernel("tile")
def tile(x: torch.Tensor, reps: Any) -> torch.Tensor:
    return x.repeat(_ints(reps))


@kernel("gather")
def gather(
    x: torch.Tensor, indices: torch.Tensor, axis: Any = 0, batch_dims: Any = None, validate_indices: Any = None
) -> torch.Tensor:
    if batch_dims is not None and _int(batch_dims) != 0:
        raise ValueError("gather with batch_dims is not supported by the emulator")
    dim = _axis(_int(axis), x.dim())
    idx = torch.as_tensor(indices).long()
    idx = torch.where(idx < 0, idx + x.shape[dim], idx)
    out = torch.index_select(x, dim, idx.reshape(-1))
    return out.reshape(*x.shape[:dim], *idx.shape, *x.shape[dim + 1 :])


@kernel("shape")
def shape(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(x.shape), dtype=torch.int32)


@kernel("identity")
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# --- activation quantization (iOS17 quantize / dequantize, W8A8 packages) ------------------

_INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _per_axis(values: Any, rank: int, axis: Any) -> torch.Tensor:
    """A scalar, or a vector laid along `axis` of a rank-`rank` tensor."""
    tensor = torch.as_tensor(values).float()
    if tensor.numel() == 1 or axis is None:
        return tensor.reshape(())
    shape = [1] * rank
    shape[_axis(_int(axis), rank)] = -1
    return tensor.reshape(shape)


@kernel("quantize")
def quantize(
    input: torch.Tensor, scale: Any, output_dtype: Any, zero_point: Any = None, axis: Any = None
) -> torch.Tensor:
    """round(x / scale + zero_point), saturated to the integer type (round half to even)."""
    low, high = _INTEGER_RANGES[str(output_dtype)]
    x = input.float()
    zero = _per_axis(0 if zero_point is None else zero_point, x.dim(), axis)
    return torch.clamp(torch.round(x / _per_axis(scale, x.dim(), axis) + zero), low, high)


@kernel("dequantize")
def dequantize(input: torch.Tensor, scale: Any, zero_point: Any = None, axis: Any = None) -> torch.Tensor:
    """(q - zero_point) * scale."""
    x = torch.as_tensor(input).float()
    zero = _per_axis(0 if zero_point is None else zero_point, x.dim(), axis)
    return (x - zero) * _per_axis(scale, x.dim(), axis)


# --- compressed weights (constexpr_*): decoded once at load time --------------------------


@kernel("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data: torch.Tensor, zero_point: Any, scale: Any, axis: Any) -> torch.Tensor:
    """iOS16: (q - zero_point) * scale, zero_point and scale per channel along `axis`."""
    data = torch.as_tensor(quantized_data).float()
    shape = [1] * data.dim()
    zero = torch.as_tensor(zero_point).float()
    factor = torch.as_tensor(scale).float()
    if zero.numel() > 1 or factor.numel() > 1:
        shape[_axis(_int(axis), data.dim())] = -1
    return (data - zero.reshape(shape)) * factor.reshape(shape)


def _expand_blocks(values: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """Repeat a per-block tensor (same rank, dims dividing the target's) up to the target shape."""
    for dim, (size, wanted) in enumerate(zip(values.shape, target_shape, strict=True)):
        if size != wanted:
            values = torch.repeat_interleave(values, wanted // size, dim=dim)
    return values


@kernel("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data: torch.Tensor, scale: torch.Tensor, offset: Any = None) -> torch.Tensor:
    """iOS18: (data - offset) * scale, each of scale/offset constant over blocks of data."""
    data = torch.as_tensor(data).float()
    out = data
    if offset is not None:
        out = out - _expand_blocks(torch.as_tensor(offset).float(), tuple(data.shape))
    return out * _expand_blocks(torch.as_tensor(scale).float(), tuple(data.shape))


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Core ML packs sub-byte indices little-endian: the first element in the lowest bits."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: count * nbits]
    weights = (1 << np.arange(nbits, dtype=np.uint32)).astype(np.uint32)
    return (bits.reshape(count, nbits).astype(np.uint32) * weights).sum(axis=1)


@kernel("constexpr_lut_to_dense")
def constexpr_lut_to_dense(lut: torch.Tensor, indices: Any, shape: Any = None, vector_axis: Any = None) -> torch.Tensor:
    """iOS16 (packed uint8 indices + shape, one table) and iOS18 (uint<n> indices, tables per block)."""
    lut = torch.as_tensor(lut).float()
    if shape is not None:
        wanted = _ints(shape)
        nbits = int(math.log2(lut.shape[0]))
        count = math.prod(wanted)
        index = unpack_bits(np.asarray(indices), nbits, count).astype(np.int64)
        return lut[torch.from_numpy(index)].reshape(wanted)
    if vector_axis is not None:
        raise ValueError("vector palettization (vector_axis) is not supported by the emulator")
    index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    rank = index.dim()
    if lut.shape[-1] != 1:
        raise ValueError("vector palettization (lut with vector size > 1) is not supported by the emulator")
    tables = lut[..., 0]  # [*blocks, palette]
    blocks = tuple(tables.shape[:rank])
    block_size = [s // b for s, b in zip(index.shape, blocks, strict=True)]
    block_id = [torch.arange(s) // bs for s, bs in zip(index.shape, block_size, strict=True)]
    grids = torch.meshgrid(*block_id, indexing="ij")
    return tables[(*grids, index)]
