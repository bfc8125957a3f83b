"""What keeping the point positional encoding in fp32 buys in an fp16 Core ML decoder.

Converts the prompt decoder to fp16 twice (with the fp32 point-encoding patch and with plain
fp16 everywhere), runs both in the MIL emulator on real photos with point and box prompts, and
prints each one's mask-logit PSNR and mask IoU against PyTorch fp32, and their ratio of errors.

    PYTHONPATH=. python benchmarks/coreml_point_encoding.py [--checkpoint mobile_sam.pt] [--max-images 6]
        [--images DIR --annotations FILE]   (default: the sample calibration photos)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from mobile_targets.convert import build_parts, example_prompts
from mobile_targets.coreml.converter import TARGET
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.datasets import photos_from_options
from pipeline.metrics import mask_iou, psnr_db
from pipeline.predictor import ReferencePredictor, Segmenter
from pipeline.processing import Prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--max-images", type=int, default=6)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--annotations", type=Path)
    args = parser.parse_args()
    sam, weights = load_model("vit_t", args.checkpoint, 0)
    photos = photos_from_options(args.images, args.annotations, default="calibration")
    decoder = build_parts(RunConfig(batch_prompts=0), sam, photos)[1]
    runners = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant, keep in (("fp32 point encoding", True), ("all fp16", False)):
            path = Path(folder) / f"{variant.replace(' ', '_')}.mlpackage"
            target = TARGET.with_options({"fp32_point_encoding": keep})
            target.convert_part(decoder, "fp16", path)
            runners[variant] = target.load_runner(path, decoder.contract)
        reference = ReferencePredictor(sam)
        scores: dict[str, dict[str, list[float]]] = {v: {"psnr": [], "iou": [], "err": []} for v in runners}
        segmenters = {variant: Segmenter(runner) for variant, runner in runners.items()}
        for image_id in photos.image_ids()[: args.max_images]:
            image = photos.image(image_id)
            embeddings = reference.set_image(image)
            for segmenter in segmenters.values():
                segmenter.set_embeddings(reference.prepared, embeddings)
            for full in example_prompts(photos, image_id, image.shape, count=4):
                for prompt in (full, Prompt(points=full.points, labels=full.labels)):
                    expected = reference.predict(prompt, multimask_output=False)
                    for variant, segmenter in segmenters.items():
                        actual = segmenter.predict(prompt, multimask_output=False)
                        out = actual.low_res_masks
                        scores[variant]["psnr"].append(psnr_db(expected.low_res_masks, out))
                        scores[variant]["err"].append(float(np.sqrt(np.mean((expected.low_res_masks - out) ** 2))))
                        scores[variant]["iou"].append(mask_iou(expected.mask, actual.mask))
    print(f"weights: {weights.describe()}; {len(scores['all fp16']['iou'])} prompts")
    for variant, values in scores.items():
        print(
            f"{variant:>20}: logits PSNR mean {np.mean(values['psnr']):.1f} dB (min {np.min(values['psnr']):.1f}), "
            f"mask IoU mean {np.mean(values['iou']):.4f} (min {np.min(values['iou']):.4f})"
        )
    ratio = np.mean(scores["all fp16"]["err"]) / np.mean(scores["fp32 point encoding"]["err"])
    print(f"RMS logit error, all fp16 / fp32 point encoding: {ratio:.2f}x")


if __name__ == "__main__":
    main()
