"""`Serving`: one (query model, index) pair, the unit a request leases and a hot swap replaces.

Its own module so that the micro-batcher (which runs items of several pairs
side by side during a swap) and the runtime (which publishes pairs) share it
without importing each other.
"""

from __future__ import annotations

import functools

import torch

from vpr.index.meta import query_side
from vpr.index.store import LoadedIndex
from vpr.model.config import PreprocessConfig
from vpr.model.engines import Engine, prepare, reference_engine
from vpr.model.preprocess import query_config
from vpr.model.registry import LoadedModel, now_iso


class Serving:
    """One (model, index) pair; never changed once built, replaced whole."""

    def __init__(
        self,
        model: LoadedModel,
        index: LoadedIndex,
        device: torch.device,
        engine: Engine | None = None,
        engine_note: str | None = None,
    ) -> None:
        self.model, self.index, self.device = model, index, device
        # How the model's forward pass runs (`model.engines`; the runtime picks it from
        # VPR_ENGINE); `engine_note` says why it is not the one the setting named.
        self.engine = engine if engine is not None else prepare(model, reference_engine(device), device)
        self.engine_note = engine_note
        self.since = now_iso()

    @property
    def model_spec(self) -> str:
        return str(self.model.ref)

    @property
    def index_spec(self) -> str:
        return str(self.index.ref)

    @functools.cached_property
    def preprocess(self) -> PreprocessConfig:
        """How queries are prepared: the model's preprocessing under the index's
        size rule (policy `database`: resized to the side the index recorded;
        `model.preprocess.query_config`)."""
        return query_config(self.model.net.config.preprocess, query_side(self.index.manifest))
