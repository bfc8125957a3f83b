"""The convert stage: checkpoint -> export wrappers -> a target's converter -> files + manifest.

Each file is written under a temporary name, loaded in the target's real runtime and checked
against PyTorch on a real photo (a PSNR gate, as apple/ml-stable-diffusion does after each
conversion); only a file that passes replaces the earlier one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_targets import check_target_options, get_target
from mobile_targets.base import PartToConvert, RepeatCallCache, Runner, Target
from pipeline.checkpoints import WeightsSource, load_model
from pipeline.config import RunConfig
from pipeline.contract import decoder_contract, encoder_contract, file_stem
from pipeline.datasets import CocoPhotos, Photos
from pipeline.errors import ArtifactError, ConfigError, PipelineError, one_line
from pipeline.export_wrappers import exported_program
from pipeline.files import atomic_write_bytes, commit_files, recover_interrupted, sha256_file, staged_output
from pipeline.fp16_range import Fp16Headroom, measure_fp16_headroom, with_readers
from pipeline.gates import DEFAULT_GATES, selftest_tolerance
from pipeline.locking import LOCK_NAME, folder_lock
from pipeline.manifest import (
    MANIFEST_NAME,
    ArtifactRecord,
    ConversionFailure,
    Manifest,
    read_manifest,
    recorded_files,
    same_weights,
    tool_versions,
    travelling_files,
    verify_artifact,
)
from pipeline.metrics import max_abs_error, psnr_db, require_finite
from pipeline.model import describe_architecture
from pipeline.predictor import ReferencePredictor, stack_prompts
from pipeline.processing import Prompt
from pipeline.provenance import command_line
from pipeline.selftest import SelftestCase, run_vectors, selftest_path, write_vectors

log = logging.getLogger(__name__)


class GateMiss(ArtifactError):
    """A fresh file that converted and runs but misses its precision's gate (PSNR or self-test vectors)."""


MADE_WHERE_GATE_HOLDS = ("w8a8",)
"""Precisions made on request whose files are left out (`not_made`) where they miss their gate,
not failed: full-integer quantization holds for some parts and not others (TFLite's w8a8
encoder holds the int8 gate, its decoder does not), and a user asking for w8a8 wants the files
that hold."""


def example_prompts(photos: Photos, image_id: int, image_shape: tuple[int, ...], count: int = 2) -> list[Prompt]:
    """A foreground point inside an instance plus its box (prompts real apps send); photos
    without ground truth get the photo's centre point and a box around its middle half."""
    prompts = []
    for instance in photos.instances(image_id)[:count]:
        ys, xs = np.nonzero(instance.mask)
        if len(xs) == 0:
            continue
        middle = len(xs) // 2
        x, y, w, h = instance.bbox
        prompts.append(
            Prompt(
                points=np.array([[xs[middle], ys[middle]]], dtype=np.float32),
                labels=np.array([1.0], dtype=np.float32),
                box=np.array([x, y, x + w, y + h], dtype=np.float32),
            )
        )
    if not prompts:
        height, width = image_shape[:2]
        prompts.append(
            Prompt(
                points=np.array([[width / 2, height / 2]], dtype=np.float32),
                labels=np.array([1.0], dtype=np.float32),
                box=np.array([width / 4, height / 4, 3 * width / 4, 3 * height / 4], dtype=np.float32),
            )
        )
    return prompts


def build_parts(config: RunConfig, sam: torch.nn.Module, photos: Photos) -> list[PartToConvert]:
    """The export wrappers (encoder, decoder, and the batched decoder unless batch_prompts is 0)
    with example inputs and self-test vectors from the first photo, encoded once by PyTorch."""
    reference = ReferencePredictor(sam, config.num_points)
    contract = decoder_contract(config.num_points)
    image_id = photos.image_ids()[0]
    image = photos.image(image_id)
    reference.set_image(image)
    prompts = example_prompts(photos, image_id, image.shape)
    named = reference.decoder_inputs(prompts[0])
    encoder_selftest, decoder_selftest = selftest_cases(reference, prompts[0])
    architecture = describe_architecture(config.model_type)
    calibration = CalibrationPhotos(sam, photos, config.num_points)
    parts = [
        PartToConvert(
            reference.encoder_module, encoder_contract(), (torch.from_numpy(reference.prepared.image),),
            architecture=architecture, selftest=encoder_selftest, calibration=calibration.encoder_samples,
        ),
        PartToConvert(
            reference.decoder_module, contract, tuple(torch.from_numpy(named[n]) for n in contract.input_names),
            architecture=architecture, selftest=decoder_selftest, calibration=calibration.decoder_samples,
        ),
    ]  # fmt: skip
    if config.batch_prompts:
        batched = decoder_contract(config.num_points, config.batch_prompts)
        case = batched_selftest_case(reference, decoder_selftest, config.batch_prompts)
        parts.append(
            PartToConvert(
                reference.decoder_module,
                batched,
                tuple(torch.from_numpy(case.inputs[name]) for name in batched.input_names),
                architecture=architecture,
                selftest=(case,),
                calibration=partial(calibration.batched_decoder_samples, config.batch_prompts),
                optional=True,
            )
        )
    return parts


CALIBRATION_PHOTOS = 4
"""Photos whose activations set a statically quantized file's int8 ranges."""


class CalibrationPhotos:
    """Encoder and decoder inputs on the first CALIBRATION_PHOTOS photos, each with its example
    prompts as a point, as a box, and as a refinement with the point's mask; made once, on first
    use: only statically quantized activations (the w8a8 files) need them, and they cost a PyTorch
    encoder pass per photo."""

    def __init__(self, sam: torch.nn.Module, photos: Photos, num_points: int) -> None:
        self.sam, self.photos, self.num_points = sam, photos, num_points

    @cached_property
    def _inputs(self) -> list[tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]]:
        reference = ReferencePredictor(self.sam, self.num_points)
        prepared = []
        for image_id in self.photos.image_ids()[:CALIBRATION_PHOTOS]:
            image = self.photos.image(image_id)
            reference.set_image(image)
            rows = []
            for prompt in example_prompts(self.photos, image_id, image.shape):
                point = Prompt(points=prompt.points, labels=prompt.labels)
                previous = reference.predict(point, multimask_output=True).best_low_res_mask
                for kind in (point, Prompt(box=prompt.box), replace(point, mask_input=previous)):
                    rows.append(reference.decoder_inputs(kind))
            prepared.append((reference.prepared.encoder_inputs(), rows))
        return prepared

    def encoder_samples(self) -> tuple[dict[str, np.ndarray], ...]:
        return tuple(image for image, _ in self._inputs)

    def decoder_samples(self) -> tuple[dict[str, np.ndarray], ...]:
        return tuple(row for _, rows in self._inputs for row in rows)

    def batched_decoder_samples(self, batch: int) -> tuple[dict[str, np.ndarray], ...]:
        return tuple(stack_prompts(rows[:batch], batch) for _, rows in self._inputs)


def batched_selftest_case(
    reference: ReferencePredictor, decoder_cases: tuple[SelftestCase, ...], batch: int
) -> SelftestCase:
    """One batched call on the photo `reference` holds: the one-prompt vectors (point, box,
    box+point, refinement) in the first rows, then segment-everything's grid points (one
    foreground point each) in the rest. Expected: PyTorch fp32 on the whole batch."""
    height, width = reference.prepared.original_size
    side = max(1, int(np.ceil(np.sqrt(batch))))
    grid = [(width * (i + 0.5) / side, height * (j + 0.5) / side) for j in range(side) for i in range(side)]
    rows = [case.inputs for case in decoder_cases][:batch]
    for x, y in grid[: batch - len(rows)]:
        point = Prompt(points=np.array([[x, y]], dtype=np.float32), labels=np.array([1.0], dtype=np.float32))
        rows.append(reference.decoder_inputs(point))
    inputs = stack_prompts(rows, batch)
    return SelftestCase("grid", inputs, reference.decoder.run(inputs))  # the wrapper is batch-generic


SELFTEST_DECODER_KINDS = ("point", "box", "box_point", "refine")


def selftest_cases(
    reference: ReferencePredictor, prompt: Prompt
) -> tuple[tuple[SelftestCase, ...], tuple[SelftestCase, ...]]:
    """The vectors that travel with each file, on the photo `reference` holds: the encoder on the
    prepared photo; the decoder on PyTorch's embeddings with a point, a box, both, and a refinement
    (the point again with the first pass's best low-res mask as mask_input). Expected: PyTorch fp32."""
    encoder_case = SelftestCase(
        "photo", reference.prepared.encoder_inputs(), {"image_embeddings": reference.embeddings}
    )
    point = Prompt(points=prompt.points, labels=prompt.labels)
    first_pass = reference.predict(point, multimask_output=True)
    prompts = {
        "point": point,
        "box": Prompt(box=prompt.box),
        "box_point": Prompt(points=prompt.points, labels=prompt.labels, box=prompt.box),
        "refine": Prompt(points=prompt.points, labels=prompt.labels, mask_input=first_pass.best_low_res_mask),
    }
    decoder_cases = []
    for kind in SELFTEST_DECODER_KINDS:
        inputs = reference.decoder_inputs(prompts[kind])
        decoder_cases.append(SelftestCase(kind, inputs, reference.decoder.run(inputs)))
    return (encoder_case,), tuple(decoder_cases)


def pytorch_outputs(part: PartToConvert) -> dict[str, np.ndarray]:
    """PyTorch's answer on the example photo, checked finite before anything is converted: weights
    whose own output overflows fail at once, with no conversion to wait for."""
    with torch.no_grad():
        expected = part.module(*part.example_inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    outputs = {name: t.numpy() for name, t in zip(part.contract.output_names, expected, strict=True)}
    for name, values in outputs.items():
        require_finite(values, f"{part.name}: PyTorch's own output {name}")
    return outputs


def parity_gate(
    runner: Runner, part: PartToConvert, precision: str, expected: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Run the fresh file on the example photo; fail if any output is non-finite or its PSNR
    against PyTorch's `expected` is under the gate."""
    inputs = {name: t.numpy() for name, t in zip(part.contract.input_names, part.example_inputs, strict=True)}
    actual = runner.run(inputs)
    results = {}
    for name, reference in expected.items():
        require_finite(actual[name], f"{part.name} {precision}: output {name} of the converted file")
        results[name] = {
            "psnr_db": psnr_db(reference, actual[name]),
            "max_abs_error": max_abs_error(reference, actual[name]),
        }
        floor = DEFAULT_GATES[precision].conversion_psnr_db
        if not results[name]["psnr_db"] >= floor:
            raise GateMiss(
                f"{part.name} {precision}: output {name} has PSNR {results[name]['psnr_db']:.1f} dB against "
                f"PyTorch, under the {floor:.0f} dB gate"
            )
    return results


def selftest_gate(runner: Runner, part: PartToConvert, precision: str) -> dict[str, Any]:
    """Run the part's self-test vectors through the fresh file: it must meet its precision's
    gate on them, or the vectors would fail on the phone. Returns the manifest's `selftest`."""
    tolerance = selftest_tolerance(DEFAULT_GATES[precision], part.name)
    results = run_vectors(runner, list(part.selftest), tolerance)
    misses = [miss for result in results for miss in result.misses]
    if misses:
        raise GateMiss(f"{part.name} {precision}: self-test vectors missed: {'; '.join(misses)}")
    psnrs = {name: min(r.psnr_db[name] for r in results) for name in part.contract.output_names}
    ious = [r.mask_iou_min for r in results if r.mask_iou_min is not None]
    return {
        "cases": [case.kind for case in part.selftest],
        "tolerance": tolerance.to_json(),
        "measured": {"psnr_db_min": psnrs, "mask_iou_min": min(ious) if ious else None},
    }


def convert_one(
    target: Target,
    part: PartToConvert,
    precision: str,
    path: Path,
    expected: dict[str, np.ndarray],
    commit: Commit,
    recorded: dict[str, Any] | None = None,
) -> dict:
    """Convert, gate against `expected` (`pytorch_outputs`) and self-test into hidden staged files
    beside `path`; then `commit` places the file, its vectors and companions and records them,
    all together (`commit_files`: a failure on the way, a full disk, leaves the earlier ones).
    `recorded`: what was measured before converting, for the manifest."""
    details: dict = dict(recorded or {})
    vectors = selftest_path(path)
    with staged_output(path) as temporary:
        start = time.perf_counter()
        details.update(target.convert_part(part, precision, temporary))
        details["conversion_seconds"] = round(time.perf_counter() - start, 2)
        runner = RepeatCallCache(target.load_runner(temporary, part.contract))  # the gate's photo opens the vectors
        details["gate"] = parity_gate(runner, part, precision, expected)
        details["selftest"] = {"file": vectors.name, **selftest_gate(runner, part, precision)}
        moves = {path: temporary}
        staged_vectors = temporary.with_name(vectors.name)
        write_vectors(staged_vectors, list(part.selftest))
        details["selftest"]["sha256"] = sha256_file(staged_vectors)
        moves[vectors] = staged_vectors
        for companion in target.companion_files(temporary, part):
            staged = temporary.with_name(companion.name)
            atomic_write_bytes(staged, companion.content)
            moves[path.with_name(companion.name)] = staged
            details.setdefault("companions", []).append(
                {"file": companion.name, "sha256": sha256_file(staged), **companion.details}
            )
        del runner  # the runtime may map the staged file; it is renamed next
        commit(path, temporary, details, moves)
    return details


class Fp16Overflow(PipelineError):
    """A file that would compute in fp16 has ops under the fp16 margin, and its format cannot keep them in fp32."""


def fp16_ranges(part: PartToConvert, module: torch.nn.Module | None = None) -> tuple[Fp16Headroom, Any]:
    """The fp16 headroom of `module` (the part's own by default; the graph a target exports) on the
    part's calibration inputs (the example input when it has none), and the exported program whose
    node names it gives."""
    program = exported_program(part.module if module is None else module, part.example_inputs)
    if part.calibration is not None:
        samples = part.calibration()
    else:
        samples = (dict(zip(part.contract.input_names, (t.numpy() for t in part.example_inputs), strict=True)),)
    return measure_fp16_headroom(program, part.contract.input_names, samples), program


def within_fp16_range(
    target: Target, part: PartToConvert, precision: str, headroom: Fp16Headroom, program: Any
) -> tuple[PartToConvert, Fp16Headroom]:
    """The part to convert in `precision` (which computes in fp16) and its headroom record: as it
    is when every op holds the margin; else with the ops under it, and the ops that read them,
    kept in fp32 (`target.keeps_ops_fp32`); else Fp16Overflow naming the first op under it."""
    if headroom.holds:
        return part, headroom
    if not target.keeps_ops_fp32:
        raise Fp16Overflow(headroom.overflow_message(part.name, precision))
    kept = with_readers(program, (layer.node for layer in headroom.below_margin))
    log.warning("%s %s: %d op(s) kept in fp32 for fp16 headroom: %s", part.name, precision, len(kept), sorted(kept))
    return replace(part, fp32_ops=kept), headroom.model_copy(update={"kept_fp32": tuple(sorted(kept))})


Commit = Callable[[Path, Path, dict, dict[Path, Path]], None]
"""(final path, staged file, its details, final -> staged for everything that travels with it)."""


def place_without_manifest(final: Path, staged: Path, details: dict, moves: dict[Path, Path]) -> None:
    """A `Commit` for files no manifest lists (the benchmark's decoders at other N): placed together."""
    commit_files(moves, lambda: None)


class ManifestKeeper:
    """Keeps `<out>/<target>/manifest.json` in step with the files on disk during a run.

    The manifest is rewritten after every file, so a run that stops halfway leaves every file
    described. Earlier files of the same weights and N stay listed until this run replaces them
    (a conversion that fails keeps the earlier file). Earlier files of other weights or another N
    are moved, with their manifest, to `superseded/<time>/`: nothing is deleted, and nothing in
    the folder is left undescribed.
    """

    def __init__(self, out: Path, target: Target, weights: WeightsSource, config: RunConfig) -> None:
        self.out = out
        self.template = Manifest(
            target=target.name,
            weights=weights.to_json(),
            config=config.to_json(),
            tool_versions=tool_versions(*target.tool_packages()),
            artifacts=(),
            command=command_line(),
        )
        self.records: dict[tuple[str, str], ArtifactRecord] = {}
        self.failures: dict[tuple[str, str], ConversionFailure] = {}
        self.not_made: dict[tuple[str, str], ConversionFailure] = {}
        self._adopt_earlier(config)

    def _adopt_earlier(self, config: RunConfig) -> None:
        path = self.out / MANIFEST_NAME
        if not path.exists():
            return
        try:
            earlier = read_manifest(path)
        except ArtifactError as error:
            log.warning("ignoring the earlier manifest: %s", error)
            return
        if not same_weights(earlier.weights, self.template.weights) or earlier.config.num_points != config.num_points:
            self._supersede(earlier)
            return
        for record in earlier.artifacts:
            try:
                verify_artifact(path, record)
            except ArtifactError as error:
                log.warning("dropping an earlier record: %s", error)
                continue
            self.records[(record.part, record.precision)] = record

    def _supersede(self, earlier: Manifest) -> None:
        folder = self.out / "superseded" / earlier.created.replace(":", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for record in earlier.artifacts:
            for name in (record.file, *travelling_files(record)):
                source = self.out / name
                if source.exists() and ".." not in Path(name).parts and not Path(name).is_absolute():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, folder / name)
        os.replace(self.out / MANIFEST_NAME, folder / MANIFEST_NAME)
        self.write()  # the folder always has a manifest: now an empty one for this run
        log.warning(
            "%s held files of other weights or another N (%s); moved them to %s",
            self.out,
            earlier.weights.description,
            folder,
        )

    def add(self, record: ArtifactRecord) -> None:
        self.records[(record.part, record.precision)] = record
        self.failures.pop((record.part, record.precision), None)
        self.not_made.pop((record.part, record.precision), None)
        self.write()

    def commit(self, record: ArtifactRecord, moves: dict[Path, Path]) -> None:
        """Place a staged file with what travels with it and record it: both or neither (a
        manifest that cannot be written puts the earlier files and record back)."""
        earlier = (
            self.records.get((record.part, record.precision)),
            self.failures.get((record.part, record.precision)),
            self.not_made.get((record.part, record.precision)),
        )

        def record_it() -> None:
            try:
                self.add(record)
            except BaseException:
                key = (record.part, record.precision)
                for table, value in zip((self.records, self.failures, self.not_made), earlier, strict=True):
                    if value is None:
                        table.pop(key, None)
                    else:
                        table[key] = value
                raise

        commit_files(moves, record_it)

    def leave_out(self, part: str, precision: str, reason: str) -> None:
        """An optional file (or one of MADE_WHERE_GATE_HOLDS) that missed its gate this time (an
        earlier file that passed stays listed)."""
        self.not_made[(part, precision)] = ConversionFailure(part=part, precision=precision, error=reason)
        self.write()

    def fail(self, part: str, precision: str, error: str) -> None:
        self.failures[(part, precision)] = ConversionFailure(part=part, precision=precision, error=error)
        self.write()

    @property
    def manifest(self) -> Manifest:
        return self.template.model_copy(
            update={
                "artifacts": tuple(self.records.values()),
                "failures": tuple(self.failures.values()),
                "not_made": tuple(self.not_made.values()),
            }
        )

    def write(self) -> Path:
        return self.manifest.write(self.out)


def convert_target(target_name: str, config: RunConfig, photos: Photos | None = None) -> Path:
    """Convert both parts in every precision the target supports; returns the manifest path.

    A conversion that fails is one line in the log and in the manifest's `failures`; the others
    go on, and the stage then raises naming every failure."""
    check_target_options(config.target_options)
    target = get_target(target_name).with_options(config.target_options.get(target_name, {}))
    precisions = [p for p in config.precisions if p in target.precisions]
    if not precisions:
        raise ConfigError(
            f"none of the precisions {list(config.precisions)} is supported by {target.name} "
            f"(supported: {', '.join(target.precisions)})"
        )
    sam, weights = load_model(config.model_type, config.checkpoint, config.weights_seed)
    out = Path(config.out_dir) / target.name
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, exclusive=True, purpose=f"a convert run ({target.name})"):
        for line in recover_interrupted(out, _recorded_in(out), keep=(LOCK_NAME,)):
            log.warning("%s: %s", out, line)
        photos = photos or CocoPhotos.sample("calibration")
        parts = build_parts(config, sam, photos)
        parts = [replace(part, weights_description=weights.describe()) for part in parts]
        return convert_parts(target, config, parts, precisions, weights, out)


def _recorded_in(out: Path) -> dict[str, str]:
    """name -> sha256 of every file the folder's manifest lists (none if there is no readable one)."""
    try:
        return recorded_files(read_manifest(out / MANIFEST_NAME))
    except ArtifactError:
        return {}


def convert_parts(
    target: Target,
    config: RunConfig,
    parts: list[PartToConvert],
    precisions: list[str],
    weights: WeightsSource,
    out: Path,
) -> Path:
    """Every part in every precision into `out` (locked by the caller), the manifest kept in step."""
    keeper = ManifestKeeper(out, target, weights, config)
    for part in parts:
        expected = None  # PyTorch's answer, the same for every precision of the part
        ranges = None  # its fp16 headroom, measured once for every precision that computes in fp16
        for precision in precisions:
            path = out / f"{file_stem(part.contract)}_{precision}{target.extension}"
            log.info("converting %s to %s %s", part.name, target.name, precision)

            def commit(
                final: Path, staged: Path, details: dict, moves: dict[Path, Path], part=part, precision=precision
            ):
                record = ArtifactRecord.describe_file(
                    final,
                    out,
                    content=staged,
                    part=part.name,
                    target=target.name,
                    precision=precision,
                    contract=part.contract.to_json(),
                    details=details,
                )
                keeper.commit(record, moves)

            try:
                expected = pytorch_outputs(part) if expected is None else expected
                converted, recorded = part, {}
                if precision in target.fp16_precisions:  # a target exports one graph for all of them
                    ranges = ranges or fp16_ranges(part, target.module_to_export(part, precision))
                    converted, recorded["fp16_headroom"] = within_fp16_range(target, part, precision, *ranges)
                details = convert_one(target, converted, precision, path, expected, commit, recorded)
            except Exception as error:  # any converter failure: keep going, keep the earlier file
                message = one_line(error)
                if (part.optional or precision in MADE_WHERE_GATE_HOLDS) and isinstance(error, GateMiss):
                    kept = " (the earlier file is kept)" if (part.name, precision) in keeper.records else ""
                    print(f"not made: {target.name} {part.name} {precision}: {message}{kept}", file=sys.stderr)
                    keeper.leave_out(part.name, precision, message)
                    continue
                kept = " (the earlier file is kept)" if (part.name, precision) in keeper.records else ""
                print(f"FAILED {target.name} {part.name} {precision}: {message}{kept}", file=sys.stderr)
                keeper.fail(part.name, precision, message)
                continue
            record = keeper.records[(part.name, precision)]
            worst = min(v["psnr_db"] for v in details["gate"].values())
            print(
                f"wrote {path} ({record.bytes / 1e6:.1f} MB, {details['conversion_seconds']:.1f} s, "
                f"min PSNR vs PyTorch {worst:.1f} dB)"
            )
    manifest_path = keeper.write()
    manifest = keeper.manifest
    print(f"wrote {manifest_path} ({len(manifest.artifacts)} artifacts; weights: {weights.describe()})")
    if manifest.failures:
        raise ArtifactError(
            f"{len(manifest.failures)} conversion(s) failed: "
            + "; ".join(f"{f.part} {f.precision}: {f.error}" for f in manifest.failures)
            + f" (listed under 'failures' in {manifest_path})"
        )
    return manifest_path
