"""Graph patches more than one target applies, each exact against the graph it replaces
(tests/test_gpu_ready.py) and each saying which accelerator rule it meets.

The encoder's relative-position biases are gathered from a compact table at run time
(`pipeline.model`): LiteRT's GPU delegate does not run GATHER_ND, and gather is among the layers
the Neural Engine is known not to run (mobile_targets/neural_engine.py), so the TFLite, Core ML
and Core AI files all take them as products with one-hot constants instead.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.models.tiny_vit import Attention as TinyVitAttention

from pipeline.model import MobileSamTinyViT


def four_d_corner(image: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The first channel's top-left rows x columns, kept 4-D (1, 1, rows, columns).

    Why: the default corner is 2-D, and each attention's part of it a 2-D SLICE, which the GPU
    delegate does not take; the same values sliced as 4-D tensors are."""
    return image[:1, :1, :rows, :columns]


def one_hot_bias_table(self: TinyVitAttention, anchor: torch.Tensor) -> torch.Tensor:
    """The (heads, tokens, tokens) bias of `pipeline.model._gather_biases_at_run_time`, the two
    per-axis gathers written as products with constant one-hot matrices.

    Why: litert-torch lowers those gathers to GATHER_ND, which the GPU delegate does not run, and
    coremltools to `gather`, which the Neural Engine is known not to run: each of the encoder's
    gathers would cut the graph between accelerator and CPU. A one-hot product picks
    each value times 1 plus zeros: exact in fp32 and fp16 alike. The table keeps its run-time
    anchor row (so no converter folds it into the full table) and stays compact. Its tensors
    are at most 4-D (`without_bias_gathers`' graphs meet the WebGPU delegate's rule too)."""
    heads, offsets = self.num_heads, self.bias_axis_offsets
    size = math.isqrt(offsets.shape[0])
    dtype = self.attention_biases.dtype
    table = torch.cat(
        [self.attention_biases.view(heads, size, size), anchor[:, :, :heads, :size].reshape(heads, 1, size).to(dtype)],
        dim=1,
    )  # [h, dy + anchor row, dx]
    # the one-hot rows with one run-time row more (dropped after the product): a constant on the
    # left of a BATCH_MATMUL is what XNNPACK refuses in fp16 arithmetic
    anchor_row = anchor[:, :, :1, : size + 1].reshape(1, size + 1).to(dtype)
    pick_rows = torch.cat([self.pick_bias_rows.to(dtype), anchor_row], dim=0)
    by_rows = torch.matmul(pick_rows, table)[:, : size * size]  # [h, (i1, i2), dx]
    bias = torch.matmul(by_rows, self.pick_bias_columns.to(dtype))  # [h, (i1, i2), (j1, j2)]
    # to [h, (i1, j1), (i2, j2)] through 4-D views: LiteRT's WebGPU delegate takes no 5-D tensor
    bias = bias.view(heads * size, size, size, size).transpose(1, 2)  # [(h, i1), j1, i2, j2]
    return bias.reshape(heads, size * size, size * size)


def without_bias_gathers(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose TinyViT attentions take their biases from `one_hot_bias_table`,
    anchored on `four_d_corner` (modules without a TinyViT come back as an unchanged copy)."""
    patched = copy.deepcopy(module)
    for child in patched.modules():
        if isinstance(child, MobileSamTinyViT):
            child.anchor_corner = four_d_corner
        elif isinstance(child, TinyVitAttention):
            child.bias_from_table = one_hot_bias_table
            offsets = child.bias_axis_offsets
            size = math.isqrt(offsets.shape[0])
            # constants, made here: F.one_hot in the graph exports run-time range checks
            child.register_buffer("pick_bias_rows", F.one_hot(offsets, size + 1).float(), persistent=False)
            child.register_buffer(
                "pick_bias_columns", F.one_hot(offsets, size).float().T.contiguous(), persistent=False
            )
    return patched
