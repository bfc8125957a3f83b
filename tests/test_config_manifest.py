"""Run config parsing and the manifest's atomic, self-describing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkpoints import WeightsSource
from pipeline.config import RunConfig, load_config
from pipeline.contract import encoder_contract
from pipeline.errors import ArtifactError, ConfigError
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
    manifest = Manifest("coreml", weights, RunConfig().to_json(), tool_versions(), (record,))
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


def test_partial_run_keeps_earlier_files_of_the_same_weights(tmp_path):
    from mobile_targets.convert import kept_earlier_records

    out = tmp_path / "tflite"
    out.mkdir()
    weights = WeightsSource("vit_t", None, None, 0).to_json()

    def record(name: str, precision: str) -> ArtifactRecord:
        path = out / name
        path.write_bytes(name.encode())
        return ArtifactRecord.describe_file(
            path, out, part="image_encoder", target="tflite", precision=precision, contract={}
        )

    fp32, int8 = record("enc_fp32.tflite", "fp32"), record("enc_int8.tflite", "int8")
    Manifest("tflite", weights, RunConfig().to_json(), {}, (fp32, int8)).write(out)
    new_int8 = record("enc_int8.tflite", "int8")
    assert kept_earlier_records(out, weights, RunConfig(), [new_int8]) == [fp32]
    other_weights = WeightsSource("vit_t", None, None, 1).to_json()
    assert kept_earlier_records(out, other_weights, RunConfig(), [new_int8]) == []
    (out / "enc_fp32.tflite").write_bytes(b"changed")
    assert kept_earlier_records(out, weights, RunConfig(), [new_int8]) == []
