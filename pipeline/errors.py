"""One exception type whose message is a single line a user can act on."""

from __future__ import annotations


class PipelineError(Exception):
    """A user-facing failure: bad input, a bad file, an unsupported request.

    The message says what was wrong and what was expected, on one line. The CLI prints it
    without a traceback and exits non-zero.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class CheckpointError(PipelineError):
    """A checkpoint that is missing, unreadable, unsafe, or for another architecture."""


class PromptError(PipelineError):
    """Prompts that do not fit the export contract (too many, out of frame, unknown label)."""


class ConfigError(PipelineError):
    """A run configuration that cannot be used."""


class ArtifactError(PipelineError):
    """A converted file that is missing, truncated or not what its manifest says."""


def one_line(error: BaseException) -> str:
    """Any exception as one line: our own messages as they are, others with their type and the
    first line of their text (converters and runtimes raise long multi-line messages)."""
    if isinstance(error, PipelineError):
        return str(error)
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
