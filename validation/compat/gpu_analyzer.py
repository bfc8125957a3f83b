"""TensorFlow Lite's GPU-delegate compatibility check of `.tflite` files, inside TensorFlow's own
environment (imports only tensorflow, never the project).

    python gpu_analyzer.py FILE [FILE ...]

Prints one JSON line per file: {"file": FILE, "issues": ["Op#41 GATHER_ND: Not supported op
GATHER_ND", ...], "compatible": true|false, "version": "2.16.2"}. The issues are what
`tf.lite.experimental.Analyzer.analyze(..., gpu_compatibility=True)` prints as GPU COMPATIBILITY
WARNINGs, each with the op it follows.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

WARNING = "GPU COMPATIBILITY WARNING: "
OP_LINE = re.compile(r"^\s*(Op#\d+) ([A-Z0-9_]+)\(")
COMPATIBLE = "looks compatible with GPU delegate"


def analyze(path: str) -> dict:
    import tensorflow as tf

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tf.lite.experimental.Analyzer.analyze(model_path=path, gpu_compatibility=True)
    issues, last_op = [], ""
    for line in printed.getvalue().splitlines():
        op = OP_LINE.match(line)
        if op:
            last_op = f"{op.group(1)} {op.group(2)}"
        elif line.startswith(WARNING) and "has GPU delegate compatibility issues at nodes" not in line:
            issues.append(f"{last_op}: {line[len(WARNING) :].strip()}")
    compatible = COMPATIBLE in printed.getvalue()
    return {"file": path, "issues": issues, "compatible": compatible and not issues, "version": tf.__version__}


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps(analyze(name)), flush=True)
