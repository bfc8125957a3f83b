"""What each artifact's latency is compared with: PyTorch eager fp32, an ONNX Runtime fp32
export of the same two modules, and the compute floor (encoder FLOPs over this machine's
measured fp32 matmul rate). Plus peak resident memory, read from Linux's VmHWM."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.threads import torch_threads
from validation.schema import Latency

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def time_call(run: Callable[[], object], warmup: int, runs: int) -> Latency:
    """Warm latency of `run`: median and p90 over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return Latency(statistics.median(seconds), float(np.percentile(seconds, 90)), runs)


@dataclass(frozen=True)
class InterleavedTiming:
    """One variant's milliseconds in `time_interleaved`, and its median over the first variant's."""

    name: str
    median_ms: float
    min_ms: float
    ratio: float


def time_interleaved(calls: dict[str, Callable[[], object]], runs: int) -> list[InterleavedTiming]:
    """Each call over `runs` rounds that call each once in turn (after one untimed round), so
    machine noise hits all alike: for comparing variants of one file against the first."""
    for run in calls.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, run in calls.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    reference = statistics.median(next(iter(times.values())))
    return [
        InterleavedTiming(name, statistics.median(ms), min(ms), statistics.median(ms) / reference)
        for name, ms in times.items()
    ]


def reset_peak_memory() -> bool:
    """Reset the process's peak RSS (VmHWM); False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def resident_memory_mb() -> dict[str, float] | None:
    """Current and peak resident memory of this process, from /proc (Linux only)."""
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
    except OSError:
        return None
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The best GEMM rate torch reaches here, the machine's practical compute ceiling: fp32
    (`torch.mm`) or int8 (`torch._int_mm`, int32 accumulation), in G(FL)OP/s."""
    with torch_threads(threads):
        if dtype == torch.int8:
            a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
            b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
            multiply = torch._int_mm
        else:
            a, b = torch.randn(size, size), torch.randn(size, size)
            multiply = torch.mm
        multiply(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            multiply(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best / 1e9


def count_gflops(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / 1e9


def compute_floor(encoder: torch.nn.Module, image: torch.Tensor, threads: int) -> dict[str, float]:
    gflops = count_gflops(encoder, (image,))
    rate = matmul_gflops(threads)
    return {"encoder_gflops": gflops, "matmul_gflops_per_s": rate, "encoder_floor_s": gflops / rate}


def onnx_runtime_latency(
    parts: dict[str, tuple[torch.nn.Module, tuple[str, ...], tuple[str, ...], dict[str, Any]]],
    threads: int,
    timer: Callable[[Callable[[], object]], dict[str, float]],
) -> dict[str, Any]:
    """Export each part to ONNX (torch.onnx dynamo exporter) and time it in ONNX Runtime (CPU)."""
    try:
        import onnxruntime
    except ImportError as error:
        return {"error": f"onnxruntime not installed: {error}"}
    results: dict[str, Any] = {}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as folder:
        for name, (module, input_names, output_names, feeds) in parts.items():
            path = Path(folder) / f"{name}.onnx"
            try:
                args = tuple(torch.from_numpy(feeds[n]) for n in input_names)
                torch.onnx.export(
                    module, args, dynamo=True, input_names=list(input_names), output_names=list(output_names)
                ).save(str(path))
                session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                results[name] = timer(lambda session=session, feeds=feeds: session.run(None, feeds))
            except Exception as error:  # a baseline failing must not stop validation
                log.warning("ONNX Runtime baseline for %s failed: %s", name, error)
                results[name] = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}
    return results
