"""Real damage to real files, for tests that show a gate catches it: a weight set to NaN (or to
another value) inside a converted Core ML package, and the manifest re-hashed so the damage is
not caught by the hash check but must be caught by running the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from pipeline.files import sha256_file, size_bytes
from pipeline.selftest import selftest_path

BLOB_SENTINEL = 0xDEADBEEF
BLOB_HEADER = "<IIQQ"  # sentinel, MIL data type, size in bytes, absolute data offset (milstorage)


def coreml_weight_blobs(package: Path) -> list[tuple[int, int]]:
    """(data offset, size in bytes) of every weight blob in an .mlpackage's weight.bin."""
    data = (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()
    blobs, position = [], 64  # the file header is 64 bytes; every blob is 64-byte aligned
    while position + struct.calcsize(BLOB_HEADER) <= len(data):
        sentinel, _, size, offset = struct.unpack_from(BLOB_HEADER, data, position)
        assert sentinel == BLOB_SENTINEL, f"no blob header at {position} of {package}"
        blobs.append((offset, size))
        position = (offset + size + 63) // 64 * 64
    return blobs


def set_coreml_weights(package: Path, value: float, count: int | None = None) -> None:
    """Overwrite the first `count` float32 values (all when None) of the package's largest fp32
    blob with `value`: a real weight of a real file, changed in place."""
    offset, size = max(coreml_weight_blobs(package), key=lambda blob: blob[1])
    values = size // 4 if count is None else count
    path = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(np.full(values, value, dtype="<f4").tobytes())


def rehash(manifest_path: Path) -> None:
    """Record every artifact's current sha256 and size, as if the damaged file were the converted one."""
    manifest = json.loads(manifest_path.read_text())
    for record in manifest["artifacts"]:
        path = manifest_path.parent / record["file"]
        record["sha256"], record["bytes"] = sha256_file(path), size_bytes(path)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def keep_only_precisions(manifest_path: Path, precisions: tuple[str, ...]) -> None:
    """Delete the other precisions' files (and self-test vectors) and records: a copy of a larger
    convert output that looks like a run with fewer --precisions."""
    manifest = json.loads(manifest_path.read_text())
    kept = []
    for record in manifest["artifacts"]:
        if record["precision"] in precisions:
            kept.append(record)
            continue
        path = manifest_path.parent / record["file"]
        path.unlink()
        selftest_path(path).unlink(missing_ok=True)
    manifest["artifacts"] = kept
    manifest["config"]["precisions"] = [p for p in manifest["config"]["precisions"] if p in precisions]
    manifest_path.write_text(json.dumps(manifest, indent=2))
