"""The validate report as typed data: what the gates, report.md, report.html and the tests read.

`Report.to_json()` gives report.json (schema_version 2); nothing else spells out its keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.fp16_range import Fp16Headroom
from pipeline.manifest import NeuralEngineCensus
from pipeline.provenance import describe_machine, now

REPORT_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Summary:
    """mean, min and 5th percentile over the prompts that define a value."""

    mean: float
    min: float
    p5: float
    defined: int

    @classmethod
    def of(cls, values: list[float | None]) -> Summary | None:
        """None when no prompt defines the value. A NaN is a failure, never a value to skip: it
        makes mean, min and p5 NaN, which no gate passes."""
        defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if defined.size == 0:
            return None
        if np.isnan(defined).any():
            return cls(float("nan"), float("nan"), float("nan"), int(defined.size))
        return cls(float(defined.mean()), float(defined.min()), float(np.percentile(defined, 5)), int(defined.size))


def nan_min(values: list[float]) -> float:
    """min where any NaN (or no value) makes the result NaN, a failure."""
    array = np.asarray(values, dtype=np.float64)
    return float("nan") if array.size == 0 or np.isnan(array).any() else float(array.min())


def nan_max(values: list[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    return float("nan") if array.size == 0 or np.isnan(array).any() else float(array.max())


@dataclass(frozen=True)
class KindScores:
    """One prompt kind: a decoder file (on PyTorch's embeddings) or a pair (end to end) against
    PyTorch, plus ground truth and the teacher where there are some."""

    prompts: int
    mask_iou: Summary
    mask_iou_all4: Summary
    mask_iou_confident: Summary | None
    same_index_rate: float
    logits_psnr_db_min: float
    logits_max_abs_error: float
    logits_cosine_min: float
    iou_predictions_psnr_db_min: float
    iou_predictions_max_abs_error: float
    ground_truth_iou_pytorch: Summary | None = None
    ground_truth_iou_file: Summary | None = None
    teacher_iou_pytorch: Summary | None = None
    teacher_iou_file: Summary | None = None


@dataclass(frozen=True)
class EncoderScores:
    psnr_db_min: float
    max_abs_error: float
    cosine_min: float
    images: int


@dataclass(frozen=True)
class SelftestScores:
    """A file scored on its self-test vectors only: what it measured on them in its own runtime
    when it was converted (the manifest's record of the sha256-checked file), and why only there."""

    reason: str
    cases: tuple[str, ...]
    psnr_db_min: dict[str, float]
    mask_iou_min: float | None = None


@dataclass(frozen=True)
class Latency:
    median_s: float
    p90_s: float
    runs: int


@dataclass(frozen=True)
class Memory:
    rss_before_mb: float
    peak_rss_mb: float
    peak_increase_mb: float


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: tuple[str, ...]


def worst_kind_mean_iou(kinds: dict[str, KindScores] | None) -> float:
    """The summary table's one agreement figure for a decoder: the lowest per-kind mean IoU."""
    return nan_min([k.mask_iou.mean for k in kinds.values()]) if kinds else float("nan")


def min_logits_psnr(kinds: dict[str, KindScores] | None) -> float:
    return nan_min([k.logits_psnr_db_min for k in kinds.values()]) if kinds else float("nan")


@dataclass(frozen=True)
class HeadroomRow:
    """One op of a file that computes in fp16: its largest |output| on the calibration photos."""

    op: str
    """The ATen op and the module it runs in."""
    max_abs: float
    headroom: float
    """How many times max_abs fits under fp16's largest value."""


@dataclass(frozen=True)
class Fp16HeadroomResult:
    """What the conversion measured for a file that computes in fp16 (the manifest's `fp16_headroom`)."""

    margin: float
    tightest: tuple[HeadroomRow, ...]
    under_margin: int
    kept_fp32: int
    """Ops the file computes in fp32 for headroom (under the margin, and the ops that read them)."""

    @classmethod
    def of(cls, measured: Fp16Headroom | None) -> Fp16HeadroomResult | None:
        if measured is None:
            return None
        rows = tuple(
            HeadroomRow(
                op=f"{layer.op} in {layer.module or 'the top level'}", max_abs=layer.max_abs, headroom=layer.headroom
            )
            for layer in measured.tightest
        )
        return cls(measured.margin, rows, len(measured.below_margin), len(measured.kept_fp32))


@dataclass(frozen=True)
class NeuralEngineResult:
    """A Core ML package's or Core AI asset's ops the Neural Engine is known not to run (the
    manifest's `neural_engine`)."""

    ops: int
    outside: dict[str, int]
    sources: dict[str, str]

    @classmethod
    def of(cls, census: NeuralEngineCensus | None) -> NeuralEngineResult | None:
        return None if census is None else cls(census.ops, dict(census.outside), dict(census.sources))


@dataclass
class ArtifactResult:
    target: str
    part: str
    precision: str
    file: str
    bytes: int
    error: str | None = None
    load_s: float | None = None
    encoder: EncoderScores | None = None
    decoder: dict[str, KindScores] | None = None
    non_finite_outputs: dict[str, int] = field(default_factory=dict)
    latency: Latency | None = None
    memory: Memory | None = None
    gate: GateResult | None = None
    selftest_only: SelftestScores | None = None
    """Set when the file was scored on its self-test vectors only (`encoder`/`decoder` stay None)."""
    fp16_headroom: Fp16HeadroomResult | None = None
    neural_engine: NeuralEngineResult | None = None

    @property
    def name(self) -> str:
        return f"{self.target} {self.part} {self.precision}"


@dataclass
class PairResult:
    """An encoder file into a decoder file of the same target, photo to mask, against PyTorch."""

    target: str
    encoder_file: str
    decoder_file: str
    encoder_precision: str
    decoder_precision: str
    bytes: int
    decoder: dict[str, KindScores] | None = None
    non_finite_outputs: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    gate: GateResult | None = None
    not_run: str | None = None
    """Why the pair was not run on the photos (a file scored on its self-test vectors only); no gate."""

    @property
    def name(self) -> str:
        return f"{self.target} {self.encoder_precision} encoder + {self.decoder_precision} decoder"


@dataclass
class EverythingPhoto:
    """One photo segmented everything: for each SamAutomaticMaskGenerator mask the best IoU among ours."""

    image_id: int
    reference_count: int
    our_count: int
    matched: int
    best_iou_mean: float | None
    best_iou_min: float | None
    reproduced: bool


@dataclass
class EverythingResult:
    """Segment everything with an encoder file and a batched decoder file of one target, against
    segment-anything's SamAutomaticMaskGenerator on the PyTorch weights (same grid and thresholds)."""

    target: str
    encoder_file: str
    decoder_file: str
    encoder_precision: str
    decoder_precision: str
    thresholds: str
    options: dict[str, float]
    photos: list[EverythingPhoto] = field(default_factory=list)
    prompts: int = 0
    decoder_calls: int = 0
    decoder_s: float | None = None
    error: str | None = None
    gate: GateResult | None = None
    """Only fp32 pairs are gated: every reference mask matched at IoU >= 0.95 and the same count."""

    @property
    def name(self) -> str:
        return (
            f"{self.target} segment everything ({self.encoder_precision} encoder + {self.decoder_precision} "
            f"batched decoder, {self.thresholds})"
        )


@dataclass(frozen=True)
class ComputeFloor:
    encoder_gflops: float
    matmul_gflops_per_s: float
    encoder_floor_s: float


@dataclass
class Baselines:
    """PyTorch eager and ONNX Runtime fp32 latency per part (or the error), the compute floor."""

    pytorch: dict[str, Latency] = field(default_factory=dict)
    onnxruntime: dict[str, Latency | str] = field(default_factory=dict)
    compute_floor: ComputeFloor | None = None


@dataclass
class RunResult:
    """One target's manifest: its files and pairs, or the one line why it could not be validated."""

    manifest: str
    target: str
    error: str | None = None
    runtime: str = ""
    emulated: str | None = None
    """Why this target's latencies say nothing about a phone (its files run emulated), or None."""
    weights: str = ""
    random_weights: bool = False
    conversion_failures: list[dict[str, str]] = field(default_factory=list)
    not_made: list[dict[str, str]] = field(default_factory=list)
    """Optional files (batched decoder) left out at conversion because they missed their gate."""
    prompt_cases: list[dict[str, Any]] = field(default_factory=list)
    baselines: Baselines = field(default_factory=Baselines)
    teacher: dict[str, KindScores] | None = None
    """The PyTorch student against the teacher, per prompt kind (only with --teacher-checkpoint)."""
    artifacts: list[ArtifactResult] = field(default_factory=list)


@dataclass(frozen=True)
class CrossCheck:
    part: str
    precision: str
    basis: str
    """"held-out photos" (both files run on every photo) or "self-test vectors"."""
    coreml: str
    """The Core ML file (emulator) against PyTorch."""
    coreai: str
    """The Core AI file (Apple's runtime) against PyTorch."""
    between_psnr_db: float | None = None
    """Encoders on held-out photos: the lowest PSNR of Core ML's embeddings against Core AI's."""
    verdict: str = "agree"

    @property
    def agrees(self) -> bool:
        return self.verdict == "agree"


@dataclass
class Report:
    settings: dict[str, Any]
    photos: str
    ground_truth: bool
    gates: dict[str, dict[str, float]]
    teacher: str | None = None
    runs: list[RunResult] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    everything: list[EverythingResult] = field(default_factory=list)
    crosscheck: list[CrossCheck] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each section of the run (PyTorch reference, each target's files, pairs, ...)."""
    """Core ML's emulator against Apple's Core AI runtime, part by part (when both were converted)."""
    schema_version: int = REPORT_SCHEMA_VERSION
    machine: str = field(default_factory=describe_machine)
    created: str = field(default_factory=now)
    command: str = ""
    """The command that made it (empty: not recorded)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def failures(self) -> list[str]:
        """One line per failure: a run not validated, a conversion that failed, a file or a pair
        below its gate (or not loadable), naming it and why."""
        lines = []
        for run in self.runs:
            if run.error:
                lines.append(f"{run.target}: {run.error}")
            for failure in run.conversion_failures:
                lines.append(
                    f"{run.target} {failure['part']} {failure['precision']}: conversion failed: {failure['error']}"
                )
            lines += [f"{a.name}: {'; '.join(a.gate.failures)}" for a in run.artifacts if a.gate and not a.gate.passed]
        lines += [f"pair {p.name}: {'; '.join(p.gate.failures)}" for p in self.pairs if p.gate and not p.gate.passed]
        lines += [f"{e.name}: {'; '.join(e.gate.failures)}" for e in self.everything if e.gate and not e.gate.passed]
        lines += [
            f"Core ML against Core AI, {c.part} {c.precision}: {c.verdict}" for c in self.crosscheck if not c.agrees
        ]
        return lines


@dataclass
class ValidateCost:
    """What validate with its defaults costs on a Core ML convert folder (benchmarks/validate_time.py):
    the emulator's seconds per call of each file, and each section of the run."""

    emulator_call_s: dict[str, float] = field(default_factory=dict)
    validate_s: float | None = None
    sections_s: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    convert_s: float | None = None
    machine: str = field(default_factory=describe_machine)
    created: str = field(default_factory=now)
    command: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
