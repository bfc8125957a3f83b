"""Graph variants of the ExecuTorch image encoder that #13 tried, timed against the shipped one.

Variants (each converted by the ExecuTorch target itself, then timed interleaved with the others
in ExecuTorch's runtime, so machine noise hits all alike):
  shipped       the encoder as `nox -s convert_executorch` makes it;
  fused-windows the window partition folded into the attention's head split: q, k and v from
                separate projections, each moved to (windows x heads, tokens, dim) by one 6-D
                permute (k straight to its transposed layout), so no slices and no partition or
                reverse transposes; the same arithmetic;
  fp32-mbconv   (int8 only) stage 0's MBConv convolutions in fp32, as the int8 files had them
                before `INT8_CONVOLUTION_MODULES`;
  int8-patch-embed (int8 only) the patch embedding's two convolutions in int8 too. (The patch
                mergings' convolutions in int8 fail to lower: ExecuTorch 1.5.1's
                ChannelsLastTaggedReshapePass raises on them.)
Prints each variant's median and minimum in ms, its ratio to the shipped file, and its embedding
PSNR against PyTorch fp32.

    PYTHONPATH=. python benchmarks/executorch_encoder_variants.py [--precision fp32|int8]
        [--variants shipped fused-windows fp32-mbconv] [--threads 2] [--runs 12] [--checkpoint mobile_sam.pt]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from timm.models.tiny_vit import TinyVitBlock

from mobile_targets import executorch_target
from mobile_targets.base import PartToConvert
from mobile_targets.convert import build_parts
from mobile_targets.executorch_target import TARGET
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.contract import ENCODER
from pipeline.datasets import photos_from_options
from pipeline.metrics import psnr_db
from pipeline.model import _gather_biases_at_run_time
from validation.baselines import time_interleaved


def _separate_projections(attention: torch.nn.Module) -> None:
    """q, k and v as three linear layers cut from timm's per-head (q, k, v) qkv layer."""
    heads, key_dim, val_dim = attention.num_heads, attention.key_dim, attention.val_dim
    weight = attention.qkv.weight.detach().view(heads, 2 * key_dim + val_dim, -1)
    bias = attention.qkv.bias.detach().view(heads, 2 * key_dim + val_dim)
    for name, rows in (("q", slice(0, key_dim)), ("k", slice(key_dim, 2 * key_dim)), ("v", slice(2 * key_dim, None))):
        part_weight = weight[:, rows].reshape(-1, weight.shape[-1])
        linear = torch.nn.Linear(part_weight.shape[1], part_weight.shape[0])
        linear.weight.data, linear.bias.data = part_weight.clone(), bias[:, rows].reshape(-1).clone()
        setattr(attention, f"{name}_proj", linear)


def _fused_window_block(self: TinyVitBlock, x: torch.Tensor, bias_anchor: torch.Tensor | None = None) -> torch.Tensor:
    """TinyVitBlock.forward with the window partition done by the head-split permutes."""
    batch, height, width, channels = x.shape
    size, attention = self.window_size, self.attn
    heads = attention.num_heads
    pad_bottom, pad_right = (size - height % size) % size, (size - width % size) % size
    padded = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
    rows, columns = (height + pad_bottom) // size, (width + pad_right) // size
    windows, tokens = batch * rows * columns, size * size
    anchor = padded.reshape(batch, -1, channels)[0] if bias_anchor is None else bias_anchor
    bias = _gather_biases_at_run_time(attention, anchor)
    normed = attention.norm(padded)

    def by_window(t: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """(windows x heads, tokens, dim), or (windows x heads, dim, tokens) when transposed."""
        t = t.view(batch * rows, size, columns, size, heads, -1)
        if transposed:
            return t.permute(0, 2, 4, 5, 1, 3).reshape(windows * heads, -1, tokens)
        return t.permute(0, 2, 4, 1, 3, 5).reshape(windows * heads, tokens, -1)

    q = by_window(attention.q_proj(normed)) * attention.scale
    k = by_window(attention.k_proj(normed), transposed=True)
    v = by_window(attention.v_proj(normed))
    scores = torch.bmm(q, k).view(windows, heads, tokens, tokens) + bias
    out = attention.weighted_values(scores.view(windows * heads, tokens, tokens), v)
    out = out.view(batch * rows, columns, heads, size, size, -1).permute(0, 3, 1, 4, 2, 5)
    out = attention.proj(out.reshape(batch, rows * size, columns * size, -1))[:, :height, :width]
    x = (x + out).permute(0, 3, 1, 2)
    x = self.local_conv(x).reshape(batch, channels, height * width).transpose(1, 2)
    return (x + self.mlp(x)).view(batch, height, width, channels)


def fused_windows(encoder_wrapper: torch.nn.Module) -> torch.nn.Module:
    patched = copy.deepcopy(encoder_wrapper)
    for block in patched.modules():
        if isinstance(block, TinyVitBlock):
            _separate_projections(block.attn)
            block.forward = types.MethodType(_fused_window_block, block)
    return patched


VARIANTS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "shipped": lambda module: module,
    "fused-windows": fused_windows,
    "fp32-mbconv": lambda module: module,
    "int8-patch-embed": lambda module: module,
}
CONVERSION_PATCHES = {
    "fp32-mbconv": lambda: mock.patch.object(executorch_target, "INT8_CONVOLUTION_MODULES", ()),
    "int8-patch-embed": lambda: mock.patch.object(
        executorch_target,
        "INT8_CONVOLUTION_MODULES",
        (*executorch_target.INT8_CONVOLUTION_MODULES, "timm.models.tiny_vit.PatchEmbed"),
    ),
}
"""Variants that change the conversion rather than the module."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["shipped", "fused-windows"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    sam, _ = load_model("vit_t", args.checkpoint, 0)
    (encoder,) = [
        part
        for part in build_parts(RunConfig(batch_prompts=0), sam, photos_from_options(None, None, default="calibration"))
        if part.name == ENCODER
    ]
    with torch.no_grad():
        expected = encoder.module(*encoder.example_inputs).numpy()
    _unsafe_reset_threadpool(args.threads)
    methods, quality = {}, {}
    names = list(dict.fromkeys(["shipped", *args.variants]))
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            part = PartToConvert(VARIANTS[name](encoder.module), encoder.contract, encoder.example_inputs)
            path = Path(folder) / f"{name}.pte"
            with CONVERSION_PATCHES.get(name, contextlib.nullcontext)():
                TARGET.convert_part(part, args.precision, path)
            methods[name] = Runtime.get().load_program(path).load_method("forward")
            quality[name] = psnr_db(expected, methods[name].execute(list(encoder.example_inputs))[0].numpy())
    inputs = list(encoder.example_inputs)
    timings = time_interleaved({name: partial(method.execute, inputs) for name, method in methods.items()}, args.runs)
    print(f"ExecuTorch {args.precision} encoder, {args.threads} threads, {args.runs} interleaved runs each")
    for t in timings:
        print(
            f"{t.name:16s} median {t.median_ms:7.1f} ms  min {t.min_ms:7.1f} ms  "
            f"{t.ratio:.3f}x shipped  PSNR {quality[t.name]:.1f} dB"
        )


if __name__ == "__main__":
    main()
