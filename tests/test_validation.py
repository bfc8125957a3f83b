"""The validate stage on real photos: prompts from ground truth, metrics, and a broken artifact
reported in one line while the others are still validated."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.metrics import mask_iou
from tests.artifact_surgery import keep_only_precisions
from validation.gates import DEFAULT_GATES, gate_failures, gates_from_config, looser_gate
from validation.html_report import write_html
from validation.prompts import PROMPT_KINDS, most_interior_pixel, prompt_cases
from validation.run import TeacherSpec, ValidationSettings, validate_run
from validation.schema import ArtifactResult, EncoderScores, GateResult, KindScores, Summary, nan_min
from validation.scoring import confident_iou, confident_pixels
from validation.text_report import best_pairs_by_budget, summary_markdown, summary_rows


def test_prompt_cases_are_inside_the_instance_and_repeatable():
    mask = np.zeros((40, 60), bool)
    mask[10:31, 20:41] = True  # a 21x21 square: its one most interior pixel is the centre
    cases = prompt_cases(1, 7, mask, (20, 10, 21, 21), seed=0)
    assert [c.kind for c in cases] == [k for k in PROMPT_KINDS if k != "refine"]
    assert cases[0].refinement().refines == "center_point" and cases[2].refinement() is None
    assert most_interior_pixel(mask) == (30, 20)
    for case in cases:
        for (x, y), label in zip(case.points or [], case.labels or [], strict=True):
            assert mask[int(y), int(x)] == (label == 1.0)
    assert cases == prompt_cases(1, 7, mask, (20, 10, 21, 21), seed=0)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A SAM ViT-B teacher in segment-anything's official layout, seeded random weights."""
    from pipeline.checkpoints import load_model, official_state_dict

    sam, _ = load_model("vit_b", None, 3)
    path = tmp_path_factory.mktemp("teacher") / "sam_vit_b.pth"
    torch.save(official_state_dict(sam, "vit_b"), path)
    return path


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tflite_converted, photos, teacher_checkpoint):
    """Validate on a copy of the session's TFLite files (the checkpoint's weights, B = 4) as if
    converted with --precisions fp32 int8, one of them broken after conversion; also torch's
    thread count right after the run."""
    out = tmp_path_factory.mktemp("validate")
    shutil.copytree(tflite_converted.parent, out / "tflite")
    keep_only_precisions(out / "tflite" / "manifest.json", ("fp32", "int8"))
    (out / "tflite" / "prompt_decoder_int8.tflite").write_bytes(b"broken")
    settings = ValidationSettings(
        max_images=2, instances_per_image=2, latency_runs=3, warmup_runs=1, everything_points_per_side=4
    )
    masks: dict = {}
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # not the run's 2: validate must hand the caller's count back
    try:
        report = validate_run(out, photos, settings, None, masks, teacher=TeacherSpec(teacher_checkpoint, "vit_b"))
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(callers_threads)
    write_html(report, photos, masks, out / "report.html")
    return report, masks, out, threads_after


def test_validate_hands_torch_threads_back(validated):
    """torch's thread count is process-wide: left at validate's, later PyTorch results in the same
    process (a self-test vector's expected values) change in the last bits."""
    report, _, _, threads_after = validated
    assert report.settings["threads"] == 2 and threads_after == 1


def test_report_scores_every_artifact_and_isolates_the_broken_one(validated):
    report, masks, out, _ = validated
    (run,) = report.runs
    assert not run.random_weights
    by_name = {(a.part, a.precision): a for a in run.artifacts}
    assert "changed since conversion" in by_name[("prompt_decoder", "int8")].error
    encoder = by_name[("image_encoder", "fp32")].encoder
    assert encoder.psnr_db_min > 60 and encoder.cosine_min > 0.9999
    decoder = by_name[("prompt_decoder", "fp32")].decoder
    assert set(decoder) == set(PROMPT_KINDS)
    for kind in PROMPT_KINDS:
        assert decoder[kind].mask_iou.min > 0.99
        assert decoder[kind].same_index_rate == 1.0
        assert decoder[kind].logits_cosine_min > 0.9999 and decoder[kind].iou_predictions_psnr_db_min > 60
        truth_pytorch, truth_file = decoder[kind].ground_truth_iou_pytorch, decoder[kind].ground_truth_iou_file
        assert 0.0 <= truth_pytorch.mean <= 1.0
        assert truth_pytorch.mean == pytest.approx(truth_file.mean, abs=1e-3)
    assert by_name[("image_encoder", "int8")].latency.median_s > 0
    assert by_name[("image_encoder", "fp32")].memory.peak_rss_mb > 0
    baselines = run.baselines
    assert baselines.onnxruntime["image_encoder"].median_s > 0
    assert baselines.onnxruntime["prompt_decoder"].median_s > 0
    assert 50 < baselines.compute_floor.encoder_gflops < 100
    first_pass = [c for c in run.prompt_cases if c["kind"] != "refine"]
    assert len(first_pass) == 2 * 2 * 5 and sum(c["kind"] == "refine" for c in run.prompt_cases) == 2 * 2
    assert all(c["refines"] == "center_point" for c in run.prompt_cases if c["kind"] == "refine")
    rows = summary_rows(report)
    assert any("ERROR" in row[-1] for row in rows) and len(rows) == len(run.artifacts) >= 5  # batched int8: if made
    assert by_name[("prompt_decoder", "fp32")].gate == GateResult(True, ())
    failed = report.failures()
    assert failed[0].startswith("tflite prompt_decoder int8: ") and "changed since conversion" in failed[0]
    assert set(masks) == {"tflite pytorch", "tflite prompt_decoder fp32", "tflite prompt_decoder int8"}
    # the fp32 file's overlay masks are PyTorch's up to the odd pixel whose logit sits at 0
    overlays = masks["tflite prompt_decoder fp32"]
    assert overlays and all(mask_iou(masks["tflite pytorch"][i], m) > 0.999 for i, m in overlays.items())
    assert masks["tflite prompt_decoder int8"] == {}  # the broken file gave no masks
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "random init, seed" not in page


def test_pairs_run_every_encoder_into_every_decoder(validated):
    """End to end from the photo: fp32 into fp32 is PyTorch's answer; a pair with the broken
    decoder is one line; report.json lists every pair naming both files."""
    report, _, _, _ = validated
    pairs = {(p.encoder_precision, p.decoder_precision): p for p in report.pairs}
    assert set(pairs) == {("fp32", "fp32"), ("fp32", "int8"), ("int8", "fp32"), ("int8", "int8")}
    exact = pairs["fp32", "fp32"]
    assert exact.gate.passed and exact.encoder_file.endswith("image_encoder_fp32.tflite")
    assert all(scores.mask_iou.min >= 0.99 for scores in exact.decoder.values())
    assert pairs["int8", "fp32"].gate.passed, pairs["int8", "fp32"].gate.failures
    assert pairs["int8", "int8"].error.startswith("not run:") and not pairs["int8", "int8"].gate.passed
    assert any(line.startswith("pair tflite int8 encoder + int8 decoder") for line in report.failures())
    as_json = report.to_json()
    assert {(p["encoder_file"], p["decoder_file"]) for p in as_json["pairs"]} == {
        (p.encoder_file, p.decoder_file) for p in report.pairs
    }
    markdown = summary_markdown(report)
    assert "deployed pairs" in markdown and "Best pair under each size budget" in markdown
    assert [p.bytes for p in best_pairs_by_budget(report, "tflite")] == sorted(
        p.bytes for p in best_pairs_by_budget(report, "tflite")
    )


def test_teacher_scores_the_student_and_every_pair(validated):
    report, _, _, _ = validated
    (run,) = report.runs
    assert report.teacher.startswith("SAM vit_b, checkpoint sam_vit_b.pth")
    assert set(run.teacher) == set(PROMPT_KINDS)
    exact = next(p for p in report.pairs if p.encoder_precision == p.decoder_precision == "fp32")
    for kind, scores in exact.decoder.items():
        # an exact pair loses nothing to conversion: its IoU with the teacher is the student's
        assert scores.teacher_iou_file.mean == pytest.approx(run.teacher[kind].mask_iou.mean, abs=1e-3)
        assert 0.0 <= scores.teacher_iou_pytorch.mean <= 1.0
    assert "Against the teacher" in summary_markdown(report)


def test_gates_fail_below_threshold_and_read_overrides():
    artifact = ArtifactResult("coreml", "image_encoder", "int8", "x", 1, encoder=EncoderScores(30.0, 0.1, 0.99, 1))
    assert gate_failures(artifact, DEFAULT_GATES["int8"]) == []
    assert gate_failures(artifact, DEFAULT_GATES["fp16"]) == ["embeddings PSNR 30.0 dB < 40.0"]
    gates = gates_from_config({"int8": {"embeddings_psnr_db": 31.0}})
    assert (
        gates["int8"].embeddings_psnr_db == 31.0 and gates["int8"].mask_iou_mean == DEFAULT_GATES["int8"].mask_iou_mean
    )
    with pytest.raises(ConfigError, match="unknown keys"):
        gates_from_config({"int8": {"psnr": 1.0}})
    assert looser_gate(DEFAULT_GATES["fp32"], DEFAULT_GATES["int8"]) == DEFAULT_GATES["int8"]


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
    assert Summary.of([0.99, None, 1.0]).defined == 2
    assert Summary.of([None, None]) is None
    summary = Summary.of([0.99, float("nan"), 1.0])
    assert np.isnan(summary.mean) and np.isnan(summary.min)
    assert np.isnan(nan_min([70.0, float("nan")])) and nan_min([70.0, 80.0]) == 70.0
    scores = KindScores(3, summary, summary, None, 1.0, 70.0, 0.1, 0.99, 70.0, 0.1)
    decoder = ArtifactResult("coreml", "prompt_decoder", "fp32", "x", 1, decoder={"box": scores})
    assert gate_failures(decoder, DEFAULT_GATES["fp32"]) == [
        "box: mask IoU mean nan < 0.99",
        "box: mask IoU min nan < 0.98",
    ]
    encoder = ArtifactResult("coreml", "image_encoder", "int8", "x", 1, encoder=EncoderScores(float("nan"), 0, 0, 1))
    encoder.non_finite_outputs["image_embeddings"] = 7
    assert gate_failures(encoder, DEFAULT_GATES["int8"]) == [
        "output image_embeddings had 7 non-finite values (NaN or Inf)",
        "embeddings PSNR nan dB < 25.0",
    ]


def test_segment_everything_section_gates_fp32(validated):
    """Each batched decoder file with its encoder against SamAutomaticMaskGenerator: fp32 must
    reproduce it (gated), int8 is reported; the section is in the HTML report."""
    from validation.everything import THRESHOLDS

    report, _, out, _ = validated
    by = {(e.decoder_precision, e.thresholds): e for e in report.everything}
    assert set(by) == {(p, t) for p in ("fp32", "int8") for t in THRESHOLDS}
    for thresholds in THRESHOLDS:
        fp32 = by[("fp32", thresholds)]
        assert fp32.gate.passed and len(fp32.photos) == 2 and all(p.reproduced for p in fp32.photos)
        assert fp32.prompts == 2 * 16 and fp32.decoder_calls == 2 * 4
        assert by[("int8", thresholds)].gate is None and not by[("int8", thresholds)].error
    assert sum(p.reference_count for p in by[("fp32", "zero thresholds")].photos) > 0
    assert "Segment everything" in (out / "report.html").read_text()
    batched = next(a for run in report.runs for a in run.artifacts if a.part == "prompt_decoder_batched")
    assert batched.decoder and batched.gate.passed and batched.latency


def test_emulated_latencies_show_no_ratios():
    """A Core ML file timed in the Linux emulator: its cell says "emulated" and carries no ratio to
    PyTorch, ONNX Runtime or the compute floor (an emulator's time says nothing about a phone);
    a file run in its real runtime keeps them."""
    from validation.schema import (
        ArtifactResult,
        Baselines,
        ComputeFloor,
        EncoderScores,
        GateResult,
        Latency,
        Report,
        RunResult,
    )
    from validation.text_report import summary_rows

    baselines = Baselines(
        pytorch={"image_encoder": Latency(0.5, 0.6, 3)}, compute_floor=ComputeFloor(77.5, 300.0, 0.25)
    )

    def run(target: str, emulated: str | None) -> RunResult:
        artifact = ArtifactResult(target, "image_encoder", "fp32", "f", 23_000_000)
        artifact.latency = Latency(3.0, 3.1, 3)
        artifact.encoder = EncoderScores(130.0, 1e-5, 1.0, 1)
        artifact.gate = GateResult(True, ())
        return RunResult("m", target, emulated=emulated, baselines=baselines, artifacts=[artifact])

    report = Report({}, "photos", True, {}, runs=[run("coreml", "MIL emulator on Linux"), run("tflite", None)])
    emulated, real = summary_rows(report)
    assert emulated[2:6] == ["3000 (emulated)", "-", "-", "-"]
    assert real[2:6] == ["3000", "6.00", "-", "12.0"]


def test_results_page_is_generated_from_the_stages_json(tmp_path):
    """docs/results.md: each stage's result file read back as its typed record and rendered under
    the machine, date and command that made it; a folder without results is one line."""
    from pipeline.errors import PipelineError
    from pipeline.files import atomic_write_json
    from validation.compat.matrix import CompatReport
    from validation.results.page import results_markdown
    from validation.schema import Report

    report = Report(settings={}, photos="4 photos", ground_truth=False, gates={}, command="python3 -m validation")
    atomic_write_json(tmp_path / "report.json", report.to_json())
    atomic_write_json(tmp_path / "compat.json", CompatReport((), (), command="python3 -m validation.compat").to_json())
    page = results_markdown([tmp_path], "python3 -m validation.results --from x")
    assert page.startswith("# Results\n\nGenerated by `python3 -m validation.results --from x`")
    assert "## Validation" in page and "made by: `python3 -m validation`" in page
    assert "## Runtime compatibility" in page and "made by: `python3 -m validation.compat`" in page
    assert f"machine: {report.machine}" in page and "## Benchmark" not in page
    (tmp_path / "report.json").write_text('{"settings": 3}')
    with pytest.raises(PipelineError, match="is not a validate report: settings must be"):
        results_markdown([tmp_path], "x")
    with pytest.raises(PipelineError, match="no result files"):
        results_markdown([tmp_path / "empty"], "x")
