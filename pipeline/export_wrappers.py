"""The two exported parts as plain tensor-in, tensor-out modules that follow the contract.

Control flow is replaced by arithmetic, as in segment-anything's SamOnnxModel, so every
converter sees one static graph. The prompt decoder masks surplus padding tokens out of
attention, so a prompt padded to N slots gives exactly SamPredictor's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from pipeline.contract import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD, PointLabel

MASKED_LOGIT = -1.0e3
"""Added to attention logits of masked keys: exp() of it is exactly 0 in fp32 and fp16, and it
stays finite (no -inf arithmetic, which some converters and fp16 kernels mishandle) and far from
fp16's limit, so the fp16 headroom of the ops that add it is the logits' own (pipeline.fp16_range)."""

# Plain ints: torch.export's tracer does not compare tensors with IntEnum members.
_PADDING = int(PointLabel.PADDING)
_BOX_TOP_LEFT = int(PointLabel.BOX_TOP_LEFT)


class ImageEncoderForExport(nn.Module):
    """`image` (1x3x1024x1024, RGB 0..255, mean-padded) -> `image_embeddings` (1x256x64x64)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder((image - self.pixel_mean) / self.pixel_std)


def padding_key_keep(point_labels: torch.Tensor) -> torch.Tensor:
    """Which prompt tokens (1 x N, 1 or 0) attention may use: exactly those SamPredictor would embed.

    SamPredictor embeds the k real points plus one padding point, or the k points plus the box
    corners and no padding. Here every slot labelled -1 is a padding token; the first one is
    kept when there is no box, every other one is masked out of attention.
    """
    is_padding = (point_labels == _PADDING).to(point_labels.dtype)
    has_box = (point_labels == _BOX_TOP_LEFT).to(point_labels.dtype).amax(dim=1, keepdim=True)
    is_first_padding = is_padding * (torch.cumsum(is_padding, dim=1) == 1).to(point_labels.dtype)
    return (1.0 - is_padding) + is_first_padding * (1.0 - has_box)


def softmax_times_kept_values(
    logits: torch.Tensor, values: torch.Tensor, key_keep: torch.Tensor | None
) -> torch.Tensor:
    """softmax(logits) @ values over the kept keys: a masked key's logit gets MASKED_LOGIT, so
    its weight is exactly 0. `key_keep` is (B x keys) of 1 and 0, or None for all keys."""
    if key_keep is not None:
        logits = logits + ((1.0 - key_keep) * MASKED_LOGIT)[:, None, None, :]
    return torch.softmax(logits, dim=-1) @ values


def append_padding_slot(point_coords: torch.Tensor, point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one padding point after the N input slots.

    SamPredictor embeds k points plus one padding point, so k = N points need N + 1 tokens;
    with this slot every k <= N has the padding token SamPredictor would add.
    """
    coords = torch.cat([point_coords, torch.zeros_like(point_coords[:, :1])], dim=1)
    labels = torch.cat([point_labels, torch.full_like(point_labels[:, :1], _PADDING)], dim=1)
    return coords, labels


def image_pe_axis_points(grid_size: int) -> torch.Tensor:
    """(1, 2 * grid_size, 2) points whose encodings are the image PE's per-column and per-row terms.

    segment-anything encodes grid cell (row i, column j) at ((j + 0.5) / g, (i + 0.5) / g) in
    [0, 1] coordinates; the encoder maps them to [-1, 1], so a coordinate of 0.5 contributes
    nothing. Column points are (x_j, 0.5), row points (0.5, y_i).
    """
    centres = (torch.arange(grid_size, dtype=torch.float32) + 0.5) / grid_size
    middle = torch.full_like(centres, 0.5)
    columns = torch.stack([centres, middle], dim=-1)
    rows = torch.stack([middle, centres], dim=-1)
    return torch.cat([columns, rows], dim=0).unsqueeze(0)


def image_pe_tokens_at_run_time(
    pe_layer: PositionEmbeddingRandom, axis_points: torch.Tensor, anchor_points: torch.Tensor
) -> torch.Tensor:
    """The image positional encoding (1, g * g, 256), in token layout, computed in the graph.

    Why: stored, it is a 1x4096x256 fp32 constant in every decoder file. Its argument is
    separable, 2 pi (u_j + v_i) for column j and row i, so sin and cos of the 2g axis terms and
    the angle-sum identities rebuild it from a 2x128 matrix. The axis points are encoded together
    with the prompt's points (`anchor_points`, whose rows are dropped): on a constant alone
    litert-torch and coremltools would fold the result back into the full table, and Core ML's
    fp16 packages keep the point encoding's sin/cos in fp32 (its op selector follows point_coords).
    """
    grid_size = axis_points.shape[1] // 2
    encoded = pe_layer._pe_encoding(torch.cat([axis_points, anchor_points[:1]], dim=1))[0, : 2 * grid_size]
    half = encoded.shape[-1] // 2
    sin_u, cos_u = encoded[None, :grid_size, :half], encoded[None, :grid_size, half:]
    sin_v, cos_v = encoded[grid_size:, None, :half], encoded[grid_size:, None, half:]
    sin_uv = sin_u * cos_v + cos_u * sin_v
    cos_uv = cos_u * cos_v - sin_u * sin_v
    return torch.cat([sin_uv, cos_uv], dim=-1).reshape(1, grid_size * grid_size, 2 * half)


ImagePe = Callable[[PositionEmbeddingRandom, torch.Tensor, torch.Tensor], torch.Tensor]
"""(pe_layer, axis_points, anchor_points) -> the image positional encoding in token layout: a
converter may build it from other ops (`image_pe_tokens_at_run_time` is the default)."""


def label_embeddings_as_masks(prompt_encoder: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The embedding each label adds (B x slots x 256): the not-a-point embedding for padding, a
    point or box-corner embedding for labels 0-3, each times a 0/1 mask of the slots with that label."""
    labels = labels.unsqueeze(-1)
    weights = prompt_encoder.not_a_point_embed.weight
    embedding = weights * (labels == _PADDING).to(weights.dtype)
    for index, point_embedding in enumerate(prompt_encoder.point_embeddings):
        embedding = embedding + point_embedding.weight * (labels == index).to(embedding.dtype)
    return embedding


LabelEmbeddings = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""(prompt_encoder, point_labels) -> what each label adds: a converter may pick the rows otherwise."""


def expand_rows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """`rows` (leading dimension 1) for each of `batch` prompts, as a broadcast view."""
    return rows.expand(batch, *rows.shape[1:])


BatchRows = Callable[[torch.Tensor, int], torch.Tensor]
"""(rows with leading dimension 1, B) -> B copies: a converter may make them otherwise."""


MaskProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(hypernetwork outputs B x masks x C, upscaled embedding B x C x pixels) -> the masks' logits:
a converter may split the product."""


WeightedValues = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""Attention's last step, (logits, values, key_keep) -> weighted values: a converter may swap
in other arithmetic (TFLite's full-integer decoder normalizes after the product)."""


def _attend(
    attention: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_keep: torch.Tensor | None,
    weighted_values: WeightedValues,
) -> torch.Tensor:
    """segment-anything's Attention.forward over the kept keys."""
    q = attention._separate_heads(attention.q_proj(q), attention.num_heads)
    k = attention._separate_heads(attention.k_proj(k), attention.num_heads)
    v = attention._separate_heads(attention.v_proj(v), attention.num_heads)
    logits = q @ k.permute(0, 1, 3, 2) / (q.shape[-1] ** 0.5)
    out = weighted_values(logits, v, key_keep)
    return attention.out_proj(attention._recombine_heads(out))


def _two_way_block(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    token_keep: torch.Tensor,
    weighted_values: WeightedValues,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TwoWayAttentionBlock.forward where prompt tokens are keys only where `token_keep` is 1."""
    if block.skip_first_layer_pe:
        queries = _attend(block.self_attn, queries, queries, queries, token_keep, weighted_values)
    else:
        q = queries + query_pe
        queries = queries + _attend(block.self_attn, q, q, queries, token_keep, weighted_values)
    queries = block.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = block.norm2(queries + _attend(block.cross_attn_token_to_image, q, k, keys, None, weighted_values))
    queries = block.norm3(queries + block.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = block.norm4(keys + _attend(block.cross_attn_image_to_token, k, q, queries, token_keep, weighted_values))
    return queries, keys


def _two_way_transformer(
    transformer: TwoWayTransformer,
    image_embedding: torch.Tensor,
    image_pe_tokens: torch.Tensor,
    tokens: torch.Tensor,
    token_keep: torch.Tensor,
    weighted_values: WeightedValues,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TwoWayTransformer.forward with masked prompt-token keys (image PE already in token layout)."""
    image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
    image_pe = image_pe_tokens
    queries, keys = tokens, image_embedding
    for block in transformer.layers:
        queries, keys = _two_way_block(block, queries, keys, tokens, image_pe, token_keep, weighted_values)
    q, k = queries + tokens, keys + image_pe
    final = _attend(transformer.final_attn_token_to_image, q, k, keys, None, weighted_values)
    queries = transformer.norm_final_attn(queries + final)
    return queries, keys


class PromptDecoderForExport(nn.Module):
    """Prompt encoder + mask decoder on fixed-shape inputs; all four masks, no selection."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder: MaskDecoder = sam.mask_decoder
        self.weighted_values: WeightedValues = softmax_times_kept_values
        self.image_pe: ImagePe = image_pe_tokens_at_run_time  # likewise, for the next two
        self.label_embeddings: LabelEmbeddings = label_embeddings_as_masks
        self.batch_rows: BatchRows = expand_rows
        self.mask_product: MaskProduct = torch.matmul
        grid_size = self.prompt_encoder.image_embedding_size[0]
        self.register_buffer("image_pe_axis_points", image_pe_axis_points(grid_size), persistent=False)

    def _embed_points(self, coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """PromptEncoder._embed_points with label lookups as arithmetic; box corners are labels 2, 3.
        `coords` are pixel centres in [0, 1]."""
        encoder = self.prompt_encoder
        embedding = encoder.pe_layer._pe_encoding(coords)
        embedding = embedding * (point_labels.unsqueeze(-1) != _PADDING).to(embedding.dtype)
        return embedding + self.label_embeddings(encoder, point_labels).to(embedding.dtype)

    def _embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.prompt_encoder
        use_mask = has_mask_input.view(-1, 1, 1, 1)
        no_mask = encoder.no_mask_embed.weight.view(1, -1, 1, 1)
        if self.batch_rows is not expand_rows:  # a broadcast both ways where B > 1: the converter's own rows
            no_mask = self.batch_rows(no_mask, use_mask.shape[0])
        return use_mask * encoder.mask_downscaling(mask_input) + (1.0 - use_mask) * no_mask

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.mask_decoder
        point_coords, point_labels = append_padding_slot(point_coords, point_labels)
        coords = (point_coords + 0.5) / IMAGE_SIZE  # segment-anything's pixel centres, in [0, 1]
        sparse = self._embed_points(coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([self.batch_rows(output_tokens.unsqueeze(0), sparse.shape[0]), sparse], dim=1)
        token_keep = torch.cat(
            [torch.ones_like(point_labels[:, :1]).expand(-1, output_tokens.shape[0]), padding_key_keep(point_labels)],
            dim=1,
        )
        src = image_embeddings + dense
        image_pe = self.image_pe(self.prompt_encoder.pe_layer, self.image_pe_axis_points, coords)
        hidden, src = _two_way_transformer(decoder.transformer, src, image_pe, tokens, token_keep, self.weighted_values)
        iou_token_out = hidden[:, 0, :]
        mask_tokens_out = hidden[:, 1 : 1 + decoder.num_mask_tokens, :]
        _, c, h, w = image_embeddings.shape
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(src.shape[0], c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        low_res_masks = self.mask_product(hyper_in, upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_predictions = decoder.iou_prediction_head(iou_token_out)
        return low_res_masks, iou_predictions


def exported_program(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """torch.export (strict), then `run_decompositions({})` to the ATen dialect: the program Core ML
    converts, so its node names are the names of Core ML's ops.

    Why the decompositions: coremltools 9.0 refuses torch 2.13's exported programs as they come
    ("NotImplementedError: Conversion for models with only ATEN or EDGE dialect is supported/tested.
    Provided Dialect: TRAINING. Run '.run_decompositions({})' on your exported PyTorch Model prior to
    conversion.").
    """
    return torch.export.export(module, example_inputs, strict=True).run_decompositions({})
