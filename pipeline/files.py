"""Atomic writes and hashing: a crash or a bad input never leaves a half-written artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file, or of every file under a folder (an `.mlpackage` is a folder)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        if Path(path).is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


def size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, 0o666 & ~_current_umask())  # temporary files are 0600; deliverables are not
    os.replace(handle.name, path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_produce(path: Path, produce: Callable[[Path], None]) -> None:
    """Let `produce` write to a temporary sibling (file or folder), then rename it into place.

    If `produce` raises, the earlier artifact at `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    temporary = staging / path.name
    try:
        produce(temporary)
        if path.is_dir():
            backup = staging / "previous"
            os.replace(path, backup)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
