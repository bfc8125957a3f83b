"""How far 16-bit activations (w8a16: int8 weights, int16 activations) take the TFLite encoder
in LiteRT, measured, for the full-integer files of `docs/tflite.md`.

Quantizes the encoder's w8a8 graph (ranges: the union over the calibration photos, as the convert
stage does) five ways and prints the embeddings' PSNR against the float graph, worst photo, on the
calibration photos and on held-out ones (the validation split): all int8 (today's file), all
int16, int16 with the TRANSPOSEs int8, that with every LayerNorm op float, and that with every
range 4 times wider. The file's outputs are dequantized by their own parameters (an int16 last op
leaves an int16 output even where the recipe asks for a float one). Slow: LiteRT runs int16 in its
reference kernels.

    PYTHONPATH=. python benchmarks/tflite_w8a16.py [--checkpoint mobile_sam.pt]
"""

from __future__ import annotations

import argparse
import re

import numpy as np

from mobile_targets.convert import build_parts
from mobile_targets.tflite.converter import (
    SIGNATURE,
    calibration_ranges,
    float_tflite,
    full_integer_recipe,
    load_interpreter_class,
)
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.contract import ENCODER
from pipeline.datasets import CocoPhotos
from pipeline.metrics import psnr_db


def op_scopes(model: bytes) -> list[tuple[str, str]]:
    """(op type, scope) of every op of the float graph, in order."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    graph = tflite.subgraphs[0]
    names = tfl_flatbuffer_utils.TFL_OP_CODE_TO_NAME
    return [
        (
            str(names[tflite.operatorCodes[op.opcodeIndex].builtinCode]).split(".")[-1],
            tfl_flatbuffer_utils.get_op_scope(op, graph.tensors),
        )
        for op in graph.operators
    ]


def embeddings(model: bytes, photos: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The model's embeddings per photo, dequantized by the output's own parameters."""
    runner = load_interpreter_class()(model_content=model, num_threads=2).get_signature_runner(SIGNATURE)
    (detail,) = runner.get_output_details().values()
    answers = []
    for photo in photos:
        (value,) = runner(**photo).values()
        if value.dtype in (np.int8, np.int16):
            parameters = detail["quantization_parameters"]
            value = (value.astype(np.float64) - parameters["zero_points"][0]) * parameters["scales"][0]
        answers.append(np.asarray(value, dtype=np.float32))
    return answers


WIDER = 4.0
"""How much the last variant widens every range: were held-out values clipped by ranges the
calibration photos set, a wider int16 range (its resolution to spare) would score higher."""


def widened(ranges: dict, factor: float) -> dict:
    """The calibration ranges (tensor -> {"min", "max", ...}) each `factor` times wider."""
    return {
        tensor: {key: value * factor if key in ("min", "max") else value for key, value in entry.items()}
        for tensor, entry in ranges.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    args = parser.parse_args()
    sam, weights = load_model("vit_t", args.checkpoint, 0)
    splits = {}
    for split in ("calibration", "validation"):
        (encoder,) = [
            p for p in build_parts(RunConfig(batch_prompts=0), sam, CocoPhotos.sample(split)) if p.name == ENCODER
        ]
        splits[split] = [{name: s[name] for name in encoder.contract.input_names} for s in encoder.calibration()]
    float_model = float_tflite(encoder, "w8a8")
    ranges = calibration_ranges(float_model, full_integer_recipe(), splits["calibration"])
    ops = op_scopes(float_model)
    layer_norm = [scope for _, scope in ops if re.search("LayerNorm", scope)]
    every = [scope for _, scope in ops]
    w8a16 = full_integer_recipe(float_scopes=layer_norm, int16_scopes=every, int8_ops=("TRANSPOSE",))
    variants = {
        "all int8": (full_integer_recipe(), ranges),
        "all int16": (full_integer_recipe(int16_scopes=every), ranges),
        "int16, TRANSPOSE int8": (full_integer_recipe(int16_scopes=every, int8_ops=("TRANSPOSE",)), ranges),
        "int16, TRANSPOSE int8, LayerNorm float": (w8a16, ranges),
        f"that, every range x{WIDER}": (w8a16, widened(ranges, WIDER)),
    }
    from ai_edge_quantizer import quantizer

    expected = {split: embeddings(float_model, photos) for split, photos in splits.items()}
    print(f"image encoder ({weights.describe()}): {len(ops)} ops, {len(layer_norm)} in LayerNorms")
    print("embeddings PSNR against the float graph, worst photo:")
    for name, (recipe, variant_ranges) in variants.items():
        quantized = quantizer.Quantizer(float_model, recipe).quantize(variant_ranges, enable_progress_report=False)
        model = bytes(quantized.quantized_model)
        scores = {
            split: min(psnr_db(e, a) for e, a in zip(expected[split], embeddings(model, photos), strict=True))
            for split, photos in splits.items()
        }
        print(
            f"  {name:<40} calibration {scores['calibration']:5.1f} dB   held out {scores['validation']:5.1f} dB",
            flush=True,
        )


if __name__ == "__main__":
    main()
