"""Every row of the "Bad input" table (docs/bad-input.md): what a user does wrong, the one line they see, the exit
status, and that nothing earlier is lost. Stages run through their real command-line entry points
(`python -m mobile_targets`, `python -m validation`, `python -m distillation`), on real files."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobile_targets.convert import convert_target
from pipeline.checkpoints import load_model, official_state_dict
from pipeline.cli import run_main
from pipeline.config import RunConfig
from pipeline.datasets import SAMPLE_DIR, FolderPhotos
from pipeline.errors import ArtifactError
from pipeline.files import sha256_file
from pipeline.locking import LOCK_NAME
from pipeline.manifest import ArtifactRecord, ConversionFailure, Manifest, read_manifest
from tests.artifact_surgery import rehash, set_coreml_weights
from tests.conftest import clone_environment, tracked_copy
from validation.run import ValidationSettings, validate_run

REPO = Path(__file__).resolve().parents[1]
QUICK = ValidationSettings(
    max_images=1, instances_per_image=1, latency_runs=1, warmup_runs=0, baselines=False, everything_points_per_side=0
)


def run_stage(stage: str, *argv: object, capsys, monkeypatch) -> tuple[int, str, str]:
    """A stage's CLI in this process (`python -m <stage> ...`): exit status, stdout, stderr."""
    package = importlib.util.find_spec(stage).submodule_search_locations is not None
    module = importlib.import_module(f"{stage}.__main__" if package else stage)
    monkeypatch.setattr(sys, "argv", [f"python -m {stage}", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Inputs a user could hand us by mistake, made once."""
    folder = tmp_path_factory.mktemp("bad")
    files: dict[str, Path] = {"missing": folder / "no_such_file.pt", "empty_out": folder / "empty_out"}
    files["empty_out"].mkdir()
    sam, _ = load_model("vit_t", None, 0)
    state = official_state_dict(sam, "vit_t")
    state["mask_decoder.iou_prediction_head.layers.2.weight"][0, 0] = float("nan")
    files["nan_checkpoint"] = folder / "nan_mobile_sam.pt"
    torch.save(state, files["nan_checkpoint"])
    corrupt = folder / "corrupt_photos"
    corrupt.mkdir()
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files["corrupt_photos"] = corrupt
    bomb = folder / "bomb_photos"
    bomb.mkdir()
    Image.new("1", (9000, 6000)).save(bomb / "huge.png")  # 54 MP of zeros: a few kB on disk
    files["bomb_photos"] = bomb
    for name, text in {
        "num_points_str": "num_points = '5'",
        "bool_seed": "weights_seed = true",
        "gate_str": "[gates.int8]\nmask_iou_mean = 'high'",
        "bad_option_target": "[target_options.corml]\nencoder_input = 'image'",
        "distill_epochs": "[distill]\nepochs = 0",
        "distill_unknown": "[distill]\nepoch = 3",
    }.items():
        files[name] = folder / f"{name}.toml"
        files[name].write_text(text + "\n")
    return files


CLI_ROWS = [
    # (row id, stage, argv (names of bad_files in braces), what the one error line must say)
    ("convert-missing-checkpoint", "mobile_targets", ["coreml", "--checkpoint", "{missing}"], "checkpoint not found"),
    (
        "convert-nan-checkpoint",
        "mobile_targets",
        ["coreml", "--checkpoint", "{nan_checkpoint}"],
        "tensor mask_decoder.iou_prediction_head.layers.2.weight (4, 256) has 1 non-finite values",
    ),
    (
        "convert-unknown-target-in-option",
        "mobile_targets",
        ["coreml", "--target-option", "corml.encoder_input=image"],
        "target options for unknown targets ['corml']",
    ),
    (
        "convert-unknown-target-in-config",
        "mobile_targets",
        ["coreml", "--config", "{bad_option_target}"],
        "target options for unknown targets ['corml']",
    ),
    (
        "convert-boolean-not-true-false",
        "mobile_targets",
        ["coreml", "--target-option", "coreml.fp32_point_encoding=maybe"],
        "fp32_point_encoding must be true or false, got 'maybe'",
    ),
    (
        "convert-config-wrong-type",
        "mobile_targets",
        ["coreml", "--config", "{num_points_str}"],
        "key num_points must be int, got str '5'",
    ),
    (
        "convert-config-bool-for-int",
        "mobile_targets",
        ["coreml", "--config", "{bool_seed}"],
        "key weights_seed must be int, got bool True",
    ),
    ("convert-unknown-precision", "mobile_targets", ["coreml", "--precisions", "fp8"], "unknown precisions ['fp8']"),
    (
        "convert-precision-target-lacks",
        "mobile_targets",
        ["tflite", "--precisions", "palettize6"],
        "none of the precisions ['palettize6'] is supported by tflite",
    ),
    ("convert-old-seed-option", "mobile_targets", ["coreml", "--seed", "3"], "unrecognized arguments: --seed"),
    ("convert-missing-images", "mobile_targets", ["coreml", "--images", "{missing}"], "image folder not found"),
    ("convert-unreadable-image", "mobile_targets", ["coreml", "--images", "{corrupt_photos}"], "broken.jpg"),
    ("convert-decompression-bomb", "mobile_targets", ["coreml", "--images", "{bomb_photos}"], "over the 50 MP limit"),
    ("validate-no-manifests", "validation", ["--out", "{empty_out}"], "no manifests under"),
    ("validate-annotations-alone", "validation", ["--annotations", "{missing}"], "--annotations needs --images"),
    ("validate-convert-only-option", "validation", ["--num-points", "8"], "unrecognized arguments: --num-points"),
    (
        "validate-gate-wrong-type",
        "validation",
        ["--config", "{gate_str}"],
        "gates.int8.mask_iou_mean must be a finite number, got str 'high'",
    ),
    ("distill-zero-epochs", "distillation", ["run", "--config", "{distill_epochs}"], "epochs must be at least 1"),
    ("distill-unknown-key", "distillation", ["run", "--config", "{distill_unknown}"], "unknown keys ['epoch']"),
]


@pytest.mark.parametrize(("stage", "argv", "expected"), [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_bad_input_is_one_line_and_exit_2(stage, argv, expected, bad_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    arguments = [a.format(**bad_files) for a in argv]
    if stage == "mobile_targets" and "--out" not in arguments:
        arguments += ["--out", str(out)]
    status, _, stderr = run_stage(stage, *arguments, capsys=capsys, monkeypatch=monkeypatch)
    (line,) = error_lines(stderr)
    assert status == 2 and expected in line, stderr[-2000:]
    assert not out.exists() or not any(out.rglob("*.mlpackage")), "nothing may be written on bad input"


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "out"))


@pytest.mark.parametrize("row", ["validate-unreadable-image", "validate-decompression-bomb"])
def test_validate_bad_photos_are_one_line(row, coreml_fp32, bad_files, capsys, monkeypatch):
    folder, expected = {
        "validate-unreadable-image": (bad_files["corrupt_photos"], "broken.jpg"),
        "validate-decompression-bomb": (bad_files["bomb_photos"], "over the 50 MP limit"),
    }[row]
    status, _, stderr = run_stage(
        "validation", "--out", coreml_fp32, "--images", folder, capsys=capsys, monkeypatch=monkeypatch
    )
    (line,) = error_lines(stderr)
    assert status == 2 and expected in line and str(folder) in line


def test_convert_gate_fails_on_non_finite_pytorch_output(tmp_path, capsys, monkeypatch):
    """Finite weights whose PyTorch output overflows: the gate names the output, the manifest
    names the failed conversion, the encoder that passed is written and described."""
    sam, _ = load_model("vit_t", None, 0)
    state = official_state_dict(sam, "vit_t")
    state["mask_decoder.iou_prediction_head.layers.2.weight"].fill_(3e38)  # finite, but every sum overflows
    checkpoint = tmp_path / "overflowing.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "out"
    status, _, stderr = run_stage(
        "mobile_targets", "coreml", "--checkpoint", checkpoint, "--precisions", "fp32", "--out", out,
        capsys=capsys, monkeypatch=monkeypatch,
    )  # fmt: skip
    (line,) = error_lines(stderr)
    assert status == 2 and "PyTorch's own output iou_predictions has" in line and "non-finite" in line
    manifest = read_manifest(out / "coreml" / "manifest.json")
    assert [(a.part, a.precision) for a in manifest.artifacts] == [("image_encoder", "fp32")]
    assert {f.part for f in manifest.failures} == {"prompt_decoder", "prompt_decoder_batched"}
    assert all("non-finite" in failure.error for failure in manifest.failures)
    assert not (out / "coreml" / "prompt_decoder_fp32.mlpackage").exists()


def test_failed_reconversion_keeps_the_earlier_file(coreml_fp32, tmp_path, monkeypatch):
    """A conversion that fails its gate leaves the earlier file of the same weights in place,
    still listed, and the manifest says which conversion failed."""
    from dataclasses import replace

    from pipeline.gates import DEFAULT_GATES

    out = _copy(coreml_fp32, tmp_path)
    before = {p.name: sha256_file(p) for p in (out / "coreml").glob("*.mlpackage")}
    unreachable = replace(DEFAULT_GATES["fp32"], conversion_psnr_db=1000.0)  # a gate no file can meet
    monkeypatch.setitem(DEFAULT_GATES, "fp32", unreachable)
    with pytest.raises(ArtifactError, match=r"2 conversion\(s\) failed: image_encoder fp32: .*under the 1000 dB gate"):
        convert_target("coreml", RunConfig(precisions=("fp32",), out_dir=out, batch_prompts=16))  # as coreml_fp32
    assert {p.name: sha256_file(p) for p in (out / "coreml").glob("*.mlpackage")} == before
    manifest = read_manifest(out / "coreml" / "manifest.json")
    assert len(manifest.artifacts) == 3  # the earlier files stay listed
    assert {f.part for f in manifest.failures} == {"image_encoder", "prompt_decoder"}
    assert [f.part for f in manifest.not_made] == ["prompt_decoder_batched"]  # optional: left out, not failed
    leftovers = [p for p in (out / "coreml").iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
    assert not leftovers, "no staging folder is left behind"


def test_validate_isolates_every_failure(coreml_fp32, tmp_path, capsys, monkeypatch):
    """Three things broken at once: a Core ML encoder whose weights are NaN (its output is
    non-finite), a TFLite manifest that is not JSON, and an ExecuTorch file that is not a
    program but whose hash matches (the runtime fails). The Core ML decoder is still validated
    and passes; the pair fed by the NaN encoder fails; every failure is one line; all three
    reports are written; exit status 1. The Core ML manifest also lists a failed conversion (a
    failure line) and a file not made (reported, not failed)."""
    out = _copy(coreml_fp32, tmp_path)
    set_coreml_weights(out / "coreml" / "image_encoder_fp32.mlpackage", float("nan"))
    rehash(out / "coreml" / "manifest.json")
    failed_conversion = ConversionFailure(part="image_encoder", precision="int8", error="the converter stopped")
    not_made = ConversionFailure(part="prompt_decoder", precision="w8a8", error="self-test vectors missed")
    read_manifest(out / "coreml" / "manifest.json").model_copy(
        update={"failures": (failed_conversion,), "not_made": (not_made,)}
    ).write(out / "coreml")
    (out / "tflite").mkdir()
    (out / "tflite" / "manifest.json").write_text('{"schema_version": 1, "artifacts": [')
    coreml_manifest = read_manifest(out / "coreml" / "manifest.json")
    (out / "executorch").mkdir()
    garbage = out / "executorch" / "prompt_decoder_fp32.pte"
    garbage.write_bytes(b"\x00" * 4 + b"ET12" + b"not a program" * 100)
    record = ArtifactRecord.describe_file(
        garbage, garbage.parent, part="prompt_decoder", target="executorch", precision="fp32",
        contract=coreml_manifest.artifacts[1].contract,
    )  # fmt: skip
    Manifest(
        target="executorch",
        weights=coreml_manifest.weights,
        config=coreml_manifest.config,
        tool_versions={},
        artifacts=(record,),
    ).write(garbage.parent)
    status, _, stderr = run_stage(
        "validation", "--out", out, "--max-images", 1, "--skip-baselines", "--everything-points-per-side", 2,
        capsys=capsys, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert status == 1
    failed = [line for line in stderr.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 6, stderr[-3000:]
    assert "FAILED: coreml image_encoder int8: conversion failed: the converter stopped" in stderr
    assert "FAILED: pair coreml fp32 encoder + fp32 decoder: output low_res_masks had" in stderr
    assert "FAILED: coreml segment everything (fp32 encoder + fp32 batched decoder, zero thresholds)" in stderr
    report = json.loads((out / "report.json").read_text())
    runs = {run["target"]: run for run in report["runs"]}
    assert "not valid JSON" in runs["tflite"]["error"]
    (executorch,) = runs["executorch"]["artifacts"]
    print("executorch row:", executorch["error"])
    assert str(garbage) in executorch["error"] and "\n" not in executorch["error"]
    encoder, decoder, batched = runs["coreml"]["artifacts"]
    assert batched["gate"]["passed"] and batched["part"] == "prompt_decoder_batched"
    assert encoder["non_finite_outputs"]["image_embeddings"] > 0
    assert "output image_embeddings had" in encoder["gate"]["failures"][0]
    assert decoder["gate"]["passed"] and decoder["decoder"]["box_point"]["mask_iou"]["min"] > 0.99
    assert runs["coreml"]["not_made"] == [not_made.model_dump()]
    assert (
        "coreml: not made (missed their gate at conversion, not shipped): prompt_decoder w8a8: self-test"
        in (out / "report.md").read_text()
    )
    assert (out / "report.md").is_file() and "NOT VALIDATED" in (out / "report.md").read_text()
    assert (out / "report.html").is_file() and "not validated" in (out / "report.html").read_text()


def test_validate_refuses_changed_weights(coreml_fp32, tmp_path):
    """validate --checkpoint with other weights than the files came from: the run is refused."""
    sam, _ = load_model("vit_t", None, 5)
    other = tmp_path / "other_mobile_sam.pt"
    torch.save(official_state_dict(sam, "vit_t"), other)
    report = validate_run(coreml_fp32, FolderPhotos(SAMPLE_DIR / "validation" / "images"), QUICK, checkpoint=other)
    (run,) = report.runs
    assert "converted from random weights" in run.error and run.artifacts == [] and report.pairs == []


def test_validate_own_photos_without_ground_truth(coreml_fp32, tmp_path, caplog):
    """--images without --annotations: grid prompts and boxes around PyTorch's masks; a text file
    beside the photos is skipped with a warning line; the report says no ground truth was used."""
    folder = tmp_path / "my_photos"
    folder.mkdir()
    shutil.copy(next((SAMPLE_DIR / "validation" / "images").glob("*.jpg")), folder / "holiday.jpg")
    (folder / "notes.txt").write_text("not a photo")
    with caplog.at_level("WARNING"):
        photos = FolderPhotos(folder)
    assert any("skipping" in r.message and "notes.txt" in r.message for r in caplog.records)
    report = validate_run(coreml_fp32, photos, QUICK)
    assert report.ground_truth is False
    (run,) = report.runs
    assert {case["kind"] for case in run.prompt_cases} == {"grid_point", "refine", "mask_box", "mask_box_point"}
    assert all(case["annotation_id"] is None for case in run.prompt_cases)
    decoder = next(a for a in run.artifacts if a.part == "prompt_decoder")
    assert decoder.gate.passed
    assert all(kind.ground_truth_iou_pytorch is None for kind in decoder.decoder.values())
    (pair,) = report.pairs
    assert pair.gate.passed


def test_clone_without_shared_runs_the_main_job(tmp_path):
    """The README's main job and validate on a copy of the project with no shared data folder beside it
    (the batched decoder at B = 4: its default 64 rows cost the Core ML emulator minutes; validate
    --quick: one held-out photo and instance)."""
    clone = tracked_copy(tmp_path / "clone" / "project")
    environment = clone_environment(clone, home=tmp_path)
    convert = subprocess.run(
        [sys.executable, "-m", "mobile_targets", "coreml", "--precisions", "fp32", "--batch-prompts", "4"],
        cwd=clone, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert str(clone / "pipeline") in subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=clone, env=environment, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    validate = subprocess.run(
        [sys.executable, "-m", "validation", "--quick"],
        cwd=clone, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert validate.returncode == 0, validate.stderr[-3000:]
    report = json.loads((clone / "artifacts" / "report.json").read_text())
    assert "pipeline/sample_photos/validation" in report["photos"] and report["ground_truth"]
    assert np.all([a["gate"]["passed"] for run in report["runs"] for a in run["artifacts"]])


QUICK_SELECTION = (
    "tests/test_parity.py",
    "tests/test_padding.py",
    "tests/test_config_manifest.py",
    "tests/test_faults.py::test_commit_places_everything_or_nothing",
    "tests/test_faults.py::test_lock_refuses_a_second_writer_in_process",
    "tests/test_compat.py::test_hybrid_int8_ops_declare_the_versions_tflite_requires",
    "tests/test_distillation.py::test_photo_shares_are_even_whatever_the_shard_sizes",
)
"""Tests that read the photos fixture, the upstream reference and the shipped configs: quick on 2
cores, and each would fail if anything beside the repository were needed."""


def test_clone_without_shared_passes_a_quick_selection_of_the_suite(tmp_path):
    """The test suite on a copy of the project alone (no shared data folder): its photos ship with it."""
    clone = tracked_copy(tmp_path / "clone" / "project")
    environment = clone_environment(clone, home=tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *QUICK_SELECTION],
        cwd=clone, env=environment, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout.splitlines()[-1] and "failed" not in done.stdout.splitlines()[-1]


def test_changed_checkpoint_is_refused_by_sha256(tmp_path):
    """A manifest converted from a checkpoint: the same file is accepted, a file with other bytes
    (at the recorded path or passed as --checkpoint) is refused, and a missing one is named."""
    from pipeline.checkpoints import WeightsSource
    from validation.reference import reference_weights

    checkpoint = tmp_path / "mobile_sam.pt"
    checkpoint.write_bytes(b"the weights the files came from")
    weights = WeightsSource("vit_t", str(checkpoint), sha256_file(checkpoint), None).to_json()
    manifest = Manifest(target="coreml", weights=weights, config=RunConfig().to_json(), tool_versions={}, artifacts=())
    assert reference_weights(manifest, None) == ("vit_t", checkpoint, 0)
    other = tmp_path / "retrained.pt"
    other.write_bytes(b"other weights")
    with pytest.raises(ArtifactError, match="the weights changed, refusing to score"):
        reference_weights(manifest, other)
    checkpoint.write_bytes(b"overwritten in place")
    with pytest.raises(ArtifactError, match="the weights changed, refusing to score"):
        reference_weights(manifest, None)
    checkpoint.unlink()
    with pytest.raises(ArtifactError, match="is missing; pass --checkpoint PATH"):
        reference_weights(manifest, None)
