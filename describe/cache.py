"""THE descriptor cache: what a model made of an image at a quality, on disk.

Key. An entry is one image, named by its content (`image_sha256`), under one
*context*: everything else its descriptor depends on (`Context`):

- the model's weights sha256 (from its registry manifest),
- its preprocessing (`PreprocessConfig`, small-image policy included) as canonical JSON,
- the quality (canonical spec), the degradation code version
  (`media.degrade.DEGRADE_VERSION`) and, for video codecs, the PyAV version,
- the engine's `cache_kind` (`model.engines`): how the forward pass ran. The
  reference engines keep the keys of before engines (`cpu-fp32`, `cuda-bf16`:
  CUDA runs under bf16 autocast); others add their name (`cpu-eager-bf16-cl`)
  and, for an exported file, its sha256 (`cpu-onnx-int8-<sha16>`), so bf16 or
  int8 descriptors never mix with fp32 ones,
- the names of the extra per-image arrays stored beside the descriptor
  (e.g. the distillation's channel correlation), and this module's format.

The context's sha256 (over its canonical JSON) names a folder; the same
weights under another model name share entries, and anything that changes
the pixels, the input or the arithmetic gets a folder of its own.

Layout under `HomeSettings.cache_dir` (an index build uses a private root
that it deletes once the index is published, see `index.store`):

    descriptors/<weights sha256[:16]>/<context sha256[:24]>/
        context.json                    what the folder's hash covers (for people)
        shard-<ns>-<pid>-<rand>/        one chunk of entries, written once
            keys.npy                    (N,) image content sha256 (hex)
            desc.npy                    (N, D) float32
            nbytes.npy                  (N,) int64 compressed size, -1 when not compressed
            kbps.npy                    (N,) float64 video bitrate, NaN when not video
            <extra>.npy                 (N, ...) float32 per extra array

Why shards: the describe loop appends one shard per chunk of images as it
goes, so a killed run keeps every finished chunk and the next one skips it
(resuming a database build), and adding entries never rewrites old ones
(a growing single bundle would make a million-image build quadratic).
A shard is a folder published by one rename (`fileio.staged_dir`), so it is
either complete or absent. Arrays are `.npy` files read with
`allow_pickle=False` and memory-mapped, so reading a few rows (a training
batch's channel correlations) reads only those rows. Concurrent writers add
their own shards; an image described twice has two equal entries and the
newest is used. A shard that does not read back consistently is logged,
deleted and its images described again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpr.media.degrade import DEGRADE_VERSION, Quality, parse_quality
from vpr.model.config import PreprocessConfig
from vpr.model.fileio import atomic_write_json, sha256_file, staged_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout or the meaning of an entry changes
BASE_ARRAYS = ("desc", "nbytes", "kbps")
STALE_TEMP_S = 3600  # a hidden shard folder this old was left by a killed writer


# ---- what identifies an image ------------------------------------------------------------
_hashes: dict[tuple[int, int, int, int], str] = {}
_hashes_lock = threading.Lock()
_MAX_REMEMBERED = 1 << 20


def image_sha256(path: Path | str) -> str:
    """THE identity of an image file: the sha256 of its bytes (a replaced file
    with the same name is a new image; a copy elsewhere is the same one).

    Remembered per process by (device, inode, size, mtime), so describing the
    same files again (every training step reads the prefix cache) hashes each once."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such image") from None
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _hashes.get(stamp)
    if known is not None:
        return known
    digest = sha256_file(p)
    with _hashes_lock:
        if len(_hashes) >= _MAX_REMEMBERED:
            _hashes.clear()
        _hashes[stamp] = digest
    return digest


def device_kind(device: Any) -> str:
    """The reference engine's cache kind on `device` (see `model.engines`): CUDA
    runs under bf16 autocast, so its numbers differ from the CPU's. Describing
    with another engine keys entries by that engine's `cache_kind` instead."""
    import torch

    return "cuda-bf16" if torch.device(device).type == "cuda" else "cpu-fp32"


def preprocess_json(cfg: PreprocessConfig) -> str:
    """Canonical JSON of a preprocessing config (sorted keys, no spaces)."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


# ---- what identifies the rest ------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """Everything a cached descriptor depends on besides the image."""

    weights_sha256: str
    preprocess: PreprocessConfig
    quality: Quality
    device_kind: str  # the engine's cache_kind
    extras: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        q = parse_quality(self.quality)
        out: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "weights_sha256": self.weights_sha256,
            "preprocess": json.loads(preprocess_json(self.preprocess)),
            "quality": str(q),
            "degrade_version": DEGRADE_VERSION,
            "device": self.device_kind,
            "extras": sorted(self.extras),
        }
        if q.is_video:  # FFmpeg's encoders decide these pixels
            import av

            out["pyav"] = av.__version__
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()

    def arrays(self) -> tuple[str, ...]:
        return (*BASE_ARRAYS, *sorted(self.extras))


# ---- where the entries are ---------------------------------------------------------------
@dataclass
class Lookup:
    """Where each requested image's entry is: `shards[shard[i]]`, row `row[i]` (shard -1: not cached)."""

    folder: Path
    shards: list[Path]
    shard: np.ndarray  # (N,) int64
    row: np.ndarray  # (N,) int64
    _maps: dict[tuple[int, str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def found(self) -> np.ndarray:
        return self.shard >= 0

    def read(self, name: str, which: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of array `name` for the requested images `which` (all must be found)."""
        which = np.asarray(which, dtype=np.int64)
        if which.size and not self.found[which].all():
            raise KeyError(f"{self.folder}: {int((~self.found[which]).sum())} requested images are not cached")
        parts: list[np.ndarray] = []
        order: list[np.ndarray] = []
        for s in np.unique(self.shard[which]):
            pick = np.flatnonzero(self.shard[which] == s)
            parts.append(np.asarray(self._map(int(s), name)[self.row[which[pick]]]))
            order.append(pick)
        if not parts:
            return np.zeros((0,), np.float32)
        out = np.empty((len(which), *parts[0].shape[1:]), parts[0].dtype)
        for pick, part in zip(order, parts):
            out[pick] = part
        return out

    def _map(self, s: int, name: str) -> np.ndarray:
        m = self._maps.get((s, name))
        if m is None:
            m = np.load(self.shards[s] / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            self._maps[(s, name)] = m
        return m


class CachedRows:
    """One array of a context, per requested image, read on demand (`rows[ids]`)."""

    def __init__(self, lookup: Lookup, name: str) -> None:
        self.lookup, self.name = lookup, name

    def __len__(self) -> int:
        return len(self.lookup.shard)

    def __getitem__(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.lookup.read(self.name, ids)


class DescriptorCache:
    def __init__(self, cache_dir: Path | str) -> None:
        self.root = Path(cache_dir) / "descriptors"

    def folder(self, ctx: Context) -> Path:
        return self.root / ctx.weights_sha256[:16] / ctx.digest()[:24]

    def lookup(self, ctx: Context, images: Sequence[str]) -> Lookup:
        """Where the entries of `images` (content hashes) are, reading only the shards' key lists."""
        folder = self.folder(ctx)
        n = len(images)
        shards: list[Path] = []
        where: dict[str, tuple[int, int]] = {}
        for shard in self._shards(folder):
            keys = self._check(shard, ctx)
            if keys is None:
                continue
            shards.append(shard)
            s = len(shards) - 1
            where.update((str(k), (s, r)) for r, k in enumerate(keys.tolist()))
        shard_of, row_of = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        for i, key in enumerate(images):
            hit = where.get(key)
            if hit is not None:
                shard_of[i], row_of[i] = hit
        used = np.unique(shard_of[shard_of >= 0])
        remap = np.full(len(shards) + 1, -1, np.int64)  # index -1 stays -1
        remap[used] = np.arange(len(used))
        return Lookup(folder, [shards[i] for i in used], remap[shard_of], row_of)

    def append(self, ctx: Context, images: Sequence[str], arrays: Mapping[str, np.ndarray]) -> Path:
        """Write one shard with these entries (`arrays` holds every name of `ctx.arrays()`)."""
        names = ctx.arrays()
        if set(arrays) != set(names):
            raise ValueError(f"cache append: arrays {sorted(arrays)}, context wants {sorted(names)}")
        n = len(images)
        if any(len(a) != n for a in arrays.values()):
            raise ValueError(f"cache append: {n} images, arrays of lengths {[len(a) for a in arrays.values()]}")
        folder = self.folder(ctx)
        if not (folder / "context.json").exists():
            atomic_write_json(folder / "context.json", ctx.fields())
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        with staged_dir(folder / name) as tmp:
            np.save(tmp / "keys.npy", np.asarray(list(images), dtype="U64"), allow_pickle=False)
            for key in names:
                np.save(tmp / f"{key}.npy", np.ascontiguousarray(arrays[key]), allow_pickle=False)
        log.debug("cache %s: +%d entries", folder / name, n)
        return folder / name

    def clear(self, weights_sha256: str | None = None) -> int:
        """Delete the shards of one model's weights (or all); returns how many."""
        base = self.root / weights_sha256[:16] if weights_sha256 else self.root
        if not base.exists():
            return 0
        n = sum(1 for _ in base.glob("**/shard-*"))
        shutil.rmtree(base)
        return n

    # -- reading shards back
    @staticmethod
    def _shards(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        out = []
        now = time.time()
        for p in sorted(folder.iterdir()):
            if p.name.startswith("shard-"):
                out.append(p)
            elif p.name.startswith(".shard-") and ".tmp-" in p.name:
                try:  # debris of a writer killed mid-shard
                    if now - p.stat().st_mtime > STALE_TEMP_S:
                        shutil.rmtree(p, ignore_errors=True)
                except FileNotFoundError:
                    pass
        return out

    @staticmethod
    def _check(shard: Path, ctx: Context) -> np.ndarray | None:
        """The shard's keys when every array reads back with one row per key; else
        log, delete the shard (its images are described again) and return None."""
        try:
            keys = np.load(shard / "keys.npy", allow_pickle=False)
            if keys.ndim != 1:
                raise ValueError(f"keys have shape {keys.shape}")
            for name in ctx.arrays():
                a = np.load(shard / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                if len(a) != len(keys) or (name == "desc" and (a.ndim != 2 or a.dtype != np.float32)):
                    raise ValueError(f"{name}.npy has shape {a.shape} ({a.dtype}) for {len(keys)} keys")
            return keys
        except (OSError, ValueError, EOFError) as e:
            log.warning(
                "%s: unreadable descriptor cache shard (%s); deleting it, its images will be described again", shard, e
            )
            shutil.rmtree(shard, ignore_errors=True)
            return None
