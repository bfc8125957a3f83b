"""Which convolutions of the TFLite int8 encoder should compute in int8 (#13).

Converts the image encoder to float TFLite once, quantizes it with each recipe (ai-edge-quantizer,
as the TFLite target does), times the files interleaved in the LiteRT interpreter (XNNPACK), so
machine noise hits all alike, and prints each recipe's median, its ratio to the shipped recipe,
and its embedding PSNR against PyTorch fp32 on held-out photos. Recipes: `shipped`
(`int8_recipe`); `float-convolutions`, every convolution in fp32 compute (`INT8_CONVOLUTIONS`
empty: the recipe before the MBConv and neck convolutions went int8, but with fp16 weights on the
neck); and the shipped one with dynamic range int8 (int8 weights, activations quantized on the
fly) on more convolutions: `dynamic:GROUP[+GROUP...]` for the groups in `GROUPS`, or
`dynamic:all` for every convolution.

    PYTHONPATH=. python benchmarks/tflite_int8_recipes.py [--recipes shipped dynamic:all]
        [--threads 2] [--runs 12] [--checkpoint mobile_sam.pt] [--max-images 4]
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any
from unittest import mock

import numpy as np

from mobile_targets.convert import build_parts
from mobile_targets.tflite import converter as tflite_converter
from mobile_targets.tflite.converter import (
    SIGNATURE,
    NamedInputsOutputs,
    int8_recipe,
    load_interpreter_class,
)
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.datasets import CocoPhotos
from pipeline.metrics import psnr_db
from pipeline.predictor import ReferencePredictor
from validation.baselines import time_interleaved

GROUPS = {
    "patch_embed": ("CONV_2D", ".*PatchEmbed_patch_embed.*"),
    "stage0": ("CONV_2D", ".*MBConv.*"),
    "stage0_depthwise": ("DEPTHWISE_CONV_2D", ".*MBConv.*"),
    "merging": ("CONV_2D", ".*PatchMerging_downsample.*"),
    "merging_depthwise": ("DEPTHWISE_CONV_2D", ".*PatchMerging_downsample.*"),
    "local_conv": ("DEPTHWISE_CONV_2D", ".*ConvNorm_local_conv.*"),
    "neck": ("CONV_2D", ".*Sequential_neck.*"),
}
"""(op, tensor-name pattern) of the encoder's convolutions, one group each; the names are
litert-torch's module paths, as the recipes see them before `short_tensor_names`."""


def recipe_for(name: str) -> list[dict[str, Any]]:
    from ai_edge_quantizer import recipe

    (dynamic,) = recipe.dynamic_wi8_afp32()
    shipped = int8_recipe()
    if name == "shipped":
        return shipped
    if name == "float-convolutions":
        with mock.patch.object(tflite_converter, "INT8_CONVOLUTIONS", ()):
            return int8_recipe()
    kind, _, groups = name.partition(":")
    selected = list(GROUPS.values()) if groups == "all" else [GROUPS.get(group) for group in groups.split("+")]
    if kind != "dynamic" or None in selected:
        raise SystemExit(
            f"unknown recipe {name!r}; expected shipped, float-convolutions, dynamic:all or "
            f"dynamic:GROUP[+GROUP...] with GROUP in {', '.join(GROUPS)}"
        )
    return [*shipped, *({**dynamic, "operation": op, "regex": regex} for op, regex in selected)]


def main() -> None:
    import litert_torch
    from ai_edge_quantizer import quantizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["shipped", "dynamic:all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--checkpoint")
    parser.add_argument("--max-images", type=int, default=4)
    args = parser.parse_args()
    recipes = {name: recipe_for(name) for name in dict.fromkeys(["shipped", *args.recipes])}
    sam, weights = load_model("vit_t", args.checkpoint, 0)
    encoder = build_parts(RunConfig(batch_prompts=0), sam, CocoPhotos.sample("calibration"))[0]
    reference = ReferencePredictor(sam)
    photos = CocoPhotos.sample("validation")
    held_out = []
    for image_id in photos.image_ids()[: args.max_images]:
        embeddings = reference.set_image(photos.image(image_id))
        held_out.append((reference.prepared.image, embeddings))
    named = NamedInputsOutputs(encoder.module, encoder.contract).eval()
    sample = dict(zip(encoder.contract.input_names, encoder.example_inputs, strict=True))
    float_model = bytes(litert_torch.convert(named, sample_args=(), sample_kwargs=sample).model_content())
    interpreter_class = load_interpreter_class()
    runners, quality, sizes = {}, {}, {}
    (input_name,), (output_name,) = encoder.contract.input_names, encoder.contract.output_names
    for name, model_recipe in recipes.items():
        content = bytes(quantizer.Quantizer(float_model, model_recipe).quantize().quantized_model)
        runner = interpreter_class(model_content=content, num_threads=args.threads).get_signature_runner(SIGNATURE)
        psnr = [psnr_db(expected, runner(**{input_name: image})[output_name]) for image, expected in held_out]
        runners[name], quality[name], sizes[name] = runner, psnr, len(content) / 1e6
    feed = {input_name: held_out[0][0]}
    timings = time_interleaved({name: partial(runner, **feed) for name, runner in runners.items()}, args.runs)
    print(f"TFLite int8 encoder recipes; weights: {weights.describe()}; {args.threads} threads, {args.runs} runs each")
    for t in timings:
        print(
            f"{t.name:24s} median {t.median_ms:7.1f} ms  {t.ratio:.3f}x shipped  {sizes[t.name]:.1f} MB  "
            f"PSNR min {min(quality[t.name]):.1f} dB, mean {np.mean(quality[t.name]):.1f} dB"
        )


if __name__ == "__main__":
    main()
