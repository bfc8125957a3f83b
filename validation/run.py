"""The validate stage: every artifact of a run in its own runtime, scored against PyTorch.

Finds the manifests under the output folder, rebuilds the PyTorch reference from the weights
each manifest names, loads every artifact through its target's runner, and measures agreement
on real photos with prompts derived from ground-truth masks, plus size and warm latency.
A missing or corrupt artifact becomes one line in the report; the others are still validated.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mobile_targets import get_target
from pipeline.checkpoints import load_model
from pipeline.contract import decoder_contract, encoder_contract
from pipeline.datasets import Photos
from pipeline.errors import ArtifactError, PipelineError, one_line
from pipeline.files import sha256_file
from pipeline.manifest import ArtifactRecord, Manifest, find_manifests, read_manifest, verify_artifact
from pipeline.metrics import cosine_similarity, count_non_finite, mask_iou, max_abs_error, psnr_db, require_finite
from pipeline.predictor import Prediction, ReferencePredictor
from pipeline.processing import PreparedImage, prompt_to_decoder_inputs, select_mask_index, upscale_masks
from validation.baselines import compute_floor, onnx_runtime_latency, reset_peak_memory, resident_memory_mb
from validation.gates import DEFAULT_GATES, Gate, gate_failures
from validation.prompts import PromptCase, cases_around_mask, grid_point_cases, prompt_cases

REPORT_SCHEMA_VERSION = 1

CONFIDENT_MARGIN_IN_STD = 1.0
"""The 'confident' IoU counts only pixels whose PyTorch logit is farther than this many standard
deviations (of that mask's logits) from 0. With random weights the logits hug 0 (std about 0.1)
and fp16/int8 rounding flips signs there without any conversion bug; a fixed margin such as
0.5 would leave no pixel at all. With no confident pixel the value is NaN, never a free 1.0."""


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


@dataclass
class ReferenceImage:
    image_id: int
    prepared: PreparedImage
    embeddings: np.ndarray
    cases: list[tuple[PromptCase, dict[str, np.ndarray], Any]]  # case, decoder inputs, Prediction
    ground_truth: dict[int, np.ndarray]  # annotation id -> instance mask (empty without ground truth)


def reference_case(
    predictor: ReferencePredictor, case: PromptCase, where: Path
) -> tuple[PromptCase, dict[str, np.ndarray], Prediction]:
    """PyTorch's prediction for one prompt on the photo set in `predictor`, checked finite."""
    prediction = predictor.predict(case.prompt(), multimask_output=case.multimask)
    for name in ("low_res_masks", "iou_predictions"):
        require_finite(getattr(prediction, name), f"PyTorch's {name} for {where} ({case.kind} prompt)")
    inputs = prompt_to_decoder_inputs(case.prompt(), predictor.prepared.original_size, predictor.num_points)
    return case, inputs, prediction


def build_reference(
    predictor: ReferencePredictor, photos: Photos, settings: ValidationSettings
) -> list[ReferenceImage]:
    """PyTorch's embeddings and predictions for every photo and prompt.

    With ground truth, the five prompt kinds per instance; without (a user's own photos),
    seeded grid points and boxes around PyTorch's own masks. A non-finite PyTorch output is one
    line: nothing can be scored against it."""
    references = []
    for image_id in tqdm(photos.image_ids()[: settings.max_images], desc="PyTorch reference", unit="photo"):
        where = photos.image_path(image_id)
        embeddings = predictor.set_image(photos.image(image_id))
        require_finite(embeddings, f"PyTorch's image_embeddings for {where}")
        cases = []
        ground_truth = {}
        if photos.has_ground_truth:
            for instance in photos.instances(image_id)[: settings.instances_per_image]:
                if instance.mask.sum() == 0:
                    continue
                ground_truth[instance.annotation_id] = instance.mask
                for case in prompt_cases(
                    image_id, instance.annotation_id, instance.mask, instance.bbox, settings.prompt_seed
                ):
                    cases.append(reference_case(predictor, case, where))
        else:
            size = predictor.prepared.original_size
            for point_case in grid_point_cases(image_id, size, settings.instances_per_image, settings.prompt_seed):
                cases.append(reference_case(predictor, point_case, where))
                for case in cases_around_mask(point_case, cases[-1][2].mask):
                    cases.append(reference_case(predictor, case, where))
        references.append(ReferenceImage(image_id, predictor.prepared, embeddings, cases, ground_truth))
    return references


def time_runs(run: Callable[[], object], settings: ValidationSettings) -> dict[str, float]:
    for _ in range(settings.warmup_runs):
        run()
    seconds = []
    for _ in range(settings.latency_runs):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(seconds),
        "p90_s": float(np.percentile(seconds, 90)),
        "runs": settings.latency_runs,
    }


def score_encoder(runner, references: list[ReferenceImage], non_finite: dict[str, int]) -> dict[str, Any]:
    rows = []
    for reference in references:
        embeddings = runner.run({"image": reference.prepared.image})["image_embeddings"]
        non_finite["image_embeddings"] = non_finite.get("image_embeddings", 0) + count_non_finite(embeddings)
        rows.append(
            {
                "psnr_db": psnr_db(reference.embeddings, embeddings),
                "max_abs_error": max_abs_error(reference.embeddings, embeddings),
                "cosine": cosine_similarity(reference.embeddings, embeddings),
            }
        )
    return {
        "embeddings": {
            "psnr_db_min": nan_min([r["psnr_db"] for r in rows]),
            "max_abs_error": nan_max([r["max_abs_error"] for r in rows]),
            "cosine_min": nan_min([r["cosine"] for r in rows]),
        },
        "images": len(rows),
    }


def confident_pixels(teacher_logits: np.ndarray) -> np.ndarray:
    return np.abs(teacher_logits) > CONFIDENT_MARGIN_IN_STD * float(np.std(teacher_logits))


def confident_iou(teacher_mask: np.ndarray, test_mask: np.ndarray, confident: np.ndarray) -> float | None:
    """IoU over confident pixels only; None (undefined, left out) where no confident pixel is
    foreground in either mask. Never NaN: NaN is kept for broken numbers, which fail."""
    union = np.logical_or(teacher_mask, test_mask) & confident
    if not union.any():
        return None
    return float((teacher_mask & test_mask & confident).sum() / union.sum())


def nan_min(values: list[float]) -> float:
    """min where any NaN makes the result NaN (a failure), never a value to skip."""
    array = np.asarray(values, dtype=np.float64)
    return float("nan") if array.size == 0 or np.isnan(array).any() else float(array.min())


def nan_max(values: list[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    return float("nan") if array.size == 0 or np.isnan(array).any() else float(array.max())


def _summary(values: list[float | None]) -> dict[str, float] | None:
    """mean, min and 5th percentile over the prompts where the value is defined (not None).

    A NaN is a failure, not a value to skip: it makes mean, min and p5 NaN, which no gate
    passes. None when no prompt defines the value (e.g. no ground truth)."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if defined.size == 0:
        return None
    if np.isnan(defined).any():
        return {"mean": float("nan"), "min": float("nan"), "p5": float("nan"), "defined": int(defined.size)}
    return {
        "mean": float(defined.mean()),
        "min": float(defined.min()),
        "p5": float(np.percentile(defined, 5)),
        "defined": int(defined.size),
    }


OVERLAY_KINDS = ("box_point", "mask_box_point")
OVERLAY_IMAGES = 3
"""The HTML report shows, for the first photos, the first box+point prompt's mask."""


def is_overlay_case(reference_index: int, reference: ReferenceImage, case: PromptCase) -> bool:
    first = next((c for c, _, _ in reference.cases if c.kind in OVERLAY_KINDS), None)
    return reference_index < OVERLAY_IMAGES and case is first


def score_decoder(
    runner, references: list[ReferenceImage], non_finite: dict[str, int], overlays: dict | None = None
) -> dict[str, Any]:
    """Agreement per prompt kind; the overlay cases' masks go into `overlays` (image id -> mask)."""
    per_kind: dict[str, dict[str, list[float]]] = {}
    for index, reference in enumerate(references):
        for case, inputs, expected in reference.cases:
            outputs = runner.run({"image_embeddings": reference.embeddings, **inputs})
            for name in ("low_res_masks", "iou_predictions"):
                non_finite[name] = non_finite.get(name, 0) + count_non_finite(outputs[name])
            logits = upscale_masks(
                outputs["low_res_masks"], reference.prepared.input_size, reference.prepared.original_size
            )
            selected = select_mask_index(outputs["iou_predictions"], case.multimask)
            if overlays is not None and is_overlay_case(index, reference, case):
                overlays[reference.image_id] = logits[selected] > 0
            confident = confident_pixels(expected.mask_logits[expected.selected])
            truth = reference.ground_truth.get(case.annotation_id)
            row = per_kind.setdefault(case.kind, {})
            for key, value in (
                ("ground_truth_iou_pytorch", None if truth is None else mask_iou(truth, expected.mask)),
                ("ground_truth_iou_artifact", None if truth is None else mask_iou(truth, logits[selected] > 0)),
                ("logits_cosine", cosine_similarity(expected.low_res_masks, outputs["low_res_masks"])),
                ("iou_predictions_psnr_db", psnr_db(expected.iou_predictions, outputs["iou_predictions"])),
                ("iou_predictions_cosine", cosine_similarity(expected.iou_predictions, outputs["iou_predictions"])),
                ("mask_iou", mask_iou(expected.mask, logits[selected] > 0)),
                (
                    "mask_iou_all4",
                    float(np.mean([mask_iou(expected.mask_logits[i] > 0, logits[i] > 0) for i in range(4)])),
                ),
                ("mask_iou_confident", confident_iou(expected.mask, logits[expected.selected] > 0, confident)),
                ("same_index", float(selected == expected.selected)),
                ("logits_psnr_db", psnr_db(expected.low_res_masks, outputs["low_res_masks"])),
                ("logits_max_abs_error", max_abs_error(expected.low_res_masks, outputs["low_res_masks"])),
                ("iou_predictions_max_abs_error", max_abs_error(expected.iou_predictions, outputs["iou_predictions"])),
            ):
                row.setdefault(key, []).append(value)
    return {
        kind: {
            "prompts": len(values["mask_iou"]),
            "mask_iou": _summary(values["mask_iou"]),
            "mask_iou_all4": _summary(values["mask_iou_all4"]),
            "mask_iou_confident": _summary(values["mask_iou_confident"]),
            "same_index_rate": float(np.mean(values["same_index"])),
            "logits_psnr_db_min": nan_min(values["logits_psnr_db"]),
            "logits_max_abs_error": nan_max(values["logits_max_abs_error"]),
            "iou_predictions_max_abs_error": nan_max(values["iou_predictions_max_abs_error"]),
            "logits_cosine_min": nan_min(values["logits_cosine"]),
            "iou_predictions_psnr_db_min": nan_min(values["iou_predictions_psnr_db"]),
            "iou_predictions_cosine_min": nan_min(values["iou_predictions_cosine"]),
            "ground_truth_iou": {
                "pytorch": _summary(values["ground_truth_iou_pytorch"]),
                "artifact": _summary(values["ground_truth_iou_artifact"]),
            },
        }
        for kind, values in per_kind.items()
    }


def validate_artifact(
    manifest_path: Path,
    manifest: Manifest,
    record: ArtifactRecord,
    references: list[ReferenceImage],
    settings: ValidationSettings,
    overlays: dict | None = None,
) -> dict[str, Any]:
    """Load, run and score one file; any failure on the way is one line under "error", so the
    other files are still validated."""
    result: dict[str, Any] = {
        "target": record.target,
        "part": record.part,
        "precision": record.precision,
        "file": str(Path(manifest_path).parent / record.file),
        "bytes": record.bytes,
    }
    stage = "loading"
    try:
        path = verify_artifact(manifest_path, record)
        if record.part not in ("image_encoder", "prompt_decoder"):
            raise ArtifactError(f"{manifest_path}: unknown part {record.part!r}")
        contract = (
            encoder_contract() if record.part == "image_encoder" else decoder_contract(manifest.config["num_points"])
        )
        before = resident_memory_mb()
        memory_resets = reset_peak_memory()
        start = time.perf_counter()
        options = manifest.config.get("target_options", {}).get(record.target, {})
        runner = get_target(record.target).with_options(options).load_runner(path, contract, threads=settings.threads)
        result["load_s"] = time.perf_counter() - start
        stage = "running"
        non_finite: dict[str, int] = {}
        first = references[0]
        if record.part == "image_encoder":
            result["agreement"] = score_encoder(runner, references, non_finite)
            example = {"image": first.prepared.image}
        else:
            result["agreement"] = score_decoder(runner, references, non_finite, overlays)
            example = {"image_embeddings": first.embeddings, **first.cases[0][1]}
        result["non_finite_outputs"] = non_finite
        stage = "timing"
        result["latency"] = time_runs(lambda: runner.run(example), settings)
    except Exception as error:  # a runtime's failure is this file's row, never the whole stage
        message = str(error) if isinstance(error, PipelineError) else f"{stage} failed: {one_line(error)}"
        result["error"] = message
        result.pop("agreement", None)
        return result
    after = resident_memory_mb()
    if before and after and memory_resets:
        result["memory"] = {"rss_before_mb": before["rss_mb"], "peak_rss_mb": after["peak_rss_mb"]}
        result["memory"]["peak_increase_mb"] = after["peak_rss_mb"] - before["rss_mb"]
    return result


NO_BASELINES: dict[str, Any] = {"pytorch": {}, "onnxruntime": {}, "compute_floor": None}
"""What a run records when baselines are off (--skip-baselines): no ratios, no floor."""


def baseline_latencies(
    predictor: ReferencePredictor, first: ReferenceImage, settings: ValidationSettings
) -> dict[str, Any]:
    """PyTorch eager fp32 and ONNX Runtime fp32 of the same two modules, and the compute floor."""
    image = torch.from_numpy(first.prepared.image)
    decoder_inputs = {"image_embeddings": first.embeddings, **first.cases[0][1]}
    with torch.inference_mode():
        encoder = time_runs(lambda: predictor.encoder(image), settings)
    decoder = time_runs(lambda: predictor.decode(decoder_inputs), settings)
    encoder_spec, decoder_spec = encoder_contract(), decoder_contract(predictor.num_points)
    parts = {
        "image_encoder": (
            predictor.encoder,
            encoder_spec.input_names,
            encoder_spec.output_names,
            {"image": first.prepared.image},
        ),
        "prompt_decoder": (predictor.decoder, decoder_spec.input_names, decoder_spec.output_names, decoder_inputs),
    }
    return {
        "pytorch": {"image_encoder": encoder, "prompt_decoder": decoder},
        "onnxruntime": onnx_runtime_latency(parts, settings.threads, lambda run: time_runs(run, settings)),
        "compute_floor": compute_floor(predictor.encoder, image, settings.threads),
    }


def reference_weights(manifest: Manifest, checkpoint: Path | None) -> tuple[str, Path | None, int]:
    """The weights to rebuild PyTorch from, after checking they are the ones the files came from.

    `checkpoint` (validate --checkpoint) wins over the path the manifest recorded; either way its
    sha256 must equal the manifest's, or the run is refused: scoring files against other weights
    would measure nothing."""
    weights = manifest.weights
    model_type = weights.get("model_type")
    recorded = weights.get("checkpoint")
    if checkpoint is None and recorded is None:
        return model_type, None, int(weights.get("seed") or 0)
    if recorded is None:
        raise ArtifactError(
            f"the {manifest.target} files were converted from random weights ({weights.get('description')}), "
            f"not from --checkpoint {checkpoint}; convert again with --checkpoint, or validate without it"
        )
    path = Path(checkpoint) if checkpoint is not None else Path(recorded)
    if not path.is_file():
        raise ArtifactError(
            f"checkpoint {path} named by {manifest.target}/manifest.json is missing; pass --checkpoint PATH "
            "with the weights the files were converted from"
        )
    digest = sha256_file(path)
    if digest != weights.get("sha256"):
        raise ArtifactError(
            f"checkpoint {path} has sha256 {digest[:12]}, but the {manifest.target} files were converted from "
            f"sha256 {str(weights.get('sha256'))[:12]}: the weights changed, refusing to score; convert again"
        )
    return model_type, path, 0


def failed_run(manifest_path: Path, target: str, error: str) -> dict[str, Any]:
    return {"manifest": str(manifest_path), "target": target, "error": error, "artifacts": []}


def validate_run(
    out_dir: Path,
    photos: Photos,
    settings: ValidationSettings,
    gates: dict[str, Gate] | None = None,
    overlays: dict[str, dict[str, dict[int, np.ndarray]]] | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
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
    torch.set_num_threads(settings.threads)
    gates = gates or DEFAULT_GATES
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "settings": asdict(settings),
        "photos": photos.describe(),
        "ground_truth": photos.has_ground_truth,
        "gates": {precision: asdict(gate) for precision, gate in gates.items()},
        "runs": [],
    }
    reference_runs: dict[str, tuple] = {}
    for manifest_path in manifests:
        target_name = manifest_path.parent.name
        try:
            manifest = read_manifest(manifest_path)
            get_target(manifest.target)  # an unknown target name is this run's error
            model_type, weights_path, seed = reference_weights(manifest, checkpoint)
            key = json.dumps([model_type, manifest.weights.get("sha256"), seed, manifest.config["num_points"]])
            if key not in reference_runs:  # targets converted from the same weights share one reference
                sam, source = load_model(model_type, weights_path, seed)
                predictor = ReferencePredictor(sam, num_points=manifest.config["num_points"])
                references = build_reference(predictor, photos, settings)
                if not any(ref.cases for ref in references):
                    raise PipelineError(f"no prompts could be made from {photos.describe()}")
                baselines = NO_BASELINES
                if settings.baselines:
                    baselines = baseline_latencies(predictor, references[0], settings)
                reference_runs[key] = (source, references, baselines)
        except Exception as error:  # this run's error; the other targets are still validated
            message = str(error) if isinstance(error, PipelineError) else one_line(error)
            report["runs"].append(failed_run(manifest_path, target_name, message))
            continue
        source, references, baselines = reference_runs[key]
        run = {
            "manifest": str(manifest_path),
            "target": manifest.target,
            "runtime": get_target(manifest.target).runtime_name,
            "weights": source.describe(),
            "random_weights": source.is_random,
            "conversion_failures": [asdict(failure) for failure in manifest.failures],
            "prompt_cases": [asdict(case) for ref in references for case, _, _ in ref.cases],
            "baselines": baselines,
            "artifacts": [],
        }
        if overlays is not None:
            overlays[f"{manifest.target} pytorch"] = {
                ref.image_id: prediction.mask
                for i, ref in enumerate(references)
                for case, _, prediction in ref.cases
                if is_overlay_case(i, ref, case)
            }
        for record in tqdm(manifest.artifacts, desc=f"{manifest.target} artifacts", unit="file"):
            sink = None
            if overlays is not None and record.part == "prompt_decoder":
                sink = overlays.setdefault(f"{record.target} {record.part} {record.precision}", {})
            result = validate_artifact(manifest_path, manifest, record, references, settings, sink)
            gate = gates.get(record.precision)
            failures = gate_failures(result, gate) if gate else [f"no gate for precision {record.precision!r}"]
            result["gate"] = {"passed": not failures, "failures": failures}
            run["artifacts"].append(result)
        report["runs"].append(run)
    return report


SUMMARY_HEADER = (
    "artifact",
    "MB",
    "ms (median)",
    "x PyTorch",
    "x ONNX Runtime",
    "x floor",
    "peak MB",
    "gate",
    "agreement (IoU mean/min, confident IoU, logits PSNR)",
)


def failed_artifacts(report: dict[str, Any]) -> list[str]:
    """One line per failure: a run that could not be validated, a conversion that failed, an
    artifact below its gate (or not loadable), naming it and why."""
    lines = []
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"{run['target']}: {run['error']}")
        for failure in run.get("conversion_failures", []):
            lines.append(
                f"{run['target']} {failure['part']} {failure['precision']}: conversion failed: {failure['error']}"
            )
        lines += [
            f"{a['target']} {a['part']} {a['precision']}: {'; '.join(a['gate']['failures'])}"
            for a in run["artifacts"]
            if not a["gate"]["passed"]
        ]
    return lines


def summary_markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(report)]
    if not report.get("ground_truth", True):
        lines.append(
            f"\nPhotos: {report.get('photos')}. No ground truth was used: prompts are seeded grid points and "
            "boxes around PyTorch's own masks, and every figure compares a file with PyTorch."
        )
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"\n{run['target']}: NOT VALIDATED: {run['error']}")
            continue
        baselines = run["baselines"]
        described = []
        for name in ("pytorch", "onnxruntime"):
            medians = [
                f"{part.split('_')[-1]} {baselines[name][part]['median_s'] * 1000:.0f} ms"
                for part in ("image_encoder", "prompt_decoder")
                if "median_s" in baselines[name].get(part, {})
            ]
            described.append(f"{name} fp32 median {', '.join(medians) or 'unavailable'}")
        floor = baselines["compute_floor"]
        if floor:
            described.append(
                f"encoder {floor['encoder_gflops']:.1f} GFLOP at {floor['matmul_gflops_per_s']:.0f} GFLOP/s matmul "
                f"= floor {floor['encoder_floor_s'] * 1000:.0f} ms"
            )
        lines.append(
            f"\n{run['target']}: runtime {run.get('runtime', '?')}; weights {run['weights']}; " + "; ".join(described)
        )
    return "\n".join(lines)


def _mean_or_dash(summary: dict[str, float] | None) -> str:
    return "-" if summary is None else f"{summary['mean']:.3f}"


def _ratio(median: float, baseline: dict[str, Any]) -> str:
    return f"{median / baseline['median_s']:.2f}" if "median_s" in baseline else "-"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per artifact: size, latency ratio to PyTorch, gate, agreement."""
    rows = []
    for run in report["runs"]:
        for artifact in run["artifacts"]:
            name = f"{artifact['target']} {artifact['part']} {artifact['precision']}"
            if "error" in artifact:
                size = f"{artifact['bytes'] / 1e6:.1f}"
                rows.append([name, size, "-", "-", "-", "-", "-", "FAIL", f"ERROR: {artifact['error']}"])
                continue
            baselines = run["baselines"]
            median = artifact["latency"]["median_s"]
            ratios = [_ratio(median, baselines["pytorch"].get(artifact["part"], {}))]
            ratios.append(_ratio(median, baselines["onnxruntime"].get(artifact["part"], {})))
            compute_floor = baselines["compute_floor"]
            floor = compute_floor["encoder_floor_s"] if compute_floor and artifact["part"] == "image_encoder" else None
            ratios.append(f"{median / floor:.1f}" if floor else "-")
            peak = f"{artifact['memory']['peak_increase_mb']:.0f}" if "memory" in artifact else "-"
            agreement = artifact["agreement"]
            if artifact["part"] == "image_encoder":
                quality = (
                    f"embeddings PSNR {agreement['embeddings']['psnr_db_min']:.1f} dB, "
                    f"max abs {agreement['embeddings']['max_abs_error']:.2e}"
                )
            else:
                truths = [v["ground_truth_iou"] for v in agreement.values() if v["ground_truth_iou"]["pytorch"]]
                quality = ""
                if truths:
                    truth_torch = np.mean([t["pytorch"]["mean"] for t in truths])
                    truth_file = np.mean([t["artifact"]["mean"] for t in truths])
                    quality = f"IoU with ground truth PyTorch {truth_torch:.3f} / file {truth_file:.3f}; "
                quality += "; ".join(
                    f"{kind} IoU {v['mask_iou']['mean']:.3f}/{v['mask_iou']['min']:.3f} "
                    f"conf {_mean_or_dash(v['mask_iou_confident'])} PSNR {v['logits_psnr_db_min']:.1f}"
                    for kind, v in agreement.items()
                )
            gate = "pass" if artifact["gate"]["passed"] else "FAIL"
            size = f"{artifact['bytes'] / 1e6:.1f}"
            rows.append([name, size, f"{median * 1000:.0f}", *ratios, peak, gate, quality])
    return rows
