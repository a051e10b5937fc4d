"""The cache of the student's frozen-prefix outputs: distillation made cheap on a
CPU without changing its result.

The student's frozen lower layers see a given (image, quality) pair always
the same way (degradation is deterministic), so their output is fixed: each
training step then only runs the trainable upper layers. On VGG16 with
conv5 + NetVLAD training that is roughly 1/7 of a full forward and backward
pass. (The teacher's targets are descriptors, so they live in THE descriptor
cache, `describe.cache`; these are intermediate activations.)

`TensorCache` keeps entries in a memory LRU bounded in bytes and, optionally,
as safetensors files in a folder (so reruns with other learning rates or
loss weights, and resumed runs, reuse them). Keys are strings that name
everything the tensors depend on (images by `describe.cache.image_sha256`);
files appear by rename (never half written) and are read with safetensors
(never unpickled). A corrupt or unreadable file is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

Entry = dict[str, torch.Tensor]


def write_replace(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file.
    No fsync: a cache entry lost in a crash is only recomputed, and fsyncing
    thousands of entries would cost more than computing them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def entry_bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class TensorCache:
    """get_or_compute(key, fn) with a byte-bounded memory LRU and an optional disk tier."""

    def __init__(self, max_bytes: int, folder: Path | None = None) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.folder = Path(folder) if folder is not None else None
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.disk_hits = self.misses = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        h = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / h[:2] / f"{h}.safetensors"  # type: ignore[operator]

    def _remember(self, key: str, entry: Entry) -> None:
        size = entry_bytes(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._mem:
                return
            self._mem[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._mem.popitem(last=False)
                self._bytes -= entry_bytes(old)

    def _read_disk(self, key: str) -> Entry | None:
        if self.folder is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return st_load(data)
        except Exception as e:  # a truncated or foreign file: recompute and overwrite
            log.warning("%s: unreadable cache entry (%s); recomputing", path, e)
            return None

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return entry
        entry = self._read_disk(key)
        if entry is not None:
            self.disk_hits += 1
            self._remember(key, entry)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        entry = {k: v.detach().cpu().contiguous() for k, v in entry.items()}
        if self.folder is not None:
            write_replace(self._path(key), st_save(entry))
        self._remember(key, entry)

    def get_or_compute(self, key: str, compute: Callable[[], Entry]) -> Entry:
        entry = self.get(key)
        if entry is None:
            self.misses += 1
            entry = compute()
            self.put(key, entry)
        return entry

    def stats(self) -> dict[str, int]:
        return {
            "memory_hits": self.hits,
            "disk_hits": self.disk_hits,
            "misses": self.misses,
            "memory_entries": len(self._mem),
            "memory_bytes": self._bytes,
        }
