"""The measurements behind `python -m validation.benchmark`: every file, the baselines, the
compute floor, the decoder's point sweep and the encoders' per-op profiles (ExecuTorch, TFLite)."""

from __future__ import annotations

import logging
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mobile_targets import get_target, load_artifact_runner
from mobile_targets.base import PartToConvert
from mobile_targets.convert import build_parts, convert_one, place_without_manifest, pytorch_outputs
from pipeline.config import RunConfig
from pipeline.contract import DECODER_PARTS, PartContract, TensorSpec, contract_for, prompts_per_call
from pipeline.datasets import CocoPhotos
from pipeline.errors import PipelineError, one_line
from pipeline.manifest import ArtifactRecord, Manifest, find_manifests, read_manifest
from pipeline.predictor import ReferencePredictor
from pipeline.provenance import command_line
from pipeline.selftest import read_vectors
from pipeline.threads import torch_threads
from validation.baselines import (
    count_gflops,
    matmul_gflops,
    onnx_runtime_latency,
    reset_peak_memory,
    resident_memory_mb,
)
from validation.baselines import (
    time_call as time_latency,
)
from validation.benchmark.schema import (
    GEMM_SHAPE,
    ArtifactBenchmark,
    Baseline,
    Benchmark,
    DelegationCensus,
    Floor,
    GemmRate,
    OpCost,
    OpProfile,
    SweepPoint,
    Timing,
)
from validation.reference import ReferenceModels

log = logging.getLogger(__name__)

SWEEP_FOLDER = "benchmark_points"


def time_call(run: Callable[[], object], threads: int, warmup: int, runs: int) -> Timing:
    """`validation.baselines.time_call`, labelled with the thread count it ran at."""
    return Timing(threads, **asdict(time_latency(run, warmup, runs)))


@dataclass(frozen=True)
class FileUnderTest:
    manifest_path: Path
    manifest: Manifest
    record: ArtifactRecord

    @property
    def path(self) -> Path:
        return self.manifest_path.parent / self.record.file

    def inputs(self) -> dict[str, np.ndarray]:
        """The first self-test case's inputs: a real photo (and prompt) prepared by the contract."""
        info = self.record.details.selftest
        if info is None:
            raise PipelineError(f"{self.path} has no self-test vectors to time it on; convert it again")
        contract = self.manifest.contract(self.record.part)
        cases = read_vectors(self.manifest_path.parent / info.file, info.cases, contract)
        return cases[0].inputs


def files_under(out: Path) -> list[FileUnderTest]:
    manifests = find_manifests(out)
    if not manifests:
        raise PipelineError(f"no manifests under {out}; run a convert session first")
    files = []
    for manifest_path in manifests:
        manifest = read_manifest(manifest_path)
        files += [FileUnderTest(manifest_path, manifest, record) for record in manifest.artifacts]
    return files


def benchmark_artifact(item: FileUnderTest, threads: list[int], warmup: int, runs: int) -> ArtifactBenchmark:
    record = item.record
    runtime = get_target(record.target).runtime_name
    result = ArtifactBenchmark(record.target, record.part, record.precision, str(item.path), record.bytes, runtime)
    result.arithmetic = record.details.arithmetic
    result.not_timed = get_target(record.target).emulation_note()
    if record.part in DECODER_PARTS:
        result.prompts_per_call = prompts_per_call(item.manifest.contract(record.part))
    if result.not_timed:
        return result
    try:
        inputs = item.inputs()
        for count in sorted(threads, reverse=True):
            before = resident_memory_mb()
            resets = reset_peak_memory()
            runner = load_artifact_runner(item.manifest_path, item.manifest, record, count)
            result.timings.append(time_call(lambda runner=runner: runner.run(inputs), count, warmup, runs))
            after = resident_memory_mb()
            if result.peak_memory_mb is None and before and after and resets:
                result.peak_memory_mb = after["peak_rss_mb"] - before["rss_mb"]
            del runner
    except Exception as error:  # one file's failure is its row
        result.error = one_line(error)
    result.timings.sort(key=lambda t: t.threads)
    return result


def baselines(
    reference: ReferencePredictor,
    encoder_inputs: dict[str, np.ndarray],
    decoder_inputs: dict[str, np.ndarray],
    threads: list[int],
    warmup: int,
    runs: int,
) -> list[Baseline]:
    """PyTorch eager and ONNX Runtime fp32 of the same two modules, on the same inputs."""
    modules = {"image_encoder": reference.encoder_module, "prompt_decoder": reference.decoder_module}
    feeds = {"image_encoder": encoder_inputs, "prompt_decoder": decoder_inputs}
    results = {(runtime, part): Baseline(runtime, part) for runtime in ("pytorch", "onnxruntime") for part in modules}
    for count in threads:
        with torch_threads(count):
            for part, module in modules.items():
                contract = contract_for(part, reference.num_points)
                args = tuple(torch.from_numpy(feeds[part][name]) for name in contract.input_names)
                with torch.inference_mode():
                    timing = time_call(lambda module=module, args=args: module(*args), count, warmup, runs)
                results["pytorch", part].timings.append(timing)
            onnx_parts = {
                part: (module, contract_for(part, reference.num_points).input_names,
                       contract_for(part, reference.num_points).output_names, feeds[part])
                for part, module in modules.items()
            }  # fmt: skip
            timed = onnx_runtime_latency(
                onnx_parts, count, lambda run, count=count: asdict(time_call(run, count, warmup, runs))
            )
            for part, value in timed.items():
                if "median_s" in value:
                    results["onnxruntime", part].timings.append(Timing(**value))
                else:
                    results["onnxruntime", part].error = value.get("error", "failed")
    return list(results.values())


def floors(reference: ReferencePredictor, image: np.ndarray, threads: list[int]) -> list[Floor]:
    gflops = count_gflops(reference.encoder_module, (torch.from_numpy(image),))
    return [Floor(count, gflops, matmul_gflops(count), matmul_gflops(count, dtype=torch.int8)) for count in threads]


def point_sweep(
    out: Path,
    sam: torch.nn.Module,
    model_type: str,
    decoders: list[FileUnderTest],
    points: list[int],
    threads: int,
    warmup: int,
    runs: int,
) -> list[SweepPoint]:
    """Each decoder's target and precision converted again at every N from the weights the files
    came from (never an earlier run's sweep file: the weights may have changed), and timed;
    PyTorch too."""
    if not points or not decoders:
        return []
    sweep = []
    with torch_threads(threads):
        for count in points:
            config = replace(RunConfig(), num_points=count, model_type=model_type, batch_prompts=0)
            _, decoder = build_parts(config, sam, CocoPhotos.sample("calibration"))
            with torch.inference_mode():
                timing = time_call(
                    lambda decoder=decoder: decoder.module(*decoder.example_inputs), threads, warmup, runs
                )
            sweep.append(SweepPoint("pytorch", "fp32", count, timing))
            named = {
                name: t.numpy() for name, t in zip(decoder.contract.input_names, decoder.example_inputs, strict=True)
            }
            expected = pytorch_outputs(decoder)
            for item in decoders:
                record = item.record
                path = out / SWEEP_FOLDER / f"N{count}" / record.target / Path(record.file).name
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    target = get_target(record.target).with_options(item.manifest.target_options())
                    convert_one(target, decoder, record.precision, path, expected, place_without_manifest)
                    runner = target.load_runner(path, decoder.contract, threads=threads)
                    timing = time_call(lambda runner=runner, named=named: runner.run(named), threads, warmup, runs)
                    sweep.append(SweepPoint(record.target, record.precision, count, timing))
                except Exception as error:
                    sweep.append(SweepPoint(record.target, record.precision, count, None, one_line(error)))
    return sweep


GEMM_PRECISIONS = ("fp32", "int8")


def gemm_rates(target_names: list[str], threads: list[int], warmup: int, runs: int) -> list[GemmRate]:
    """Each target's runtime on one `GEMM_SHAPE` linear layer, converted by the target itself
    (int8: the target's own int8 scheme, XNNPACK's dynamically quantized GEMMs in both)."""
    rows, inputs, outputs = GEMM_SHAPE
    torch.manual_seed(0)
    layer = torch.nn.Linear(inputs, outputs).eval()
    x = torch.randn(1, rows, inputs)
    contract = PartContract(
        "gemm",
        inputs=(TensorSpec("x", (1, rows, inputs), "float32", "activations"),),
        outputs=(TensorSpec("y", (1, rows, outputs), "float32", "x @ weight.T + bias"),),
    )
    part = PartToConvert(layer, contract, (x,))
    feed = {"x": x.numpy()}
    rates = []
    with tempfile.TemporaryDirectory() as folder:
        for name in target_names:
            target = get_target(name)
            for precision in GEMM_PRECISIONS:
                path = Path(folder) / f"{name}_{precision}{target.extension}"
                try:
                    target.convert_part(part, precision, path)
                    for count in threads:
                        runner = target.load_runner(path, contract, threads=count)
                        timing = time_call(lambda runner=runner: runner.run(feed), count, warmup, runs)
                        gops = 2 * rows * inputs * outputs / timing.median_s / 1e9
                        rates.append(GemmRate(name, precision, count, gops))
                except Exception as error:
                    rates.append(GemmRate(name, precision, 0, None, one_line(error)))
    return rates


FRAME_EVENTS = ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL")
"""ETDump events that enclose others (the whole call, a delegate call, a kernel call's frame
around its `native_call_*` event); counting them too would count the same time twice."""
KERNEL_INT8 = re.compile(r"\b(QD8|QDU8|QS8|QU8|QC8W|QC4W|QB4W)\b")
KERNEL_FP16 = re.compile(r"\b(F16|X16)\b")
KERNEL_FP32 = re.compile(r"\b(F32|X32)\b")


def classify_event(name: str, delegated: bool, float_kernel: str = "xnnpack fp32") -> str:
    """Which kernels ran an op, from XNNPACK's name for it; an op whose name gives no type
    ("Add (ND)") ran in the file's float arithmetic, `float_kernel`."""
    if not delegated:
        return "outside xnnpack"
    if KERNEL_INT8.search(name):
        return "xnnpack int8"
    if KERNEL_FP16.search(name):
        return "xnnpack fp16"
    return "xnnpack fp32" if KERNEL_FP32.search(name) else float_kernel


def executorch_profile(item: FileUnderTest, threads: int, runs: int = 3) -> OpProfile:
    """Per-op time of one `.pte` from its ETDump: XNNPACK's own per-op events inside each
    delegate call, and every op the program runs outside XNNPACK (portable kernels)."""
    record = item.record
    profile = OpProfile(record.target, record.precision, str(item.path), threads, 0.0)
    try:
        from executorch.devtools import Inspector
        from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
        inputs = [torch.from_numpy(x) for x in item.inputs().values()]
        module = _load_for_executorch(str(item.path), enable_etdump=True)
        module.forward(inputs)  # warm
        for _ in range(runs):
            module.forward(inputs)
        with tempfile.TemporaryDirectory() as folder:
            dump = Path(folder) / "run.etdump"
            module.write_etdump_result_to_file(str(dump))
            inspector = Inspector(etdump_path=str(dump))
        costs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        for block in inspector.event_blocks:
            if block.name != "Execute":
                continue
            for event in block.events:
                if event.name == "Method::execute" and event.perf_data:
                    # a mean, like the ops': per run the ops fit inside the call, so their means do too
                    profile.total_ms = float(np.mean(event.perf_data.raw[1:] or event.perf_data.raw))
                if not event.perf_data or event.name in FRAME_EVENTS:
                    continue
                raw = event.perf_data.raw[1:] or event.perf_data.raw  # the first run is the warm-up
                base = re.sub(r"\s*#\d+$", "", event.name)
                key = (base, classify_event(event.name, bool(event.is_delegated_op)))
                costs[key][0] += 1
                costs[key][1] += float(np.mean(raw))
        profile.ops = sorted(
            (OpCost(name, kernel, int(count), ms) for (name, kernel), (count, ms) in costs.items()),
            key=lambda op: -op.ms,
        )
    except Exception as error:
        profile.error = one_line(error)
    return profile


def tflite_profile(item: FileUnderTest, threads: int, runs: int = 3) -> OpProfile:
    """Per-op time of one `.tflite` from LiteRT's own profiler: XNNPACK's ops inside the
    delegate, and every op LiteRT runs in its reference kernels."""
    from mobile_targets.tflite.profiler import profile_ops

    record = item.record
    profile = OpProfile(record.target, record.precision, str(item.path), threads, 0.0, profiler="LiteRT profiler")
    try:
        runner = load_artifact_runner(item.manifest_path, item.manifest, record, threads)
        measured = profile_ops(item.path, runner.file_inputs(item.inputs()), threads, runs)
        profile.total_ms = measured.total_ms
        arithmetic = "xnnpack fp16" if item.record.details.arithmetic == "fp16" else "xnnpack fp32"
        profile.ops = [
            OpCost(op.name, classify_event(op.name, op.delegated, arithmetic), op.count, op.ms) for op in measured.ops
        ]
    except Exception as error:
        profile.error = one_line(error)
    return profile


def encoder_profile(item: FileUnderTest, threads: int) -> OpProfile | None:
    """The per-op profile of an encoder in its target's own profiler, where the target has one."""
    profilers = {"executorch": executorch_profile, "tflite": tflite_profile}
    profiler = profilers.get(item.record.target)
    return profiler(item, threads) if profiler else None


def tflite_delegation(item: FileUnderTest) -> DelegationCensus:
    """Which ops of one `.tflite` XNNPACK takes and which run in LiteRT's reference kernels."""
    from mobile_targets.tflite.converter import xnnpack_delegation

    record = item.record
    census = DelegationCensus(record.target, record.precision, str(item.path))
    try:
        census.delegated, census.outside = xnnpack_delegation(item.path)
    except Exception as error:
        census.error = one_line(error)
    return census


def run_benchmark(
    out: Path, threads: list[int], warmup: int, runs: int, points: list[int], sweep_precisions: list[str]
) -> Benchmark:
    files = files_under(out)
    artifacts = [benchmark_artifact(item, threads, warmup, runs) for item in files]
    encoders = [f for f in files if f.record.part == "image_encoder"]
    decoders = [f for f in files if f.record.part == "prompt_decoder"]
    if not encoders or not decoders:
        raise PipelineError(f"{out} needs at least one encoder and one decoder file to compare with PyTorch")
    model = ReferenceModels().get(encoders[0].manifest)
    sam, model_type, reference = model.sam, encoders[0].manifest.weights.model_type, model.predictor
    encoder_inputs, decoder_inputs = encoders[0].inputs(), decoders[0].inputs()
    timed_targets = sorted({f.record.target for f in files if not get_target(f.record.target).emulation_note()})
    timed_decoders = [
        f
        for f in decoders
        if not get_target(f.record.target).emulation_note() and f.record.precision in sweep_precisions
    ]
    return Benchmark(
        command=command_line(),
        threads=threads,
        floors=floors(reference, encoder_inputs["image"], threads),
        baselines=baselines(reference, encoder_inputs, decoder_inputs, threads, warmup, runs),
        artifacts=artifacts,
        sweep=point_sweep(out, sam, model_type, timed_decoders, points, max(threads), warmup, runs),
        profiles=[p for p in (encoder_profile(f, max(threads)) for f in encoders) if p is not None],
        delegation=[tflite_delegation(f) for f in files if f.record.target == "tflite"],
        gemm_rates=gemm_rates(timed_targets, threads, warmup, max(runs, 5)),
    )
