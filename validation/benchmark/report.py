"""benchmark.json, benchmark.md and benchmark.png from one `validation.benchmark` run."""

from __future__ import annotations

import json
from pathlib import Path

from validation.benchmark.schema import BENCHMARK_JSON, GEMM_SHAPE, GRID_SIDES, ArtifactBenchmark, Benchmark

OUTSIDE_FAST = ("outside xnnpack",)
TOP_OPS = 12


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _file_name(artifact: ArtifactBenchmark) -> str:
    return Path(artifact.file).name


def markdown(result: Benchmark) -> str:
    lines = [
        "# Benchmark",
        "",
        f"{result.machine}; {result.created}. Warm latency over each file's own self-test inputs (a real "
        "photo and prompt); ratios are this file's median over the comparison's median (below 1: faster).",
        "",
        "## Compute floor",
        "",
        "| threads | encoder GFLOP | fp32 matmul GFLOP/s | int8 matmul GOP/s | fp32 floor ms | int8 floor ms |",
        "|---|---|---|---|---|---|",
    ]
    for f in result.floors:
        lines.append(
            f"| {f.threads} | {f.encoder_gflops:.1f} | {f.fp32_gflops_per_s:.0f} | {f.int8_gops_per_s:.0f} "
            f"| {_ms(f.fp32_floor_s)} | {_ms(f.int8_floor_s)} |"
        )
    if result.gemm_rates:
        lines += [
            "",
            "## What the runtimes' own GEMMs reach",
            "",
            f"One {' x '.join(map(str, GEMM_SHAPE))} linear layer (rows x inputs x outputs, the encoder's largest) "
            "converted by each target and timed in its runtime; the last columns are the encoder's multiply-adds "
            "alone at that rate, against the fp32 floor.",
            "",
            "| target | precision | threads | GOP/s | vs torch's rate (same precision) | encoder's GEMMs alone ms "
            "| vs fp32 floor |",
            "|---|---|---|---|---|---|---|",
        ]
        for rate in result.gemm_rates:
            floor = result.floor(rate.threads)
            if rate.error or floor is None:
                why = rate.error or f"no floor measured at {rate.threads} threads"
                lines.append(f"| {rate.target} | {rate.precision} | - | failed: {why} | | | |")
                continue
            alone = rate.encoder_s(floor)
            torch_rate = floor.int8_gops_per_s if rate.precision == "int8" else floor.fp32_gflops_per_s
            lines.append(
                f"| {rate.target} | {rate.precision} | {rate.threads} | {rate.gops_per_s:.0f} "
                f"| {_ratio(rate.gops_per_s / torch_rate)} | {_ms(alone)} "
                f"| {_ratio(alone / floor.fp32_floor_s if alone else None)} |"
            )
    lines += ["", "## Baselines (fp32)", "", "| runtime | part | threads | median ms | p90 ms |"]
    lines.append("|---|---|---|---|---|")
    for baseline in result.baselines:
        if baseline.error:
            lines.append(f"| {baseline.runtime} | {baseline.part} | - | failed: {baseline.error} | |")
        for t in baseline.timings:
            lines.append(f"| {baseline.runtime} | {baseline.part} | {t.threads} | {_ms(t.median_s)} | {_ms(t.p90_s)} |")
    lines += [
        "",
        "## Files",
        "",
        "| file | target | precision | MB | threads | median ms | p90 ms | vs PyTorch | vs ONNX Runtime "
        "| vs fp32 floor | vs int8 floor | peak memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for artifact in result.artifacts:
        precision = artifact.precision + (f" ({artifact.arithmetic} arithmetic)" if artifact.arithmetic else "")
        head = f"| {_file_name(artifact)} | {artifact.target} | {precision} | {artifact.bytes / 1e6:.1f}"
        if artifact.error or artifact.not_timed:
            lines.append(f"{head} | - | {artifact.error or artifact.not_timed} | | | | | | |")
            continue
        memory = "-" if artifact.peak_memory_mb is None else f"{artifact.peak_memory_mb:.0f}"
        for t in artifact.timings:
            ratios = result.ratios(artifact, t)
            lines.append(
                f"{head} | {t.threads} | {_ms(t.median_s)} | {_ms(t.p90_s)} | {_ratio(ratios.get('vs_pytorch'))} "
                f"| {_ratio(ratios.get('vs_onnxruntime'))} | {_ratio(ratios.get('vs_fp32_floor'))} "
                f"| {_ratio(ratios.get('vs_int8_floor'))} | {memory} |"
            )
    lines += _int8_speedups(result)
    if result.sweep:
        counts = sorted({p.num_points for p in result.sweep})
        lines += [
            "",
            f"## Decoder latency against the number of points N ({max(result.threads)} threads)",
            "",
            "| runtime | precision | " + " | ".join(f"N={n} ms" for n in counts) + " |",
            "|---|---|" + "---|" * len(counts),
        ]
        rows: dict[tuple[str, str], dict[int, str]] = {}
        for point in result.sweep:
            cell = _ms(point.timing.median_s) if point.timing else f"failed: {point.error}"
            rows.setdefault((point.runtime, point.precision), {})[point.num_points] = cell
        for (runtime, precision), cells in rows.items():
            lines.append(f"| {runtime} | {precision} | " + " | ".join(cells.get(n, "-") for n in counts) + " |")
    lines += _grid_costs(result)
    for profile in result.profiles:
        title = f"{Path(profile.file).name} ({profile.threads} threads, {profile.profiler})"
        lines += ["", f"## Per-op profile: {title}", ""]
        if profile.error:
            lines.append(f"profile failed: {profile.error}")
            continue
        by_kernel: dict[str, float] = {}
        for op in profile.ops:
            by_kernel[op.kernel] = by_kernel.get(op.kernel, 0.0) + op.ms
        lines.append(
            f"Whole call {profile.total_ms:.1f} ms; by kernel: "
            + ", ".join(f"{kernel} {ms:.1f} ms" for kernel, ms in sorted(by_kernel.items(), key=lambda kv: -kv[1]))
        )
        lines += ["", "| op | kernel | count | ms per run |", "|---|---|---|---|"]
        for op in profile.ops[:TOP_OPS]:
            lines.append(f"| {op.name} | {op.kernel} | {op.count} | {op.ms:.2f} |")
        outside = [op for op in profile.ops if op.kernel in OUTSIDE_FAST]
        if outside:
            lines.append("")
            lines.append("Outside XNNPACK: " + ", ".join(f"{op.name} ({op.count}x, {op.ms:.1f} ms)" for op in outside))
    lines += _delegation(result)
    return "\n".join(lines) + "\n"


def _delegation(result: Benchmark) -> list[str]:
    """Every TFLite file's ops by where they run, counted (the per-op profiles time the encoders)."""
    if not result.delegation:
        return []
    lines = [
        "",
        "## TFLite: ops XNNPACK takes",
        "",
        "Every file's ops counted by where they run (the per-op profiles above time the encoders' ops).",
        "",
        "| file | ops in XNNPACK | ops in LiteRT's reference kernels |",
        "|---|---|---|",
    ]
    for census in result.delegation:
        if census.error:
            lines.append(f"| {Path(census.file).name} | census failed: {census.error} | |")
            continue
        outside = ", ".join(f"{name} {count}" for name, count in sorted(census.outside.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {Path(census.file).name} | {sum(census.delegated.values())} | {outside or 'none'} |")
    return lines


def _grid_costs(result: Benchmark) -> list[str]:
    costs = result.grid_costs()
    if not costs:
        return []
    lines = ["", "## Segment everything: decoder time per grid, batched against one call per point", ""]
    lines.append(
        "From warm per-call medians: K x K grid points take ceil(K^2 / B) batched calls or K^2 one-prompt calls "
        "(the encoder runs once either way; the generator's mask post-processing is the same for both)."
    )
    lines += ["", "| target | precision | threads | B | one-prompt call ms | batched call ms | per-prompt speed-up |"]
    lines[-1] += " " + " | ".join(f"{k}x{k} batched / one per point s" for k in GRID_SIDES) + " |"
    lines.append("|---|---|---|---|---|---|---|" + "---|" * len(GRID_SIDES))
    for cost in costs:
        cells = [f"{cost.grid_s[k]['batched']:.2f} / {cost.grid_s[k]['one_call_per_point']:.2f}" for k in GRID_SIDES]
        lines.append(
            f"| {cost.target} | {cost.precision} | {cost.threads} | {cost.batch} | {_ms(cost.one_prompt_call_s)} "
            f"| {_ms(cost.batched_call_s)} | {cost.per_prompt_speedup:.2f}x | " + " | ".join(cells) + " |"
        )
    return lines


def _int8_speedups(result: Benchmark) -> list[str]:
    """Per target: how much faster the int8 encoder is than the fp32 one (the point of int8)."""
    lines = ["", "## int8 against fp32 (encoder, same target)", ""]
    lines.append("| target | threads | fp32 ms | int8 ms | speed-up |")
    lines.append("|---|---|---|---|---|")
    by_key = {
        (a.target, a.precision, t.threads): t for a in result.artifacts if a.part == "image_encoder" for t in a.timings
    }
    found = False
    for (target, precision, threads), timing in sorted(by_key.items()):
        fp32 = by_key.get((target, "fp32", threads))
        if precision != "int8" or fp32 is None:
            continue
        found = True
        lines.append(
            f"| {target} | {threads} | {_ms(fp32.median_s)} | {_ms(timing.median_s)} "
            f"| {fp32.median_s / timing.median_s:.2f}x |"
        )
    return lines if found else []


def plot(result: Benchmark, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    encoders = [a for a in result.artifacts if a.part == "image_encoder" and a.timings]
    labels = [f"{a.target}\n{a.precision}" + (f"\n{a.arithmetic} arithmetic" if a.arithmetic else "") for a in encoders]
    width = 0.8 / max(1, len(result.threads))
    for index, threads in enumerate(result.threads):
        values = [next((t.median_s * 1000 for t in a.timings if t.threads == threads), 0.0) for a in encoders]
        positions = [i + index * width for i in range(len(encoders))]
        left.bar(positions, values, width, label=f"{threads} thread{'s' if threads > 1 else ''}")
    floor = result.floor(max(result.threads))
    if floor is not None:
        left.axhline(floor.fp32_floor_s * 1000, color="black", linestyle="--", label=f"fp32 floor ({floor.threads}t)")
        left.axhline(floor.int8_floor_s * 1000, color="grey", linestyle=":", label=f"int8 floor ({floor.threads}t)")
    for runtime, color in (("pytorch", "tab:red"), ("onnxruntime", "tab:purple")):
        timing = result.baseline(runtime, "image_encoder", max(result.threads))
        if timing is not None:
            left.axhline(timing.median_s * 1000, color=color, linestyle="-.", linewidth=1, label=f"{runtime} fp32")
    left.set_xticks([i + width * (len(result.threads) - 1) / 2 for i in range(len(encoders))], labels, fontsize=8)
    left.set_ylabel("encoder median latency (ms)")
    left.set_title("Image encoder")
    left.legend(fontsize=7)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for point in result.sweep:
        if point.timing:
            series.setdefault((point.runtime, point.precision), []).append((point.num_points, point.timing.median_s))
    for (runtime, precision), values in series.items():
        values.sort()
        right.plot([n for n, _ in values], [s * 1000 for _, s in values], marker="o", label=f"{runtime} {precision}")
    right.set_xlabel("points per prompt N")
    right.set_ylabel("decoder median latency (ms)")
    right.set_title(f"Prompt decoder ({max(result.threads)} threads)")
    if series:
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "no point sweep in this run (--points with no N)", ha="center", transform=right.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_benchmark(result: Benchmark, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / BENCHMARK_JSON, out / "benchmark.md", out / "benchmark.png"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot(result, png_path)
    md_path.write_text(markdown(result) + f"\n![benchmark]({png_path.name})\n")
    return [json_path, md_path, png_path]
