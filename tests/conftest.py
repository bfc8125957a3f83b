"""Shared fixtures: seeded random weights in the official layouts and the real COCO photos the
project ships (a user's clone has them; nothing beside the repository is needed)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

SHARED_CORES = {"OMP_WAIT_POLICY": "PASSIVE"}
"""The suite's two workers (and the processes they start) share the machine's cores: OpenMP's
default policy keeps each idle PyTorch thread spinning on a core the other worker needs, which
slows concurrent PyTorch work on few cores. Set before torch is imported."""
for _name, _value in SHARED_CORES.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.datasets import CocoPhotos  # noqa: E402


def perturb_state_dict(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded noise on every float tensor.

    Upstream's init leaves attention biases at 0, BatchNorm at identity and many biases at 0;
    a key mapped to the wrong same-shaped tensor would go unnoticed with those values.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator) * 0.02
            value = value.abs() + 0.5 + noise.abs() if key.endswith("running_var") else value + noise
        out[key] = value.clone()
    return out


@pytest.fixture(scope="session")
def upstream_mobile_sam():
    """Upstream MobileSAM (mobilesam-mirror) with seeded random weights, and its state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry
    torch.manual_seed(0)
    model = sam_model_registry["vit_t"]()
    state = perturb_state_dict(model.state_dict(), seed=1)
    model.load_state_dict(state, strict=True)
    return model.eval(), state


@pytest.fixture(scope="session")
def official_checkpoint(upstream_mobile_sam, tmp_path_factory) -> Path:
    """A `mobile_sam.pt` in the official layout, written by upstream's own model."""
    path = tmp_path_factory.mktemp("checkpoints") / "mobile_sam.pt"
    torch.save(upstream_mobile_sam[1], path)
    return path


@pytest.fixture(scope="session")
def our_model(official_checkpoint):
    from pipeline.checkpoints import load_model

    model, _ = load_model("vit_t", official_checkpoint)
    return model


REPO = Path(__file__).resolve().parents[1]


def tracked_copy(clone: Path) -> Path:
    """The repository's tracked (and untracked, not ignored) files alone, copied to `clone`: what a
    user's clone holds, with no shared data folder beside it."""
    import shutil
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in tracked:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert not (clone.parent / "shared").exists()
    return clone


def clone_environment(clone: Path, home: Path) -> dict[str, str]:
    """What a process on a user's clone sees: the clone on the path, nothing of this environment's
    variables but the system PATH, two threads that do not spin on the other worker's core."""
    system = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(clone)}
    return {**system, "OMP_NUM_THREADS": "2", **SHARED_CORES}


class ShippedPhotos:
    """Every photo the project ships (pipeline/sample_photos: the calibration split, then the
    validation split, each by id): what a user's clone has, so the suite needs nothing beside it."""

    has_ground_truth = True

    def __init__(self) -> None:
        self.splits = [CocoPhotos.sample("calibration"), CocoPhotos.sample("validation")]
        self._source = {image_id: split for split in self.splits for image_id in split.image_ids()}

    def image_ids(self) -> list[int]:
        return [image_id for split in self.splits for image_id in split.image_ids()]

    def image_path(self, image_id: int) -> Path:
        return self._source[image_id].image_path(image_id)

    def image(self, image_id: int):
        return self._source[image_id].image(image_id)

    def instances(self, image_id: int, include_crowd: bool = False):
        return self._source[image_id].instances(image_id, include_crowd)

    def describe(self) -> str:
        return "the shipped sample photos (pipeline/sample_photos, both splits)"


@pytest.fixture(scope="session")
def photos() -> ShippedPhotos:
    """The 13 shipped photos with their instances (indices 0-8 calibration, 9-12 held out)."""
    return ShippedPhotos()


@pytest.fixture(scope="session")
def coreml_fp32(tmp_path_factory) -> Path:
    """A real convert output with the defaults a user gets (Core ML fp32, random weights seed 0,
    the shipped sample photos) but a batched decoder of B = 16 (64 rows cost the emulator
    minutes across the tests that use it). Tests that damage it work on a copy."""
    from mobile_targets.convert import convert_target
    from pipeline.config import RunConfig

    out = tmp_path_factory.mktemp("coreml_fp32")
    convert_target("coreml", RunConfig(precisions=("fp32",), out_dir=out, batch_prompts=16))
    return out


TFLITE_BATCH = 4
"""B of the batched decoder in the shared TFLite files (the default, 64, only costs time here)."""


@pytest.fixture(scope="session")
def tflite_converted(tmp_path_factory, official_checkpoint) -> Path:
    """TFLite files of the checkpoint in every default precision, converted once for the session:
    test_targets checks them and test_validation validates a copy (a TFLite conversion of the
    full model costs minutes). Tests that change files work on a copy."""
    from mobile_targets.convert import convert_target
    from pipeline.config import DEFAULT_PRECISIONS, RunConfig

    out = tmp_path_factory.mktemp("tflite_converted")
    config = RunConfig(
        checkpoint=official_checkpoint, precisions=DEFAULT_PRECISIONS, out_dir=out, batch_prompts=TFLITE_BATCH
    )
    return convert_target("tflite", config)


@pytest.fixture(scope="session")
def executorch_converted(tmp_path_factory, official_checkpoint) -> Path:
    """ExecuTorch files of the checkpoint in every default precision, converted once for the
    session: test_targets checks them and test_compat runs them in an older ExecuTorch."""
    from mobile_targets import get_target
    from mobile_targets.convert import convert_target
    from pipeline.config import DEFAULT_PRECISIONS, RunConfig

    out = tmp_path_factory.mktemp("executorch_converted")
    precisions = tuple(p for p in get_target("executorch").precisions if p in DEFAULT_PRECISIONS)
    config = RunConfig(checkpoint=official_checkpoint, precisions=precisions, out_dir=out, batch_prompts=TFLITE_BATCH)
    return convert_target("executorch", config)


SESSION_CONVERSIONS = ("coreml_fp32", "tflite_converted", "executorch_converted")
"""Session fixtures that convert the full model: every test using one runs in the same pytest-xdist
worker, so each conversion is made once."""

TARGET_CONVERSIONS = {"tflite": "tflite_converted", "executorch": "executorch_converted"}
"""test_targets' `converted` takes these targets' files from the session fixture named here."""


SLOW_FIXTURES = frozenset(
    (*SESSION_CONVERSIONS, "converted", "coreml_run", "validated", "shared_cache", "uninterrupted", "bad_files")
)
"""A test that uses one of these converts the full model, trains, or builds a cache: marked `slow`
(`nox -s tests -- -m "not slow"` is the quick check while editing)."""

LONGEST_GROUPS_FIRST = (
    "executorch_converted",
    "tflite_converted",
    "test_targets-executorch_coreml",
    "tests.test_coreml",
    "tests.test_coreai",
    "coreml_fp32",
    "tests.test_bad_input",
    "tests.test_distillation",
)
"""The groups that take longest (full-model conversions), longest first: xdist hands groups out
in collection order, so starting these first lets the workers finish together."""


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that use a costly fixture `slow`. Under `pytest -n N --dist loadgroup` (the
    tests session), tests that share a costly fixture
    share a worker: a session conversion's users; test_targets' tests of one target (the
    module's conversion is per target); otherwise the module (module-scoped fixtures). Groups
    run in LONGEST_GROUPS_FIRST order, the rest after them as collected."""
    groups = {}
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if SLOW_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.slow)
        shared = [name for name in SESSION_CONVERSIONS if name in fixtures]
        callspec = getattr(item, "callspec", None)
        if shared:
            group = shared[0]
        elif callspec is not None and "converted" in callspec.params and item.module.__name__.endswith("test_targets"):
            target = callspec.params["converted"]
            group = TARGET_CONVERSIONS.get(target, f"test_targets-{target}")
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item.nodeid] = group
    rank = {group: index for index, group in enumerate(LONGEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))  # stable: collection order within
