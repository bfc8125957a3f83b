"""The `.tflite` graph patches for LiteRT's GPU delegate: each exact against the graph it replaces
(the full architecture, real photos, every self-test prompt), and the analyzer that proves the
delegate takes every op able to say it does not."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from mobile_targets.convert import build_parts
from mobile_targets.tflite.gpu_ready import (
    LayerNormInPromptBlocks,
    gpu_ready,
    mask_product_in_column_blocks,
    tiled_by_concatenation,
)
from pipeline.config import RunConfig
from pipeline.processing import prepare_image


@pytest.fixture(scope="module")
def parts(our_model, photos):
    """The export wrappers of the checkpoint's model: encoder, decoder, batched decoder (B = 4)."""
    return build_parts(RunConfig(batch_prompts=4), our_model, photos)


def test_gpu_ready_encoder_is_bit_exact(parts, photos):
    encoder = parts[0].module
    image = torch.from_numpy(prepare_image(photos.image(photos.image_ids()[9])).image)
    with torch.no_grad():
        assert torch.equal(gpu_ready(encoder)(image), encoder(image))


def test_gpu_ready_decoders_are_bit_exact(parts):
    for part in parts[1:]:
        patched = gpu_ready(part.module)
        for case in part.selftest:
            inputs = [torch.from_numpy(case.inputs[name]) for name in part.contract.input_names]
            with torch.no_grad():
                expected, actual = part.module(*inputs), patched(*inputs)
            assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True)), (part.name, case.kind)


def test_tiling_and_mask_blocks_are_exact_for_any_size():
    """A power of two of copies, and a count that leaves a remainder; a mask product whose columns
    are not a multiple of the block; a norm whose prompts are not a multiple of the block."""
    part = torch.randn(5, 1, 3)
    for times in (1, 2, 8, 13):
        assert torch.equal(tiled_by_concatenation(part, times, dim=1), part.repeat(1, times, 1))
    hyper, upscaled = torch.randn(2, 4, 32), torch.randn(2, 32, 40000)
    assert torch.allclose(mask_product_in_column_blocks(hyper, upscaled), hyper @ upscaled, rtol=0, atol=1e-5)
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(norm.weight)
    rows = torch.randn(20, 4096, 8)  # blocks of 15 prompts and 5
    with torch.no_grad():
        assert torch.equal(LayerNormInPromptBlocks(norm)(rows), norm(rows))


def _webgpu_rule_breaches(path) -> list[str]:
    """What LiteRT's WebGPU delegate names when it refuses an op, read off the file: a tensor of
    more than 4 dimensions, a BATCH_MATMUL with a constant operand."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    breaches = [f"tensor {t.name.decode()} is {len(t.shape)}-D" for t in graph.tensors if len(t.shape) > 4]
    for index, op in enumerate(graph.operators):
        code = model.operatorCodes[op.opcodeIndex]
        kind = str(tfl_flatbuffer_utils.TFL_OP_CODE_TO_NAME.get(max(code.builtinCode, code.deprecatedBuiltinCode)))
        constant = [t for t in op.inputs if t >= 0 and model.buffers[graph.tensors[t].buffer].data is not None]
        if kind.endswith("BATCH_MATMUL") and any(len(model.buffers[graph.tensors[t].buffer].data) for t in constant):
            breaches.append(f"op {index} BATCH_MATMUL has a constant operand")
    return breaches


def test_gpu_ready_files_meet_the_webgpu_delegates_rules(tflite_converted):
    """Every fp32 and fp16 file the convert stage ships: no op LiteRT.js's WebGPU delegate refuses
    by its shape rules (what `validation.compat`'s LiteRT.js column runs)."""
    from pipeline.manifest import read_manifest

    folder = tflite_converted.parent
    files = [r.file for r in read_manifest(tflite_converted).artifacts if r.precision in ("fp32", "fp16")]
    assert files
    assert {file: _webgpu_rule_breaches(folder / file) for file in files} == {file: [] for file in files}


@pytest.mark.slow
def test_gpu_analyzer_names_the_ops_the_delegate_cannot_run(tmp_path):
    """TensorFlow 2.16's analyzer (in its own environment) on a graph with a 2-D SLICE and the
    index_select that litert-torch lowers to GATHER_ND (the compact bias gathers' form): both
    named, with the op each warning belongs to."""
    import litert_torch

    from validation.compat.matrix import GPU_ANALYZER, GPU_ANALYZER_SCRIPT
    from validation.compat.runtimes import environment_python, runtime_spec

    class SliceAndGather(torch.nn.Module):
        def forward(self, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            return rows[:1, :3].sum() + torch.index_select(table, 1, torch.tensor([2, 0, 1, 1]))

    path = tmp_path / "slice_gather.tflite"
    sample = (torch.randn(2, 5), torch.randn(2, 3, 4))
    path.write_bytes(bytes(litert_torch.convert(SliceAndGather().eval(), sample).model_content()))
    python = environment_python(runtime_spec(GPU_ANALYZER))
    done = subprocess.run([str(python), str(GPU_ANALYZER_SCRIPT), str(path)], capture_output=True, text=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert not result["compatible"] and result["version"] == "2.16.2"
    assert any("SLICE" in issue and "2 dimensional" in issue for issue in result["issues"]), result
    assert any(issue.startswith("Op#") and "GATHER_ND" in issue for issue in result["issues"]), result
