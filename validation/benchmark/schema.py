"""The benchmark's typed result: what benchmark.json holds and the Markdown and plot read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.contract import BATCHED_DECODER, DECODER
from pipeline.provenance import describe_machine, now

BENCHMARK_JSON = "benchmark.json"

GEMM_SHAPE = (4096, 320, 1280)
"""Rows x inputs x outputs of the encoder's largest linear layers (the last stage's MLP fc1, one
row per token of the 64 x 64 grid)."""


@dataclass(frozen=True)
class Timing:
    """Warm latency of one callable at one thread count."""

    threads: int
    median_s: float
    p90_s: float
    runs: int


@dataclass(frozen=True)
class Floor:
    """The encoder's compute floor at one thread count: its FLOPs over the best matmul rates."""

    threads: int
    encoder_gflops: float
    fp32_gflops_per_s: float
    int8_gops_per_s: float

    @property
    def fp32_floor_s(self) -> float:
        return self.encoder_gflops / self.fp32_gflops_per_s

    @property
    def int8_floor_s(self) -> float:
        return self.encoder_gflops / self.int8_gops_per_s


@dataclass
class Baseline:
    """PyTorch eager or ONNX Runtime fp32 on one part (or why it could not be timed)."""

    runtime: str
    part: str
    timings: list[Timing] = field(default_factory=list)
    error: str | None = None


@dataclass
class ArtifactBenchmark:
    target: str
    part: str
    precision: str
    file: str
    bytes: int
    runtime: str
    timings: list[Timing] = field(default_factory=list)
    peak_memory_mb: float | None = None
    """Peak resident memory added by loading and running the file (Linux VmHWM), at 2 threads."""
    error: str | None = None
    not_timed: str | None = None
    prompts_per_call: int = 1
    """B of a batched decoder file (1 for every other file)."""
    arithmetic: str | None = None
    """The arithmetic the file asks its runtime for when it is not its weights' precision (a
    TFLite fp16 encoder: "fp16", which the runner forces as a phone would run it)."""


@dataclass(frozen=True)
class SweepPoint:
    """The decoder's latency with N points per prompt (a decoder converted at that N)."""

    runtime: str
    precision: str
    num_points: int
    timing: Timing | None
    error: str | None = None


@dataclass(frozen=True)
class OpCost:
    name: str
    kernel: str  # "xnnpack int8", "xnnpack fp16", "xnnpack fp32" or "outside xnnpack"
    count: int
    ms: float


@dataclass
class OpProfile:
    target: str
    precision: str
    file: str
    threads: int
    total_ms: float
    ops: list[OpCost] = field(default_factory=list)
    error: str | None = None
    profiler: str = "ETDump"  # or "LiteRT profiler"


@dataclass
class DelegationCensus:
    """A TFLite file's ops by where LiteRT runs them: XNNPACK or its reference kernels (op name ->
    count), for every file; the encoders' ops are also timed (`OpProfile`)."""

    target: str
    precision: str
    file: str
    delegated: dict[str, int] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)
    error: str | None = None


GRID_SIDES = (8, 16, 32)


@dataclass(frozen=True)
class GridCost:
    """Segment everything's decoder time for K x K grid points, from warm per-call medians: the
    batched decoder (ceil(K^2 / B) calls) against the one-prompt decoder (K^2 calls), same
    target, precision and threads. The generator's mask post-processing is the same for both."""

    target: str
    precision: str
    threads: int
    batch: int
    one_prompt_call_s: float
    batched_call_s: float
    grid_s: dict[int, dict[str, float]]
    """K -> {"batched": s, "one_call_per_point": s} for K in GRID_SIDES."""

    @property
    def per_prompt_speedup(self) -> float:
        return self.one_prompt_call_s / (self.batched_call_s / self.batch)


@dataclass(frozen=True)
class GemmRate:
    """One runtime's own GEMM rate at one precision and thread count: a linear layer of the
    encoder's largest shape converted by the target and timed in its runtime. The floors take
    torch's rate; this is what the files' own kernels reach on the same product."""

    target: str
    precision: str
    threads: int
    gops_per_s: float | None
    error: str | None = None

    def encoder_s(self, floor: Floor) -> float | None:
        """The encoder's multiply-adds alone at this rate."""
        return None if not self.gops_per_s else floor.encoder_gflops / self.gops_per_s


@dataclass
class Benchmark:
    threads: list[int]
    floors: list[Floor]
    baselines: list[Baseline]
    artifacts: list[ArtifactBenchmark]
    sweep: list[SweepPoint]
    profiles: list[OpProfile]
    delegation: list[DelegationCensus] = field(default_factory=list)
    gemm_rates: list[GemmRate] = field(default_factory=list)
    machine: str = field(default_factory=describe_machine)
    created: str = field(default_factory=now)
    command: str = ""
    """The command that made it (empty: not recorded)."""

    def baseline(self, runtime: str, part: str, threads: int) -> Timing | None:
        for baseline in self.baselines:
            if baseline.runtime == runtime and baseline.part == part:
                return next((t for t in baseline.timings if t.threads == threads), None)
        return None

    def floor(self, threads: int) -> Floor | None:
        return next((f for f in self.floors if f.threads == threads), None)

    def ratios(self, artifact: ArtifactBenchmark, timing: Timing) -> dict[str, float]:
        """The file's median over each comparison's (below 1: faster than it)."""
        ratios = {}
        for runtime in ("pytorch", "onnxruntime"):
            other = self.baseline(runtime, artifact.part, timing.threads)
            if other is not None:
                ratios[f"vs_{runtime}"] = timing.median_s / other.median_s
        floor = self.floor(timing.threads)
        if floor is not None and artifact.part == "image_encoder":
            ratios["vs_fp32_floor"] = timing.median_s / floor.fp32_floor_s
            ratios["vs_int8_floor"] = timing.median_s / floor.int8_floor_s
        return ratios

    def grid_costs(self) -> list[GridCost]:
        singles = {(a.target, a.precision): a for a in self.artifacts if a.part == DECODER}
        costs = []
        for batched in (a for a in self.artifacts if a.part == BATCHED_DECODER):
            single = singles.get((batched.target, batched.precision))
            if single is None:
                continue
            for timing in batched.timings:
                alone = next((t for t in single.timings if t.threads == timing.threads), None)
                if alone is None:
                    continue
                b = batched.prompts_per_call
                grid = {
                    k: {"batched": -(-k * k // b) * timing.median_s, "one_call_per_point": k * k * alone.median_s}
                    for k in GRID_SIDES
                }
                costs.append(
                    GridCost(
                        batched.target, batched.precision, timing.threads, b, alone.median_s, timing.median_s, grid
                    )
                )
        return costs

    def to_json(self) -> dict:
        data = asdict(self)
        data["segment_everything"] = [
            {**asdict(cost), "per_prompt_speedup": cost.per_prompt_speedup} for cost in self.grid_costs()
        ]
        data["floors"] = [
            {**asdict(f), "fp32_floor_s": f.fp32_floor_s, "int8_floor_s": f.int8_floor_s} for f in self.floors
        ]
        for entry, artifact in zip(data["artifacts"], self.artifacts, strict=True):
            for timing_json, timing in zip(entry["timings"], artifact.timings, strict=True):
                timing_json.update(self.ratios(artifact, timing))
        return data
