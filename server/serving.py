"""`Serving`: one (query model, index) pair, the unit a request leases and a hot swap replaces.

Its own module so that the micro-batcher (which runs items of several pairs
side by side during a swap) and the runtime (which publishes pairs) share it
without importing each other.
"""

from __future__ import annotations

import torch

from vpr.index.store import LoadedIndex
from vpr.model.config import PreprocessConfig
from vpr.model.registry import LoadedModel, now_iso


class Serving:
    """One (model, index) pair; never changed once built, replaced whole."""

    def __init__(self, model: LoadedModel, index: LoadedIndex, device: torch.device) -> None:
        self.model, self.index, self.device = model, index, device
        self.since = now_iso()

    @property
    def model_spec(self) -> str:
        return str(self.model.ref)

    @property
    def index_spec(self) -> str:
        return str(self.index.ref)

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.model.net.config.preprocess
