"""report.md: the tables people read, from the typed report (the HTML page shows the same rows)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.contract import DECODER_PARTS
from validation.schema import (
    ArtifactResult,
    KindScores,
    Latency,
    PairResult,
    Report,
    RunResult,
    min_logits_psnr,
    worst_kind_mean_iou,
)

SUMMARY_HEADER = (
    "file",
    "MB",
    "ms (median)",
    "x PyTorch",
    "x ONNX Runtime",
    "x floor",
    "peak MB",
    "gate",
    "agreement with PyTorch",
)
KIND_HEADER = ("file or pair", "prompt kind", "prompts", "mask IoU mean / min / p5", "confident IoU", "logits PSNR min")


def _ratio(median: float, baseline: Latency | str | None) -> str:
    return f"{median / baseline.median_s:.2f}" if isinstance(baseline, Latency) else "-"


def agreement_figure(result: ArtifactResult | PairResult) -> str:
    """One short agreement figure: embeddings PSNR for an encoder; for a decoder or a pair, the
    worst prompt kind's mean mask IoU and the lowest logit PSNR."""
    if result.error:
        return f"ERROR: {result.error}"
    if isinstance(result, PairResult) and result.not_run:
        return f"not run on the photos: {result.not_run}"
    if isinstance(result, ArtifactResult) and result.selftest_only is not None:
        scores = result.selftest_only
        iou = "" if scores.mask_iou_min is None else f", mask IoU {scores.mask_iou_min:.3f}"
        worst = min(scores.psnr_db_min.values()) if scores.psnr_db_min else float("nan")
        return f"self-test vectors only ({len(scores.cases)} cases): PSNR {worst:.1f} dB{iou}"
    if isinstance(result, ArtifactResult) and result.encoder is not None:
        return f"embeddings PSNR {result.encoder.psnr_db_min:.1f} dB"
    return f"IoU {worst_kind_mean_iou(result.decoder):.3f} (worst kind), PSNR {min_logits_psnr(result.decoder):.1f} dB"


def summary_rows(report: Report) -> list[list[str]]:
    """One row per file: size, latency and its ratios, peak memory, gate, one agreement figure."""
    rows = []
    for run in report.runs:
        for artifact in run.artifacts:
            gate = "pass" if artifact.gate and artifact.gate.passed else "FAIL"
            size = f"{artifact.bytes / 1e6:.1f}"
            if artifact.error or artifact.latency is None:
                rows.append([artifact.name, size, "-", "-", "-", "-", "-", gate, agreement_figure(artifact)])
                continue
            median = artifact.latency.median_s
            floor = run.baselines.compute_floor
            if run.emulated:  # the emulator's time says nothing about a phone: no ratios
                memory = f"{artifact.memory.peak_increase_mb:.0f}" if artifact.memory else "-"
                emulated = f"{median * 1000:.0f} (emulated)"
                rows.append([artifact.name, size, emulated, "-", "-", "-", memory, gate, agreement_figure(artifact)])
                continue
            rows.append(
                [
                    artifact.name,
                    size,
                    f"{median * 1000:.0f}",
                    _ratio(median, run.baselines.pytorch.get(artifact.part)),
                    _ratio(median, run.baselines.onnxruntime.get(artifact.part)),
                    f"{median / floor.encoder_floor_s:.1f}" if floor and artifact.part == "image_encoder" else "-",
                    f"{artifact.memory.peak_increase_mb:.0f}" if artifact.memory else "-",
                    gate,
                    agreement_figure(artifact),
                ]
            )
    return rows


def _summary_cell(summary) -> str:
    return "-" if summary is None else f"{summary.mean:.3f} / {summary.min:.3f} / {summary.p5:.3f}"


def kind_rows(report: Report) -> list[list[str]]:
    """The per-kind detail: every decoder file (on PyTorch's embeddings) and every pair."""
    rows = []
    named: list[tuple[str, dict[str, KindScores] | None]] = [
        (a.name, a.decoder) for run in report.runs for a in run.artifacts if a.part in DECODER_PARTS
    ]
    named += [(f"pair {p.name}", p.decoder) for p in report.pairs]
    for name, kinds in named:
        for kind, scores in (kinds or {}).items():
            confident = "-" if scores.mask_iou_confident is None else f"{scores.mask_iou_confident.mean:.3f}"
            rows.append(
                [
                    name,
                    kind,
                    str(scores.prompts),
                    _summary_cell(scores.mask_iou),
                    confident,
                    f"{scores.logits_psnr_db_min:.1f}",
                ]
            )
    return rows


def pair_matrix(report: Report, target: str) -> tuple[list[str], list[str], dict[tuple[str, str], PairResult]]:
    """Encoder precisions (rows), decoder precisions (columns) and the pairs of one target."""
    pairs = {(p.encoder_precision, p.decoder_precision): p for p in report.pairs if p.target == target}
    encoders = list(dict.fromkeys(p.encoder_precision for p in pairs.values()))
    decoders = list(dict.fromkeys(p.decoder_precision for p in pairs.values()))
    return encoders, decoders, pairs


def best_pairs_by_budget(report: Report, target: str) -> list[PairResult]:
    """The best pair (highest worst-kind mean IoU, passing its gate) under each size budget: the
    pairs no smaller pair beats, from the smallest up."""
    candidates = sorted(
        (p for p in report.pairs if p.target == target and p.gate and p.gate.passed),
        key=lambda p: (p.bytes, -worst_kind_mean_iou(p.decoder)),
    )
    frontier: list[PairResult] = []
    for pair in candidates:
        score = worst_kind_mean_iou(pair.decoder)
        if not math.isnan(score) and (not frontier or score > worst_kind_mean_iou(frontier[-1].decoder)):
            frontier.append(pair)
    return frontier


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _run_line(run: RunResult) -> str:
    if run.error:
        return f"{run.target}: NOT VALIDATED: {run.error}"
    described = []
    for name, latencies in (("pytorch", run.baselines.pytorch), ("onnxruntime", run.baselines.onnxruntime)):
        medians = [
            f"{part.split('_')[-1]} {value.median_s * 1000:.0f} ms"
            for part, value in latencies.items()
            if isinstance(value, Latency)
        ]
        described.append(f"{name} fp32 median {', '.join(medians) or 'not measured'}")
    floor = run.baselines.compute_floor
    if floor:
        described.append(
            f"encoder {floor.encoder_gflops:.1f} GFLOP at {floor.matmul_gflops_per_s:.0f} GFLOP/s matmul "
            f"= floor {floor.encoder_floor_s * 1000:.0f} ms"
        )
    return f"{run.target}: runtime {run.runtime}; weights {run.weights}; " + "; ".join(described)


def summary_markdown(report: Report) -> str:
    lines = ["## Files", "", *_table(SUMMARY_HEADER, summary_rows(report)), ""]
    lines += [_run_line(run) + "  " for run in report.runs]
    lines += [
        f"{run.target}: not made (missed their gate at conversion, not shipped): {item['part']} {item['precision']}: "
        f"{item['error']}  "
        for run in report.runs
        for item in run.not_made
    ]
    scoped = [a for run in report.runs for a in run.artifacts if a.selftest_only is not None]
    lines += [f"{a.name}: scored on its self-test vectors only: {a.selftest_only.reason}.  " for a in scoped]
    lines += [f"Photos: {report.photos}."]
    if not report.ground_truth:
        lines.append(
            "No ground truth was used: prompts are seeded grid points, their refinements and boxes around "
            "PyTorch's own masks, and every figure compares a file with PyTorch."
        )
    for run in report.runs:
        encoders, decoders, pairs = pair_matrix(report, run.target)
        if not pairs:
            continue
        lines += ["", f"## {run.target}: deployed pairs (encoder file into decoder file, photo to mask)", ""]
        lines.append("Worst prompt kind's mean mask IoU against PyTorch, lowest logit PSNR, gate.")
        lines.append("")
        rows = []
        for encoder in encoders:
            row = [f"{encoder} encoder"]
            for decoder in decoders:
                pair = pairs.get((encoder, decoder))
                if pair is None or pair.error:
                    row.append("error" if pair else "-")
                    continue
                if pair.not_run:
                    row.append("not run (self-test only)")
                    continue
                mark = "pass" if pair.gate and pair.gate.passed else "FAIL"
                row.append(f"{worst_kind_mean_iou(pair.decoder):.3f}, {min_logits_psnr(pair.decoder):.1f} dB, {mark}")
            rows.append(row)
        lines += _table(["", *(f"{d} decoder" for d in decoders)], rows)
        best = best_pairs_by_budget(report, run.target)
        if best:
            lines += ["", "Best pair under each size budget:", ""]
            lines += [
                f"- up to {p.bytes / 1e6:.1f} MB: {p.encoder_precision} encoder + {p.decoder_precision} decoder "
                f"(IoU {worst_kind_mean_iou(p.decoder):.3f})"
                for p in best
            ]
    teacher_rows = []
    for run in report.runs:
        if run.teacher:
            teacher_rows += [
                [f"{run.target} PyTorch student", kind, _summary_cell(s.mask_iou)] for kind, s in run.teacher.items()
            ]
    teacher_rows += [
        [f"pair {p.name}", kind, _summary_cell(s.teacher_iou_file)]
        for p in report.pairs
        for kind, s in (p.decoder or {}).items()
        if s.teacher_iou_file is not None
    ]
    if teacher_rows:
        lines += ["", f"## Against the teacher ({report.teacher})", ""]
        lines.append("Mask IoU against SAM on the same photos and prompts: distillation loss (PyTorch student) and")
        lines.append("distillation plus conversion loss (each pair), side by side.")
        lines.append("")
        lines += _table(("model", "prompt kind", "mask IoU vs teacher mean / min / p5"), teacher_rows)
    if report.everything:
        lines += ["", "## Segment everything (batched decoder) against SamAutomaticMaskGenerator", ""]
        lines.append(
            "segment-anything's generator over each encoder file and batched decoder file, against the same "
            "generator on PyTorch: masks each side, reference masks matched at IoU >= 0.95, best IoU mean / min "
            "over the photos; fp32 is gated (every mask matched, same count)."
        )
        lines.append("")
        lines += _table(EVERYTHING_HEADER, everything_rows(report))
    if report.crosscheck:
        lines += ["", "## Core ML emulator against Core AI (Apple's runtime)", ""]
        lines += [CROSSCHECK_NOTE, ""]
        lines += _table(CROSSCHECK_HEADER, crosscheck_rows(report))
    headroom = headroom_rows(report)
    if headroom:
        lines += ["", "## fp16 headroom (files that compute in fp16)", "", HEADROOM_NOTE, ""]
        lines += _table(HEADROOM_HEADER, headroom)
    header, engine = neural_engine_rows(report)
    if engine:
        lines += ["", "## Neural Engine: ops it is known not to run (Core ML and Core AI files)", ""]
        lines += [NEURAL_ENGINE_NOTE, "", *_table(header, engine), ""]
        lines += [f"- {rule}: {source}" for rule, source in neural_engine_sources(report).items()]
    lines += ["", "## Per prompt kind", "", *_table(KIND_HEADER, kind_rows(report))]
    if report.seconds:
        total = sum(report.seconds.values())
        lines += ["", f"## Where the time went ({total / 60:.1f} min)", ""]
        lines += _table(("section", "s"), [[name, f"{s:.0f}"] for name, s in report.seconds.items()])
    return "\n".join(lines)


HEADROOM_HEADER = ("file", "tightest op", "largest |x|", "headroom", "ops under the margin", "kept in fp32")
HEADROOM_NOTE = (
    "Each op's largest output on the calibration photos, in fp32 PyTorch, against fp16's largest value "
    "(65504): headroom is how many times it fits. An op under the margin is kept in fp32 (Core ML) or "
    "stops the conversion; pipeline/fp16_range.py says why."
)


def headroom_rows(report: Report) -> list[list[str]]:
    rows = []
    for run in report.runs:
        for artifact in run.artifacts:
            measured = artifact.fp16_headroom
            if measured is None or not measured.tightest:
                continue
            top = measured.tightest[0]
            rows.append(
                [
                    artifact.name,
                    top.op,
                    f"{top.max_abs:.4g}",
                    f"{top.headroom:.1f}x (margin {measured.margin:g}x)",
                    str(measured.under_margin),
                    str(measured.kept_fp32),
                ]
            )
    return rows


NEURAL_ENGINE_NOTE = (
    "Per Core ML package or Core AI asset, its ops and how many match each public rule of what the Neural "
    "Engine does not run (each such op runs on the GPU or CPU, and the graph is cut there); the runtime's own "
    "placement is only seen on Apple hardware. Rules and sources below."
)


def neural_engine_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    censuses = [(a, a.neural_engine) for run in report.runs for a in run.artifacts if a.neural_engine]
    rules = list(neural_engine_sources(report))
    rows = [[a.name, str(c.ops), *(str(c.outside.get(rule, 0)) for rule in rules)] for a, c in censuses]
    return ["file", "ops", *rules], rows


def neural_engine_sources(report: Report) -> dict[str, str]:
    sources: dict[str, str] = {}
    for run in report.runs:
        for artifact in run.artifacts:
            if artifact.neural_engine:
                sources.update(artifact.neural_engine.sources)
    return sources


CROSSCHECK_HEADER = ("part", "precision", "on", "Core ML (emulator)", "Core AI (Apple's runtime)", "between", "verdict")
CROSSCHECK_NOTE = (
    "The Core ML file (this project's MIL emulator) and the Core AI file (Apple's own runtime) of the same "
    "part, precision and weights, each against PyTorch on the same inputs; for encoders run on every photo, "
    "also the lowest PSNR of one's embeddings against the other's."
)


def crosscheck_rows(report: Report) -> list[list[str]]:
    return [
        [
            c.part,
            c.precision,
            c.basis,
            c.coreml,
            c.coreai,
            "-" if c.between_psnr_db is None else f"{c.between_psnr_db:.1f} dB",
            c.verdict,
        ]
        for c in report.crosscheck
    ]


EVERYTHING_HEADER = (
    "target",
    "encoder + batched decoder",
    "thresholds",
    "masks PyTorch / file",
    "matched",
    "best IoU mean / min",
    "decoder s (calls)",
    "gate",
)


def everything_rows(report: Report) -> list[list[str]]:
    rows = []
    for result in report.everything:
        pair = f"{result.encoder_precision} + {result.decoder_precision}"
        if result.error:
            rows.append([result.target, pair, result.thresholds, "error", result.error, "-", "-", "FAIL"])
            continue
        ious = [p.best_iou_mean for p in result.photos if p.best_iou_mean is not None]
        minima = [p.best_iou_min for p in result.photos if p.best_iou_min is not None]
        gate = "-" if result.gate is None else ("pass" if result.gate.passed else "FAIL")
        rows.append(
            [
                result.target,
                pair,
                result.thresholds,
                f"{sum(p.reference_count for p in result.photos)} / {sum(p.our_count for p in result.photos)}",
                f"{sum(p.matched for p in result.photos)}",
                f"{np.mean(ious):.3f} / {np.min(minima):.3f}" if ious else "-",
                f"{result.decoder_s:.1f} ({result.decoder_calls})",
                gate,
            ]
        )
    return rows
