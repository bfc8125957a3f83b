"""Runs one model file on prepared inputs inside a runtime's own environment.

Started as a script by that environment's Python (`python worker.py ...`), so it imports only
numpy and the runtime under test, never the project (whose torch and runtime builds would mix
in). It computes nothing but the file's raw outputs; the caller, in the project's environment,
scores them with the self-test checks.

    python worker.py --loader L --model FILE --inputs IN.npz --outputs OUT.npz [--order a,b,c]

IN.npz holds `case<i>.<input name>` arrays; OUT.npz gets `case<i>.<output name>` (TFLite
signature names) or `case<i>.<output position>` (ExecuTorch). The last stdout line is one JSON
object: {"status": "ok"} (LiteRT.js adds "note": where the graph ran) or {"status": "refused",
"stage": "load"|"run", "error": "<one line>"}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
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


LITERTJS = Path(__file__).with_name("litertjs")
"""The Node script and page that run a file in LiteRT.js inside headless Chromium."""
LITERTJS_TIMEOUT_S = 1500
TEXTURE_TOO_LARGE = re.compile(r"Texture size \(\[Extent3D width:(\d+), height:(\d+).*exceeded maximum")
GPU_SPLIT = re.compile(r"(\d+) operations will run on the GPU, and the remaining (\d+) operations will run on the CPU")


def refused_ops(log: list[str]) -> str:
    """The delegate's list of ops it will not run, one entry per op and reason with its count
    ("RESHAPE: Tensor dimensions must be less than 5 (x40)")."""
    counts: dict[str, int] = {}
    listing = False
    for line in log:
        if "not supported by GPU delegate" in line:
            listing = True
        elif listing and GPU_SPLIT.search(line):
            listing = False
        elif listing and ":" in line:
            op, reason = line.split(":", 1)
            reason = re.sub(r'\s*"?\bt\d+\b"?', "", reason).strip().rstrip(".")  # tensor names vary
            if not reason:  # the op's heading; its reasons follow
                continue
            key = f"{op.strip()}: {reason}"
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} (x{count})" for key, count in counts.items())


def delegate_failures(log: list[str]) -> str:
    """Why the WebGPU delegate gave up on a graph, from the browser's log (LiteRT.js's own error
    names only a source line): "Failed to create ...: INVALID_ARGUMENT: ..." and the like."""
    failed = [line.split("] ", 1)[-1] for line in log if "Failed to create" in line]
    messages = [line.split("=== Source Location Trace")[0] for line in failed]  # then a stack of source lines
    failures = sorted({" ".join(message.split()) for message in messages})
    return "; ".join(failures)


def run_litertjs(model: str, cases: dict[int, dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], str]:
    """Every case through LiteRT.js on WebGPU in headless Chromium, in one browser session: the
    outputs and `where_it_ran` (a browser logs WebGPU errors and goes on: the answers say whether
    they mattered)."""
    node, chromium = shutil.which("node"), shutil.which("chromium") or shutil.which("chromium-browser")
    if node is None or chromium is None:
        raise RuntimeError(f"needs Node and Chromium on PATH (node: {node}, chromium: {chromium})")
    with tempfile.TemporaryDirectory(prefix="litertjs-") as scratch:
        work = Path(scratch)
        for name in ("runner.mjs", "page.html"):
            shutil.copy(LITERTJS / name, work / name)
        (work / "node_modules").symlink_to(Path(sys.prefix) / "web" / "node_modules")
        listing = []
        for index in sorted(cases):
            inputs = []
            for name, value in cases[index].items():
                file = f"case{index}.{name}.bin"
                (work / file).write_bytes(np.ascontiguousarray(value, dtype=np.float32).tobytes())
                inputs.append({"name": name, "shape": list(value.shape), "file": file})
            listing.append(inputs)
        (work / "cases.json").write_text(json.dumps(listing))
        command = [node, str(work / "runner.mjs"), "--model", str(Path(model).resolve()), "--chromium", chromium]
        done = subprocess.run(command, capture_output=True, text=True, timeout=LITERTJS_TIMEOUT_S)
        report = work / "out" / "run.json"
        if not report.exists():
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise RuntimeError(f"the browser run ended without a result: {lines[-1] if lines else done.returncode}")
        result = json.loads(report.read_text())
        if result["status"] != "ok":  # LiteRT.js's error names source lines; the log says why
            log = result.get("log", [])
            first = result["error"].strip().splitlines()[0]
            why = "; ".join(part for part in (delegate_failures(log), refused_ops(log)) if part)
            raise RuntimeError(f"{result['stage']}: {why}; {first}" if why else f"{result['stage']}: {first}")
        outputs = {}
        for index, shapes in enumerate(result["outputs"]):
            for name, spec in shapes.items():
                raw = (work / "out" / f"case{index}.{name}.bin").read_bytes()
                dtype = {"Float32Array": np.float32, "Int32Array": np.int32, "Int8Array": np.int8}[spec["dtype"]]
                outputs[f"case{index}.{name}"] = np.frombuffer(raw, dtype=dtype).reshape(spec["shape"])
    return outputs, where_it_ran(result)


def where_it_ran(result: dict[str, Any]) -> str:
    """The cell's note from the page's result and the browser's log: the adapter, how much of the
    graph WebGPU took, what it refused and the WebGPU errors the browser logged."""
    log = result.get("log", [])
    split = [GPU_SPLIT.search(line) for line in log]
    on_gpu = [(int(m.group(1)), int(m.group(2))) for m in split if m]
    where = "all ops on WebGPU" if result["fully_accelerated"] else "partly on WebGPU"
    if on_gpu:
        gpu, cpu = on_gpu[0]
        where = f"{gpu} of {gpu + cpu} ops on WebGPU, the rest on WASM" if cpu else "all ops on WebGPU"
    textures = sorted({f"{m.group(1)} x {m.group(2)}" for m in map(TEXTURE_TOO_LARGE.search, log) if m})
    errors = [f"textures of {', '.join(textures)} texels over the adapter's limit"] if textures else []
    errors += sorted({line[:120] for line in log if "exceeds max" in line or "validation error" in line.lower()})
    note = f"adapter {result['adapter']} (max 2-D texture {result['max_texture_2d']}); {where}"
    refused = refused_ops(log)
    if refused:
        note += f"; WebGPU refused: {refused}"
    if errors:
        note += f"; WebGPU errors: {', '.join(errors)}"
    return note


LOADERS = ("ai_edge_litert", "tflite_runtime", "tensorflow", "executorch", "litertjs_webgpu")


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
    if args.loader == "litertjs_webgpu":
        try:
            outputs, note = run_litertjs(args.model, cases)
        except Exception as error:  # the browser refused the file (load or run): one line
            print(json.dumps({"status": "refused", "stage": "run", "error": _one_line(error)}))
            return 0
        np.savez(args.outputs, **outputs)
        print(json.dumps({"status": "ok", "note": note}))
        return 0
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
