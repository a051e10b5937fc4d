"""Label-free validation of a distillation run: choosing the epoch without the test.

The run's own images decide which epoch is registered and when training stops,
so no query, and no ground truth, is ever looked at:

- A share of the training images (`fraction`, evenly spread along the list,
  so along the route for a sequence) is held out: the student never trains on them.
- Two rules (`rule`):
  - `self` (the default): the validation database is the teacher's descriptors
    of ALL the images at full quality, held-out ones included, as the served
    index would hold them. A held-out image is right when its first match is
    its own original, or, when the images have positions, any database image
    within `radius` metres of it (a neighbour of the same place).
  - `neighbours`: harder, and closer to what a query is (another view of a
    place, not a copy of a database image): the held-out images are left out
    of the validation database, and one is right when its first match is a
    neighbour: an image within `radius` metres with positions, else within
    `NEIGHBOURS` places along the list (the images of a traversal, in order).
    The `self` rule finds the image's own original nearly always (0.94-0.97
    on the Gardens Point runs), which leaves it little to tell epochs apart.
- Each held-out image, degraded to each validation quality (the training
  qualities and always `orig`, so that forgetting full quality shows), is
  described by the student and searched in that database.
- The score of an epoch is the mean recall@1 over the validation qualities,
  ties broken by the held-out distillation loss (lower is better): recall@1
  is coarse with few held-out images, the loss is not.
- Which epoch is best (`improves`), two ways (`DistillConfig.epoch_choice`):
  - `exact`: the highest recall@1, ties broken by the loss.
  - `within-noise`: recalls closer than one standard error of a difference
    (`margin`, about 5 points with 50 held-out queries) count as tied, so the
    loss decides between them. With 10-20 held-out images a recall@1 that is
    one or two queries lower is not evidence that an epoch is worse.

`train.distill.Distiller` computes it after every epoch (and once before
training, the teacher's own score), registers the best epoch and stops after
`patience` epochs without a better score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

log = logging.getLogger(__name__)

ORIG = "orig"
RECALL_NS = (1, 5)
RULES = ("self", "neighbours")
NEIGHBOURS = 2  # `neighbours` rule without positions: images this many places along the list count as right


@dataclass(frozen=True)
class ValidationSet:
    """Who is held out, what counts as right for each, and at which qualities."""

    val_ids: np.ndarray  # indices of held-out images among all the run's images
    positives: list[np.ndarray]  # per held-out image: rows of the validation database that count as right
    qualities: list[str]
    radius: float | None  # metres; None: no positions
    rule: str = "self"
    database_ids: np.ndarray | None = None  # images in the validation database (None: all of them)


def holdout_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): round(n * fraction) images evenly spread over
    range(n), never the first or last (a route's ends have one neighbour only)."""
    n_val = int(round(n * fraction))
    if n_val == 0:
        return np.arange(n), np.zeros(0, np.int64)
    if n - n_val < 2:
        raise ValueError(f"a validation share of {fraction} leaves {n - n_val} of {n} images to train on")
    step = n / n_val
    val = np.unique(np.clip((np.arange(n_val) * step + step / 2).astype(np.int64), 0, n - 1))
    return np.setdiff1d(np.arange(n), val), val


def validation_qualities(qualities: Sequence[str]) -> list[str]:
    """The training qualities with `orig` first (added when absent)."""
    return [ORIG, *[q for q in qualities if q != ORIG]]


def make_validation_set(
    n: int,
    fraction: float,
    qualities: Sequence[str],
    utm: np.ndarray | None = None,
    radius: float = 25.0,
    rule: str = "self",
) -> tuple[np.ndarray, ValidationSet | None]:
    """Split `n` images and name each held-out image's right answers (`rule`,
    see the module doc; `utm`: (n, 2) metres). Under `neighbours` a held-out
    image without any neighbour in the validation database is left out of it."""
    if rule not in RULES:
        raise ValueError(f"unknown validation rule {rule!r}; one of {', '.join(RULES)}")
    train_ids, val_ids = holdout_split(n, fraction)
    if not len(val_ids):
        return train_ids, None
    xy = None if utm is None else np.asarray(utm, np.float64)
    reach = NEIGHBOURS if rule == "neighbours" else 0

    def near(i: int) -> np.ndarray:  # the images that count as the same place as image i (i included)
        if xy is not None:
            return np.flatnonzero(np.linalg.norm(xy - xy[i], axis=1) <= radius)
        return np.arange(max(0, i - reach), min(n, i + reach + 1))

    radius_or_none = None if xy is None else radius
    if rule == "self":
        positives = [np.union1d(near(int(i)), [i]).astype(np.int64) for i in val_ids]
        return train_ids, ValidationSet(val_ids, positives, validation_qualities(qualities), radius_or_none)
    # the held-out images are not in the validation database; one with no neighbour there trains instead
    in_db = np.zeros(n, bool)
    in_db[train_ids] = True
    kept = [i for i in val_ids.tolist() if in_db[near(i)].any()]
    if len(kept) < len(val_ids):
        log.warning("validation: %d held-out image(s) have no neighbour and train instead", len(val_ids) - len(kept))
        train_ids = np.union1d(train_ids, np.setdiff1d(val_ids, kept)).astype(np.int64)
    row_of = np.full(n, -1, np.int64)
    row_of[train_ids] = np.arange(train_ids.size)
    positives = [rows[rows >= 0] for rows in (row_of[near(i)] for i in kept)]
    if not kept:
        return train_ids, None
    return train_ids, ValidationSet(
        np.asarray(kept, np.int64), positives, validation_qualities(qualities), radius_or_none, rule, train_ids
    )


def self_retrieval(db_desc: np.ndarray, q_desc: np.ndarray, positives: Sequence[np.ndarray]) -> dict[str, float]:
    """recall@1 and @5 of held-out queries against the whole database (THE
    recall function of `evaluation.evaluate`)."""
    from vpr.evaluation.evaluate import recall_at_n

    ns = tuple(n for n in RECALL_NS if n <= len(db_desc)) or (1,)
    rec = recall_at_n(db_desc, q_desc, list(positives), ns=ns)
    return {f"recall@{n}": float(rec.get(n, rec[max(rec)])) for n in RECALL_NS}


def rule_name(rule: str) -> str:
    """The rule as run records name it ("self-retrieval" since before there were two)."""
    return "self-retrieval" if rule == "self" else rule


def summarise(per_quality: dict[str, dict[str, float]], rule: str = "self", queries: int = 0) -> dict[str, Any]:
    """Means over the validation qualities, beside the per-quality values
    (`queries`: how many held-out queries the recall counts, over all qualities)."""
    out: dict[str, Any] = {"per_quality": per_quality, "rule": rule_name(rule), "queries": queries}
    for key in ("recall@1", "recall@5", "val_loss"):
        values = [v[key] for v in per_quality.values() if key in v]
        if values:
            out[key] = float(np.mean(values))
    return out


def score(val: dict[str, Any] | None, train_loss: float) -> tuple[float, ...]:
    """Higher is better: mean recall@1, then minus the held-out loss; without
    a validation set, minus the training loss (the only signal left)."""
    if not val:
        return (-train_loss,)
    return (float(val.get("recall@1", 0.0)), -float(val.get("val_loss", 0.0)))


EpochChoice = Literal["exact", "within-noise"]  # DistillConfig.epoch_choice
EPOCH_CHOICES: tuple[str, ...] = get_args(EpochChoice)


def margin(recall: float, queries: int) -> float:
    """One standard error of the difference between two recalls measured on
    `queries` queries each: sqrt(2 p (1 - p) / n), with p smoothed as
    (k + 1) / (n + 2) so that a recall of 1.0 still has a margin."""
    if queries <= 0:
        return 0.0
    p = (recall * queries + 1) / (queries + 2)
    return math.sqrt(2 * p * (1 - p) / queries)


def improves(
    new: Sequence[float], best: Sequence[float] | None, top: float, queries: int, choice: str = "exact"
) -> bool:
    """Whether an epoch scoring `new` (`score`) replaces the best so far.

    `top` is the highest recall@1 of any epoch so far, this one included. Under
    `within-noise` an epoch whose recall is within `margin` of `top` replaces
    the best when its held-out loss is lower; one whose recall beats the best's
    by more than the margin always does."""
    if choice not in EPOCH_CHOICES:
        raise ValueError(f"unknown epoch choice {choice!r}; one of {', '.join(EPOCH_CHOICES)}")
    if best is None:
        return True
    if choice == "exact" or len(new) == 1 or len(best) == 1:  # no validation: the training loss decides
        return tuple(new) > tuple(best)
    m = margin(top, queries)
    return new[0] > best[0] + m or (new[0] >= top - m and new[1] > best[1])


def should_stop(best_epoch: int, epoch: int, patience: int | None) -> bool:
    """Early stopping: `patience` epochs have passed since the best one."""
    return patience is not None and epoch - best_epoch >= patience
