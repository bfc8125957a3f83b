"""Teacher and student encoders for decoupled distillation.

Teacher: SAM ViT-H/L/B from an official checkpoint through the spine's loader, or a seeded
random one (smoke runs), optionally built at a smaller image size. Student: MobileSAM's
TinyViT-5M (the default, saved in the official `mobile_sam.pt` layout) or any timm backbone
with a SAM-style neck to 256 x S/16 x S/16.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, Sam
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from pipeline.checkpoints import load_model
from pipeline.contract import PIXEL_MEAN, PIXEL_STD
from pipeline.errors import ConfigError
from pipeline.model import PROMPT_EMBED_DIM, MobileSamTinyViT, build_mobile_sam

log = logging.getLogger(__name__)

VIT_SIZES = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


def load_teacher(teacher_type: str, checkpoint: Path | None, image_size: int, seed: int) -> tuple[Sam, str, str | None]:
    """The teacher SAM (eval, frozen), a description of its weights and its checkpoint's sha256
    (None for a random teacher), hashed once by the loader.

    A random teacher at a smaller size is built directly (segment-anything's builder fixes 1024);
    its prompt encoder and mask decoder come from the same seed.
    """
    sam, source = load_model(teacher_type, checkpoint, seed)
    if image_size != sam.image_encoder.img_size:
        if checkpoint is not None:
            raise ConfigError(f"a real teacher runs at {sam.image_encoder.img_size}, not {image_size}")
        torch.manual_seed(seed)
        size = VIT_SIZES[teacher_type]
        sam.image_encoder = ImageEncoderViT(
            depth=size["depth"],
            embed_dim=size["embed_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6),
            num_heads=size["num_heads"],
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=size["global_attn_indexes"],
            window_size=14,
            out_chans=PROMPT_EMBED_DIM,
        )
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    description = source.describe() + ("" if checkpoint is not None else f", built at {image_size}")
    return sam.eval(), description, source.sha256


class TimmBackboneStudent(nn.Module):
    """Any timm backbone's stride-16 (or nearest) feature map, resized to S/16, plus SAM's neck."""

    def __init__(self, name: str, image_size: int) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(name, pretrained=False, features_only=True)
        except Exception as error:  # timm raises RuntimeError/KeyError for unknown or unsupported models
            raise ConfigError(f"timm cannot build a feature backbone {name!r}: {error}") from None
        reductions = self.backbone.feature_info.reduction()
        self.index = min(range(len(reductions)), key=lambda i: (abs(reductions[i] - 16), -i))
        channels = self.backbone.feature_info.channels()[self.index]
        self.img_size = image_size
        self.neck = nn.Sequential(
            nn.Conv2d(channels, PROMPT_EMBED_DIM, kernel_size=1, bias=False),
            LayerNorm2d(PROMPT_EMBED_DIM),
            nn.Conv2d(PROMPT_EMBED_DIM, PROMPT_EMBED_DIM, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(PROMPT_EMBED_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[self.index]
        size = x.shape[-1] // 16
        if features.shape[-1] != size:
            features = F.interpolate(features, size=(size, size), mode="bilinear", align_corners=False)
        return self.neck(features)


def build_student(name: str, image_size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "tiny_vit":
        student = MobileSamTinyViT()
        student.img_size = image_size
        # The classification head is stored in mobile_sam.pt but never run: frozen, it keeps its
        # init values, and DDP does not wait for gradients that never come.
        student.head.requires_grad_(False)
        return student
    return TimmBackboneStudent(name, image_size)


def assemble_mobile_sam(student: nn.Module, teacher: Sam) -> Sam:
    """The deliverable: the student encoder with the teacher's own prompt encoder and mask
    decoder, at 1024 (the size every converter and app uses)."""
    if not isinstance(student, MobileSamTinyViT):
        raise ConfigError("only the tiny_vit student has the official mobile_sam.pt layout")
    sam = build_mobile_sam()
    sam.image_encoder.load_state_dict(student.state_dict())
    sam.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    sam.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    return sam.eval()


def sam_at_size(image_encoder: nn.Module, teacher: Sam, image_size: int) -> Sam:
    """A SAM whose prompt side matches `image_size` (same weights), for SamPredictor at that size."""
    embedding = image_size // 16
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(embedding, embedding),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    image_encoder.img_size = image_size
    return Sam(image_encoder, prompt_encoder, teacher.mask_decoder, list(PIXEL_MEAN), list(PIXEL_STD)).eval()
