"""Run config parsing and the manifest's atomic, self-describing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkpoints import WeightsSource
from pipeline.config import RunConfig, load_config
from pipeline.contract import encoder_contract
from pipeline.errors import ArtifactError, ConfigError, PipelineError
from pipeline.files import atomic_produce
from pipeline.manifest import ArtifactRecord, Manifest, read_manifest, tool_versions, verify_artifact


def test_config_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('num_points = 8\nprecisions = ["fp32"]\nout_dir = "out"\n')
    config = load_config(path)
    assert config == RunConfig(num_points=8, precisions=("fp32",), out_dir=tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_point = 8", "unknown keys"),
        ("num_points = 1", "num_points must be"),
        ("precisions = ['fp8']", "unknown precisions"),
        ("model_type = 'vit_x'", "model_type"),
        ("num_points = [", "not valid TOML"),
        ("num_points = '8'", "key num_points must be int, got str '8'"),
        ("num_points = true", "key num_points must be int, got bool True"),
        ("weights_seed = 1.5", "key weights_seed must be int, got float 1.5"),
        ("seed = 3", "unknown keys \\['seed'\\]"),
        ("precisions = 'fp32'", "precisions must be a list of strings"),
        ("precisions = [32]", "precisions must be a list of strings"),
        ("precisions = []", "precisions is empty"),
        ("checkpoint = 5", "checkpoint must be a path string"),
        ("[target_options]\ncoreml = 'fast'", "target_options.coreml must be a table"),
    ],
)
def test_bad_config(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_manifest_round_trip_and_random_weights_flag(tmp_path):
    artifact = tmp_path / "coreml" / "encoder.bin"
    artifact.parent.mkdir()
    artifact.write_bytes(b"weights")
    record = ArtifactRecord.describe_file(
        artifact,
        artifact.parent,
        part="image_encoder",
        target="coreml",
        precision="fp32",
        contract=encoder_contract().to_json(),
    )
    weights = WeightsSource("vit_t", None, None, 0).to_json()
    manifest = Manifest(
        target="coreml",
        weights=weights,
        config=RunConfig().to_json(),
        tool_versions=tool_versions(),
        artifacts=(record,),
    )
    path = manifest.write(artifact.parent)
    raw = json.loads(path.read_text())
    assert raw["random_weights"] is True and raw["weights"]["description"] == "random init, seed 0"
    assert read_manifest(path) == manifest
    assert verify_artifact(path, record) == artifact
    artifact.write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="changed since conversion"):
        verify_artifact(path, record)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ArtifactError, match="manifest not found"):
        read_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "target": "tflite",
                "weights": {"model_type": "vit_t", "seed": 0},
                "config": {"num_points": "5"},
                "tool_versions": {},
                "artifacts": [],
            }
        )
    )
    with pytest.raises(ArtifactError, match=r"malformed ones: config\.num_points must be int, got str '5'"):
        read_manifest(wrong)


def test_published_manifest_schema_is_current():
    """docs/manifest.schema.json is what an app's build script validates manifest.json with:
    it must be the schema the code reads and writes (`python -m pipeline.manifest` writes it)."""
    from pipeline.manifest import manifest_schema

    published = json.loads((Path(__file__).parents[1] / "docs" / "manifest.schema.json").read_text())
    assert published == manifest_schema()
    assert {"weights", "config", "artifacts", "random_weights"} <= set(published["properties"])


def test_failed_produce_keeps_earlier_artifact(tmp_path):
    target = tmp_path / "model.pte"
    target.write_bytes(b"good")

    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError):
        atomic_produce(target, broken)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pte"]


def _keeper_folder(tmp_path, seed: int = 0):
    from mobile_targets import get_target
    from mobile_targets.convert import ManifestKeeper

    out = tmp_path / "tflite"
    out.mkdir(exist_ok=True)
    weights = WeightsSource("vit_t", None, None, seed)

    def record(name: str, precision: str) -> ArtifactRecord:
        path = out / name
        path.write_bytes(name.encode() + bytes([seed]))
        return ArtifactRecord.describe_file(
            path, out, part="image_encoder", target="tflite", precision=precision, contract={}
        )

    def keeper() -> ManifestKeeper:
        return ManifestKeeper(out, get_target("tflite"), weights, RunConfig())

    return out, record, keeper


def test_partial_run_keeps_earlier_files_of_the_same_weights(tmp_path):
    out, record, keeper = _keeper_folder(tmp_path)
    fp32, int8 = record("enc_fp32.tflite", "fp32"), record("enc_int8.tflite", "int8")
    first = keeper()
    first.add(fp32)
    assert read_manifest(out / "manifest.json").artifacts == (fp32,)  # written after every file
    first.add(int8)
    second = keeper()
    second.fail("image_encoder", "int8", "converter crashed")
    manifest = read_manifest(out / "manifest.json")
    assert manifest.artifacts == (fp32, int8)  # the earlier int8 file is kept and still listed
    assert [(f.part, f.precision, f.error) for f in manifest.failures] == [
        ("image_encoder", "int8", "converter crashed")
    ]
    (out / "enc_fp32.tflite").write_bytes(b"changed")
    assert keeper().manifest.artifacts == (int8,)  # a file that changed since is no longer described


def test_other_weights_are_moved_aside_never_deleted(tmp_path):
    out, record, keeper = _keeper_folder(tmp_path, seed=0)
    first = keeper()
    first.add(record("enc_fp32.tflite", "fp32"))
    _, _, other = _keeper_folder(tmp_path, seed=1)
    moved = other()
    assert moved.manifest.artifacts == ()
    assert read_manifest(out / "manifest.json").weights.seed == 1  # never a folder without a manifest
    (folder,) = (out / "superseded").iterdir()
    assert (folder / "enc_fp32.tflite").read_bytes() == b"enc_fp32.tflite\x00"
    assert read_manifest(folder / "manifest.json").weights.seed == 0


def test_target_options_name_known_targets_and_booleans_are_strict():
    from mobile_targets import check_target_options, get_target
    from pipeline.config import parse_bool

    with pytest.raises(PipelineError, match=r"unknown targets \['corml'\]"):
        check_target_options({"corml": {"encoder_input": "image"}})
    check_target_options({"coreml": {}, "tflite": {}})
    assert parse_bool("true", "x") is True and parse_bool("False", "x") is False and parse_bool(False, "x") is False
    for bad in ("yes", "1", 1, "maybe"):
        with pytest.raises(ConfigError, match="must be true or false"):
            parse_bool(bad, "coreml option fp32_point_encoding")
    with pytest.raises(ConfigError, match="fp32_point_encoding must be true or false, got 'no'"):
        get_target("coreml").with_options({"fp32_point_encoding": "no"})
    with pytest.raises(ConfigError, match="takes no options"):
        get_target("executorch").with_options({"threads": 2})
    with pytest.raises(ConfigError, match=r"unknown tflite options \['threads'\]"):
        get_target("tflite").with_options({"threads": 2})
    with pytest.raises(ConfigError, match="integer_io must be true or false, got 'int8'"):
        get_target("tflite").with_options({"integer_io": "int8"})
    assert get_target("tflite").with_options({"integer_io": "true"}).options.integer_io is True


def test_gate_values_are_type_checked():
    from validation.gates import gates_from_config

    with pytest.raises(ConfigError, match=r"gates\.int8\.mask_iou_mean must be a finite number, got str 'high'"):
        gates_from_config({"int8": {"mask_iou_mean": "high"}})
    with pytest.raises(ConfigError, match="finite number"):
        gates_from_config({"int8": {"mask_iou_mean": float("nan")}})


def test_repeat_call_cache_runs_a_repeated_call_once():
    """The convert stage's runner wrapper: the same inputs again are answered from the last call
    (as copies); other inputs run the file."""
    import numpy as np

    from mobile_targets.base import RepeatCallCache, Runner
    from pipeline.contract import encoder_contract

    class Counting(Runner):
        calls = 0

        def run(self, inputs):
            Counting.calls += 1
            return {"image_embeddings": inputs["image"][:, :1] * 2}

    cached = RepeatCallCache(Counting("none", encoder_contract()))
    image = np.ones((1, 3, 4, 4), np.float32)
    first, second = cached.run({"image": image}), cached.run({"image": image.copy()})
    assert Counting.calls == 1 and np.array_equal(first["image_embeddings"], second["image_embeddings"])
    assert first["image_embeddings"] is not second["image_embeddings"]
    cached.run({"image": image * 3})
    assert Counting.calls == 2
