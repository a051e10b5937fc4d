"""Positives and hard negatives for the weakly supervised triplet loss."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TripletConfig(BaseModel):
    """Weak supervision from positions (metres, e.g. UTM)."""

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(0.1, gt=0, description="in squared-distance units of unit descriptors")
    pos_dist: float = Field(10.0, gt=0, description="potential positives lie within this distance")
    neg_dist: float = Field(25.0, gt=0, description="negatives lie beyond this distance")
    negatives: int = Field(5, ge=1, description="negatives per anchor in the loss (the hardest)")
    refresh_every: int = Field(100, ge=1, description="steps between refreshes of the hard-negative cache")

    @model_validator(mode="after")
    def _order(self) -> TripletConfig:
        if self.neg_dist < self.pos_dist:
            raise ValueError(f"triplet neg_dist ({self.neg_dist}) must be >= pos_dist ({self.pos_dist})")
        return self


class NegativeMiner:
    """Positives and hard negatives for the triplet loss, from positions.

    - positive of image i: among the other images within `pos_dist`, the one
      whose teacher descriptor is most similar to i's (i itself when alone);
    - negatives: images farther than `neg_dist`. Every `refresh_every` steps
      the cache keeps, per image, the 2*negatives negatives most similar to the
      student's latest descriptor of it (updated as images pass through
      training); a step scores those plus `negatives` random ones with the
      current descriptor and uses the `negatives` hardest.
    Anchor = student descriptor of the degraded image; positive and negatives
    = teacher descriptors of originals, i.e. what the served index holds.
    """

    def __init__(
        self, utm: np.ndarray, teacher_desc: torch.Tensor, train_ids: np.ndarray, cfg: TripletConfig, seed: int
    ) -> None:
        self.cfg, self.seed = cfg, seed
        self.utm = np.asarray(utm, dtype=np.float64)
        self.teacher = teacher_desc
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.latest = teacher_desc.clone()
        self.pool = 2 * cfg.negatives
        self.hard = torch.full((len(utm), self.pool), -1, dtype=torch.int64)
        self.positive = self._positives()
        self.last_refresh: int | None = None

    def _distances(self, rows: np.ndarray) -> np.ndarray:
        cand = self.utm[self.train_ids]
        return np.linalg.norm(self.utm[rows][:, None, :] - cand[None, :, :], axis=2)

    def _positives(self) -> torch.Tensor:
        out = torch.arange(len(self.utm))
        for rows in np.array_split(self.train_ids, max(1, len(self.train_ids) // 256)):
            d = self._distances(rows)
            sims = (self.teacher[rows] @ self.teacher[self.train_ids].T).numpy()
            near = (d <= self.cfg.pos_dist) & (self.train_ids[None, :] != rows[:, None])
            sims[~near] = -np.inf
            best = sims.argmax(axis=1)
            has = near.any(axis=1)
            out[rows[has]] = torch.from_numpy(self.train_ids[best[has]])
        return out

    def refresh(self) -> None:
        for rows in np.array_split(self.train_ids, max(1, len(self.train_ids) // 256)):
            far = torch.from_numpy(self._distances(rows) > self.cfg.neg_dist)
            sims = self.latest[rows] @ self.teacher[self.train_ids].T
            sims[~far] = -torch.inf
            k = min(self.pool, sims.shape[1])
            top_sims, top = sims.topk(k, dim=1)
            ids = torch.from_numpy(self.train_ids)[top]
            ids[torch.isinf(top_sims)] = -1
            self.hard[rows, :k] = ids

    def maybe_refresh(self, step: int) -> None:
        if self.last_refresh is None or step - self.last_refresh >= self.cfg.refresh_every:
            self.refresh()
            self.last_refresh = step

    def observe(self, ids: list[int], desc: torch.Tensor) -> None:
        self.latest[ids] = desc.detach().float().cpu()

    def select(
        self, ids: list[int], anchor: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positive ids (B,), negative ids (B, M), mask (B, M)) for anchors `ids`."""
        rng = np.random.default_rng([self.seed, 29, step])
        m = self.cfg.negatives
        neg = torch.zeros(len(ids), m, dtype=torch.int64)
        mask = torch.zeros(len(ids), m, dtype=torch.bool)
        a = anchor.detach().float().cpu()
        for row, i in enumerate(ids):
            far = self.train_ids[np.linalg.norm(self.utm[self.train_ids] - self.utm[i], axis=1) > self.cfg.neg_dist]
            if far.size == 0:
                continue
            cached = self.hard[i][self.hard[i] >= 0].numpy()
            rand = rng.choice(far, size=min(m, far.size), replace=False)
            cand = torch.from_numpy(np.unique(np.concatenate([cached, rand])))
            sims = self.teacher[cand] @ a[row]
            take = cand[sims.topk(min(m, len(cand))).indices]
            neg[row, : len(take)] = take
            mask[row, : len(take)] = True
        return self.positive[ids], neg, mask

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "miner.latest": self.latest,
            "miner.hard": self.hard,
            "miner.last_refresh": torch.tensor(-1 if self.last_refresh is None else self.last_refresh),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "miner.latest" in tensors:
            self.latest = tensors["miner.latest"].clone()
            self.hard = tensors["miner.hard"].clone()
            last = int(tensors["miner.last_refresh"])
            self.last_refresh = None if last < 0 else last
