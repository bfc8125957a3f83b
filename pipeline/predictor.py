"""Encode, decode, upscale, select: the one chain every runtime and PyTorch share.

`Segmenter` runs any encoder and decoder that take and give the contract's named arrays (a
converted file's runner, or an export wrapper behind `TorchPart`), with the same preparation and
post-processing an app does. `ReferencePredictor` is that chain over the PyTorch export wrappers:
it equals SamPredictor on the same inputs, and the convert gate, validate, selftest, the tests
and the benchmarks all score files against it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from segment_anything.modeling import Sam

from pipeline.contract import DEFAULT_NUM_POINTS, PartContract, decoder_contract, encoder_contract
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


class NamedRunner(Protocol):
    """Anything that runs one exported part: the contract's named float32 arrays in and out."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchPart:
    """An export wrapper behind the runner interface (PyTorch eager, fp32)."""

    def __init__(self, module: torch.nn.Module, contract: PartContract) -> None:
        self.module = module.eval()
        self.contract = contract

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.module(*(torch.from_numpy(np.asarray(inputs[name])) for name in self.contract.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: value.numpy() for name, value in zip(self.contract.output_names, outputs, strict=True)}


PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")
"""The decoder inputs that belong to one prompt (one row of the batched decoder)."""


def stack_prompts(rows: list[dict[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """One batched-decoder call from up to `batch` one-prompt input sets on the same embedding;
    unused rows repeat the first prompt (their outputs are ignored)."""
    if not 1 <= len(rows) <= batch:
        raise ValueError(f"a batched call takes 1..{batch} prompts, got {len(rows)}")
    shared = rows[0]["image_embeddings"]
    if any(
        row["image_embeddings"] is not shared and not np.array_equal(row["image_embeddings"], shared) for row in rows
    ):
        # the file takes one photo's embeddings for all B prompts: rows of two photos would answer wrong
        raise ValueError("a batched call's prompts must all be on the same image embeddings (one photo a call)")
    filled = rows + [rows[0]] * (batch - len(rows))
    stacked = {name: np.concatenate([row[name] for row in filled], axis=0) for name in PROMPT_INPUTS}
    return {"image_embeddings": rows[0]["image_embeddings"], **stacked}


def unstack_outputs(outputs: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """The first `count` rows of a batched call, each shaped like a one-prompt decoder's outputs."""
    return [{name: value[row : row + 1] for name, value in outputs.items()} for row in range(count)]


class BatchedDecoder:
    """A batched decoder (B prompts per call) behind the one-prompt runner interface.

    `run_many` decodes any number of prompts B at a time. `prefetch` does so for prompts that
    `run` will be asked for next, so code written for the one-prompt decoder (scoring, the
    segmenter) drives the batched file at its batched speed; a prompt not prefetched runs alone."""

    def __init__(self, runner: NamedRunner, batch: int) -> None:
        self.runner, self.batch = runner, batch
        self._ready: dict[bytes, dict[str, np.ndarray]] = {}

    def run_many(self, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        answers: list[dict[str, np.ndarray]] = []
        for start in range(0, len(rows), self.batch):
            chunk = rows[start : start + self.batch]
            answers += unstack_outputs(self.runner.run(stack_prompts(chunk, self.batch)), len(chunk))
        return answers

    @staticmethod
    def _key(inputs: dict[str, np.ndarray]) -> bytes:
        digest = hashlib.sha1(usedforsecurity=False)
        for name in ("image_embeddings", *PROMPT_INPUTS):
            digest.update(np.ascontiguousarray(inputs[name], dtype=np.float32).tobytes())
        return digest.digest()

    def prefetch(self, rows: list[dict[str, np.ndarray]]) -> None:
        self._ready = {self._key(row): answer for row, answer in zip(rows, self.run_many(rows), strict=True)}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answer = self._ready.pop(self._key(inputs), None)
        return answer if answer is not None else self.run_many([inputs])[0]


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

    @property
    def best_low_res_mask(self) -> np.ndarray:
        """256x256 logits of the selected output: what an app feeds back as `mask_input`."""
        return self.low_res_masks[0, self.selected]


def embed(encoder: NamedRunner, prepared: PreparedImage) -> np.ndarray:
    """An encoder (a file's runner or PyTorch) on a prepared photo: its 1x256x64x64 embeddings."""
    return encoder.run(prepared.encoder_inputs())["image_embeddings"]


class Segmenter:
    """Encode a photo once (or take its embeddings), then decode any number of prompts."""

    def __init__(self, decoder: NamedRunner, encoder: NamedRunner | None = None, num_points: int = DEFAULT_NUM_POINTS):
        self.encoder = encoder
        self.decoder = decoder
        self.num_points = num_points
        self.prepared: PreparedImage | None = None
        self.embeddings: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError("this segmenter has no encoder: call set_embeddings")
        prepared = prepare_image(image)
        return self.set_embeddings(prepared, embed(self.encoder, prepared))

    def set_embeddings(self, prepared: PreparedImage, embeddings: np.ndarray) -> np.ndarray:
        self.prepared, self.embeddings = prepared, embeddings
        return embeddings

    def decoder_inputs(self, prompt: Prompt) -> dict[str, np.ndarray]:
        if self.prepared is None or self.embeddings is None:
            raise RuntimeError("call set_image or set_embeddings before predicting")
        inputs = prompt_to_decoder_inputs(prompt, self.prepared.original_size, self.num_points)
        return {"image_embeddings": self.embeddings, **inputs}

    def decode(self, inputs: dict[str, np.ndarray], multimask_output: bool) -> Prediction:
        """Run the decoder on ready inputs, upscale to the photo and select like SamPredictor."""
        outputs = self.decoder.run(inputs)
        low_res, iou = outputs["low_res_masks"], outputs["iou_predictions"]
        return Prediction(
            low_res_masks=low_res,
            iou_predictions=iou,
            mask_logits=upscale_masks(low_res, self.prepared.input_size, self.prepared.original_size),
            selected=select_mask_index(iou, multimask_output),
        )

    def predict(self, prompt: Prompt, multimask_output: bool | None = None) -> Prediction:
        multimask = default_multimask(prompt) if multimask_output is None else multimask_output
        return self.decode(self.decoder_inputs(prompt), multimask)


class ReferencePredictor(Segmenter):
    """The chain over the PyTorch export wrappers: the reference every file is scored against."""

    def __init__(self, sam: Sam, num_points: int = DEFAULT_NUM_POINTS) -> None:
        self.encoder_module = ImageEncoderForExport(sam).eval()
        self.decoder_module = PromptDecoderForExport(sam).eval()
        """Batch-generic: the same module is the batched decoder's reference at any B."""
        super().__init__(
            decoder=TorchPart(self.decoder_module, decoder_contract(num_points)),
            encoder=TorchPart(self.encoder_module, encoder_contract()),
            num_points=num_points,
        )
