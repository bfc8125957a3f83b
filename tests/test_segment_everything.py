"""Segment everything in PyTorch on the full MobileSAM architecture: the batched decoder answers
each row as the one-prompt decoder does, and segment-anything's generator over our runners gives
SamAutomaticMaskGenerator's masks. The converted files are checked per target in test_targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.contract import decoder_contract
from pipeline.predictor import BatchedDecoder, ReferencePredictor, TorchPart, stack_prompts
from pipeline.processing import Prompt
from pipeline.segment_everything import (
    AutomaticMaskGenerator,
    RunnerPredictor,
    match_masks,
    reference_generator,
)

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


@pytest.fixture(scope="module")
def reference(our_model, photos) -> ReferencePredictor:
    predictor = ReferencePredictor(our_model)
    predictor.set_image(photos.image(photos.image_ids()[10]))
    return predictor


def _rows(reference: ReferencePredictor) -> list[dict[str, np.ndarray]]:
    height, width = reference.prepared.original_size
    point = Prompt(points=np.array([[width * 0.4, height * 0.6]], np.float32), labels=np.array([1.0], np.float32))
    box = Prompt(box=np.array([width * 0.1, height * 0.2, width * 0.7, height * 0.9], np.float32))
    first = reference.predict(point, multimask_output=True)
    refine = Prompt(points=point.points, labels=point.labels, mask_input=first.best_low_res_mask)
    both = Prompt(points=point.points, labels=point.labels, box=box.box)
    return [reference.decoder_inputs(p) for p in (point, box, refine, both)]


def test_each_batched_row_is_the_one_prompt_answer(reference):
    """Rows of mixed kinds (point, box, refinement with mask_input, box + point) in one call."""
    rows = _rows(reference)
    batched = TorchPart(reference.decoder_module, decoder_contract(5, BATCH)).run(stack_prompts(rows, BATCH))
    assert batched["low_res_masks"].shape == (BATCH, 4, 256, 256)
    for index, row in enumerate(rows):
        alone = reference.decoder.run(row)
        np.testing.assert_allclose(batched["low_res_masks"][index : index + 1], alone["low_res_masks"], atol=2e-4)
        np.testing.assert_allclose(batched["iou_predictions"][index : index + 1], alone["iou_predictions"], atol=1e-5)


def test_batched_decoder_prefetches_and_runs_the_rest_alone(reference):
    rows = _rows(reference)
    decoder = BatchedDecoder(TorchPart(reference.decoder_module, decoder_contract(5, 3)), 3)
    answers = decoder.run_many(rows)  # 4 prompts: a full call and a padded one
    assert len(answers) == 4 and answers[3]["low_res_masks"].shape == (1, 4, 256, 256)
    decoder.prefetch(rows[:2])
    for row, answer in zip(rows, answers, strict=True):  # prefetched ones from memory, the others alone
        np.testing.assert_allclose(decoder.run(row)["low_res_masks"], answer["low_res_masks"], atol=2e-4)
    with pytest.raises(ValueError, match=r"1\.\.3 prompts"):
        stack_prompts(rows, 3)
    other_photo = {**rows[1], "image_embeddings": rows[1]["image_embeddings"] + 1.0}
    with pytest.raises(ValueError, match="same image embeddings"):  # the file would answer the first photo's
        decoder.run_many([rows[0], other_photo])


@pytest.mark.parametrize(
    "options",
    [{"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}, {"pred_iou_thresh": 0.0}, {}],
    ids=["nothing-filtered", "nms-only", "defaults"],
)
def test_generator_over_runners_gives_sam_automatic_mask_generator_masks(reference, our_model, photos, options):
    image = photos.image(photos.image_ids()[12])
    decoder = BatchedDecoder(TorchPart(reference.decoder_module, decoder_contract(5, BATCH)), BATCH)
    generator = AutomaticMaskGenerator(RunnerPredictor(reference.encoder, decoder, 5), points_per_side=4, **options)
    ours = generator.generate(image)
    theirs = reference_generator(our_model, points_per_side=4, **options).generate(image)
    match = match_masks(theirs, ours)
    assert match.reproduced, match.to_json()
    assert generator.predictor.times.decoder_calls == 2 and generator.predictor.times.prompts == 16
    for ours_record, their_record in zip(ours, theirs, strict=True):  # segment-anything's records, same order
        assert ours_record.keys() == their_record.keys()
        assert ours_record["point_coords"] == their_record["point_coords"]
        assert abs(ours_record["predicted_iou"] - their_record["predicted_iou"]) < 1e-4


def test_mask_matching_counts_what_is_missing():
    def record(mask: np.ndarray) -> dict:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        return {"segmentation": rle, "area": int(mask.sum())}

    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[:4], b[:, :4] = True, True
    assert match_masks([record(a), record(b)], [record(b), record(a)]).reproduced
    partial = match_masks([record(a), record(b)], [record(a)])
    assert (partial.matched, partial.reproduced) == (1, False)
    assert match_masks([], []).reproduced and not match_masks([record(a)], []).reproduced


def test_cli_bad_input_is_one_line(tmp_path, coreml_fp32):
    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "validation.segment_everything", *arguments, "--result", str(tmp_path / "r")]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)

    photo = next((REPO / "pipeline" / "sample_photos" / "validation" / "images").iterdir())
    missing = run("--out", str(tmp_path), "--target", "tflite", "--image", str(photo))
    assert missing.returncode == 2 and "no tflite files under" in missing.stderr.strip().splitlines()[-1]
    no_int8 = run("--out", str(coreml_fp32), "--target", "coreml", "--precision", "int8", "--image", str(photo))
    assert no_int8.returncode == 2 and "has no prompt_decoder_batched file in int8" in no_int8.stderr
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("not a photo")
    bad = run("--out", str(coreml_fp32), "--target", "coreml", "--image", str(not_a_photo))
    assert bad.returncode == 2 and "notes.jpg" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()


def test_cli_writes_masks_overlay_and_comparison(tmp_path, coreml_fp32):
    """The Core ML fp32 files (B = 16), segment everything on a photo."""
    photo = next((REPO / "pipeline" / "sample_photos" / "validation" / "images").iterdir())
    command = [sys.executable, "-m", "validation.segment_everything", "--out", str(coreml_fp32), "--target"]
    command += ["coreml", "--image", str(photo), "--result", str(tmp_path), "--points-per-side", "4"]
    command += ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--compare-pytorch"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    masks = json.loads((tmp_path / "masks.json").read_text())
    assert masks and set(masks[0]) == {
        "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"
    }  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pytorch"]["reproduced"] and summary["decoder_calls"] == 1  # 16 points in one B = 16 call
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
