"""The artifact manifest: what each converted file is, where it came from, and its contract.

Each target writes `<out>/<target>/manifest.json`; the validate stage finds runs by these.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.contract import DEFAULT_BATCH_PROMPTS, PartContract, contract_for
from pipeline.errors import ArtifactError
from pipeline.files import atomic_write_json, sha256_file, size_bytes

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


@dataclass(frozen=True)
class ArtifactRecord:
    """One converted file (or `.mlpackage` folder), relative to the manifest's folder."""

    file: str
    sha256: str
    bytes: int
    part: str
    target: str
    precision: str
    contract: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def describe_file(cls, path: Path, root: Path, content: Path | None = None, **fields: Any) -> ArtifactRecord:
        """The record of `path` (relative to `root`); hash and size read from `content` when the
        file is still staged elsewhere."""
        content = Path(content or path)
        return cls(
            file=str(Path(path).relative_to(root)), sha256=sha256_file(content), bytes=size_bytes(content), **fields
        )


@dataclass(frozen=True)
class ConversionFailure:
    """A conversion that failed in the latest run; an earlier file of that part and precision, if
    any, is still listed under `artifacts` and still on disk."""

    part: str
    precision: str
    error: str


@dataclass(frozen=True)
class Manifest:
    target: str
    weights: dict[str, Any]
    config: dict[str, Any]
    tool_versions: dict[str, str]
    artifacts: tuple[ArtifactRecord, ...]
    failures: tuple[ConversionFailure, ...] = ()
    not_made: tuple[ConversionFailure, ...] = ()
    """Optional files (the batched decoder) that converted but missed their precision's gate, so
    they are not shipped; not failures."""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def contract(self, part: str) -> PartContract:
        """A part's contract as this manifest's files were converted (N slots, B prompts)."""
        return contract_for(part, self.config["num_points"], self.config.get("batch_prompts", DEFAULT_BATCH_PROMPTS))

    @property
    def random_weights(self) -> bool:
        return self.weights.get("checkpoint") is None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["random_weights"] = self.random_weights
        return payload

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_json(path, self.to_json())
        return path


def read_manifest(path: Path) -> Manifest:
    """Parse a manifest; one clear line if it is missing or not one of ours."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"manifest not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} is not a manifest of schema version {SCHEMA_VERSION}")
    try:
        raw.pop("random_weights", None)
        artifacts = tuple(ArtifactRecord(**item) for item in raw.pop("artifacts"))
        failures = tuple(ConversionFailure(**item) for item in raw.pop("failures", []))
        not_made = tuple(ConversionFailure(**item) for item in raw.pop("not_made", []))
        manifest = Manifest(artifacts=artifacts, failures=failures, not_made=not_made, **raw)
    except (KeyError, TypeError, AttributeError) as error:
        raise ArtifactError(f"{path} is missing manifest fields or has malformed ones: {error}") from None
    if not isinstance(manifest.weights, dict) or not isinstance(manifest.config, dict):
        raise ArtifactError(f"{path}: weights and config must be JSON objects")
    if not isinstance(manifest.config.get("num_points"), int):
        raise ArtifactError(f"{path}: config.num_points must be an integer, got {manifest.config.get('num_points')!r}")
    return manifest


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two manifests' weights are the same model: same type and checkpoint content, or same seed."""
    return all(a.get(key) == b.get(key) for key in ("model_type", "sha256", "seed"))


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
    selftest = record.details.get("selftest")
    if isinstance(selftest, dict) and selftest.get("file"):
        files[str(selftest["file"])] = selftest.get("sha256")
    for companion in record.details.get("companions", []):
        files[str(companion["file"])] = companion.get("sha256")
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
            vectors = name == record.details.get("selftest", {}).get("file")
            raise ArtifactError(f"{'self-test vectors' if vectors else 'companion file'} not found: {path}")
        if digest and sha256_file(path) != digest:
            raise ArtifactError(
                f"{path} is not the file converted with {record.file} (sha256 {sha256_file(path)[:12]} vs "
                f"manifest {digest[:12]}): a damaged file, or one of another run"
            )
