"""Both parts of the full MobileSAM pass torch.export(strict=True) and coremltools' converter."""

from __future__ import annotations

import coremltools as ct
import pytest
import torch

from pipeline.contract import decoder_contract, encoder_contract
from pipeline.export_wrappers import ImageEncoderForExport, PromptDecoderForExport


def _decoder_example(num_points: int = 5) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.full((1, num_points), -1.0)
    labels[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    return (
        torch.randn(1, 256, 64, 64, generator=generator),
        torch.rand(1, num_points, 2, generator=generator) * 1024,
        labels,
        torch.randn(1, 1, 256, 256, generator=generator),
        torch.ones(1),
    )


@pytest.fixture(scope="module")
def exported(our_model):
    encoder = ImageEncoderForExport(our_model).eval()
    decoder = PromptDecoderForExport(our_model).eval()
    image = (torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)) * 255,)
    with torch.no_grad():
        return {
            "encoder": (encoder, image, torch.export.export(encoder, image, strict=True)),
            "decoder": (decoder, _decoder_example(), torch.export.export(decoder, _decoder_example(), strict=True)),
        }


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_exported_program_equals_eager(exported, part):
    module, args, program = exported[part]
    with torch.no_grad():
        eager = module(*args)
        traced = program.module()(*args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    traced = traced if isinstance(traced, tuple) else (traced,)
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_shapes_follow_contract(exported):
    encoder, image, _ = exported["encoder"]
    decoder, args, _ = exported["decoder"]
    with torch.no_grad():
        embeddings = encoder(*image)
        masks, iou = decoder(*args)
    assert tuple(embeddings.shape) == encoder_contract().outputs[0].shape
    contract = decoder_contract(5)
    assert tuple(masks.shape) == contract.spec("low_res_masks").shape
    assert tuple(iou.shape) == contract.spec("iou_predictions").shape


def test_has_mask_input_switches_mask_prompt(exported):
    decoder, args, _ = exported["decoder"]
    with torch.no_grad():
        with_mask = decoder(*args)[0]
        without = decoder(*args[:4], torch.zeros(1))[0]
        zero_mask_off = decoder(*args[:3], torch.zeros_like(args[3]), torch.zeros(1))[0]
    assert not torch.allclose(with_mask, without)
    torch.testing.assert_close(without, zero_mask_off)


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_coremltools_converts(exported, part):
    _, _, program = exported[part]
    model = ct.convert(
        program.run_decompositions({}),
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
    )
    ops = {op.type for op in model.get_spec().mlProgram.functions["main"].block_specializations["CoreML7"].operations}
    assert "conv" in ops and "softmax" in ops


def test_bias_tables_gathered_at_run_time_are_timms(our_model):
    """The compact, per-axis gather (anchored on any run-time values) gives timm's biases bit for bit."""
    from timm.models.tiny_vit import Attention

    from pipeline.model import _gather_biases_at_run_time

    attentions = [m for m in our_model.image_encoder.modules() if isinstance(m, Attention)]
    assert len(attentions) == 10
    for attention in attentions:
        activations = torch.randn(2, attention.attention_bias_idxs.shape[0], attention.qkv.in_features)
        expected = attention.attention_biases[:, attention.attention_bias_idxs]
        assert torch.equal(_gather_biases_at_run_time(attention, activations[0]), expected)


def test_blocks_with_channels_last_local_conv_are_timms(our_model):
    """Every TinyViT block's patched forward gives timm's block's answer bit for bit: on the
    inputs it sees in the encoder (all padded to whole windows) and on unpadded ones, one window
    and several."""
    from timm.models.tiny_vit import TinyVitBlock

    encoder = our_model.image_encoder
    blocks = [m for m in encoder.modules() if isinstance(m, TinyVitBlock)]
    assert len(blocks) == 10
    seen: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0])) for b in blocks]
    with torch.no_grad():
        encoder(torch.randn(1, 3, 1024, 1024))
        for hook in hooks:
            hook.remove()
        for block in blocks:
            size, channels = block.window_size, seen[id(block)].shape[-1]
            for x in (seen[id(block)], torch.randn(1, size, size, channels), torch.randn(2, 2 * size, size, channels)):
                assert torch.equal(block(x), TinyVitBlock.forward(block, x))


def test_image_positional_encoding_built_in_the_graph_is_segment_anythings(our_model):
    from pipeline.export_wrappers import image_pe_axis_points, image_pe_tokens_at_run_time

    expected = our_model.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
    points = torch.rand(3, 6, 2)
    actual = image_pe_tokens_at_run_time(our_model.prompt_encoder.pe_layer, image_pe_axis_points(64), points)
    assert actual.shape == expected.shape == (1, 4096, 256)
    assert (actual - expected).abs().max() < 1e-5


def test_executorch_graph_patches_compute_the_models_answer(exported):
    """The ExecuTorch target's patched copy (norms as XNNPACK ops, the large convolutions as
    linear layers, BatchNorm fused) gives the encoder's embeddings, and the original module is
    left as it was."""
    from mobile_targets.executorch_target import ConvolutionAsLinear, graph_for_xnnpack

    encoder, image, _ = exported["encoder"]
    before = {name: type(module) for name, module in encoder.named_modules()}
    patched = graph_for_xnnpack(encoder)
    assert {name: type(module) for name, module in encoder.named_modules()} == before
    as_linear = sorted(name for name, module in patched.named_modules() if isinstance(module, ConvolutionAsLinear))
    expected = ["neck.0", "neck.2", "stages.3.downsample.conv1", "stages.3.downsample.conv3"]
    assert as_linear == [f"image_encoder.{name}" for name in expected]
    with torch.no_grad():
        reference, ours = encoder(*image), patched(*image)
    assert (ours - reference).abs().max() < 1e-4 * reference.abs().max()
