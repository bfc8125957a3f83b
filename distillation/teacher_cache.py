"""The teacher's embeddings, computed once and stored in shards (the paper's precompute step).

Layout of `<out>/teacher_cache/`:
- `shard_00000.pt`, ...: `{"keys": [...], "embeddings": N x 256 x S/16 x S/16}` (fp16 or fp32),
  each written atomically, so an interrupted run never leaves half a shard.
- `index.json`: the teacher, image size and dtype the cache was made with, and per shard its
  keys, file name and sha256. Rewritten atomically after every shard.

A rerun verifies each listed shard's checksum, keeps those whose keys still match the image
list, and computes only what is missing: an interrupted cache resumes where it stopped.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distillation.data import ImageSource, prepare_for_encoder
from pipeline.errors import PipelineError
from pipeline.files import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
INDEX_NAME = "index.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheResult:
    folder: Path
    computed: int
    reused: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else float("nan")


def _identity(teacher: str, image_size: int, dtype: str) -> dict:
    return {"version": CACHE_VERSION, "teacher": teacher, "image_size": image_size, "dtype": dtype}


def _read_index(folder: Path, identity: dict) -> list[dict]:
    """Shards of an earlier run that are intact and made by the same teacher and settings."""
    path = folder / INDEX_NAME
    if not path.exists():
        return []
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("teacher cache index %s is unreadable: recomputing", path)
        return []
    if index.get("identity") != identity:
        log.warning("teacher cache %s was made with %s, not %s: recomputing", folder, index.get("identity"), identity)
        return []
    intact = []
    for shard in index.get("shards", []):
        file = folder / shard["file"]
        if file.is_file() and sha256_file(file) == shard["sha256"]:
            intact.append(shard)
        else:
            log.warning("teacher cache shard %s is missing or corrupt: recomputing it", file.name)
    return intact


def build_teacher_cache(
    teacher_encoder: torch.nn.Module,
    teacher_description: str,
    sources: list[ImageSource],
    folder: Path,
    image_size: int,
    dtype: str = "float16",
    shard_size: int = 64,
    device: str = "cpu",
    batch_size: int = 4,
) -> CacheResult:
    """Embeddings of every source, shard by shard; returns how many were computed and reused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = _identity(teacher_description, image_size, dtype)
    shards = _read_index(folder, identity)
    planned = [sources[i : i + shard_size] for i in range(0, len(sources), shard_size)]
    kept = {tuple(s["keys"]): s for s in shards}
    index_shards: list[dict] = []
    computed = reused = 0
    start = time.perf_counter()
    todo = sum(len(chunk) for chunk in planned if tuple(s.key for s in chunk) not in kept)
    progress = tqdm(total=todo, desc="teacher embeddings", unit="img", dynamic_ncols=True)
    teacher_encoder = teacher_encoder.to(device).eval()
    for number, chunk in enumerate(planned):
        keys = tuple(source.key for source in chunk)
        if keys in kept:
            index_shards.append(kept[keys])
            reused += len(chunk)
            continue
        embeddings = []
        for offset in range(0, len(chunk), batch_size):
            batch = torch.stack(
                [prepare_for_encoder(s.read_rgb(), image_size) for s in chunk[offset : offset + batch_size]]
            )
            with torch.no_grad():
                embeddings.append(teacher_encoder(batch.to(device)).to("cpu", getattr(torch, dtype)))
            progress.update(len(batch))
            progress.set_postfix(img_s=f"{progress.n / max(time.perf_counter() - start, 1e-9):.2f}")
        buffer = io.BytesIO()
        torch.save({"keys": list(keys), "embeddings": torch.cat(embeddings)}, buffer)
        name = f"shard_{number:05d}.pt"
        atomic_write_bytes(folder / name, buffer.getvalue())
        index_shards.append({"file": name, "keys": list(keys), "sha256": sha256_file(folder / name)})
        computed += len(chunk)
        atomic_write_json(folder / INDEX_NAME, {"identity": identity, "shards": index_shards})
    progress.close()
    atomic_write_json(folder / INDEX_NAME, {"identity": identity, "shards": index_shards})
    return CacheResult(folder, computed, reused, time.perf_counter() - start)


def load_teacher_cache(folder: Path) -> dict[str, torch.Tensor]:
    """key -> embedding in the cache's dtype, after checking every shard's checksum.

    Shards are memory-mapped, not read into RAM: 1% of SA-1B at 1024 is about 110k x 2 MB of
    fp16 embeddings, far more than memory; each step reads only the embeddings it uses."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise PipelineError(f"no teacher cache at {folder} (run `python -m distillation cache` first)")
    index = json.loads(path.read_text())
    embeddings: dict[str, torch.Tensor] = {}
    for shard in index["shards"]:
        file = folder / shard["file"]
        if not file.is_file() or sha256_file(file) != shard["sha256"]:
            raise PipelineError(f"teacher cache shard {file} is missing or does not match its checksum")
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        embeddings.update(zip(payload["keys"], payload["embeddings"], strict=True))
    return embeddings
