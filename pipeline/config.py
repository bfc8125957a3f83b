"""The run configuration: one small typed object, read from TOML and command-line options.

Every stage's entry point takes `--config FILE`, `--checkpoint PATH` and `--out DIR`; options
given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline.contract import DEFAULT_BATCH_PROMPTS, DEFAULT_NUM_POINTS
from pipeline.errors import ConfigError
from pipeline.model import MODEL_TYPES, STUDENT_TYPE
from pipeline.records import STRICT, one_line_errors

PRECISIONS = ("fp32", "fp16", "int8", "palettize6", "w8a8")
"""palettize6 (6-bit palettized weights) exists for Core ML only, w8a8 (int8 weights and
activations, calibrated on real photos) for Core ML and TFLite; other targets skip them."""
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
"""What a convert session makes without --precisions: the variants whose encoder-decoder pairs hold
their gates end to end. palettize6 is made on request (`--precisions palettize6`): its 6-bit
encoder falls under its pair gate (docs/validation.md, "Deployed pairs")."""


@dataclass(frozen=True, config=STRICT)
class RunConfig:
    """What to build: which weights, how many prompt slots, which targets and precisions, where."""

    model_type: str = STUDENT_TYPE
    checkpoint: Path | None = Field(default=None, strict=False)
    weights_seed: int = 0
    """Seed of the random weights used without a checkpoint (never the prompts' seed)."""
    num_points: int = DEFAULT_NUM_POINTS
    batch_prompts: int = DEFAULT_BATCH_PROMPTS
    """B of the batched decoder (`prompt_decoder_b<B>` files, segment everything); 0: none."""
    targets: tuple[str, ...] = Field(default=(), strict=False)
    precisions: tuple[str, ...] = Field(default=DEFAULT_PRECISIONS, strict=False)
    out_dir: Path = Field(default=Path("artifacts"), strict=False)
    gates: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Validation gate overrides per precision (`[gates.int8]` in TOML); see validation.gates,
    which checks each value."""
    target_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-target converter options (`[target_options.coreml]` in TOML), e.g. minimum_deployment_target."""
    _errors = one_line_errors("run config key ", ConfigError)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is unknown; expected one of {', '.join(MODEL_TYPES)}")
        if not 2 <= self.num_points <= 64:
            raise ConfigError(f"num_points must be an integer in 2..64, got {self.num_points!r}")
        if not 0 <= self.batch_prompts <= 256:
            raise ConfigError(
                f"batch_prompts must be an integer in 0..256 (0: no batched decoder), got {self.batch_prompts!r}"
            )
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ConfigError(f"unknown precisions {unknown}; expected some of {', '.join(PRECISIONS)}")
        if not self.precisions:
            raise ConfigError(f"precisions is empty; expected some of {', '.join(PRECISIONS)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "weights_seed": self.weights_seed,
            "num_points": self.num_points,
            "batch_prompts": self.batch_prompts,
            "targets": list(self.targets),
            "precisions": list(self.precisions),
            "out_dir": str(self.out_dir),
            "gates": self.gates,
            "target_options": self.target_options,
        }


_PATH_FIELDS = {"checkpoint", "out_dir"}


def read_toml_table(path: Path, known: set[str], table: str | None = None) -> dict[str, Any]:
    """The top-level keys of a TOML file (or of its `[table]`, when there is one), each checked
    against `known`; relative paths stay the caller's to resolve against `path.parent`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    raw = document.get(table, document) if table else document
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; expected some of {sorted(known)}")
    return raw


def load_config(path: Path | None) -> RunConfig:
    """Read a TOML file whose top-level keys are RunConfig's fields (all optional)."""
    if path is None:
        return RunConfig()
    path = Path(path)
    raw = read_toml_table(path, {f.name for f in fields(RunConfig)})
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _PATH_FIELDS:
            if not isinstance(value, str):
                raise ConfigError(f"{path}: {key} must be a path string, got {type(value).__name__} {value!r}")
            value = (path.parent / value) if value else None
        values[key] = value
    try:
        return RunConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def parse_bool(value: Any, what: str) -> bool:
    """true/false only (TOML booleans, or the words from the command line); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{what} must be true or false, got {value!r}")


def add_run_arguments(parser: argparse.ArgumentParser, convert: bool = True) -> None:
    """The options every stage shares; the convert-only ones (N, weights seed, converter options)
    only where they are used, so no stage accepts an option it ignores."""
    parser.add_argument("--config", type=Path, help="TOML run configuration")
    parser.add_argument("--checkpoint", type=Path, help="official checkpoint (mobile_sam.pt, sam_vit_*.pth)")
    parser.add_argument("--out", type=Path, help="output folder")
    if not convert:
        return
    parser.add_argument("--num-points", type=int, help="prompt slots N of the exported decoder")
    parser.add_argument(
        "--batch-prompts", type=int, help="B of the batched decoder (default 64; 0: no batched decoder)"
    )
    parser.add_argument(
        "--weights-seed", type=int, help="seed of the random weights used without a checkpoint (default 0)"
    )
    parser.add_argument(
        "--target-option",
        action="append",
        default=[],
        metavar="TARGET.KEY=VALUE",
        help="a converter option, e.g. coreml.minimum_deployment_target=iOS18 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    config = load_config(args.config)
    overrides = {
        "checkpoint": args.checkpoint,
        "out_dir": args.out,
        "num_points": getattr(args, "num_points", None),
        "batch_prompts": getattr(args, "batch_prompts", None),
        "weights_seed": getattr(args, "weights_seed", None),
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return with_target_options(config, getattr(args, "target_option", []))


def with_target_options(config: RunConfig, assignments: list[str]) -> RunConfig:
    """Lay `TARGET.KEY=VALUE` assignments over the config's target_options."""
    options = {target: dict(values) for target, values in config.target_options.items()}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        target, dot, option = key.partition(".")
        if not separator or not dot or not target or not option:
            raise ConfigError(
                f"--target-option {assignment!r} is not TARGET.KEY=VALUE (e.g. coreml.encoder_input=image)"
            )
        options.setdefault(target, {})[option] = value
    return replace(config, target_options=options)
