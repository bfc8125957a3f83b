"""Faults lose nothing: one writer per folder, a full disk, bad output paths, vectors that travel
with their file, a killed run. Each test asserts the folder's state afterwards, not only the exit
status. Stages run through their real entry points; the disk is a real small tmpfs where this
machine lets the test mount one (root), else the write fails by injection."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mobile_targets import load_artifact_runner
from pipeline.errors import ArtifactError, PipelineError
from pipeline.files import commit_files, recover_interrupted, sha256_file
from pipeline.locking import LOCK_NAME, folder_lock
from pipeline.manifest import Manifest, read_manifest, travelling_files, verify_artifact, verify_travelling_files

REPO = Path(__file__).resolve().parents[1]


def stage(*argv: object, timeout: float = 900) -> subprocess.CompletedProcess:
    """A stage's command line in its own process (`python -m ...`), from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a user sees: exactly one `error:` line on stderr and no traceback."""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return line


def assert_consistent(folder: Path) -> Manifest:
    """The folder holds exactly what its manifest lists (and what travels with it), its lock, and
    nothing hidden or undescribed."""
    manifest_path = folder / "manifest.json"
    manifest = read_manifest(manifest_path)
    listed = {"manifest.json", LOCK_NAME, "superseded"}
    for record in manifest.artifacts:
        verify_artifact(manifest_path, record)
        verify_travelling_files(manifest_path, record)
        listed |= {record.file, *travelling_files(record)}
    assert sorted(p.name for p in folder.iterdir() if p.name not in listed) == []
    return manifest


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[bool]:
    """A tmpfs of `size` mounted at `folder` (True), or nothing mounted where this machine does not
    allow it (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_commit_places_everything_or_nothing(tmp_path):
    """A file and its vectors replace the earlier ones together with the manifest; when the manifest
    cannot be written the earlier ones come back."""
    finals = {tmp_path / "model.tflite": b"old model", tmp_path / "model.selftest.npz": b"old vectors"}
    for path, content in finals.items():
        path.write_bytes(content)

    def staged() -> dict[Path, Path]:
        moves = {}
        for path in finals:
            moves[path] = tmp_path / f".{path.name}.staged"
            moves[path].write_bytes(b"new " + path.name.encode())
        return moves

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "manifest.json"))

    with pytest.raises(OSError, match="No space left"):
        commit_files(staged(), disk_full)
    assert {p: p.read_bytes() for p in finals} == finals
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.selftest.npz", "model.tflite"]
    recorded = []
    commit_files(staged(), lambda: recorded.append(True))
    assert recorded and all(p.read_bytes() == b"new " + p.name.encode() for p in finals)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.selftest.npz", "model.tflite"]


def test_recovery_puts_back_what_the_manifest_records_and_removes_leftovers(tmp_path):
    """After a kill -9 between placing a file and recording it: the earlier file (the one the
    manifest records) is put back; staging folders and temporaries are removed."""
    (tmp_path / "model.tflite").write_bytes(b"new, never recorded")
    (tmp_path / ".model.tflite.previous").write_bytes(b"recorded")
    (tmp_path / ".other.tflite.previous").write_bytes(b"not what the manifest says")
    (tmp_path / ".model.tflite.abc123").mkdir()
    (tmp_path / ".model.tflite.abc123" / "model.tflite").write_bytes(b"x" * 1000)
    (tmp_path / ".manifest.json.xyz").write_bytes(b"{")
    (tmp_path / LOCK_NAME).write_text("")
    recorded = {"model.tflite": sha256_file(tmp_path / ".model.tflite.previous"), "other.tflite": "0" * 64}
    done = recover_interrupted(tmp_path, recorded, keep=(LOCK_NAME,))
    assert (tmp_path / "model.tflite").read_bytes() == b"recorded"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "model.tflite"]
    assert [line.split(" (")[0] for line in done] == [
        "removed .manifest.json.xyz",
        "removed .model.tflite.abc123",
        "put back model.tflite",
        "removed .other.tflite.previous",
    ]


def _empty_manifest_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    Manifest(
        target="tflite",
        weights={"model_type": "vit_t", "seed": 0},
        config={"num_points": 5},
        tool_versions={},
        artifacts=(),
    ).write(folder)


def test_one_writer_per_folder(tmp_path):
    """While a convert writes a folder, a second convert and a selftest stop with one line naming
    it; while readers hold it, a convert stops naming them; readers share it."""
    folder = tmp_path / "tflite"
    _empty_manifest_folder(folder)
    before = (folder / "manifest.json").read_bytes()
    with folder_lock(folder, exclusive=True, purpose="a convert run (tflite)"):
        done = stage("mobile_targets", "tflite", "--precisions", "fp32", "--out", tmp_path, timeout=300)
        assert done.returncode == 2
        line = error_line(done)
        assert f"{folder} is in use by a convert run (tflite) (pid {os.getpid()}" in line and "another --out" in line
        done = stage("validation.selftest", "--out", tmp_path, timeout=300)
        assert done.returncode == 2 and "is in use by a convert run (tflite)" in error_line(done)
    with folder_lock(folder, exclusive=False, purpose="a validate run"), folder_lock(folder, False, "a selftest run"):
        done = stage("mobile_targets", "tflite", "--precisions", "fp32", "--out", tmp_path, timeout=300)
        assert done.returncode == 2
        assert "is in use by a validate, selftest or compat run reading it" in error_line(done)
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "manifest.json"]


@pytest.mark.slow
def test_full_disk_keeps_the_folder_consistent(tmp_path, monkeypatch):
    """A 27 MB disk: the fp32 encoder (23 MB) stages but its vectors do not fit, then the decoder
    does not fit either. Each file is one FAILED line, the manifest lists the failures and
    nothing else, and no temporary is left; exit 2 with one line."""
    out = tmp_path / "small"
    with small_disk(out, "27m") as mounted:
        if not mounted:  # no tmpfs here: the vectors' write fails as a full disk's would
            pytest.skip("cannot mount a tmpfs on this machine (the injected variant runs in-process below)")
        done = stage("mobile_targets", "tflite", "--precisions", "fp32", "--batch-prompts", "0", "--out", out)
        assert done.returncode == 2
        assert error_line(done).startswith("error: 2 conversion(s) failed")
        failed = [line for line in done.stderr.splitlines() if line.startswith("FAILED tflite")]
        assert len(failed) == 2 and all("No space left on device" in line for line in failed)
        manifest = assert_consistent(out / "tflite")
        assert manifest.artifacts == () and len(manifest.failures) == 2


@pytest.mark.slow
def test_manifest_that_cannot_be_written_puts_the_earlier_files_back(tflite_converted, tmp_path, monkeypatch):
    """Disk full while the manifest is written: the new fp32 files and their vectors are taken
    back, the earlier ones (same weights) are where they were and still listed, and the manifest
    names the two failed conversions."""
    from mobile_targets.convert import convert_target
    from pipeline.config import RunConfig

    out = tmp_path / "out"
    shutil.copytree(Path(tflite_converted).parent, out / "tflite")
    folder = out / "tflite"
    before = {p.name: sha256_file(p) for p in folder.iterdir()}
    earlier = read_manifest(folder / "manifest.json")
    real_write = Manifest.write

    def write(manifest: Manifest, target: Path) -> Path:
        if any(r.sha256 != e.sha256 for r in manifest.artifacts for e in earlier.artifacts if e.file == r.file):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(target) / "manifest.json"))
        return real_write(manifest, target)

    monkeypatch.setattr(Manifest, "write", write)
    config = RunConfig(checkpoint=Path(earlier.weights.checkpoint), precisions=("fp32",), out_dir=out, batch_prompts=0)
    # the weights are the same, so the conversion is bit-identical: make it differ
    monkeypatch.setattr("mobile_targets.tflite.converter.short_tensor_names", lambda data: data)
    with pytest.raises(ArtifactError, match=r"2 conversion\(s\) failed: image_encoder fp32: .*No space left on device"):
        convert_target("tflite", config)
    after = {p.name: sha256_file(p) for p in folder.iterdir() if p.name not in (LOCK_NAME, "manifest.json")}
    assert after == {name: digest for name, digest in before.items() if name not in (LOCK_NAME, "manifest.json")}
    manifest = assert_consistent(folder)
    assert manifest.artifacts == earlier.artifacts  # the earlier files, still listed
    assert [(f.part, f.precision) for f in manifest.failures] == [("image_encoder", "fp32"), ("prompt_decoder", "fp32")]


def test_damaged_vectors_are_caught_by_validate_and_selftest(tflite_converted, tmp_path):
    """4 KB of random bytes in place of a vectors file: validate's loader and selftest refuse the
    file with one line saying the vectors are not the ones converted with it."""
    from validation.selftest import selftest_folder

    out = tmp_path / "out"
    shutil.copytree(Path(tflite_converted).parent, out / "tflite")
    damaged = out / "tflite" / "image_encoder_fp16.selftest.npz"
    damaged.write_bytes(np.random.default_rng(1).bytes(4096))
    manifest_path = out / "tflite" / "manifest.json"
    manifest = read_manifest(manifest_path)
    (record,) = [r for r in manifest.artifacts if r.file == "image_encoder_fp16.tflite"]
    with pytest.raises(ArtifactError, match=r"image_encoder_fp16\.selftest\.npz is not the file converted with"):
        load_artifact_runner(manifest_path, manifest, record, threads=1)
    outcomes = {o.artifact: o for o in selftest_folder(out, threads=1) if "image_encoder" in o.artifact}
    bad = outcomes["tflite image_encoder fp16"]
    assert not bad.passed and "is not the file converted with image_encoder_fp16.tflite" in bad.detail
    assert outcomes["tflite image_encoder fp32"].passed


OUT_FLAGS = {
    "mobile_targets": ("mobile_targets", "tflite", "--precisions", "fp32", "--out"),
    "validation": ("validation", "--skip-baselines", "--out"),
    "validation.selftest": ("validation.selftest", "--out"),
    "validation.compat": ("validation.compat", "--out"),
    "validation.benchmark": ("validation.benchmark", "--out"),
    "distillation": ("distillation", "run", "--config", "distillation/configs/smoke.toml", "--out"),
}


@pytest.mark.parametrize("command", sorted(OUT_FLAGS))
def test_an_out_that_is_a_file_is_one_line(command, tmp_path):
    """`--out` naming a regular file: one line naming it, exit 2, the file untouched."""
    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    done = stage(*OUT_FLAGS[command], regular, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(regular) in error_line(done)
    assert regular.read_text() == "mine"


def test_segment_everything_result_that_is_a_file_is_one_line(tflite_converted, tmp_path):
    regular = tmp_path / "result.txt"
    regular.write_text("mine")
    photo = next((REPO / "pipeline" / "sample_photos" / "validation" / "images").iterdir())
    out = Path(tflite_converted).parent.parent
    done = stage(
        "validation.segment_everything", "--out", out, "--target", "tflite", "--image", photo, "--result", regular
    )
    assert done.returncode == 2 and str(regular) in error_line(done) and regular.read_text() == "mine"


@pytest.mark.slow
def test_read_only_out_is_one_line_and_keeps_the_earlier_files(tflite_converted, tmp_path):
    """A folder the user cannot write (a read-only mount: root ignores file modes), holding an
    earlier conversion: one line, exit 2, the earlier files as they were."""
    out = tmp_path / "ro"
    with small_disk(out, "200m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only file system on this machine")
        shutil.copytree(Path(tflite_converted).parent, out / "tflite")
        before = {p.name: sha256_file(p) for p in (out / "tflite").iterdir()}
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
        done = stage("mobile_targets", "tflite", "--precisions", "fp32", "--batch-prompts", "0", "--out", out)
        assert done.returncode == 2
        line = error_line(done)
        assert "Read-only file system (expected a writable file system)" in line and str(out / "tflite") in line
        assert {p.name: sha256_file(p) for p in (out / "tflite").iterdir()} == before


@pytest.mark.slow
def test_superseding_moves_vectors_and_a_killed_run_leaves_nothing_behind(tflite_converted, tmp_path):
    """Other weights into a folder: the earlier files move to superseded/ with their vectors (the
    superseded manifest still verifies). A run killed (-9) while staging its first file leaves a
    consistent folder; the next run removes its leftovers."""
    out = tmp_path / "out"
    shutil.copytree(Path(tflite_converted).parent, out / "tflite")
    folder = out / "tflite"
    command = [sys.executable, "-m", "mobile_targets", "tflite", "--precisions", "fp32", "--batch-prompts", "0"]
    command += ["--weights-seed", "7", "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not any(p.name.startswith(".image_encoder_fp32.tflite.") for p in folder.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before staging a file"
            time.sleep(0.2)
        time.sleep(2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    (superseded,) = (folder / "superseded").iterdir()
    old = read_manifest(superseded / "manifest.json")
    for record in old.artifacts:  # every earlier file moved with its vectors
        verify_artifact(superseded / "manifest.json", record)
        verify_travelling_files(superseded / "manifest.json", record)
    assert read_manifest(folder / "manifest.json").artifacts == ()  # never a folder without a manifest
    assert any(p.name.startswith(".") and p.name != LOCK_NAME for p in folder.iterdir())  # the kill's leftovers
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "left by an interrupted run" in done.stderr
    manifest = assert_consistent(folder)
    assert {r.file for r in manifest.artifacts} == {"image_encoder_fp32.tflite", "prompt_decoder_fp32.tflite"}
    assert json.loads((folder / "manifest.json").read_text())["weights"]["seed"] == 7


def test_lock_refuses_a_second_writer_in_process(tmp_path):
    with (
        folder_lock(tmp_path, exclusive=True, purpose="a convert run (coreml)"),
        pytest.raises(PipelineError, match=r"is in use by a convert run \(coreml\)"),
        folder_lock(tmp_path, exclusive=True, purpose="another"),
    ):
        pass
    with folder_lock(tmp_path, exclusive=True, purpose="free again"):
        pass


@pytest.mark.slow
def test_readers_need_no_lock_on_a_read_only_folder(tmp_path):
    """validate, selftest and compat read a folder on a read-only mount (its lock file cannot be
    opened for writing there, and no writer can work in it either); a writer is refused."""
    folder = tmp_path / "ro"
    with small_disk(folder, "1m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only file system on this machine")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with folder_lock(folder, exclusive=False, purpose="a validate run"):
            pass
        with pytest.raises(OSError, match="Read-only file system"), folder_lock(folder, True, "a convert run"):
            pass
