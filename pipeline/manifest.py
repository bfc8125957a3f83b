"""The artifact manifest: what each converted file is, where it came from, and its contract.

Each target writes `<out>/<target>/manifest.json`; the validate stage finds runs by these.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, computed_field, field_serializer

from pipeline.contract import DEFAULT_BATCH_PROMPTS, PartContract, contract_for
from pipeline.errors import ArtifactError
from pipeline.files import atomic_write_json, sha256_file, size_bytes
from pipeline.fp16_range import Fp16Headroom
from pipeline.records import describe_validation_error, read_json

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "segment-anything", "timm", "numpy", *packages):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class _Record(BaseModel):
    """A manifest record: immutable, unknown keys refused (a misspelt key is a mistake)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _OpenRecord(BaseModel):
    """A record a target may extend with keys of its own (kept, and shown as extra in the schema)."""

    model_config = ConfigDict(frozen=True, extra="allow")


class WeightsRecord(_Record):
    """The weights the files were converted from: a checkpoint (path, sha256) or a seed."""

    model_type: str
    checkpoint: str | None = None
    sha256: str | None = None
    seed: int | None = None
    description: str = "unknown weights"


class ManifestConfig(_Record):
    """The run configuration the files were made with (`RunConfig.to_json`)."""

    model_type: str = "vit_t"
    checkpoint: str | None = None
    weights_seed: int = 0
    num_points: StrictInt
    """Prompt slots N of every decoder file in the folder."""
    batch_prompts: int = DEFAULT_BATCH_PROMPTS
    """B of the batched decoder file (0: none made)."""
    targets: list[str] = Field(default_factory=list)
    precisions: list[str] = Field(default_factory=list)
    out_dir: str | None = None
    gates: dict[str, dict[str, Any]] = Field(default_factory=dict)
    target_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class OutputAgreement(_Record):
    """One output of a fresh file on the example photo against PyTorch."""

    psnr_db: float
    max_abs_error: float


class SelftestRecord(_OpenRecord):
    """The `<stem>.selftest.npz` vectors that travel with a file, and what the file measured on them."""

    file: str
    sha256: str | None = None
    cases: list[str] = Field(default_factory=list)
    tolerance: dict[str, Any] = Field(default_factory=dict)
    measured: dict[str, Any] = Field(default_factory=dict)


class CompanionRecord(_OpenRecord):
    """A file a target writes beside the artifact (ExecuTorch's BundledProgram `.bpte`)."""

    file: str
    sha256: str | None = None


class NeuralEngineCensus(_Record):
    """A Core ML package's or Core AI asset's ops against the rules of what the Neural Engine is
    known not to run (mobile_targets/neural_engine.py)."""

    ops: int
    outside: dict[str, int] = Field(default_factory=dict)
    """Rule -> how many ops it matches (rules that match none are left out)."""
    examples: dict[str, list[str]] = Field(default_factory=dict)
    sources: dict[str, str] = Field(default_factory=dict)
    """Rule -> what its public source says, and where."""

    @property
    def outside_total(self) -> int:
        return sum(self.outside.values())


class ArtifactDetails(_OpenRecord):
    """What the conversion measured and wrote beside the file; targets add keys of their own."""

    conversion_seconds: float | None = None
    gate: dict[str, OutputAgreement] = Field(default_factory=dict)
    """The convert stage's check right after conversion, per output."""
    selftest: SelftestRecord | None = None
    companions: list[CompanionRecord] = Field(default_factory=list)
    runtimes: dict[str, Any] | None = None
    """Where a compat run proved the file (`pass`), and where it was refused or wrong."""
    arithmetic: str | None = None
    minimum_deployment_target: str | None = None
    fp16_headroom: Fp16Headroom | None = None
    neural_engine: NeuralEngineCensus | None = None
    """For a file that computes in fp16: its tightest ops on the calibration photos, and those kept fp32."""


class ArtifactRecord(_Record):
    """One converted file (or `.mlpackage` folder), relative to the manifest's folder."""

    file: str
    sha256: str
    bytes: int
    part: str
    target: str
    precision: str
    contract: dict[str, Any]
    details: ArtifactDetails = Field(default_factory=ArtifactDetails)

    @field_serializer("details", mode="wrap")
    def _details_without_empty(self, details: ArtifactDetails, handler: Any):
        """Keys a target did not fill stay out of manifest.json (no return type: the schema stays
        the field's)."""
        return {key: value for key, value in handler(details).items() if value not in (None, [], {})}

    @classmethod
    def describe_file(cls, path: Path, root: Path, content: Path | None = None, **fields: Any) -> ArtifactRecord:
        """The record of `path` (relative to `root`); hash and size read from `content` when the
        file is still staged elsewhere."""
        content = Path(content or path)
        return cls(
            file=str(Path(path).relative_to(root)), sha256=sha256_file(content), bytes=size_bytes(content), **fields
        )


class ConversionFailure(_Record):
    """A conversion that failed in the latest run; an earlier file of that part and precision, if
    any, is still listed under `artifacts` and still on disk."""

    part: str
    precision: str
    error: str


class Manifest(_Record):
    """`<out>/<target>/manifest.json`: the files of one target, their weights and contract."""

    target: str
    weights: WeightsRecord
    config: ManifestConfig
    tool_versions: dict[str, str]
    artifacts: tuple[ArtifactRecord, ...]
    failures: tuple[ConversionFailure, ...] = ()
    not_made: tuple[ConversionFailure, ...] = ()
    """Optional files (the batched decoder) that converted but missed their precision's gate, so
    they are not shipped; not failures."""
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    command: str = ""
    """The convert command that made the folder (empty: not recorded)."""
    schema_version: int = SCHEMA_VERSION

    def contract(self, part: str) -> PartContract:
        """A part's contract as this manifest's files were converted (N slots, B prompts)."""
        return contract_for(part, self.config.num_points, self.config.batch_prompts)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def random_weights(self) -> bool:
        return self.weights.checkpoint is None

    def target_options(self) -> dict[str, Any]:
        """The converter options this folder's files were made with (`[target_options.<target>]`)."""
        return self.config.target_options.get(self.target, {})

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_json(path, self.to_json())
        return path


def manifest_schema() -> dict[str, Any]:
    """manifest.json's JSON Schema, as an app's build script reads the file (docs/manifest.schema.json)."""
    return Manifest.model_json_schema(mode="serialization")


def read_manifest(path: Path) -> Manifest:
    """Parse a manifest; one clear line if it is missing or not one of ours."""
    path = Path(path)
    raw = read_json(path, "manifest", ArtifactError)
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} is not a manifest of schema version {SCHEMA_VERSION}")
    raw.pop("random_weights", None)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        raise ArtifactError(
            f"{path} is missing manifest fields or has malformed ones: {describe_validation_error(error, '')}"
        ) from None


def same_weights(a: WeightsRecord, b: WeightsRecord) -> bool:
    """Two manifests' weights are the same model: same type and checkpoint content, or same seed."""
    return (a.model_type, a.sha256, a.seed) == (b.model_type, b.sha256, b.seed)


def find_manifests(root: Path) -> list[Path]:
    return sorted(Path(root).glob(f"*/{MANIFEST_NAME}"))


def verify_artifact(manifest_path: Path, record: ArtifactRecord, check_sha256: bool = True) -> Path:
    """The artifact's path, after checking it stays in the manifest's folder, exists and (unless
    `check_sha256` is False) still has the recorded hash."""
    path = Path(manifest_path).parent / record.file
    if Path(record.file).is_absolute() or ".." in Path(record.file).parts:
        raise ArtifactError(f"{manifest_path}: artifact path {record.file!r} leaves the manifest's folder")
    if not path.exists():
        raise ArtifactError(f"{record.target} {record.part} {record.precision}: file missing: {path}")
    if not check_sha256:
        return path
    digest = sha256_file(path)
    if digest != record.sha256:
        raise ArtifactError(
            f"{record.target} {record.part} {record.precision}: {path} changed since conversion "
            f"(sha256 {digest[:12]} vs manifest {record.sha256[:12]})"
        )
    return path


def travelling_files(record: ArtifactRecord) -> dict[str, str | None]:
    """The files that travel with a record's file, by name relative to the manifest's folder:
    its self-test vectors and its companions (ExecuTorch's BundledProgram), each with the sha256
    the manifest recorded (None when it recorded none)."""
    files: dict[str, str | None] = {}
    if record.details.selftest is not None:
        files[record.details.selftest.file] = record.details.selftest.sha256
    for companion in record.details.companions:
        files[companion.file] = companion.sha256
    return files


def recorded_files(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest lists (artifacts and what travels with them) -> its sha256."""
    recorded: dict[str, str] = {}
    for record in manifest.artifacts:
        recorded[record.file] = record.sha256
        recorded.update({name: digest for name, digest in travelling_files(record).items() if digest})
    return recorded


def verify_travelling_files(manifest_path: Path, record: ArtifactRecord) -> None:
    """Each file that travels with the record's file is there and is what the manifest recorded:
    a vectors file of another run or a damaged one is one line, never trusted."""
    folder = Path(manifest_path).parent
    for name, digest in travelling_files(record).items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{manifest_path}: {name!r} leaves the manifest's folder")
        if not path.is_file():
            vectors = record.details.selftest is not None and name == record.details.selftest.file
            raise ArtifactError(f"{'self-test vectors' if vectors else 'companion file'} not found: {path}")
        if digest and sha256_file(path) != digest:
            raise ArtifactError(
                f"{path} is not the file converted with {record.file} (sha256 {sha256_file(path)[:12]} vs "
                f"manifest {digest[:12]}): a damaged file, or one of another run"
            )


if __name__ == "__main__":  # python -m pipeline.manifest > docs/manifest.schema.json
    print(json.dumps(manifest_schema(), indent=2))
