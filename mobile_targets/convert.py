"""The convert stage: checkpoint -> export wrappers -> a target's converter -> files + manifest.

Each file is written under a temporary name, loaded in the target's real runtime and checked
against PyTorch on a real photo (a PSNR gate, as apple/ml-stable-diffusion does after each
conversion); only a file that passes replaces the earlier one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mobile_targets import get_target
from mobile_targets.base import PartToConvert, Runner, Target
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.contract import decoder_contract, encoder_contract
from pipeline.datasets import CocoPhotos
from pipeline.errors import ArtifactError, ConfigError
from pipeline.export_wrappers import ImageEncoderForExport, PromptDecoderForExport
from pipeline.files import atomic_produce
from pipeline.manifest import MANIFEST_NAME, ArtifactRecord, Manifest, read_manifest, tool_versions, verify_artifact
from pipeline.metrics import max_abs_error, psnr_db
from pipeline.processing import Prompt, prepare_image, prompt_to_decoder_inputs

log = logging.getLogger(__name__)

GATE_PSNR_DB = {"fp32": 60.0, "fp16": 30.0, "int8": 10.0, "palettize6": 10.0}
"""Minimum PSNR of every output against PyTorch on the example photo, checked right after
conversion. Loose for quantized files: they are scored properly by the validate stage."""


def instance_prompt(instance_mask: np.ndarray, bbox: tuple[float, float, float, float]) -> Prompt:
    """A foreground point inside the instance plus its box: a prompt real apps send."""
    ys, xs = np.nonzero(instance_mask)
    middle = len(xs) // 2
    x, y, w, h = bbox
    return Prompt(
        points=np.array([[xs[middle], ys[middle]]], dtype=np.float32),
        labels=np.array([1.0], dtype=np.float32),
        box=np.array([x, y, x + w, y + h], dtype=np.float32),
    )


def build_parts(
    config: RunConfig, sam: torch.nn.Module, photos: CocoPhotos, calibration_images: int
) -> list[PartToConvert]:
    """Both export wrappers with example inputs (first photo) and calibration inputs (next photos)."""
    encoder = ImageEncoderForExport(sam).eval()
    decoder = PromptDecoderForExport(sam).eval()
    encoder_inputs: list[tuple[torch.Tensor, ...]] = []
    decoder_inputs: list[tuple[torch.Tensor, ...]] = []
    contract = decoder_contract(config.num_points)
    for image_id in photos.image_ids()[: 1 + calibration_images]:
        image = photos.image(image_id)
        prepared = prepare_image(image)
        image_tensor = torch.from_numpy(prepared.image)
        with torch.no_grad():
            embeddings = encoder(image_tensor)
        encoder_inputs.append((image_tensor,))
        for instance in photos.instances(image_id)[:2]:
            named = prompt_to_decoder_inputs(
                instance_prompt(instance.mask, instance.bbox), prepared.original_size, config.num_points
            )
            named["image_embeddings"] = embeddings.numpy()
            decoder_inputs.append(tuple(torch.from_numpy(named[n]) for n in contract.input_names))
    return [
        PartToConvert(encoder, encoder_contract(), encoder_inputs[0], tuple(encoder_inputs[1:])),
        PartToConvert(decoder, contract, decoder_inputs[0], tuple(decoder_inputs[1:])),
    ]


def parity_gate(runner: Runner, part: PartToConvert, precision: str) -> dict[str, dict[str, float]]:
    """Run the fresh file on the example photo; fail if any output's PSNR is under the gate."""
    with torch.no_grad():
        expected = part.module(*part.example_inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    inputs = {name: t.numpy() for name, t in zip(part.contract.input_names, part.example_inputs, strict=True)}
    actual = runner.run(inputs)
    results = {}
    for name, reference in zip(part.contract.output_names, expected, strict=True):
        reference = reference.numpy()
        results[name] = {
            "psnr_db": psnr_db(reference, actual[name]),
            "max_abs_error": max_abs_error(reference, actual[name]),
        }
        if results[name]["psnr_db"] < GATE_PSNR_DB[precision]:
            raise ArtifactError(
                f"{part.name} {precision}: output {name} has PSNR {results[name]['psnr_db']:.1f} dB against "
                f"PyTorch, under the {GATE_PSNR_DB[precision]:.0f} dB gate; the earlier file is kept"
            )
    return results


def convert_one(target: Target, part: PartToConvert, precision: str, path: Path) -> dict:
    details: dict = {}

    def produce(temporary: Path) -> None:
        start = time.perf_counter()
        details.update(target.convert_part(part, precision, temporary))
        details["conversion_seconds"] = round(time.perf_counter() - start, 2)
        details["gate"] = parity_gate(target.load_runner(temporary, part.contract), part, precision)

    atomic_produce(path, produce)
    return details


def kept_earlier_records(
    out: Path, weights: dict, config: RunConfig, new_records: list[ArtifactRecord]
) -> list[ArtifactRecord]:
    """Records of an earlier run in the same folder that this run did not redo.

    A run limited to some precisions must not drop the other files from the manifest. Only
    records made from the same weights and N, whose files still match their hash, are kept.
    """
    path = out / MANIFEST_NAME
    if not path.exists():
        return []
    try:
        earlier = read_manifest(path)
    except ArtifactError as error:
        log.warning("ignoring the earlier manifest: %s", error)
        return []
    if earlier.weights != weights or earlier.config.get("num_points") != config.num_points:
        return []
    redone = {(r.part, r.precision) for r in new_records}
    kept = []
    for record in earlier.artifacts:
        if (record.part, record.precision) in redone:
            continue
        try:
            verify_artifact(path, record)
        except ArtifactError:
            continue
        kept.append(record)
    return kept


def convert_target(target_name: str, config: RunConfig, calibration_images: int = 8) -> Path:
    """Convert both parts in every precision the target supports; returns the manifest path."""
    target = get_target(target_name).with_options(config.target_options.get(target_name, {}))
    precisions = [p for p in config.precisions if p in target.precisions]
    if not precisions:
        raise ConfigError(
            f"none of the precisions {list(config.precisions)} is supported by {target.name} "
            f"(supported: {', '.join(target.precisions)})"
        )
    sam, weights = load_model(config.model_type, config.checkpoint, config.seed)
    photos = CocoPhotos.default()
    needs_calibration = any(p in target.calibrated_precisions for p in precisions)
    parts = build_parts(config, sam, photos, calibration_images if needs_calibration else 0)
    parts = [replace(part, weights_description=weights.describe()) for part in parts]
    out = Path(config.out_dir) / target.name
    records = []
    for part in parts:
        for precision in precisions:
            path = out / f"{part.name}_{precision}{target.extension}"
            log.info("converting %s to %s %s", part.name, target.name, precision)
            details = convert_one(target, part, precision, path)
            record = ArtifactRecord.describe_file(
                path,
                out,
                part=part.name,
                target=target.name,
                precision=precision,
                contract=part.contract.to_json(),
                details=details,
            )
            records.append(record)
            worst = min(v["psnr_db"] for v in details["gate"].values())
            print(
                f"wrote {path} ({record.bytes / 1e6:.1f} MB, {details['conversion_seconds']:.1f} s, "
                f"min PSNR vs PyTorch {worst:.1f} dB)"
            )
    manifest = Manifest(
        target=target.name,
        weights=weights.to_json(),
        config=config.to_json(),
        tool_versions=tool_versions(*target.tool_packages()),
        artifacts=tuple(kept_earlier_records(out, weights.to_json(), config, records) + records),
    )
    manifest_path = manifest.write(out)
    print(f"wrote {manifest_path} ({len(manifest.artifacts)} artifacts; weights: {weights.describe()})")
    return manifest_path
