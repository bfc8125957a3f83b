"""The PyTorch reference ("teacher") predictor: the two export wrappers on a photo and prompts.

It runs exactly the modules that are converted, with the same preparation and
post-processing every runtime uses, and equals SamPredictor on the same inputs. The
validation stage scores every converted file against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from pipeline.contract import DEFAULT_NUM_POINTS
from pipeline.export_wrappers import ImageEncoderForExport, PromptDecoderForExport
from pipeline.processing import (
    PreparedImage,
    Prompt,
    default_multimask,
    prepare_image,
    prompt_to_decoder_inputs,
    select_mask_index,
    upscale_masks,
)


@dataclass(frozen=True)
class Prediction:
    """Raw decoder outputs and the selected full-resolution mask."""

    low_res_masks: np.ndarray  # 1x4x256x256 logits
    iou_predictions: np.ndarray  # 1x4
    mask_logits: np.ndarray  # 4xHxW at the photo's size
    selected: int  # index into the four outputs

    @property
    def mask(self) -> np.ndarray:
        return self.mask_logits[self.selected] > 0


class ReferencePredictor:
    """Encode a photo once, then decode any number of prompts (like SamPredictor)."""

    def __init__(self, sam: Sam, num_points: int = DEFAULT_NUM_POINTS) -> None:
        self.encoder = ImageEncoderForExport(sam).eval()
        self.decoder = PromptDecoderForExport(sam).eval()
        self.num_points = num_points
        self.prepared: PreparedImage | None = None
        self.embeddings: np.ndarray | None = None

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> np.ndarray:
        self.prepared = prepare_image(image)
        self.embeddings = self.encoder(torch.from_numpy(self.prepared.image)).numpy()
        return self.embeddings

    @torch.inference_mode()
    def decode(self, decoder_inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.decoder(
            *(
                torch.from_numpy(decoder_inputs[name])
                for name in ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
            )
        )
        return outputs[0].numpy(), outputs[1].numpy()

    def predict(self, prompt: Prompt, multimask_output: bool | None = None) -> Prediction:
        if self.prepared is None or self.embeddings is None:
            raise RuntimeError("call set_image before predict")
        inputs = prompt_to_decoder_inputs(prompt, self.prepared.original_size, self.num_points)
        low_res, iou = self.decode({"image_embeddings": self.embeddings, **inputs})
        multimask = default_multimask(prompt) if multimask_output is None else multimask_output
        return Prediction(
            low_res_masks=low_res,
            iou_predictions=iou,
            mask_logits=upscale_masks(low_res, self.prepared.input_size, self.prepared.original_size),
            selected=select_mask_index(iou, multimask),
        )
