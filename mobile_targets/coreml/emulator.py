"""Run a saved `.mlpackage` on Linux: its MIL program, op by op, in torch.

Core ML itself only runs on Apple platforms, and coremltools on Linux can convert and save
but not predict. This emulator reads what the package holds (the spec protobuf in
`Data/com.apple.CoreML/model.mlmodel` and the weight blobs, through coremltools'
`libmilstoragepython`) and executes the `main` function with the kernels of `mil_ops`.

Two precision modes:
- "fp16" honours the dtypes the program declares: every op computes in fp32 and its output
  is rounded to fp16 where the program says fp16, as Core ML's fp16 compute rounds each
  op's result (GPU and Neural Engine). This is the mode that validates fp16 packages.
- "fp32" keeps every value in fp32 (fp16 constants are still the rounded ones in the file):
  the error of the stored weights alone.

It is an emulation, not Core ML: fused kernels, accumulation order and the Neural Engine's
own arithmetic differ. Reports say "emulated" wherever these numbers appear.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_targets.coreml.mil_ops import KERNELS, unpack_bits
from pipeline.errors import ArtifactError

MODES = ("fp16", "fp32")
SPEC_RELATIVE_PATH = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_RELATIVE_PATH = Path("Data/com.apple.CoreML/weights")

VARIADIC_INPUTS = {("concat", "values"), ("stack", "values")}
"""Inputs that take a list of values even when the list has one element."""

_SUB_BYTE_BITS = {"INT4": 4, "UINT1": 1, "UINT2": 2, "UINT3": 3, "UINT4": 4, "UINT6": 6}
_BYTES_DTYPES = {
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT16": np.int16,
    "UINT16": np.uint16,
    "INT32": np.int32,
    "UINT32": np.uint32,
}
_BLOB_READERS = {
    "FLOAT32": "read_float_data",
    "FLOAT16": "read_fp16_data",
    "INT8": "read_int8_data",
    "UINT8": "read_uint8_data",
    "INT16": "read_int16_data",
    "UINT16": "read_uint16_data",
    "INT32": "read_int32_data",
    "UINT32": "read_uint32_data",
    "INT4": "read_int4_data",
    "UINT1": "read_uint1_data",
    "UINT2": "read_uint2_data",
    "UINT3": "read_uint3_data",
    "UINT4": "read_uint4_data",
    "UINT6": "read_uint6_data",
}


class UnsupportedOpError(ArtifactError):
    """The program uses an op the emulator has no kernel for."""


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class Operation:
    """One non-constant op: arguments are ("var", name) or ("value", decoded constant)."""

    type: str
    name: str
    arguments: dict[str, Any]
    outputs: tuple[tuple[str, TensorType], ...]


def _dtype_name(code: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


def tensor_type(value_type: Any) -> TensorType:
    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise ArtifactError(f"value type {kind!r} is not supported by the emulator (only tensors)")
    tensor = value_type.tensorType
    dims = []
    for dim in tensor.dimensions:
        if dim.WhichOneof("dimension") != "constant":
            return TensorType(_dtype_name(tensor.dataType), None)
        dims.append(int(dim.constant.size))
    return TensorType(_dtype_name(tensor.dataType), tuple(dims))


def _as_torch(array: np.ndarray, dtype: str) -> Any:
    """Floats become fp32 tensors (fp16 values are exact in fp32), integers int64, bools bool."""
    if dtype == "STRING":
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(array).reshape(-1)]
        return values[0] if np.asarray(array).ndim == 0 or len(values) == 1 else values
    array = np.asarray(array)
    if dtype == "BOOL":
        return torch.from_numpy(array.astype(bool))
    if dtype.startswith("FLOAT"):
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(array.astype(np.int64))


class _WeightFiles:
    """Blob readers per weight file, opened lazily."""

    def __init__(self, package: Path) -> None:
        self.package = package
        self.readers: dict[Path, Any] = {}

    def read(self, file_name: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        from coremltools.libmilstoragepython import _BlobStorageReader

        path = self.package / WEIGHTS_RELATIVE_PATH / file_name.split("/")[-1]
        if not path.is_file():
            raise ArtifactError(f"{self.package}: weight file {path.name} is missing")
        if dtype not in _BLOB_READERS:
            raise ArtifactError(f"{self.package}: weights of dtype {dtype} are not supported by the emulator")
        if path not in self.readers:
            self.readers[path] = _BlobStorageReader(str(path))
        try:
            data = getattr(self.readers[path], _BLOB_READERS[dtype])(offset)
        except Exception as error:  # the C++ reader raises RuntimeError/ValueError variants
            raise ArtifactError(
                f"{self.package}: cannot read {dtype} weights at offset {offset} of {path.name}: {error}"
            ) from None
        data = np.asarray(data)
        if dtype == "FLOAT16":
            data = data.view(np.float16)
        expected = int(np.prod(shape))
        if data.size != expected:
            raise ArtifactError(
                f"{self.package}: weights at offset {offset} of {path.name} hold {data.size} values, "
                f"expected {expected} for shape {list(shape)}"
            )
        return data.reshape(shape)


def _decode_value(value: Any, weights: _WeightFiles) -> Any:
    """A MIL `Value` (immediate or in a weight blob) as a torch tensor, str or list of str."""
    declared = tensor_type(value.type)
    dtype, shape = declared.dtype, declared.shape or ()
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        array = weights.read(value.blobFileValue.fileName, value.blobFileValue.offset, dtype, shape)
        return _as_torch(array, dtype)
    if kind != "immediateValue" or value.immediateValue.WhichOneof("value") != "tensor":
        raise ArtifactError(f"constant of kind {kind!r} is not supported by the emulator")
    tensor = value.immediateValue.tensor
    field = tensor.WhichOneof("value")
    if field == "bytes":
        raw = tensor.bytes.values
        if dtype in _SUB_BYTE_BITS:
            count = int(np.prod(shape))
            array = unpack_bits(np.frombuffer(raw, np.uint8), _SUB_BYTE_BITS[dtype], count).astype(np.int64)
            if dtype == "INT4":
                array = np.where(array >= 8, array - 16, array)
        else:
            array = np.frombuffer(raw, _BYTES_DTYPES[dtype])
    elif field == "strings":
        return _as_torch(np.array(list(tensor.strings.values), dtype=object).reshape(shape), "STRING")
    else:
        array = np.array(list(getattr(tensor, field).values))
    return _as_torch(array.reshape(shape), dtype)


def decode_immediate(value: Any) -> Any:
    """A MIL `Value` held in the spec itself (no weight blob), decoded; None for one it cannot."""
    try:
        return _decode_value(value, weights=None)  # type: ignore[arg-type]  # immediates read no blob
    except ArtifactError:
        return None


def _binding(binding: Any, weights: _WeightFiles) -> tuple[str, Any]:
    if binding.WhichOneof("binding") == "name":
        return ("var", binding.name)
    return ("value", _decode_value(binding.value, weights))


ROUNDING_CHUNK = 1 << 16
"""Elements rounded per step in place: the fp16 temporary stays in cache, and no op output is
allocated twice (allocating and first touching large tensors cost more than the rounding)."""


def _owns_its_storage(value: torch.Tensor) -> bool:
    """Every element of the storage is one element of `value` (contiguous or permuted, not a view)."""
    return (
        value.storage_offset() == 0
        and value.untyped_storage().nbytes() == value.numel() * value.element_size()
        and all(stride > 0 for stride, size in zip(value.stride(), value.shape, strict=True) if size > 1)
    )


def _round_half_in_place(value: torch.Tensor) -> torch.Tensor:
    """`value.half().float()`, bit for bit, written over `value` (a fresh fp32 tensor that owns
    its storage, in any dimension order: the storage is rounded as one flat array)."""
    flat = value.view(-1) if value.is_contiguous() else torch.empty(0).set_(value.untyped_storage())
    for start in range(0, flat.numel(), ROUNDING_CHUNK):
        part = flat[start : start + ROUNDING_CHUNK]
        part.copy_(part.half())
    return value


def _round_to(value: Any, dtype: str, mode: str, shared: Collection[int] = (), exact: Collection[int] = ()) -> Any:
    """Store an op's result as the program declares it (fp16 rounding only in fp16 mode).

    `shared`: the storages of the op's inputs; an output that is a view of one of them (a
    reshape, a slice, a constant passed through) is never rounded in place: it is left as it is
    when that input is already fp16-exact (`exact`: a view holds only its values), else rounded
    into a new tensor. A fresh output is rounded in place."""
    if not isinstance(value, torch.Tensor):
        return value
    if dtype == "FLOAT16":
        value = value.float()
        if mode != "fp16":
            return value
        storage = value.untyped_storage().data_ptr()
        if storage in exact:
            return value
        if storage not in shared and _owns_its_storage(value):
            return _round_half_in_place(value)
        return value.half().float()
    if dtype.startswith("FLOAT"):
        return value.float()
    if dtype == "BOOL":
        return value.bool()
    return value.to(torch.int64)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Where glibc's dynamic mmap threshold settles in a process that frees large blocks (its
DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; the trim threshold follows at twice that)."""
_REUSE_THRESHOLD = 1 << 30


@contextmanager
def _reused_heap() -> Iterator[None]:
    """glibc keeps freed op outputs for the next op during a run instead of unmapping them.

    Why: every op allocates its output anew, and glibc serves large blocks by mmap, so each
    output is zero-filled page by page and unmapped when freed; for a batched decoder that was a
    third of a call. Afterwards the thresholds go back to where glibc's own adjustment settles
    and the freed memory is returned to the OS (malloc_trim), so other runtimes in the process
    and the memory figures after a run are as without it. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _REUSE_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_THRESHOLD)
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_SETTLED_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def _storages(values: Any) -> set[int]:
    """The storage addresses of every tensor among `values` (lists included)."""
    found: set[int] = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, list | tuple):
            found |= _storages(value)
    return found


def read_model_spec(package: Path) -> Any:
    """The package's Model protobuf; one-line ArtifactError for anything that is not a package."""
    from coremltools.proto import Model_pb2

    package = Path(package)
    if not package.exists():
        raise ArtifactError(f"Core ML package not found: {package}")
    if not package.is_dir():
        raise ArtifactError(f"{package} is not a .mlpackage (expected a folder with Manifest.json)")
    manifest = package / "Manifest.json"
    try:
        json.loads(manifest.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{package} is not a .mlpackage: Manifest.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{package}: Manifest.json is not valid JSON ({error})") from None
    spec_path = package / SPEC_RELATIVE_PATH
    if not spec_path.is_file():
        raise ArtifactError(f"{package}: the model spec {SPEC_RELATIVE_PATH} is missing")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except Exception as error:  # protobuf's DecodeError
        raise ArtifactError(f"{package}: the model spec is not a valid Core ML protobuf ({error})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise ArtifactError(f"{package}: holds a {spec.WhichOneof('Type')!r} model, expected an ML Program")
    return spec


class MilProgram:
    """The `main` function of a saved ML Program, ready to run; constants decoded once."""

    def __init__(self, package: Path, function: str = "main") -> None:
        self.package = Path(package)
        self.spec = read_model_spec(self.package)
        program = self.spec.mlProgram
        if function not in program.functions:
            raise ArtifactError(f"{self.package}: no function {function!r} (has {list(program.functions)})")
        main = program.functions[function]
        block = main.block_specializations[main.opset]
        self.inputs = {spec.name: tensor_type(spec.type) for spec in main.inputs}
        self.output_names = tuple(block.outputs)
        weights = _WeightFiles(self.package)
        self.constants: dict[str, Any] = {}
        self.operations: list[Operation] = []
        self.var_shapes: dict[str, tuple[int, ...] | None] = {n: t.shape for n, t in self.inputs.items()}
        self.var_dtypes: dict[str, str] = {n: t.dtype for n, t in self.inputs.items()}
        """Every input's, constant's and op output's declared dtype: FLOAT16 values are fp16-exact in fp16 mode."""
        for op in block.operations:
            self._add(op, weights)

    def _add(self, op: Any, weights: _WeightFiles) -> None:
        name = op.outputs[0].name if op.outputs else op.type
        if op.blocks:
            raise UnsupportedOpError(
                f"{self.package}: op {op.type!r} ({name}) has nested blocks (control flow), "
                "which the Core ML emulator does not run"
            )
        if op.type == "const":
            self.constants[name] = _decode_value(op.attributes["val"], weights)
            self.var_dtypes[name] = tensor_type(op.attributes["val"].type).dtype
            return
        if op.type not in KERNELS:
            raise UnsupportedOpError(
                f"{self.package}: MIL op {op.type!r} ({name}) is not implemented by the Core ML emulator "
                f"(it runs {len(KERNELS)} op types; see mobile_targets/coreml/mil_ops.py)"
            )
        arguments: dict[str, Any] = {}
        for key, attribute in op.attributes.items():
            if key != "name":
                arguments[key] = ("value", _decode_value(attribute, weights))
        for key, argument in op.inputs.items():
            bound = [_binding(binding, weights) for binding in argument.arguments]
            arguments[key] = ("list", bound) if (op.type, key) in VARIADIC_INPUTS or len(bound) > 1 else bound[0]
        outputs = tuple((output.name, tensor_type(output.type)) for output in op.outputs)
        operation = Operation(op.type, name, arguments, outputs)
        for output_name, output_type in outputs:
            self.var_shapes[output_name] = output_type.shape
            self.var_dtypes[output_name] = output_type.dtype
        if op.type.startswith("constexpr_"):
            # compressed weights: decompress once, in the declared dtype, as Core ML does at load
            values = self._execute(operation, self.constants, "fp16")
            for (output_name, _), value in zip(outputs, values, strict=True):
                self.constants[output_name] = value
            return
        self.operations.append(operation)

    @property
    def op_types(self) -> set[str]:
        return {op.type for op in self.operations}

    def _resolve(self, argument: tuple[str, Any], env: dict[str, Any]) -> Any:
        kind, payload = argument
        if kind == "value":
            return payload
        if kind == "list":
            return [self._resolve(item, env) for item in payload]
        if payload in env:
            return env[payload]
        return self.constants[payload]

    def _execute(self, op: Operation, env: dict[str, Any], mode: str) -> tuple[Any, ...]:
        arguments = {key: self._resolve(argument, env) for key, argument in op.arguments.items()}
        try:
            result = KERNELS[op.type](**arguments)
        except (TypeError, ValueError, RuntimeError, IndexError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ArtifactError(f"{self.package}: op {op.type!r} ({op.name}) failed: {message}") from None
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise ArtifactError(f"{self.package}: op {op.name} gave {len(results)} outputs, declares {len(op.outputs)}")
        shared = _storages(arguments.values())
        exact = self._fp16_exact_storages(op.arguments.values(), env) if mode == "fp16" else set()
        return tuple(
            _round_to(value, output_type.dtype, mode, shared, exact)
            for value, (_, output_type) in zip(results, op.outputs, strict=True)
        )

    def _fp16_exact_storages(self, arguments: Any, env: dict[str, Any]) -> set[int]:
        """Storages of the arguments whose every value is already an fp16 value (declared FLOAT16)."""
        found: set[int] = set()
        for kind, payload in arguments:
            if kind == "list":
                found |= self._fp16_exact_storages(payload, env)
            elif kind == "var" and self.var_dtypes.get(payload) == "FLOAT16":
                value = self._resolve((kind, payload), env)
                if isinstance(value, torch.Tensor):
                    found.add(value.untyped_storage().data_ptr())
        return found

    def run(
        self, inputs: dict[str, np.ndarray], mode: str = "fp16", intermediates: Collection[str] = ()
    ) -> dict[str, np.ndarray]:
        """Named float32 arrays in, named float32 arrays out: the program's outputs, and the
        values of the `intermediates` named (what coremltools' calibration asks for)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        env: dict[str, Any] = {}
        for name, declared in self.inputs.items():
            if name not in inputs:
                raise ArtifactError(f"{self.package}: input {name!r} is missing (program inputs: {list(self.inputs)})")
            array = np.asarray(inputs[name])
            if declared.shape is not None and tuple(array.shape) != declared.shape:
                raise ArtifactError(
                    f"{self.package}: input {name!r} has shape {list(array.shape)}, expected {list(declared.shape)}"
                )
            env[name] = _round_to(_as_torch(array, declared.dtype), declared.dtype, mode)
        with torch.no_grad(), _reused_heap():
            for op in self.operations:
                for (output_name, _), value in zip(op.outputs, self._execute(op, env, mode), strict=True):
                    env[output_name] = value
        names = (*self.output_names, *(name for name in intermediates if name not in self.output_names))
        return {name: self._resolve(("var", name), env).float().numpy() for name in names}


# --- fp16 twin check ---------------------------------------------------------------------


def _canonical_arguments(program: MilProgram) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Each compute op (casts skipped) with its arguments reduced to where they come from."""
    origin: dict[str, Any] = {name: ("input", name) for name in program.inputs}
    sequence = []
    for op in program.operations:
        if op.type == "cast":
            origin[op.outputs[0][0]] = _origin(op.arguments["x"], origin, program)
            continue
        passed_through = _identity_input(op, program)
        if passed_through is not None:
            origin[op.outputs[0][0]] = _origin(passed_through, origin, program)
            continue
        arguments = []
        for key in sorted(op.arguments):
            argument = op.arguments[key]
            items = argument[1] if argument[0] == "list" else [argument]
            arguments.extend((key, _origin(item, origin, program)) for item in items)
        for index, (output_name, _) in enumerate(op.outputs):
            origin[output_name] = ("op", len(sequence), index)
        sequence.append((op.type, arguments))
    return sequence


_NEUTRAL_CONSTANTS = {("add", "y"): 0.0, ("add", "x"): 0.0, ("sub", "y"): 0.0, ("mul", "y"): 1.0, ("mul", "x"): 1.0}


def _identity_input(op: Operation, program: MilProgram) -> tuple[str, Any] | None:
    """The input an op passes through unchanged (x + 0, x * 1), or None.

    coremltools drops such ops in fp16 but may keep them in fp32 (a zero LayerNorm bias of
    randomly initialised weights), so the twin check sees through them on both sides.
    """
    for (op_type, key), neutral in _NEUTRAL_CONSTANTS.items():
        if op.type != op_type or key not in op.arguments:
            continue
        kind, payload = op.arguments[key]
        value = payload if kind == "value" else program.constants.get(payload) if kind == "var" else None
        if isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.all(value == neutral)):
            other = op.arguments["x" if key == "y" else "y"]
            if op.outputs[0][1].shape is not None and op.outputs[0][1].shape == _shape_of(other, program):
                return other
    return None


def _shape_of(argument: tuple[str, Any], program: MilProgram) -> tuple[int, ...] | None:
    kind, payload = argument
    if kind == "value":
        return tuple(payload.shape) if isinstance(payload, torch.Tensor) else None
    if kind == "var" and payload in program.constants:
        return tuple(program.constants[payload].shape)
    if kind == "var":
        return program.var_shapes.get(payload)
    return None


def _origin(argument: tuple[str, Any], origin: dict[str, Any], program: MilProgram) -> Any:
    kind, payload = argument
    if kind == "value":
        return ("const", payload)
    if payload in origin:
        return origin[payload]
    return ("const", program.constants[payload])


def _same_constant(reference: Any, candidate: Any) -> bool:
    """Equal, or `candidate` is `reference` rounded to fp16 (compared bit for bit)."""
    if not isinstance(reference, torch.Tensor) or not isinstance(candidate, torch.Tensor):
        return reference == candidate
    if reference.shape != candidate.shape:
        return False
    if torch.equal(reference, candidate):
        return True
    if reference.is_floating_point() and candidate.is_floating_point():
        rounded = reference.numpy().astype(np.float16).view(np.uint16)
        return bool(np.array_equal(rounded, candidate.numpy().astype(np.float16).view(np.uint16)))
    return False


def fp16_twin_differences(fp32_program: MilProgram, fp16_program: MilProgram, limit: int = 5) -> list[str]:
    """How an fp16 package differs from its fp32 twin beyond casts and fp16-rounded constants.

    Exact checks catch wrong kernels on fp32 packages; on fp16 packages such bugs drown in
    rounding noise, so the fp16 package is checked structurally against the fp32 one instead.
    """
    reference, candidate = _canonical_arguments(fp32_program), _canonical_arguments(fp16_program)
    differences = []
    if len(reference) != len(candidate):
        differences.append(f"{len(reference)} compute ops in fp32, {len(candidate)} in fp16")
    for index, ((type_a, args_a), (type_b, args_b)) in enumerate(zip(reference, candidate, strict=False)):
        if type_a != type_b:
            differences.append(f"op {index}: {type_a} in fp32, {type_b} in fp16")
        elif [k for k, _ in args_a] != [k for k, _ in args_b]:
            differences.append(f"op {index} ({type_a}): arguments differ")
        else:
            for (key, a), (_, b) in zip(args_a, args_b, strict=True):
                if a[0] != b[0] or (a[0] == "const" and not _same_constant(a[1], b[1])) or (a[0] != "const" and a != b):
                    differences.append(f"op {index} ({type_a}): argument {key} differs")
        if len(differences) >= limit:
            break
    return differences
