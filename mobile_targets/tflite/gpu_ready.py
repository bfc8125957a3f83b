"""Graph patches that let LiteRT's GPU delegate run a whole `.tflite`, each exact against the graph
it replaces (tests/test_gpu_ready.py) and each saying which delegate rule it meets.

The GPU delegate's rules are TensorFlow Lite's `gpu_compatibility` checks (what
`tf.lite.experimental.Analyzer.analyze(..., gpu_compatibility=True)` reports): no GATHER_ND, SLICE
only on 3-D or 4-D tensors, a MUL's operands broadcast one way only (one of them at least as large
as the other in every dimension), no BROADCAST_TO. LiteRT's WebGPU delegate (LiteRT.js, run by
`validation.compat`) adds its own: no tensor of more than 4 dimensions, no BATCH_MATMUL with a
constant operand, no texture wider than WebGPU's default limit, no dispatch of more workgroups a
dimension than WebGPU's default limit.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.transformer import TwoWayAttentionBlock

from mobile_targets.graph_patches import without_bias_gathers
from pipeline.export_wrappers import PromptDecoderForExport, softmax_times_kept_values


def one_hot_label_embeddings(prompt_encoder: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """`pipeline.export_wrappers.label_embeddings_as_masks` as one product: the labels' one-hot
    rows (-1 to 3) times the table of the five embeddings.

    Why: there each 0/1 mask (B x slots x 1) multiplies an embedding (1 x 256), a MUL broadcast
    both ways, which the GPU delegate refuses. One row of the one-hot picks one embedding times 1
    plus zeros: exact."""
    table = torch.cat(
        [prompt_encoder.not_a_point_embed.weight, *(e.weight for e in prompt_encoder.point_embeddings)], dim=0
    )
    label_values = torch.arange(-1, table.shape[0] - 1, dtype=labels.dtype)
    one_hot = (labels.unsqueeze(-1) == label_values).to(table.dtype)
    return torch.matmul(one_hot, table)


def tiled_by_concatenation(part: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    """`part` repeated `times` times along `dim`, by concatenations that double it (and a slice
    of the result for what a power of two leaves over).

    Why: `repeat` and `expand` export as BROADCAST_TO, which the GPU delegate refuses, and a
    product with a constant column of ones as a BATCH_MATMUL with a constant operand, which
    LiteRT's WebGPU delegate refuses ("Not supported batched mat mul case"); both delegates run
    CONCATENATION. Copies: exact."""
    size = part.shape[dim] * times
    whole = part
    while whole.shape[dim] * 2 <= size:
        whole = torch.cat([whole, whole], dim=dim)
    if whole.shape[dim] < size:
        whole = torch.cat([whole, whole.narrow(dim, 0, size - whole.shape[dim])], dim=dim)
    return whole


def image_pe_tokens_tiled(
    pe_layer: torch.nn.Module, axis_points: torch.Tensor, anchor_points: torch.Tensor
) -> torch.Tensor:
    """`pipeline.export_wrappers.image_pe_tokens_at_run_time` with 3-D slices and the row terms
    tiled to the full grid before the angle-sum products.

    Why: there the per-axis terms are 2-D slices of the encoding and the products multiply a
    (1, g, 128) column term by a (g, 1, 128) row term, a MUL broadcast both ways; the GPU delegate
    takes neither. Tiled, each product has one full-size operand; the values are the same. The
    tiling is `tiled_by_concatenation`: copies, exact."""
    grid_size = axis_points.shape[1] // 2
    encoded = pe_layer._pe_encoding(torch.cat([axis_points, anchor_points[:1]], dim=1))[:, : 2 * grid_size]
    half = encoded.shape[-1] // 2
    sin_u, cos_u = encoded[:, :grid_size, :half], encoded[:, :grid_size, half:]  # (1, g, half): columns
    rows = tiled_by_concatenation(encoded[:, grid_size:].reshape(grid_size, 1, 2 * half), grid_size, dim=1)
    sin_v, cos_v = rows[:, :, :half], rows[:, :, half:]  # (g, g, half): rows
    sin_uv = sin_v * cos_u + cos_v * sin_u
    cos_uv = cos_v * cos_u - sin_v * sin_u
    return torch.cat([sin_uv, cos_uv], dim=-1).reshape(1, grid_size * grid_size, 2 * half)


def rows_times_ones(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """`rows` (leading dimension 1) for each of `batch` prompts, as a product with a column of ones.

    Why: `expand` exports as BROADCAST_TO, which the GPU delegate does not run (the batched
    decoder's output tokens), and leaving the broadcast to a MUL broadcasts it both ways (its
    no-mask embedding). One term per value, times 1: exact."""
    if batch == 1:  # nothing to broadcast (and litert-torch fails on the 1 x 1 product)
        return rows
    ones = torch.ones(batch, 1, dtype=rows.dtype)
    return torch.matmul(ones, rows.reshape(1, -1)).reshape(batch, *rows.shape[1:])


WEBGPU_TEXTURE_TEXELS = 8192
"""WebGPU's default `maxTextureDimension2D`: the widest 2-D texture every adapter must offer."""
MASK_PRODUCT_COLUMNS = 2 * WEBGPU_TEXTURE_TEXELS
"""Columns of the upscaled embedding per mask product: a texture of half the default limit (four
values a texel)."""


def mask_product_in_column_blocks(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """hyper_in @ upscaled (B x masks x 32 @ B x 32 x 65536) as one product per block of
    `MASK_PRODUCT_COLUMNS` columns, concatenated.

    Why: LiteRT's WebGPU delegate (LiteRT.js) stores the 32 x 65536 operand as a texture 16384
    texels wide, over WebGPU's default limit; on an adapter at that limit (SwiftShader) it logs a
    validation error and returns wrong masks. Each mask value is the same 32-term dot product in
    its block as in the whole: exact."""
    columns = upscaled.shape[-1]
    if columns <= MASK_PRODUCT_COLUMNS:
        return torch.matmul(hyper_in, upscaled)
    blocks = [upscaled[:, :, start : start + MASK_PRODUCT_COLUMNS] for start in range(0, columns, MASK_PRODUCT_COLUMNS)]
    return torch.cat([torch.matmul(hyper_in, block) for block in blocks], dim=-1)


def weighted_values_in_prompt_blocks(
    logits: torch.Tensor, values: torch.Tensor, key_keep: torch.Tensor | None
) -> torch.Tensor:
    """`pipeline.export_wrappers.softmax_times_kept_values` taken per block of prompts, each
    block's values (blocks x heads x keys x 16) at most `WEBGPU_TEXTURE_TEXELS` texels high.

    Why: LiteRT's WebGPU delegate stores a product's right operand as a texture (batch x keys) / 4
    texels high: one prompt's token-to-image values (8 heads x 4096 keys) fill the default limit
    exactly, and the batched decoder's B prompts went B times over it and answered wrong without
    an error. Each block is the same softmax and products for its prompts: exact."""
    batch, heads, _, keys = logits.shape
    block = max(1, 4 * WEBGPU_TEXTURE_TEXELS // (heads * keys))
    if batch <= block:
        return softmax_times_kept_values(logits, values, key_keep)
    return torch.cat(
        [
            softmax_times_kept_values(
                logits[start : start + block],
                values[start : start + block],
                None if key_keep is None else key_keep[start : start + block],
            )
            for start in range(0, batch, block)
        ],
        dim=0,
    )


WEBGPU_WORKGROUPS_PER_DIMENSION = 65535
"""WebGPU's default `maxComputeWorkgroupsPerDimension`: the most workgroups every adapter must
take in one dimension of a dispatch."""


class LayerNormInPromptBlocks(torch.nn.Module):
    """`norm` over blocks of prompts (the leading dimension), each block at most
    `WEBGPU_WORKGROUPS_PER_DIMENSION` rows, concatenated.

    Why: LiteRT's WebGPU delegate dispatches a LayerNorm with one workgroup a row, and the
    batched decoder's image-token norm (B x 4096 x 256) has 4096 rows a prompt: from 16 prompts on
    the dispatch is over WebGPU's default limit, the browser logs "Dispatch workgroup count X ...
    exceeds max compute workgroups per dimension" and the run answers wrong with no error. Each row
    is normalized alone: exact."""

    def __init__(self, norm: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        rows_per_prompt = rows[0].numel() // rows.shape[-1]
        block = max(1, WEBGPU_WORKGROUPS_PER_DIMENSION // rows_per_prompt)
        if rows.shape[0] <= block:
            return self.norm(rows)
        return torch.cat([self.norm(rows[start : start + block]) for start in range(0, rows.shape[0], block)], dim=0)


def gpu_ready(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of an export wrapper (or anything holding one) with every patch: the encoder's biases
    without gathers (`mobile_targets.graph_patches.without_bias_gathers`); the decoder's
    `one_hot_label_embeddings`, `image_pe_tokens_tiled`, `rows_times_ones`,
    `mask_product_in_column_blocks` and `weighted_values_in_prompt_blocks`; its image-token norms
    as `LayerNormInPromptBlocks`."""
    patched = without_bias_gathers(module)
    for child in patched.modules():
        if isinstance(child, PromptDecoderForExport):
            child.label_embeddings = one_hot_label_embeddings
            child.image_pe = image_pe_tokens_tiled
            child.batch_rows = rows_times_ones
            child.mask_product = mask_product_in_column_blocks
            child.weighted_values = weighted_values_in_prompt_blocks
            for block in child.mask_decoder.transformer.layers:
                if isinstance(block, TwoWayAttentionBlock):
                    block.norm4 = LayerNormInPromptBlocks(block.norm4)
    return patched
