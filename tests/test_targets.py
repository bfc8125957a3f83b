"""Each target end to end: convert the full MobileSAM, run the files in the target's real runtime
(ExecuTorch's runtime, the LiteRT interpreter), compare with the PyTorch reference on real
photos, and reject broken files with one line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mobile_targets import get_target
from mobile_targets.convert import convert_target, example_prompts
from pipeline.config import DEFAULT_PRECISIONS, RunConfig
from pipeline.contract import BATCHED_DECODER, DECODER, ENCODER, decoder_contract, encoder_contract
from pipeline.errors import ArtifactError
from pipeline.manifest import read_manifest, verify_artifact
from pipeline.metrics import mask_iou, psnr_db
from pipeline.predictor import ReferencePredictor, Segmenter
from pipeline.processing import prompt_to_decoder_inputs
from pipeline.segment_everything import match_masks, reference_generator
from tests.conftest import TARGET_CONVERSIONS, TFLITE_BATCH
from validation.gates import DEFAULT_GATES

TARGETS = ("executorch", "tflite", "executorch_coreml")
EXTENSIONS = {"executorch": ".pte", "tflite": ".tflite", "executorch_coreml": ".pte"}
# (target, precision, min embedding PSNR dB, min mask IoU vs PyTorch): the validate stage's own
# gates, so a file these tests pass is a file validate passes.
AGREEMENT = [
    (target, precision, DEFAULT_GATES[precision].embeddings_psnr_db, DEFAULT_GATES[precision].mask_iou_min)
    for target, precision in (
        ("executorch", "fp32"),
        ("executorch", "int8"),
        ("tflite", "fp32"),
        ("tflite", "fp16"),
        ("tflite", "int8"),
        ("executorch_coreml", "fp32"),
        ("executorch_coreml", "fp16"),
    )
]


def default_precisions(target) -> tuple[str, ...]:
    """What a convert session makes without --precisions (w8a8 is made on request, and tested alone)."""
    return tuple(p for p in target.precisions if p in DEFAULT_PRECISIONS)


@pytest.fixture(scope="module", params=TARGETS)
def converted(request, tmp_path_factory, official_checkpoint):
    if request.param in TARGET_CONVERSIONS:  # converted once for the session: test_validation uses them too
        manifest_path = request.getfixturevalue(TARGET_CONVERSIONS[request.param])
        return manifest_path, read_manifest(manifest_path)
    target = get_target(request.param)
    config = RunConfig(
        checkpoint=official_checkpoint,
        precisions=default_precisions(target),
        out_dir=tmp_path_factory.mktemp("artifacts"),
        batch_prompts=BATCH,
    )
    manifest_path = convert_target(request.param, config)
    return manifest_path, read_manifest(manifest_path)


def test_manifest_lists_every_part_and_precision(converted):
    manifest_path, manifest = converted
    target = get_target(manifest.target)
    found = {(a.part, a.precision) for a in manifest.artifacts}
    assert found == {(p, q) for p in (ENCODER, DECODER, BATCHED_DECODER) for q in default_precisions(target)}
    assert (manifest_path.parent / f"prompt_decoder_b{BATCH}_fp32{EXTENSIONS[manifest.target]}").is_file()
    assert not manifest.random_weights and manifest.weights.sha256
    for record in manifest.artifacts:
        assert verify_artifact(manifest_path, record).suffix == EXTENSIONS[manifest.target]
        assert record.contract["part"] == record.part
        assert record.details.conversion_seconds > 0 and record.details.gate
        if manifest.target == "executorch":
            assert record.details.model_extra["xnnpack_delegated_nodes"] > 0


def test_fp32_files_are_the_size_of_their_parameters(converted, our_model):
    """Non-zero bias tables (the checkpoint's) stay compact and the decoder's image positional
    encoding is not stored: an expanded bias table adds 4.9 MB, a stored encoding 4.2 MB."""
    _, manifest = converted
    encoder_parameters = sum(p.numel() for n, p in our_model.image_encoder.named_parameters() if "head" not in n)
    decoder_parameters = sum(
        p.numel() for p in [*our_model.prompt_encoder.parameters(), *our_model.mask_decoder.parameters()]
    )
    assert any(
        m.attention_biases.abs().min() > 0 for m in our_model.image_encoder.modules() if hasattr(m, "attention_biases")
    )
    sizes = {(a.part, a.precision): a.bytes for a in manifest.artifacts}
    assert sizes[ENCODER, "fp32"] < 4 * encoder_parameters + 1.0e6
    assert sizes[DECODER, "fp32"] < 4 * decoder_parameters + 1.0e6


SIZE_GOALS_MB = {(ENCODER, "fp16"): 12.0, (ENCODER, "int8"): 7.0, (DECODER, "fp32"): 17.0}
"""Issue #13's size goals (MB = 10^6 bytes), for every target that makes the file."""


def test_files_meet_the_size_goals(converted, tmp_path):
    """With the checkpoint's weights (non-zero biases, no two tensors alike); an ExecuTorch Core ML
    payload holds the package and its metadata, not the delegate's debug maps (0.65 MB of the
    fp16 encoder)."""
    from executorch.examples.apple.coreml.scripts.extract_coreml_models import extract_coreml_models

    manifest_path, manifest = converted
    sizes = {(a.part, a.precision): a.bytes for a in manifest.artifacts}
    for (part, precision), limit in SIZE_GOALS_MB.items():
        if (part, precision) in sizes:
            assert sizes[part, precision] <= limit * 1e6, (part, precision, sizes[part, precision])
    if manifest.target == "executorch_coreml":
        record = next(a for a in manifest.artifacts if a.part == ENCODER and a.precision == "fp16")
        (payload,) = extract_coreml_models(verify_artifact(manifest_path, record).read_bytes(), str(tmp_path))
        files = {path.name for path in payload.rglob("*") if path.is_file()}
        assert "metadata.json" in files and "model.mlmodel" in files
        assert not files & {"debug_info.json", "executorch_debug_handle_mapping.json"}, files


BATCH = TFLITE_BATCH
"""B of the batched decoder in these tests (the default, 64, only costs time here)."""
EVERYTHING_OPTIONS = ({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}, {})


def _load(manifest_path, manifest, part, precision):
    record = next(a for a in manifest.artifacts if a.part == part and a.precision == precision)
    contract = encoder_contract() if part == "image_encoder" else decoder_contract(5)
    return get_target(manifest.target).load_runner(verify_artifact(manifest_path, record), contract, threads=2)


def test_runtime_agrees_with_pytorch_on_real_photos(converted, our_model, photos):
    manifest_path, manifest = converted
    for target, precision, min_psnr, min_iou in AGREEMENT:
        if target == manifest.target:
            _check_agreement(manifest_path, manifest, our_model, photos, precision, min_psnr, min_iou)


def _check_agreement(manifest_path, manifest, our_model, photos, precision, min_psnr, min_iou):
    encoder = _load(manifest_path, manifest, "image_encoder", precision)
    decoder = _load(manifest_path, manifest, "prompt_decoder", precision)
    reference = ReferencePredictor(our_model)
    deployed = Segmenter(decoder, encoder)  # the files end to end, as an app runs them
    ious = []
    for image_id in photos.image_ids()[10:12]:
        image = photos.image(image_id)
        expected_embeddings = reference.set_image(image)
        assert psnr_db(expected_embeddings, deployed.set_image(image)) > min_psnr
        for prompt in example_prompts(photos, image_id, image.shape, count=3):
            expected = reference.predict(prompt, multimask_output=False)
            ious.append(mask_iou(expected.mask, deployed.predict(prompt, multimask_output=False).mask))
    print(f"{manifest.target} {precision}: mask IoU vs PyTorch min {min(ious):.4f} mean {np.mean(ious):.4f}")
    assert min(ious) >= min_iou


def test_corrupt_and_truncated_files_fail_with_one_line(converted, tmp_path):
    manifest_path, manifest = converted
    record = next(a for a in manifest.artifacts if a.part == "prompt_decoder" and a.precision == "fp32")
    data = verify_artifact(manifest_path, record).read_bytes()
    target = get_target(manifest.target)
    suffix = EXTENSIONS[manifest.target]
    cases = {
        f"truncated{suffix}": data[: len(data) // 3],
        f"garbage{suffix}": b"not a program at all" * 10,
        f"flipped{suffix}": data[:8] + bytes(b ^ 0xFF for b in data[8:4096]) + data[4096:],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ArtifactError) as info:
            target.load_runner(path, decoder_contract(5))
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_outputs_are_the_callers_and_survive_the_next_call(converted):
    """The ExecuTorch runner skips the pybindings' clone (see ExecuTorchRunner.run): what one call
    returns must stay as it was after the next call, and equal a fresh run of the same inputs."""
    manifest_path, manifest = converted
    decoder = _load(manifest_path, manifest, "prompt_decoder", "fp32")
    rng = np.random.default_rng(0)

    def random_inputs() -> dict[str, np.ndarray]:
        inputs = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in decoder.contract.inputs}
        inputs["point_coords"] = rng.uniform(0, 1024, inputs["point_coords"].shape).astype(np.float32)
        inputs["point_labels"] = np.ones_like(inputs["point_labels"])
        inputs["has_mask_input"] = np.zeros_like(inputs["has_mask_input"])
        return inputs

    first_inputs, second_inputs = random_inputs(), random_inputs()
    first = decoder.run(first_inputs)
    kept = {name: value.copy() for name, value in first.items()}
    second = decoder.run(second_inputs)
    for name, value in first.items():
        np.testing.assert_array_equal(value, kept[name])
        assert not np.array_equal(value, second[name]), name
        np.testing.assert_array_equal(decoder.run(first_inputs)[name], kept[name])


def test_refinement_in_the_runtime_matches_sam_predictor(converted, our_model, photos):
    """The fp32 decoder file, given SamPredictor's previous low-res mask (has_mask_input = 1),
    gives SamPredictor's refined mask in the target's own runtime."""
    from segment_anything import SamPredictor

    manifest_path, manifest = converted
    decoder = _load(manifest_path, manifest, "prompt_decoder", "fp32")
    image_id = photos.image_ids()[12]
    image = photos.image(image_id)
    sam_predictor = SamPredictor(our_model)
    sam_predictor.set_image(image)
    embeddings = sam_predictor.get_image_embedding().numpy()
    for prompt in example_prompts(photos, image_id, image.shape, count=2):
        _, scores, first = sam_predictor.predict(prompt.points, prompt.labels, prompt.box, multimask_output=True)
        previous = first[int(np.argmax(scores))]
        _, refined_scores, refined = sam_predictor.predict(
            prompt.points,
            prompt.labels,
            prompt.box,
            mask_input=previous[None],
            multimask_output=False,
            return_logits=True,
        )
        refinement = type(prompt)(points=prompt.points, labels=prompt.labels, box=prompt.box, mask_input=previous)
        inputs = prompt_to_decoder_inputs(refinement, image.shape[:2])
        outputs = decoder.run({"image_embeddings": embeddings, **inputs})
        assert np.abs(outputs["low_res_masks"][0, :1] - refined).max() < 1e-3
        np.testing.assert_allclose(outputs["iou_predictions"][0, :1], refined_scores, atol=1e-4)


@pytest.mark.parametrize("options", EVERYTHING_OPTIONS, ids=["zero-thresholds-no-nms", "defaults"])
def test_fp32_files_segment_everything_like_sam(converted, our_model, photos, options):
    """The fp32 encoder file and batched decoder file, run as segment-anything's automatic mask
    generator in the target's runtime, give SamAutomaticMaskGenerator's masks on the PyTorch model."""
    from validation.segment_everything import file_generator

    manifest_path, manifest = converted
    image = photos.image(photos.image_ids()[11])
    generator = file_generator(manifest_path, manifest, "fp32", "fp32", 2, points_per_side=4, **options)
    ours = generator.generate(image)
    reference = reference_generator(our_model, points_per_side=4, **options).generate(image)
    match = match_masks(reference, ours)
    print(f"{manifest.target}: {match.to_json()}")
    assert match.reproduced, match.to_json()
    assert generator.predictor.times.decoder_calls == 16 // BATCH  # 16 grid points, B at a time
    if options:
        assert len(reference) >= 20  # nothing filtered: the comparison sees every mask


def test_every_file_passes_its_self_test_vectors(converted):
    """The vectors written beside each file pass in the target's own runtime."""
    from validation.selftest import selftest_folder

    manifest_path, manifest = converted
    outcomes = selftest_folder(manifest_path.parent.parent)
    assert len(outcomes) == len(manifest.artifacts)
    assert all(o.passed for o in outcomes), [o for o in outcomes if not o.passed]


def test_benchmark_times_every_file_in_ratios(converted):
    """The benchmark session's measurements on real files: every file timed, floors and baselines
    measured, ratios written, the point sweep converting decoders at another N, the runtime's own
    GEMM rates (fp32 and int8) where files are timed, for ExecuTorch and TFLite a per-op profile
    of each encoder (ETDump; LiteRT's profiler) whose ops add up to no more than the whole call,
    and for TFLite which ops XNNPACK takes."""
    from validation.benchmark.measure import run_benchmark
    from validation.benchmark.report import write_benchmark

    manifest_path, manifest = converted
    out = manifest_path.parent.parent
    sweep = [3] if manifest.target == "executorch" else []
    result = run_benchmark(out, threads=[1], warmup=0, runs=1, points=sweep, sweep_precisions=["fp32"])
    assert {(a.part, a.precision) for a in result.artifacts} == {(a.part, a.precision) for a in manifest.artifacts}
    for artifact in result.artifacts:
        assert artifact.error is None
        if get_target(manifest.target).emulation_note():  # Core ML payloads run emulated off Apple: not timed
            assert artifact.not_timed and not artifact.timings
        else:
            assert len(artifact.timings) == 1 and artifact.timings[0].median_s > 0
    floor = result.floor(1)
    assert floor is not None and floor.fp32_floor_s > 0 and floor.int8_floor_s > 0
    assert result.baseline("pytorch", "image_encoder", 1) is not None
    data = result.to_json()
    encoder_rows = [a for a in data["artifacts"] if a["part"] == "image_encoder" and a["timings"]]
    assert all(row["timings"][0]["vs_fp32_floor"] > 0 and row["timings"][0]["vs_pytorch"] > 0 for row in encoder_rows)
    if manifest.target == "executorch":
        assert {(p.runtime, p.num_points) for p in result.sweep if p.timing} == {("pytorch", 3), ("executorch", 3)}
    if manifest.target in ("executorch", "tflite"):
        encoders = {a.file for a in manifest.artifacts if a.part == "image_encoder"}
        assert {Path(p.file).name for p in result.profiles} == encoders
        for profile in result.profiles:
            assert profile.error is None and profile.total_ms > 0
            kernels = {op.kernel for op in profile.ops}
            fp16_arithmetic = profile.precision == "fp16" and manifest.target == "tflite"
            assert ("xnnpack fp16" if fp16_arithmetic else "xnnpack fp32") in kernels
            assert sum(op.ms for op in profile.ops) <= 1.05 * profile.total_ms  # nothing counted twice
            if manifest.target == "tflite":  # the GPU-ready graph has no op XNNPACK leaves to LiteRT
                assert not [op.name for op in profile.ops if op.kernel == "outside xnnpack"]
        int8 = next(p for p in result.profiles if p.precision == "int8")
        assert "xnnpack int8" in {op.kernel for op in int8.ops}
    else:
        assert not result.profiles
    if manifest.target == "tflite":
        assert {Path(c.file).name for c in result.delegation} == {a.file for a in manifest.artifacts}
        for census in result.delegation:
            assert census.error is None and sum(census.delegated.values()) > 100
            if "image_encoder" in census.file:  # only the relative-position bias gathers stay out of XNNPACK
                assert set(census.outside) <= {"GATHER_ND"}, census.outside
    timed = not get_target(manifest.target).emulation_note()
    assert all(rate.error is None and rate.gops_per_s > 0 for rate in result.gemm_rates), result.gemm_rates
    expected_rates = {(manifest.target, precision) for precision in ("fp32", "int8")} if timed else set()
    assert {(rate.target, rate.precision) for rate in result.gemm_rates} == expected_rates
    written = write_benchmark(result, out)
    assert [p.name for p in written] == ["benchmark.json", "benchmark.md", "benchmark.png"]
    text = written[1].read_text()
    assert all(Path(a.file).name in text for a in result.artifacts)
    assert ("## TFLite: ops XNNPACK takes" in text) == (manifest.target == "tflite")
    assert ("## What the runtimes' own GEMMs reach" in text) == timed


def test_int8_encoders_compute_stage_0_in_int8(tflite_converted):
    """The int8 recipes' convolutions: in TFLite the MBConvs' four 1x1 and the neck's two carry
    int8 weights (dynamic range), the others not; in ExecuTorch an MBConv's two 1x1 convolutions
    are quantized and its depthwise one and a convolution outside any MBConv are not."""
    import functools

    import torch
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from timm.models.tiny_vit import MBConv

    from mobile_targets.base import PartToConvert
    from mobile_targets.executorch_target import _quantize_int8, graph_for_xnnpack

    interpreter = Interpreter(
        model_path=str(tflite_converted.parent / "image_encoder_int8.tflite"),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    int8_weights = [
        tuple(int(d) for d in tensors[op["inputs"][1]]["shape"])
        for op in interpreter._get_ops_details()
        if op["op_name"] == "CONV_2D" and tensors[op["inputs"][1]]["dtype"] == np.int8
    ]
    mbconv = [(256, 1, 1, 64), (64, 1, 1, 256)] * 2
    assert int8_weights == [*mbconv, (256, 1, 1, 320), (256, 3, 3, 256)]

    module = torch.nn.Sequential(MBConv(8, 8, 4.0, torch.nn.GELU, 0.0), torch.nn.Conv2d(8, 8, 1)).eval()
    example = (torch.randn(1, 8, 16, 16),)
    quantized = _quantize_int8(PartToConvert(graph_for_xnnpack(module), None, example))
    weight_shapes = [
        tuple(functools.reduce(getattr, node.args[0].target.split("."), quantized).shape)
        for node in quantized.graph.nodes
        if "dequantize_per_channel" in str(node.target)
    ]
    assert sorted(weight_shapes) == [(8, 32, 1, 1), (32, 8, 1, 1)]


def test_tflite_w8a8_attention_is_full_integer(tmp_path):
    """The w8a8 recipe on one TinyViT attention block (the whole encoder's w8a8 file takes minutes
    to convert here; validate measures it, docs/tflite.md): the patched attention gives
    softmax attention's answer in fp32, every op of the quantized file between its boundary
    QUANTIZE and DEQUANTIZE works on integer tensors, and its answer on an input it was not
    calibrated on stays close to the float one."""
    import torch
    from ai_edge_litert.interpreter import Interpreter
    from timm.models.tiny_vit import Attention

    from mobile_targets.base import PartToConvert
    from mobile_targets.tflite.converter import attention_exp_as_sigmoids
    from pipeline.contract import PartContract, TensorSpec
    from pipeline.model import _make_export_friendly

    torch.manual_seed(0)
    block = torch.nn.Sequential(Attention(64, key_dim=16, num_heads=4, attn_ratio=1, resolution=(7, 7))).eval()
    _make_export_friendly(block)
    with torch.no_grad():
        block[0].attention_biases.normal_(std=0.5)
    shape = (4, 49, 64)
    contract = PartContract(
        ENCODER, (TensorSpec("tokens", shape, "float32", "windows"),), (TensorSpec("out", shape, "float32", "windows"),)
    )
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randn(shape, generator=generator) for _ in range(5)]
    part = PartToConvert(
        block, contract, (samples[0],), calibration=lambda: tuple({"tokens": x.numpy()} for x in samples[:4])
    )
    with torch.no_grad():
        expected = block(samples[4])
        assert (attention_exp_as_sigmoids(block)(samples[4]) - expected).abs().max() < 1e-5
    path = tmp_path / "attention_w8a8.tflite"
    assert get_target("tflite").convert_part(part, "w8a8", path)["io"] == "float32"

    interpreter = Interpreter(model_path=str(path))
    tensors = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    details = interpreter._get_ops_details()
    ops = {op["op_name"] for op in details}
    float_ops = [
        op["op_name"]
        for op in details
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")
        and any(tensors[i] == np.float32 for i in [*op["inputs"], *op["outputs"]] if i >= 0)
    ]
    assert {"FULLY_CONNECTED", "BATCH_MATMUL", "LOGISTIC", "MAX_POOL_2D"} <= ops and "SOFTMAX" not in ops
    assert not float_ops, sorted(set(float_ops))
    answer = get_target("tflite").load_runner(path, contract).run({"tokens": samples[4].numpy()})["out"]
    print(f"tflite w8a8 attention block: {psnr_db(expected.numpy(), answer):.1f} dB against fp32")
    assert psnr_db(expected.numpy(), answer) > 30


def test_litert_profiler_times_each_op_and_rejects_wrong_inputs(tmp_path):
    """LiteRT's profiler through libLiteRt's C API, on one linear layer: one XNNPACK GEMM per
    call (fp32, and QD8 or QDU8 x QC8W in the int8 file: XNNPACK quantizes activations signed for
    its AMX kernels, unsigned for its AVX512-VNNI ones) inside the whole call's time; an input of
    the wrong size or name is one line, before anything runs."""
    import torch

    from mobile_targets.base import PartToConvert
    from mobile_targets.tflite.profiler import profile_ops
    from pipeline.contract import PartContract, TensorSpec
    from pipeline.errors import PipelineError

    torch.manual_seed(0)
    contract = PartContract(
        "gemm",
        inputs=(TensorSpec("x", (1, 64, 64), "float32", "activations"),),
        outputs=(TensorSpec("y", (1, 64, 48), "float32", "x @ weight.T + bias"),),
    )
    x = torch.randn(1, 64, 64)  # 64 x 48 weights: over INT8_MIN_WEIGHTS, so int8 in the int8 file
    part = PartToConvert(torch.nn.Linear(64, 48).eval(), contract, (x,))
    target = get_target("tflite")
    expected = {"fp32": r"Fully Connected \(NC, F32\) GEMM", "int8": r"Fully Connected \(NC, QDU?8, F32, QC8W\) GEMM"}
    for precision, gemm in expected.items():
        path = tmp_path / f"gemm_{precision}.tflite"
        target.convert_part(part, precision, path)
        profile = profile_ops(path, {"x": x.numpy()}, threads=1, runs=2)
        assert [(op.delegated, op.count) for op in profile.ops] == [(True, 1)], profile
        assert re.fullmatch(gemm, profile.ops[0].name), profile
        assert 0 < profile.ops[0].ms <= profile.total_ms
    with pytest.raises(PipelineError, match=r"input 'x' has 8192 bytes \(float32\), the file's tensor takes 16384"):
        profile_ops(path, {"x": x.numpy()[:, :32]}, threads=1)
    with pytest.raises(PipelineError, match="no input 'x' to profile with"):
        profile_ops(path, {"image": x.numpy()}, threads=1)


def test_tflite_fp16_encoder_computes_in_fp16_as_phones_do(tmp_path):
    """The fp16 encoder asks XNNPACK for fp16 arithmetic in its metadata and has its GELU in the
    tanh form (the one with vectorized fp16 kernels); the runner forces fp16, so its answer is
    fp16's (between fp32's and int8's agreement) and LiteRT's profile shows fp16 kernels. The
    fp32 file and an fp16 decoder keep fp32 arithmetic; a file's outputs survive its next call."""
    import torch

    from mobile_targets.base import PartToConvert
    from mobile_targets.tflite.arithmetic import declared_arithmetic, mark_fp16_arithmetic
    from mobile_targets.tflite.profiler import profile_ops
    from pipeline.contract import PartContract, TensorSpec

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(1, 512, 64)
    expected = module(x).detach().numpy()
    target = get_target("tflite")
    files = {}
    for part_name, precision in ((ENCODER, "fp32"), (ENCODER, "fp16"), (DECODER, "fp16")):
        contract = PartContract(
            part_name,
            inputs=(TensorSpec("x", (1, 512, 64), "float32", "tokens"),),
            outputs=(TensorSpec("y", (1, 512, 64), "float32", "mlp(tokens)"),),
        )
        path = tmp_path / f"{part_name}_{precision}.tflite"
        details = target.convert_part(PartToConvert(module, contract, (x,)), precision, path)
        runner = target.load_runner(path, contract, threads=1)
        first = runner.run({"x": x.numpy()})["y"]
        kept = first.copy()
        runner.run({"x": -x.numpy()})
        np.testing.assert_array_equal(first, kept)
        ops = {op.name for op in profile_ops(path, {"x": x.numpy()}, threads=1).ops}
        files[part_name, precision] = (details, runner.arithmetic, psnr_db(expected, first), ops)
    details, arithmetic, fp16_psnr, ops = files[ENCODER, "fp16"]
    assert details["arithmetic"] == arithmetic == declared_arithmetic(tmp_path / f"{ENCODER}_fp16.tflite") == "fp16"
    assert {"Fully Connected (NC, F16) GEMM", "ApproxGELU (NC)"} <= ops, ops
    psnrs = {f"{part} {precision}": round(float(value[2]), 1) for (part, precision), value in files.items()}
    print(f"tflite PSNR vs PyTorch dB: {psnrs}")
    assert 50 < fp16_psnr < 80, fp16_psnr
    for key, least_psnr in (((ENCODER, "fp32"), 120), ((DECODER, "fp16"), fp16_psnr + 10)):
        details, arithmetic, psnr, ops = files[key]
        assert arithmetic == "fp32" and "arithmetic" not in details
        assert {"Fully Connected (NC, F32) GEMM", "GELU (NC)"} <= ops, (key, ops)
        assert psnr > least_psnr, (key, psnr)
    marked = mark_fp16_arithmetic((tmp_path / f"{ENCODER}_fp16.tflite").read_bytes())
    (tmp_path / "marked_twice.tflite").write_bytes(mark_fp16_arithmetic(marked))
    assert declared_arithmetic(tmp_path / "marked_twice.tflite") == "fp16"


def test_tflite_w8a8_ranges_cover_every_calibration_sample(tmp_path):
    """The w8a8 file's activation ranges hold every calibration sample, not mostly the first:
    ai-edge-quantizer's own calibration averages each new sample's range into the earlier ones
    (0.95 : 0.05), so a later photo whose values reach eight times further was clipped. Here the
    first sample is small and the others large; the file answers the largest within int8's
    resolution, and each activation's int8 range reaches the largest value PyTorch computed."""
    import torch
    from ai_edge_litert.interpreter import Interpreter

    from mobile_targets.base import PartToConvert
    from pipeline.contract import PartContract, TensorSpec

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    shape = (1, 8, 32)
    contract = PartContract(
        ENCODER,
        (TensorSpec("tokens", shape, "float32", "tokens"),),
        (TensorSpec("out", (1, 8, 16), "float32", "tokens"),),
    )
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randn(shape, generator=generator) * scale for scale in (1.0, 8.0, 8.0, 8.0)]
    part = PartToConvert(
        layers, contract, (samples[0],), calibration=lambda: tuple({"tokens": x.numpy()} for x in samples)
    )
    path = tmp_path / "mlp_w8a8.tflite"
    get_target("tflite").convert_part(part, "w8a8", path)

    with torch.no_grad():
        largest = max(float(layers(x).abs().max()) for x in samples)
        expected = layers(samples[1]).numpy()
    interpreter = Interpreter(model_path=str(path))
    output_ranges = [
        255 * float(t["quantization_parameters"]["scales"][0])
        for t in interpreter.get_tensor_details()
        if t["dtype"] == np.int8 and t["shape"].tolist() == [1, 8, 16]
    ]
    assert output_ranges and min(output_ranges) >= largest, (output_ranges, largest)
    answer = get_target("tflite").load_runner(path, contract).run({"tokens": samples[1].numpy()})["out"]
    print(f"tflite w8a8 on a calibration sample 8x the first: {psnr_db(expected, answer):.1f} dB against fp32")
    assert psnr_db(expected, answer) > 35


def test_tflite_w8a8_keeps_the_costliest_region_float(tmp_path):
    """A coordinate encoding (sin and cos of coordinates up to 1024, as the prompt decoder's) then
    three linear layers: all int8, the coordinates' 4-pixel steps ruin the phases and the output
    misses the w8a8 target; the search keeps the region that costs most float (the encoding) and
    the linear layers int8, and the file answers an input it was not calibrated on."""
    import math

    import torch
    from ai_edge_litert.interpreter import Interpreter

    from mobile_targets.base import PartToConvert
    from pipeline.contract import PartContract, TensorSpec

    class CoordinateEncoding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("frequencies", torch.randn(2, 32, generator=generator) * 8)
            self.head = torch.nn.Sequential(
                torch.nn.Linear(64, 64),
                torch.nn.GELU(),
                torch.nn.Linear(64, 64),
                torch.nn.GELU(),
                torch.nn.Linear(64, 16),
            )

        def forward(self, coords: torch.Tensor) -> torch.Tensor:
            phase = 2 * math.pi * (coords / 1024) @ self.frequencies
            return self.head(torch.cat([phase.sin(), phase.cos()], dim=-1))

    torch.manual_seed(0)
    module = CoordinateEncoding().eval()
    shape = (1, 64, 2)
    contract = PartContract(
        ENCODER,
        (TensorSpec("coords", shape, "float32", "pixels"),),
        (TensorSpec("out", (1, 64, 16), "float32", "features"),),
    )
    generator = torch.Generator().manual_seed(1)
    samples = [torch.rand(shape, generator=generator) * 1024 for _ in range(5)]
    part = PartToConvert(
        module, contract, (samples[0],), calibration=lambda: tuple({"coords": x.numpy()} for x in samples[:4])
    )
    path = tmp_path / "encoding_w8a8.tflite"
    plan = get_target("tflite").convert_part(part, "w8a8", path)["mixed_precision"]
    print("tflite w8a8 coordinate encoding:", plan)
    assert plan["all_int8_score"] < plan["calibration_target"] <= plan["calibration_score"]
    assert plan["float_regions"][0].startswith("ops 0-") and plan["int8_op_share"] >= 0.5

    interpreter = Interpreter(model_path=str(path))
    types = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    float_ops = [op for op in ops if any(types[i] == np.float32 for i in [*op["inputs"], *op["outputs"]] if i >= 0)]
    print("ops on float tensors:", [op["op_name"] for op in float_ops])
    assert len(float_ops) == plan["ops_outside_int8"] and len(ops) == plan["ops"]
    assert [op["op_name"] for op in float_ops] == ["FULLY_CONNECTED", "SIN", "COS"]  # the planned op, no int8 sin/cos
    linear = [op for op in ops if op["op_name"] == "FULLY_CONNECTED"]
    assert [types[op["inputs"][0]] for op in linear] == [np.float32, np.int8, np.int8, np.int8]  # encoding, head
    with torch.no_grad():
        expected = module(samples[4]).numpy()
    answer = get_target("tflite").load_runner(path, contract).run({"coords": samples[4].numpy()})["out"]
    print(f"on an input it was not calibrated on: {psnr_db(expected, answer):.1f} dB against fp32")
    assert psnr_db(expected, answer) > 35


def test_tflite_w8a16_recipe_keeps_the_named_op_types_int8():
    """`full_integer_recipe` (benchmarks/tflite_w8a16.py): int16 activations on the scopes given,
    the op types named int8 among them. ai-edge-quantizer lets a later regex override an earlier
    one whatever op it names, so a TRANSPOSE rule under its own regex was silently ignored."""
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.utils.tfl_flatbuffer_utils import get_op_scope

    from mobile_targets.tflite.converter import SIGNATURE, calibration_ranges, full_integer_recipe

    class LinearTransposeLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x).transpose(1, 2))

    torch.manual_seed(0)
    example = torch.rand(1, 4, 8)
    float_model = bytes(litert_torch.convert(LinearTransposeLinear().eval(), (example,)).model_content())
    graph = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model)).subgraphs[0]
    scopes = [get_op_scope(op, graph.tensors) for op in graph.operators]
    samples = [{"args_0": torch.rand(1, 4, 8).numpy()} for _ in range(3)]
    recipe = full_integer_recipe(int16_scopes=scopes, int8_ops=("TRANSPOSE",))
    ranges = calibration_ranges(float_model, full_integer_recipe(), samples)
    model = quantizer.Quantizer(float_model, recipe).quantize(ranges, enable_progress_report=False).quantized_model
    interpreter = Interpreter(model_content=bytes(model))
    types = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    outputs = {op["op_name"]: types[op["outputs"][0]] for op in interpreter._get_ops_details()}
    assert outputs["TRANSPOSE"] == np.int8 and outputs["FULLY_CONNECTED"] == np.int16, outputs
    assert SIGNATURE in interpreter.get_signature_list()


def test_tflite_int8_files_keep_small_weights_float(converted):
    """`INT8_MIN_WEIGHTS`: no int8 constant under it in the int8 files (the prompt encoder's label
    table and Gaussians, the IoU head's last layer stay float; int8 on them failed validate's int8
    pair on box prompts), while the large weights are int8."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    from mobile_targets.tflite.converter import INT8_MIN_WEIGHTS

    manifest_path, manifest = converted
    if manifest.target != "tflite":
        pytest.skip("the TFLite int8 recipe")
    for record in (r for r in manifest.artifacts if r.precision == "int8"):
        model = flatbuffer_utils.read_model_from_bytearray(bytearray((manifest_path.parent / record.file).read_bytes()))
        constants = [
            int(np.prod(tensor.shape))
            for tensor in model.subgraphs[0].tensors
            if tensor.type == schema.TensorType.INT8 and model.buffers[tensor.buffer].data is not None
        ]
        assert constants and min(constants) >= INT8_MIN_WEIGHTS, (record.file, sorted(constants)[:5])
