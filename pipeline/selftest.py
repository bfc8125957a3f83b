"""Self-test vectors that travel with each converted file: `<file stem>.selftest.npz`.

An app's own unit test (XCTest, an Android instrumented test) loads the npz, feeds every case's
inputs to the file on the device and checks its outputs against the expected ones with the
tolerances in the manifest. Here, the convert stage writes them and `nox -s selftest` runs them
in the desktop runtimes. The format (docs/contract.md, "Self-test vectors"):

- `case<i>.input.<contract input name>`: float32 arrays with the contract's shapes;
- `case<i>.expected.<contract output name>`: float32, PyTorch fp32's outputs on those inputs
  (never the file's own outputs);
- cases are numbered from 0 without gaps; the manifest record's `selftest.cases` names each
  case's kind in order.

Checks, per case: for every expected output E and actual A, PSNR = 10 log10(max|E|^2 /
mean((E - A)^2)) (infinite when equal) must reach `min_psnr_db[name]` where one is given; for
`low_res_masks`, the IoU of (E > 0) and (A > 0) of the single-mask output `low_res_masks[0, 0]`
(1 when both are empty) must reach `min_mask_iou`. The single-mask output is what an app shows
for every prompt but a lone point; the three multimask outputs are covered by the PSNR.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import PartContract
from pipeline.errors import ArtifactError
from pipeline.files import atomic_write_bytes
from pipeline.metrics import count_non_finite, mask_iou, psnr_db

SELFTEST_SUFFIX = ".selftest.npz"
_KEY = re.compile(r"^case(\d+)\.(input|expected)\.([A-Za-z_]+)$")


@dataclass(frozen=True)
class SelftestCase:
    kind: str
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    """What every case must reach: a precision's gate, as a check an app can compute."""

    min_psnr_db: dict[str, float] = field(default_factory=dict)
    min_mask_iou: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CaseResult:
    kind: str
    psnr_db: dict[str, float]
    mask_iou_min: float | None
    non_finite: int
    misses: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.misses


def selftest_path(artifact: Path) -> Path:
    """`image_encoder_fp16.mlpackage` -> `image_encoder_fp16.selftest.npz` beside it."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name[: -len(artifact.suffix)] + SELFTEST_SUFFIX)


def write_vectors(path: Path, cases: list[SelftestCase]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for index, case in enumerate(cases):
        for name, value in case.inputs.items():
            arrays[f"case{index}.input.{name}"] = np.ascontiguousarray(value, dtype=np.float32)
        for name, value in case.expected.items():
            arrays[f"case{index}.expected.{name}"] = np.ascontiguousarray(value, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_vectors(path: Path, kinds: list[str], contract: PartContract) -> list[SelftestCase]:
    """The cases of an npz, checked against the contract; one line for a missing or bad file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise ArtifactError(f"self-test vectors not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        raise ArtifactError(
            f"{path} is not a self-test vectors file (expected an npz of float32 arrays written by the convert stage)"
        ) from None
    cases: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in arrays.items():
        match = _KEY.match(key)
        if not match:
            raise ArtifactError(
                f"{path}: unexpected key {key!r} (expected case<i>.input.<name> / case<i>.expected.<name>)"
            )
        cases.setdefault(int(match.group(1)), {"input": {}, "expected": {}})[match.group(2)][match.group(3)] = value
    if sorted(cases) != list(range(len(kinds))):
        raise ArtifactError(f"{path}: cases {sorted(cases)} do not match the manifest's {len(kinds)} cases")
    result = []
    for index, kind in enumerate(kinds):
        inputs, expected = cases[index]["input"], cases[index]["expected"]
        if sorted(inputs) != sorted(contract.input_names) or sorted(expected) != sorted(contract.output_names):
            raise ArtifactError(f"{path}: case {index} does not hold the {contract.part} contract's inputs and outputs")
        result.append(SelftestCase(kind, inputs, expected))
    return result


def check_case(case: SelftestCase, actual: dict[str, np.ndarray], tolerance: Tolerance) -> CaseResult:
    """The documented checks (docs/contract.md): PSNR per output and the IoU of the single-mask output."""
    misses: list[str] = []
    psnrs: dict[str, float] = {}
    non_finite = 0
    for name, expected in case.expected.items():
        value = np.asarray(actual[name], dtype=np.float32).reshape(expected.shape)
        non_finite += count_non_finite(value)
        psnrs[name] = psnr_db(expected, value)
        minimum = tolerance.min_psnr_db.get(name)
        if minimum is not None and not psnrs[name] >= minimum:
            misses.append(f"{case.kind}: {name} PSNR {psnrs[name]:.1f} dB < {minimum}")
    if non_finite:
        misses.append(f"{case.kind}: {non_finite} non-finite output values")
    iou_min = None
    if "low_res_masks" in case.expected:
        expected = case.expected["low_res_masks"][:, 0]  # every prompt's single-mask output
        value = np.asarray(actual["low_res_masks"]).reshape(case.expected["low_res_masks"].shape)[:, 0]
        iou_min = min(mask_iou(e > 0, v > 0) for e, v in zip(expected, value, strict=True))
        if tolerance.min_mask_iou is not None and not iou_min >= tolerance.min_mask_iou:
            misses.append(f"{case.kind}: low_res_masks IoU {iou_min:.4f} < {tolerance.min_mask_iou}")
    return CaseResult(case.kind, psnrs, iou_min, non_finite, tuple(misses))


def run_vectors(runner: Any, cases: list[SelftestCase], tolerance: Tolerance) -> list[CaseResult]:
    return [check_case(case, runner.run(case.inputs), tolerance) for case in cases]
