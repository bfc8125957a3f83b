"""The teacher's embeddings, computed once and stored in shards (the paper's precompute step).

Layout of a cache folder (`<out>/teacher_cache/` unless `--cache-dir`):
- `shard_<id>.safetensors`: one tensor `embeddings` (N x 256 x S/16 x S/16, fp16 or fp32) for the
  photo keys in its metadata. `<id>` is a digest of those keys: shards are named by content.
- `shard_<id>.json`: the shard's record (keys, identity, sha256 computed when the shard was
  written), written after the shard: a shard without its record is redone.
- `index.json`: the identity (teacher, size, dtype) and every record of the current photo list,
  in order: the one merged index training reads.

Which photos share a shard is decided by the photos' keys, not their positions (content-defined
chunking: a shard ends after a key whose digest is 0 modulo `shard_size`), so inserting a photo
changes the one shard it falls in and no other.

Under torchrun every rank checks a share of the shards, then embeds an even share of the
**photos** that are missing (`photo_shares`: contiguous ranges of the shards' rows, within one
photo of each other, whatever the shard sizes). A shard that falls whole in one rank's range is
written by that rank; one split between ranks is written by each as a piece
(`<shard>.rows<a>-<b>.safetensors`) and joined by one rank; rank 0 merges the records. Each
shard's sha256 is computed once when written and checked once per job (by one rank) when a run
resumes, or on demand with `python -m distillation verify`; training then reads
embeddings row by row from the memory-mapped shards without hashing them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from distillation.data import ImageSource, prepare_for_encoder
from pipeline.errors import PipelineError
from pipeline.files import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
INDEX_NAME = "index.json"
CACHE_VERSION = 2
METADATA_KEY = "distill_cache"
MAX_SHARD_FACTOR = 4
"""A shard closes after `MAX_SHARD_FACTOR x shard_size` keys even without a content boundary."""

Gather = Callable[[object], list]
"""all_gather of one picklable object per rank (identity for one process)."""


def _single_process_gather(value: object) -> list:
    return [value]


@dataclass(frozen=True)
class ShardRecord:
    file: str
    keys: tuple[str, ...]
    sha256: str

    def to_json(self) -> dict:
        return {"file": self.file, "keys": list(self.keys), "sha256": self.sha256}

    @staticmethod
    def from_json(payload: dict) -> ShardRecord:
        return ShardRecord(payload["file"], tuple(payload["keys"]), payload["sha256"])


@dataclass(frozen=True)
class RankWork:
    """What one rank did: the photos it embedded and the seconds it was busy (embedding, writing
    and joining), so an imbalance between ranks shows in the report."""

    rank: int
    photos: int
    busy_seconds: float
    extra: int = 0
    """Rows computed and dropped: a batch cell cut by this rank's range is computed whole (at most
    `batch_size - 1` rows at each end of the range), so every batch is the one a single rank runs."""

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "photos": self.photos,
            "busy_seconds": round(self.busy_seconds, 3),
            "extra_rows": self.extra,
        }


@dataclass(frozen=True)
class CacheResult:
    folder: Path
    computed: int
    reused: int
    seconds: float
    world_size: int = 1
    ranks: tuple[RankWork, ...] = ()

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else float("nan")

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder),
            "computed": self.computed,
            "reused": self.reused,
            "seconds": self.seconds,
            "world_size": self.world_size,
            "images_per_second": self.images_per_second,
            "ranks": [work.to_json() for work in self.ranks],
        }


def cache_identity(teacher: str, image_size: int, dtype: str) -> dict:
    return {"version": CACHE_VERSION, "teacher": teacher, "image_size": image_size, "dtype": dtype}


def _key_digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def plan_shards(keys: list[str], shard_size: int) -> list[tuple[str, ...]]:
    """The photo keys of each shard, decided by the keys themselves (see the module docstring)."""
    shards: list[tuple[str, ...]] = []
    current: list[str] = []
    for key in keys:
        current.append(key)
        if _key_digest(key) % shard_size == 0 or len(current) >= MAX_SHARD_FACTOR * shard_size:
            shards.append(tuple(current))
            current = []
    if current:
        shards.append(tuple(current))
    return shards


def shard_stem(keys: tuple[str, ...]) -> str:
    return "shard_" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]


def share_of(sizes: list[int], rank: int, world_size: int) -> list[int]:
    """Indices of the shards rank `rank` handles: largest first to the least loaded rank (ties to
    the lower rank), so ranks finish together; a pure function of the sizes, the same on every rank."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = target
        load[target] += sizes[index]
    return [i for i, r in enumerate(owner) if r == rank]


@dataclass(frozen=True)
class Piece:
    """Rows `start`..`stop` of shard `shard` (an index into the planned shards)."""

    shard: int
    start: int
    stop: int


def photo_shares(sizes: list[int], world_size: int) -> list[list[Piece]]:
    """Each rank's contiguous range of the shards' rows, in order, as pieces of shards: the ranges
    hold `total * r // world_size` ... photos, so no two ranks differ by more than one photo,
    whatever the shard sizes. A pure function of the sizes, the same on every rank."""
    total = sum(sizes)
    bounds = [total * rank // world_size for rank in range(world_size + 1)]
    shares: list[list[Piece]] = []
    for rank in range(world_size):
        low, high = bounds[rank], bounds[rank + 1]
        pieces, offset = [], 0
        for shard, size in enumerate(sizes):
            start, stop = max(low, offset), min(high, offset + size)
            if start < stop:
                pieces.append(Piece(shard, start - offset, stop - offset))
            offset += size
        shares.append(pieces)
    return shares


def _record_if_intact(folder: Path, keys: tuple[str, ...], identity: dict) -> ShardRecord | None:
    """The shard's record when its file is there, made by this teacher and setting, for exactly these
    keys, and its bytes still hash to the sha256 recorded when it was written."""
    stem = shard_stem(keys)
    sidecar, file = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not (sidecar.is_file() and file.is_file()):
        return None
    try:
        payload = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("teacher cache record %s is unreadable: recomputing its shard", sidecar.name)
        return None
    if payload.get("identity") != identity or tuple(payload.get("keys", ())) != keys:
        return None
    if sha256_file(file) != payload.get("sha256"):
        log.warning("teacher cache shard %s does not match its checksum: recomputing it", file.name)
        return None
    return ShardRecord(file.name, keys, payload["sha256"])


def _write_shard(folder: Path, keys: tuple[str, ...], embeddings: torch.Tensor, identity: dict) -> ShardRecord:
    stem = shard_stem(keys)
    data = safetensors_bytes(
        {"embeddings": embeddings.contiguous()},
        metadata={METADATA_KEY: json.dumps({"keys": list(keys), "identity": identity})},
    )
    file = folder / f"{stem}.safetensors"
    atomic_write_bytes(file, data)
    record = ShardRecord(file.name, keys, hashlib.sha256(data).hexdigest())
    atomic_write_json(folder / f"{stem}.json", {**record.to_json(), "identity": identity})
    return record


PIECE_GLOB = "shard_*.rows*.safetensors"


def _write_piece(folder: Path, keys: tuple[str, ...], piece: Piece, embeddings: torch.Tensor, identity: dict) -> str:
    """Rows of a shard split between ranks, for `_join_pieces`; named by the shard and the rows."""
    name = f"{shard_stem(keys)}.rows{piece.start}-{piece.stop}.safetensors"
    rows = list(keys[piece.start : piece.stop])
    data = safetensors_bytes(
        {"embeddings": embeddings.contiguous()},
        metadata={METADATA_KEY: json.dumps({"keys": rows, "identity": identity})},
    )
    atomic_write_bytes(folder / name, data)
    return name


def _join_pieces(folder: Path, keys: tuple[str, ...], pieces: list[tuple[int, str]], identity: dict) -> ShardRecord:
    """One shard from its pieces (rows in order, every row once), then the pieces are removed."""
    tensors = []
    expected = 0
    for start, name in pieces:
        with safe_open(str(folder / name), framework="pt") as handle:
            metadata = json.loads(handle.metadata()[METADATA_KEY])
            part = handle.get_tensor("embeddings")
        if (
            start != expected
            or metadata["identity"] != identity
            or metadata["keys"] != list(keys[start : start + len(part)])
        ):
            raise PipelineError(f"teacher cache piece {name} does not continue its shard at row {expected}")
        tensors.append(part)
        expected += len(part)
    if expected != len(keys):
        raise PipelineError(f"teacher cache shard {shard_stem(keys)}: pieces hold {expected} of {len(keys)} rows")
    record = _write_shard(folder, keys, torch.cat(tensors), identity)
    for _, name in pieces:
        (folder / name).unlink(missing_ok=True)
    return record


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
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = _single_process_gather,
) -> CacheResult:
    """Embeddings of every source, shard by shard; under torchrun each rank takes its share.

    Intact shards of an earlier run (same keys, teacher and settings, matching sha256) are kept,
    so an interrupted cache resumes where it stopped. Returns computed and reused counts (all
    ranks) and the wall time of this call."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    identity = cache_identity(teacher_description, image_size, dtype)
    by_key = {source.key: source for source in sources}
    planned = plan_shards([source.key for source in sources], shard_size)

    if rank == 0:  # pieces of a killed run: their shard is redone whole or in new pieces
        for stale in folder.glob(PIECE_GLOB):
            stale.unlink(missing_ok=True)

    # 1. each rank checks its share of the shards an earlier run may have left
    checked = share_of([len(keys) for keys in planned], rank, world_size)
    mine = {i: _record_if_intact(folder, planned[i], identity) for i in checked}
    found: dict[int, ShardRecord] = {}
    for part in gather({i: r for i, r in mine.items() if r is not None}):
        found.update(part)

    # 2. the missing photos, an even share per rank whatever the shard sizes, are embedded
    missing = [i for i in range(len(planned)) if i not in found]
    busy_start = time.perf_counter()
    pieces = [
        Piece(missing[piece.shard], piece.start, piece.stop)
        for piece in photo_shares([len(planned[i]) for i in missing], world_size)[rank]
    ]
    todo = sum(piece.stop - piece.start for piece in pieces)
    progress = tqdm(total=todo, desc=f"teacher embeddings (rank {rank})", unit="img", dynamic_ncols=True)
    teacher_encoder = teacher_encoder.to(device).eval()
    written: dict[int, ShardRecord] = {}
    split: dict[int, list[tuple[int, str]]] = {}
    extra = 0
    for piece in pieces:
        keys = planned[piece.shard]
        embeddings = []
        # every batch is a cell of the shard's own grid of `batch_size` rows, whichever rank computes
        # it: a photo's embedding can depend on its batch's size (the GEMM kernels differ), so a rank
        # whose range cuts a cell computes the whole cell and keeps its rows (`RankWork.extra`)
        for offset in range(piece.start - piece.start % batch_size, piece.stop, batch_size):
            cell = keys[offset : offset + batch_size]
            batch = torch.stack([prepare_for_encoder(by_key[key].read_rgb(), image_size) for key in cell])
            with torch.no_grad():
                result = teacher_encoder(batch.to(device)).to("cpu", getattr(torch, dtype))
            kept = slice(max(piece.start - offset, 0), min(piece.stop - offset, len(cell)))
            embeddings.append(result[kept])
            extra += len(cell) - (kept.stop - kept.start)
            progress.update(kept.stop - kept.start)
        if (piece.start, piece.stop) == (0, len(keys)):
            written[piece.shard] = _write_shard(folder, keys, torch.cat(embeddings), identity)
        else:
            split[piece.shard] = [(piece.start, _write_piece(folder, keys, piece, torch.cat(embeddings), identity))]
    progress.close()
    joined: dict[int, list[tuple[int, str]]] = {}
    for part in gather(split):
        for shard, files in part.items():
            joined.setdefault(shard, []).extend(files)
    # each split shard is joined by one rank, the shards balanced over the ranks
    split_shards = sorted(joined)
    for j in share_of([len(planned[i]) for i in split_shards], rank, world_size):
        shard = split_shards[j]
        written[shard] = _join_pieces(folder, planned[shard], sorted(joined[shard]), identity)
    mine = RankWork(rank, todo, time.perf_counter() - busy_start, extra)
    gathered = gather((written, mine))
    for shards, _ in gathered:
        found.update(shards)
    ranks = tuple(work for _, work in gathered)

    # 3. one merged index, in the photos' order
    if rank == 0:
        records = [found[i].to_json() for i in range(len(planned))]
        atomic_write_json(folder / INDEX_NAME, {"identity": identity, "shards": records})
    gather(None)  # nobody reads the index before it is written
    computed = sum(len(planned[i]) for i in missing)
    elapsed = time.perf_counter() - start
    return CacheResult(folder, computed, len(sources) - computed, elapsed, world_size, ranks)


def read_index(folder: Path) -> tuple[dict, list[ShardRecord]]:
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise PipelineError(f"no teacher cache at {folder} (run `python -m distillation cache` first)")
    try:
        index = json.loads(path.read_text())
        return index["identity"], [ShardRecord.from_json(shard) for shard in index["shards"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise PipelineError(f"{path} is not a teacher cache index ({error}); rerun the cache command") from None


def verify_teacher_cache(folder: Path, rank: int = 0, world_size: int = 1, gather: Gather = _single_process_gather):
    """Hash every shard of the index against its recorded sha256 (each rank its share); returns
    the names of the shards that are missing or damaged, on every rank."""
    folder = Path(folder)
    _, records = read_index(folder)
    bad = [
        records[i].file
        for i in share_of([len(r.keys) for r in records], rank, world_size)
        if not (folder / records[i].file).is_file() or sha256_file(folder / records[i].file) != records[i].sha256
    ]
    return sorted(name for part in gather(bad) for name in part)


class TeacherCache(Mapping[str, torch.Tensor]):
    """key -> embedding (the cache's dtype), read row by row from memory-mapped shards.

    1% of SA-1B at 1024 is about 110k x 2 MB of fp16 embeddings, far more than memory: nothing is
    read until asked for, and nothing is hashed (the cache command checked or wrote every shard);
    a missing or truncated shard is refused with its name. Picklable, so DataLoader workers get it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.identity, records = read_index(self.folder)
        self._where = {key: (record.file, row) for record in records for row, key in enumerate(record.keys)}
        self._open: dict[str, object] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def _shard(self, name: str):
        handle = self._open.get(name)
        if handle is None:
            path = self.folder / name
            if not path.is_file():
                raise PipelineError(f"teacher cache shard {path} is missing (rerun the cache command)")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as error:  # safetensors raises its own types for a damaged header
                raise PipelineError(
                    f"teacher cache shard {path} is unreadable ({error}); rerun the cache command"
                ) from None
            self._open[name] = handle
        return handle

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            name, row = self._where[key]
        except KeyError:
            raise KeyError(key) from None
        return self._shard(name).get_slice("embeddings")[row : row + 1][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_teacher_cache(folder: Path) -> TeacherCache:
    return TeacherCache(folder)
