"""The compatibility matrix: files in older runtime builds, each in its own environment.

The environments (tflite-runtime 2.14.0 and ai-edge-litert 2.3, a few MB each) are built once per
machine under the user's cache folder and reused (`validation.compat.runtimes`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_targets.tflite.op_versions import declare_required_versions, declared_versions
from pipeline.files import sha256_file
from validation.compat.matrix import build_matrix, read_report, record_in_manifests, write_report
from validation.compat.runtimes import QUICK_RUNTIMES, runtime_spec


def _float_tflite(module: torch.nn.Module, sample: torch.Tensor) -> bytes:
    import litert_torch

    return bytes(litert_torch.convert(module.eval(), (sample,)).model_content())


def _dynamic_int8(float_model: bytes) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    return bytes(quantizer.Quantizer(float_model, recipe.dynamic_wi8_afp32()).quantize().quantized_model)


def test_hybrid_int8_ops_declare_the_versions_tflite_requires():
    """ai-edge-quantizer keeps the float model's op versions; the converter raises them to what
    TFLite's op_version.cc gives the hybrid signatures, and changes nothing else."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.Flatten(2), torch.nn.Linear(16, 32))
    float_model = _float_tflite(layer, torch.randn(1, 8, 4, 4))
    quantized = _dynamic_int8(float_model)
    before = declared_versions(quantized)
    assert before["FULLY_CONNECTED"] < 12, "the quantizer now declares per-channel hybrid FC itself: drop the patch"
    after_bytes = declare_required_versions(quantized)
    after = declared_versions(after_bytes)
    assert after["FULLY_CONNECTED"] == 12  # float input, per-channel int8 weights
    assert after["CONV_2D"] == 5  # per-channel hybrid convolution
    assert {k: v for k, v in after.items() if k not in ("FULLY_CONNECTED", "CONV_2D")} == {
        k: v for k, v in before.items() if k not in ("FULLY_CONNECTED", "CONV_2D")
    }
    assert declared_versions(declare_required_versions(after_bytes)) == after  # idempotent
    # float ops keep what the converter wrote
    assert declared_versions(declare_required_versions(float_model)) == declared_versions(float_model)


def _with_declared_fc_version(path: Path, version: int) -> None:
    """Rewrite a file's FULLY_CONNECTED op code version (what ai-edge-quantizer wrote: 5)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for code in model.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED:
            code.version = version
    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


def test_matrix_passes_refuses_and_catches_a_wrong_answer(tflite_converted, tmp_path):
    """The shipped files in tflite-runtime 2.14 and ai-edge-litert 2.3: every float file passes in
    both; the int8 files pass in 2.3 and are refused by 2.14 (FULLY_CONNECTED version 12). The
    int8 encoder as the quantizer declared it (version 5) loads in 2.14 and answers wrong: the
    matrix says wrong, fails its gate, and the manifest records it."""
    out = tmp_path / "out"
    shutil.copytree(Path(tflite_converted).parent, out / "tflite")
    manifest_path = out / "tflite" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    stale = out / "tflite" / "image_encoder_int8.tflite"
    _with_declared_fc_version(stale, 5)
    for item in raw["artifacts"]:
        if item["file"] == stale.name:
            item["sha256"] = sha256_file(stale)
    manifest_path.write_text(json.dumps(raw))

    report = build_matrix(out, [runtime_spec(name) for name in QUICK_RUNTIMES])
    cells = {(c.file, c.runtime): c for c in report.cells}
    old, new = QUICK_RUNTIMES[1], QUICK_RUNTIMES[0]
    files = {item["file"] for item in raw["artifacts"]}
    assert {file for file, _ in cells} == files
    for file in files:
        assert cells[(file, new)].verdict == "pass", cells[(file, new)]
        if "int8" not in file:
            assert cells[(file, old)].verdict == "pass", cells[(file, old)]
    assert cells[("image_encoder_int8.tflite", old)].verdict == "wrong"
    assert "PSNR" in cells[("image_encoder_int8.tflite", old)].detail
    decoder = cells[("prompt_decoder_int8.tflite", old)]
    assert decoder.verdict == "refused" and "'FULLY_CONNECTED' version '12'" in decoder.detail
    failures = report.gate_failures()
    assert len(failures) == 1 and "image_encoder_int8.tflite" in failures[0] and old in failures[0]

    write_report(out, report)
    assert read_report(out) == report
    assert "**WRONG**" in (out / "compat.md").read_text()
    record_in_manifests(out, report)
    records = {item["file"]: item for item in json.loads(manifest_path.read_text())["artifacts"]}
    assert records["image_encoder_int8.tflite"]["details"]["runtimes"]["wrong"] == [old]
    assert records["prompt_decoder_int8.tflite"]["details"]["runtimes"]["refused"] == [old]
    assert records["image_encoder_fp32.tflite"]["details"]["runtimes"]["pass"] == [new, old]


def test_matrix_refuses_damaged_vectors_and_changed_files(tflite_converted, tmp_path):
    """A vectors file or a model file that is not what the manifest recorded is one refused cell
    naming it, never scored."""
    out = tmp_path / "out"
    shutil.copytree(Path(tflite_converted).parent, out / "tflite")
    (out / "tflite" / "prompt_decoder_fp32.selftest.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    with (out / "tflite" / "image_encoder_fp32.tflite").open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\0" * 16)
    report = build_matrix(out, [runtime_spec(QUICK_RUNTIMES[0])])
    cells = {c.file: c for c in report.cells}
    assert cells["prompt_decoder_fp32.tflite"].verdict == "refused"
    assert "prompt_decoder_fp32.selftest.npz changed since conversion" in cells["prompt_decoder_fp32.tflite"].detail
    assert cells["image_encoder_fp32.tflite"].verdict == "refused"
    assert "changed since conversion" in cells["image_encoder_fp32.tflite"].detail
    assert cells["image_encoder_fp16.tflite"].verdict == "pass"


def test_unknown_runtime_is_one_line():
    from pipeline.errors import PipelineError

    with pytest.raises(
        PipelineError, match=re.escape("unknown runtime 'tflite-9'; expected some of ai-edge-litert-2.3")
    ):
        runtime_spec("tflite-9")
