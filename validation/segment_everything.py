"""`python -m validation.segment_everything --out CONVERT_OUT --target T [--precision P] --image PHOTO
--result DIR [--checkpoint W] [--points-per-side K] [--pred-iou-thresh X] [--stability-score-thresh Y]
[--box-nms-thresh Z] [--compare-pytorch]`

Segment everything in one photo with a target's encoder file and batched decoder file: writes
`DIR/masks.json` (segment-anything's records, segmentation as COCO RLE) and `DIR/overlay.png`
(every mask in its own colour). `--checkpoint` must be the weights the folder was converted from;
`--compare-pytorch` also runs segment-anything's SamAutomaticMaskGenerator on those weights and
writes `DIR/comparison.json` (for each of its masks the best IoU among ours, counts each side).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mobile_targets import load_artifact_runner
from pipeline.cli import positive, run_main, setup_logging
from pipeline.contract import BATCHED_DECODER, ENCODER, prompts_per_call
from pipeline.datasets import load_rgb
from pipeline.errors import ArtifactError, ConfigError
from pipeline.files import atomic_write_bytes, atomic_write_json
from pipeline.manifest import MANIFEST_NAME, ArtifactRecord, Manifest, read_manifest
from pipeline.segment_everything import (
    GENERATOR_DEFAULTS,
    AutomaticMaskGenerator,
    match_masks,
    reference_generator,
)
from validation.reference import ReferenceModels


def find_record(manifest: Manifest, part: str, precision: str) -> ArtifactRecord:
    for record in manifest.artifacts:
        if record.part == part and record.precision == precision:
            return record
    have = sorted({r.precision for r in manifest.artifacts if r.part == part})
    hint = " (convert with --batch-prompts B)" if part == BATCHED_DECODER and not have else ""
    raise ArtifactError(
        f"{manifest.target} has no {part} file in {precision}; it has {', '.join(have) or 'none'}{hint}"
    )


def file_generator(
    manifest_path: Path, manifest: Manifest, precision: str, encoder_precision: str, threads: int | None, **options
) -> AutomaticMaskGenerator:
    """The generator over a convert folder's encoder file and batched decoder file."""
    decoder_record = find_record(manifest, BATCHED_DECODER, precision)
    encoder_record = find_record(manifest, ENCODER, encoder_precision)
    encoder = load_artifact_runner(manifest_path, manifest, encoder_record, threads)
    decoder = load_artifact_runner(manifest_path, manifest, decoder_record, threads)
    batch = prompts_per_call(manifest.contract(BATCHED_DECODER))
    return AutomaticMaskGenerator.over(encoder, decoder, batch, manifest.config.num_points, **options)


def overlay(image: np.ndarray, records: list[dict[str, Any]]) -> np.ndarray:
    """The photo with every mask blended in its own colour, largest first so small ones stay visible."""
    from pycocotools import mask as mask_utils

    picture = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for record in sorted(records, key=lambda r: -r["area"]):
        mask = mask_utils.decode(record["segmentation"]).astype(bool)
        colour = rng.uniform(40, 255, size=3)
        picture[mask] = 0.45 * picture[mask] + 0.55 * colour
    return picture.clip(0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.segment_everything", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="a convert output folder")
    parser.add_argument("--target", required=True, help="coreml, executorch, executorch_coreml or tflite")
    parser.add_argument("--precision", default="fp32", help="of the batched decoder (and the encoder)")
    parser.add_argument("--encoder-precision", help="of the encoder, when it differs from --precision")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True, help="folder for masks.json and overlay.png")
    parser.add_argument("--checkpoint", type=Path, help="the weights the folder was converted from")
    parser.add_argument("--points-per-side", type=positive, default=GENERATOR_DEFAULTS["points_per_side"])
    parser.add_argument("--pred-iou-thresh", type=float, default=GENERATOR_DEFAULTS["pred_iou_thresh"])
    parser.add_argument("--stability-score-thresh", type=float, default=GENERATOR_DEFAULTS["stability_score_thresh"])
    parser.add_argument("--box-nms-thresh", type=_unit_interval, default=GENERATOR_DEFAULTS["box_nms_thresh"])
    parser.add_argument("--threads", type=positive)
    parser.add_argument("--compare-pytorch", action="store_true", help="also run SamAutomaticMaskGenerator")
    args = parser.parse_args()
    setup_logging()
    if args.result.exists() and not args.result.is_dir():  # before the work, and without creating anything
        raise ConfigError(f"--result {args.result} is a file; expected a folder (new or existing) for the results")
    manifest_path = args.out / args.target / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ConfigError(f"no {args.target} files under {args.out} ({manifest_path} missing); run a convert session")
    manifest = read_manifest(manifest_path)
    references = ReferenceModels(args.checkpoint)
    references.key(manifest)  # weights that changed since conversion: refused before any work
    image = load_rgb(args.image)
    options = {
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "box_nms_thresh": args.box_nms_thresh,
    }
    generator = file_generator(
        manifest_path, manifest, args.precision, args.encoder_precision or args.precision, args.threads, **options
    )
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    times = generator.predictor.times
    atomic_write_json(args.result / "masks.json", records)
    atomic_write_bytes(args.result / "overlay.png", _png(overlay(image, records)))
    summary = {
        "target": manifest.target,
        "precision": args.precision,
        "masks": len(records),
        "seconds": seconds,
        **asdict(times),
        "options": options,
    }
    print(
        f"{len(records)} masks in {seconds:.1f} s: encoder {times.encoder_s:.2f} s, {times.prompts} prompts in "
        f"{times.decoder_calls} batched decoder calls {times.decoder_s:.2f} s"
    )
    if args.compare_pytorch:
        reference = reference_generator(references.get(manifest).sam, **options).generate(image)
        summary["pytorch"] = match_masks(reference, records).to_json()
        print(f"against SamAutomaticMaskGenerator: {json.dumps(summary['pytorch'])}")
    atomic_write_json(args.result / "summary.json", summary)
    print(f"wrote {args.result / 'masks.json'}, {args.result / 'overlay.png'} and {args.result / 'summary.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
