"""What the try-out page computes, without any web code: the files under a convert folder, the
PyTorch reference of the weights they came from, and one click's answer from both.

Every prediction goes through `pipeline.predictor.Segmenter` (the app-side chain the validate
stage scores), so what the page shows is what the Python API gives for the same file and click.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobile_targets import load_artifact_runner
from pipeline.contract import BATCHED_DECODER, DECODER, ENCODER, prompts_per_call
from pipeline.errors import PipelineError
from pipeline.manifest import ArtifactRecord, Manifest, find_manifests, read_manifest
from pipeline.metrics import mask_iou
from pipeline.predictor import NamedRunner, Prediction, ReferencePredictor, Segmenter, embed
from pipeline.processing import PreparedImage, Prompt, default_multimask, prepare_image
from pipeline.segment_everything import AutomaticMaskGenerator
from validation.reference import ReferenceModels

MAX_SIDE = 2048
"""Photos with a longer side are downscaled to it (with a note): the encoder sees 1024 anyway."""


@dataclass(frozen=True)
class FileChoice:
    """One converted file the page offers."""

    manifest_path: Path
    manifest: Manifest
    record: ArtifactRecord

    @property
    def label(self) -> str:
        return f"{self.record.target} {self.record.precision}: {Path(self.record.file).name}"

    @property
    def path(self) -> Path:
        return self.manifest_path.parent / self.record.file


@dataclass
class Clicks:
    """The prompt so far: points (photo pixels) with labels, an optional box, and each side's
    previous best low-res mask (fed back as mask_input on the next click, as SamPredictor does)."""

    points: list[tuple[float, float, int]] = field(default_factory=list)
    box_corner: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None
    previous: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return len(self.points) + (2 if self.box else 0)

    def prompt(self, side: str) -> Prompt:
        points = np.array([(x, y) for x, y, _ in self.points], np.float32) if self.points else None
        labels = np.array([label for _, _, label in self.points], np.float32) if self.points else None
        box = np.array(self.box, np.float32) if self.box else None
        return Prompt(points=points, labels=labels, box=box, mask_input=self.previous.get(side))


@dataclass(frozen=True)
class Answer:
    """One click's result from PyTorch and from the chosen pair of files."""

    pytorch: Prediction
    file: Prediction
    multimask: bool
    iou: float
    encoder_ms: float | None
    """The file encoder's latency when this click encoded the photo (None: embeddings reused)."""
    decoder_ms: float
    pytorch_decoder_ms: float

    def details(self) -> dict:
        return {
            "mask_iou_file_vs_pytorch": self.iou,
            "file_mask_sha256": mask_digest(self.file.mask),
            "file_mask_rle": mask_rle(self.file.mask),
            "pytorch_mask_sha256": mask_digest(self.pytorch.mask),
            "file_mask_pixels": int(self.file.mask.sum()),
            "selected_output": self.file.selected,
            "encoder_ms": self.encoder_ms,
            "decoder_ms": self.decoder_ms,
            "pytorch_decoder_ms": self.pytorch_decoder_ms,
        }


def mask_digest(mask: np.ndarray) -> str:
    """A short fingerprint of a boolean mask (what the browser test compares with the Python API)."""
    return hashlib.sha256(np.packbits(mask.astype(bool)).tobytes() + str(mask.shape).encode()).hexdigest()[:16]


def mask_rle(mask: np.ndarray) -> dict:
    """The mask as COCO RLE (what the browser test decodes and compares pixel by pixel)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def fit_photo(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The photo the page works on, and a note when it was downscaled."""
    height, width = image.shape[:2]
    if max(height, width) <= MAX_SIDE:
        return image, None
    from PIL import Image

    scale = MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return resized, f"photo downscaled from {width}x{height} to {size[0]}x{size[1]} (longest side {MAX_SIDE})"


class TryoutEngine:
    """The files under `out`, their PyTorch reference, and cached runners and embeddings."""

    def __init__(self, out: Path, checkpoint: Path | None = None, threads: int | None = 2) -> None:
        self.out, self.checkpoint, self.threads = Path(out), checkpoint, threads
        manifests = find_manifests(self.out)
        if not manifests:
            raise PipelineError(f"no manifests under {self.out}; run a convert session first")
        self.files: dict[str, FileChoice] = {}
        for manifest_path in manifests:
            manifest = read_manifest(manifest_path)
            for record in manifest.artifacts:
                choice = FileChoice(manifest_path, manifest, record)
                self.files[choice.label] = choice
        self._runners: dict[tuple[str, int, int], NamedRunner] = {}
        self._references = ReferenceModels(checkpoint)
        self._photo: tuple[str, PreparedImage] | None = None
        self._embeddings: dict[str, np.ndarray] = {}
        """Embeddings of the current photo by owner: one photo at a time."""

    def labels(self, part: str, target: str | None = None) -> list[str]:
        return [
            label
            for label, choice in self.files.items()
            if choice.record.part == part and (target is None or choice.record.target == target)
        ]

    def choice(self, label: str | None, part: str) -> FileChoice:
        if not label or label not in self.files:
            raise PipelineError(f"pick a {part.replace('_', ' ')} file")
        return self.files[label]

    def runner(self, choice: FileChoice) -> NamedRunner:
        """The file in its runtime, checked against its manifest's sha256 whenever it changed on disk."""
        stat = choice.path.stat() if choice.path.exists() else None
        key = (str(choice.path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
        if key not in self._runners:
            self._runners[key] = load_artifact_runner(
                choice.manifest_path, choice.manifest, choice.record, self.threads
            )
        return self._runners[key]

    def reference(self, choice: FileChoice) -> ReferencePredictor:
        """PyTorch on the weights the file was converted from (sha256 checked, or the recorded seed)."""
        return self._references.get(choice.manifest).predictor

    def _prepared(self, photo_key: str, image: np.ndarray) -> PreparedImage:
        """The photo resized and padded once; a new photo drops the last one's embeddings."""
        if self._photo is None or self._photo[0] != photo_key:
            self._photo = (photo_key, prepare_image(image))
            self._embeddings = {}
        return self._photo[1]

    def _embed(self, runner: NamedRunner, owner: str, prepared: PreparedImage) -> tuple[np.ndarray, float | None]:
        """The photo's embeddings by `owner` (a file's label or PyTorch), and the encoder's ms when run now."""
        if owner in self._embeddings:
            return self._embeddings[owner], None
        start = time.perf_counter()
        embeddings = embed(runner, prepared)
        self._embeddings[owner] = embeddings
        return embeddings, (time.perf_counter() - start) * 1000

    def predict(self, image: np.ndarray, photo_key: str, clicks: Clicks, encoder: str, decoder: str) -> Answer:
        encoder_choice, decoder_choice = self.choice(encoder, ENCODER), self.choice(decoder, DECODER)
        if encoder_choice.record.target != decoder_choice.record.target:
            raise PipelineError("pick an encoder and a decoder of the same target (their pairs are what ships)")
        num_points = decoder_choice.manifest.config.num_points
        if clicks.slots > num_points:
            raise PipelineError(
                f"{clicks.slots} prompt slots (points, and 2 for a box) but this decoder file takes {num_points}; "
                "press Reset prompts"
            )
        if clicks.slots == 0:
            raise PipelineError("click on the photo to add a point")
        reference = self.reference(decoder_choice)
        file_encoder, file_decoder = self.runner(encoder_choice), self.runner(decoder_choice)
        prepared = self._prepared(photo_key, image)
        file_embeddings, encoder_ms = self._embed(file_encoder, encoder_choice.label, prepared)
        torch_embeddings, _ = self._embed(reference.encoder, "pytorch", prepared)
        pytorch_side = Segmenter(reference.decoder, num_points=num_points)
        pytorch_side.set_embeddings(prepared, torch_embeddings)
        file_side = Segmenter(file_decoder, num_points=num_points)
        file_side.set_embeddings(prepared, file_embeddings)
        multimask = default_multimask(clicks.prompt("file"))
        start = time.perf_counter()
        expected = pytorch_side.predict(clicks.prompt("pytorch"), multimask)
        pytorch_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        actual = file_side.predict(clicks.prompt("file"), multimask)
        decoder_ms = (time.perf_counter() - start) * 1000
        clicks.previous = {"pytorch": expected.best_low_res_mask, "file": actual.best_low_res_mask}
        return Answer(
            expected, actual, multimask, mask_iou(expected.mask, actual.mask), encoder_ms, decoder_ms, pytorch_ms
        )

    def batched_decoder(self, encoder: str) -> FileChoice | None:
        """The batched decoder of the encoder's target and precision (or fp32), if converted."""
        target = self.choice(encoder, ENCODER).record
        candidates = {
            c.record.precision: c
            for c in self.files.values()
            if c.record.target == target.target and c.record.part == BATCHED_DECODER
        }
        return candidates.get(target.precision) or candidates.get("fp32")

    def segment_everything(
        self, image: np.ndarray, encoder: str, points_per_side: int
    ) -> tuple[list[dict], FileChoice, float]:
        encoder_choice = self.choice(encoder, ENCODER)
        decoder_choice = self.batched_decoder(encoder)
        if decoder_choice is None:
            raise PipelineError(
                f"no batched decoder file for {encoder_choice.record.target}; convert with --batch-prompts 64"
            )
        batch = prompts_per_call(decoder_choice.manifest.contract(BATCHED_DECODER))
        generator = AutomaticMaskGenerator.over(
            self.runner(encoder_choice),
            self.runner(decoder_choice),
            batch,
            decoder_choice.manifest.config.num_points,
            points_per_side=points_per_side,
        )
        start = time.perf_counter()
        records = generator.generate(image)
        return records, decoder_choice, time.perf_counter() - start
