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

from mobile_targets import get_target
from mobile_targets.tflite.op_versions import declare_required_versions, declared_versions
from pipeline.files import sha256_file
from pipeline.manifest import read_manifest
from pipeline.selftest import read_vectors
from validation.compat.matrix import build_matrix, read_report, record_in_manifests, write_report
from validation.compat.runtimes import QUICK_RUNTIMES, runtime_spec


def _float_tflite(module: torch.nn.Module, *samples: torch.Tensor) -> bytes:
    import litert_torch

    return bytes(litert_torch.convert(module.eval(), samples).model_content())


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
    matrix says wrong, fails its gate, and the manifest records it. Every fp32 and fp16 file has
    no op LiteRT's GPU delegate cannot run (TensorFlow 2.16's analyzer), recorded in the manifest."""
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
    gpu = {c.file: c for c in report.gpu}  # TensorFlow 2.16's analyzer: the fp32 and fp16 files are GPU-ready
    assert set(gpu) == files
    assert all(c.verdict == "all ops" for c in gpu.values() if c.precision in ("fp32", "fp16")), report.gpu

    write_report(out, report)
    assert read_report(out) == report
    page = (out / "compat.md").read_text()
    assert "**WRONG**" in page and "## LiteRT GPU delegate" in page
    record_in_manifests(out, report)
    records = {item["file"]: item for item in json.loads(manifest_path.read_text())["artifacts"]}
    assert records["image_encoder_int8.tflite"]["details"]["runtimes"]["wrong"] == [old]
    assert records["prompt_decoder_int8.tflite"]["details"]["runtimes"]["refused"] == [old]
    assert records["image_encoder_fp32.tflite"]["details"]["runtimes"]["pass"] == [new, old]
    assert records["image_encoder_fp16.tflite"]["details"]["gpu_delegate"]["verdict"] == "all ops"


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
    assert "prompt_decoder_fp32.selftest.npz is not the file converted with prompt_decoder_fp32.tflite" in (
        cells["prompt_decoder_fp32.tflite"].detail
    )
    assert cells["image_encoder_fp32.tflite"].verdict == "refused"
    assert "changed since conversion" in cells["image_encoder_fp32.tflite"].detail
    assert cells["image_encoder_fp16.tflite"].verdict == "pass"


OLDER_EXECUTORCH = "executorch-1.4.1"


def test_pte_files_pass_in_an_older_executorch(executorch_converted, tmp_path):
    """Every shipped `.pte` (fp32 and int8, single and batched decoder) in the ExecuTorch release
    before the project's, in its own environment: each passes its own tolerance."""
    out = tmp_path / "out"
    shutil.copytree(Path(executorch_converted).parent, out / "executorch")
    report = build_matrix(out, [runtime_spec(OLDER_EXECUTORCH)])
    (column,) = report.runtimes
    assert column.name == OLDER_EXECUTORCH and column.version == "1.4.1"
    manifest = read_manifest(out / "executorch" / "manifest.json")
    assert {c.file for c in report.cells} == {r.file for r in manifest.artifacts}
    assert all(c.verdict == "pass" for c in report.cells), [c for c in report.cells if c.verdict != "pass"]


def test_every_pte_ships_a_bundled_program_that_executorch_verifies(executorch_converted):
    """`<stem>.bpte` beside each `.pte`: ExecuTorch's BundledProgram of the file with its self-test
    cases, recorded with its sha256, passing ExecuTorch's own check; the check fails when the
    program answers further from PyTorch than the bundled tolerance (the int8 program with the
    fp32 program's cases and tolerances)."""
    from mobile_targets.executorch_target import BUNDLED_SUFFIX, bundled_program, verify_bundled_program
    from pipeline.errors import ArtifactError

    manifest_path = Path(executorch_converted)
    manifest = read_manifest(manifest_path)
    target = get_target("executorch")
    companions = {}
    for record in manifest.artifacts:
        (companion_record,) = record.details.companions
        companion = companion_record.model_dump()
        path = manifest_path.parent / companion["file"]
        assert companion["file"] == Path(record.file).stem + BUNDLED_SUFFIX
        assert sha256_file(path) == companion["sha256"]
        assert len(companion["atol"]) == len(record.details.selftest.cases)
        assert "bundled cases verified by ExecuTorch" in target.verify_companion(path, companion)
        companions[(record.part, record.precision)] = (record, companion)
    fp32_record, fp32_companion = companions[("image_encoder", "fp32")]
    int8_record, _ = companions[("image_encoder", "int8")]
    contract = manifest.contract("image_encoder")
    cases = read_vectors(
        manifest_path.parent / fp32_record.details.selftest.file,
        fp32_record.details.selftest.cases,
        contract,
    )
    content, _ = bundled_program(manifest_path.parent / int8_record.file, contract, tuple(cases))
    with pytest.raises(ArtifactError, match=r"bundled case 0 misses atol"):
        verify_bundled_program(content, fp32_companion["atol"], "int8 with fp32 tolerances")


def test_unknown_runtime_is_one_line():
    from pipeline.errors import PipelineError

    with pytest.raises(
        PipelineError, match=re.escape("unknown runtime 'tflite-9'; expected some of ai-edge-litert-2.3")
    ):
        runtime_spec("tflite-9")


def test_coreml_packages_declare_the_os_their_manifest_promises(coreml_fp32, tmp_path):
    """Core ML cannot run here: each package's specification version is read and its first iOS
    compared with the manifest's promise; a package promised to an older iOS than it needs fails."""
    from validation.compat.matrix import CompatReport, coreml_checks

    checks = coreml_checks(coreml_fp32)
    assert checks and all(c.verdict == "pass" and c.minimum_os == "iOS17" for c in checks)
    out = tmp_path / "out"
    shutil.copytree(coreml_fp32 / "coreml", out / "coreml")
    manifest_path = out / "coreml" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["artifacts"][0]["details"]["minimum_deployment_target"] = "iOS16"
    manifest_path.write_text(json.dumps(raw))
    checks = coreml_checks(out)
    assert [c.verdict for c in checks].count("mismatch") == 1
    failures = CompatReport((), (), tuple(checks)).gate_failures()
    assert failures == [f"coreml {raw['artifacts'][0]['file']}: needs iOS17 (spec 8), promised iOS16"]


def test_files_outside_the_matrix_are_listed_with_the_reason(tmp_path):
    """Files no runtime build of the matrix loads (Core AI, ExecuTorch's Core ML delegate) are
    named in the report with why, never left out silently; no environment is built for them."""
    from pipeline.manifest import ArtifactRecord, Manifest
    from validation.compat.text import compat_html, compat_markdown

    folder = tmp_path / "out" / "coreai"
    asset = folder / "image_encoder_fp32.aimodel"
    asset.mkdir(parents=True)
    (asset / "main.mlirb").write_bytes(b"program")
    record = ArtifactRecord.describe_file(
        asset, folder, part="image_encoder", target="coreai", precision="fp32", contract={}
    )
    Manifest(
        target="coreai",
        weights={"model_type": "vit_t", "seed": 0},
        config={"num_points": 5},
        tool_versions={},
        artifacts=(record,),
    ).write(folder)
    report = build_matrix(tmp_path / "out", [runtime_spec(name) for name in QUICK_RUNTIMES])
    assert report.runtimes == () and report.cells == ()
    (not_run,) = report.not_run
    assert (not_run.target, not_run.file) == ("coreai", "image_encoder_fp32.aimodel") and "Core AI" in not_run.reason
    assert "coreai image_encoder_fp32.aimodel: one Core AI runtime build" in compat_markdown(report)
    assert "Not in the matrix" in compat_html(report)
    write_report(tmp_path / "out", report)
    assert read_report(tmp_path / "out") == report  # compat.json reads back as the same typed record


def test_gpu_delegate_findings_fail_only_the_gpu_files():
    """An fp32 or fp16 `.tflite` with an op the GPU delegate cannot run fails the compat gate; an
    int8 one is reported, not gated; an analyzer that could not be installed is said in its row
    (as an uninstallable runtime build is), never a pass."""
    from validation.compat.matrix import CompatReport, GpuDelegateCheck
    from validation.compat.text import compat_markdown

    def check(precision: str, verdict: str, issues: tuple[str, ...] = ()) -> GpuDelegateCheck:
        return GpuDelegateCheck(
            "tflite", f"image_encoder_{precision}.tflite", "image_encoder", precision, "tf", issues, verdict
        )

    gather = ("Op#41 GATHER_ND: Not supported op GATHER_ND",)
    report = CompatReport((), (), gpu=(check("fp32", "all ops"), check("int8", "1 ops not", gather)))
    assert report.gate_failures() == []
    report = CompatReport((), (), gpu=(check("fp16", "1 ops not", gather), check("fp32", "unavailable: no pip")))
    failures = report.gate_failures()
    assert len(failures) == 1 and "image_encoder_fp16.tflite: 1 ops not" in failures[0] and "GATHER_ND" in failures[0]
    assert "| unavailable: no pip |" in compat_markdown(report)


LITERTJS = "litertjs-2.5.3-webgpu"


def _needs_a_browser() -> None:
    missing = [tool for tool in ("node", "npm", "chromium") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"LiteRT.js runs in Chromium from Node: {', '.join(missing)} missing (.ci/run installs them)")


def test_litertjs_runs_the_gpu_ready_files_entirely_on_webgpu(tflite_converted, tmp_path):
    """LiteRT.js on WebGPU in headless Chromium (SwiftShader, WebGPU's default 8192-texel texture
    limit): the shipped fp32 decoder and batched decoder (B = 4: four prompts' values were a
    texture four times over the limit before `weighted_values_in_prompt_blocks`) run with every op
    on WebGPU and pass their self-test vectors, and the cell says where they ran; the int8 decoder,
    which the WebGPU delegate gives up on, is refused and its cell says why. (The encoder, whose
    shapes `test_gpu_ready` checks, takes minutes on SwiftShader: `nox -s compat` runs it.)"""
    _needs_a_browser()
    out = tmp_path / "out"
    shutil.copytree(Path(tflite_converted).parent, out / "tflite")
    manifest_path = out / "tflite" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    passing, refused = ("prompt_decoder_fp32.tflite", "prompt_decoder_b4_fp32.tflite"), "prompt_decoder_int8.tflite"
    raw["artifacts"] = [item for item in raw["artifacts"] if item["file"] in (*passing, refused)]
    manifest_path.write_text(json.dumps(raw))

    report = build_matrix(out, [runtime_spec(LITERTJS)])
    cells = {c.file: c for c in report.cells}
    assert set(cells) == {*passing, refused}
    for file in passing:
        assert cells[file].verdict == "pass", cells[file]
        assert "all ops on WebGPU" in cells[file].detail and "swiftshader" in cells[file].detail, cells[file].detail
    assert cells[refused].verdict == "refused" and "Failed to create" in cells[refused].detail, cells[refused]
    assert "DEQUANTIZE" in cells[refused].detail, cells[refused].detail
    assert report.runtimes[0].version == "2.5.3"


class _Applied(torch.nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.function(*inputs)


def _run_in_litertjs(function, inputs: tuple[torch.Tensor, ...], folder: Path) -> tuple[float, dict]:
    """`function` converted to a float `.tflite` and run once in LiteRT.js on WebGPU by the compat
    worker: its largest difference from PyTorch, and the worker's status (its note says where the
    graph ran and the WebGPU errors the browser logged)."""
    import subprocess

    from ai_edge_litert.interpreter import Interpreter

    from validation.compat.matrix import WORKER
    from validation.compat.runtimes import environment_python

    folder.mkdir()
    with torch.no_grad():
        expected = function(*inputs).numpy()
    model = folder / "model.tflite"
    model.write_bytes(_float_tflite(_Applied(function).eval(), *inputs))
    names = list(Interpreter(model_path=str(model)).get_signature_runner("serving_default").get_input_details())
    feeds, answers = folder / "in.npz", folder / "out.npz"
    np.savez(feeds, **{f"case0.{name}": value.numpy() for name, value in zip(names, inputs, strict=True)})
    python = environment_python(runtime_spec(LITERTJS))
    command = [str(python), str(WORKER), "--loader", "litertjs_webgpu", "--model", str(model)]
    done = subprocess.run([*command, "--inputs", str(feeds), "--outputs", str(answers)], capture_output=True, text=True)
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status["status"] == "ok", status
    with np.load(answers) as archive:
        return float(np.abs(archive[archive.files[0]].reshape(expected.shape) - expected).max()), status


def _no_webgpu_errors(status: dict) -> bool:
    return "all ops on WebGPU" in status["note"] and "WebGPU errors" not in status["note"]


def test_litertjs_answers_wrong_past_the_texture_limit_and_the_blocks_fix_it(tmp_path):
    """Why the decoders take their masks in column blocks: in LiteRT.js on an adapter with
    WebGPU's default texture limit, a 4 x 32 @ 32 x 65536 product (the single-prompt decoder's
    mask product) logs a validation error and returns wrong values with no error; the same
    product in `mask_product_in_column_blocks` is right."""
    from mobile_targets.tflite.gpu_ready import mask_product_in_column_blocks

    _needs_a_browser()
    torch.manual_seed(0)
    inputs = (torch.randn(1, 4, 32), torch.randn(1, 32, 65536))
    error, status = _run_in_litertjs(torch.matmul, inputs, tmp_path / "whole")
    assert error > 1.0 and "over the adapter's limit" in status["note"], (error, status)
    error, status = _run_in_litertjs(mask_product_in_column_blocks, inputs, tmp_path / "blocks")
    assert error < 1e-4 and _no_webgpu_errors(status), (error, status)


def test_litertjs_answers_wrong_past_the_dispatch_limit_and_prompt_blocks_fix_it(tmp_path):
    """Why the batched decoder's image-token norms run in blocks of prompts: in LiteRT.js a
    LayerNorm over 16 prompts' 4096 image tokens dispatches 65536 workgroups, over WebGPU's
    default 65535 a dimension, and answers wrong with no error (the b64 decoders did, mask IoU
    0.21); `LayerNormInPromptBlocks` is right."""
    from mobile_targets.tflite.gpu_ready import LayerNormInPromptBlocks

    _needs_a_browser()
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(256)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    inputs = (torch.randn(16, 4096, 256),)
    error, status = _run_in_litertjs(norm, inputs, tmp_path / "whole")
    assert error > 0.1 and "exceeds max compute workgroups per dimension" in status["note"], (error, status)
    error, status = _run_in_litertjs(LayerNormInPromptBlocks(norm), inputs, tmp_path / "blocks")
    assert error < 1e-4 and _no_webgpu_errors(status), (error, status)
