"""MobileSAM and the SAM teachers, built from timm's TinyVit and segment-anything's modules.

MobileSAM = TinyViT-5M image encoder + SAM's prompt encoder and mask decoder, unchanged. The
whole model is segment-anything's `Sam` class, so `SamPredictor` runs it as it runs SAM.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import TinyVit, TinyVitBlock, TinyVitStage
from torch import nn

from pipeline.contract import EMBEDDING_SHAPE, IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

ModelType = Literal["vit_t", "vit_b", "vit_l", "vit_h"]
STUDENT_TYPE: ModelType = "vit_t"
TEACHER_TYPES: tuple[ModelType, ...] = ("vit_b", "vit_l", "vit_h")
MODEL_TYPES: tuple[ModelType, ...] = (STUDENT_TYPE, *TEACHER_TYPES)

PROMPT_EMBED_DIM = EMBEDDING_SHAPE[1]


class MobileSamTinyViT(TinyVit):
    """TinyViT-5M as MobileSAM uses it: a 64x64x256 embedding for a 1024x1024 image.

    Two changes to timm's TinyVit: the last downsample keeps stride 1 (so the output stays
    64x64, as SAM's decoder expects), and a conv/LayerNorm2d neck maps 320 to 256 channels.
    The classification head stays only because the official checkpoint stores it; it is not run.
    """

    def __init__(
        self,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        out_chans: int = PROMPT_EMBED_DIM,
    ) -> None:
        super().__init__(
            num_classes=1000,
            embed_dims=embed_dims,
            depths=depths,
            num_heads=num_heads,
            window_sizes=window_sizes,
            drop_path_rate=0.0,
        )
        self.img_size = IMAGE_SIZE  # SamPredictor reads image_encoder.img_size
        _make_export_friendly(self)
        self.anchor_corner: AnchorCorner = first_channel_corner  # a converter may take another form of it
        self.bias_anchor_shape = (max(num_heads) + 1, max(window_sizes) + 1)
        """The corner of the input each attention's bias gather is anchored on (`forward`): one
        row and column more than any attention takes, so that every attention's part of it is a
        real slice (torch.export turns a whole-tensor slice into `alias`, which coremltools
        cannot convert)."""
        last_downsample = self.stages[-1].downsample
        last_downsample.conv2.conv.stride = (1, 1)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `forward_features` (its stages' steps, in order) and the neck, with every
        attention block given the same slice of the input as its bias anchor.

        Why: each block's bias gather (`_gather_biases_at_run_time`) needs a non-constant input
        and runs outside XNNPACK. Anchored on the block's own activations, the 20 gathers cut the
        TFLite graph into 21 XNNPACK partitions, and in fp16 arithmetic every cut converts the
        activations crossing it to fp32 and back; anchored on the input, the gathers can run
        before everything else and the encoder stays one partition (docs/tflite.md)."""
        rows, columns = self.bias_anchor_shape
        bias_anchor = self.anchor_corner(x, rows, columns)
        x = self.patch_embed(x)
        for stage in self.stages:
            if not isinstance(stage, TinyVitStage):
                x = stage(x)  # the convolutional stage: no attention
                continue
            x = stage.downsample(x).permute(0, 2, 3, 1)  # BCHW -> BHWC, as TinyVitStage.forward
            for block in stage.blocks:
                x = block(x, bias_anchor)
            x = x.permute(0, 3, 1, 2)
        return self.neck(x)


AnchorCorner = Callable[[torch.Tensor, int, int], torch.Tensor]
"""(image, rows, columns) -> the corner of the image the attention biases are anchored on."""


def first_channel_corner(image: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The first image's first channel, its top-left rows x columns, as a 2-D tensor (slices first:
    the selects then copy rows x columns values)."""
    return image[:, :, :rows, :columns][0, 0]


def _make_export_friendly(encoder: TinyVit) -> None:
    """Three patches to timm's TinyVit, each needed by a converter.

    1. Explicit attention (softmax(q k^T + bias) v) instead of F.scaled_dot_product_attention,
       as 3-D batched matmuls over (windows x heads) with q, k, v sliced out of one tensor
       (`_attention_as_bmm`). With a float mask, SDPA decomposes into logical_not/any/where ops
       that stay outside XNNPACK after int8 quantization, and ExecuTorch 1.5.1 then fails to load
       the program ("Failed to load method forward, error: 0x:1"); timm's own explicit path
       (4-D `@` after a split) exports as expand_copy and split_with_sizes_copy kernels, which
       XNNPACK does not take, so every attention block left the delegate four times. It is also
       upstream MobileSAM's order of operations. It also gathers the biases on every call, never
       from timm's eval-mode cache (which goes stale when weights change later, and which
       torch.export reports filling as a side effect).
    2. Keep the biases as the compact table in the converted files (`_gather_biases_at_run_time`).
    3. Each block's local convolution hands its output back to the tokens in a form the
       channels-last runtimes need no transposes for (`_block_with_channels_last_local_conv`).
    """
    for module in encoder.modules():
        if isinstance(module, TinyVitAttention):
            module.forward = types.MethodType(_attention_as_bmm, module)
            module.weighted_values = softmax_times_values  # a converter may swap in other arithmetic
            module.bias_from_table = _gather_biases_at_run_time  # likewise, with the encoder's anchor_corner
            _register_separable_bias_index(module)
        elif isinstance(module, TinyVitBlock):
            module.forward = types.MethodType(_block_with_channels_last_local_conv, module)


def _block_with_channels_last_local_conv(
    self: TinyVitBlock, x: torch.Tensor, bias_anchor: torch.Tensor | None = None
) -> torch.Tensor:
    """timm's TinyVitBlock, the same arithmetic (outputs bit-identical), with the local
    convolution's output put back as tokens by `permute(0, 2, 3, 1)` then a reshape, where timm
    reshapes to (B, C, H * W) and then transposes.

    Why: XNNPACK runs the convolution channels-last, so the converters add a transpose back to
    channels-first after it; the permute cancels that one, where timm's reshape in between kept
    it and added a second (docs/benchmark.md has what it saves). The window partition and its
    reverse move the same values as timm's through 4-D views (batch with window rows, a window's
    columns with channels) where timm's are 6-D: LiteRT's WebGPU delegate takes no tensor of
    more than 4 dimensions, so each 6-D view cut the graph between GPU and CPU (a window-sized
    input goes through the same partition, into one window). `bias_anchor` goes to the
    attention (`_gather_biases_at_run_time`)."""
    batch, height, width, channels = x.shape
    size = self.window_size
    pad_bottom, pad_right = (size - height % size) % size, (size - width % size) % size
    windows = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom)) if pad_bottom or pad_right else x
    rows, columns = (height + pad_bottom) // size, (width + pad_right) // size
    windows = windows.reshape(batch * rows, size, columns, size * channels).transpose(1, 2)
    attended = self.attn(windows.reshape(batch * rows * columns, size * size, channels), bias_anchor)
    attended = attended.view(batch * rows, columns, size, size * channels).transpose(1, 2)
    attended = attended.reshape(batch, rows * size, columns * size, channels)
    if pad_bottom or pad_right:
        attended = attended[:, :height, :width]
    x = x + self.drop_path1(attended)
    tokens = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    tokens = tokens + self.drop_path2(self.mlp(tokens))
    return tokens.view(batch, height, width, channels)


def _register_separable_bias_index(module: TinyVitAttention) -> None:
    """Per-axis offset indices (|i1 - i2| over window rows, likewise columns), each ws x ws.

    timm numbers the offset (dy, dx) of a ws x ws window as dy * ws + dx (the first query, at
    (0, 0), meets every offset in row-major order), so the bias of tokens (i1, j1), (i2, j2) is
    table[dy, dx] with the table viewed as ws x ws: two small gathers instead of one with a
    tokens x tokens index (which the converters store as a constant of 4 or 8 bytes per entry).
    """
    tokens = module.attention_bias_idxs.shape[0]
    size = math.isqrt(tokens)
    if size * size != tokens or module.attention_biases.shape[1] != tokens:
        raise ValueError(f"TinyViT attention with {tokens} tokens is not a square window")
    axis = torch.arange(size)
    offsets = (axis[:, None] - axis[None, :]).abs().reshape(-1)
    dy, dx = offsets.view(size, size, 1, 1), offsets.view(1, 1, size, size)
    expected = (dy * size + dx).permute(0, 2, 1, 3).reshape(tokens, tokens)
    if not torch.equal(module.attention_bias_idxs, expected):
        raise ValueError("TinyViT's bias index does not follow the dy * ws + dx numbering")
    module.register_buffer("bias_axis_offsets", offsets, persistent=False)


_ANCHOR_ROW = 1
"""One row of run-time values appended to each ws x ws bias table (ws >= 7 and heads >= 2 give
more than 10 elements: coremltools turns a concat input of at most 10 elements into symbols and
folds the gather anyway)."""


def _gather_biases_at_run_time(self: TinyVitAttention, anchor: torch.Tensor) -> torch.Tensor:
    """The (heads, tokens, tokens) bias, gathered from a table the converters cannot fold.

    Why: gathering a constant table with constant indices is folded by litert-torch and
    coremltools into the full heads x tokens x tokens table (14 times the compact table for
    14x14 windows). A row of run-time values, taken from the 2-D `anchor` (at least heads x ws:
    the encoder's input image, `MobileSamTinyViT.forward`), is appended to the table, so the
    gathers' input is no longer constant; no index points at it, so the result is bit-identical
    to timm's. (A `0 * x` term is not enough: litert-torch folds it.) The gathers are per axis
    (`_register_separable_bias_index`).
    """
    heads, offsets = self.num_heads, self.bias_axis_offsets
    size = math.isqrt(offsets.shape[0])
    anchor = anchor[:heads, :size].to(self.attention_biases.dtype).view(heads, _ANCHOR_ROW, size)
    table = torch.cat([self.attention_biases.view(heads, size, size), anchor], dim=1)
    by_rows = torch.index_select(table, 1, offsets)  # [h, (i1, i2), dx]
    bias = torch.index_select(by_rows, 2, offsets)  # [h, (i1, i2), (j1, j2)]
    bias = bias.view(heads, size, size, size, size).permute(0, 1, 3, 2, 4)
    return bias.reshape(heads, size * size, size * size)


def _attention_as_bmm(self: TinyVitAttention, x: torch.Tensor, bias_anchor: torch.Tensor | None = None) -> torch.Tensor:
    """timm's TinyVit attention, the same arithmetic, with (windows x heads) folded into one
    batch dimension so both matmuls are `bmm` and q, k, v are slices (no expand, no split).
    Without a `bias_anchor` the biases are anchored on the first window's tokens."""
    if bias_anchor is None:  # the first window's tokens, in the form the encoder's anchor_corner gives
        bias_anchor = x[0] if self.bias_from_table is _gather_biases_at_run_time else x[None, :1]
    attention_bias = self.bias_from_table(self, bias_anchor)
    windows, tokens, _ = x.shape
    heads = self.num_heads
    qkv = self.qkv(self.norm(x)).view(windows, tokens, heads, -1).permute(0, 2, 1, 3)
    qkv = qkv.reshape(windows * heads, tokens, -1)
    q = qkv[:, :, : self.key_dim] * self.scale
    k = qkv[:, :, self.key_dim : 2 * self.key_dim]
    v = qkv[:, :, 2 * self.key_dim :]
    scores = torch.bmm(q, k.transpose(1, 2)).view(windows, heads, tokens, tokens) + attention_bias
    x = self.weighted_values(scores.view(windows * heads, tokens, tokens), v).view(windows, heads, tokens, self.val_dim)
    return self.proj(x.transpose(1, 2).reshape(windows, tokens, self.out_dim))


def softmax_times_values(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ values over batched (windows x heads) rows: attention's last step."""
    return torch.bmm(scores.softmax(dim=-1), values)


def build_mobile_sam() -> Sam:
    """MobileSAM with freshly initialised weights (seed them before calling)."""
    embedding_size = EMBEDDING_SHAPE[-1]
    return Sam(
        image_encoder=MobileSamTinyViT(),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def build_model(model_type: ModelType) -> Sam:
    """An untrained model of the given type: MobileSAM (`vit_t`) or a SAM teacher."""
    if model_type == STUDENT_TYPE:
        return build_mobile_sam()
    if model_type in TEACHER_TYPES:
        return sam_model_registry[model_type](checkpoint=None)
    raise ValueError(f"unknown model type {model_type!r}; expected one of {MODEL_TYPES}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


ARCHITECTURES: dict[str, str] = {
    "vit_t": "MobileSAM (TinyViT-5M image encoder)",
    "vit_b": "SAM ViT-B (ViT-B/16 image encoder)",
    "vit_l": "SAM ViT-L (ViT-L/16 image encoder)",
    "vit_h": "SAM ViT-H (ViT-H/16 image encoder)",
}
"""What each model type is, for metadata a developer reads (Xcode, the manifest)."""


def describe_architecture(model_type: str) -> str:
    return ARCHITECTURES.get(model_type, model_type)
