"""Loading official layouts, saving them back, and one clear line for each bad file."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from segment_anything import sam_model_registry

from pipeline.checkpoints import load_model, official_state_dict, read_state_dict, save_checkpoint
from pipeline.errors import CheckpointError
from pipeline.model import build_mobile_sam, count_parameters


def test_official_layout_loads_strictly_and_round_trips(official_checkpoint, upstream_mobile_sam, tmp_path):
    model, source = load_model("vit_t", official_checkpoint)
    upstream_state = upstream_mobile_sam[1]
    ours = official_state_dict(model, "vit_t")
    assert set(ours) == set(upstream_state)
    assert all(torch.equal(ours[k], upstream_state[k]) for k in ours)
    assert source.sha256 and not source.is_random
    saved = tmp_path / "again.pt"
    save_checkpoint(model, "vit_t", saved)
    reread = torch.load(saved, weights_only=True)
    assert all(torch.equal(reread[k], upstream_state[k]) for k in upstream_state)


def test_parameter_count_matches_upstream(upstream_mobile_sam):
    assert count_parameters(build_mobile_sam()) == count_parameters(upstream_mobile_sam[0])


def test_random_weights_are_announced(caplog):
    with caplog.at_level(logging.WARNING):
        _, source = load_model("vit_t", None, seed=7)
    assert source.is_random and source.describe() == "random init, seed 7"
    assert "random weights" in caplog.text


def test_random_weights_leave_no_branch_at_zero():
    """timm zero-initialises each MBConv's last BatchNorm weight; fresh weights must not, or
    converters fold the branch away and time a smaller encoder than a checkpoint's."""
    fresh, _ = load_model("vit_t", None, seed=0)
    zero_initialized = build_mobile_sam()
    names = [
        name
        for name, module in zero_initialized.image_encoder.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d) and not torch.any(module.weight)
    ]
    assert names == ["stages.0.blocks.0.conv3.bn", "stages.0.blocks.1.conv3.bn"]
    assert all(torch.all(fresh.image_encoder.get_submodule(name).weight != 0) for name in names)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(path)


def test_pickle_that_needs_code(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"args": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointError, match=r"needs code to unpickle .*Namespace"):
        read_state_dict(path)


def test_truncated_file(official_checkpoint, tmp_path):
    data = official_checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            read_state_dict(path)
        assert "\n" not in str(info.value)


def test_wrong_architecture_names_it(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_model("vit_t", path)
    message = str(info.value)
    assert "looks like vit_b" in message and "missing keys" in message and "unexpected keys" in message


def test_teacher_layout_loads(tmp_path):
    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    model, source = load_model("vit_b", path)
    assert source.model_type == "vit_b"
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
