"""LiteRT's own per-op profiler for a `.tflite`, reached through libLiteRt's C API.

Why the C API: ai-edge-litert's Python `Interpreter` and `CompiledModel` expose no profiler, but
the `libLiteRt.so` they ship exports the compiled-model API with its profiler (the one
`benchmark_model --enable_op_profiling=true` prints). With the runtime option
`enable_profiling = true` LiteRT records every op it runs itself and XNNPACK records each of its
own ops inside the delegate, so the profile names what runs outside the fast kernels and what each
op costs. ctypes calls the functions as `litert/c/*.h` declare them; each status is checked.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile_targets.tflite.arithmetic import XNNPACK_FLAGS_FP16, declared_arithmetic
from pipeline.errors import ArtifactError, PipelineError

HW_ACCELERATOR_CPU = 1  # kLiteRtHwAcceleratorCpu
LOCK_MODE_WRITE = 1  # kLiteRtTensorBufferLockModeWrite
OPERATOR_INVOKE_EVENT = 1 << 1  # an op LiteRT runs in its own kernels; the tag is its name
DELEGATE_OPERATOR_EVENTS = (1 << 2) | (1 << 3)  # an op inside a delegate, XNNPACK's name for it
DEFAULT_EVENT = 1  # "Invoke" frames the whole call
RANKED_TENSOR_TYPE_BYTES = 512
"""Room for a `LiteRtRankedTensorType`, which is only read from one call and handed to the next
(its size in the headers is well under this)."""


class _MemoryUsage(ctypes.Structure):
    _fields_ = [("total", ctypes.c_size_t), ("in_use", ctypes.c_size_t), ("private", ctypes.c_size_t)]


class _ProfiledEventData(ctypes.Structure):
    """`ProfiledEventData` of litert/c/litert_profiler_event.h."""

    _fields_ = [
        ("tag", ctypes.c_char_p),
        ("event_type", ctypes.c_int),
        ("start_timestamp_us", ctypes.c_uint64),
        ("elapsed_time_us", ctypes.c_uint64),
        ("begin_mem_usage", _MemoryUsage),
        ("end_mem_usage", _MemoryUsage),
        ("event_metadata1", ctypes.c_uint64),
        ("event_metadata2", ctypes.c_uint64),
        ("event_source", ctypes.c_int),
    ]


@dataclass(frozen=True)
class ProfiledOp:
    name: str
    """XNNPACK's name for a delegated op ("Fully Connected (NC, QDU8, F32, QC8W) GEMM"), the
    builtin's for one LiteRT runs itself ("GATHER_ND")."""
    delegated: bool
    count: int
    """calls per run"""
    ms: float
    """mean time per run, all calls together"""


@dataclass(frozen=True)
class LiteRtProfile:
    total_ms: float
    """mean of the whole call (LiteRT's "Invoke" event)"""
    ops: tuple[ProfiledOp, ...]
    """most expensive first"""


def _library() -> ctypes.CDLL:
    try:
        import ai_edge_litert
    except ImportError:
        raise PipelineError("LiteRT's profiler needs ai-edge-litert: pip install ai-edge-litert") from None
    path = Path(ai_edge_litert.__file__).parent / "libLiteRt.so"
    if not path.is_file():
        raise PipelineError(f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '')} ships no {path.name}")
    return ctypes.CDLL(str(path))


class _Api:
    """libLiteRt's functions, each call's status checked."""

    def __init__(self) -> None:
        self.library = _library()

    def __call__(self, name: str, *args: object) -> None:
        function = getattr(self.library, name)
        function.restype = ctypes.c_int
        status = function(*args)
        if status != 0:
            raise ArtifactError(f"LiteRT {name} failed with status {status} (litert/c/litert_common.h names them)")

    def destroy(self, name: str, handle: ctypes.c_void_p) -> None:
        if handle.value:
            function = getattr(self.library, name)
            function.restype = None
            function(handle)


_KEEP_PAYLOAD = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda payload: None)
"""The opaque options' payloads are Python buffers, freed by Python once the model is gone."""


@contextmanager
def _compiled_model(api: _Api, path: Path, threads: int) -> Iterator[tuple[ctypes.c_void_p, ...]]:
    """(environment, model, compiled model) on the CPU accelerator (XNNPACK with `threads`
    threads, forced to fp16 for a file that asks for fp16 arithmetic, as the runner runs it) with
    profiling on; everything destroyed on exit."""
    handles: list[tuple[str, ctypes.c_void_p]] = []
    xnnpack = f"num_threads = {threads}\n"
    if declared_arithmetic(path) == "fp16":
        xnnpack += f"flags = {XNNPACK_FLAGS_FP16}\n"

    def handle(destroy: str) -> ctypes.c_void_p:
        pointer = ctypes.c_void_p()
        handles.append((destroy, pointer))
        return pointer

    payloads = [
        (b"runtime_options_string", ctypes.create_string_buffer(b"enable_profiling = true\n")),
        (b"xnnpack", ctypes.create_string_buffer(xnnpack.encode())),
    ]
    try:
        environment = handle("LiteRtDestroyEnvironment")
        api("LiteRtCreateEnvironment", 0, None, ctypes.byref(environment))
        model = handle("LiteRtDestroyModel")
        api("LiteRtCreateModelFromFile", environment, str(path).encode(), ctypes.byref(model))
        options = handle("LiteRtDestroyOptions")
        api("LiteRtCreateOptions", ctypes.byref(options))
        api("LiteRtSetOptionsHardwareAccelerators", options, HW_ACCELERATOR_CPU)
        for identifier, payload in payloads:
            opaque = ctypes.c_void_p()
            data = ctypes.cast(payload, ctypes.c_void_p)
            api("LiteRtCreateOpaqueOptions", identifier, data, _KEEP_PAYLOAD, ctypes.byref(opaque))
            api("LiteRtAddOpaqueOptions", options, opaque)  # the options own it from here
        compiled = handle("LiteRtDestroyCompiledModel")
        api("LiteRtCreateCompiledModel", environment, model, options, ctypes.byref(compiled))
        yield environment, model, compiled
    finally:
        for destroy, pointer in reversed(handles):
            api.destroy(destroy, pointer)


def _signature_buffers(
    api: _Api, environment: ctypes.c_void_p, model: ctypes.c_void_p, compiled: ctypes.c_void_p, inputs: bool
) -> list[tuple[str, ctypes.c_void_p, int]]:
    """(name, managed tensor buffer, its size in bytes) for each input or output of signature 0."""
    side = "Input" if inputs else "Output"
    signature = ctypes.c_void_p()
    api("LiteRtGetModelSignature", model, ctypes.c_size_t(0), ctypes.byref(signature))
    count = ctypes.c_size_t()
    api(f"LiteRtGetNumSignature{side}s", signature, ctypes.byref(count))
    buffers = []
    for index in range(count.value):
        name = ctypes.c_char_p()
        api(f"LiteRtGetSignature{side}Name", signature, ctypes.c_size_t(index), ctypes.byref(name))
        tensor = ctypes.c_void_p()
        api(f"LiteRtGetSignature{side}TensorByIndex", signature, ctypes.c_size_t(index), ctypes.byref(tensor))
        tensor_type = ctypes.create_string_buffer(RANKED_TENSOR_TYPE_BYTES)
        api("LiteRtGetRankedTensorType", tensor, tensor_type)
        requirements = ctypes.c_void_p()
        api(
            f"LiteRtGetCompiledModel{side}BufferRequirements",
            compiled,
            ctypes.c_size_t(0),
            ctypes.c_size_t(index),
            ctypes.byref(requirements),
        )
        buffer = ctypes.c_void_p()
        create = "LiteRtCreateManagedTensorBufferFromRequirements"
        api(create, environment, tensor_type, requirements, ctypes.byref(buffer))
        size = ctypes.c_size_t()
        api("LiteRtGetTensorBufferPackedSize", buffer, ctypes.byref(size))
        buffers.append((name.value.decode(), buffer, size.value))
    return buffers


def _write(api: _Api, buffer: ctypes.c_void_p, array: np.ndarray) -> None:
    host = ctypes.c_void_p()
    api("LiteRtLockTensorBuffer", buffer, ctypes.byref(host), LOCK_MODE_WRITE)
    try:
        contiguous = np.ascontiguousarray(array)
        ctypes.memmove(host, contiguous.ctypes.data, contiguous.nbytes)
    finally:
        api("LiteRtUnlockTensorBuffer", buffer)


def profile_ops(path: Path, inputs: dict[str, np.ndarray], threads: int, runs: int = 3) -> LiteRtProfile:
    """Per-op times of `path` (signature 0) over `runs` calls after one warm-up, on `inputs`
    (by signature name, already in the file's dtypes) with XNNPACK on `threads` threads."""
    if runs < 1:
        raise PipelineError(f"profile runs must be >= 1, got {runs}")
    api = _Api()
    with _compiled_model(api, Path(path), threads) as (environment, model, compiled):
        feeds = _signature_buffers(api, environment, model, compiled, inputs=True)
        fetches = _signature_buffers(api, environment, model, compiled, inputs=False)
        try:
            for name, buffer, size in feeds:
                if name not in inputs:
                    raise PipelineError(f"{path}: no input {name!r} to profile with (given {sorted(inputs)})")
                if inputs[name].nbytes != size:
                    raise PipelineError(
                        f"{path}: input {name!r} has {inputs[name].nbytes} bytes ({inputs[name].dtype}), "
                        f"the file's tensor takes {size}"
                    )
                _write(api, buffer, inputs[name])
            feed_array = (ctypes.c_void_p * len(feeds))(*(buffer for _, buffer, _ in feeds))
            fetch_array = (ctypes.c_void_p * len(fetches))(*(buffer for _, buffer, _ in fetches))

            def run() -> None:
                api(
                    "LiteRtRunCompiledModel",
                    compiled,
                    ctypes.c_size_t(0),
                    ctypes.c_size_t(len(feeds)),
                    feed_array,
                    ctypes.c_size_t(len(fetches)),
                    fetch_array,
                )

            run()  # warm: XNNPACK packs weights and plans memory on the first call
            profiler = ctypes.c_void_p()
            api("LiteRtCompiledModelGetProfiler", compiled, ctypes.byref(profiler))
            if not profiler.value:
                raise ArtifactError(f"{path}: LiteRT gave no profiler (runtime option enable_profiling ignored)")
            api("LiteRtResetProfiler", profiler)
            api("LiteRtStartProfiler", profiler)
            for _ in range(runs):
                run()
            api("LiteRtStopProfiler", profiler)
            count = ctypes.c_int()
            api("LiteRtGetNumProfilerEvents", profiler, ctypes.byref(count))
            events = (_ProfiledEventData * count.value)()
            api("LiteRtGetProfilerEvents", profiler, count, events)
            return summarize(events, runs)  # before the compiled model goes: its profiler owns the tags
        finally:
            for _, buffer, _ in feeds + fetches:
                api.destroy("LiteRtDestroyTensorBuffer", buffer)


def summarize(events: ctypes.Array, runs: int) -> LiteRtProfile:
    """Events into per-op means per run: ops by name and by whether XNNPACK ran them."""
    costs: dict[tuple[str, bool], list[float]] = defaultdict(lambda: [0, 0.0])
    total_us = 0.0
    for event in events:
        tag = (event.tag or b"").decode(errors="replace")
        if event.event_type == DEFAULT_EVENT and tag == "Invoke":
            total_us += event.elapsed_time_us
        elif event.event_type & (OPERATOR_INVOKE_EVENT | DELEGATE_OPERATOR_EVENTS):
            delegated = bool(event.event_type & DELEGATE_OPERATOR_EVENTS)
            cost = costs[(tag, delegated)]
            cost[0] += 1
            cost[1] += event.elapsed_time_us
    ops = [
        ProfiledOp(name, delegated, round(count / runs), us / runs / 1e3)
        for (name, delegated), (count, us) in costs.items()
    ]
    return LiteRtProfile(total_us / runs / 1e3, tuple(sorted(ops, key=lambda op: -op.ms)))
