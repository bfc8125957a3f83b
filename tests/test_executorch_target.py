"""ExecuTorch end to end: convert the full MobileSAM, run the .pte files in ExecuTorch's runtime,
compare with the PyTorch reference on real photos, and reject broken files with one line."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_targets import get_target
from mobile_targets.convert import convert_target, instance_prompt
from pipeline.config import RunConfig
from pipeline.contract import decoder_contract, encoder_contract
from pipeline.errors import ArtifactError
from pipeline.manifest import read_manifest, verify_artifact
from pipeline.metrics import mask_iou, psnr_db
from pipeline.predictor import ReferencePredictor
from pipeline.processing import prepare_image, prompt_to_decoder_inputs, select_mask_index, upscale_masks

pytest.importorskip("executorch")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, official_checkpoint):
    config = RunConfig(
        checkpoint=official_checkpoint, precisions=("fp32", "int8"), out_dir=tmp_path_factory.mktemp("artifacts")
    )
    manifest_path = convert_target("executorch", config, calibration_images=2)
    return manifest_path, read_manifest(manifest_path)


def test_manifest_lists_both_parts_in_both_precisions(converted):
    manifest_path, manifest = converted
    found = {(a.part, a.precision) for a in manifest.artifacts}
    assert found == {(p, q) for p in ("image_encoder", "prompt_decoder") for q in ("fp32", "int8")}
    assert not manifest.random_weights and manifest.weights["sha256"]
    for record in manifest.artifacts:
        assert verify_artifact(manifest_path, record).suffix == ".pte"
        assert record.details["xnnpack_delegated_nodes"] > 0
        assert record.contract["part"] == record.part


def _load(manifest_path, manifest, part, precision):
    record = next(a for a in manifest.artifacts if a.part == part and a.precision == precision)
    contract = encoder_contract() if part == "image_encoder" else decoder_contract(5)
    return get_target("executorch").load_runner(verify_artifact(manifest_path, record), contract, threads=2)


@pytest.mark.parametrize(("precision", "min_psnr", "min_iou"), [("fp32", 60.0, 0.99), ("int8", 15.0, 0.5)])
def test_runtime_agrees_with_pytorch_on_real_photos(converted, our_model, photos, precision, min_psnr, min_iou):
    manifest_path, manifest = converted
    encoder = _load(manifest_path, manifest, "image_encoder", precision)
    decoder = _load(manifest_path, manifest, "prompt_decoder", precision)
    reference = ReferencePredictor(our_model)
    ious = []
    for image_id in photos.image_ids()[10:12]:
        image = photos.image(image_id)
        expected_embeddings = reference.set_image(image)
        prepared = prepare_image(image)
        embeddings = encoder.run({"image": prepared.image})["image_embeddings"]
        assert psnr_db(expected_embeddings, embeddings) > min_psnr
        for instance in photos.instances(image_id)[:3]:
            prompt = instance_prompt(instance.mask, instance.bbox)
            expected = reference.predict(prompt, multimask_output=False)
            inputs = prompt_to_decoder_inputs(prompt, prepared.original_size)
            outputs = decoder.run({"image_embeddings": embeddings, **inputs})
            logits = upscale_masks(outputs["low_res_masks"], prepared.input_size, prepared.original_size)
            selected = select_mask_index(outputs["iou_predictions"], multimask_output=False)
            ious.append(mask_iou(expected.mask, logits[selected] > 0))
    print(f"executorch {precision}: mask IoU vs PyTorch min {min(ious):.4f} mean {np.mean(ious):.4f}")
    assert min(ious) >= min_iou


def test_corrupt_and_truncated_files_fail_with_one_line(converted, tmp_path):
    manifest_path, manifest = converted
    record = next(a for a in manifest.artifacts if a.part == "prompt_decoder" and a.precision == "fp32")
    data = verify_artifact(manifest_path, record).read_bytes()
    target = get_target("executorch")
    cases = {
        "truncated.pte": data[: len(data) // 3],
        "garbage.pte": b"not a program at all" * 10,
        "flipped.pte": data[:8] + bytes(b ^ 0xFF for b in data[8:4096]) + data[4096:],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ArtifactError) as info:
            target.load_runner(path, decoder_contract(5))
        assert "\n" not in str(info.value) and str(path) in str(info.value)
