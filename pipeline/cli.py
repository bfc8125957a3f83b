"""Entry-point glue: logging set-up and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1, or one line saying what it got."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # coremltools logs every graph pass and removed op at INFO (thousands of lines per model)
    logging.getLogger("coremltools").setLevel(logging.WARNING)


EXPECTED_BY_ERRNO = {
    errno.ENOSPC: "free space on its file system",
    errno.EDQUOT: "free space within the user's quota",
    errno.ENOTDIR: "a folder, not a file",
    errno.EISDIR: "a file, not a folder",
    errno.EEXIST: "a folder, not a file",
    errno.EACCES: "a path this user may write",
    errno.EPERM: "a path this user may write",
    errno.EROFS: "a writable file system",
    errno.ENOENT: "an existing path",
}
"""What a stage needed of a path, by the error the file system gave."""


def describe_os_error(error: OSError) -> str:
    """A file-system error as one line: the path, what went wrong, what was expected."""
    path = error.filename if error.filename is not None else "a path"
    reason = error.strerror or type(error).__name__
    expected = EXPECTED_BY_ERRNO.get(error.errno or 0)
    return f"{path}: {reason}" + (f" (expected {expected})" if expected else "")


def run_main(main: Callable[[], int | None]) -> None:
    """Run a stage; a PipelineError or a file-system error (disk full, not a folder, no
    permission) becomes `error: <one line>` and exit status 2."""
    try:
        status = main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


def exit_status(failures: list[str]) -> int:
    """One `FAILED: <line>` on stderr per failure; status 1 when there is any (2 stays bad input)."""
    for line in failures:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0
