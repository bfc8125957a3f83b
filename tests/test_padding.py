"""Padding prompts to N slots gives SamPredictor's answer for every k <= N, with and without a box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from pipeline.export_wrappers import padding_key_keep
from pipeline.predictor import ReferencePredictor
from pipeline.processing import Prompt


@pytest.fixture(scope="module")
def photo_predictors(photos, our_model):
    image = photos.image(photos.image_ids()[2])
    sam_predictor = SamPredictor(our_model)
    sam_predictor.set_image(image)
    reference = ReferencePredictor(our_model)
    reference.set_image(image)
    return image, sam_predictor, reference


def test_padding_keeps_one_pad_without_box():
    labels = torch.tensor([[1.0, -1, 0, -1, -1], [1.0, 2, 3, -1, -1]])
    keep = padding_key_keep(labels)
    assert keep[0].tolist() == [1, 1, 1, 0, 0]
    assert keep[1].tolist() == [1, 1, 1, 0, 0]


def _random_prompt(rng, height, width, num_points, with_box):
    points = rng.uniform([0, 0], [width, height], size=(num_points, 2)).astype(np.float32)
    labels = rng.integers(0, 2, num_points).astype(np.float32)
    box = np.array([width * 0.2, height * 0.25, width * 0.7, height * 0.8], dtype=np.float32) if with_box else None
    return Prompt(points=points if num_points else None, labels=labels if num_points else None, box=box)


@pytest.mark.parametrize("num_slots", [5, 8])
@pytest.mark.parametrize("with_box", [False, True])
def test_every_k_matches_sam_predictor(photo_predictors, num_slots, with_box):
    image, sam_predictor, reference = photo_predictors
    reference.num_points = num_slots
    rng = np.random.default_rng(num_slots + with_box)
    max_points = num_slots - 2 if with_box else num_slots
    for k in range(0 if with_box else 1, max_points + 1):
        prompt = _random_prompt(rng, *image.shape[:2], k, with_box)
        ours = reference.predict(prompt, multimask_output=True)
        _, scores, low_res = sam_predictor.predict(
            prompt.points, prompt.labels, prompt.box, multimask_output=True, return_logits=True
        )
        difference = np.abs(ours.low_res_masks[0, 1:] - low_res).max()
        assert difference < 1e-5, f"k={k} box={with_box} N={num_slots}: max logit difference {difference}"
        np.testing.assert_allclose(ours.iou_predictions[0, 1:], scores, atol=1e-5)


def test_extra_padding_tokens_are_not_neutral(photo_predictors):
    """The control: feeding SamPredictor the padded slots as real -1 points changes the answer,
    so the test above would fail if the surplus tokens were not masked."""
    image, sam_predictor, reference = photo_predictors
    reference.num_points = 5
    prompt = _random_prompt(np.random.default_rng(3), *image.shape[:2], 2, False)
    padded_points = np.concatenate([prompt.points, np.zeros((3, 2), np.float32)])
    padded_labels = np.concatenate([prompt.labels, -np.ones(3, np.float32)])
    _, _, unmasked = sam_predictor.predict(padded_points, padded_labels, multimask_output=True, return_logits=True)
    ours = reference.predict(prompt, multimask_output=True)
    assert np.abs(ours.low_res_masks[0, 1:] - unmasked).max() > 1e-3


@pytest.mark.parametrize("with_box", [False, True])
def test_refinement_with_the_previous_mask_matches_sam_predictor(photo_predictors, with_box):
    """A second pass with the first pass's best low-res logits as mask_input (has_mask_input = 1),
    exactly as SamPredictor.predict(mask_input=...), for point and box+point prompts."""
    image, sam_predictor, reference = photo_predictors
    reference.num_points = 5
    prompt = _random_prompt(np.random.default_rng(11 + with_box), *image.shape[:2], 2, with_box)
    _, scores, first = sam_predictor.predict(prompt.points, prompt.labels, prompt.box, multimask_output=True)
    previous = first[int(np.argmax(scores))]
    _, refined_scores, refined = sam_predictor.predict(
        prompt.points, prompt.labels, prompt.box, mask_input=previous[None], multimask_output=False, return_logits=True
    )
    ours = reference.predict(
        Prompt(points=prompt.points, labels=prompt.labels, box=prompt.box, mask_input=previous),
        multimask_output=False,
    )
    difference = np.abs(ours.low_res_masks[0, :1] - refined).max()
    assert difference < 1e-5, f"refinement: max logit difference {difference}"
    np.testing.assert_allclose(ours.iou_predictions[0, :1], refined_scores, atol=1e-5)
    without = reference.predict(Prompt(points=prompt.points, labels=prompt.labels, box=prompt.box), False)
    assert np.abs(without.low_res_masks[0, :1] - refined).max() > 1e-3, "the mask input must change the answer"


@pytest.mark.parametrize("with_box", [False, True])
def test_full_integer_attention_arithmetic_matches_the_float_decoder(photo_predictors, with_box):
    """TFLite's w8a8 decoder masks keys by a product and normalizes after the values
    (`exp_weighted_kept_values`): in fp32 it gives the float decoder's answer, padding included."""
    from mobile_targets.tflite.converter import attention_exp_as_sigmoids
    from pipeline.contract import decoder_contract

    image, _, reference = photo_predictors
    reference.num_points = 5
    prompt = _random_prompt(np.random.default_rng(21 + with_box), *image.shape[:2], 2, with_box)
    named = reference.decoder_inputs(prompt)
    inputs = [torch.from_numpy(named[name]) for name in decoder_contract(5).input_names]
    patched = attention_exp_as_sigmoids(reference.decoder_module)
    with torch.no_grad():
        expected, actual = reference.decoder_module(*inputs), patched(*inputs)
    for want, got in zip(expected, actual, strict=True):
        assert (want - got).abs().max() < 1e-4
    assert patched.weighted_values is not reference.decoder_module.weighted_values
