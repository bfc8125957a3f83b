"""The export contract: the inputs and outputs every converted file and every runtime agrees on.

One typed place for names, shapes, dtypes and meaning. Converters name their graph inputs and
outputs from here, runtimes feed and read them by these names, and manifests embed
`PartContract.to_json()` so an app developer can read the contract next to the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

from pipeline.errors import ArtifactError

IMAGE_SIZE = 1024
"""Side of the square encoder input; the longest image side is resized to this."""

EMBEDDING_SHAPE = (1, 256, 64, 64)
LOW_RES_MASK_SIZE = 256
NUM_MASK_OUTPUTS = 4
"""Index 0 is the single-mask output, 1..3 are the three multimask outputs."""

DEFAULT_NUM_POINTS = 5

DEFAULT_BATCH_PROMPTS = 64
"""B of the batched decoder: prompts decoded against one image embedding in one call (64 is
segment-anything's automatic mask generator's points_per_batch)."""

ENCODER = "image_encoder"
DECODER = "prompt_decoder"
BATCHED_DECODER = "prompt_decoder_batched"
DECODER_PARTS = (DECODER, BATCHED_DECODER)

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

PADDING_RULE = (
    "Resize the longest side to 1024 (segment-anything's ResizeLongestSide), place the image "
    "top-left and fill the bottom and right with the pixel mean (123.675, 116.28, 103.53). "
    "The graph normalizes (x - mean) / std, so padded pixels become exactly 0, as "
    "SamPredictor's zero padding after normalization."
)


class PointLabel(IntEnum):
    """Meaning of `point_labels`, as in segment-anything's ONNX export."""

    PADDING = -1
    BACKGROUND = 0
    FOREGROUND = 1
    BOX_TOP_LEFT = 2
    BOX_BOTTOM_RIGHT = 3


LABEL_MEANINGS = {int(label): label.name.lower() for label in PointLabel}


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    description: str


@dataclass(frozen=True)
class PartContract:
    """Inputs and outputs of one exported part (`image_encoder` or `prompt_decoder`)."""

    part: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    def spec(self, name: str) -> TensorSpec:
        for spec in (*self.inputs, *self.outputs):
            if spec.name == name:
                return spec
        raise KeyError(f"{self.part} has no tensor named {name!r}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (lists, not tuples), so a manifest read back compares equal."""
        return json.loads(json.dumps(asdict(self)))


def encoder_contract() -> PartContract:
    return PartContract(
        part="image_encoder",
        inputs=(
            TensorSpec(
                "image",
                (1, 3, IMAGE_SIZE, IMAGE_SIZE),
                "float32",
                "RGB pixels in 0..255, longest side resized to 1024, padded bottom-right "
                "with the pixel mean; normalization happens inside the graph",
            ),
        ),
        outputs=(
            TensorSpec(
                "image_embeddings",
                EMBEDDING_SHAPE,
                "float32",
                "image embedding for the prompt decoder",
            ),
        ),
        notes=(PADDING_RULE,),
    )


def decoder_contract(num_points: int = DEFAULT_NUM_POINTS, batch: int | None = None) -> PartContract:
    """The one-prompt decoder (`batch` None), or the batched decoder: `batch` prompts in one call."""
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2 (a box takes two), got {num_points}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    labels = ", ".join(f"{value} {name}" for value, name in LABEL_MEANINGS.items())
    b = 1 if batch is None else batch
    per = "" if batch is None else "; one row per prompt"
    notes = [
        f"N = {num_points} point slots, fixed at export time.",
        "The graph appends one padding slot and masks every padding token but the first "
        "out of attention (all of them when a box is present), so any k <= N prompt slots "
        "give SamPredictor's answer: k points plus one padding token, or points plus box.",
        "Masks are logits: threshold at 0. Upscale 256 -> 1024, crop to the resized "
        "image, then resize to the original size.",
    ]
    if batch is not None:
        notes.insert(
            0,
            f"B = {batch} prompts against one image embedding per call, fixed at export time; each row "
            "is answered exactly as the one-prompt decoder answers it alone. Fill unused rows with a "
            "copy of any used row and ignore their outputs.",
        )
    return PartContract(
        part=DECODER if batch is None else BATCHED_DECODER,
        inputs=(
            TensorSpec("image_embeddings", EMBEDDING_SHAPE, "float32", "encoder output"),
            TensorSpec(
                "point_coords",
                (b, num_points, 2),
                "float32",
                f"x, y in the 1024 frame of the resized image; a box is two points{per}",
            ),
            TensorSpec(
                "point_labels",
                (b, num_points),
                "float32",
                f"{labels}; unused slots are padding with coords 0, 0",
            ),
            TensorSpec(
                "mask_input",
                (b, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE),
                "float32",
                "low-res mask logits from an earlier prediction, or zeros",
            ),
            TensorSpec("has_mask_input", (b,), "float32", "1 to use mask_input, 0 to ignore it"),
        ),
        outputs=(
            TensorSpec(
                "low_res_masks",
                (b, NUM_MASK_OUTPUTS, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE),
                "float32",
                "mask logits; index 0 single-mask output, 1..3 multimask outputs",
            ),
            TensorSpec(
                "iou_predictions",
                (b, NUM_MASK_OUTPUTS),
                "float32",
                "predicted IoU of each of the four masks",
            ),
        ),
        notes=tuple(notes),
    )


def prompts_per_call(contract: PartContract) -> int:
    """B of a decoder contract (1 for the one-prompt decoder)."""
    return contract.spec("point_coords").shape[0]


def file_stem(contract: PartContract) -> str:
    """What a part's files are called: the part, with B for the batched decoder (`prompt_decoder_b64`)."""
    if contract.part == BATCHED_DECODER:
        return f"{DECODER}_b{prompts_per_call(contract)}"
    return contract.part


def contract_for(
    part: str, num_points: int = DEFAULT_NUM_POINTS, batch_prompts: int = DEFAULT_BATCH_PROMPTS
) -> PartContract:
    """The contract of a part by name; one line for a name that is no part."""
    if part == ENCODER:
        return encoder_contract()
    if part == DECODER:
        return decoder_contract(num_points)
    if part == BATCHED_DECODER:
        return decoder_contract(num_points, batch_prompts)
    raise ArtifactError(f"unknown part {part!r}; expected {ENCODER}, {DECODER} or {BATCHED_DECODER}")
