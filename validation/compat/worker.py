"""Runs one model file on prepared inputs inside a runtime's own environment.

Started as a script by that environment's Python (`python worker.py ...`), so it imports only
numpy and the runtime under test, never the project (whose torch and runtime builds would mix
in). It computes nothing but the file's raw outputs; the caller, in the project's environment,
scores them with the self-test checks.

    python worker.py --loader L --model FILE --inputs IN.npz --outputs OUT.npz [--order a,b,c]

IN.npz holds `case<i>.<input name>` arrays; OUT.npz gets `case<i>.<output name>` (TFLite
signature names) or `case<i>.<output position>` (ExecuTorch). The last stdout line is one JSON
object: {"status": "ok"} or {"status": "refused", "stage": "load"|"run", "error": "<one line>"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

SIGNATURE = "serving_default"


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def _tflite_interpreter(loader: str) -> Any:
    if loader == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter
    elif loader == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def load_tflite(loader: str, model: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The file's signature runner with the runtime's default delegates (XNNPACK), as an app's."""
    interpreter = _tflite_interpreter(loader)(model_path=model, num_threads=2)
    runner = interpreter.get_signature_runner(SIGNATURE)

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.array(value) for name, value in runner(**inputs).items()}

    return run


def load_executorch(model: str, order: list[str]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(model).load_method("forward")
    if method is None:
        raise RuntimeError("the program has no 'forward' method")

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = method.execute([torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in order])
        return {str(index): np.array(value.numpy()) for index, value in enumerate(outputs)}

    return run


LOADERS = ("ai_edge_litert", "tflite_runtime", "tensorflow", "executorch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loader", choices=LOADERS, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--order", default="", help="input names in the program's order (ExecuTorch)")
    args = parser.parse_args()
    with np.load(args.inputs, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    cases: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        index, name = key.split(".", 1)
        cases.setdefault(int(index.removeprefix("case")), {})[name] = value
    try:
        if args.loader == "executorch":
            run = load_executorch(args.model, args.order.split(","))
        else:
            run = load_tflite(args.loader, args.model)
    except Exception as error:  # any load failure is the runtime refusing the file
        print(json.dumps({"status": "refused", "stage": "load", "error": _one_line(error)}))
        return 0
    outputs: dict[str, np.ndarray] = {}
    try:
        for index in sorted(cases):
            for name, value in run(cases[index]).items():
                outputs[f"case{index}.{name}"] = value
    except Exception as error:  # an error at run time is as clear a refusal as one at load
        print(json.dumps({"status": "refused", "stage": "run", "error": _one_line(error)}))
        return 0
    np.savez(args.outputs, **outputs)
    print(json.dumps({"status": "ok"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
