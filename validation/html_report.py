"""report.html: the summary table, latency and size plots, and mask overlays (PyTorch beside
each decoder artifact on a few photos), with every picture embedded so the file stands alone."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pipeline.datasets import Photos
from pipeline.files import atomic_write_bytes
from validation.schema import Report, RunResult, min_logits_psnr, worst_kind_mean_iou
from validation.scoring import OVERLAY_KINDS
from validation.text_report import (
    CROSSCHECK_HEADER,
    CROSSCHECK_NOTE,
    EVERYTHING_HEADER,
    HEADROOM_HEADER,
    HEADROOM_NOTE,
    KIND_HEADER,
    NEURAL_ENGINE_NOTE,
    SUMMARY_HEADER,
    best_pairs_by_budget,
    crosscheck_rows,
    everything_rows,
    headroom_rows,
    kind_rows,
    neural_engine_rows,
    neural_engine_sources,
    pair_matrix,
    summary_rows,
)

MASK_COLOUR = np.array([30, 144, 255], dtype=np.float32)
DISAGREEMENT_COLOUR = np.array([255, 0, 0], dtype=np.float32)


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _overlay(image: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mask in blue over a dimmed photo; pixels where it disagrees with PyTorch in red."""
    shaded = 0.6 * image.astype(np.float32)
    shaded[mask] = 0.3 * shaded[mask] + 0.7 * MASK_COLOUR
    shaded[mask != reference] = DISAGREEMENT_COLOUR
    return shaded.astype(np.uint8)


def _draw_prompt(axis: plt.Axes, case: dict[str, Any] | None) -> None:
    if case is None:
        return
    if case["box"]:
        x0, y0, x1, y1 = case["box"]
        axis.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.5))
    for (x, y), label in zip(case["points"] or [], case["labels"] or [], strict=True):
        axis.plot(x, y, marker="*", markersize=11, color="lime" if label == 1 else "red", markeredgecolor="black")


def overlay_figure(photos: Photos, masks: dict[str, dict[int, np.ndarray]], run: RunResult) -> str | None:
    """One row per photo: PyTorch's mask, then each decoder artifact of the run's target."""
    target = run.target
    reference = masks.get(f"{target} pytorch", {})
    columns = [name for name in masks if name.startswith(f"{target} prompt_decoder")]
    if not reference or not columns:
        return None
    image_ids = sorted(reference)
    figure, axes = plt.subplots(
        len(image_ids), 1 + len(columns), figsize=(4 * (1 + len(columns)), 3.2 * len(image_ids)), squeeze=False
    )
    for row, image_id in enumerate(image_ids):
        image = photos.image(image_id)
        case = next((c for c in run.prompt_cases if c["image_id"] == image_id and c["kind"] in OVERLAY_KINDS), None)
        for col, name in enumerate([f"{target} pytorch", *columns]):
            axis = axes[row][col]
            mask = masks[name].get(image_id)
            axis.imshow(_overlay(image, mask, reference[image_id]) if mask is not None else image)
            _draw_prompt(axis, case)
            label = "PyTorch" if col == 0 else name.split()[-1]
            if mask is not None and col > 0:
                label += f": {int((mask != reference[image_id]).sum())} px differ"
            axis.set_title(f"photo {image_id}, {label}", fontsize=10)
            axis.axis("off")
    figure.suptitle(
        f"{target}: box + point prompt (yellow, green star); mask blue, disagreement with PyTorch red; "
        "decoders run on PyTorch embeddings",
        fontsize=12,
    )
    return _png(figure)


def pair_heatmap(report: Report, target: str) -> str | None:
    """Encoder precision x decoder precision: the worst prompt kind's mean mask IoU, end to end."""
    encoders, decoders, pairs = pair_matrix(report, target)
    if not pairs:
        return None
    values = np.full((len(encoders), len(decoders)), np.nan)
    for (encoder, decoder), pair in pairs.items():
        values[encoders.index(encoder), decoders.index(decoder)] = worst_kind_mean_iou(pair.decoder)
    figure, axis = plt.subplots(figsize=(1.6 * len(decoders) + 2.5, 1.0 * len(encoders) + 1.6))
    image = axis.imshow(
        values, cmap="RdYlGn", vmin=min(0.9, float(np.nanmin(values)) if np.isfinite(values).any() else 0.9), vmax=1.0
    )
    for (encoder, decoder), pair in pairs.items():
        row, col = encoders.index(encoder), decoders.index(decoder)
        if pair.error:
            text = "error"
        elif pair.not_run:
            text = "self-test\nonly"
        else:
            mark = "" if pair.gate and pair.gate.passed else "\nFAIL"
            text = f"{values[row, col]:.3f}\n{min_logits_psnr(pair.decoder):.0f} dB{mark}"
        axis.text(col, row, text, ha="center", va="center", fontsize=9)
    axis.set_xticks(range(len(decoders)), [f"{d} decoder" for d in decoders], fontsize=9)
    axis.set_yticks(range(len(encoders)), [f"{e} encoder" for e in encoders], fontsize=9)
    axis.set_title(f"{target}: pairs end to end, worst kind mean IoU vs PyTorch", fontsize=10)
    figure.colorbar(image, ax=axis, shrink=0.8)
    return _png(figure)


def bar_figure(report: Report, metric: str) -> str:
    names, values, colours = [], [], []
    for run in report.runs:
        for artifact in run.artifacts:
            if metric == "latency" and artifact.latency is None:
                continue
            names.append(f"{artifact.target} {artifact.part.split('_')[-1]} {artifact.precision}")
            values.append(artifact.latency.median_s * 1000 if metric == "latency" else artifact.bytes / 1e6)
            colours.append("tab:blue" if artifact.part == "image_encoder" else "tab:orange")
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.2))
    axis.bar(range(len(names)), values, color=colours)
    axis.set_xticks(range(len(names)), names, fontsize=8, rotation=35, ha="right")
    axis.set_ylabel("warm median latency (ms)" if metric == "latency" else "size (MB)")
    axis.set_title("latency (blue: encoder, orange: decoder)" if metric == "latency" else "size on disk")
    if metric == "latency":
        for run in [r for r in report.runs if r.baselines.pytorch][:1]:
            for part, style in (("image_encoder", "--"), ("prompt_decoder", ":")):
                axis.axhline(run.baselines.pytorch[part].median_s * 1000, ls=style, color="grey", lw=1)
    return _png(figure)


def _html_table(header, rows, classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{classes[i] if classes else ''}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(alt: str, picture: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{picture}">'


def write_html(
    report: Report, photos: Photos, masks: dict[str, dict[int, np.ndarray]], path: Path, extra_html: str = ""
) -> None:
    rows = summary_rows(report)
    valid_runs = [run for run in report.runs if not run.error]
    weights = "; ".join(f"{run.target}: {html.escape(run.weights)}" for run in valid_runs)
    sections = [
        "<h1>MobileSAM validation report</h1>",
        f"<p><b>Weights</b>: {weights or 'none validated'}. <b>Photos</b>: {html.escape(report.photos)}.</p>",
        "".join(
            f"<p class='fail'><b>{html.escape(run.target)} not validated</b>: {html.escape(run.error)}</p>"
            for run in report.runs
            if run.error
        ),
        ""
        if report.ground_truth
        else "<p><b>No ground truth was used</b>: prompts are seeded grid points, their refinements and boxes "
        "around PyTorch's own masks; every figure compares a file with PyTorch.</p>",
        "<p><b>Random weights</b>: mask logits hug 0, so quantized files lose sign on many pixels without any "
        "conversion bug; the per-kind table gives the confident-pixel IoU beside the plain IoU.</p>"
        if any(run.random_weights for run in valid_runs)
        else "",
        "<h2>Files</h2>",
        _html_table(SUMMARY_HEADER, rows, ["fail" if row[7] == "FAIL" else "" for row in rows]),
        "".join(
            f"<p><b>{html.escape(a.name)}</b>: scored on its self-test vectors only: "
            f"{html.escape(a.selftest_only.reason)}.</p>"
            for run in report.runs
            for a in run.artifacts
            if a.selftest_only is not None
        ),
        _image("latency", bar_figure(report, "latency")),
        _image("size", bar_figure(report, "size")),
    ]
    for run in valid_runs:
        heatmap = pair_heatmap(report, run.target)
        if heatmap:
            sections.append(f"<h2>{html.escape(run.target)}: deployed pairs</h2>")
            sections.append(_image(f"{run.target} pairs", heatmap))
            best = best_pairs_by_budget(report, run.target)
            if best:
                items = "".join(
                    f"<li>up to {p.bytes / 1e6:.1f} MB: {html.escape(p.encoder_precision)} encoder + "
                    f"{html.escape(p.decoder_precision)} decoder (IoU {worst_kind_mean_iou(p.decoder):.3f})</li>"
                    for p in best
                )
                sections.append(f"<p>Best pair under each size budget:</p><ul>{items}</ul>")
        picture = overlay_figure(photos, masks, run)
        if picture:
            sections.append(f"<h2>{html.escape(run.target)} masks</h2>")
            sections.append(_image(f"{run.target} overlays", picture))
    if report.everything:
        rows = everything_rows(report)
        sections += [
            "<h2>Segment everything (batched decoder) against SamAutomaticMaskGenerator</h2>",
            "<p>segment-anything's generator over each encoder file and batched decoder file, against the same "
            "generator on PyTorch; fp32 is gated (every reference mask matched at IoU &ge; 0.95, same count).</p>",
            _html_table(EVERYTHING_HEADER, rows, ["fail" if row[-1] == "FAIL" else "" for row in rows]),
        ]
    if report.crosscheck:
        rows = crosscheck_rows(report)
        sections += [
            "<h2>Core ML emulator against Core AI (Apple's runtime)</h2>",
            f"<p>{html.escape(CROSSCHECK_NOTE)}</p>",
            _html_table(CROSSCHECK_HEADER, rows, ["fail" if row[-1] != "agree" else "" for row in rows]),
        ]
    headroom = headroom_rows(report)
    if headroom:
        sections += [
            "<h2>fp16 headroom (files that compute in fp16)</h2>",
            f"<p>{html.escape(HEADROOM_NOTE)}</p>",
            _html_table(HEADROOM_HEADER, headroom),
        ]
    header, engine = neural_engine_rows(report)
    if engine:
        sources = "".join(
            f"<li>{html.escape(rule)}: {html.escape(source)}</li>"
            for rule, source in neural_engine_sources(report).items()
        )
        sections += [
            "<h2>Neural Engine: ops it is known not to run (Core ML and Core AI files)</h2>",
            f"<p>{html.escape(NEURAL_ENGINE_NOTE)}</p>",
            _html_table(header, engine),
            f"<ul>{sources}</ul>",
        ]
    sections += ["<h2>Per prompt kind</h2>", _html_table(KIND_HEADER, kind_rows(report))]
    if extra_html:
        sections.append(extra_html)
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:4px 6px;text-align:left;vertical-align:top}"
        "tr.fail td{background:#fde8e8}img{max-width:100%;margin:1em 0}.fail{color:#b00}"
    )
    head = f"<meta charset='utf-8'><title>MobileSAM validation</title><style>{style}</style>"
    document = f"<!doctype html><html><head>{head}</head><body>{''.join(sections)}</body></html>"
    atomic_write_bytes(path, document.encode())
