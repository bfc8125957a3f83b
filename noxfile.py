"""Sessions: distill, convert_coreml, convert_coreai, convert_executorch, convert_executorch_coreml,
convert_tflite, validate, selftest, compat, benchmark, segment_everything, tryout, tests, lint (docs/usage.md).

Environments are reused and dependencies are installed only when pyproject.toml changes, so a
second run of any session starts in seconds instead of reinstalling torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
PYTHON = "3.11"


def install_project(session: nox.Session, extras: str) -> None:
    """`pip install -e .[extras]` once per pyproject.toml version; later runs skip pip entirely."""
    stamp = Path(session.virtualenv.location) / ".installed-stamp"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        session.log("dependencies unchanged since the last run: skipping install")
        return
    session.install("--upgrade", "pip")
    session.install("-e", f".[{extras}]")
    stamp.write_text(wanted)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (unit tests plus end-to-end tests on the full MobileSAM architecture), in
    two pytest-xdist workers; tests sharing a conversion share a worker (tests/conftest.py).
    `-- -n 0` runs it in one process."""
    install_project(session, "test")
    session.run("pytest", "-n", "2", "--dist", "loadgroup", *session.posargs)


@nox.session(python=PYTHON)
def distill(session: nox.Session) -> None:
    """Decoupled distillation: teacher cache -> TinyViT student -> <out>/mobile_sam.pt + report.

    Without --teacher-checkpoint it runs the smoke config (distillation/configs/smoke.toml): a
    seeded random ViT-B teacher at 256 px on the sample photos in pipeline/sample_photos, and says so. Options
    after `--`: --config FILE, --teacher-checkpoint PATH, --teacher-type, --images DIR, --out DIR,
    --epochs, --batch-size, --accumulation, --checkpoint-every, --max-images, --image-size, --shard-size,
    --loader-workers. The cache alone: `python -m distillation cache|verify ...`. Several processes:
    `torchrun --nproc_per_node N -m distillation run ...` in the session's environment.
    """
    install_project(session, "distill")
    arguments = list(session.posargs)
    if "--config" not in arguments and "--teacher-checkpoint" not in arguments:
        arguments = ["--config", "distillation/configs/smoke.toml", *arguments]
    session.run("python", "-m", "distillation", "run", *arguments)


@nox.session(python=PYTHON)
def convert_coreml(session: nox.Session) -> None:
    """Encoder and prompt decoder to `.mlpackage` (fp16, fp32, int8; palettize6, w8a8 on request), plus a manifest.

    Each package is checked right after conversion in the Core ML runtime on macOS, or in the
    MIL emulator elsewhere. Options after `--`: --config FILE, --checkpoint PATH, --out DIR,
    --num-points N, --precisions fp16 fp32 w8a8, --weights-seed S, --images DIR [--annotations FILE],
    --target-option coreml.KEY=VALUE with KEY one of minimum_deployment_target (iOS16/iOS17/iOS18),
    encoder_input (tensor/image), compute_units, fp32_point_encoding (true/false).
    """
    install_project(session, "coreml")
    session.run("python", "-m", "mobile_targets", "coreml", *session.posargs)


@nox.session(python=PYTHON)
def convert_coreai(session: nox.Session) -> None:
    """Encoder and prompt decoder to `.aimodel` (Core AI, iOS 27+ / macOS 27+), fp32 and fp16, plus a
    manifest; each file checked right after conversion in Apple's Core AI runtime (its Linux
    build: fp16 is emulated there, minutes a call). Options after `--`: as convert_executorch.
    """
    install_project(session, "coreai")
    session.run("python", "-m", "mobile_targets", "coreai", *session.posargs)


@nox.session(python=PYTHON)
def convert_executorch(session: nox.Session) -> None:
    """Encoder and prompt decoder to `.pte` (XNNPACK), fp32 and int8, plus a manifest.

    Options after `--`: --config FILE, --checkpoint PATH, --out DIR, --num-points N,
    --precisions fp32 int8, --weights-seed S, --images DIR [--annotations FILE].
    """
    install_project(session, "executorch")
    session.run("python", "-m", "mobile_targets", "executorch", *session.posargs)


@nox.session(python=PYTHON)
def convert_executorch_coreml(session: nox.Session) -> None:
    """Encoder and prompt decoder to `.pte` lowered whole to ExecuTorch's Core ML delegate (the
    way ExecuTorch apps reach the Neural Engine), fp32 and fp16, plus a manifest.

    Off Apple platforms each file is checked by running its Core ML payload in the MIL emulator.
    Options after `--`: as convert_executorch.
    """
    install_project(session, "executorch")
    session.run("python", "-m", "mobile_targets", "executorch_coreml", *session.posargs)


@nox.session(python=PYTHON)
def convert_tflite(session: nox.Session) -> None:
    """Encoder and prompt decoder to `.tflite` (litert-torch), fp32, fp16 and int8 (full-integer w8a8
    on request), plus a manifest.

    Options after `--`: as convert_executorch, plus --target-option tflite.integer_io=true (the w8a8
    encoder with int8 inputs and outputs).
    """
    install_project(session, "tflite")
    session.run("python", "-m", "mobile_targets", "tflite", *session.posargs)


@nox.session(python=PYTHON)
def validate(session: nox.Session) -> None:
    """Every artifact under --out in its runtime, against PyTorch on real photos -> report.json.

    Options after `--`: --out DIR, --config FILE, --checkpoint PATH, --images DIR [--annotations FILE]
    (default: the held-out sample photos), --max-images K, --threads T, --prompt-seed S, --skip-baselines.
    """
    install_project(session, "validate")
    session.run("python", "-m", "validation", *session.posargs)


@nox.session(python=PYTHON)
def selftest(session: nox.Session) -> None:
    """Every file's self-test vectors (<stem>.selftest.npz) through the file in its desktop runtime.

    Options after `--`: --out DIR (default artifacts), --threads T. Exits 1 when any case misses.
    """
    install_project(session, "validate")
    session.run("python", "-m", "validation.selftest", *session.posargs)


@nox.session(python=PYTHON)
def compat(session: nox.Session) -> None:
    """Every file under --out in a matrix of runtime builds (today's and older TFLite/LiteRT,
    TensorFlow's interpreter, ExecuTorch), each in its own environment built on first use under
    ~/.cache/mobilesam-mobile/compat-envs (never this session's), plus each Core ML package's
    declared minimum OS. Writes DIR/compat.json and compat.md (validate adds them to its report)
    and each manifest record's `details.runtimes`; exits 1 if any file runs and answers wrong.

    Options after `--`: --out DIR (default artifacts), --runtimes NAME ..., --no-manifest-update.
    """
    install_project(session, "validate")
    session.run("python", "-m", "validation.compat", *session.posargs)


@nox.session(python=PYTHON)
def benchmark(session: nox.Session) -> None:
    """Latency (1 and 2 threads), memory and size of every file under --out, in ratios to PyTorch
    eager, ONNX Runtime and the compute floor; decoder latency against N; per-op profiles of the
    ExecuTorch and TFLite encoders.

    Options after `--`: --out DIR (default artifacts), --threads 1 2, --runs R, --warmup W,
    --points 3 5 16 (decoders converted at each N under DIR/benchmark_points; none to skip),
    --sweep-precisions fp32 int8. Writes DIR/benchmark.json, benchmark.md and benchmark.png.
    """
    install_project(session, "validate")
    session.run("python", "-m", "validation.benchmark", *session.posargs)


@nox.session(python=PYTHON)
def results(session: nox.Session) -> None:
    """docs/results.md from the result files under the given folders:
    `nox -s results -- --from artifacts [more folders] [--page docs/results.md]`."""
    install_project(session, "validate")
    session.run("python", "-m", "validation.results", *session.posargs)


@nox.session(python=PYTHON)
def segment_everything(session: nox.Session) -> None:
    """Segment everything in one photo with a target's encoder and batched decoder files.

    Options after `--`: --out CONVERT_OUT --target T [--precision P] --image PHOTO --result DIR
    [--checkpoint W] [--points-per-side K] [--pred-iou-thresh X] [--stability-score-thresh Y]
    [--box-nms-thresh Z] [--compare-pytorch]. Writes DIR/masks.json, DIR/overlay.png, DIR/summary.json.
    """
    install_project(session, "validate")
    session.run("python", "-m", "validation.segment_everything", *session.posargs)


@nox.session(python=PYTHON)
def tryout(session: nox.Session) -> None:
    """A local page (127.0.0.1 only) to click on photos and compare each file's mask with PyTorch's.

    Options after `--`: --out CONVERT_OUT (default artifacts), --port P (default 7860), --checkpoint W,
    --threads T. Ctrl-C stops it.
    """
    install_project(session, "tryout")
    session.run("python", "-m", "validation.tryout", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    install_project(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
