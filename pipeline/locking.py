"""One writer per output folder: the OS's advisory lock on `<folder>/.lock`.

A convert run holds it exclusively for the whole run; validate, selftest and compat hold it
shared while they read. A second writer, or a reader while a writer works (or a writer while
readers work), stops at once with one line naming the holder, so two runs never mix their files.
The lock is the kernel's (`flock`): it goes with the process, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import PipelineError

LOCK_NAME = ".lock"


def _holder(handle) -> str:
    """Who holds the lock: a writer's description (it writes one), else the readers."""
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        return handle.read().strip() or "another convert run"
    fcntl.flock(handle, fcntl.LOCK_UN)
    return "a validate, selftest or compat run reading it"


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool, purpose: str) -> Iterator[None]:
    """Hold `folder`'s lock (exclusive to write, shared to read) for the block.

    A folder that cannot be written and holds no lock file is read without one: no writer can
    work in it either."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        handle = path.open("a+")
    except OSError as error:
        if exclusive or error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield  # a folder no one can write: no writer can work in it either
        return
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"{folder} is in use by {_holder(handle)}; wait for it to finish, or use another --out"
            ) from None
        if exclusive:
            handle.seek(0)
            handle.truncate()
            command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]
            started = datetime.now(UTC).isoformat(timespec="seconds")
            handle.write(f"{purpose} (pid {os.getpid()}, started {started}: {command})\n")
            handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


@contextlib.contextmanager
def reading(folders: list[Path], purpose: str) -> Iterator[None]:
    """Shared locks on every folder for the block (validate, selftest, compat)."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(folder_lock(folder, exclusive=False, purpose=purpose))
        yield
