"""fp16 headroom (pipeline.fp16_range): every op's largest output, measured in fp32 on the
calibration photos before a file that computes in fp16 is made; ops under the margin are kept in
fp32 (Core ML) or the conversion stops with one line naming the op (TFLite)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobile_targets import get_target
from mobile_targets.convert import build_parts, convert_parts, fp16_ranges, pytorch_outputs
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.datasets import CocoPhotos
from pipeline.errors import ArtifactError
from pipeline.export_wrappers import exported_program
from pipeline.fp16_range import FP16_MAX, SAFE_MARGIN, TIGHTEST_SHOWN, measure_fp16_headroom, with_readers
from pipeline.manifest import read_manifest
from pipeline.metrics import psnr_db
from validation.schema import ArtifactResult, Fp16HeadroomResult, Report, RunResult
from validation.text_report import headroom_rows, summary_markdown

SCALED = "mask_decoder.transformer.layers.0.mlp.lin2"
"""The layer the overflow checkpoint scales: the first two-way block's MLP output, whose sum with the
queries goes straight into a LayerNorm (as a trained layer with large activations would)."""
SCALE = 1.0e5


class _GrowThenNormalize(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grow = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.grow(x)) * 2.0


def test_headroom_names_the_op_past_the_margin_and_the_ops_that_read_it():
    """On a small module: the linear layer's largest output is measured exactly over the samples, it
    alone is under the margin (the LayerNorm's output is small), the LayerNorm is kept in fp32 with it,
    and the message is one line naming the module and the value."""
    torch.manual_seed(0)
    module = _GrowThenNormalize().eval()
    with torch.no_grad():
        module.grow.weight.mul_(1e5)
    samples = [{"x": np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32)} for i in range(3)]
    program = exported_program(module, (torch.from_numpy(samples[0]["x"]),))
    headroom = measure_fp16_headroom(program, ["x"], samples)
    with torch.no_grad():
        largest = max(float(module.grow(torch.from_numpy(s["x"])).abs().max()) for s in samples)
    assert largest > FP16_MAX
    (worst,) = headroom.below_margin
    assert (worst.module, worst.op) == ("grow", "aten.linear.default")
    assert worst.max_abs == pytest.approx(largest, rel=1e-6)
    assert worst.headroom == pytest.approx(FP16_MAX / largest, rel=1e-6) and not headroom.holds
    assert headroom.photos == 3 and headroom.tightest[0] == worst
    assert [layer.max_abs for layer in headroom.tightest] == sorted(
        (la.max_abs for la in headroom.tightest), reverse=True
    )
    norm = next(node.name for node in program.graph.nodes if "layer_norm" in str(node.target))
    assert with_readers(program, [worst.node]) == {worst.node, norm}
    message = headroom.overflow_message("tiny_part", "fp16")
    assert "\n" not in message and "in grow" in message and f"{largest:.4g}" in message and "65504" in message

    result = Fp16HeadroomResult.of(headroom)  # what validate's report shows
    assert result.under_margin == 1 and result.tightest[0].op == "aten.linear.default in grow"
    artifact = ArtifactResult("coreml", "tiny_part", "fp16", "tiny.mlpackage", 1, fp16_headroom=result)
    report = Report({}, "none", False, {}, runs=[RunResult("m.json", "coreml", artifacts=[artifact])])
    (row,) = headroom_rows(report)
    assert row[0] == "coreml tiny_part fp16" and row[2] == f"{largest:.4g}" and row[4] == "1"
    assert "## fp16 headroom" in summary_markdown(report)


def test_default_fp16_files_record_their_headroom(tflite_converted):
    """The seeded model's fp16 TFLite files were measured before conversion: the tightest ops are in
    the manifest, none under the margin; files that compute in fp32 carry no such record."""
    manifest = read_manifest(tflite_converted)
    for record in manifest.artifacts:
        measured = record.details.fp16_headroom
        if record.precision != "fp16":
            assert measured is None, record.file
            continue
        assert measured.holds and measured.margin == SAFE_MARGIN and not measured.kept_fp32, record.file
        assert len(measured.tightest) == TIGHTEST_SHOWN and measured.photos >= 4 and measured.ops_measured > 100


@pytest.fixture(scope="module")
def overflowing_decoder(upstream_mobile_sam, tmp_path_factory):
    """A checkpoint in the official layout whose SCALED layer is multiplied by SCALE, and its prompt
    decoder part as the convert stage makes it."""
    state = {key: value.clone() for key, value in upstream_mobile_sam[1].items()}
    for name in ("weight", "bias"):
        state[f"{SCALED}.{name}"] *= SCALE
    path = tmp_path_factory.mktemp("overflow") / "mobile_sam.pt"
    torch.save(state, path)
    sam, weights = load_model("vit_t", path)
    config = RunConfig(checkpoint=path, batch_prompts=0, precisions=("fp16",))
    decoder = build_parts(config, sam, CocoPhotos.sample("calibration"))[1]
    return config, weights, decoder


@pytest.mark.slow
def test_overflowing_layer_stays_fp32_in_core_ml_and_stops_tflite(overflowing_decoder, tmp_path):
    """The scaled layer's output passes fp16's range on the calibration photos. Converted to Core ML
    fp16 as before (every op fp16) the file answers garbage; the convert stage keeps that op and the
    ones reading it in fp32 and the file passes its gate; TFLite, whose fp16 file is all fp16 on the
    GPU delegate, is not made, with one line naming the layer and the value."""
    config, weights, decoder = overflowing_decoder
    headroom, _ = fp16_ranges(decoder)
    first = headroom.below_margin[0]  # where the values leave fp16's range, in graph order
    assert first.module.endswith("layers.0.mlp.lin2") and first.op == "aten.linear.default", first
    assert first.max_abs > FP16_MAX and headroom.tightest[0].max_abs >= first.max_abs

    coreml = get_target("coreml")
    unguarded = tmp_path / "every_op_fp16.mlpackage"
    coreml.convert_part(decoder, "fp16", unguarded)
    inputs = dict(zip(decoder.contract.input_names, (t.numpy() for t in decoder.example_inputs), strict=True))
    expected = pytorch_outputs(decoder)["low_res_masks"]
    garbage = coreml.load_runner(unguarded, decoder.contract).run(inputs)["low_res_masks"]
    assert not np.isfinite(garbage).all() or psnr_db(expected, garbage) < 20

    (tmp_path / "coreml").mkdir()
    manifest_path = convert_parts(coreml, config, [decoder], ["fp16"], weights, tmp_path / "coreml")
    (record,) = read_manifest(manifest_path).artifacts
    recorded = record.details.fp16_headroom
    assert recorded.below_margin[0] == first and first.node in recorded.kept_fp32
    assert len(recorded.kept_fp32) > len(recorded.below_margin)  # the LayerNorm that reads the sum, too
    gate_psnr = min(output.psnr_db for output in record.details.gate.values())
    assert gate_psnr > 30
    every_op_fp16 = psnr_db(expected, garbage) if np.isfinite(garbage).all() else float("nan")
    print(
        f"{first.describe()}: every op fp16 -> {every_op_fp16:.1f} dB ({np.isfinite(garbage).mean():.3f} finite); "
        f"{len(recorded.kept_fp32)} ops kept fp32 -> gate {gate_psnr:.1f} dB"
    )

    (tmp_path / "tflite").mkdir()
    with pytest.raises(ArtifactError) as info:
        convert_parts(get_target("tflite"), config, [decoder], ["fp16"], weights, tmp_path / "tflite")
    message = str(info.value)
    assert "\n" not in message and "layers.0.mlp.lin2" in message and f"{first.max_abs:.4g}" in message
    assert not list((tmp_path / "tflite").glob("*.tflite"))
    (failure,) = read_manifest(tmp_path / "tflite" / "manifest.json").failures
    assert "fp16" in failure.error and "layers.0.mlp.lin2" in failure.error
