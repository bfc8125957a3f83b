"""The validate stage: every artifact of a run in its own runtime, and every encoder-decoder pair
of a target end to end, scored against PyTorch (and the SAM teacher when given).

Finds the manifests under the output folder, rebuilds the PyTorch reference from the weights
each manifest names (checked by sha256), loads every artifact through its target's runner and
measures agreement on real photos, size, warm latency and memory. Every failure is isolated:
one line in its file's, pair's or target's entry, and the others are still validated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mobile_targets import get_target, load_artifact_runner
from pipeline.checkpoints import load_model
from pipeline.contract import (
    BATCHED_DECODER,
    DECODER,
    ENCODER,
    decoder_contract,
    encoder_contract,
    prompts_per_call,
)
from pipeline.datasets import Photos
from pipeline.errors import ArtifactError, PipelineError, one_line
from pipeline.locking import reading
from pipeline.manifest import (
    ArtifactRecord,
    Manifest,
    find_manifests,
    read_manifest,
    verify_artifact,
    verify_travelling_files,
)
from pipeline.predictor import BatchedDecoder, NamedRunner, ReferencePredictor, stack_prompts
from pipeline.provenance import command_line
from pipeline.threads import torch_threads
from validation.baselines import (
    compute_floor,
    onnx_runtime_latency,
    reset_peak_memory,
    resident_memory_mb,
    time_call,
)
from validation.crosscheck import cross_check
from validation.everything import everything_pairs, reference_masks, score_everything
from validation.gates import DEFAULT_GATES, Gate, gate_failures, looser_gate
from validation.reference import ReferenceImage, ReferenceModels, ValidationSettings, build_reference
from validation.schema import (
    ArtifactResult,
    Baselines,
    ComputeFloor,
    EverythingResult,
    Fp16HeadroomResult,
    GateResult,
    Latency,
    Memory,
    NeuralEngineResult,
    PairResult,
    Report,
    RunResult,
    SelftestScores,
)
from validation.scoring import OVERLAY_IMAGES, overlay_case, pytorch_against_teacher, score_encoder, score_prompts

__all__ = ["ValidationSettings", "validate_run"]


@dataclass(frozen=True)
class TeacherSpec:
    """`validate --teacher-checkpoint PATH --teacher-type vit_h`: SAM on the same photos and prompts."""

    checkpoint: Path
    model_type: str = "vit_h"


@contextmanager
def timed(seconds: dict[str, float], section: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[section]`: the report says where a run's time went."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[section] = seconds.get(section, 0.0) + time.perf_counter() - start


def time_runs(run: Callable[[], object], settings: ValidationSettings) -> Latency:
    return time_call(run, settings.warmup_runs, settings.latency_runs)


def timed_reference(references: list[ReferenceImage]) -> ReferenceImage:
    """The photo latencies are timed on: the first with a prompt (a photo can have no instance)."""
    return next(reference for reference in references if reference.cases)


@dataclass
class LoadedArtifact:
    """A validated file kept for the pairs: its runner, and for an encoder its embeddings."""

    record: ArtifactRecord
    result: ArtifactResult
    runner: NamedRunner | None = None
    embeddings: list[np.ndarray] | None = None


def validate_artifact(
    manifest_path: Path,
    manifest: Manifest,
    record: ArtifactRecord,
    references: list[ReferenceImage],
    settings: ValidationSettings,
    overlays: dict[int, np.ndarray] | None = None,
) -> LoadedArtifact:
    """Load, run and score one file; any failure on the way is one line in `result.error`."""
    result = ArtifactResult(
        target=record.target,
        part=record.part,
        precision=record.precision,
        file=str(Path(manifest_path).parent / record.file),
        bytes=record.bytes,
        fp16_headroom=Fp16HeadroomResult.of(record.details.fp16_headroom),
        neural_engine=NeuralEngineResult.of(record.details.neural_engine),
    )
    loaded = LoadedArtifact(record, result)
    reason = get_target(record.target).selftest_only(record.part, record.precision)
    if reason is not None:
        try:
            result.selftest_only = recorded_selftest(manifest_path, record, reason)
        except PipelineError as error:
            result.error = str(error)
        return loaded
    stage = "loading"
    try:
        before = resident_memory_mb()
        memory_resets = reset_peak_memory()
        start = time.perf_counter()
        runner = load_artifact_runner(manifest_path, manifest, record, settings.threads)
        result.load_s = time.perf_counter() - start
        stage = "running"
        first = timed_reference(references)
        if record.part == ENCODER:
            result.encoder, loaded.embeddings = score_encoder(runner, references, result.non_finite_outputs)
            example = first.prepared.encoder_inputs()
        elif record.part == BATCHED_DECODER:
            batch = prompts_per_call(manifest.contract(BATCHED_DECODER))
            result.decoder = score_prompts(BatchedDecoder(runner, batch), references, None, result.non_finite_outputs)
            rows = [{"image_embeddings": first.embeddings, **case.inputs} for case in first.cases[:batch]]
            example = stack_prompts(rows, batch)
        else:
            result.decoder = score_prompts(runner, references, None, result.non_finite_outputs, overlays)
            example = {"image_embeddings": first.embeddings, **first.cases[0].inputs}
        stage = "timing"
        if not (record.part == BATCHED_DECODER and get_target(record.target).emulation_note()):
            result.latency = time_runs(lambda: runner.run(example), settings)  # emulated B-row calls: minutes
        loaded.runner = runner
    except Exception as error:  # a runtime's failure is this file's row, never the whole stage
        result.error = str(error) if isinstance(error, PipelineError) else f"{stage} failed: {one_line(error)}"
        result.encoder = result.decoder = None
        return loaded
    after = resident_memory_mb()
    if before and after and memory_resets:
        result.memory = Memory(before["rss_mb"], after["peak_rss_mb"], after["peak_rss_mb"] - before["rss_mb"])
    return loaded


def recorded_selftest(manifest_path: Path, record: ArtifactRecord, reason: str) -> SelftestScores:
    """What the file measured on its self-test vectors in its runtime when converted, after checking
    that the file and its vectors are still the ones the manifest recorded."""
    verify_artifact(manifest_path, record)
    verify_travelling_files(manifest_path, record)
    info = record.details.selftest
    if info is None or not info.measured.get("psnr_db_min"):
        raise ArtifactError(f"{record.file}: no self-test measurement in the manifest to score it by")
    return SelftestScores(
        reason=reason,
        cases=tuple(info.cases),
        psnr_db_min={name: float(value) for name, value in info.measured["psnr_db_min"].items()},
        mask_iou_min=info.measured.get("mask_iou_min"),
    )


def validate_pairs(
    target: str, loaded: list[LoadedArtifact], references: list[ReferenceImage], gates: dict[str, Gate]
) -> list[PairResult]:
    """Every encoder file into every decoder file of one target, photo to mask, against PyTorch."""
    encoders = [a for a in loaded if a.record.part == ENCODER]
    decoders = [a for a in loaded if a.record.part == DECODER]
    pairs = []
    for encoder in encoders:
        for decoder in decoders:
            pair = PairResult(
                target=target,
                encoder_file=encoder.result.file,
                decoder_file=decoder.result.file,
                encoder_precision=encoder.record.precision,
                decoder_precision=decoder.record.precision,
                bytes=encoder.record.bytes + decoder.record.bytes,
            )
            scoped = encoder.result.selftest_only or decoder.result.selftest_only
            if scoped is not None:  # listed with why, no gate: its files are scored on their vectors
                pair.not_run = scoped.reason
                pairs.append(pair)
                continue
            if encoder.embeddings is None or decoder.runner is None:
                pair.error = f"not run: {encoder.result.error or decoder.result.error}"
            else:
                try:
                    pair.decoder = score_prompts(
                        decoder.runner, references, encoder.embeddings, pair.non_finite_outputs
                    )
                except Exception as error:  # one pair's failure never stops the others
                    pair.error = f"running failed: {one_line(error)}"
            gate = looser_gate(gates[pair.encoder_precision], gates[pair.decoder_precision])
            failures = gate_failures(pair, gate)
            pair.gate = GateResult(not failures, tuple(failures))
            pairs.append(pair)
    return pairs


def validate_everything(
    manifest: Manifest,
    loaded: list[LoadedArtifact],
    references: list[ReferenceImage],
    photos: Photos,
    sam: torch.nn.Module,
    cache: dict,
    settings: ValidationSettings,
) -> list[EverythingResult]:
    """Each batched decoder file with its encoder as the automatic mask generator, against
    SamAutomaticMaskGenerator (computed once per weights, kept in `cache`)."""
    pairs = everything_pairs(loaded)
    if not pairs or not settings.everything_points_per_side:
        return []
    images = {reference.image_id: photos.image(reference.image_id) for reference in references}
    if "masks" not in cache:
        cache["masks"] = reference_masks(sam, images, settings.everything_points_per_side)
    batch = prompts_per_call(manifest.contract(BATCHED_DECODER))
    results = []
    for encoder, decoder in tqdm(pairs, desc=f"{manifest.target} segment everything", unit="pair"):
        results += score_everything(
            manifest.target,
            encoder,
            decoder,
            batch,
            manifest.config.num_points,
            images,
            cache["masks"],
            settings.everything_points_per_side,
        )
    return results


def baseline_latencies(predictor: ReferencePredictor, first: ReferenceImage, settings: ValidationSettings) -> Baselines:
    """PyTorch eager fp32 and ONNX Runtime fp32 of the same two modules, and the compute floor."""
    image = torch.from_numpy(first.prepared.image)
    decoder_inputs = {"image_embeddings": first.embeddings, **first.cases[0].inputs}
    with torch.inference_mode():
        encoder = time_runs(lambda: predictor.encoder_module(image), settings)
    decoder = time_runs(lambda: predictor.decoder.run(decoder_inputs), settings)
    encoder_spec, decoder_spec = encoder_contract(), decoder_contract(predictor.num_points)
    parts = {
        "image_encoder": (
            predictor.encoder_module,
            encoder_spec.input_names,
            encoder_spec.output_names,
            first.prepared.encoder_inputs(),
        ),
        "prompt_decoder": (
            predictor.decoder_module,
            decoder_spec.input_names,
            decoder_spec.output_names,
            decoder_inputs,
        ),
    }
    onnx = onnx_runtime_latency(parts, settings.threads, lambda run: asdict(time_runs(run, settings)))
    onnx_latency: dict[str, Latency | str] = {}
    for part, value in onnx.items():
        if isinstance(value, dict) and "median_s" in value:
            onnx_latency[part] = Latency(**value)
        else:
            onnx_latency[part] = value.get("error", "failed") if isinstance(value, dict) else str(value)
    floor = compute_floor(predictor.encoder_module, image, settings.threads)
    return Baselines(
        pytorch={"image_encoder": encoder, "prompt_decoder": decoder},
        onnxruntime=onnx_latency,
        compute_floor=ComputeFloor(**floor),
    )


def validate_run(
    out_dir: Path,
    photos: Photos,
    settings: ValidationSettings,
    gates: dict[str, Gate] | None = None,
    overlays: dict[str, dict[int, np.ndarray]] | None = None,
    checkpoint: Path | None = None,
    teacher: TeacherSpec | None = None,
) -> Report:
    """The report; when `overlays` is given it receives masks for the HTML report, keyed by
    "<target> pytorch" or "<target> <part> <precision>", then by image id.

    A corrupt manifest, weights that changed, or a reference that cannot be built is one line in
    that run's entry; the other runs are still validated."""
    manifests = find_manifests(out_dir)
    if not manifests:
        raise PipelineError(
            f"no manifests under {out_dir}; run a convert session first (expected {out_dir}/<target>/manifest.json)"
        )
    for image_id in photos.image_ids()[: settings.max_images]:
        photos.image(image_id)  # a photo that cannot be read is the whole stage's bad input: one line, exit 2
    with (
        reading([m.parent for m in manifests], "a validate run"),
        torch_threads(settings.threads),
    ):  # restored after: later PyTorch results in this process stay the same
        gates = gates or DEFAULT_GATES
        teacher_predictor = None
        if teacher is not None:  # bad teacher input is the whole stage's: one line, exit 2
            teacher_sam, teacher_source = load_model(teacher.model_type, teacher.checkpoint)
            teacher_predictor = ReferencePredictor(teacher_sam)
        report = Report(
            command=command_line(),
            settings=asdict(settings),
            photos=photos.describe(),
            ground_truth=photos.has_ground_truth,
            gates={precision: asdict(gate) for precision, gate in gates.items()},
            teacher=None if teacher is None else f"SAM {teacher.model_type}, {teacher_source.describe()}",
        )
        reference_runs: dict[str, tuple] = {}
        models = ReferenceModels(checkpoint)
        validated: dict[str, Manifest] = {}
        results: dict[tuple[str, str, str], ArtifactResult] = {}
        embeddings: dict[tuple[str, str], list[np.ndarray]] = {}
        for manifest_path in manifests:
            run = RunResult(manifest=str(manifest_path), target=manifest_path.parent.name)
            try:
                manifest = read_manifest(manifest_path)
                run.target = manifest.target
                target = get_target(manifest.target)  # an unknown target name is this run's error
                key = models.key(manifest)  # weights that changed since conversion: this run's error
                if key not in reference_runs:  # targets converted from the same weights share one reference
                    model = models.get(manifest)
                    sam, source, predictor = model.sam, model.source, model.predictor
                    if teacher_predictor is not None:
                        teacher_predictor.num_points = predictor.num_points
                    with timed(report.seconds, "PyTorch reference"):
                        references = build_reference(predictor, photos, settings, teacher_predictor)
                    if not any(ref.cases for ref in references):
                        raise PipelineError(f"no prompts could be made from {photos.describe()}")
                    with timed(report.seconds, "baselines"):
                        baselines = (
                            baseline_latencies(predictor, timed_reference(references), settings)
                            if settings.baselines
                            else Baselines()
                        )
                    reference_runs[key] = (source, references, baselines, sam, {})
            except Exception as error:  # this run's error; the other targets are still validated
                run.error = str(error) if isinstance(error, PipelineError) else one_line(error)
                report.runs.append(run)
                continue
            source, references, run.baselines, sam, everything_reference = reference_runs[key]
            run.runtime = target.runtime_name
            run.emulated = target.emulation_note()
            run.weights = source.describe()
            run.random_weights = source.is_random
            run.conversion_failures = [failure.model_dump() for failure in manifest.failures]
            run.not_made = [item.model_dump() for item in manifest.not_made]
            run.prompt_cases = [asdict(c.case) for ref in references for c in ref.cases]
            run.teacher = pytorch_against_teacher(references)
            if overlays is not None:
                overlays[f"{manifest.target} pytorch"] = {
                    ref.image_id: drawn.expected.mask
                    for ref in references[:OVERLAY_IMAGES]
                    if (drawn := overlay_case(ref)) is not None
                }
            loaded = []
            for record in tqdm(manifest.artifacts, desc=f"{manifest.target} artifacts", unit="file"):
                sink = None
                if overlays is not None and record.part == "prompt_decoder":
                    sink = overlays.setdefault(f"{record.target} {record.part} {record.precision}", {})
                with timed(report.seconds, f"{manifest.target}: files"):
                    artifact = validate_artifact(manifest_path, manifest, record, references, settings, sink)
                gate = gates.get(record.precision)
                failures = (
                    gate_failures(artifact.result, gate) if gate else [f"no gate for precision {record.precision!r}"]
                )
                artifact.result.gate = GateResult(not failures, tuple(failures))
                run.artifacts.append(artifact.result)
                loaded.append(artifact)
                results[(record.target, record.part, record.precision)] = artifact.result
                if artifact.embeddings is not None:
                    embeddings[(record.target, record.precision)] = artifact.embeddings
            validated[manifest.target] = manifest
            known = [a for a in loaded if a.record.precision in gates]
            with timed(report.seconds, f"{manifest.target}: pairs"):
                report.pairs += validate_pairs(manifest.target, known, references, gates)
            with timed(report.seconds, f"{manifest.target}: segment everything"):
                report.everything += validate_everything(
                    manifest, loaded, references, photos, sam, everything_reference, settings
                )
            report.runs.append(run)
        report.crosscheck = cross_check(validated, results, embeddings, gates)
        return report
