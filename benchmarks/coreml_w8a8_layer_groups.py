"""Which layers' int8 activations cost the Core ML w8a8 encoder its accuracy.

Converts the image encoder to w8a8 once per variant (int8 weights everywhere, calibrated on the
sample calibration photos as the convert stage does), runs each package in the MIL emulator on
held-out photos, and prints the embeddings PSNR against PyTorch fp32 and the int8 share of the
multiply-adds. Variants: `shipped` (`FLOAT_MODULES` as the convert stage uses it), `all-int8`
(no layer kept float), `weights-only` (every layer float), `only:GROUP` (that group of layers
int8, every other one float) and `also-float:GROUP` (shipped, with that group float too), for the
groups in `GROUPS`.

    PYTHONPATH=. python benchmarks/coreml_w8a8_layer_groups.py [--variants shipped all-int8 only:proj]
        [--checkpoint mobile_sam.pt] [--max-images 4] [--images DIR --annotations FILE]
        (default photos: the sample validation photos)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

from mobile_targets.convert import build_parts
from mobile_targets.coreml import activation_quantization
from mobile_targets.coreml.converter import TARGET
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.datasets import CocoPhotos, photos_from_options
from pipeline.metrics import psnr_db
from pipeline.predictor import ReferencePredictor

GROUPS = {
    "patch_embed": r"\.patch_embed\.",
    "stage0_blocks": r"\.stages\.0\.blocks\.",
    "first_merging": r"\.stages\.1\.downsample\.",
    "later_mergings": r"\.stages\.[23]\.downsample\.",
    "local_conv": r"\.local_conv\.",
    "qkv": r"\.attn\.(.*\.)?qkv$",
    "proj": r"\.attn\.(.*\.)?proj$",
    "fc1": r"\.mlp\.fc1$",
    "fc2": r"\.mlp\.fc2$",
    "neck": r"\.neck\.",
}
"""Module-path patterns of the encoder's convolutions and linear layers, one group each."""


def float_modules(variant: str) -> tuple[str, ...]:
    """The FLOAT_MODULES patterns a variant converts with."""
    if variant == "shipped":
        return activation_quantization.FLOAT_MODULES
    if variant == "all-int8":
        return ()
    if variant == "weights-only":
        return tuple(GROUPS.values())
    kind, _, group = variant.partition(":")
    if kind not in ("only", "also-float") or group not in GROUPS:
        raise SystemExit(
            f"unknown variant {variant!r}; expected shipped, all-int8, weights-only, only:GROUP or "
            f"also-float:GROUP with GROUP one of {', '.join(GROUPS)}"
        )
    if kind == "also-float":
        return (*activation_quantization.FLOAT_MODULES, GROUPS[group])
    return tuple(pattern for name, pattern in GROUPS.items() if name != group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["shipped", "all-int8"])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--max-images", type=int, default=4)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--annotations", type=Path)
    args = parser.parse_args()
    for variant in args.variants:
        float_modules(variant)  # a typo fails before the first conversion
    sam, weights = load_model("vit_t", args.checkpoint, 0)
    encoder = build_parts(RunConfig(batch_prompts=0), sam, CocoPhotos.sample("calibration"))[0]
    photos = photos_from_options(args.images, args.annotations, default="validation")
    reference = ReferencePredictor(sam)
    held_out = []
    for image_id in photos.image_ids()[: args.max_images]:
        embeddings = reference.set_image(photos.image(image_id))
        held_out.append((reference.prepared.image, embeddings))
    print(f"weights: {weights.describe()}; {len(held_out)} held-out photos")
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            path = Path(folder) / "encoder_w8a8.mlpackage"
            with mock.patch.object(activation_quantization, "FLOAT_MODULES", float_modules(variant)):
                details = TARGET.convert_part(encoder, "w8a8", path)
            runner = TARGET.load_runner(path, encoder.contract)
            name = encoder.contract.output_names[0]
            psnr = [psnr_db(expected, runner.run({"image": image})[name]) for image, expected in held_out]
            print(
                f"{variant:>22}: embeddings PSNR min {np.min(psnr):.1f} dB, mean {np.mean(psnr):.1f} dB; "
                f"int8 activations on {details['int8_activation_mac_share']:.1%} of multiply-adds",
                flush=True,
            )


if __name__ == "__main__":
    main()
