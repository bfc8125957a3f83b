"""Mobile targets. Each lives in its own module and is looked up by name, imported lazily so
a missing converter package only matters for the target that needs it."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from mobile_targets.base import Runner, Target
from pipeline.errors import PipelineError
from pipeline.manifest import ArtifactRecord, Manifest, verify_artifact, verify_travelling_files

TARGET_MODULES = {
    "coreml": "mobile_targets.coreml.converter",
    "coreai": "mobile_targets.coreai.converter",
    "executorch": "mobile_targets.executorch_target",
    "executorch_coreml": "mobile_targets.executorch_coreml_target",
    "tflite": "mobile_targets.tflite.converter",
}


def target_names() -> tuple[str, ...]:
    return tuple(TARGET_MODULES)


def get_target(name: str) -> Target:
    if name not in TARGET_MODULES:
        raise PipelineError(f"unknown target {name!r}; expected one of {', '.join(TARGET_MODULES)}")
    try:
        module = import_module(TARGET_MODULES[name])
    except ImportError as error:
        raise PipelineError(f"target {name} needs a package that is not installed: {error}") from None
    return module.TARGET


def check_target_options(options: dict[str, object]) -> None:
    """`[target_options.X]` / `--target-option X.key=value` must name a known target."""
    unknown = sorted(set(options) - set(TARGET_MODULES))
    if unknown:
        raise PipelineError(
            f"target options for unknown targets {unknown}; expected some of {', '.join(TARGET_MODULES)}"
        )


def load_artifact_runner(
    manifest_path: Path, manifest: Manifest, record: ArtifactRecord, threads: int | None, check_sha256: bool = True
) -> Runner:
    """One manifest record's file in its target's runtime, with the target options it was
    converted with; first checked, with the files that travel with it (vectors, companions),
    against the sha256s its manifest recorded unless `check_sha256` is False."""
    path = verify_artifact(manifest_path, record, check_sha256)
    if check_sha256:
        verify_travelling_files(manifest_path, record)
    contract = manifest.contract(record.part)
    target = get_target(record.target).with_options(manifest.target_options())
    return target.load_runner(path, contract, threads=threads)
