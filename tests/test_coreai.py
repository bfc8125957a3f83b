"""The Core AI target: `.aimodel` assets converted by coreai-torch and run by Apple's own Core AI
runtime (its Linux build in the coreai-core wheel), on the full MobileSAM architecture."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mobile_targets import get_target
from mobile_targets.convert import build_parts, convert_target, example_prompts
from pipeline.config import RunConfig
from pipeline.errors import ArtifactError
from pipeline.gates import DEFAULT_GATES, selftest_tolerance
from pipeline.manifest import read_manifest
from pipeline.metrics import mask_iou, psnr_db
from pipeline.predictor import ReferencePredictor, Segmenter
from pipeline.selftest import check_case


@pytest.fixture(scope="module")
def coreai_fp32(tmp_path_factory, official_checkpoint) -> Path:
    """fp32 encoder and decoder of the upstream-layout checkpoint (fp16 runs emulated on Linux:
    minutes a call; its decoder is tested alone below)."""
    config = RunConfig(
        checkpoint=official_checkpoint,
        precisions=("fp32",),
        out_dir=tmp_path_factory.mktemp("coreai"),
        batch_prompts=0,
    )
    return convert_target("coreai", config)


def _runner(manifest_path: Path, part: str):
    manifest = read_manifest(manifest_path)
    (record,) = [r for r in manifest.artifacts if r.part == part]
    return get_target("coreai").load_runner(manifest_path.parent / record.file, manifest.contract(part))


@pytest.mark.slow
def test_fp32_assets_match_upstream_mobilesam_in_apples_runtime(coreai_fp32, upstream_mobile_sam, our_model, photos):
    """On a held-out photo: the encoder asset's embeddings against upstream MobileSAM's own
    SamPredictor, and the deployed pair's masks (encoder asset into decoder asset, the app's chain)
    against PyTorch, on real instance prompts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import SamPredictor
    upstream = SamPredictor(upstream_mobile_sam[0])
    deployed = Segmenter(_runner(coreai_fp32, "prompt_decoder"), _runner(coreai_fp32, "image_encoder"))
    reference = ReferencePredictor(our_model)
    image_id = photos.image_ids()[9]
    image = photos.image(image_id)
    upstream.set_image(image)
    embeddings = deployed.set_image(image)
    assert psnr_db(upstream.get_image_embedding().numpy(), embeddings) >= 60.0
    reference.set_image(image)
    ious = []
    for prompt in example_prompts(photos, image_id, image.shape, count=3):
        expected = reference.predict(prompt, multimask_output=False).mask
        ious.append(mask_iou(expected, deployed.predict(prompt, multimask_output=False).mask))
    assert ious and min(ious) >= 0.99, ious


@pytest.mark.slow
def test_fp32_assets_pass_their_self_test_vectors_and_carry_metadata(coreai_fp32):
    from validation.selftest import selftest_folder

    outcomes = selftest_folder(coreai_fp32.parent.parent, threads=1)
    assert len(outcomes) == 2 and all(o.passed for o in outcomes), outcomes
    metadata = (coreai_fp32.parent / "image_encoder_fp32.aimodel" / "metadata.json").read_text()
    assert "Apache-2.0" in metadata and "TinyViT" in metadata and "image_embeddings" in metadata
    for record in read_manifest(coreai_fp32).artifacts:  # fp32 files: fp32 throughout, no gather
        census = record.details.neural_engine
        assert census is not None and "gather" not in census.outside, (record.file, census)
        assert census.outside["fp32 compute"] > census.ops * 0.9, (record.file, census)


@pytest.mark.slow
def test_fp16_decoder_keeps_the_point_encoding_fp32(our_model, photos, tmp_path):
    """The fp16 decoder (fp16 weights and compute, float32 I/O, the point encoding in fp32) meets
    the fp16 gate on its self-test prompt in Apple's runtime (emulated fp16: about a minute)."""
    parts = build_parts(RunConfig(batch_prompts=0), our_model, photos)
    decoder = parts[1]
    target = get_target("coreai")
    path = tmp_path / "prompt_decoder_fp16.aimodel"
    details = target.convert_part(decoder, "fp16", path)
    assert details["compute"] == "fp16, float32 inputs and outputs, point encoding fp32"
    runner = target.load_runner(path, decoder.contract)
    case = decoder.selftest[0]
    result = check_case(case, runner.run(case.inputs), selftest_tolerance(DEFAULT_GATES["fp16"], decoder.name))
    assert result.passed, result.misses
    assert result.mask_iou_min >= DEFAULT_GATES["fp16"].mask_iou_min


@pytest.mark.slow
def test_int8_decoder_stores_int8_weights_and_holds_its_gate(coreai_fp32, our_model, photos, tmp_path):
    """coreai-opt's int8 weights: under a third of the fp32 asset's bytes, and within the int8 gate
    on every self-test prompt in Apple's runtime (compute stays fp32: scored on every photo, not emulated fp16)."""
    parts = build_parts(RunConfig(batch_prompts=0), our_model, photos)
    decoder = parts[1]
    target = get_target("coreai")
    path = tmp_path / "prompt_decoder_int8.aimodel"
    details = target.convert_part(decoder, "int8", path)
    assert "int8 per output channel" in details["compute"]
    size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    fp32 = coreai_fp32.parent / "prompt_decoder_fp32.aimodel"
    assert size < sum(file.stat().st_size for file in fp32.rglob("*") if file.is_file()) / 3
    runner = target.load_runner(path, decoder.contract)
    tolerance = selftest_tolerance(DEFAULT_GATES["int8"], decoder.name)
    for case in decoder.selftest:
        result = check_case(case, runner.run(case.inputs), tolerance)
        assert result.passed, (case.kind, result.misses)
    assert target.selftest_only("image_encoder", "int8") is None  # scored on every photo, like fp32


@pytest.mark.slow
def test_broken_assets_are_one_line(coreai_fp32, tmp_path):
    """A missing program, a truncated one (Apple's runtime aborts the process on it, so the asset's
    own digest is checked first), and a file where the folder should be: one line naming it."""
    target = get_target("coreai")
    contract = read_manifest(coreai_fp32).contract("prompt_decoder")
    source = coreai_fp32.parent / "prompt_decoder_fp32.aimodel"
    missing = shutil.copytree(source, tmp_path / "missing.aimodel")
    (missing / "main.mlirb").unlink()
    with pytest.raises(
        ArtifactError, match=r"missing\.aimodel is not a complete Core AI asset \(missing main\.mlirb\)"
    ):
        target.load_runner(missing, contract)
    truncated = shutil.copytree(source, tmp_path / "truncated.aimodel")
    data = (truncated / "main.mlirb").read_bytes()
    (truncated / "main.mlirb").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"truncated\.aimodel is a damaged Core AI asset \(main\.mlirb does not"):
        target.load_runner(truncated, contract)
    regular = tmp_path / "file.aimodel"
    regular.write_bytes(np.zeros(16, dtype=np.uint8).tobytes())
    with pytest.raises(ArtifactError, match=r"file\.aimodel is not a Core AI asset \(expected an \.aimodel folder\)"):
        target.load_runner(regular, contract)


@pytest.mark.slow
def test_validate_cross_checks_core_ml_against_apples_runtime(coreai_fp32, official_checkpoint, tmp_path, monkeypatch):
    """Core ML and Core AI files of the same weights in one validate run: side by side on the same
    photo and prompts, and their encoders' embeddings against each other. Then the path the fp16
    Core AI files take on Linux (too slow for every photo): scored from the self-test measurement
    their manifest recorded in Apple's runtime, their pairs listed as not run, never skipped silently."""
    from mobile_targets.coreai.converter import CoreAITarget
    from pipeline.datasets import CocoPhotos
    from validation.reference import ValidationSettings
    from validation.run import validate_run
    from validation.text_report import summary_markdown

    out = tmp_path / "out"
    shutil.copytree(coreai_fp32.parent.parent, out)
    config = RunConfig(checkpoint=official_checkpoint, precisions=("fp32",), out_dir=out, batch_prompts=0)
    convert_target("coreml", config)
    photos = CocoPhotos.sample("validation")
    settings = ValidationSettings(max_images=1, instances_per_image=1, latency_runs=1, warmup_runs=0)
    settings = replace(settings, baselines=False, everything_points_per_side=0)
    report = validate_run(out, photos, settings)
    assert report.failures() == []
    checks = {(c.part, c.basis): c for c in report.crosscheck}
    assert set(checks) == {("image_encoder", "held-out photos"), ("prompt_decoder", "held-out photos")}
    assert all(c.agrees for c in checks.values())
    assert checks[("image_encoder", "held-out photos")].between_psnr_db >= DEFAULT_GATES["fp32"].embeddings_psnr_db
    assert "## Core ML emulator against Core AI (Apple's runtime)" in summary_markdown(report)

    reason = "too slow here (this test's stand-in for fp16 on Linux)"
    monkeypatch.setattr(CoreAITarget, "selftest_only", lambda self, part, precision: reason)
    report = validate_run(out, photos, settings)
    assert report.failures() == []
    coreai = next(run for run in report.runs if run.target == "coreai")
    for artifact in coreai.artifacts:
        assert artifact.selftest_only.reason == reason and artifact.gate.passed
        assert artifact.encoder is None and artifact.decoder is None and artifact.latency is None
    (pair,) = [p for p in report.pairs if p.target == "coreai"]
    assert pair.not_run == reason and pair.gate is None
    assert {c.basis for c in report.crosscheck} == {"self-test vectors"}
    assert f"coreai image_encoder fp32: scored on its self-test vectors only: {reason}" in summary_markdown(report)
    shutil.rmtree(out / "coreml")  # the last run is about the Core AI vectors alone
    manifest = read_manifest(out / "coreai" / "manifest.json")
    vectors = out / "coreai" / manifest.artifacts[0].details.selftest.file
    vectors.write_bytes(vectors.read_bytes()[:-10])  # a damaged vectors file: that file's error, never trusted
    report = validate_run(out, photos, settings)
    assert any("is not the file converted with" in line for line in report.failures())


def test_neural_engine_census_reads_the_core_ai_program(tmp_path):
    """A small fp16 asset with one gather, one dilated convolution and one op kept in fp32: the
    census of the Core AI program counts each rule's own op, as for a Core ML package."""
    import coreai_torch
    import torch

    from mobile_targets.coreai.neural_engine import neural_engine_census
    from mobile_targets.neural_engine import RULES
    from tests.neural_engine_probe import RuleProbe

    example = torch.rand(1, 2, 3, 3).half()
    program = torch.export.export(RuleProbe().half().eval(), (example,), strict=False)
    converter = coreai_torch.TorchConverter()
    converter.add_exported_program(
        program.run_decompositions(coreai_torch.get_decomp_table()), input_names=["x"], output_names=["y"]
    )
    converter.to_coreai().save_asset(tmp_path / "small.aimodel")
    census = neural_engine_census(tmp_path / "small.aimodel")
    assert census.outside == {"gather": 1, "dilated convolution": 1, "fp32 compute": 1}, census.examples
    assert census.examples["fp32 compute"][0].startswith("sin ")
    assert set(census.sources) == {rule.name for rule in RULES}


@pytest.mark.slow
def test_fp16_encoder_has_no_op_the_neural_engine_is_known_not_to_run(our_model, photos, tmp_path):
    """The fp16 encoder asset (the one for the Neural Engine) takes its relative-position biases as
    one-hot products, as the Core ML packages do: no gather, nothing computed in fp32; the census is
    in its details. Converted only (an fp16 call is emulated on Linux: minutes)."""
    encoder = build_parts(RunConfig(batch_prompts=0), our_model, photos)[0]
    details = get_target("coreai").convert_part(encoder, "fp16", tmp_path / "image_encoder_fp16.aimodel")
    census = details["neural_engine"]
    assert census.ops > 500 and census.outside == {}, census.examples
