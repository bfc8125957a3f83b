"""The distill stage on small configs: teacher cache (resume, checksums, SA-1B tars), DDP with
2 gloo processes against one process, SIGKILL and resume, and the student checkpoint going
through the convert stage unchanged."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from distillation.config import DistillConfig, load_distill_config
from distillation.data import discover_images
from distillation.models import build_student, load_teacher
from distillation.teacher_cache import (
    INDEX_NAME,
    build_teacher_cache,
    load_teacher_cache,
    photo_shares,
    plan_shards,
    share_of,
    verify_teacher_cache,
)
from distillation.train import STATE_NAME, STUDENT_NAME, learning_rate_factor
from pipeline.errors import ConfigError, PipelineError

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64
DDP_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
"""2 gloo processes vs 1 process: same micro-batches and data order; only the order of float
sums differs (all-reduce vs accumulation), so weights agree to float rounding, not bit for bit."""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, photos) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for image_id in photos.image_ids()[:12]:
        source = photos.image_path(image_id)
        (folder / source.name).symlink_to(source)
    return folder


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, image_folder) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(
        f"""[distill]
teacher_type = "vit_b"
image_size = {IMAGE_SIZE}
images = "{image_folder}"
held_out = 2
epochs = 3
batch_size = 4
learning_rate = 2e-3
warmup_steps = 2
checkpoint_every = 2
shard_size = 2
loader_workers = 0
"""
    )
    return path


def _distill(
    config_file: Path, out: Path, cache: Path, *extra: str, processes: int = 1, wait: bool = True, command="run"
):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    arguments = ["-m", "distillation", command, "--config", str(config_file), "--out", str(out)]
    arguments += ["--cache-dir", str(cache), *(["--no-eval"] if command == "run" else []), *extra]
    if processes > 1:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}"]
        command = [sys.executable, *launcher, *arguments]
    else:
        command = [sys.executable, *arguments]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / STUDENT_NAME, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, config_file) -> Path:
    """The cache made by one process with one thread (as each torchrun rank has)."""
    cache = tmp_path_factory.mktemp("cache")
    _distill(config_file, tmp_path_factory.mktemp("cache_run"), cache, command="cache")
    return cache


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, config_file, shared_cache) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _distill(config_file, out, shared_cache)
    return out


def test_teacher_cache_resumes_and_checks_checksums(image_folder, tmp_path):
    sources = discover_images(image_folder)[:10]
    teacher, description, _ = load_teacher("vit_b", None, IMAGE_SIZE, seed=0)
    first = build_teacher_cache(teacher.image_encoder, description, sources, tmp_path, IMAGE_SIZE, shard_size=3)
    assert (first.computed, first.reused) == (10, 0)
    embeddings = {key: value.clone() for key, value in load_teacher_cache(tmp_path).items()}
    assert set(embeddings) == {s.key for s in sources}
    assert embeddings[sources[0].key].shape == (256, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [key for shard in index["shards"] for key in shard["keys"]] == [s.key for s in sources]
    assert len(index["shards"]) >= 3
    sizes = [len(shard["keys"]) for shard in index["shards"]]
    assert verify_teacher_cache(tmp_path) == []
    # an interruption lost one shard, and a bit flipped in another: only those are redone
    (tmp_path / index["shards"][-1]["file"]).unlink()
    damaged = tmp_path / index["shards"][0]["file"]
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert verify_teacher_cache(tmp_path) == sorted([index["shards"][0]["file"], index["shards"][-1]["file"]])
    with pytest.raises(PipelineError, match="missing"):
        load_teacher_cache(tmp_path)[sources[-1].key]
    second = build_teacher_cache(teacher.image_encoder, description, sources, tmp_path, IMAGE_SIZE, shard_size=3)
    assert (second.computed, second.reused) == (sizes[0] + sizes[-1], 10 - sizes[0] - sizes[-1])
    again = load_teacher_cache(tmp_path)
    for key, value in embeddings.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)
    third = build_teacher_cache(teacher.image_encoder, description, sources, tmp_path, IMAGE_SIZE, shard_size=3)
    assert (third.computed, third.reused) == (0, 10)


def test_shard_keys_survive_inserting_a_photo(image_folder, tmp_path):
    """Shards are cut by the keys' content: a new photo changes only the shard it falls in (which
    becomes two when the new key is itself a boundary); every other shard is kept."""
    keys = [f"sa_{number:06d}.jpg" for number in range(2000)]
    before = plan_shards(keys, 8)
    after = plan_shards(sorted([*keys, "sa_000500b.jpg"]), 8)
    assert 2000 / 16 < len(before) < 2000 / 4  # about shard_size photos per shard
    assert len(set(before) - set(after)) == 1  # only the shard it fell in is redone (perhaps as two)
    assert sum(map(len, set(after) - set(before))) == len(next(iter(set(before) - set(after)))) + 1
    # on disk: the cache of 8 photos, then a 9th inserted in the middle of the sorted list
    photos = sorted(image_folder.iterdir())
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:8]:
        (folder / photo.name).symlink_to(photo.resolve())
    teacher, description, _ = load_teacher("vit_b", None, IMAGE_SIZE, seed=0)
    cache = tmp_path / "cache"
    first = discover_images(folder)
    build_teacher_cache(teacher.image_encoder, description, first, cache, IMAGE_SIZE, shard_size=2)
    old_plan = set(plan_shards([s.key for s in first], 2))
    # a name sorted among the first 8 that falls inside one of their shards (not a shard of its own)
    name = next(
        name
        for name in (f"{photos[4].stem}_copy{n}.jpg" for n in range(100))
        if len(old_plan - set(plan_shards(sorted([*(s.key for s in first), name]), 2))) == 1
    )
    (folder / name).symlink_to(photos[9].resolve())
    sources = discover_images(folder)
    redone = old_plan - set(plan_shards([s.key for s in sources], 2))
    assert len(redone) == 1
    result = build_teacher_cache(teacher.image_encoder, description, sources, cache, IMAGE_SIZE, shard_size=2)
    assert (result.computed, result.reused) == (len(next(iter(redone))) + 1, 8 - len(next(iter(redone))))


def test_two_ranks_build_the_same_cache_as_one(tmp_path, config_file, shared_cache):
    """torchrun with 2 gloo processes: each embeds its share, rank 0 merges one index; the index
    and every embedding equal the one-process cache (shared_cache), bit for bit."""
    output = _distill(config_file, tmp_path / "out", tmp_path / "cache", processes=2, command="cache")
    assert "by 2 process(es)" in output
    report = json.loads((tmp_path / "out" / "cache_report.json").read_text())
    assert (report["computed"], report["world_size"]) == (12, 2)
    assert (tmp_path / "cache" / INDEX_NAME).read_text() == (shared_cache / INDEX_NAME).read_text()
    two, one = load_teacher_cache(tmp_path / "cache"), load_teacher_cache(shared_cache)
    assert list(two) == list(one)
    for key in one:
        assert torch.equal(two[key], one[key]), key
    assert "every shard matches" in _distill(config_file, tmp_path / "out", tmp_path / "cache", command="verify")


def test_photo_shares_are_even_whatever_the_shard_sizes():
    """Every row of every shard once, in order; ranks within one photo of each other."""
    for sizes, world_size in (([107, 18], 2), ([5, 1, 3, 8, 2, 2, 7], 3), ([1], 2), ([40], 4), ([], 2)):
        shares = photo_shares(sizes, world_size)
        rows = [(p.shard, row) for share in shares for p in share for row in range(p.start, p.stop)]
        assert rows == [(shard, row) for shard, size in enumerate(sizes) for row in range(size)]
        counts = [sum(p.stop - p.start for p in share) for share in shares]
        assert max(counts) - min(counts) <= 1, (sizes, counts)


def test_two_ranks_share_unequal_shards_evenly(tmp_path, config_file, image_folder):
    """36 photos (the 12, under three names each) cut into shards of very unequal sizes: under
    torchrun each of 2 ranks embeds half the photos (a shard split between them is written in
    pieces and joined), and the index and every embedding equal one rank's, bit for bit."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = sorted(image_folder.iterdir())
    for number in range(36):
        (folder / f"photo_{number:03d}.jpg").symlink_to(photos[number % len(photos)].resolve())
    keys = sorted(p.name for p in folder.iterdir())
    shard_size, sizes = next(
        (size, [len(s) for s in plan_shards(keys, size)])
        for size in range(2, 20)
        if len(plan_shards(keys, size)) >= 2
        and max(map(len, plan_shards(keys, size))) >= 4 * min(map(len, plan_shards(keys, size)))
    )
    options = ("--images", str(folder), "--shard-size", str(shard_size))
    _distill(config_file, tmp_path / "one", tmp_path / "cache_one", *options, command="cache")
    output = _distill(config_file, tmp_path / "two", tmp_path / "cache_two", *options, processes=2, command="cache")
    report = json.loads((tmp_path / "two" / "cache_report.json").read_text())
    photos_per_rank = [work["photos"] for work in report["ranks"]]
    assert sorted(photos_per_rank) == [18, 18], (sizes, photos_per_rank)
    assert all(work["busy_seconds"] > 0 for work in report["ranks"])
    assert "rank 1: 18 photos embedded" in output
    assert (tmp_path / "cache_two" / INDEX_NAME).read_text() == (tmp_path / "cache_one" / INDEX_NAME).read_text()
    two, one = load_teacher_cache(tmp_path / "cache_two"), load_teacher_cache(tmp_path / "cache_one")
    for key in one:
        assert torch.equal(two[key], one[key]), key
    assert not list((tmp_path / "cache_two").glob("*.rows*"))  # the pieces were joined and removed
    assert "every shard matches" in _distill(config_file, tmp_path / "two", tmp_path / "cache_two", command="verify")


def test_shares_are_disjoint_and_balanced():
    sizes = [5, 1, 3, 8, 2, 2, 7]
    shares = [share_of(sizes, rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes) // 2


def test_a_killed_cache_job_resumes(tmp_path, config_file, shared_cache):
    """SIGKILL once the first shard's record is written; the rerun embeds only what is missing
    and ends with the uninterrupted cache."""
    cache = tmp_path / "cache"
    process = _distill(config_file, tmp_path / "out", cache, command="cache", wait=False)
    deadline = time.time() + 300
    while not list(cache.glob("shard_*.json")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cache / INDEX_NAME).exists()  # it died before finishing
    _distill(config_file, tmp_path / "out", cache, command="cache")
    report = json.loads((tmp_path / "out" / "cache_report.json").read_text())
    assert report["reused"] >= 1 and report["computed"] + report["reused"] == 12
    assert (cache / INDEX_NAME).read_text() == (shared_cache / INDEX_NAME).read_text()


def test_sa1b_tars_are_read(image_folder, tmp_path):
    """SA-1B's layout: sa_*.tar files holding sa_<id>.jpg and sa_<id>.json."""
    files = sorted(image_folder.iterdir())[:3]
    with tarfile.open(tmp_path / "sa_000000.tar", "w") as archive:
        for number, file in enumerate(files):
            archive.add(file.resolve(), arcname=f"sa_{number}.jpg")
            annotation = tmp_path / f"sa_{number}.json"
            annotation.write_text("{}")
            archive.add(annotation, arcname=annotation.name)
    sources = discover_images(tmp_path)
    assert [s.key for s in sources] == [f"sa_000000.tar/sa_{n}.jpg" for n in range(3)]
    assert sources[1].read_rgb().shape[2] == 3


def test_ddp_two_gloo_processes_train_the_single_process_model(tmp_path, config_file, shared_cache, uninterrupted):
    """2 processes x 1 micro-batch of 2 against the uninterrupted 1 process x 2 micro-batches of 2."""
    single = tmp_path / "single"
    _distill(config_file, single, shared_cache, "--accumulation", "2")
    ddp = tmp_path / "ddp"
    output = _distill(config_file, ddp, shared_cache, processes=2)
    assert "2 process(es)" in output
    single_weights, ddp_weights = _weights(single), _weights(ddp)
    assert single_weights.keys() == ddp_weights.keys()
    changed = 0
    initial = build_student("tiny_vit", IMAGE_SIZE, seed=0).state_dict()
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, **DDP_TOLERANCE, msg=key)
        changed += not torch.equal(value, initial[key])
    assert changed > len(single_weights) // 2  # training moved the weights


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, config_file, shared_cache, uninterrupted):
    out = tmp_path / "killed"
    process = _distill(config_file, out, shared_cache, wait=False)
    deadline = time.time() + 300
    while not (out / STATE_NAME).exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / STUDENT_NAME).exists()  # it really died before finishing
    saved_step = torch.load(out / STATE_NAME, weights_only=True)["step"]
    _distill(config_file, out, shared_cache)
    report = json.loads((out / "distill_report.json").read_text())
    assert report["training"]["resumed_from_step"] == saved_step > 0
    resumed, reference = _weights(out), _weights(uninterrupted)
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_loader_workers_give_the_same_weights(tmp_path, config_file, shared_cache, uninterrupted):
    """Two DataLoader workers decode photos and read embeddings ahead: same batches, same order,
    so the same weights bit for bit as the uninterrupted run without workers."""
    out = tmp_path / "workers"
    _distill(config_file, out, shared_cache, "--loader-workers", "2")
    with_workers, reference = _weights(out), _weights(uninterrupted)
    for key, value in reference.items():
        torch.testing.assert_close(with_workers[key], value, rtol=0, atol=0, msg=key)


def test_student_checkpoint_goes_through_convert(uninterrupted, tmp_path):
    from mobile_targets.convert import convert_target
    from pipeline.checkpoints import load_model
    from pipeline.config import RunConfig
    from pipeline.manifest import read_manifest

    checkpoint = uninterrupted / "mobile_sam.pt"
    sam, source = load_model("vit_t", checkpoint)  # strict, official layout
    student, encoder = _weights(uninterrupted), sam.image_encoder.state_dict()
    assert student.keys() == encoder.keys()
    for key, value in student.items():
        torch.testing.assert_close(encoder[key], value, rtol=0, atol=0, msg=key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry  # upstream MobileSAM (mobilesam-mirror)
    upstream = sam_model_registry["vit_t"]()
    upstream.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
    config = RunConfig(checkpoint=checkpoint, precisions=("fp32",), out_dir=tmp_path, batch_prompts=0)
    manifest = read_manifest(convert_target("tflite", config))  # the quickest target to convert and gate
    assert len(manifest.artifacts) == 2 and manifest.weights.sha256 == source.sha256


def test_config_and_student_choices():
    with pytest.raises(ConfigError, match="real teacher runs at 1024"):
        DistillConfig(teacher_checkpoint=Path("sam_vit_h.pth"), image_size=256)
    with pytest.raises(ConfigError, match="image_size"):
        DistillConfig(image_size=100)
    with pytest.raises(ConfigError, match="teacher_type"):
        load_distill_config(None, teacher_type="vit_x")
    student = build_student("resnet18", IMAGE_SIZE, seed=0)
    assert student(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, 256, 4, 4)
    with pytest.raises(ConfigError, match="timm cannot build"):
        build_student("no_such_backbone_xyz", IMAGE_SIZE, seed=0)


def test_learning_rate_schedule():
    factors = [learning_rate_factor(step, warmup=5, total=50, min_ratio=0.01) for step in range(50)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[-1] == pytest.approx(0.01, abs=2e-3)


def test_resume_identity_covers_teacher_images_and_every_schedule_field(image_folder):
    """A saved state resumes only into the same run: teacher, image list and schedule included."""
    from dataclasses import fields, replace

    from distillation.train import IDENTITY_FIELDS, NOT_IN_IDENTITY, state_identity

    assert sorted(IDENTITY_FIELDS + NOT_IN_IDENTITY) == sorted(f.name for f in fields(DistillConfig))
    sources = discover_images(image_folder)
    config = DistillConfig(teacher_type="vit_b", image_size=64)
    base = state_identity(config, sources, None)
    assert state_identity(config, list(sources), None) == base
    changed = {
        "accumulation": state_identity(replace(config, accumulation=2), sources, None),
        "min_lr_ratio": state_identity(replace(config, min_lr_ratio=0.5), sources, None),
        "teacher_type": state_identity(replace(config, teacher_type="vit_l"), sources, None),
        "teacher checkpoint": state_identity(config, sources, "0" * 64),
        "image swapped": state_identity(config, sources[:-2] + sources[-1:] + sources[-2:-1], None),
        "image removed": state_identity(config, sources[1:], None),
    }
    for what, identity in changed.items():
        assert identity != base, what
