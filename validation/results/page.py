"""The published results page: each stage's own Markdown, rendered again from the JSON it wrote,
under the machine, date and command that made it. Nothing on the page is typed by hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.records import read_result

NOTE = (
    "Desktop Linux runtimes on the machine named in each section: latencies rank the files and show "
    "ratios to PyTorch here; they say nothing about a phone's speed. Core ML and Core AI files are "
    "not timed off Apple devices."
)


@dataclass(frozen=True)
class Source:
    """One kind of result file: its name under a stage's --out folder and how it reads back."""

    title: str
    file_name: str
    read: Callable[[Path], Any]
    markdown: Callable[[Any], str]


def _report(path: Path) -> Any:
    from validation.schema import Report

    return read_result(path, Report, "validate report")


def _report_markdown(report: Any) -> str:
    from validation.text_report import summary_markdown

    return summary_markdown(report)


def _benchmark(path: Path) -> Any:
    from validation.benchmark.schema import Benchmark

    return read_result(path, Benchmark, "benchmark result")


def _benchmark_markdown(result: Any) -> str:
    from validation.benchmark.report import markdown

    return markdown(result)


def _compat(path: Path) -> Any:
    from validation.compat.matrix import CompatReport

    return read_result(path, CompatReport, "compat report")


def _compat_markdown(report: Any) -> str:
    from validation.compat.text import compat_markdown

    return compat_markdown(report)


def _cost(path: Path) -> Any:
    from validation.schema import ValidateCost

    return read_result(path, ValidateCost, "validate cost")


def _cost_markdown(cost: Any) -> str:
    lines = ["The Core ML emulator's seconds per call of each file (on its own self-test inputs):", ""]
    lines += ["| file | s a call |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in cost.emulator_call_s.items()]
    if cost.validate_s is not None:
        lines += ["", f"`nox -s validate` with its defaults: {cost.validate_s / 60:.1f} min, "]
        lines[-1] += f"{len(cost.failures)} failures. Its sections:"
        lines += ["", "| section | s |", "|---|---|"]
        lines += [f"| {name} | {seconds:.0f} |" for name, seconds in cost.sections_s.items()]
    return "\n".join(lines)


SOURCES = (
    Source("Validation", "report.json", _report, _report_markdown),
    Source("Benchmark", "benchmark.json", _benchmark, _benchmark_markdown),
    Source("Runtime compatibility", "compat.json", _compat, _compat_markdown),
    Source("What validate costs (Core ML)", "validate_time.json", _cost, _cost_markdown),
)


def demoted(markdown: str) -> str:
    """A stage's page as a section of this one: its title dropped (the section has one), every
    other heading one level deeper."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip("\n")


def _converted_files(folders: list[Path]) -> list[str]:
    """One line per convert folder: its target, files, weights and the command that made it."""
    from pipeline.manifest import find_manifests, read_manifest

    lines = []
    for folder in folders:
        for path in find_manifests(folder):
            manifest = read_manifest(path)
            files = ", ".join(f"{Path(r.file).name} ({r.bytes / 1e6:.1f} MB)" for r in manifest.artifacts)
            lines.append(
                f"- {manifest.target}, converted {manifest.created} by `{manifest.command or 'not recorded'}` "
                f"from {manifest.weights.description}: {files}"
            )
    return lines


def results_markdown(folders: list[Path], command: str) -> str:
    """The page from every result file found in `folders` (at least one must hold one)."""
    sections = []
    for source in SOURCES:
        for folder in folders:
            path = Path(folder) / source.file_name
            if not path.is_file():
                continue
            result = source.read(path)
            targets = sorted({run.target for run in getattr(result, "runs", [])})
            sections += [
                f"## {source.title}" + (f": {', '.join(targets)}" if targets else ""),
                "",
                f"- made by: `{result.command or 'not recorded'}`",
                f"- machine: {result.machine or 'not recorded'}",
                f"- date: {result.created}",
                f"- from: `{path.name}` of that run",
                "",
                demoted(source.markdown(result)),
                "",
            ]
    if not sections:
        names = ", ".join(source.file_name for source in SOURCES)
        raise PipelineError(f"no result files ({names}) in {', '.join(map(str, folders))}; run those stages first")
    files = _converted_files(folders)
    if files:
        sections += ["## Files", "", "What these results measured, as each folder's manifest records it.", ""]
        sections += [*files, ""]
    header = [
        "# Results",
        "",
        f"Generated by `{command}`; not edited by hand. {NOTE}",
        "",
    ]
    return "\n".join(header + sections).rstrip() + "\n"
