"""The small interface every target implements: convert a part, load a runner, describe itself.

The conversion driver (`mobile_targets.convert`) and the validate stage only talk to targets
through this, so a new target is one module plus one line in the registry.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.contract import PartContract
from pipeline.errors import ArtifactError, ConfigError
from pipeline.model import ARCHITECTURES, STUDENT_TYPE
from pipeline.selftest import SelftestCase


@dataclass(frozen=True)
class PartToConvert:
    """One export wrapper with its contract and example inputs from a real photo."""

    module: torch.nn.Module
    contract: PartContract
    example_inputs: tuple[torch.Tensor, ...]
    """One real photo (and prompt) prepared by the contract: the export's sample and the gate's input."""
    weights_description: str = ""
    """Where the weights came from, for formats that carry metadata (Core ML)."""
    architecture: str = ARCHITECTURES[STUDENT_TYPE]
    """The model's real architecture (pipeline.model.describe_architecture), for metadata."""
    selftest: tuple[SelftestCase, ...] = ()
    """Vectors that travel with the file (`<stem>.selftest.npz`): inputs and PyTorch fp32's outputs."""
    calibration: Callable[[], tuple[dict[str, np.ndarray], ...]] | None = None
    """Inputs from several real photos and prompts, by contract name, made on demand: only static
    activation quantization (the w8a8 files) reads them."""
    fp32_ops: frozenset[str] = frozenset()
    """Nodes of `pipeline.export_wrappers.exported_program(module, example_inputs)` a file that
    computes in fp16 keeps in fp32 (their fp16 headroom is under the margin: pipeline.fp16_range);
    set by the convert stage for targets with `keeps_ops_fp32`."""
    optional: bool = False
    """A precision whose file misses its gate is left out (`not_made`), not a failed conversion: the
    batched decoder ships in the precisions that hold (e.g. dynamic int8 quantizes activations over
    the whole batch, which can cost a row more than the one-prompt file loses)."""

    @property
    def name(self) -> str:
        return self.contract.part


@dataclass(frozen=True)
class CompanionFile:
    """A file that travels beside a converted file (e.g. ExecuTorch's BundledProgram), made and
    checked from the fresh file; the convert stage writes it with the file, atomically."""

    name: str
    content: bytes
    details: dict[str, Any]
    """What the manifest records of it (beside its file name and sha256)."""


class Runner(ABC):
    """A converted file loaded in its runtime: named numpy inputs in, named outputs out."""

    def __init__(self, path: Path, contract: PartContract) -> None:
        self.path = Path(path)
        self.contract = contract

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs and outputs are keyed by the contract's names, float32."""

    def ordered_inputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in self.contract.input_names if name not in inputs]
        if missing:
            raise KeyError(f"{self.contract.part} runner is missing inputs {missing}")
        return [np.ascontiguousarray(inputs[name], dtype=np.float32) for name in self.contract.input_names]


class RepeatCallCache(Runner):
    """A runner that answers a call with the inputs of the previous one from that call's outputs
    (copies), without running the file again.

    Why: the convert stage's PSNR gate runs the example photo and the encoder's self-test vectors
    start with the same photo; an emulated encoder (Core ML here, Core AI fp16 on Linux) takes from
    seconds to minutes a call, and one call gives both checks the same answer."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner.path, runner.contract)
        self.runner = runner
        self._last: tuple[str, dict[str, np.ndarray]] | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = hashlib.sha256(b"".join(array.tobytes() for array in self.ordered_inputs(inputs))).hexdigest()
        if self._last is None or self._last[0] != key:
            self._last = (key, self.runner.run(inputs))
        return {name: value.copy() for name, value in self._last[1].items()}


Options = TypeVar("Options")


def replace_options(current: Options, options: Mapping[str, Any], target: str) -> Options:
    """`current` (a target's frozen options dataclass) with `options` applied, each checked by the
    dataclass; a key it does not have is one ConfigError naming the ones it has."""
    known = {f.name for f in fields(current)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown {target} options {unknown}; expected some of {sorted(known)}")
    return replace(current, **options)


class Target(ABC):
    """A mobile format: its converter, its runtime, and what it supports."""

    name: str
    extension: str
    precisions: tuple[str, ...]
    runtime_name: str
    fp16_precisions: tuple[str, ...] = ()
    """Precisions whose files compute in fp16 on the device: the convert stage checks their fp16
    headroom first (pipeline.fp16_range)."""
    keeps_ops_fp32: bool = False
    """Whether convert_part honours `PartToConvert.fp32_ops` (else an op under the fp16 margin
    stops the conversion)."""

    @abstractmethod
    def convert_part(self, part: PartToConvert, precision: str, path: Path) -> dict[str, Any]:
        """Write `part` in `precision` to `path`; return details for the manifest."""

    def module_to_export(self, part: PartToConvert, precision: str) -> torch.nn.Module:
        """The graph `convert_part` exports for `part` in `precision`, with the target's own patches:
        the convert stage measures fp16 headroom on it, so `PartToConvert.fp32_ops` name its nodes."""
        return part.module

    @abstractmethod
    def load_runner(self, path: Path, contract: PartContract, threads: int | None = None) -> Runner:
        """Load a converted file in this target's real runtime; one-line ArtifactError if unreadable."""

    def companion_files(self, path: Path, part: PartToConvert) -> tuple[CompanionFile, ...]:
        """Files to ship beside the fresh file at `path` (named after the final file's stem), each
        already checked in this target's runtime; none by default."""
        return ()

    def verify_companion(self, path: Path, details: dict[str, Any]) -> str:
        """Check a companion file (`companion_files`) in this target's runtime; a one-line summary,
        or ArtifactError."""
        raise ArtifactError(f"target {self.name} makes no companion files, got {path.name}")

    def with_options(self, options: Mapping[str, Any]) -> Target:
        """This target configured by `[target_options.<name>]`; targets without options refuse any."""
        if options:
            raise ConfigError(f"target {self.name} takes no options, got {sorted(options)}")
        return self

    def tool_packages(self) -> Iterable[str]:
        """PyPI packages whose versions go into the manifest."""
        return ()

    def emulation_note(self) -> str | None:
        """Why this machine's latency of the target's files means nothing (they run emulated), or None."""
        return None

    def selftest_only(self, part: str, precision: str) -> str | None:
        """Why validate scores this file on its self-test vectors only (run in its runtime when it
        was converted, recorded in the manifest) rather than on every held-out photo; None: every
        photo. For runtimes too slow here to run every photo and prompt."""
        return None
