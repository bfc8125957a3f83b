"""The compatibility matrix: every converted file's self-test vectors in every runtime build.

A cell is `pass` (the file meets its manifest's self-test tolerance there), `refused` (a clear
error at load or run: the app cannot ship it silently) or `wrong` (it runs and misses its
tolerance: the failure an app would never notice, which `gate_failures` turns into exit 1).
Core ML packages cannot run here; their spec version is read and checked against the minimum OS
their manifest promises (`coreml_checks`). Every `.tflite` goes through TensorFlow's GPU-delegate
compatibility analyzer (`gpu_delegate_checks`): an fp32 or fp16 file with an op the delegate
cannot run fails the gate.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import atomic_write_bytes, atomic_write_json
from pipeline.locking import folder_lock, reading
from pipeline.manifest import (
    ArtifactRecord,
    Manifest,
    find_manifests,
    read_manifest,
    verify_artifact,
    verify_travelling_files,
)
from pipeline.provenance import command_line, describe_machine, now
from pipeline.records import read_result
from pipeline.selftest import Tolerance, check_case, read_vectors
from validation.compat.runtimes import (
    PACKAGES,
    TARGET_FAMILIES,
    RuntimeSpec,
    environment_python,
    installed_version,
    runtime_spec,
)

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("worker.py")
VERDICTS = ("pass", "refused", "wrong")
COREML_SPEC_MINIMUM_OS = {6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18"}
"""Core ML specification version -> the first iOS that loads it (coremltools' `target` table)."""
WORKER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class RuntimeColumn:
    name: str
    package: str
    version: str
    note: str


@dataclass(frozen=True)
class Cell:
    """One file in one runtime build."""

    target: str
    file: str
    part: str
    precision: str
    runtime: str
    verdict: str
    detail: str


@dataclass(frozen=True)
class CoreMLCheck:
    """A Core ML package's declared minimum OS against what its manifest promises."""

    target: str
    file: str
    specification_version: int
    minimum_os: str
    promised_os: str
    verdict: str


@dataclass(frozen=True)
class GpuDelegateCheck:
    """A `.tflite` file's ops that LiteRT's GPU delegate cannot run, by TensorFlow's analyzer."""

    target: str
    file: str
    part: str
    precision: str
    analyzer: str
    issues: tuple[str, ...]
    """"Op#41 GATHER_ND: Not supported op GATHER_ND", one per op the delegate refuses."""
    verdict: str
    """`all ops`, `<n> ops not`, or `unavailable: <why>` (the analyzer's environment could not be
    built: said in the row, like a runtime build that could not be installed, not a gate failure)."""


GPU_ANALYZER = "tensorflow-cpu-2.16.2"
"""The TensorFlow whose model analyzer still checks GPU-delegate compatibility: 2.21's reports any
model compatible (a graph of STABLEHLO_SORT and 2-D SLICE passes it), so a newer one would pass
every file silently."""
GPU_ANALYZER_SCRIPT = Path(__file__).with_name("gpu_analyzer.py")
GPU_READY_PRECISIONS = ("fp32", "fp16")
"""The `.tflite` files made for the GPU delegate: any op it cannot run fails the gate (int8 and
w8a8 files are for the CPU and NPUs: reported, not gated)."""


@dataclass(frozen=True)
class NotRun:
    """A file no runtime build of the matrix loads, and why: listed, never skipped silently."""

    target: str
    file: str
    reason: str


NOT_RUN_REASONS = {
    "executorch_coreml": "ExecuTorch's Core ML delegate runs only on Apple platforms (validate emulates its payload)",
    "coreai": "one Core AI runtime build exists (coreai-core, the one this project installs); validate runs it",
}
"""Why a target's files are outside the runtime matrix (Core ML packages get `coreml_checks`)."""


@dataclass(frozen=True)
class CompatReport:
    runtimes: tuple[RuntimeColumn, ...]
    cells: tuple[Cell, ...]
    coreml: tuple[CoreMLCheck, ...] = ()
    gpu: tuple[GpuDelegateCheck, ...] = ()
    not_run: tuple[NotRun, ...] = ()
    created: str = field(default_factory=now)
    machine: str = field(default_factory=describe_machine)
    command: str = ""
    """The command that made it (empty: not recorded)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def gate_failures(self) -> list[str]:
        """Every `wrong` cell and every Core ML package that needs a newer OS than promised."""
        failures = [
            f"{c.target} {c.file} in {c.runtime}: runs and answers wrong ({c.detail})"
            for c in self.cells
            if c.verdict == "wrong"
        ]
        failures += [
            f"{c.target} {c.file}: needs {c.minimum_os} (spec {c.specification_version}), promised {c.promised_os}"
            for c in self.coreml
            if c.verdict != "pass"
        ]
        failures += [
            f"{c.target} {c.file}: {c.verdict} on LiteRT's GPU delegate ({'; '.join(c.issues[:3])})"
            for c in self.gpu
            if c.precision in GPU_READY_PRECISIONS and c.verdict.endswith("ops not")
        ]
        return failures


def _tflite_io(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's signature input and output details, read by the project's LiteRT (types and
    quantization only: nothing runs)."""
    from mobile_targets.tflite.converter import SIGNATURE, load_interpreter_class

    runner = load_interpreter_class()(model_path=str(path)).get_signature_runner(SIGNATURE)
    return runner.get_input_details(), runner.get_output_details()


def run_in_runtime(
    spec: RuntimeSpec, python: Path, path: Path, record: ArtifactRecord, manifest: Manifest, vectors: Path
) -> Cell:
    """The file's self-test cases through `spec`'s runtime, scored against the tolerance its
    manifest records."""
    from mobile_targets.tflite.converter import to_file_dtype, to_float

    info = record.details.selftest
    if info is None:
        raise PipelineError(f"{record.file}: no self-test vectors in the manifest")
    contract = manifest.contract(record.part)
    cases = read_vectors(vectors, info.cases, contract)
    tolerance = Tolerance(**info.tolerance)

    def cell(verdict: str, detail: str) -> Cell:
        return Cell(record.target, record.file, record.part, record.precision, spec.name, verdict, detail)

    io_details = _tflite_io(path) if spec.family == "tflite" else None
    arrays: dict[str, np.ndarray] = {}
    for index, case in enumerate(cases):
        for name, value in case.inputs.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            arrays[f"case{index}.{name}"] = to_file_dtype(value, io_details[0][name]) if io_details else value
    with tempfile.TemporaryDirectory(prefix="compat-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.npz", Path(scratch) / "outputs.npz"
        np.savez(inputs, **arrays)
        command = [str(python), str(WORKER), "--loader", spec.loader, "--model", str(path)]
        command += ["--inputs", str(inputs), "--outputs", str(outputs), "--order", ",".join(contract.input_names)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return cell("refused", f"no answer within {WORKER_TIMEOUT_S} s")
        lines = done.stdout.strip().splitlines()
        try:
            status = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            status = None
        if status is None:
            reason = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            return cell("refused", f"the runtime crashed ({reason})")
        if status["status"] != "ok":
            return cell("refused", f"{status['stage']}: {status['error']}")
        with np.load(outputs, allow_pickle=False) as archive:
            produced = {key: archive[key] for key in archive.files}
    misses: list[str] = []
    worst: dict[str, float] = {}
    ious: list[float] = []
    for index, case in enumerate(cases):
        actual: dict[str, np.ndarray] = {}
        for position, name in enumerate(contract.output_names):
            key = f"case{index}.{name}" if io_details else f"case{index}.{position}"
            if key not in produced:
                return cell("refused", f"no output {name!r} (outputs {sorted(produced)})")
            actual[name] = to_float(produced[key], io_details[1][name]) if io_details else produced[key]
        result = check_case(case, actual, tolerance)
        misses += result.misses
        for name, value in result.psnr_db.items():
            worst[name] = min(worst.get(name, float("inf")), value)
        if result.mask_iou_min is not None:
            ious.append(result.mask_iou_min)
    summary = ", ".join(f"{name} >= {value:.1f} dB" for name, value in worst.items())
    if ious:
        summary += f", mask IoU >= {min(ious):.3f}"
    where = f" ({status['note']})" if status.get("note") else ""
    if misses:
        return cell("wrong", "; ".join(misses) + where)
    return cell("pass", summary + where)


def coreml_checks(out: Path) -> list[CoreMLCheck]:
    """Every `.mlpackage` under `out`: its specification version, the first iOS that loads it,
    and whether that is the one its manifest promises (the convert option, iOS17 by default)."""
    checks = []
    for manifest_path in find_manifests(out):
        manifest = read_manifest(manifest_path)
        for record in manifest.artifacts:
            if not record.file.endswith(".mlpackage"):
                continue
            import coremltools as ct  # only where Core ML packages exist

            spec = ct.utils.load_spec(str(verify_artifact(manifest_path, record)))
            version = int(spec.specificationVersion)
            minimum = COREML_SPEC_MINIMUM_OS.get(version, f"spec {version}")
            promised = record.details.minimum_deployment_target or "iOS17"
            verdict = "pass" if minimum == promised else "mismatch"
            checks.append(CoreMLCheck(record.target, record.file, version, minimum, promised, verdict))
    return checks


def gpu_delegate_checks(out: Path) -> list[GpuDelegateCheck]:
    """Every `.tflite` under `out` through TensorFlow's GPU-compatibility analyzer (`GPU_ANALYZER`,
    in its own environment, built on first use); a file the analyzer cannot read is its own line."""
    records = [
        (manifest_path, record)
        for manifest_path in find_manifests(out)
        for record in read_manifest(manifest_path).artifacts
        if record.file.endswith(".tflite")
    ]
    if not records:
        return []
    spec = runtime_spec(GPU_ANALYZER)
    try:
        python = environment_python(spec)
    except PipelineError as error:  # said in every row, never a silent pass
        unavailable = f"unavailable: {error}"
        return [GpuDelegateCheck(r.target, r.file, r.part, r.precision, spec.name, (), unavailable) for _, r in records]
    analyzer = f"{spec.name} (tf.lite.experimental.Analyzer, gpu_compatibility=True)"
    paths, failed = {}, {}
    for manifest_path, record in records:
        try:
            paths[manifest_path, record.file] = verify_artifact(manifest_path, record)
        except PipelineError as error:
            failed[manifest_path, record.file] = f"unavailable: {error}"
    results = {}
    if paths:  # one TensorFlow process for all files (its import takes seconds)
        done = subprocess.run(
            [str(python), str(GPU_ANALYZER_SCRIPT), *map(str, paths.values())],
            capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
        )  # fmt: skip
        by_path = {
            json.loads(line)["file"]: json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")
        }
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        for key, path in paths.items():
            results[key] = by_path.get(str(path))
            if results[key] is None:
                failed[key] = f"unavailable: the analyzer failed on {path.name}: {last}"
    checks = []
    for manifest_path, record in records:
        result = results.get((manifest_path, record.file))
        if result is None:
            issues, verdict = (), failed[manifest_path, record.file]
        else:
            issues = tuple(result["issues"])
            verdict = "all ops" if result["compatible"] else f"{len(issues)} ops not"
        checks.append(
            GpuDelegateCheck(record.target, record.file, record.part, record.precision, analyzer, issues, verdict)
        )
    return checks


def build_matrix(out: Path, runtimes: list[RuntimeSpec]) -> CompatReport:
    """Every file under `out` that a runtime family loads, in each runtime of that family."""
    manifests = find_manifests(out)
    if not manifests:
        raise PipelineError(f"no manifests under {out}; run a convert session first")
    with reading([m.parent for m in manifests], "a compat run"):
        return _build_matrix(out, manifests, runtimes)


def _build_matrix(out: Path, manifests: list[Path], runtimes: list[RuntimeSpec]) -> CompatReport:
    records: list[tuple[Path, Manifest, ArtifactRecord]] = []
    cells: list[Cell] = []
    for manifest_path in manifests:
        manifest = read_manifest(manifest_path)
        records += [(manifest_path, manifest, record) for record in manifest.artifacts]
    columns = []
    for spec in runtimes:
        family_records = [r for r in records if TARGET_FAMILIES.get(r[2].target) == spec.family]
        if not family_records:
            continue
        package = PACKAGES[spec.loader]
        try:
            python = environment_python(spec)
        except PipelineError as error:  # the build, not a file, failed: say so and go on
            log.warning("%s", error)
            columns.append(RuntimeColumn(spec.name, package, "unavailable", str(error)))
            continue
        columns.append(RuntimeColumn(spec.name, package, installed_version(python, package), spec.note))
        for manifest_path, manifest, record in family_records:
            log.info("%s %s in %s", record.target, record.file, spec.name)
            try:
                path = verify_artifact(manifest_path, record)
                verify_travelling_files(manifest_path, record)
                if record.details.selftest is None:
                    raise PipelineError(f"{record.file}: no self-test vectors in the manifest")
                vectors = manifest_path.parent / record.details.selftest.file
                cells.append(run_in_runtime(spec, python, path, record, manifest, vectors))
            except PipelineError as error:
                cells.append(
                    Cell(record.target, record.file, record.part, record.precision, spec.name, "refused", str(error))
                )
    not_run = [
        NotRun(record.target, record.file, NOT_RUN_REASONS.get(record.target, "no runtime build of its format here"))
        for _, _, record in records
        if record.target not in TARGET_FAMILIES and not record.file.endswith(".mlpackage")
    ]
    return CompatReport(
        tuple(columns),
        tuple(cells),
        tuple(coreml_checks(out)),
        tuple(gpu_delegate_checks(out)),
        tuple(not_run),
        command=command_line(),
    )


def runtime_summary(report: CompatReport, file: str, target: str) -> dict[str, list[str]]:
    """For one file: the runtimes (in matrix order) that pass it, refuse it, or answer wrong."""
    summary: dict[str, list[str]] = {verdict: [] for verdict in VERDICTS}
    for c in report.cells:
        if c.file == file and c.target == target:
            summary[c.verdict].append(c.runtime)
    return summary


def record_in_manifests(out: Path, report: CompatReport) -> None:
    """Each manifest record gets `details.runtimes`: where its file was proven (pass), refused and
    wrong, so an app team picks the file for the runtime it ships from the manifest alone."""
    for manifest_path in find_manifests(out):
        with folder_lock(manifest_path.parent, exclusive=True, purpose="a compat run recording its matrix"):
            raw = json.loads(manifest_path.read_text())
            changed = False
            gpu = {(c.target, c.file): c for c in report.gpu}
            for item in raw.get("artifacts", []):
                summary = runtime_summary(report, item["file"], item["target"])
                if any(summary.values()):
                    item.setdefault("details", {})["runtimes"] = {**summary, "checked": report.created}
                    changed = True
                check = gpu.get((item["target"], item["file"]))
                if check is not None:
                    item.setdefault("details", {})["gpu_delegate"] = {
                        "verdict": check.verdict,
                        "ops_not_supported": list(check.issues),
                        "analyzer": check.analyzer,
                        "checked": report.created,
                    }
                    changed = True
            if changed:
                atomic_write_json(manifest_path, raw)


def write_report(out: Path, report: CompatReport) -> list[Path]:
    from validation.compat.text import compat_markdown

    json_path, md_path = out / "compat.json", out / "compat.md"
    atomic_write_json(json_path, report.to_json())
    atomic_write_bytes(md_path, compat_markdown(report).encode())
    return [json_path, md_path]


def read_report(out: Path) -> CompatReport | None:
    """The matrix a compat run left under `out`, if any (the validate report shows it)."""
    path = Path(out) / "compat.json"
    if not path.is_file():
        return None
    return read_result(path, CompatReport, "compat report")
