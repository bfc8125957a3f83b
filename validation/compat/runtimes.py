"""The runtime builds the compatibility matrix runs files in, each in a virtual environment of its
own (never the project's), built once and reused.

Apps pin their runtime: an Android app a TFLite / LiteRT release (or Google Play services' one),
an iOS or Android app the ExecuTorch release it links. The matrix covers today's build and older
ones an app may still ship, so a file is known to pass, to be refused, or (the case that must
never reach an app) to run and answer wrong in each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FAMILIES = ("tflite", "executorch")
"""Runtimes by the file format they load: `.tflite` and `.pte`."""
TARGET_FAMILIES = {"tflite": "tflite", "executorch": "executorch"}
"""Target -> the runtime family that runs its files (the Core ML targets are checked statically,
`coreml_check`; ExecuTorch's Core ML delegate needs Apple's runtime)."""


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime build: what to pip-install into its own environment and how the worker loads it."""

    name: str
    """Short, stable and unique: a matrix column and the environment's folder name."""
    family: str
    requirements: tuple[str, ...]
    loader: str
    """The worker's loader (`worker.LOADERS`): which Python API of the runtime opens a file."""
    note: str = ""
    npm: tuple[str, ...] = ()
    """npm packages installed into the environment's `web/` folder (a browser runtime: the worker
    drives it through Node and headless Chromium)."""

    @property
    def label(self) -> str:
        return f"{self.name}" + (f" ({self.note})" if self.note else "")


LITERTJS_VERSION = "2.5.3"

CATALOG: tuple[RuntimeSpec, ...] = (
    RuntimeSpec(
        "ai-edge-litert-2.3", "tflite", ("ai-edge-litert>=2.3,<2.4",), "ai_edge_litert", "today's, the project's"
    ),
    RuntimeSpec("ai-edge-litert-2.0.3", "tflite", ("ai-edge-litert==2.0.3",), "ai_edge_litert", "oldest 2.x"),
    RuntimeSpec("ai-edge-litert-1.0.1", "tflite", ("ai-edge-litert==1.0.1", "numpy<2"), "ai_edge_litert", "oldest 1.x"),
    RuntimeSpec(
        "tflite-runtime-2.14.0",
        "tflite",
        ("tflite-runtime==2.14.0", "numpy<2"),
        "tflite_runtime",
        "the last tflite-runtime; TFLite 2.14, as org.tensorflow:tensorflow-lite:2.14.0",
    ),
    RuntimeSpec(
        "tensorflow-cpu-2.16.2", "tflite", ("tensorflow-cpu==2.16.2", "numpy<2"), "tensorflow", "tf.lite.Interpreter"
    ),
    RuntimeSpec("tensorflow-cpu-2.21.0", "tflite", ("tensorflow-cpu==2.21.0",), "tensorflow", "tf.lite.Interpreter"),
    RuntimeSpec(
        "litertjs-2.5.3-webgpu",
        "tflite",
        ("numpy",),
        "litertjs_webgpu",
        "LiteRT.js on WebGPU in headless Chromium (SwiftShader adapter): a web app's GPU path",
        npm=(f"@litertjs/core@{LITERTJS_VERSION}", "puppeteer-core@25.19.0"),
    ),
    RuntimeSpec(
        "executorch-1.5.1",
        "executorch",
        ("executorch==1.5.1", "torch==2.13.0"),
        "executorch",
        "today's, the project's",
    ),
    RuntimeSpec("executorch-1.4.1", "executorch", ("executorch==1.4.1", "torch==2.13.0"), "executorch"),
    RuntimeSpec(
        "executorch-1.3.1", "executorch", ("executorch==1.3.1", "torch==2.12.*", "torchao==0.17.*"), "executorch"
    ),
    RuntimeSpec(
        "executorch-1.0.1",
        "executorch",
        ("executorch==1.0.1", "torch==2.9.*", "torchao==0.14.0"),
        "executorch",
        "the first 1.x",
    ),
)
"""Every runtime the matrix knows; the default matrix runs them all (`DEFAULT_RUNTIMES`)."""

DEFAULT_RUNTIMES = tuple(spec.name for spec in CATALOG)
"""Each pulls its own torch build (an ExecuTorch release's pybindings link the torch it was built
with): the older ExecuTorch environments take a few GB each, once."""
QUICK_RUNTIMES = ("ai-edge-litert-2.3", "tflite-runtime-2.14.0")
"""Small environments (a few MB each): what the test suite builds."""


def runtime_spec(name: str) -> RuntimeSpec:
    for spec in CATALOG:
        if spec.name == name:
            return spec
    names = ", ".join(spec.name for spec in CATALOG)
    raise PipelineError(f"unknown runtime {name!r}; expected some of {names}")


def environments_root() -> Path:
    """Where the runtime environments live: $MOBILESAM_COMPAT_ENVS, else the user's cache folder,
    so a fresh clone (or CI's) reuses the ones an earlier run built on the same machine."""
    explicit = os.environ.get("MOBILESAM_COMPAT_ENVS")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mobilesam-mobile" / "compat-envs"


def _stamp(spec: RuntimeSpec) -> str:
    return hashlib.sha256("\n".join((sys.version, *spec.requirements, *spec.npm)).encode()).hexdigest()


def environment_python(spec: RuntimeSpec, root: Path | None = None) -> Path:
    """The Python of `spec`'s environment, built (venv + pip install) when missing or stale.

    One line on failure: the requirement and pip's last line."""
    folder = (root or environments_root()) / spec.name
    python = folder / "bin" / "python"
    stamp_file = folder / ".installed-stamp"
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp(spec):
        return python
    log.info("building the %s environment in %s (once; later runs reuse it)", spec.name, folder)
    if folder.exists():
        shutil.rmtree(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PipelineError(f"cannot create the runtime environments folder {folder.parent}: {error}") from None
    steps = [
        [sys.executable, "-m", "venv", str(folder)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *spec.requirements],
        [str(python), "-c", f"import {IMPORT_CHECKS[spec.loader]}"],
    ]
    if spec.npm:
        npm = shutil.which("npm")
        if npm is None:
            raise PipelineError(
                f"cannot build the {spec.name} environment: npm not found (Debian: apt-get install npm)"
            )
        steps.append([npm, "install", "--prefix", str(folder / "web"), "--no-audit", "--no-fund", *spec.npm])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit {done.returncode}"
            wanted = " ".join((*spec.requirements, *spec.npm))
            raise PipelineError(f"cannot build the {spec.name} environment ({wanted}): {last}")
    stamp_file.write_text(_stamp(spec))
    return python


def installed_version(python: Path, package: str) -> str:
    """The version pip (or npm, for an `@scope/name` package) installed into an environment
    (`1.0.1`), for the report."""
    if package.startswith("@"):
        manifest = python.parent.parent / "web" / "node_modules" / package / "package.json"
        try:
            return str(json.loads(manifest.read_text())["version"])
        except (OSError, ValueError, KeyError):
            return "unknown"
    done = subprocess.run(
        [str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


IMPORT_CHECKS = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
    "executorch": "executorch.runtime",
    "litertjs_webgpu": "numpy",
}
"""Loader -> the module a built environment must import (a broken build fails here, not as a
runtime that refuses every file)."""

PACKAGES = {
    "ai_edge_litert": "ai-edge-litert",
    "tflite_runtime": "tflite-runtime",
    "tensorflow": "tensorflow-cpu",
    "executorch": "executorch",
    "litertjs_webgpu": "@litertjs/core",
}
"""Loader -> the pip package whose installed version the report names."""
