"""Our MobileSAM equals upstream's on real photos (fp32, within 1e-5), preprocessing included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from pipeline.predictor import ReferencePredictor
from pipeline.processing import Prompt, prepare_image

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def encoded_photos(photos, our_model, upstream_mobile_sam):
    """Two real photos (one grayscale) encoded by our reference and by upstream's predictor."""
    from mobile_sam import SamPredictor as UpstreamPredictor

    ids = photos.image_ids()
    grayscale = next(i for i in ids if Image.open(photos.image_path(i)).mode == "L")
    results = []
    for image_id in (ids[0], grayscale):
        image = photos.image(image_id)
        ours = ReferencePredictor(our_model)
        ours.set_image(image)
        upstream = UpstreamPredictor(upstream_mobile_sam[0])
        upstream.set_image(image)
        results.append((image_id, image, ours, upstream))
    return results


def test_preprocessing_equals_sam_predictor(photos, our_model):
    image = photos.image(photos.image_ids()[1])
    predictor = SamPredictor(our_model)
    transformed = predictor.transform.apply_image(image)
    expected = our_model.preprocess(torch.as_tensor(transformed).permute(2, 0, 1)[None].float())
    prepared = prepare_image(image)
    mean = our_model.pixel_mean.numpy()[None]
    std = our_model.pixel_std.numpy()[None]
    normalized = (prepared.image - mean) / std
    np.testing.assert_array_equal(normalized, expected.numpy())
    assert prepared.input_size == tuple(transformed.shape[:2])


def test_embeddings_equal_upstream(encoded_photos):
    for _, _, ours, upstream in encoded_photos:
        difference = np.abs(ours.embeddings - upstream.features.numpy()).max()
        print(f"embedding max abs difference {difference:.2e}")
        assert difference < TOLERANCE


@pytest.mark.parametrize("multimask", [True, False])
def test_masks_and_iou_equal_upstream(encoded_photos, photos, multimask):
    for image_id, _, ours, upstream in encoded_photos:
        instance = photos.instances(image_id)[0]
        x, y, w, h = instance.bbox
        ys, xs = np.nonzero(instance.mask)
        point = np.array([[xs[len(xs) // 2], ys[len(ys) // 2]]], dtype=np.float32)
        for prompt in (
            Prompt(points=point, labels=np.array([1.0])),
            Prompt(box=np.array([x, y, x + w, y + h])),
            Prompt(points=point, labels=np.array([1.0]), box=np.array([x, y, x + w, y + h])),
        ):
            prediction = ours.predict(prompt, multimask_output=multimask)
            masks, scores, low_res = upstream.predict(
                prompt.points, prompt.labels, prompt.box, multimask_output=multimask, return_logits=True
            )
            chosen = slice(1, 4) if multimask else slice(0, 1)
            mask_difference = np.abs(prediction.low_res_masks[0, chosen] - low_res).max()
            iou_difference = np.abs(prediction.iou_predictions[0, chosen] - scores).max()
            print(f"low-res mask {mask_difference:.2e}, iou {iou_difference:.2e}")
            assert mask_difference < TOLERANCE and iou_difference < TOLERANCE
            np.testing.assert_allclose(prediction.mask_logits[chosen], masks, atol=TOLERANCE)
            expected_index = int(np.argmax(scores)) + 1 if multimask else 0
            assert prediction.selected == expected_index
