"""Where a measured result came from: the machine, the time and the command that made it, stored
in every result file so a published figure can be traced and reproduced."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path


def describe_machine() -> str:
    """OS, CPU model and core count: the runtimes' CPU kernels differ by instruction set."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {model}, {os.cpu_count()} cores"


def command_line() -> str:
    """This process's command as a user retypes it (`python3 -m <module> <arguments>`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = ["python3", "-m", spec.name.removesuffix(".__main__")]
    else:
        program = ["python3", sys.argv[0]]
    return shlex.join([*program, *sys.argv[1:]])


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    machine: str = field(default_factory=describe_machine)
    created: str = field(default_factory=now)
    command: str = field(default_factory=command_line)
