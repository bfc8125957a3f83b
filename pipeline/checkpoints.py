"""Load and save checkpoints in the official layouts, or make seeded random weights.

Official layouts: `mobile_sam.pt` (MobileSAM, keys of upstream's TinyViT) and
`sam_vit_{b,l,h}_*.pth` (segment-anything). Files are read with `weights_only=True`; every
failure is one `CheckpointError` line. Our encoder is timm's TinyVit, so TinyViT keys are
renamed on load and renamed back on save: the saved file is byte-for-byte the official layout.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from timm.models.tiny_vit import Attention as TinyVitAttention
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.files import atomic_write_bytes, sha256_file
from pipeline.model import MODEL_TYPES, STUDENT_TYPE, ModelType, build_model

log = logging.getLogger(__name__)

ENCODER_PREFIX = "image_encoder."

# (official upstream TinyViT key pattern, our timm TinyVit key pattern), applied in order.
_OFFICIAL_TO_TIMM = (
    (r"^patch_embed\.seq\.0\.", "patch_embed.conv1."),
    (r"^patch_embed\.seq\.2\.", "patch_embed.conv2."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.c\.weight$", ".conv.weight"),
    (r"^norm_head\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)
_TIMM_TO_OFFICIAL = (
    (r"^patch_embed\.conv1\.", "patch_embed.seq.0."),
    (r"^patch_embed\.conv2\.", "patch_embed.seq.2."),
    (r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks."),
    (r"\.conv\.weight$", ".c.weight"),
    (r"^head\.norm\.", "norm_head."),
    (r"^head\.fc\.(weight|bias)$", r"head.\1"),
)
_DOWNSAMPLE = re.compile(r"^(layers|stages)\.(\d+)\.downsample\.")


def _rename_encoder_key(key: str, rules: tuple[tuple[str, str], ...], stage_shift: int) -> str:
    """Upstream puts each downsample at the end of stage i, timm at the start of stage i+1."""
    match = _DOWNSAMPLE.match(key)
    if match:
        prefix = "stages" if stage_shift > 0 else "layers"
        key = f"{prefix}.{int(match.group(2)) + stage_shift}.downsample." + key[match.end() :]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _rename_student_keys(
    state: Mapping[str, torch.Tensor], rules: tuple[tuple[str, str], ...], stage_shift: int
) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            inner = _rename_encoder_key(key[len(ENCODER_PREFIX) :], rules, stage_shift)
            key = ENCODER_PREFIX + inner
        renamed[key] = value
    return renamed


def official_to_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`mobile_sam.pt` keys -> keys of `build_mobile_sam()`."""
    return _rename_student_keys(state, _OFFICIAL_TO_TIMM, stage_shift=1)


def model_to_official_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of `build_mobile_sam()` -> the `mobile_sam.pt` layout."""
    return _rename_student_keys(state, _TIMM_TO_OFFICIAL, stage_shift=-1)


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights came from; recorded in every manifest and report."""

    model_type: str
    checkpoint: str | None
    sha256: str | None
    seed: int | None

    @property
    def is_random(self) -> bool:
        return self.checkpoint is None

    def describe(self) -> str:
        if self.is_random:
            return f"random init, seed {self.seed}"
        return f"checkpoint {Path(self.checkpoint).name} sha256 {self.sha256}"

    def to_json(self) -> dict[str, object]:
        return {
            "model_type": self.model_type,
            "checkpoint": self.checkpoint,
            "sha256": self.sha256,
            "seed": self.seed,
            "description": self.describe(),
        }


def _guess_architecture(keys: set[str]) -> str:
    """Name the architecture a state dict looks like, for error messages."""
    if any(k.startswith("image_encoder.layers.") or k.startswith("image_encoder.stages.") for k in keys):
        return "vit_t (MobileSAM)"
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    depth_to_type = {12: "vit_b", 24: "vit_l", 32: "vit_h"}
    if blocks:
        return depth_to_type.get(max(blocks) + 1, f"a ViT with {max(blocks) + 1} blocks")
    return "not a SAM model"


def _summarise(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely; one clear error line for each way it can be wrong."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected mobile_sam.pt or sam_vit_*.pth)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    with path.open("rb") as handle:
        head = handle.read(4)
    is_zip = head.startswith(b"PK")
    is_legacy_pickle = head[:1] == b"\x80"
    if not (is_zip or is_legacy_pickle):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (no zip or pickle header)")
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt: its zip directory is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Unsupported global" in str(error) or "Weights only load failed" in first:
            found = re.search(r"Unsupported global: (GLOBAL [\w.]+)", str(error))
            what = found.group(1) if found else "code objects"
            raise CheckpointError(
                f"{path} needs code to unpickle ({what}); only plain state dicts are loaded "
                "(torch.load weights_only=True)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {first}") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt: {first}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(state).__name__})")
    require_finite_weights(state, str(path))
    return dict(state)


def require_finite_weights(state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Refuse NaN or Inf in any floating tensor: every output would be garbage, and a NaN mask is
    empty, so it could even pass an IoU check against another empty mask."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int(finite.numel() - finite.sum())
                raise CheckpointError(
                    f"{origin}: tensor {key} {tuple(value.shape)} has {bad} non-finite values (NaN or Inf); "
                    "a checkpoint must hold finite weights"
                )


def load_weights_into(model: Sam, model_type: ModelType, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load an official-layout state dict with strict=True, or say what does not fit."""
    if model_type == STUDENT_TYPE:
        state = official_to_model_keys(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{origin} does not fit {model_type}: it looks like {_guess_architecture(set(state))}; "
            f"missing keys {_summarise(missing)}; unexpected keys {_summarise(unexpected)}"
        )
    wrong_shapes = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong_shapes:
        key = wrong_shapes[0]
        raise CheckpointError(
            f"{origin} does not fit {model_type}: {len(wrong_shapes)} tensors have other shapes, "
            f"e.g. {key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        )
    model.load_state_dict(state, strict=True)


def load_model(model_type: ModelType, checkpoint: Path | None = None, seed: int = 0) -> tuple[Sam, WeightsSource]:
    """A model in eval mode from an official checkpoint, or seeded random weights (logged)."""
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    if checkpoint is None:
        torch.manual_seed(seed)
        model = build_model(model_type)
        randomize_attention_biases(model, seed)
        revive_zero_initialized_branches(model)
        source = WeightsSource(model_type=model_type, checkpoint=None, sha256=None, seed=seed)
        log.warning("No checkpoint given: %s uses seeded random weights (%s)", model_type, source.describe())
    else:
        checkpoint = Path(checkpoint)
        state = read_state_dict(checkpoint)
        model = build_model(model_type)
        load_weights_into(model, model_type, state, origin=str(checkpoint))
        source = WeightsSource(
            model_type=model_type, checkpoint=str(checkpoint), sha256=sha256_file(checkpoint), seed=None
        )
        log.info("Loaded %s from %s", model_type, source.describe())
    return model.eval(), source


RANDOM_BIAS_STD = 0.02
"""Spread of the seeded relative-position biases (timm's weight init spread)."""


def randomize_attention_biases(model: Sam, seed: int) -> None:
    """Give TinyViT's relative-position bias tables seeded non-zero values.

    Why: timm initialises them to zeros, and a converter may drop an all-zero bias add, so files
    made from fresh weights would be smaller than real checkpoints' and hide a bias table
    expanded to heads x tokens x tokens. A generator of its own leaves every other weight as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.image_encoder.modules():
            if isinstance(module, TinyVitAttention):
                noise = torch.randn(module.attention_biases.shape, generator=generator) * RANDOM_BIAS_STD
                module.attention_biases.copy_(noise)


def revive_zero_initialized_branches(model: Sam) -> None:
    """Set to one the BatchNorm weights that timm initialises to zero (each MBConv's last
    convolution, `bn_weight_init=0.0`), as trained checkpoints never have them.

    Why: with a zero norm weight the MBConv's residual branch is a constant zero, and litert-torch
    folds the whole branch away (its three convolutions, 4.6 of the encoder's 38.8 GMAC), so files
    made from fresh weights ran faster and were smaller than a checkpoint's.
    """
    with torch.no_grad():
        for module in model.image_encoder.modules():
            if isinstance(module, nn.BatchNorm2d) and not torch.any(module.weight):
                module.weight.fill_(1.0)


def official_state_dict(model: Sam, model_type: ModelType) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return model_to_official_keys(state) if model_type == STUDENT_TYPE else state


def save_checkpoint(model: Sam, model_type: ModelType, path: Path) -> str:
    """Write the official layout atomically; returns the file's sha256."""
    buffer = io.BytesIO()
    torch.save(official_state_dict(model, model_type), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()
