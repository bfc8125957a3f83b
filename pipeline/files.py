"""Atomic writes and hashing: a crash or a bad input never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
    """Write `data` to a temporary sibling, then rename it into place; on any error (a full disk)
    the temporary is removed and the earlier file is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, 0o666 & ~_current_umask())  # temporary files are 0600; deliverables are not
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def remove_path(path: Path) -> None:
    """Remove a file or a folder (an `.mlpackage`), if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_produce(path: Path, produce: Callable[[Path], None]) -> None:
    """Let `produce` write to a temporary sibling (file or folder), then rename it into place.

    If `produce` raises, the earlier artifact at `path` is left as it was."""
    with staged_output(path) as temporary:
        produce(temporary)
        commit_files({Path(path): temporary}, lambda: None)


PREVIOUS_SUFFIX = ".previous"
"""`.<name>.previous`: an earlier file set aside while a commit places its replacement."""


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """A temporary path with `path`'s name, in a hidden staging folder beside it (same file
    system, so placing it is a rename); the staging folder is removed after the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield staging / path.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit_files(moves: dict[Path, Path], record: Callable[[], None]) -> None:
    """Place each staged file (value) at its final path (key), then call `record` (which writes
    the manifest): all of it or none of it.

    Earlier files are set aside as `.<name>.previous` until `record` returns; if anything fails
    (a full disk while the manifest is written), the new files are removed and the earlier ones
    put back, so the folder holds exactly what its manifest says. A run killed in between leaves
    the `.previous` files for `recover_interrupted` to put back."""
    set_aside: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for final, staged in moves.items():
            if final.exists() or final.is_symlink():
                previous = final.with_name(f".{final.name}{PREVIOUS_SUFFIX}")
                remove_path(previous)
                os.replace(final, previous)
                set_aside[final] = previous
            os.replace(staged, final)
            placed.append(final)
        record()
    except BaseException:
        for final in placed:
            remove_path(final)
        for final, previous in set_aside.items():
            os.replace(previous, final)
        raise
    for previous in set_aside.values():
        remove_path(previous)


def recover_interrupted(folder: Path, recorded: dict[str, str], keep: tuple[str, ...]) -> list[str]:
    """After a killed run: put back each `.<name>.previous` whose content is what the manifest
    records for `<name>` (`recorded`: name -> sha256), then remove every other hidden entry
    (staging folders, temporaries) except `keep`. Call it while holding the folder's lock.
    Returns what it did, one line each."""
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or name in keep:
            continue
        original = name[1 : -len(PREVIOUS_SUFFIX)] if name.endswith(PREVIOUS_SUFFIX) else None
        if original and recorded.get(original) == sha256_file(entry):
            remove_path(folder / original)
            os.replace(entry, folder / original)
            done.append(f"put back {original} (an interrupted run had replaced it before recording it)")
            continue
        remove_path(entry)
        done.append(f"removed {name} (left by an interrupted run)")
    return done
