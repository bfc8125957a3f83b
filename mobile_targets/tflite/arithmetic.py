"""fp16 arithmetic for a `.tflite`: how a file asks XNNPACK for it, and how the desktop runner
gives it to the file the way a phone would.

A TFLite file with fp16 weights still computes in fp32 unless its `reduced_precision_support`
metadata allows fp16 inference with fp16 accumulation: then XNNPACK rewrites the graph to fp16
operators on CPUs with native fp16 arithmetic (ARMv8.2+: Android phones since about 2018, every
iPhone since the A11) and keeps fp32 elsewhere. XNNPACK counts no x86 CPU as native, so on a
desktop the same file would silently run in fp32; the runner here forces fp16 through XNNPACK's
FORCE_FP16 delegate flag (LiteRT's `CompiledModel`, the Python API that takes XNNPACK flags), so
validation, self-tests and the benchmark measure the arithmetic the phone runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError

REDUCED_PRECISION_KEY = "reduced_precision_support"
"""The model metadata XNNPACK's TFLite delegate reads (`tflite::optimize::kTfLiteReducedPrecisionKey`)."""
FP16_ARITHMETIC = "fp16accfp16"
"""fp16 inference with fp16 accumulation: the only value for which the delegate hints fp16."""

XNNPACK_FLAG_QS8 = 0x1
XNNPACK_FLAG_QU8 = 0x2
XNNPACK_FLAG_FORCE_FP16 = 0x4
XNNPACK_FLAGS_FP16 = XNNPACK_FLAG_QS8 | XNNPACK_FLAG_QU8 | XNNPACK_FLAG_FORCE_FP16
"""The delegate's default quantized-operator flags plus FORCE_FP16 (flags replace the defaults)."""


def mark_fp16_arithmetic(model_content: bytes) -> bytes:
    """The model with `reduced_precision_support = fp16accfp16` in its metadata (any earlier
    value of that key replaced); tensors and ops untouched."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))
    value = schema.BufferT()
    value.data = np.frombuffer(FP16_ARITHMETIC.encode(), dtype=np.uint8)
    model.buffers.append(value)
    entry = schema.MetadataT()
    entry.name = REDUCED_PRECISION_KEY.encode()
    entry.buffer = len(model.buffers) - 1
    kept = [m for m in (model.metadata or []) if m.name != entry.name]
    model.metadata = [*kept, entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def declared_arithmetic(path: Path) -> str:
    """ "fp16" when the file's metadata allows fp16 inference with fp16 accumulation (the rule
    XNNPACK's delegate applies: an inference type before "acc", an accumulation type after it),
    else "fp32"."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ArtifactError(f"cannot read TFLite model {path}: {error.strerror or error}") from None
    try:
        model = schema.Model.GetRootAs(data, 0)
        if not 0 <= model.MetadataLength() <= len(data) // 8:  # an entry takes 8 bytes at least
            raise ValueError(f"{model.MetadataLength()} metadata entries")
        for index in range(model.MetadataLength()):
            entry = model.Metadata(index)
            if entry.Name() != REDUCED_PRECISION_KEY.encode():
                continue
            value = model.Buffers(entry.Buffer()).DataAsNumpy()
            text = bytes(value).decode("ascii", errors="replace") if isinstance(value, np.ndarray) else ""
            inference, _, accumulation = text.partition("acc")
            return "fp16" if "fp16" in inference and "fp16" in accumulation else "fp32"
    except Exception as error:  # a damaged flatbuffer: the loader says so in one line
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = f"{path} has unreadable TFLite metadata: {type(error).__name__} {detail}"
        raise ArtifactError(message.rstrip()) from None
    return "fp32"


class ForcedFp16Signature:
    """The file's first signature in LiteRT's `CompiledModel` with XNNPACK forced to fp16, behind
    the calls the runner makes on an interpreter's signature runner (`get_input_details`,
    `get_output_details`, keyword call returning a dict)."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.options import Options

        options = Options(cpu_options=CpuOptions(num_threads=threads, xnnpack_flags=XNNPACK_FLAGS_FP16))
        self.model = CompiledModel.from_file(str(path), options=options)
        signature = self.model.get_signature_by_index(0)
        self.key = signature["key"]
        self.input_names = list(signature["inputs"])
        self.output_names = list(signature["outputs"])
        self.inputs = self.model.create_input_buffers(0)
        self.outputs = self.model.create_output_buffers(0)
        self._inputs = self._details(self.model.get_input_tensor_details(self.key))
        self._outputs = self._details(self.model.get_output_tensor_details(self.key))
        for name, detail in {**self._inputs, **self._outputs}.items():
            if detail["dtype"] != np.float32:
                raise ArtifactError(f"{path}: {name!r} is {detail['dtype']}; an fp16-arithmetic file has float32 I/O")

    @staticmethod
    def _details(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {
            name: {"dtype": np.dtype(d["dtype"]), "shape": tuple(d["shape"]), "quantization": (0.0, 0)}
            for name, d in raw.items()
        }

    def get_input_details(self) -> dict[str, dict[str, Any]]:
        return self._inputs

    def get_output_details(self) -> dict[str, dict[str, Any]]:
        return self._outputs

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        for name, buffer in zip(self.input_names, self.inputs, strict=True):
            array = np.ascontiguousarray(inputs[name], dtype=np.float32)
            shape = self._inputs[name]["shape"]
            if array.shape != shape:
                raise ArtifactError(f"input {name!r} has shape {array.shape}, the file takes {shape}")
            buffer.write(array)
        self.model.run_by_index(0, self.inputs, self.outputs)
        outputs = {}
        for name, buffer in zip(self.output_names, self.outputs, strict=True):
            shape = self._outputs[name]["shape"]
            outputs[name] = buffer.read(int(np.prod(shape)), np.float32).reshape(shape)  # a copy: outlives the call
        return outputs
