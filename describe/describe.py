"""THE description path: a list of image files, a model, a quality -> descriptors.

Index builds and additions (`index.store`), `vpr index search`, evaluation
(`evaluation.evaluate`), the distillation's teacher targets
(`train.distill_data.TeacherTargets`), `vpr model embed` and the benches all
call `describe` (one model) or `describe_many` (several models sharing one
decode-and-degrade pass, as evaluation does for its query models).

How a call goes:

1. Identity: each image is its content sha256 (`cache.image_sha256`),
   hashed in a small thread pool.
2. Per model, its cache context (weights, preprocessing with the small-image
   policy, quality, degradation version, device kind, extras; see
   `describe.cache`) says which entries the cache already holds; those are
   read, the rest is to do.
3. The images some model still needs are decoded and degraded by the thread
   pool a few batches ahead of the network, once for all models.
4. Each model's inputs (`preprocess.to_input` with its preprocessing) go
   through `model.extract.embed_inputs`, THE forward pass (same-size batches),
   run by the model's engine (`model.engines`, part of the cache context).
5. Every `chunk_size` new images, each model's new entries are appended to
   the cache as one shard, so a killed run resumes from its last finished
   chunk (the next call skips what the cache holds).

An undecodable image raises an error naming the file, or with `skip_bad`
becomes a NaN row (never cached) that the caller drops. Extras are per-image
arrays computed from the conv feature map in the same forward pass (the
distillation's channel correlations); they are cached beside the descriptor
and, with a cache, read back on demand (`CachedRows`) rather than held in memory.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpr.describe.cache import CachedRows, Context, DescriptorCache, Lookup, image_sha256
from vpr.media.degrade import Degraded, Quality, degrade, parse_quality
from vpr.model.config import SMALL_POLICIES, PreprocessConfig
from vpr.model.engines import Engine, prepare, reference_engine
from vpr.model.extract import embed_inputs, model_device
from vpr.model.preprocess import ImageDecodeError, ImageTooLarge, load_image, query_config, to_input
from vpr.model.registry import LoadedModel

log = logging.getLogger(__name__)

POLICIES = SMALL_POLICIES  # the small-image policies an override may name
AHEAD = 4  # batches decoded and degraded ahead of the network

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # conv map (1, C, h, w) -> (1, ...)
# A model's preprocessing -> the one to describe with (e.g. `model.preprocess.database_config`,
# or `query_config` with a database's side); the result is part of the cache key.
Resize = Callable[[PreprocessConfig], PreprocessConfig]
Progress = Callable[[int, int], None]  # (images done, total)


@dataclass
class Described:
    """One model's descriptors of one list of images at one quality."""

    desc: np.ndarray  # (N, D) float32; NaN rows for images skipped as undecodable
    nbytes: np.ndarray  # (N,) int64 compressed size, -1 when not compressed
    kbps: np.ndarray  # (N,) float64 video bitrate, NaN when not video
    computed: int = 0
    cached: int = 0
    skipped: int = 0
    seconds: float = 0.0
    # per extra name: (N, ...) rows, an array or read on demand from the cache (`rows[ids]`)
    extras: dict[str, np.ndarray | CachedRows] = field(default_factory=dict)

    def cost(self) -> dict[str, float | None]:
        """What the degraded images cost to send, on average (None when nothing was compressed)."""
        nb = self.nbytes[self.nbytes >= 0]
        kb = self.kbps[~np.isnan(self.kbps)]
        return {
            "mean_bytes": float(nb.mean()) if nb.size else None,
            "mean_bitrate_kbps": float(kb.mean()) if kb.size else None,
        }


def with_policy(cfg: PreprocessConfig, policy: str | None) -> PreprocessConfig:
    """`cfg` with its small-image policy overridden (None: the model's own)."""
    if policy is None or cfg.small_policy == policy:
        return cfg
    if policy not in POLICIES:
        raise ValueError(f"unknown small-image policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return cfg.model_copy(update={"small_policy": policy})


def describe(
    model: LoadedModel,
    paths: Sequence[Path | str],
    quality: Quality | str = "orig",
    *,
    cache: DescriptorCache | None = None,
    policy: str | None = None,
    batch_size: int = 8,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool | str = False,
    on_progress: Progress | None = None,
    skip_bad: bool = False,
    extras: Mapping[str, FeatureFn] | None = None,
    resize: Resize | None = None,
    engine: str | None = None,
) -> Described:
    """Descriptors of the image files `paths` degraded to `quality`, by one model
    (see `describe_many`)."""
    return describe_many(
        [model],
        paths,
        quality,
        cache=cache,
        policy=policy,
        batch_size=batch_size,
        chunk_size=chunk_size,
        device=device,
        progress=progress,
        on_progress=on_progress,
        skip_bad=skip_bad,
        extras=extras,
        resize=resize,
        engine=engine,
    )[0]


def describe_many(
    models: Sequence[LoadedModel],
    paths: Sequence[Path | str],
    quality: Quality | str = "orig",
    *,
    cache: DescriptorCache | None = None,
    policy: str | None = None,
    batch_size: int = 8,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool | str = False,
    on_progress: Progress | None = None,
    skip_bad: bool = False,
    extras: Mapping[str, FeatureFn] | None = None,
    resize: Resize | None = None,
    engine: str | None = None,
) -> list[Described]:
    """Descriptors of `paths` degraded to `quality`, for each of `models`.

    `policy` overrides every model's small-image policy (evaluation compares
    models under one). `device`: where to run (None: where each model's
    weights are). `progress`: a tqdm bar (a string names it); `on_progress`
    is called with (done, total) once for what the cache held, then per batch.
    `extras` maps a name to a function of one image's conv map whose result is
    stored beside the descriptor; the name is part of the cache key, so it must
    stand for one computation (version it when the function changes).
    `resize` maps each model's preprocessing (after `policy`) to the one used,
    which is how the `database` size rule reaches this loop.
    `engine`: how each model's forward pass runs (`model.engines`; None: the
    device's reference, `eager-fp32` on the CPU, `eager-bf16` on CUDA); its
    `cache_kind` is part of the cache key, so engines never share entries."""
    if not models:
        raise ValueError("describe: no model given")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive (got {batch_size}, {chunk_size})")
    q = parse_quality(quality)
    files = [Path(p) for p in paths]
    fns = dict(extras or {})
    t0 = time.perf_counter()
    n = len(files)
    with ThreadPoolExecutor(_workers()) as pool:
        hashes = list(pool.map(image_sha256, files))
        jobs = [_Job.start(m, hashes, q, policy, cache, device, fns, resize, engine) for m in models]
        need = np.flatnonzero(np.any(np.stack([j.todo for j in jobs]), axis=0)) if n else np.zeros(0, np.int64)
        done = n - len(need)
        if on_progress is not None and done:
            on_progress(done, n)
        batches = [need[s : s + batch_size] for s in range(0, len(need), batch_size)]
        label = progress if isinstance(progress, str) else f"describe {q}"
        bar = tqdm(total=n, initial=done, desc=label, unit="img", disable=not progress or not len(need))

        def submit(batch: np.ndarray) -> list[Future[Degraded | None]]:
            return [pool.submit(_load, files[i], q, skip_bad) for i in batch]

        ahead = deque(submit(b) for b in batches[:AHEAD])
        try:
            for k, batch in enumerate(batches):
                images = [f.result() for f in ahead.popleft()]
                if k + AHEAD < len(batches):
                    ahead.append(submit(batches[k + AHEAD]))
                for job in jobs:
                    job.run(batch, images, batch_size)
                    if cache is not None and len(job.unsaved) >= chunk_size:
                        job.flush(cache)
                done += len(batch)
                bar.update(len(batch))
                if on_progress is not None:
                    on_progress(done, n)
            if cache is not None:
                for job in jobs:
                    job.flush(cache)
        finally:
            bar.close()
            for futures in ahead:  # after an error: do not decode what nobody will use
                for f in futures:
                    f.cancel()
    seconds = time.perf_counter() - t0
    out = [job.finish(cache, seconds) for job in jobs]
    log.info(
        "described %d images at %s for %s: %d computed, %d from cache%s (%.1f s)",
        n,
        q,
        ", ".join(str(m.ref) for m in models),
        sum(o.computed for o in out),
        sum(o.cached for o in out),
        f", {sum(o.skipped for o in out)} undecodable skipped" if skip_bad else "",
        seconds,
    )
    return out


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _load(path: Path, q: Quality, skip_bad: bool) -> Degraded | None:
    """Decode and degrade one image (in a worker thread); None when undecodable and skipped."""
    try:
        return degrade(load_image(path), q)
    except (ImageDecodeError, ImageTooLarge) as e:
        if not skip_bad:
            raise
        log.warning("skipping %s", e)
        return None


@dataclass
class _Job:
    """One model's share of a describe call."""

    model: LoadedModel
    cfg: PreprocessConfig
    device: torch.device
    ctx: Context
    fns: dict[str, FeatureFn]
    hashes: list[str]  # the images' content hashes (their cache keys)
    out: Described
    todo: np.ndarray  # (N,) bool: still to compute
    unsaved: list[int] = field(default_factory=list)  # computed, not yet in the cache
    unsaved_extras: dict[str, list[np.ndarray]] = field(default_factory=dict)
    memory_extras: dict[str, list[np.ndarray | None]] = field(default_factory=dict)  # without a cache
    engine: Engine | None = None  # how the forward pass runs (set by `start`)

    @classmethod
    def start(
        cls,
        model: LoadedModel,
        hashes: list[str],
        q: Quality,
        policy: str | None,
        cache: DescriptorCache | None,
        device: torch.device | str | None,
        fns: dict[str, FeatureFn],
        resize: Resize | None = None,
        engine: str | None = None,
    ) -> _Job:
        cfg = with_policy(model.net.config.preprocess, policy)
        # without a rule, `database` prepares images as `upsample` does (no database size known)
        cfg = resize(cfg) if resize is not None else query_config(cfg, None)
        dev = torch.device(device) if device is not None else model_device(model.net)
        eng = prepare(model, engine or reference_engine(dev), dev)
        if fns and not eng.features:
            raise ValueError(f"engine {eng.name} returns no conv feature maps, which extras {sorted(fns)} need")
        ctx = Context(model.sha256, cfg, q, eng.cache_kind, tuple(sorted(fns)))
        n, dim = len(hashes), int(model.net.descriptor_dim)
        out = Described(np.zeros((n, dim), np.float32), np.full(n, -1, np.int64), np.full(n, np.nan))
        todo = np.ones(n, bool)
        if cache is not None and n:
            found = cache.lookup(ctx, hashes)
            hit = np.flatnonzero(found.found)
            if hit.size:
                desc = found.read("desc", hit)
                if desc.shape[1] != dim:
                    raise ValueError(
                        f"{found.folder}: cached descriptors are {desc.shape[1]}-d, {model.ref} gives {dim}"
                    )
                out.desc[hit] = desc
                out.nbytes[hit] = found.read("nbytes", hit)
                out.kbps[hit] = found.read("kbps", hit)
                todo[hit] = False
            out.cached = int(hit.size)
        job = cls(model, cfg, dev, ctx, fns, hashes, out, todo)
        job.engine = eng
        job.unsaved_extras = {k: [] for k in fns}
        job.memory_extras = {k: [None] * n for k in fns} if cache is None else {}
        return job

    def run(self, batch: np.ndarray, images: list[Degraded | None], batch_size: int) -> None:
        """Describe the images of `batch` (indices) this model still needs."""
        rows = [j for j, i in enumerate(batch) if self.todo[i]]
        good = [j for j in rows if images[j] is not None]
        for j in rows:
            i, d = int(batch[j]), images[j]
            self.todo[i] = False
            if d is None:
                self.out.desc[i] = np.nan
                self.out.skipped += 1
                continue
            self.out.nbytes[i] = -1 if d.nbytes is None else d.nbytes
            self.out.kbps[i] = np.nan if d.bitrate_kbps is None else d.bitrate_kbps
        if not good:
            return
        inputs = [to_input(images[j].image, self.cfg) for j in good]  # type: ignore[union-attr]
        forward = self.engine.embed if self.engine is not None else None
        desc, fmaps = embed_inputs(
            self.model.net, inputs, batch_size, self.device, return_features=bool(self.fns), forward=forward
        )
        idx = [int(batch[j]) for j in good]
        self.out.desc[idx] = desc
        self.out.computed += len(idx)
        self.unsaved.extend(idx)
        for name, fn in self.fns.items():
            values = [fn(f[None])[0].float().cpu().numpy() for f in fmaps]
            if self.memory_extras:
                for i, v in zip(idx, values):
                    self.memory_extras[name][i] = v
            else:
                self.unsaved_extras[name].extend(values)

    def flush(self, cache: DescriptorCache) -> None:
        """Append what was computed since the last flush to the cache as one shard."""
        if not self.unsaved:
            return
        rows = np.asarray(self.unsaved)
        arrays = {"desc": self.out.desc[rows], "nbytes": self.out.nbytes[rows], "kbps": self.out.kbps[rows]}
        arrays |= {name: np.stack(v) for name, v in self.unsaved_extras.items()}
        # images repeated in one call share a hash; storing both rows is harmless
        cache.append(self.ctx, [self.hashes[i] for i in rows], arrays)
        self.unsaved = []
        self.unsaved_extras = {k: [] for k in self.fns}

    def finish(self, cache: DescriptorCache | None, seconds: float) -> Described:
        self.out.seconds = seconds
        if not self.fns:
            return self.out
        if cache is not None:  # every row is in the cache now: read them when asked
            found: Lookup = cache.lookup(self.ctx, self.hashes)
            self.out.extras = {name: CachedRows(found, name) for name in self.fns}
            return self.out
        for name, values in self.memory_extras.items():
            shape = next((v.shape for v in values if v is not None), (0,))
            nan = np.full(shape, np.nan, np.float32)  # skipped images
            self.out.extras[name] = np.stack([nan if v is None else v for v in values]) if values else nan[:0]
        return self.out
