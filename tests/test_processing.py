"""Prompt validation, image preparation and the contract's fixed shapes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract import PIXEL_MEAN, PointLabel, decoder_contract
from pipeline.errors import PromptError
from pipeline.processing import Prompt, prepare_image, prompt_to_decoder_inputs, select_mask_index


def test_prepare_image_pads_with_mean_bottom_right():
    image = np.full((300, 600, 3), 7, dtype=np.uint8)
    prepared = prepare_image(image)
    assert prepared.image.shape == (1, 3, 1024, 1024)
    assert prepared.input_size == (512, 1024) and prepared.original_size == (300, 600)
    assert np.all(prepared.image[0, :, :512, :] == 7)
    np.testing.assert_array_equal(prepared.image[0, :, 512:, :].reshape(3, -1).max(1), np.float32(PIXEL_MEAN))


def test_prompt_layout_points_then_box_then_padding():
    prompt = Prompt(points=np.array([[10, 20]]), labels=np.array([1]), box=np.array([0, 0, 100, 50]))
    inputs = prompt_to_decoder_inputs(prompt, original_size=(512, 1024), num_points=5)
    assert inputs["point_labels"].tolist() == [[1, 2, 3, -1, -1]]
    np.testing.assert_allclose(inputs["point_coords"][0, :3], [[10, 20], [0, 0], [100, 50]])
    for spec in decoder_contract(5).inputs[1:]:
        assert inputs[spec.name].shape == spec.shape and str(inputs[spec.name].dtype) == spec.dtype


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (Prompt(points=np.zeros((6, 2)), labels=np.ones(6)), "exceed the decoder's N = 5"),
        (Prompt(points=np.zeros((4, 2)), labels=np.ones(4), box=np.array([0, 0, 1, 1])), "exceed"),
        (Prompt(points=np.array([[700.0, 10]]), labels=np.ones(1)), "outside the 640x480 image"),
        (Prompt(points=np.array([[-1.0, 10]]), labels=np.ones(1)), "outside"),
        (Prompt(points=np.array([[1.0, 10]]), labels=np.array([2])), "unknown point labels"),
        (Prompt(points=np.array([[1.0, 10]]), labels=np.array([1, 0])), "one label per point"),
        (Prompt(box=np.array([50, 50, 10, 10])), "x0 <= x1"),
        (Prompt(), "no prompt"),
    ],
)
def test_bad_prompts_fail_with_one_line(prompt, message):
    with pytest.raises(PromptError, match=message) as info:
        prompt_to_decoder_inputs(prompt, original_size=(480, 640), num_points=5)
    assert "\n" not in str(info.value)


def test_bad_image():
    with pytest.raises(PromptError, match="HxWx3 uint8"):
        prepare_image(np.zeros((10, 10), dtype=np.uint8))


def test_mask_selection_rule():
    scores = np.array([[0.9, 0.1, 0.7, 0.3]])
    assert select_mask_index(scores, multimask_output=False) == 0
    assert select_mask_index(scores, multimask_output=True) == 2


def test_labels_documented_in_contract():
    labels = decoder_contract(5).spec("point_labels").description
    for label in PointLabel:
        assert f"{int(label)} {label.name.lower()}" in labels


def test_mask_input_sets_the_refinement_flag_and_is_checked():
    previous = np.full((256, 256), 0.5, np.float32)
    inputs = prompt_to_decoder_inputs(
        Prompt(points=np.array([[1.0, 1.0]]), labels=np.array([1.0]), mask_input=previous), (10, 10)
    )
    assert inputs["has_mask_input"].tolist() == [1.0] and np.array_equal(inputs["mask_input"][0, 0], previous)
    plain = prompt_to_decoder_inputs(Prompt(points=np.array([[1.0, 1.0]]), labels=np.array([1.0])), (10, 10))
    assert plain["has_mask_input"].tolist() == [0.0] and not plain["mask_input"].any()
    with pytest.raises(PromptError, match="mask_input must be one 256x256"):
        prompt_to_decoder_inputs(
            Prompt(points=np.array([[1.0, 1.0]]), labels=np.array([1.0]), mask_input=np.zeros((64, 64))), (10, 10)
        )
    with pytest.raises(PromptError, match="non-finite"):
        prompt_to_decoder_inputs(
            Prompt(points=np.array([[1.0, 1.0]]), labels=np.array([1.0]), mask_input=previous * np.nan), (10, 10)
        )
