"""PyTorch's answers on the photos and prompts every file is scored against, built once per
weights: embeddings, each prompt's prediction, ground truth where there is some, and the SAM
teacher's prediction when one is given."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from segment_anything.modeling import Sam
from tqdm import tqdm

from pipeline.checkpoints import WeightsSource, load_model
from pipeline.datasets import Photos
from pipeline.errors import ArtifactError
from pipeline.files import sha256_file
from pipeline.manifest import Manifest
from pipeline.metrics import require_finite
from pipeline.predictor import Prediction, ReferencePredictor
from pipeline.processing import PreparedImage, Prompt
from validation.prompts import PromptCase, cases_around_mask, grid_point_cases, prompt_cases


@dataclass(frozen=True)
class ValidationSettings:
    max_images: int = 4
    instances_per_image: int = 3
    latency_runs: int = 10
    warmup_runs: int = 2
    threads: int = 2
    prompt_seed: int = 0
    """Seed of the sampled prompt points (never the weights' seed)."""
    baselines: bool = True
    """Time PyTorch eager, ONNX Runtime and the compute floor (about a minute); off for quick checks."""
    everything_points_per_side: int = 8
    """Grid of the segment-everything section (K x K points per photo); 0 skips the section."""


@dataclass(frozen=True)
class ReferenceCase:
    case: PromptCase
    prompt: Prompt  # with the refinement's mask_input, when there is one
    inputs: dict[str, np.ndarray]  # decoder inputs without the embeddings
    expected: Prediction  # PyTorch (equal to SamPredictor)
    teacher: Prediction | None = None  # the SAM teacher on the same photo and prompt


@dataclass(frozen=True)
class ReferenceImage:
    image_id: int
    prepared: PreparedImage
    embeddings: np.ndarray
    cases: tuple[ReferenceCase, ...]
    ground_truth: dict[int, np.ndarray]  # annotation id -> instance mask (empty without ground truth)


def _case(predictor: ReferencePredictor, case: PromptCase, where: Path, mask_input=None) -> ReferenceCase:
    prompt = case.prompt(mask_input)
    inputs = predictor.decoder_inputs(prompt)
    expected = predictor.decode(inputs, case.multimask)
    for name in ("low_res_masks", "iou_predictions"):
        require_finite(getattr(expected, name), f"PyTorch's {name} for {where} ({case.kind} prompt)")
    inputs.pop("image_embeddings")
    return ReferenceCase(case, prompt, inputs, expected)


def _with_refinement(predictor: ReferencePredictor, first: ReferenceCase, where: Path) -> list[ReferenceCase]:
    """The case, then its second pass with the first pass's best low-res mask (if its kind has one)."""
    refinement = first.case.refinement()
    if refinement is None:
        return [first]
    return [first, _case(predictor, refinement, where, first.expected.best_low_res_mask)]


def build_reference(
    predictor: ReferencePredictor,
    photos: Photos,
    settings: ValidationSettings,
    teacher: ReferencePredictor | None = None,
) -> list[ReferenceImage]:
    """PyTorch's embeddings and predictions for every photo and prompt (and the teacher's).

    With ground truth: the five prompt kinds per instance plus a refinement of the centre point;
    without (a user's own photos): seeded grid points, their refinements, and boxes around
    PyTorch's own masks. A non-finite PyTorch output is one line: nothing can be scored against it."""
    references = []
    for image_id in tqdm(photos.image_ids()[: settings.max_images], desc="PyTorch reference", unit="photo"):
        where = photos.image_path(image_id)
        image = photos.image(image_id)
        embeddings = predictor.set_image(image)
        require_finite(embeddings, f"PyTorch's image_embeddings for {where}")
        cases: list[ReferenceCase] = []
        ground_truth = {}
        if photos.has_ground_truth:
            for instance in photos.instances(image_id)[: settings.instances_per_image]:
                if instance.mask.sum() == 0:
                    continue
                ground_truth[instance.annotation_id] = instance.mask
                for case in prompt_cases(
                    image_id, instance.annotation_id, instance.mask, instance.bbox, settings.prompt_seed
                ):
                    cases += _with_refinement(predictor, _case(predictor, case, where), where)
        else:
            size = predictor.prepared.original_size
            for point_case in grid_point_cases(image_id, size, settings.instances_per_image, settings.prompt_seed):
                first = _case(predictor, point_case, where)
                cases += _with_refinement(predictor, first, where)
                cases += [_case(predictor, case, where) for case in cases_around_mask(point_case, first.expected.mask)]
        if teacher is not None:
            teacher.set_image(image)
            cases = [
                ReferenceCase(c.case, c.prompt, c.inputs, c.expected, teacher.predict(c.prompt, c.case.multimask))
                for c in cases
            ]
        references.append(ReferenceImage(image_id, predictor.prepared, embeddings, tuple(cases), ground_truth))
    return references


def reference_weights(manifest: Manifest, checkpoint: Path | None) -> tuple[str, Path | None, int]:
    """The weights to rebuild PyTorch from, after checking they are the ones the files came from.

    `checkpoint` (validate --checkpoint) wins over the path the manifest recorded; either way its
    sha256 must equal the manifest's, or the run is refused: scoring files against other weights
    would measure nothing."""
    weights = manifest.weights
    model_type = weights.model_type
    recorded = weights.checkpoint
    if checkpoint is None and recorded is None:
        return model_type, None, int(weights.seed or 0)
    if recorded is None:
        raise ArtifactError(
            f"the {manifest.target} files were converted from random weights ({weights.description}), "
            f"not from --checkpoint {checkpoint}; convert again with --checkpoint, or validate without it"
        )
    path = Path(checkpoint) if checkpoint is not None else Path(recorded)
    if not path.is_file():
        raise ArtifactError(
            f"checkpoint {path} named by {manifest.target}/manifest.json is missing; pass --checkpoint PATH "
            "with the weights the files were converted from"
        )
    digest = sha256_file(path)
    if digest != weights.sha256:
        raise ArtifactError(
            f"checkpoint {path} has sha256 {digest[:12]}, but the {manifest.target} files were converted from "
            f"sha256 {str(weights.sha256)[:12]}: the weights changed, refusing to score; convert again"
        )
    return model_type, path, 0


@dataclass(frozen=True)
class ReferenceModel:
    """PyTorch rebuilt on the weights a manifest's files were converted from, with N of its decoders."""

    key: str
    sam: Sam
    source: WeightsSource
    predictor: ReferencePredictor


class ReferenceModels:
    """The PyTorch reference of each manifest, built once per weights and N: targets converted
    from the same weights share one (`checkpoint`: validate's --checkpoint, else the recorded one)."""

    def __init__(self, checkpoint: Path | None = None) -> None:
        self.checkpoint = checkpoint
        self._models: dict[str, ReferenceModel] = {}

    def key(self, manifest: Manifest) -> str:
        """Which reference the manifest's files are scored against; refuses weights that changed."""
        model_type, _, seed = reference_weights(manifest, self.checkpoint)
        return json.dumps([model_type, manifest.weights.sha256, seed, manifest.config.num_points])

    def get(self, manifest: Manifest) -> ReferenceModel:
        key = self.key(manifest)
        if key not in self._models:
            model_type, path, seed = reference_weights(manifest, self.checkpoint)
            sam, source = load_model(model_type, path, seed)
            self._models[key] = ReferenceModel(key, sam, source, ReferencePredictor(sam, manifest.config.num_points))
        return self._models[key]
