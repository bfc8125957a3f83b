"""The validate stage on real photos: prompts from ground truth, metrics, and a broken artifact
reported in one line while the others are still validated."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_targets.convert import convert_target
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from validation.gates import DEFAULT_GATES, gate_failures, gates_from_config
from validation.html_report import write_html
from validation.prompts import PROMPT_KINDS, most_interior_pixel, prompt_cases
from validation.run import (
    ValidationSettings,
    confident_iou,
    confident_pixels,
    failed_artifacts,
    summary_rows,
    validate_run,
)


def test_prompt_cases_are_inside_the_instance_and_repeatable():
    mask = np.zeros((40, 60), bool)
    mask[10:31, 20:41] = True  # a 21x21 square: its one most interior pixel is the centre
    cases = prompt_cases(1, 7, mask, (20, 10, 21, 21), seed=0)
    assert [c.kind for c in cases] == list(PROMPT_KINDS)
    assert most_interior_pixel(mask) == (30, 20)
    for case in cases:
        for (x, y), label in zip(case.points or [], case.labels or [], strict=True):
            assert mask[int(y), int(x)] == (label == 1.0)
    assert cases == prompt_cases(1, 7, mask, (20, 10, 21, 21), seed=0)


@pytest.fixture(scope="module")
def validated(tmp_path_factory, official_checkpoint, photos):
    out = tmp_path_factory.mktemp("validate")
    convert_target("tflite", RunConfig(checkpoint=official_checkpoint, precisions=("fp32", "int8"), out_dir=out))
    (out / "tflite" / "prompt_decoder_int8.tflite").write_bytes(b"broken")
    settings = ValidationSettings(max_images=2, instances_per_image=2, latency_runs=3, warmup_runs=1)
    masks: dict = {}
    report = validate_run(out, photos, settings, None, masks)
    write_html(report, photos, masks, out / "report.html")
    return report, masks, out


def test_report_scores_every_artifact_and_isolates_the_broken_one(validated):
    validated, masks, out = validated
    (run,) = validated["runs"]
    assert not run["random_weights"]
    by_name = {(a["part"], a["precision"]): a for a in run["artifacts"]}
    assert "changed since conversion" in by_name[("prompt_decoder", "int8")]["error"]
    encoder = by_name[("image_encoder", "fp32")]["agreement"]["embeddings"]
    assert encoder["psnr_db_min"] > 60 and encoder["cosine_min"] > 0.9999
    decoder = by_name[("prompt_decoder", "fp32")]["agreement"]
    assert set(decoder) == set(PROMPT_KINDS)
    for kind in PROMPT_KINDS:
        assert decoder[kind]["mask_iou"]["min"] > 0.99
        assert decoder[kind]["same_index_rate"] == 1.0
        assert decoder[kind]["logits_cosine_min"] > 0.9999 and decoder[kind]["iou_predictions_psnr_db_min"] > 60
        truth = decoder[kind]["ground_truth_iou"]
        assert 0.0 <= truth["pytorch"]["mean"] <= 1.0
        assert truth["pytorch"]["mean"] == pytest.approx(truth["artifact"]["mean"], abs=1e-3)
    assert by_name[("image_encoder", "int8")]["latency"]["median_s"] > 0
    assert by_name[("image_encoder", "fp32")]["memory"]["peak_rss_mb"] > 0
    baselines = run["baselines"]
    assert baselines["onnxruntime"]["image_encoder"]["median_s"] > 0
    assert baselines["onnxruntime"]["prompt_decoder"]["median_s"] > 0
    assert 50 < baselines["compute_floor"]["encoder_gflops"] < 100
    assert len(run["prompt_cases"]) == 2 * 2 * len(PROMPT_KINDS)
    rows = summary_rows(validated)
    assert any("ERROR" in row[-1] for row in rows) and len(rows) == 4
    assert by_name[("prompt_decoder", "fp32")]["gate"] == {"passed": True, "failures": []}
    (failed,) = failed_artifacts(validated)
    assert failed.startswith("tflite prompt_decoder int8: ") and "changed since conversion" in failed
    assert set(masks) == {"tflite pytorch", "tflite prompt_decoder fp32", "tflite prompt_decoder int8"}
    assert all(np.array_equal(masks["tflite pytorch"][i], m) for i, m in masks["tflite prompt_decoder fp32"].items())
    assert masks["tflite prompt_decoder int8"] == {}  # the broken file gave no masks
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "random init, seed" not in page


def test_gates_fail_below_threshold_and_read_overrides():
    artifact = {
        "part": "image_encoder",
        "agreement": {"embeddings": {"psnr_db_min": 30.0}},
    }
    assert gate_failures(artifact, DEFAULT_GATES["int8"]) == []
    assert gate_failures(artifact, DEFAULT_GATES["fp16"]) == ["embeddings PSNR 30.0 dB < 40.0"]
    gates = gates_from_config({"int8": {"embeddings_psnr_db": 31.0}})
    assert (
        gates["int8"].embeddings_psnr_db == 31.0 and gates["int8"].mask_iou_mean == DEFAULT_GATES["int8"].mask_iou_mean
    )
    with pytest.raises(ConfigError, match="unknown keys"):
        gates_from_config({"int8": {"psnr": 1.0}})


def test_confident_iou_ignores_near_zero_logits_and_is_undefined_when_empty():
    teacher = np.array([[-0.3, 0.05, 0.4], [0.02, -0.01, 0.3]])
    confident = confident_pixels(teacher)
    assert confident.tolist() == [[True, False, True], [False, False, True]]
    flipped_near_zero = teacher > 0
    flipped_near_zero[0, 1] = False  # a sign flip at 0.05 does not count
    assert confident_iou(teacher > 0, flipped_near_zero, confident) == 1.0
    assert confident_iou(teacher > 0, np.zeros_like(confident), confident) == 0.0
    assert confident_iou(teacher > 0, teacher > 0, np.zeros_like(confident)) is None


def test_nan_is_a_failure_never_a_value_to_skip():
    from validation.run import _summary, nan_min

    assert _summary([0.99, None, 1.0])["defined"] == 2
    assert _summary([None, None]) is None
    summary = _summary([0.99, float("nan"), 1.0])
    assert np.isnan(summary["mean"]) and np.isnan(summary["min"])
    assert np.isnan(nan_min([70.0, float("nan")])) and nan_min([70.0, 80.0]) == 70.0
    decoder = {
        "part": "prompt_decoder",
        "non_finite_outputs": {"low_res_masks": 0, "iou_predictions": 0},
        "agreement": {"box": {"mask_iou": summary, "mask_iou_confident": None}},
    }
    assert gate_failures(decoder, DEFAULT_GATES["fp32"]) == [
        "box: mask IoU mean nan < 0.99",
        "box: mask IoU min nan < 0.98",
    ]
    encoder = {"part": "image_encoder", "non_finite_outputs": {"image_embeddings": 7}}
    encoder["agreement"] = {"embeddings": {"psnr_db_min": float("nan")}}
    assert gate_failures(encoder, DEFAULT_GATES["int8"]) == [
        "output image_embeddings had 7 non-finite values (NaN or Inf)",
        "embeddings PSNR nan dB < 25.0",
    ]
