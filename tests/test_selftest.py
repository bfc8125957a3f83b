"""Self-test vectors: written beside every file by the convert stage, expected values from
PyTorch fp32, run through the file by `python -m validation.selftest`, and failing when a single
weight of the file is changed."""

from __future__ import annotations

import json
import shutil

import numpy as np

from pipeline.checkpoints import load_model
from pipeline.datasets import CocoPhotos
from pipeline.files import sha256_file
from pipeline.gates import DEFAULT_GATES, selftest_tolerance
from pipeline.manifest import read_manifest
from pipeline.predictor import ReferencePredictor
from pipeline.selftest import read_vectors
from tests.artifact_surgery import set_coreml_weights
from tests.test_bad_input import run_stage


def test_vectors_hold_pytorch_fp32_not_the_file(coreml_fp32):
    manifest_path = coreml_fp32 / "coreml" / "manifest.json"
    manifest = read_manifest(manifest_path)
    sam, _ = load_model("vit_t", None, 0)
    reference = ReferencePredictor(sam)
    photos = CocoPhotos.sample("calibration")
    expected_embeddings = reference.set_image(photos.image(photos.image_ids()[0]))
    for record in manifest.artifacts:
        info = record.details.selftest
        assert info.file == record.file.replace(".mlpackage", ".selftest.npz")
        assert info.tolerance == selftest_tolerance(DEFAULT_GATES["fp32"], record.part).to_json()
        with np.load(coreml_fp32 / "coreml" / info.file) as archive:
            contract = manifest.contract(record.part)
            assert sorted(archive.files) == sorted(
                [f"case{i}.input.{n}" for i in range(len(info.cases)) for n in contract.input_names]
                + [f"case{i}.expected.{n}" for i in range(len(info.cases)) for n in contract.output_names]
            )
        cases = read_vectors(coreml_fp32 / "coreml" / info.file, info.cases, contract)
        if record.part == "image_encoder":
            np.testing.assert_allclose(cases[0].expected["image_embeddings"], expected_embeddings, rtol=0, atol=1e-6)
        elif record.part == "prompt_decoder_batched":  # the four one-prompt vectors' prompts, then grid points
            assert info.cases == ["grid"]
            (grid,) = cases
            outputs = reference.decoder.run(grid.inputs)
            for name, value in grid.expected.items():
                np.testing.assert_allclose(value, outputs[name], rtol=0, atol=1e-5)
        else:
            assert info.cases == ["point", "box", "box_point", "refine"]
            refine = cases[3]
            assert refine.inputs["has_mask_input"].tolist() == [1.0] and refine.inputs["mask_input"].any()
            for case in cases:  # PyTorch on the vector's own inputs
                outputs = reference.decoder.run(case.inputs)
                for name, value in case.expected.items():
                    np.testing.assert_allclose(value, outputs[name], rtol=0, atol=1e-6)


def test_selftest_passes_on_fresh_files_and_fails_on_one_changed_weight(coreml_fp32, tmp_path, capsys, monkeypatch):
    status, stdout, _ = run_stage("validation.selftest", "--out", coreml_fp32, capsys=capsys, monkeypatch=monkeypatch)
    assert status == 0 and stdout.count("pass coreml") == 3, stdout
    damaged = shutil.copytree(coreml_fp32, tmp_path / "out")
    package = damaged / "coreml" / "image_encoder_fp32.mlpackage"
    set_coreml_weights(package, 10.0, count=1)  # one weight of millions
    status, stdout, stderr = run_stage("validation.selftest", "--out", damaged, capsys=capsys, monkeypatch=monkeypatch)
    (failed,) = [line for line in stderr.splitlines() if line.startswith("FAILED: ")]
    assert status == 1 and "coreml image_encoder fp32" in failed and "changed since conversion" in failed
    # where no manifest travels (a device), the vectors alone catch it: record the damaged file's hash
    manifest_path = damaged / "coreml" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    for item in raw["artifacts"]:
        if item["file"] == package.name:
            item["sha256"] = sha256_file(package)
    manifest_path.write_text(json.dumps(raw))
    status, stdout, stderr = run_stage("validation.selftest", "--out", damaged, capsys=capsys, monkeypatch=monkeypatch)
    assert status == 1
    (failed,) = [line for line in stderr.splitlines() if line.startswith("FAILED: ")]
    assert "coreml image_encoder fp32" in failed and "image_embeddings PSNR" in failed


def test_missing_vectors_are_one_line(coreml_fp32, tmp_path, capsys, monkeypatch):
    damaged = shutil.copytree(coreml_fp32, tmp_path / "out")
    (damaged / "coreml" / "prompt_decoder_fp32.selftest.npz").unlink()
    status, _, stderr = run_stage("validation.selftest", "--out", damaged, capsys=capsys, monkeypatch=monkeypatch)
    (failed,) = [line for line in stderr.splitlines() if line.startswith("FAILED: ")]
    assert status == 1 and "self-test vectors not found" in failed


def test_selftest_without_manifests_is_bad_input(tmp_path, capsys, monkeypatch):
    status, _, stderr = run_stage("validation.selftest", "--out", tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert status == 2 and "error: no manifests under" in stderr
