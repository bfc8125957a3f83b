"""Entry-point glue: logging set-up and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
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


def run_main(main: Callable[[], int | None]) -> None:
    """Run a stage; a PipelineError becomes `error: <one line>` and exit status 2."""
    try:
        status = main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)


def exit_status(failures: list[str]) -> int:
    """One `FAILED: <line>` on stderr per failure; status 1 when there is any (2 stays bad input)."""
    for line in failures:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0
