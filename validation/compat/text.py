"""compat.md: the matrix as an app developer reads it, one table per target."""

from __future__ import annotations

from validation.compat.matrix import CompatReport

MARKS = {"pass": "pass", "refused": "refused", "wrong": "**WRONG**"}


def compat_markdown(report: CompatReport) -> str:
    lines = [
        "# Runtime compatibility",
        "",
        f"Made {report.created} on {report.machine} by `nox -s compat`.",
        "",
        "Each file's self-test vectors (`<stem>.selftest.npz`) in each runtime build, "
        "scored with the file's own tolerance from its manifest: **pass**; **refused** (a clear error at load "
        "or run: an app cannot ship it silently); **WRONG** (runs and misses its tolerance: never acceptable).",
        "",
        "| runtime | package | version | note |",
        "|---|---|---|---|",
        *(f"| {r.name} | {r.package} | {r.version} | {r.note} |" for r in report.runtimes),
    ]
    names = [r.name for r in report.runtimes]
    for target in sorted({c.target for c in report.cells}):
        cells = [c for c in report.cells if c.target == target]
        columns = [name for name in names if any(c.runtime == name for c in cells)]
        lines += ["", f"## {target}", "", "| file | " + " | ".join(columns) + " |"]
        lines.append("|---|" + "---|" * len(columns))
        for file in dict.fromkeys(c.file for c in cells):
            by_runtime = {c.runtime: c for c in cells if c.file == file}
            row = [MARKS[by_runtime[name].verdict] if name in by_runtime else "" for name in columns]
            lines.append(f"| {file} | " + " | ".join(row) + " |")
        lines += ["", "Details:", ""]
        lines += [f"- {c.file} in {c.runtime}: {c.verdict}: {c.detail}" for c in cells]
    if report.coreml:
        lines += ["", "## Core ML packages (not run here: declared minimum OS)", ""]
        lines += ["| target | file | spec version | minimum OS | promised | check |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {c.target} | {c.file} | {c.specification_version} | {c.minimum_os} | {c.promised_os} | {c.verdict} |"
            for c in report.coreml
        ]
    if report.gpu:
        lines += ["", f"## LiteRT GPU delegate ({report.gpu[0].analyzer})", ""]
        lines += [
            "The ops of each `.tflite` the GPU delegate cannot run (each would run on the CPU, or stop "
            "LiteRT's CompiledModel from starting on the GPU). fp32 and fp16 files must have none.",
            "",
            "| target | file | GPU delegate | ops it cannot run |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c.target} | {c.file} | {c.verdict} | {'; '.join(c.issues) or '-'} |" for c in report.gpu]
    if report.not_run:
        lines += ["", "## Not in the matrix", ""]
        lines += [f"- {n.target} {n.file}: {n.reason}" for n in report.not_run]
    failures = report.gate_failures()
    verdict = f"FAILED, {len(failures)} findings" if failures else "no file answers wrong or misses the GPU delegate"
    lines += ["", f"Gate: {verdict}.", ""]
    return "\n".join(lines)


def compat_html(report: CompatReport) -> str:
    """The matrix as a section of report.html (one table per target; a wrong cell in red)."""
    import html

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)

        def cell(text: str) -> str:
            return f"<td class='{'fail' if text == 'WRONG' else ''}'>{html.escape(text)}</td>"

        body = "".join("<tr>" + "".join(cell(text) for text in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    runtimes = report.runtimes
    names = [r.name for r in runtimes]
    parts = [
        "<h2>Runtime compatibility</h2>",
        f"<p>Made {html.escape(report.created)} by <code>nox -s compat</code>: each file's self-test vectors in each "
        "runtime build, scored with the file's own tolerance. pass; refused (a clear error: cannot ship silently); "
        "WRONG (runs and misses its tolerance: fails validate).</p>",
        table(["runtime", "package", "version", "note"], [[r.name, r.package, r.version, r.note] for r in runtimes]),
    ]
    for target in sorted({c.target for c in report.cells}):
        cells = [c for c in report.cells if c.target == target]
        columns = [name for name in names if any(c.runtime == name for c in cells)]
        rows = []
        for file in dict.fromkeys(c.file for c in cells):
            by_runtime = {c.runtime: c for c in cells if c.file == file}
            verdicts = [by_runtime[name].verdict if name in by_runtime else "" for name in columns]
            rows.append([file, *("WRONG" if verdict == "wrong" else verdict for verdict in verdicts)])
        parts += [f"<h3>{html.escape(target)}</h3>", table(["file", *columns], rows)]
    if report.coreml:
        header = ["target", "file", "spec", "minimum OS", "promised", "check"]
        rows = [
            [c.target, c.file, str(c.specification_version), c.minimum_os, c.promised_os, c.verdict]
            for c in report.coreml
        ]
        parts += ["<h3>Core ML packages (declared minimum OS)</h3>", table(header, rows)]
    if report.gpu:
        rows = [[c.target, c.file, c.verdict, "; ".join(c.issues) or "-"] for c in report.gpu]
        title = f"<h3>LiteRT GPU delegate ({html.escape(report.gpu[0].analyzer)})</h3>"
        parts += [title, table(["target", "file", "GPU delegate", "ops it cannot run"], rows)]
    if report.not_run:
        rows = [[n.target, n.file, n.reason] for n in report.not_run]
        parts += ["<h3>Not in the matrix</h3>", table(["target", "file", "why"], rows)]
    return "".join(parts)
