"""Recall@N evaluation of place-recognition models on degraded queries.

`recall_at_n` is THE recall function: exact search through
`index.knn.exact_knn` (the same FAISS code path as the server's Flat index),
then the share of queries whose first positive is among the top N.
Queries without any positive cannot be answered correctly and are left out
of the denominator; reports say how many there were.

`evaluate` describes the database with the database model (the teacher) at
original quality and the queries with each query model at each quality,
all under one small-image policy (`PreprocessConfig.small_policy`, possibly
overridden for every model alike), through THE description path
(`describe.describe`, with its descriptor cache), and returns a JSON-able report.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from vpr.data.datasets import Item, PlaceDataset
from vpr.data.spec import DatasetSpec
from vpr.describe.cache import DescriptorCache, image_sha256
from vpr.describe.describe import POLICIES, Described, describe, describe_many, with_policy
from vpr.index.faiss_backend import l2_normalize
from vpr.index.hubness import hubness, step_pair, step_similarity
from vpr.index.knn import exact_knn
from vpr.index.meta import Entry, description_record
from vpr.media.degrade import (
    DEGRADE_VERSION,
    VIDEO_SETTINGS,
    Quality,
    codec_info,
    degrade_sequence_files,
    parse_qualities,
    parse_quality,
)
from vpr.model.extract import default_device
from vpr.model.fileio import atomic_write_bytes, atomic_write_json
from vpr.model.preprocess import database_config, query_config
from vpr.model.registry import LoadedModel, Registry
from vpr.settings import HomeSettings, TrackSettings
from vpr.track.tracker import PROFILE_SAMPLE, DatabaseProfile, Tracker

log = logging.getLogger(__name__)

DEFAULT_NS = (1, 5, 10, 20)
NO_POSITIVE = -2  # rank code: the query has no positive
NOT_FOUND = -1  # rank code: no positive among the retrieved top k


# ---- recall -------------------------------------------------------------------


def _check_ns(ns: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(n) for n in ns}))
    except (TypeError, ValueError):
        raise ValueError(f"recall cut-offs must be integers, got {ns!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"recall cut-offs must be positive integers, got {ns!r}")
    return out


def first_positive_ranks(
    db_desc: np.ndarray, q_desc: np.ndarray, positives: Sequence[np.ndarray], k: int
) -> np.ndarray:
    """Per query, the 0-based rank of its first positive among the top `k`
    (NOT_FOUND if none there, NO_POSITIVE if it has no positive at all)."""
    if len(positives) != len(q_desc):
        raise ValueError(f"{len(positives)} positive lists for {len(q_desc)} query descriptors")
    if len(db_desc) == 0:
        raise ValueError("the database has no descriptors")
    k = max(1, min(int(k), len(db_desc)))
    _, ids = exact_knn(db_desc, q_desc, k)
    ranks = np.full(len(q_desc), NOT_FOUND, np.int64)
    for i, (row, pos) in enumerate(zip(ids, positives)):
        pos = np.asarray(pos, dtype=np.int64)
        if pos.size == 0:
            ranks[i] = NO_POSITIVE
            continue
        if pos.min() < 0 or pos.max() >= len(db_desc):
            raise ValueError(f"query {i}: positive index out of range 0..{len(db_desc) - 1}")
        hit = np.flatnonzero(np.isin(row, pos))
        if hit.size:
            ranks[i] = hit[0]
    return ranks


def recall_from_ranks(ranks: np.ndarray, ns: Sequence[int] = DEFAULT_NS) -> dict[int, float]:
    ns = _check_ns(ns)
    valid = ranks[ranks != NO_POSITIVE]
    if valid.size == 0:
        raise ValueError("no query has a positive in the database: recall is undefined")
    return {n: float(np.mean((valid >= 0) & (valid < n))) for n in ns}


def recall_at_n(
    db_desc: np.ndarray, q_desc: np.ndarray, positives: Sequence[np.ndarray], ns: Sequence[int] = DEFAULT_NS
) -> dict[int, float]:
    """THE recall@N: share of queries (with at least one positive) whose
    first positive is among the N nearest database descriptors."""
    ns = _check_ns(ns)
    return recall_from_ranks(first_positive_ranks(db_desc, q_desc, positives, max(ns)), ns)


# ---- evaluation ------------------------------------------------------------------


def resolve_policy(models: Sequence[LoadedModel], override: str | None) -> tuple[str, str]:
    """The one small-image policy of a run -> (policy, where it came from)."""
    if override is not None:
        if override not in POLICIES:
            raise ValueError(f"unknown small-image policy {override!r}; choose one of {', '.join(POLICIES)}")
        return override, "override"
    own = {str(m.ref): m.net.config.preprocess.small_policy for m in models}
    if len(set(own.values())) > 1:
        raise ValueError(
            "the models disagree on the small-image policy ("
            + ", ".join(f"{k}: {v}" for k, v in own.items())
            + "); pass --policy native|upsample to compare them under one policy"
        )
    return next(iter(own.values())), "models"


def _check_models(db: LoadedModel, queries: Sequence[LoadedModel]) -> list[str]:
    warnings = []
    for m in queries:
        if m.net.descriptor_dim != db.net.descriptor_dim:
            raise ValueError(
                f"query model {m.ref} gives {m.net.descriptor_dim}-d descriptors but database model "
                f"{db.ref} gives {db.net.descriptor_dim}-d: they cannot be compared"
            )
        if m.ref != db.ref and m.manifest.get("parent") != str(db.ref):
            msg = (
                f"query model {m.ref} is neither the database model {db.ref} nor its student "
                f"(parent: {m.manifest.get('parent')}); its descriptors may live in another space"
            )
            log.warning(msg)
            warnings.append(msg)
    return warnings


def _load_models(
    registry: Registry, db_model: str, query_models: Sequence[str], device: torch.device
) -> tuple[LoadedModel, list[LoadedModel]]:
    db = registry.load(db_model, device)
    loaded = {str(db.ref): db}
    out: list[LoadedModel] = []
    for spec in query_models:
        ref = str(registry.resolve(spec))
        if ref in {str(m.ref) for m in out}:
            raise ValueError(f"query model {ref} is listed twice")
        if ref not in loaded:
            loaded[ref] = registry.load(ref, device)
        out.append(loaded[ref])
    if not out:
        raise ValueError("name at least one query model")
    return db, out


def evaluate(
    registry: Registry,
    dataset: PlaceDataset,
    db_model: str,
    query_models: Sequence[str],
    qualities: Sequence[Quality | str] | str,
    policy: str | None = None,
    cache: DescriptorCache | None = None,
    ns: Sequence[int] = DEFAULT_NS,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    track: TrackSettings | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Recall of each query model at each quality against the database model at orig.

    With `track`, each query folder (sorted by name) is a sequence fed to THE
    tracker (track/tracker.py) frame by frame, and every result also gets
    `track_recall` (same keys as `recall`): the share of queries whose first
    positive is among the top N of the tracker's ranking (its belief, most
    likely first, then the frame's own candidates). A video quality then
    degrades each sequence as one encode (`degrade_sequence_files`, frames
    kept under `work_dir`), and `recall` is measured on those same frames, so
    both numbers of a result see the same pixels."""
    t0 = time.perf_counter()
    ns = _check_ns(ns)
    quals = parse_qualities(qualities) if isinstance(qualities, str) else [parse_quality(q) for q in qualities]
    if len(set(quals)) != len(quals):
        raise ValueError(f"a quality is listed twice in {[str(q) for q in quals]}")
    device = torch.device(device) if device is not None else default_device()
    db, qms = _load_models(registry, db_model, query_models, device)
    used, source = resolve_policy([db, *qms], policy)
    warnings = _check_models(db, qms)
    log.info(
        "evaluating %s: %d database, %d queries; db model %s; query models %s; qualities %s; policy %s (%s)",
        dataset.name,
        len(dataset.database),
        len(dataset.queries),
        db.ref,
        ", ".join(str(m.ref) for m in qms),
        ", ".join(map(str, quals)),
        used,
        source,
    )
    # the size rule as the index and the server apply it (policy `database`): the
    # database at its own size, queries resized to the side the database was described at
    db_paths = [i.path for i in dataset.database]
    record = description_record(db_paths, database_config(with_policy(db.net.config.preprocess, used)))
    side = int(record["side"]) if record else None
    db_out = describe(
        db,
        db_paths,
        "orig",
        cache=cache,
        policy=used,
        resize=database_config,
        batch_size=batch_size,
        device=device,
        progress=f"database ({db.ref})" if progress else False,
    )
    results: list[dict[str, Any]] = []
    seqs = query_sequences(dataset.queries) if track is not None else []
    hub = database_hubness(db_out.desc, dataset) if track is not None else None
    profile = track_profile(dataset, db_out.desc) if track is not None else None
    for q in quals:
        kw: dict[str, Any] = {
            "cache": cache,
            "policy": used,
            "batch_size": batch_size,
            "device": device,
            "resize": partial(query_config, side=side),
        }
        label = f"queries {q}" if progress else False
        cost: dict[str, Any] | None = None
        if track is not None and q.is_video:
            outs, cost = _describe_sequences(qms, dataset.queries, seqs, q, work_dir, cache, label, kw)
        else:
            outs = describe_many(qms, [i.path for i in dataset.queries], q, progress=label, **kw)
        for m, out in zip(qms, outs):
            t1 = time.perf_counter()
            ranks = first_positive_ranks(db_out.desc, out.desc, dataset.positives, max(ns))
            rec = recall_from_ranks(ranks, ns)
            tracked: dict[str, Any] = {}
            if track is not None:
                t_ranks = tracked_ranks(db_out.desc, out.desc, dataset, seqs, track, max(ns), hub, profile)
                t_rec = recall_from_ranks(t_ranks, ns)
                tracked = {
                    "track_recall": {str(n): t_rec[n] for n in ns},
                    "track": {
                        "sequences": len(seqs),
                        "sequence_encoded": q.is_video,
                        # the tracker's motion model for this database (track/tracker.py)
                        "mode": profile.mode if profile else None,
                        "hubness": hub is not None,
                        # (mean, spread) cosine of places one spacing apart: standing vs moving from frames
                        "step_similarity": list(profile.step) if profile and profile.step else None,
                        **track.model_dump(),
                    },
                }
            results.append(
                {
                    "query_model": str(m.ref),
                    "quality": str(q),
                    "recall": {str(n): rec[n] for n in ns},
                    **tracked,
                    "num_queries": int((ranks != NO_POSITIVE).sum()),
                    "num_queries_without_positive": int((ranks == NO_POSITIVE).sum()),
                    "policy": used,
                    **(cost if cost is not None else out.cost()),
                    "describe_seconds": round(out.seconds, 3),
                    "search_seconds": round(time.perf_counter() - t1, 4),
                    "computed": out.computed,
                    "cached": out.cached,
                }
            )
    order = {str(m.ref): i for i, m in enumerate(qms)}
    qorder = {str(q): i for i, q in enumerate(quals)}
    results.sort(key=lambda r: (order[r["query_model"]], qorder[r["quality"]]))
    return {
        "results": results,
        "db_model": str(db.ref),
        "query_models": [str(m.ref) for m in qms],
        "qualities": [str(q) for q in quals],
        "ns": list(ns),
        "policy": used,
        "policy_source": source,
        "dataset": dataset.summary(),
        "database": {
            "count": len(dataset.database),
            "quality": "orig",
            "describe_seconds": round(db_out.seconds, 3),
            "computed": db_out.computed,
            "cached": db_out.cached,
        },
        "device": str(device),
        "codec": codec_info(),
        "warnings": warnings,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }


# ---- sequences and the tracker -------------------------------------------------------


def query_sequences(queries: Sequence[Item]) -> list[np.ndarray]:
    """Query indices grouped by folder (folders by name), each sorted by file name:
    the sequences `--track` feeds to the tracker."""
    by_folder: dict[str, list[int]] = {}
    for i, item in enumerate(queries):
        by_folder.setdefault(str(Path(item.path).parent), []).append(i)
    return [
        np.array(sorted(ids, key=lambda i: Path(queries[i].path).name), np.int64)
        for _, ids in sorted(by_folder.items())
    ]


def database_hubness(db_desc: np.ndarray, dataset: PlaceDataset) -> np.ndarray | None:
    """Each database place's hubness as an index build of these descriptors records it (index/hubness.py)."""
    return hubness(l2_normalize(db_desc), [Entry.of(it).utm for it in dataset.database])


def track_profile(dataset: PlaceDataset, db_desc: np.ndarray | None = None) -> DatabaseProfile:
    """The tracker's view of the database (its motion mode and spacing; with
    `db_desc`, the step similarity), as a server's index of it gives it."""
    metas = [it.meta() for it in dataset.database[:PROFILE_SAMPLE]]
    step = None
    if db_desc is not None:
        record = step_similarity(l2_normalize(db_desc), [Entry.of(it).utm for it in dataset.database])
        step = step_pair(record, dataset.name)
    return DatabaseProfile.from_rows(metas, len(dataset.database), step=step)


def tracked_ranks(
    db_desc: np.ndarray,
    q_desc: np.ndarray,
    dataset: PlaceDataset,
    seqs: Sequence[np.ndarray],
    settings: TrackSettings,
    k: int,
    hub: np.ndarray | None,
    profile: DatabaseProfile | None = None,
) -> np.ndarray:
    """Per query, the rank of its first positive in the tracker's ranking after
    that frame (NOT_FOUND / NO_POSITIVE as in `first_positive_ranks`). The
    tracker sees each sequence causally, one frame at a time, with the same
    candidates (`settings.candidates` nearest database places) a server would
    give it, and their hubness (`database_hubness`, None for raw scores), and
    each frame's own descriptor (the tracker reads standing vs moving from it).
    `profile`: `track_profile(dataset, db_desc)` when the caller has it."""
    metas = [it.meta() for it in dataset.database]
    profile = profile or track_profile(dataset, db_desc)
    depth = max(1, min(max(settings.candidates, k), len(db_desc)))
    scores, ids = exact_knn(db_desc, q_desc, depth)
    ranks = np.full(len(q_desc), NOT_FOUND, np.int64)
    for seq in seqs:
        tracker = Tracker(settings, profile)
        for t, qi in enumerate(seq):
            cand = ids[qi, : settings.candidates]
            tracker.observe(
                cand,
                scores[qi, : settings.candidates],
                [metas[j] if j >= 0 else None for j in cand],
                at=t,
                hubness=None if hub is None else hub[np.maximum(cand, 0)],
                descriptor=q_desc[qi],
            )
            order = list(dict.fromkeys([*tracker.ranking().tolist(), *ids[qi].tolist()]))[:k]
            pos = np.asarray(dataset.positives[qi], np.int64)
            if pos.size == 0:
                ranks[qi] = NO_POSITIVE
                continue
            hit = np.flatnonzero(np.isin(order, pos))
            if hit.size:
                ranks[qi] = hit[0]
    return ranks


def _describe_sequences(
    models: Sequence[LoadedModel],
    queries: Sequence[Item],
    seqs: Sequence[np.ndarray],
    q: Quality,
    work_dir: Path | None,
    cache: DescriptorCache | None,
    label: str | bool,
    kw: dict[str, Any],
) -> tuple[list[Described], dict[str, Any]]:
    """Each sequence degraded as one video encode, its frames described at orig
    (THE description path, with its cache); rows in the dataset's query order."""
    import tempfile

    if work_dir is None and cache is not None:
        work_dir = cache.root.parent / "sequences"
    tmp = tempfile.TemporaryDirectory() if work_dir is None else None
    root = Path(tmp.name) if tmp is not None else Path(work_dir)  # type: ignore[arg-type]
    try:
        files: list[Path] = [Path()] * len(queries)
        nbytes, frames = 0, 0
        for seq in seqs:
            paths = [Path(queries[i].path) for i in seq]
            key = _sequence_key(paths, q)
            written, clip = degrade_sequence_files(paths, q, root / key)
            for i, f in zip(seq, written):
                files[i] = f
            nbytes += clip.nbytes or 0
            frames += len(seq)
        outs = describe_many(models, files, "orig", progress=label, **kw)
    finally:
        if tmp is not None:
            tmp.cleanup()
    fps = float(VIDEO_SETTINGS["fps"])
    cost = {
        "mean_bytes": nbytes / frames if frames else None,
        "mean_bitrate_kbps": nbytes * 8 * fps / frames / 1000.0 if frames else None,
    }
    return outs, cost


def _sequence_key(paths: Sequence[Path], q: Quality) -> str:
    """Names the folder of one degraded sequence: its frames' contents, their order, the spec."""
    import hashlib

    import av

    h = hashlib.sha256(f"{q}|{DEGRADE_VERSION}|{av.__version__}".encode())
    for p in paths:
        h.update(image_sha256(p).encode())
    return h.hexdigest()[:24]


# ---- reporting -------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report's results."""
    ns = report.get("ns") or sorted(int(k) for k in report["results"][0]["recall"])
    head = (
        f"{'query model':<24} {'quality':<18}"
        + "".join(f"{'R@' + str(n):>8}" for n in ns)
        + f"{'n':>7}{'kbps':>10}{'bytes':>9}"
    )
    lines = [f"database {report.get('db_model')} at orig; policy {report.get('policy')}", head, "-" * len(head)]
    tracked = any("track_recall" in r for r in report["results"])
    if tracked:
        lines[1] = (
            lines[1][: 43 + 8 * len(ns)] + "".join(f"{'T@' + str(n):>8}" for n in ns) + lines[1][43 + 8 * len(ns) :]
        )
        lines[2] = "-" * len(lines[1])
    for r in report["results"]:
        kbps = r.get("mean_bitrate_kbps")
        nb = r.get("mean_bytes")
        lines.append(
            f"{r['query_model']:<24} {r['quality']:<18}"
            + "".join(f"{r['recall'][str(n)]:>8.3f}" for n in ns)
            + ("".join(f"{r['track_recall'][str(n)]:>8.3f}" for n in ns) if tracked else "")
            + f"{r['num_queries']:>7}"
            + (f"{kbps:>10.0f}" if kbps is not None else f"{'-':>10}")
            + (f"{nb:>9.0f}" if nb is not None else f"{'-':>9}")
        )
    return "\n".join(lines)


def plot_series(series: dict[str, list[tuple[str, float]]], out: Path, title: str, ylabel: str = "recall@1") -> Path:
    """Line plot of a metric against quality (categorical x axis, in the
    order first seen), one line per series; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not series:
        raise ValueError("nothing to plot")
    qualities: list[str] = []
    for pts in series.values():
        for q, _ in pts:
            if q not in qualities:
                qualities.append(q)
    width = max(6.0, 1.1 * len(qualities) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.5), dpi=110)
    try:
        styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v", "P")
        for k, (label, pts) in enumerate(series.items()):
            xs = [qualities.index(q) for q, _ in pts]
            # distinct dashes and markers keep coinciding lines visible
            ax.plot(
                xs,
                [v for _, v in pts],
                linestyle=styles[k % len(styles)],
                marker=markers[k % len(markers)],
                markersize=7 - (k % 3),
                label=label,
                alpha=0.9,
            )
        ax.set_xticks(range(len(qualities)))
        ax.set_xticklabels(qualities, rotation=30, ha="right")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("query quality")
        ax.set_ylabel(ylabel)
        # about 10 characters per inch at this size; wrap rather than crop
        ax.set_title(textwrap.fill(title, width=int(width * 10)), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def plot_report(report: dict[str, Any], out: Path) -> Path:
    series: dict[str, list[tuple[str, float]]] = {}
    for r in report["results"]:
        series.setdefault(r["query_model"], []).append((r["quality"], r["recall"]["1"]))
    for r in report["results"]:  # tracked recall@1 beside each model's per-frame line
        if "track_recall" in r:
            series.setdefault(f"{r['query_model']} tracked", []).append((r["quality"], r["track_recall"]["1"]))
    title = f"{report['dataset']['name']}: database {report['db_model']} at orig, policy {report['policy']}"
    if any("track_recall" in r for r in report["results"]):
        title += "; tracked: each query folder a sequence"
    return plot_series(series, out, title)


@dataclass
class EvalConfig:
    """Everything one `vpr eval` run needs (built by the CLI)."""

    home: HomeSettings
    source: DatasetSpec
    db_model: str
    query_models: list[str]
    qualities: str | list[str]
    json_out: Path | None = None
    plot_out: Path | None = None
    policy: str | None = None
    ns: Sequence[int] = DEFAULT_NS
    batch_size: int = 8
    device: str | None = None
    use_cache: bool = True
    limit: int | None = None
    progress: bool = True
    track: bool = False  # also track_recall: each query folder a sequence through the tracker
    extra: dict[str, Any] = field(default_factory=dict)


def run_eval(cfg: EvalConfig, out: TextIO | None = None) -> dict[str, Any]:
    """Open the dataset, evaluate, write the JSON report (and plot), print the table."""
    out = out or sys.stdout
    quals = parse_qualities(cfg.qualities)  # fail on a bad spec before any heavy work
    if cfg.json_out is not None and Path(cfg.json_out).is_dir():
        raise ValueError(f"{cfg.json_out}: is a folder; --json needs a file name")
    dataset = cfg.source.open()
    if cfg.limit is not None:
        dataset = dataset.subset_queries(cfg.limit)
    cache = DescriptorCache(cfg.home.cache_dir) if cfg.use_cache else None
    report = evaluate(
        Registry(cfg.home.models_dir),
        dataset,
        cfg.db_model,
        cfg.query_models,
        quals,
        cfg.policy,
        cache,
        cfg.ns,
        cfg.batch_size,
        cfg.device,
        cfg.progress,
        track=TrackSettings() if cfg.track else None,
        work_dir=cfg.home.cache_dir / "sequences" if cfg.use_cache else None,
    )
    report["source"] = str(cfg.source)
    report.update(cfg.extra)
    if cfg.json_out is not None:
        atomic_write_json(Path(cfg.json_out), report)
        log.info("wrote %s", cfg.json_out)
    if cfg.plot_out is not None:
        plot_report(report, Path(cfg.plot_out))
        log.info("wrote %s", cfg.plot_out)
    print(format_table(report), file=out)
    for w in report["warnings"]:
        print(f"warning: {w}", file=out)
    return report
