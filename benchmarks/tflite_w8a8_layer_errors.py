"""Where the TFLite w8a8 (full-integer) files lose against fp32, layer by layer.

Converts each part's w8a8 graph to float and to w8a8 as the convert stage does (same calibration
photos and prompts), runs both in the LiteRT interpreter with every intermediate tensor kept, on
the calibration inputs, and prints per op: the SQNR of its output against the float model's (the
worst over the inputs), and the loss it adds (the worst of its inputs' SQNR minus its output's).
An op that adds much is where int8 activations cost the most; a high figure after an op that
divides by a small number (a LayerNorm over nearly constant tokens) is amplification, not rounding.

    PYTHONPATH=. python benchmarks/tflite_w8a8_layer_errors.py [--parts image_encoder prompt_decoder]
        [--checkpoint mobile_sam.pt] [--samples 2] [--top 25]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from mobile_targets.convert import build_parts
from mobile_targets.tflite.converter import SIGNATURE, float_tflite, load_interpreter_class, quantize_full_integer
from pipeline.checkpoints import load_model
from pipeline.config import RunConfig
from pipeline.datasets import CocoPhotos

BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")
EXACT_DB = 200.0
"""SQNR of a tensor that matches exactly (or holds only zeros)."""


@dataclass
class LayerError:
    """One op of the float graph: its output's SQNR in the w8a8 file and the loss it adds."""

    index: int
    op: str
    tensor: str
    output_db: float
    added_db: float


def sqnr_db(reference: np.ndarray, answer: np.ndarray) -> float:
    noise = float(np.mean((reference.astype(np.float64) - answer) ** 2))
    signal = float(np.mean(reference.astype(np.float64) ** 2))
    return EXACT_DB if noise == 0 or signal == 0 else min(EXACT_DB, 10 * np.log10(signal / noise))


def tensors_after_call(model: bytes, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every tensor of one call by name (int8 ones dequantized), and the interpreter's ops."""
    interpreter = load_interpreter_class()(model_content=model, experimental_preserve_all_tensors=True)
    interpreter.get_signature_runner(SIGNATURE)(**inputs)
    values = {}
    for detail in interpreter.get_tensor_details():
        try:
            value = interpreter.get_tensor(detail["index"])
        except ValueError:  # a tensor the interpreter never allocated
            continue
        scales, zero_points = (
            detail["quantization_parameters"]["scales"],
            detail["quantization_parameters"]["zero_points"],
        )
        if value.dtype in (np.int8, np.int16) and len(scales) == 1:
            values[detail["name"]] = (value.astype(np.float64) - zero_points[0]) * scales[0]
        elif value.dtype == np.float32:
            values[detail["name"]] = value
    names = {detail["index"]: detail["name"] for detail in interpreter.get_tensor_details()}
    ops = [
        {"op": op["op_name"], "inputs": [names[i] for i in op["inputs"] if i >= 0], "output": names[op["outputs"][0]]}
        for op in interpreter._get_ops_details()  # the op list LiteRT's Python API gives
    ]
    return values, ops


def tensor_db(reference: dict[str, np.ndarray], answer: dict[str, np.ndarray], name: str) -> float | None:
    """SQNR of one tensor of the quantized call against the float one (None: not in both)."""
    if name in reference and name in answer and reference[name].shape == answer[name].shape:
        return sqnr_db(reference[name], answer[name])
    return None


def layer_errors(float_model: bytes, quantized: bytes, samples: list[dict[str, np.ndarray]]) -> list[LayerError]:
    """Per op of the float graph, worst over `samples`."""
    errors: dict[str, LayerError] = {}
    for sample in samples:
        reference, ops = tensors_after_call(float_model, sample)
        answer, _ = tensors_after_call(quantized, sample)

        for index, op in enumerate(ops):
            output = tensor_db(reference, answer, op["output"])
            if output is None or op["op"] in BOUNDARY_OPS:
                continue
            inputs = [db for db in (tensor_db(reference, answer, name) for name in op["inputs"]) if db is not None]
            added = min(inputs, default=EXACT_DB) - output
            seen = errors.setdefault(op["output"], LayerError(index, op["op"], op["output"], output, added))
            seen.output_db, seen.added_db = min(seen.output_db, output), max(seen.added_db, added)
    return sorted(errors.values(), key=lambda error: error.index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["image_encoder", "prompt_decoder"])
    parser.add_argument("--checkpoint")
    parser.add_argument("--samples", type=int, default=2, help="calibration inputs to trace (each part)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    sam, weights = load_model("vit_t", args.checkpoint, 0)
    parts = build_parts(RunConfig(batch_prompts=0), sam, CocoPhotos.sample("calibration"))
    for part in (p for p in parts if p.name in args.parts):
        float_model = float_tflite(part, "w8a8")
        quantized, _ = quantize_full_integer(float_model, part, integer_io=False)
        samples = [{name: s[name] for name in part.contract.input_names} for s in part.calibration()][: args.samples]
        errors = layer_errors(float_model, quantized, samples)
        described = weights.describe()
        print(f"\n{part.name} ({described}): {len(errors)} ops, output SQNR against float over {len(samples)} input(s)")
        print(f"{'op':>5} {'type':<20} {'output dB':>9} {'adds dB':>8}  tensor (end of its module path)")
        for error in sorted(errors, key=lambda e: e.added_db, reverse=True)[: args.top]:
            print(
                f"{error.index:>5} {error.op:<20} {error.output_db:>9.1f} {error.added_db:>8.1f}  {error.tensor[-70:]}"
            )
        by_type: dict[str, list[float]] = {}
        for error in errors:
            by_type.setdefault(error.op, []).append(error.added_db)
        print("by op type (ops, sum of dB added where positive):")
        for op, added in sorted(by_type.items(), key=lambda item: -sum(max(a, 0) for a in item[1])):
            print(f"  {op:<20} {len(added):>4} {sum(max(a, 0) for a in added):>8.1f}")
        print(f"last op's output: {errors[-1].output_db:.1f} dB")


if __name__ == "__main__":
    main()
