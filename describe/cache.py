"""Descriptor cache: descriptors keyed by (model version, image, quality).

Layout under `HomeSettings.cache_dir`:

    descriptors/<model>@<version>-<sha256[:16]>/<quality>.d<degrade version>[.av<pyav>].npz

One bundle per model version and quality holds `keys`, `desc` (float32),
`nbytes` and `kbps` (what the degraded image cost; -1 / NaN when not
compressed). An entry's key is the image's content sha256 plus the size of
the network input it was computed from, so the cache is exact whatever the
small-image policy (the policy only matters when it changes the input size:
a large database image gives the same entry under `native` and `upsample`).
The weights' sha256 in the folder name keeps a re-created registry from
reading stale vectors.

Bundles are numpy `.npz` read with `allow_pickle=False` and written
atomically; concurrent writers merge what is on disk and the last rename
wins, so an entry may have to be recomputed but a bundle is never half
written. A corrupt bundle is logged and ignored (recomputed).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpr.media.degrade import DEGRADE_VERSION, Quality, parse_quality
from vpr.model.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class CacheHit:
    found: np.ndarray  # bool (N,)
    desc: np.ndarray | None  # (N, D) float32, rows valid where found
    nbytes: np.ndarray  # int64 (N,), -1 where unknown
    kbps: np.ndarray  # float64 (N,), NaN where unknown


def model_key(ref: str, sha256: str) -> str:
    return f"{ref}-{sha256[:16]}"


class DescriptorCache:
    def __init__(self, cache_dir: Path) -> None:
        self.root = Path(cache_dir) / "descriptors"

    def bundle_path(self, model: str, quality: Quality | str) -> Path:
        q = parse_quality(quality)
        name = f"{q}.d{DEGRADE_VERSION}"
        if q.is_video:
            import av

            name += f".av{av.__version__}"
        return self.root / model / f"{name}.npz"

    def _load(self, path: Path) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in ("keys", "desc", "nbytes", "kbps")}
            n = len(data["keys"])
            if data["desc"].ndim != 2 or any(len(v) != n for v in data.values()):
                raise ValueError("inconsistent array lengths")
            return data
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            log.warning("%s: unreadable descriptor cache bundle (%s); it will be recomputed", path, e)
            return None

    def get(self, model: str, quality: Quality | str, keys: Sequence[str]) -> CacheHit:
        n = len(keys)
        hit = CacheHit(np.zeros(n, bool), None, np.full(n, -1, np.int64), np.full(n, np.nan))
        data = self._load(self.bundle_path(model, quality))
        if data is None:
            return hit
        where = {k: i for i, k in enumerate(data["keys"].tolist())}
        rows = np.array([where.get(k, -1) for k in keys], dtype=np.int64)
        hit.found = rows >= 0
        if hit.found.any():
            hit.desc = np.zeros((n, data["desc"].shape[1]), np.float32)
            hit.desc[hit.found] = data["desc"][rows[hit.found]]
            hit.nbytes[hit.found] = data["nbytes"][rows[hit.found]]
            hit.kbps[hit.found] = data["kbps"][rows[hit.found]]
        return hit

    def put(
        self,
        model: str,
        quality: Quality | str,
        keys: Sequence[str],
        desc: np.ndarray,
        nbytes: Sequence[int | None] | None = None,
        kbps: Sequence[float | None] | None = None,
    ) -> Path:
        """Add entries (merging with what the bundle holds now) and write it atomically."""
        desc = np.ascontiguousarray(desc, dtype=np.float32)
        if desc.ndim != 2 or len(desc) != len(keys):
            raise ValueError(f"cache put: {len(keys)} keys for descriptors of shape {desc.shape}")
        n = len(keys)
        nb = np.array([-1 if v is None else int(v) for v in (nbytes if nbytes is not None else [None] * n)], np.int64)
        kb = np.array(
            [np.nan if v is None else float(v) for v in (kbps if kbps is not None else [None] * n)], np.float64
        )
        path = self.bundle_path(model, quality)
        old = self._load(path)
        new_keys = np.asarray(list(keys), dtype=str)
        if old is not None and old["desc"].shape[1] == desc.shape[1]:
            keep = ~np.isin(old["keys"], new_keys)
            new_keys = np.concatenate([old["keys"][keep].astype(str), new_keys])
            desc = np.concatenate([old["desc"][keep], desc])
            nb = np.concatenate([old["nbytes"][keep], nb])
            kb = np.concatenate([old["kbps"][keep], kb])
        elif old is not None:
            log.warning(
                "%s: cached descriptors have dimension %d, new ones %d; replacing the bundle",
                path,
                old["desc"].shape[1],
                desc.shape[1],
            )
        buf = io.BytesIO()
        np.savez(buf, keys=new_keys, desc=desc, nbytes=nb, kbps=kb)
        atomic_write_bytes(path, buf.getvalue())
        log.debug("cache %s: %d entries", path, len(new_keys))
        return path

    def clear(self, model: str | None = None) -> int:
        """Delete bundles (of one model, or all); returns how many."""
        import shutil

        base = self.root / model if model else self.root
        if not base.exists():
            return 0
        n = sum(1 for _ in base.rglob("*.npz"))
        shutil.rmtree(base)
        return n
