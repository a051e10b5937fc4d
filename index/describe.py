"""Resumable description of database images.

Describing a large database takes hours, so descriptors go to disk in chunk
files (`chunk-000000.npy`, one per `chunk_size` images, each written
atomically) inside a work folder keyed by the model's weights sha256 and the
image list (paths, sizes, mtimes). A restarted build with the same model and
images reuses every finished chunk; a changed image or model gets a new key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vpr.model.extract import extract
from vpr.model.fileio import atomic_write_bytes, atomic_write_json
from vpr.model.preprocess import ImageDecodeError, ImageTooLarge

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def work_key(model_sha256: str, paths: Sequence[Path]) -> str:
    """Hash of the model weights and of each image's path, size and mtime."""
    h = hashlib.sha256(model_sha256.encode())
    for p in paths:
        try:
            st = Path(p).stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: database image not found") from None
        h.update(f"\n{Path(p).resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _load_chunk(path: Path, rows: int, dim: int) -> np.ndarray | None:
    """A finished chunk, or None when missing or not what we expect."""
    if not path.exists():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        log.warning("%s: unreadable chunk (%s); describing it again", path, e)
        return None
    if arr.shape != (rows, dim) or arr.dtype != np.float32:
        log.warning("%s: chunk has shape %s, expected (%d, %d); describing it again", path, arr.shape, rows, dim)
        return None
    return arr


def _describe_batch(net, paths: Sequence[Path], batch_size: int, device, skip_bad: bool) -> np.ndarray:
    """Descriptors of one batch; an undecodable image raises (naming the file)
    or, with `skip_bad`, becomes a NaN row that the build drops."""
    try:
        return extract(net, list(paths), batch_size=batch_size, device=device)
    except (ImageDecodeError, ImageTooLarge):
        if not skip_bad:
            raise
    rows = []
    for p in paths:
        try:
            rows.append(extract(net, [p], batch_size=1, device=device)[0])
        except (ImageDecodeError, ImageTooLarge) as e:
            log.warning("skipping %s", e)
            rows.append(np.full(net.descriptor_dim, np.nan, np.float32))
    return np.stack(rows).astype(np.float32)


def describe_images(
    net,
    paths: Sequence[Path],
    model_sha256: str,
    work_root: Path,
    batch_size: int = 8,
    chunk_size: int = 256,
    device=None,
    progress: Progress | None = None,
    skip_bad: bool = False,
) -> tuple[np.ndarray, Path]:
    """(N, D) float32 descriptors of `paths`, resuming from `work_root/<key>`.

    Returns the descriptors and the work folder (delete it once the index that
    uses them is published)."""
    paths = [Path(p) for p in paths]
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive (got {batch_size}, {chunk_size})")
    dim = int(net.descriptor_dim)
    key = work_key(model_sha256, paths)
    work = Path(work_root) / key
    info_path = work / "work.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        chunk_size = int(info.get("chunk_size", chunk_size))  # chunk boundaries must not move
    else:
        atomic_write_json(
            info_path, {"model_sha256": model_sha256, "count": len(paths), "chunk_size": chunk_size, "dim": dim}
        )
    total = len(paths)
    out = np.empty((total, dim), np.float32)
    starts = range(0, total, chunk_size)
    reused = 0
    todo = []
    for i, start in enumerate(starts):
        stop = min(total, start + chunk_size)
        chunk = _load_chunk(work / f"chunk-{i:06d}.npy", stop - start, dim)
        if chunk is None:
            todo.append((i, start, stop))
        else:
            out[start:stop] = chunk
            reused += stop - start
    if reused:
        log.info("resuming: %d of %d descriptors already in %s", reused, total, work)
    done = reused
    if progress and reused:
        progress(done, total)
    bar = tqdm(total=total, initial=reused, desc="describe database", unit="img")
    for i, start, stop in todo:
        for b in range(start, stop, batch_size):
            be = min(stop, b + batch_size)
            out[b:be] = _describe_batch(net, paths[b:be], batch_size, device, skip_bad)
            done += be - b
            bar.update(be - b)
            if progress:
                progress(done, total)
        _save_npy(work / f"chunk-{i:06d}.npy", out[start:stop])
    bar.close()
    log.info("described %d images (%d reused, %d new)", total, reused, total - reused)
    return out, work


def remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
