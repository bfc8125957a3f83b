"""Core ML end to end on the full MobileSAM: convert every variant, run the packages in the MIL
emulator, compare with PyTorch on real photos, and check the fp16 package against its fp32 twin."""

from __future__ import annotations

import json
import shutil
import stat

import coremltools as ct  # a core dependency: a missing install fails here, never skips
import numpy as np
import pytest

from mobile_targets import get_target
from mobile_targets.convert import build_parts, convert_target, example_prompts
from mobile_targets.coreml.emulator import MilProgram, fp16_twin_differences
from pipeline.config import RunConfig
from pipeline.contract import decoder_contract, encoder_contract
from pipeline.errors import ArtifactError, ConfigError
from pipeline.gates import selftest_tolerance
from pipeline.manifest import read_manifest, verify_artifact
from pipeline.metrics import mask_iou, max_abs_error, psnr_db
from pipeline.predictor import ReferencePredictor, Segmenter
from pipeline.processing import prepare_image
from validation.gates import DEFAULT_GATES

PRECISIONS = ("fp16", "fp32", "int8", "palettize6")
MIN_LOGIT_PSNR_DB = {"fp32": 100.0, "fp16": 55.0, "int8": 35.0, "palettize6": 25.0}
"""Mask-logit PSNR has no validate gate; these sit under what was measured. Embeddings PSNR and
mask IoU are held to the validate stage's own gates (validation.gates.DEFAULT_GATES)."""


@pytest.fixture(scope="module")
def coreml_run(tmp_path_factory, official_checkpoint):
    config = RunConfig(  # the batched decoder's Core ML files are covered by test_targets
        checkpoint=official_checkpoint, precisions=PRECISIONS, out_dir=tmp_path_factory.mktemp("out"), batch_prompts=0
    )
    manifest_path = convert_target("coreml", config)
    return manifest_path, read_manifest(manifest_path)


def _package(coreml_run, part, precision):
    manifest_path, manifest = coreml_run
    record = next(a for a in manifest.artifacts if a.part == part and a.precision == precision)
    return verify_artifact(manifest_path, record)


def _runner(coreml_run, part, precision):
    contract = encoder_contract() if part == "image_encoder" else decoder_contract(5)
    return get_target("coreml").load_runner(_package(coreml_run, part, precision), contract, threads=2)


def test_manifest_lists_packages_with_metadata(coreml_run):
    manifest_path, manifest = coreml_run
    assert {(a.part, a.precision) for a in manifest.artifacts} == {
        (p, q) for p in ("image_encoder", "prompt_decoder") for q in PRECISIONS
    }
    for record in manifest.artifacts:
        package = verify_artifact(manifest_path, record)
        assert package.is_dir() and package.suffix == ".mlpackage"
        assert all(p.stat().st_mode & stat.S_IROTH for p in package.rglob("*"))
        assert record.details.minimum_deployment_target == "iOS17"
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        metadata = spec.description.metadata
        assert metadata.author and metadata.license and metadata.shortDescription and metadata.versionString
        assert all(i.shortDescription for i in spec.description.input)
        assert all(o.shortDescription for o in spec.description.output)
        user = dict(metadata.userDefined)
        assert json.loads(user["com.github.mobilesam-mobile.contract"]) == record.contract
        assert user["com.github.mobilesam-mobile.weights"].startswith("checkpoint mobile_sam.pt")
        if record.part == "prompt_decoder":
            assert user["com.github.mobilesam-mobile.num_points"] == "5"
            assert json.loads(user["com.github.mobilesam-mobile.point_labels"])["-1"] == "padding"
    sizes = {(a.part, a.precision): a.bytes for a in manifest.artifacts}
    for part in ("image_encoder", "prompt_decoder"):
        assert sizes[part, "palettize6"] < sizes[part, "int8"] < sizes[part, "fp16"] < sizes[part, "fp32"]


def test_packages_list_the_ops_the_neural_engine_is_known_not_to_run(coreml_run):
    """Every package's census (mobile_targets/coreml/neural_engine.py) is in the manifest: no encoder
    has a gather left (its biases are one-hot products), an fp16 encoder has no fp32 op, an fp16
    decoder only its fp32 point encoding, and every op of an fp32 package is an fp32 op."""
    _, manifest = coreml_run
    for record in manifest.artifacts:
        census = record.details.neural_engine
        assert census.ops > 50 and set(census.sources) >= {"gather", "fp32 compute"}, record.file
        print(f"{record.file}: {census.ops} ops, outside the Neural Engine's rules: {census.outside}")
        if record.part == "image_encoder":
            assert "gather" not in census.outside, census.examples
        fp32_ops = census.outside.get("fp32 compute", 0)
        if record.precision == "fp32":
            assert fp32_ops > 0.8 * census.ops
        elif record.part == "image_encoder" and record.precision != "w8a8":
            assert fp32_ops == 0, census.examples
        elif record.part == "prompt_decoder":
            assert 0 < fp32_ops < 0.1 * census.ops, census.examples  # the point encoding, kept fp32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_packages_agree_with_pytorch_on_real_photos(coreml_run, our_model, photos, precision):
    gate = DEFAULT_GATES[precision]
    min_embedding_psnr, min_logit_psnr, min_iou = (
        gate.embeddings_psnr_db,
        MIN_LOGIT_PSNR_DB[precision],
        gate.mask_iou_min,
    )
    encoder = _runner(coreml_run, "image_encoder", precision)
    decoder = _runner(coreml_run, "prompt_decoder", precision)
    reference = ReferencePredictor(our_model)
    deployed = Segmenter(decoder, encoder)  # the packages end to end, as an app runs them
    embedding_psnr, embedding_error, logit_psnr, logit_error, ious = [], [], [], [], []
    for image_id in photos.image_ids()[9:10]:  # a held-out photo (validate scores them all)
        image = photos.image(image_id)
        expected_embeddings = reference.set_image(image)
        embeddings = deployed.set_image(image)
        embedding_psnr.append(psnr_db(expected_embeddings, embeddings))
        embedding_error.append(max_abs_error(expected_embeddings, embeddings))
        for full in example_prompts(photos, image_id, image.shape, count=3):
            point_only = type(full)(points=full.points, labels=full.labels, box=None)
            for prompt in (full, point_only):
                expected = reference.predict(prompt, multimask_output=False)
                actual = deployed.predict(prompt, multimask_output=False)
                logit_psnr.append(psnr_db(expected.low_res_masks, actual.low_res_masks))
                logit_error.append(max_abs_error(expected.low_res_masks, actual.low_res_masks))
                ious.append(mask_iou(expected.mask, actual.mask))
    print(
        f"coreml {precision}: embeddings PSNR >= {min(embedding_psnr):.1f} dB, max abs {max(embedding_error):.2e}; "
        f"mask logits PSNR >= {min(logit_psnr):.1f} dB, max abs {max(logit_error):.2e}; "
        f"mask IoU min {min(ious):.4f} mean {np.mean(ious):.4f}"
    )
    assert min(embedding_psnr) >= min_embedding_psnr
    assert min(logit_psnr) >= min_logit_psnr
    assert min(ious) >= min_iou


def test_fp32_package_is_exact(coreml_run, our_model, photos):
    """In fp32 the emulated package must match PyTorch to float rounding (relative L2)."""
    image = photos.image(photos.image_ids()[3])
    expected = ReferencePredictor(our_model).set_image(image)
    actual = _runner(coreml_run, "image_encoder", "fp32").run({"image": prepare_image(image).image})
    relative = np.linalg.norm(actual["image_embeddings"] - expected) / np.linalg.norm(expected)
    assert relative < 1e-5


@pytest.mark.parametrize("part", ["image_encoder", "prompt_decoder"])
def test_fp16_package_is_its_fp32_twin(coreml_run, part):
    """Same op sequence and arguments, constants bit-equal to the fp32 ones rounded to fp16."""
    fp32 = MilProgram(_package(coreml_run, part, "fp32"))
    fp16 = MilProgram(_package(coreml_run, part, "fp16"))
    assert fp16_twin_differences(fp32, fp16) == []
    # the check can fail: int8 weights are not fp16-rounded fp32 weights
    assert fp16_twin_differences(fp32, MilProgram(_package(coreml_run, part, "int8")))


def test_point_encoding_stays_fp32_in_the_fp16_decoder(coreml_run):
    program = MilProgram(_package(coreml_run, "prompt_decoder", "fp16"))
    dtypes = {name: t.dtype for op in program.operations for name, t in op.outputs}
    trig = [op for op in program.operations if op.type in ("sin", "cos")]
    assert trig and all(op.outputs[0][1].dtype == "FLOAT32" for op in trig)
    assert sum(dtype == "FLOAT16" for dtype in dtypes.values()) > 0.9 * len(dtypes) - 20


@pytest.mark.parametrize("precision", ["int8", "palettize6"])
def test_compressed_weights_are_decompressed_at_load(coreml_run, precision):
    """constexpr_* ops become constants when the package loads: the ops that run are fp16's."""
    compressed = MilProgram(_package(coreml_run, "image_encoder", precision))
    assert compressed.op_types == MilProgram(_package(coreml_run, "image_encoder", "fp16")).op_types


def test_image_type_encoder(official_checkpoint, photos, tmp_path):
    """The ImageType variant: an RGB image input with bias -mean, same embeddings as the tensor one."""
    from pipeline.checkpoints import load_model

    sam, _ = load_model("vit_t", official_checkpoint)
    encoder_part = build_parts(RunConfig(batch_prompts=0), sam, photos)[0]
    target = get_target("coreml").with_options({"encoder_input": "image"})
    path = tmp_path / "image_encoder_fp16.mlpackage"
    details = target.convert_part(encoder_part, "fp16", path)
    assert details["encoder_input"].startswith("image")
    image_input = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description.input[0]
    assert image_input.type.WhichOneof("Type") == "imageType"
    assert image_input.type.imageType.width == image_input.type.imageType.height == 1024
    runner = target.load_runner(path, encoder_contract(), threads=2)
    expected = encoder_part.module(*encoder_part.example_inputs).detach().numpy()
    actual = runner.run({"image": encoder_part.example_inputs[0].numpy()})["image_embeddings"]
    assert psnr_db(expected, actual) > 55


def test_options_are_checked():
    target = get_target("coreml")
    with pytest.raises(ConfigError, match="minimum_deployment_target"):
        target.with_options({"minimum_deployment_target": "iOS9"})
    with pytest.raises(ConfigError, match="unknown coreml options"):
        target.with_options({"colour": "red"})
    with pytest.raises(ConfigError, match="takes no options"):
        get_target("executorch").with_options({"encoder_input": "image"})


def test_corrupt_packages_fail_with_one_line(coreml_run, tmp_path):
    source = _package(coreml_run, "prompt_decoder", "fp32")
    contract = decoder_contract(5)
    target = get_target("coreml")

    def broken(name, damage):
        copy = tmp_path / name
        shutil.copytree(source, copy)
        damage(copy)
        return copy

    spec_file = "Data/com.apple.CoreML/model.mlmodel"
    weight_file = "Data/com.apple.CoreML/weights/weight.bin"
    cases = {
        "plain file": tmp_path / "file.mlpackage",
        "missing": tmp_path / "absent.mlpackage",
        "no manifest": broken("a.mlpackage", lambda p: (p / "Manifest.json").unlink()),
        "garbage spec": broken("b.mlpackage", lambda p: (p / spec_file).write_bytes(b"\x07garbage" * 50)),
        "truncated spec": broken(
            "c.mlpackage", lambda p: (p / spec_file).write_bytes((p / spec_file).read_bytes()[:5000])
        ),
        "truncated weights": broken(
            "d.mlpackage", lambda p: (p / weight_file).write_bytes((p / weight_file).read_bytes()[:100_000])
        ),
        "no weights": broken("e.mlpackage", lambda p: (p / weight_file).unlink()),
    }
    cases["plain file"].write_bytes(b"not a package")
    for case, path in cases.items():
        with pytest.raises(ArtifactError) as info:
            target.load_runner(path, contract)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, (case, message)


def test_w8a8_decoder_is_calibrated_by_the_emulator(our_model, tmp_path):
    """w8a8: int8 activations around the linear layers and convolutions, int8 weights, and each
    range is the one the fp16 package's own tensors reach on the calibration photos (which the
    emulator computed, standing in for MLModel.predict); the file still passes its self-test."""
    from pipeline.datasets import CocoPhotos
    from pipeline.selftest import run_vectors

    decoder = build_parts(RunConfig(batch_prompts=0), our_model, CocoPhotos.sample("calibration"))[1]
    target = get_target("coreml")
    target.convert_part(decoder, "w8a8", tmp_path / "w8a8.mlpackage")
    target.convert_part(decoder, "fp16", tmp_path / "fp16.mlpackage")
    quantized, reference = MilProgram(tmp_path / "w8a8.mlpackage"), MilProgram(tmp_path / "fp16.mlpackage")
    quantizers = [op for op in quantized.operations if op.type == "quantize"]
    assert len(quantizers) > 20 and "dequantize" in quantized.op_types
    assert any(op.startswith("constexpr_") for op in _constant_op_types(tmp_path / "w8a8.mlpackage"))
    consumers = {op.type for op in _ops_reading_int8(quantized)}
    assert {"linear", "conv"} <= consumers and "add" not in consumers  # adds stay float
    inputs = {op.arguments["input"][1] for op in quantizers if op.arguments["input"][0] == "var"}
    seen: dict[str, float] = {}
    for sample in decoder.calibration():
        values = reference.run(sample, "fp16", intermediates=inputs & set(reference.var_shapes))
        for name, value in values.items():
            seen[name] = max(seen.get(name, 0.0), float(np.abs(value).max()))
    matched = 0
    for op in quantizers:
        name = op.arguments["input"][1]
        scale = float(np.asarray(quantized._resolve(op.arguments["scale"], {})))
        matched += name in seen and abs(scale * 127 - seen[name]) <= 2e-3 * seen[name] + 1e-4  # symmetric: max|x| / 127
    assert matched >= 0.8 * len(quantizers), f"{matched} of {len(quantizers)} ranges match the emulator's"
    tolerance = selftest_tolerance(DEFAULT_GATES["w8a8"], decoder.name)
    results = run_vectors(
        target.load_runner(tmp_path / "w8a8.mlpackage", decoder.contract), list(decoder.selftest), tolerance
    )
    assert all(result.passed for result in results), [result.misses for result in results]


def test_w8a8_keeps_the_encoder_trunk_layers_float(tmp_path):
    """On a small TinyViT of MobileSAM's shape: the layers `FLOAT_MODULES` names (those that
    read or write the residual trunk) get no int8 input, every other convolution and linear
    layer does, and the manifest's details count the int8 share of the multiply-adds."""
    import torch

    from mobile_targets.base import PartToConvert
    from mobile_targets.coreml.activation_quantization import module_path, module_paths
    from pipeline.export_wrappers import exported_program
    from pipeline.model import MobileSamTinyViT

    torch.manual_seed(0)
    # two heads per stage: with one, coremltools 9.0 fails on the bias gather (const_elimination)
    encoder = MobileSamTinyViT(embed_dims=(16, 32, 32, 64), depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 2), out_chans=256)
    with torch.no_grad():  # non-zero relative-position biases, as load_model's random weights have
        for module in encoder.modules():
            if hasattr(module, "attention_biases"):
                module.attention_biases.normal_()
    wrapper = torch.nn.Sequential()
    wrapper.add_module("image_encoder", encoder)  # the export wrapper's name for it, as the real part has it
    photos = [torch.rand(1, 3, 1024, 1024) * 4 - 2 for _ in range(2)]
    part = PartToConvert(
        wrapper.eval(),
        encoder_contract(),
        (photos[0],),
        calibration=lambda: tuple({"image": p.numpy()} for p in photos),
    )
    details = get_target("coreml").convert_part(part, "w8a8", tmp_path / "small_w8a8.mlpackage")
    assert 0.5 < details["int8_activation_mac_share"] < 1.0, details
    program = MilProgram(tmp_path / "small_w8a8.mlpackage")
    reading_int8 = {name for op in _ops_reading_int8(program) for name, _ in op.outputs}
    layers = {name for op in program.operations if op.type in ("conv", "linear") for name, _ in op.outputs}
    paths = module_paths(exported_program(get_target("coreml").module_to_export(part, "w8a8"), part.example_inputs))
    assert all(module_path(name, paths) for name in layers)  # every layer found its module
    kept_float = sorted(module_path(name, paths).removeprefix("image_encoder.") for name in layers - reading_int8)
    blocks = ((1, 0), (2, 0), (2, 1), (3, 0))
    expected = (
        [f"stages.{s}.blocks.{b}.local_conv.bn" for s, b in blocks]
        + [f"stages.{s}.blocks.{b}.attn.forward.__self__.proj" for s, b in blocks]
        + [f"stages.{s}.downsample.conv2.bn" for s in (1, 2, 3)]
        + ["stages.1.downsample.conv1.bn", "stages.1.downsample.conv3.bn"]
    )
    assert kept_float == sorted(expected)  # and every other layer (qkv, MLPs, stage 0, neck) reads int8


def _ops_reading_int8(program: MilProgram) -> list:
    """The ops whose main input (`x` or `input`) comes from a dequantize op."""
    producer = {name: op.type for op in program.operations for name, _ in op.outputs}
    return [
        op
        for op in program.operations
        for k in ("x", "input")
        if k in op.arguments and op.arguments[k][0] == "var" and producer.get(op.arguments[k][1]) == "dequantize"
    ]


def _constant_op_types(package) -> set[str]:
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    main = spec.mlProgram.functions["main"]
    return {op.type for op in main.block_specializations[main.opset].operations}


def test_neural_engine_rules_each_find_their_op(tmp_path):
    """A small package with one gather, one dilated convolution and one op kept in fp32: each rule
    counts its own op, and the census says where each rule comes from."""
    import torch

    from mobile_targets.coreml.neural_engine import neural_engine_census
    from mobile_targets.neural_engine import RULES
    from pipeline.export_wrappers import exported_program
    from tests.neural_engine_probe import RuleProbe

    example = torch.rand(1, 2, 3, 3)
    model = ct.convert(
        exported_program(RuleProbe().eval(), (example,)),
        inputs=[ct.TensorType(name="x", shape=example.shape)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type != "sin"),
    )
    model.save(str(tmp_path / "small.mlpackage"))
    census = neural_engine_census(tmp_path / "small.mlpackage")
    assert census.outside == {"gather": 1, "dilated convolution": 1, "fp32 compute": 1}, census.examples
    assert census.examples["fp32 compute"][0].startswith("sin ")
    assert set(census.sources) == {rule.name for rule in RULES}
    assert all("https://" in source for source in census.sources.values())
