"""Distil a registered teacher into a student for low-quality queries.

The method of Yang et al. ("Distillation Improves Visual Place Recognition
for Low-Quality Queries"): the student starts as a copy of the teacher; the
frozen teacher (eval mode) sees each training image as it is, the student a
degraded copy (a quality drawn per sample from a list, seeded); the losses of
`train.losses` pull the student's descriptor and conv maps of the degraded
image towards the teacher's of the original. Without positions the run is
label-free: any folder of images works (for instance the database images of
the place being served, so no query is ever seen). With positions, the
triplet loss becomes available. Either way a held-out share of the images
decides the registered epoch and when to stop (`train.validation`), a
quarter of the samples stay at full quality (`orig_share`), a share of the
degraded ones are also taken underexposed (`dim_share`, a quarter) and can
be taken in low light with the camera's gain (`low_light_share`) or by a
monochrome camera (`grey_share`), both off by default, the degraded levels
can be drawn in proportion to what there is to learn at each
(`level_weights`), a share of them can be seen through a shifted crop
(`crop_share`), and the student is trained at the input size an index of
its images records (the size rule of `model.preprocess`, inherited from the
teacher).

How a step is computed (and why it is cheap on a CPU):

- The teacher's descriptor and channel correlation of every image are
  computed once (through `describe.describe` and its descriptor cache).
- Only the student's top layers train (default: the backbone's last block
  and NetVLAD). The backbone is split at the first trainable layer into a
  frozen prefix and the rest (`StudentHead`); the prefix's output for an
  (image, quality) pair never changes, so it is cached too (on by default;
  `prefix_cache="off"` recomputes it each time, with the same result).
- BatchNorm layers (ResNets) keep their running statistics: batches are
  small, and frozen statistics keep the cached prefix valid. These backbones
  have no dropout, so the student runs in eval mode while its weights train.

Under `torchrun` the trainable head is wrapped in DistributedDataParallel
(`train.ddp`): each process takes its share of every epoch's shuffled images
and gradients are averaged; on CPU the same path runs with gloo.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import to_jsonable_python
from tqdm import tqdm

from vpr.describe.cache import DescriptorCache
from vpr.index.meta import DESCRIPTION_KEY, description_record, query_side
from vpr.model.extract import autocast_for, cpu_name
from vpr.model.network import VPRNet
from vpr.model.preprocess import database_config, query_config
from vpr.model.registry import ModelRef, Registry, check_name
from vpr.settings import HomeSettings
from vpr.train import ddp
from vpr.train.distill_cache import TensorCache
from vpr.train.distill_data import (
    PrefixRunner,
    TeacherTargets,
    collect_images,
    has_positions,
    mirrored,
    split_student,
    trainable_names,
)
from vpr.train.losses import DEFAULT_LOSS, LossSet, ickd_loss, mse_loss, parse_loss, region_loss, triplet_loss
from vpr.train.mining import NegativeMiner, TripletConfig
from vpr.train.run_state import RunFiles, RunState, load_optimizer, optimizer_tensors
from vpr.train.validation import (
    EpochChoice,
    improves,
    make_validation_set,
    rule_name,
    self_retrieval,
    should_stop,
    summarise,
)
from vpr.train.validation import score as validation_score

log = logging.getLogger(__name__)


# ---- configuration -------------------------------------------------------------
class DistillConfig(BaseModel):
    """Everything that defines a distillation run (recorded in its state and the student's manifest)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str
    name: str  # the student's registry name
    qualities: list[str]
    images: Path | None = None  # a folder of images: label-free
    dataset: str | None = None  # KIND:PATH of a dataset with positions (its database images train; data.spec)
    dataset_options: dict[str, Any] = {}  # the dataset reader's options (data.datasets)
    limit: int | None = Field(None, ge=1)  # use this many images, evenly spread (cheap runs)
    loss: str = DEFAULT_LOSS
    loss_weights: dict[str, float] | None = None
    trainable: list[str] | None = None  # backbone blocks + netvlad/pca; None: backbone default + netvlad
    # The schedule's length (with `patience` the validation may stop it earlier); the cosine spans it.
    # 20: on validation splits of the database traversal every run registered its last
    # epoch, at 5 and again at 10, and each doubling scored higher by a rule fixed before
    # its run (docs/PREREGISTRATIONS.md 11; docs/BENCHMARKS.md, issue 12). It costs up to
    # twice the training time of 10. 40 did not score higher: with patience 2 the early
    # stop cut those runs at epochs 14 and 21 (entry 12).
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)  # per process
    # 2e-4: over the same 20-epoch cosine it lifted the validation's dark twins by 5.6 points
    # and left the colour levels where they were (+0.1), by a rule fixed before the run
    # (docs/PREREGISTRATIONS.md 14; docs/BENCHMARKS.md, issue 12). 1e-4 before.
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # max global gradient norm; None: off
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    step_gamma: float = Field(0.5, gt=0, le=1)  # "step": lr factor per epoch
    seed: int = 0
    # Share of training samples at full quality (`orig`), drawn before the listed
    # qualities: a student distilled only on degraded copies forgets full quality,
    # and full-quality clients exist too (issue 12). 0.25 is one sample in four,
    # what adding `orig` to a list of three degraded levels gives. An `orig` in
    # `qualities` does not add to it (`plan_qualities`).
    orig_share: float = Field(0.25, ge=0, le=1)
    # Share of the degraded samples also taken in low light (`media.degrade`'s
    # -dark<F> step: F times less light, the camera's gain, its sensor noise),
    # for students whose training images are day images and whose clients send
    # night frames. Off by default: a quarter (fixed before any run) moved
    # Gardens Point night recall@1 by -2 to +0.5 points at 640 px and cost
    # 0.5-3.5 points at 9 of 10 small-image cells (docs/BENCHMARKS.md, issue
    # 12). The factor comes from the physics, not from a dataset: street
    # lighting gives about 1/1000 of daylight, a phone's longer exposure wins
    # back about 30x, the rest is gain.
    low_light_share: float = Field(0.0, ge=0, le=1)
    low_light_factor: int = Field(32, ge=2, le=1024)
    # Share of the degraded samples also taken by a monochrome camera (the -grey
    # step: luma in all three channels), drawn independently of low light: for
    # clients with mono sensors or IR night modes querying a colour database.
    grey_share: float = Field(0.0, ge=0, le=1)
    # Share of the degraded samples also taken underexposed (the -dim<F> step: the
    # low-light sensor model without the camera's gain, so the frame stays dark,
    # as from a camera at its exposure and gain limits; F=8, three stops, fixed
    # from that description). 0.25: on a validation split of the database
    # traversal it lifted recall@1 on -dim8 queries by 7.4 points and left the
    # other levels unchanged (-0.08), by a rule fixed before the run
    # (bench/distill_validate.py; docs/BENCHMARKS.md, issue 12).
    dim_share: float = Field(0.25, ge=0, le=1)
    dim_factor: int = Field(8, ge=2, le=1024)
    # Also train on each training image's left-right mirror (its own teacher
    # target; the held-out validation is unchanged): twice the label-free pairs.
    mirror: bool = False
    # How the listed degraded levels are drawn: "uniform", or "baseline-loss": each in
    # proportion to the untrained student's (= the teacher's) held-out loss at that level,
    # measured by the validation before the first epoch (`level_draw_weights`), so that
    # samples go where there is most to learn. Needs the validation (val_fraction > 0).
    level_weights: Literal["uniform", "baseline-loss"] = "uniform"
    # Share of the degraded samples the student sees through a window of `crop_fraction`
    # of each side of its frozen prefix's output, at a seeded random position (a shifted
    # view, as a query taken a step aside; `crop_view`); its targets stay the teacher's of
    # the whole original. `orig` samples and the validation always see whole images.
    crop_share: float = Field(0.0, ge=0, le=1)
    crop_fraction: float = Field(0.8, gt=0, le=1)
    # Held-out share of the images for the label-free validation that chooses the
    # registered epoch and stops training (train.validation); 0: off (then the
    # training loss chooses).
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_radius: float = Field(25.0, gt=0)  # with positions: neighbours within this many metres count as right
    # "self": a held-out image must find its own original (or a neighbour) among all the images;
    # "neighbours": the held-out images are left out and one must find a neighbour (train.validation)
    val_rule: Literal["self", "neighbours"] = "self"
    # Stop after this many epochs without a better validation score; None: train the whole
    # schedule (the validation still chooses the registered epoch). None by default: with 2,
    # a small held-out set ended runs while the learning rate was at its highest, and the
    # whole schedule scored higher on a validation split by a rule fixed before the run
    # (docs/PREREGISTRATIONS.md 15; docs/BENCHMARKS.md, issue 12).
    patience: int | None = Field(None, ge=1)
    # How the best epoch is chosen (train.validation.improves): "exact" (highest held-out
    # recall@1, then the held-out loss) or "within-noise" (recalls within one standard
    # error count as tied and the held-out loss decides). "within-noise" won on a
    # validation split of the database traversal, by a rule fixed before the run
    # (bench/distill_validate.py; docs/BENCHMARKS.md, issue 12).
    epoch_choice: EpochChoice = "within-noise"
    triplet: TripletConfig = TripletConfig()
    prefix_cache: Literal["disk", "memory", "off"] = "disk"
    cache_dir: Path | None = None  # default <home>/cache/distill
    cache_memory_mb: int = Field(2048, ge=0)
    run_dir: Path | None = None  # default <home>/runs/<register>
    activate: bool = False
    device: str | None = None  # cpu | cuda | cuda:N; None: CUDA if available
    log_every: int = Field(10, ge=1)
    progress: bool = True

    @field_validator("qualities")
    @classmethod
    def _qualities(cls, v: list[str]) -> list[str]:
        from vpr.media.degrade import parse_qualities

        return [str(q) for q in parse_qualities(v)]

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if (self.images is None) == (self.dataset is None):
            raise ValueError("give exactly one source of training images: images (a folder) or dataset (KIND:PATH)")
        losses = parse_loss(self.loss, self.loss_weights)  # validates names and weights
        if self.level_weights == "baseline-loss" and self.val_fraction == 0:
            raise ValueError(
                "level_weights 'baseline-loss' is measured by the held-out validation: "
                "give val_fraction > 0, or draw the levels 'uniform'"
            )
        if self.mirror and "triplet" in losses:
            raise ValueError("mirrored training images have no positions: drop 'triplet' from the loss, or mirror")
        self.loss, self.loss_weights = str(losses), losses.weights
        check_name(self.name)
        return self

    def loss_set(self) -> LossSet:
        return parse_loss(self.loss, self.loss_weights)

    def conditions(self) -> list[tuple[str, float]]:
        """The capture conditions in the training mix, as (step, share of the degraded
        samples), in the order `plan_qualities` draws them; shares of 0 left out."""
        every = [
            (f"dark{self.low_light_factor}", self.low_light_share),
            ("grey", self.grey_share),
            (f"dim{self.dim_factor}", self.dim_share),
        ]
        return [(step, share) for step, share in every if share > 0]


# How `plan_qualities` draws; recorded in a run's state so that a run is never
# resumed under another plan. 2: a listed `orig` no longer adds to `orig_share`.
QUALITY_PLAN = 2

# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = {
    "epochs",
    "patience",
    "activate",
    "prefix_cache",
    "cache_dir",
    "cache_memory_mb",
    "device",
    "log_every",
    "progress",
    "run_dir",
}


# ---- learning rate -------------------------------------------------------------------------
def lr_factor(step: int, total: int, steps_per_epoch: int, cfg: DistillConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // max(1, steps_per_epoch))
    span = max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def degraded_levels(qualities: list[str]) -> list[str]:
    """The listed qualities the plan draws from when it does not draw `orig`."""
    return [q for q in qualities if q != "orig"]


def plan_qualities(
    qualities: list[str],
    orig_share: float,
    n: int,
    seed: list[int],
    conditions: Sequence[tuple[str, float]] = (),
    weights: Sequence[float] | None = None,
) -> list[str]:
    """One quality per image for an epoch: `orig` with probability `orig_share`,
    else one of the degraded `qualities` (seeded; uniformly, or with the
    probabilities `weights`, one per degraded level in list order), then taken
    under each capture condition (`media.degrade.in_condition`: `dark32`,
    `grey`, `dim8`, ...) with its probability, independently.

    An `orig` in `qualities` does not add to the share: the share is what it
    says (before issue 12's validation run it did, and `orig` listed among
    four degraded levels made 0.25 into 0.40). A list of `orig` alone trains
    at full quality only; a list without it draws as it always did."""
    from vpr.media.degrade import in_condition

    degraded = degraded_levels(qualities)
    if not degraded:
        return ["orig"] * n
    rng = np.random.default_rng(seed)
    if weights is None:  # the uniform draw as it always was: old runs reproduce
        draws = rng.integers(0, len(degraded), n)
    else:
        if len(weights) != len(degraded):
            raise ValueError(f"{len(weights)} weights for {len(degraded)} degraded levels ({', '.join(degraded)})")
        draws = rng.choice(len(degraded), n, p=np.asarray(weights, np.float64) / sum(weights))
    full = rng.random(n) < orig_share if orig_share > 0 else np.zeros(n, bool)
    plan = ["orig" if f else degraded[d] for f, d in zip(full, draws)]
    for step, share in conditions:  # drawn after the others: no condition gives the plan it always gave
        taken = rng.random(n) < share
        plan = [str(in_condition(q, step)) if t and not f else q for q, t, f in zip(plan, taken, full)]
    return plan


def plan_crops(plan: list[str], share: float, seed: list[int]) -> list[tuple[float, float] | None]:
    """Per sample of an epoch's plan: None (the whole view), or, for a `share` of the
    degraded samples (seeded), the window's relative position (top, left) in [0, 1)."""
    rng = np.random.default_rng(seed)
    taken = rng.random(len(plan)) < share
    at = rng.random((len(plan), 2))
    return [(float(a[0]), float(a[1])) if t and q != "orig" else None for q, t, a in zip(plan, taken, at)]


def crop_view(x: torch.Tensor, fraction: float, at: tuple[float, float]) -> torch.Tensor:
    """The window of `fraction` of each side of a (..., h, w) map whose top-left corner
    sits at the relative position `at` of the free range (0: first row/column, ->1: last)."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = min(h - ch, int(at[0] * (h - ch + 1))), min(w - cw, int(at[1] * (w - cw + 1)))
    return x[..., top : top + ch, left : left + cw]


def level_draw_weights(qualities: list[str], baseline: dict[str, Any] | None) -> list[float]:
    """`level_weights` "baseline-loss": one probability per degraded level of
    `qualities` (list order), proportional to the baseline validation's held-out
    loss at that level (`Distiller.validate` before training: the teacher on
    degraded inputs against itself on the originals). Uniform if every loss is 0."""
    degraded = degraded_levels(qualities)
    per_quality = (baseline or {}).get("per_quality") or {}
    missing = [q for q in degraded if q not in per_quality]
    if missing:
        raise ValueError(f"the baseline validation has no loss for {', '.join(missing)}: cannot weigh the levels")
    losses = [max(0.0, float(per_quality[q]["val_loss"])) for q in degraded]
    total = sum(losses)
    return [x / total for x in losses] if total > 0 else [1 / len(degraded)] * len(degraded)


def camera_twins(qualities: list[str], conditions: Sequence[tuple[str, float]]) -> list[str]:
    """The validation's extra qualities: each training quality (and `orig`) under
    each capture condition in the mix (none without conditions)."""
    from vpr.media.degrade import in_condition

    every = ["orig", *qualities]
    return list(dict.fromkeys(str(in_condition(q, step)) for step, share in conditions if share > 0 for q in every))


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    ref: ModelRef
    run_dir: Path
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def group_by_shape(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Positions of same-shaped tensors (one forward pass each), in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(k)
    return list(groups.values())


class Distiller:
    def __init__(self, cfg: DistillConfig, home: HomeSettings, ctx: ddp.DistContext) -> None:
        self.cfg, self.home, self.ctx, self.device = cfg, home, ctx, ctx.device
        self.losses = cfg.loss_set()
        self.registry = Registry(home.models_dir)
        self.files = RunFiles(Path(cfg.run_dir) if cfg.run_dir else home.home / "runs" / cfg.name)
        torch.manual_seed(cfg.seed)
        self.teacher = self.registry.load(cfg.teacher, device=self.device)
        for p in self.teacher.net.parameters():
            p.requires_grad_(False)
        self.teacher.net.eval()
        self.student: VPRNet = copy.deepcopy(self.teacher.net).to(self.device).eval()
        self.trainable = trainable_names(self.student, cfg.trainable)
        self.prefix, self.head, self.cut = split_student(self.student, self.trainable)
        self.params = [p for p in self.head.parameters() if p.requires_grad]
        self.images, self.source = collect_images(cfg)
        self.cache_folder = Path(cfg.cache_dir) if cfg.cache_dir else home.cache_dir / "distill"  # prefixes, mirrors
        self._setup_split()
        self._setup_data()
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.miner: NegativeMiner | None = None
        self._resume_tensors: dict[str, torch.Tensor] | None = None  # checkpoint read by _resume, used by _prepare
        n_shard = math.ceil(len(self.train_ids) / ctx.world_size)
        self.steps_per_epoch = math.ceil(n_shard / cfg.batch_size)
        self.state = RunState(config={**cfg.model_dump(mode="json"), "quality_plan": QUALITY_PLAN})

    def _setup_data(self) -> None:
        """The caches: teacher targets always (computed once; on disk in THE descriptor
        cache, or in memory); prefix outputs unless turned off."""
        cfg = self.cfg
        disk = cfg.prefix_cache == "disk"
        budget = cfg.cache_memory_mb << 20
        paths = [i.path for i in self.images]
        # The size rule (policy `database`): targets from the originals at their own
        # size, the student's inputs at the size an index of these images records.
        self.description = description_record(
            paths[: self.n_originals], database_config(self.teacher.net.config.preprocess)
        )
        self.input_side = query_side({DESCRIPTION_KEY: self.description})
        self.student_preprocess = query_config(self.student.config.preprocess, self.input_side)
        self.targets = TeacherTargets(
            self.teacher,
            paths,
            self.device,
            DescriptorCache(Path(cfg.cache_dir) if cfg.cache_dir else self.home.cache_dir) if disk else None,
            cfg.batch_size,
            cfg.progress,
            regions="regions" in self.losses,
        )
        prefix_cache = (
            None if cfg.prefix_cache == "off" else TensorCache(budget, self.cache_folder / "prefix" if disk else None)
        )
        self.inputs = PrefixRunner(
            self.prefix,
            self.cut,
            self.teacher.sha256,
            self.student_preprocess,
            self.device,
            prefix_cache,
        )

    def student_input(self, i: int, quality: str) -> torch.Tensor:
        return self.inputs(self.images[i].path, quality)

    def cache_stats(self) -> dict[str, Any]:
        return {
            "teacher": self.targets.stats(),
            "prefix": self.inputs.cache.stats() if self.inputs.cache else "off",
        }

    def _setup_split(self) -> None:
        cfg = self.cfg
        positions = has_positions(self.images)
        if "triplet" in self.losses and not positions:
            raise ValueError(
                "the triplet loss needs positions: train from a dataset with UTM positions "
                "(--dataset KIND:PATH), or drop 'triplet' from the loss"
            )
        utm = np.array([i.utm for i in self.images], np.float64) if positions else None
        self.train_ids, self.validation = make_validation_set(
            len(self.images),
            cfg.val_fraction,
            [*cfg.qualities, *camera_twins(cfg.qualities, cfg.conditions())],
            utm,
            cfg.val_radius,
            cfg.val_rule,
        )
        self.val_ids = self.validation.val_ids if self.validation else np.zeros(0, np.int64)
        # the validation and the size rule look at the originals only: the first `n_originals` images
        self.n_originals = len(self.images)
        if cfg.mirror:
            mirrors = mirrored([self.images[i] for i in self.train_ids], self.cache_folder / "mirror")
            self.images = [*self.images, *mirrors]
            self.train_ids = np.concatenate([self.train_ids, np.arange(self.n_originals, len(self.images))])
        self.val_mode = "none" if self.validation is None else rule_name(cfg.val_rule)

    # -- setup / resume
    def _prepare(self, resume: bool) -> None:
        if self.files.exists() and not resume:
            raise ValueError(
                f"{self.files.dir}: holds a previous run ({self.files.state_path.name}); "
                "pass --resume to continue it, or --run-dir to start elsewhere"
            )
        if resume:
            self._resume()
        self.targets.prepare(self.ctx)
        if "triplet" in self.losses:
            utm = np.array([i.utm for i in self.images])
            self.miner = NegativeMiner(utm, self.targets.desc, self.train_ids, self.cfg.triplet, self.cfg.seed)
            if self._resume_tensors is not None:
                self.miner.load_state(self._resume_tensors)
        self._resume_tensors = None
        self.head_ddp = ddp.wrap(self.head, self.ctx, find_unused=not self.losses.needs_descriptors)

    def _resume(self) -> None:
        old = self.files.read_state()
        new = self.state.config
        fields = DistillConfig.model_fields
        # a setting the old run's version did not have yet ran at its default (compared as the state stores it)
        default = {k: to_jsonable_python(f.default) for k, f in fields.items() if not f.is_required()}
        default["quality_plan"] = 1  # runs before the version was recorded
        default["epoch_choice"] = "exact"  # runs before the choice existed
        default["dim_share"] = 0.0  # runs before the -dim step existed
        was = {k: old.config.get(k, default.get(k)) for k in set(old.config) | set(new)}
        if "orig" not in self.cfg.qualities:  # both plans draw alike without a listed `orig`
            was["quality_plan"] = new["quality_plan"]
        changed = sorted(k for k in was if k not in RESUMABLE_CHANGES and was[k] != new.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {was[k]!r} -> {new.get(k)!r}" for k in changed)
            raise ValueError(
                f"{self.files.state_path}: --resume with different settings ({diffs}); "
                "use the original ones or a new --run-dir"
            )
        if old.config.get("epochs") != new.get("epochs"):
            log.warning(
                "resuming with %s epochs instead of %s; the lr schedule stretches accordingly",
                new.get("epochs"),
                old.config.get("epochs"),
            )
        old.config = new
        if old.top_recall is None:  # a state from before it was kept
            seen = [(r.get("val") or {}).get("recall@1") for r in old.history]
            old.top_recall = max((float(x) for x in seen if x is not None), default=None)
        self.state = old
        if old.checkpoint:
            tensors = self.files.read_tensors(old.checkpoint, old.checkpoint_sha256)
            student = {k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")}
            self.student.load_state_dict(student, strict=True)
            load_optimizer(self.opt, tensors, old.optimizer_groups)
            self._resume_tensors = tensors
        if self.ctx.is_main:
            self.files.truncate_metrics(old.epoch)
        log.info("resuming %s after epoch %d (step %d)", self.files.dir, old.epoch, old.step)

    # -- one step
    def _loss_parts(self, ids: list[int], desc: torch.Tensor, fmap: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if "mse" in self.losses:
            parts["mse"] = mse_loss(desc, self.targets.desc[ids].to(self.device))
        if "ickd" in self.losses:
            parts["ickd"] = ickd_loss(fmap, self.targets.grams(ids).to(self.device))
        if "regions" in self.losses:
            parts["regions"] = region_loss(fmap, self.targets.regions(ids).to(self.device))
        if "triplet" in self.losses:
            assert self.miner is not None  # _prepare makes a miner whenever the losses include triplet
            pos, neg, mask = self.miner.select(ids, desc, step)
            t = self.targets.desc
            parts["triplet"] = triplet_loss(
                desc, t[pos].to(self.device), t[neg].to(self.device), self.cfg.triplet.margin, mask.to(self.device)
            )
        return parts

    def train_step(
        self,
        ids: list[int],
        qualities: list[str],
        step: int,
        crops: Sequence[tuple[float, float] | None] | None = None,
    ) -> dict[str, float]:
        """One optimizer step on a batch (each sample whole, or through its crop window);
        returns the batch's loss terms."""
        if self.miner is not None:
            self.miner.maybe_refresh(step)
        inputs = [self.student_input(i, q) for i, q in zip(ids, qualities)]
        if crops is not None:
            inputs = [x if at is None else crop_view(x, self.cfg.crop_fraction, at) for x, at in zip(inputs, crops)]
        groups = group_by_shape(inputs)
        self.opt.zero_grad(set_to_none=True)
        logged: dict[str, float] = defaultdict(float)
        for g, members in enumerate(groups):
            share = len(members) / len(ids)
            sync = g == len(groups) - 1
            with ddp.no_sync(self.head_ddp) if not sync else contextlib.nullcontext():
                x = torch.stack([inputs[k] for k in members]).to(self.device)
                with autocast_for(self.device):
                    desc, fmap = self.head_ddp(x)
                gids = [ids[k] for k in members]
                parts = self._loss_parts(gids, desc.float(), fmap.float(), step)
                loss = self.losses.combine(parts) * share
                loss.backward()
            if self.miner is not None:
                self.miner.observe(gids, desc)
            logged["loss"] += float(loss.detach())
            for k, v in parts.items():
                logged[k] += float(v.detach()) * share
        if self.cfg.grad_clip:
            logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        lr = self.cfg.lr * lr_factor(step, self.total_steps, self.steps_per_epoch, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        logged["lr"] = lr
        return dict(logged)

    # -- epochs
    def epoch_plan(self, epoch: int) -> tuple[list[int], dict[int, str], dict[int, tuple[float, float] | None]]:
        """This process's image order for `epoch`, each image's quality and crop window
        (seeded, the same for any world size)."""
        n = len(self.images)
        cfg = self.cfg
        quality = plan_qualities(
            cfg.qualities, cfg.orig_share, n, [cfg.seed, epoch, 7], cfg.conditions(), self.level_weights()
        )
        crop = plan_crops(quality, cfg.crop_share, [cfg.seed, epoch, 11])
        order = self.train_ids[np.random.default_rng([self.cfg.seed, epoch, 3]).permutation(len(self.train_ids))]
        pad = (-len(order)) % self.ctx.world_size
        order = np.concatenate([order, order[:pad]])
        mine = order[self.ctx.rank :: self.ctx.world_size]
        return [int(i) for i in mine], {int(i): quality[i] for i in mine}, {int(i): crop[i] for i in mine}

    def level_weights(self) -> list[float] | None:
        """The draw of the degraded levels: None (uniform), or their probabilities from
        the baseline validation (`level_draw_weights`), the same on every process."""
        if self.cfg.level_weights == "uniform":
            return None
        return level_draw_weights(self.cfg.qualities, self.state.baseline)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        ids, quality, crop = self.epoch_plan(epoch)
        bs = self.cfg.batch_size
        sums: dict[str, float] = defaultdict(float)
        bar = tqdm(
            total=len(ids),
            desc=f"epoch {epoch}/{self.cfg.epochs}",
            unit="img",
            disable=not (self.cfg.progress and self.ctx.is_main),
        )
        for b in range(0, len(ids), bs):
            batch = ids[b : b + bs]
            out = self.train_step(batch, [quality[i] for i in batch], self.state.step, [crop[i] for i in batch])
            self.state.step += 1
            for k, v in out.items():
                sums[k] += v
            n_steps = b // bs + 1
            bar.update(len(batch))
            bar.set_postfix({k: f"{sums[k] / n_steps:.4g}" for k in ["loss", *self.losses.terms]})
            if self.ctx.is_main and (self.state.step % self.cfg.log_every == 0 or b + bs >= len(ids)):
                self.files.append_metrics(
                    {
                        "kind": "step",
                        "epoch": epoch,
                        "step": self.state.step,
                        "loss": out["loss"],
                        "lr": out["lr"],
                        "terms": {t: out[t] for t in self.losses.terms},
                    }
                )
        bar.close()
        means = {k: v / self.steps_per_epoch for k, v in sums.items() if k != "lr"}
        return ddp.all_mean(means, self.ctx)

    @torch.no_grad()
    def describe(self, ids: list[int], quality: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Student descriptors (stacked) and conv maps (one per image: sizes may differ) of
        images `ids` degraded to `quality` (eval, no grad)."""
        inputs = [self.student_input(i, quality) for i in ids]
        descs: dict[int, torch.Tensor] = {}
        maps: dict[int, torch.Tensor] = {}
        for members in group_by_shape(inputs):
            for start in range(0, len(members), self.cfg.batch_size):
                part = members[start : start + self.cfg.batch_size]
                with autocast_for(self.device):
                    d, f = self.head(torch.stack([inputs[k] for k in part]).to(self.device))
                for k, dd, ff in zip(part, d.float().cpu(), f.float().cpu()):
                    descs[k], maps[k] = dd, ff
        order = range(len(ids))  # group_by_shape puts each input in exactly one group: all filled
        return torch.stack([descs[k] for k in order]), [maps[k] for k in order]

    def validate(self) -> dict[str, Any] | None:
        """The label-free validation of `train.validation`: held-out images, degraded,
        searched among the teacher's descriptors of all the images."""
        if self.validation is None:
            return None
        ids = [int(i) for i in self.validation.val_ids]
        db = self.targets.desc.numpy()[: self.n_originals]
        if self.validation.database_ids is not None:
            db = db[self.validation.database_ids]
        per_quality: dict[str, dict[str, float]] = {}
        for q in self.validation.qualities:
            desc, maps = self.describe(ids, q)
            parts = {}
            if "mse" in self.losses or "triplet" in self.losses:
                parts["mse"] = mse_loss(desc, self.targets.desc[ids])
            if "ickd" in self.losses:
                parts["ickd"] = torch.stack(
                    [ickd_loss(m.unsqueeze(0), self.targets.grams([i])) for i, m in zip(ids, maps)]
                ).mean()
            if "regions" in self.losses:
                parts["regions"] = torch.stack(
                    [region_loss(m.unsqueeze(0), self.targets.regions([i])) for i, m in zip(ids, maps)]
                ).mean()
            loss = float(sum(self.losses.weight(k) * float(v) for k, v in parts.items()))
            per_quality[q] = {
                **self_retrieval(db, desc.numpy(), self.validation.positives),
                "val_loss": loss,
                **{k: float(v) for k, v in parts.items()},
            }
        return summarise(per_quality, self.validation.rule, len(ids) * len(self.validation.qualities))

    def score(self, train: dict[str, float], val: dict[str, Any] | None) -> tuple[float, ...]:
        """Higher is better (`train.validation.score`)."""
        return validation_score(val, train["loss"])

    def save_checkpoint(self, epoch: int, record: dict[str, Any], improved: bool) -> None:
        if not self.ctx.is_main:
            return
        student = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        optim, groups = optimizer_tensors(self.opt)
        extra = self.miner.state() if self.miner is not None else {}
        name = f"checkpoint-e{epoch}.safetensors"
        self.state.checkpoint_sha256 = self.files.write_tensors(name, {**student, **optim, **extra})
        self.state.checkpoint, self.state.optimizer_groups = name, groups
        if improved:
            self.state.best_sha256 = self.files.write_tensors("best.safetensors", self.student.state_dict())
        self.state.epoch = epoch
        self.state.history.append(record)
        self.files.write_state(self.state)
        self.files.remove_stale_checkpoints(keep=name)

    def run(self, resume: bool) -> DistillResult:
        self._prepare(resume)
        cfg = self.cfg
        if self.state.registered and self.state.epoch >= cfg.epochs:
            log.info("%s: this run already finished and registered %s", self.files.dir, self.state.registered)
            name, _, ver = self.state.registered.partition("@")
            assert self.state.best is not None  # a registered run has finished epochs, so a best one
            return DistillResult(
                ModelRef(name, int(ver)),
                self.files.dir,
                self.state.best["epoch"],
                self.state.history,
                self.state.best.get("metrics", {}),
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        log.info(
            "distilling %s -> %s: %d train / %d val images, qualities %s, loss %s, trainable %s "
            "(prefix of %d layers frozen and %s), %d epochs x %d steps x %d processes",
            self.teacher.ref,
            cfg.name,
            len(self.train_ids),
            len(self.val_ids),
            ",".join(cfg.qualities),
            self.losses.describe(),
            ",".join(self.trainable),
            self.cut,
            "cached" if self.inputs.cache else "recomputed",
            cfg.epochs,
            self.steps_per_epoch,
            self.ctx.world_size,
        )
        if self.state.epoch == 0 and self.val_mode != "none":
            self._log_baseline()
        for epoch in range(self.state.epoch + 1, cfg.epochs + 1):
            started = time.time()
            train = self.train_epoch(epoch)
            # every process takes the same decisions (best epoch, early stop) from rank 0's validation
            val = ddp.broadcast(self.validate() if self.ctx.is_main else None, self.ctx)
            seconds = time.time() - started
            self.state.train_seconds += seconds
            record: dict[str, Any] = {
                "kind": "epoch",
                "epoch": epoch,
                "step": self.state.step,
                **train,
                "val": val,
                "seconds": round(seconds, 2),
                "cache": self.cache_stats(),
            }
            score = self.score(train, val)
            if val:  # kept in the state by every process alike (only rank 0 keeps the history)
                self.state.top_recall = max(float(score[0]), self.state.top_recall or 0.0)
            improved = improves(
                score,
                None if self.state.best is None else self.state.best["score"],
                top=self.state.top_recall or 0.0,
                queries=int((val or {}).get("queries", 0)),
                choice=cfg.epoch_choice,
            )
            if improved:
                self.state.best = {"epoch": epoch, "score": list(score), "metrics": self._metrics(train, val)}
            if self.ctx.is_main:
                self.files.append_metrics(record)
                prefix = record["cache"]["prefix"]
                log.info(
                    "epoch %d: loss %.5f %s%s (%.0f s; prefix cache %s)%s",
                    epoch,
                    train["loss"],
                    " ".join(f"{t} {train[t]:.5f}" for t in self.losses.terms),
                    f" val {json.dumps({k: v for k, v in val.items() if k != 'per_quality'})}" if val else "",
                    seconds,
                    prefix
                    if prefix == "off"
                    else f"{prefix['memory_hits'] + prefix['disk_hits']} hits, {prefix['misses']} computed",
                    " *best*" if improved else "",
                )
            self.save_checkpoint(epoch, record, improved)
            ddp.barrier(self.ctx)
            assert self.state.best is not None
            if self.validation is not None and should_stop(self.state.best["epoch"], epoch, cfg.patience):
                self.state.stopped = f"early stop after epoch {epoch}: no better validation for {cfg.patience} epochs"
                log.info("%s", self.state.stopped)
                if self.ctx.is_main:
                    self.files.write_state(self.state)
                break
        return self._finish()

    def _log_baseline(self) -> None:
        """Validation of the untrained student (= the teacher on degraded inputs), for reference."""
        # every process keeps it: the levels' draw may be weighed by it (level_weights)
        val = ddp.broadcast(self.validate() if self.ctx.is_main else None, self.ctx)
        self.state.baseline = val
        if self.ctx.is_main:
            self.files.append_metrics({"kind": "baseline", "epoch": 0, "val": val})
            log.info("before training: %s", json.dumps({k: v for k, v in (val or {}).items() if k != "per_quality"}))
            weights = self.level_weights()
            if weights is not None:
                drawn = zip(degraded_levels(self.cfg.qualities), weights)
                log.info("levels drawn by baseline loss: %s", ", ".join(f"{q} {w:.2f}" for q, w in drawn))
        ddp.barrier(self.ctx)

    def _metrics(self, train: dict[str, float], val: dict[str, Any] | None) -> dict[str, Any]:
        m: dict[str, Any] = {"train_loss": train["loss"], **{f"train_{t}": train[t] for t in self.losses.terms}}
        if val:
            m.update({f"val_{k}" if not k.startswith("val_") else k: v for k, v in val.items()})
        return m

    def _finish(self) -> DistillResult:
        best = self.state.best or {}
        ref = None
        if self.ctx.is_main:
            weights = self.files.read_tensors("best.safetensors", self.state.best_sha256)
            self.student.load_state_dict(weights, strict=True)
            ref = self.registry.register(
                self.cfg.name,
                self.student.cpu(),
                role="student",
                parent=str(self.teacher.ref),
                details=self._details(),
                metrics={"best_epoch": best.get("epoch"), **best.get("metrics", {})},
            )
            if self.cfg.activate:
                self.registry.activate(ref)
            self.state.registered = str(ref)
            self.files.write_state(self.state)
            plot = self.files.plot(f"{self.teacher.ref} -> {ref} ({self.losses})")
            log.info(
                "registered %s (best epoch %s); run files in %s%s",
                ref,
                best.get("epoch"),
                self.files.dir,
                f", plot {plot}" if plot else "",
            )
        registered, best = ddp.broadcast((str(ref) if ref else None, best), self.ctx)
        name, _, ver = registered.partition("@")
        return DistillResult(
            ModelRef(name, int(ver)), self.files.dir, best.get("epoch", 0), self.state.history, best.get("metrics", {})
        )

    def _details(self) -> dict[str, Any]:
        cfg = self.cfg
        levels, weights = degraded_levels(cfg.qualities), self.level_weights()
        return {
            "source": "distill",
            "teacher": str(self.teacher.ref),
            "teacher_sha256": self.teacher.sha256,
            **self.source,
            "train_images": len(self.train_ids),
            "val_images": len(self.val_ids),
            "validation": self.val_mode,
            "epoch_choice": cfg.epoch_choice,
            "validation_baseline": {k: v for k, v in (self.state.baseline or {}).items() if k != "per_quality"},
            "stopped": self.state.stopped,
            "qualities": list(cfg.qualities),
            "orig_share": cfg.orig_share,
            "low_light": {"share": cfg.low_light_share, "factor": cfg.low_light_factor},
            "grey_share": cfg.grey_share,
            "dim": {"share": cfg.dim_share, "factor": cfg.dim_factor},
            "mirror": cfg.mirror,
            "crop": {"share": cfg.crop_share, "fraction": cfg.crop_fraction},
            "level_weights": {"rule": cfg.level_weights, **({"p": dict(zip(levels, weights))} if weights else {})},
            "description": self.description,
            "student_input_side": self.input_side,
            "losses": self.losses.describe(),
            "trainable": self.trainable,
            "epochs": cfg.epochs,
            "best_epoch": (self.state.best or {}).get("epoch"),
            "batch_size": cfg.batch_size,
            "world_size": self.ctx.world_size,
            "optimizer": {
                "name": "adam",
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "grad_clip": cfg.grad_clip,
                "schedule": cfg.schedule,
                "warmup_steps": cfg.warmup_steps,
                **({"step_gamma": cfg.step_gamma} if cfg.schedule == "step" else {}),
            },
            **({"triplet": cfg.triplet.model_dump()} if "triplet" in self.losses else {}),
            "seed": cfg.seed,
            "steps": self.state.step,
            "train_seconds": round(self.state.train_seconds, 1),
            "device": str(self.device),
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "history": [
                {k: r.get(k) for k in ("epoch", "loss", *self.losses.terms, "val")} for r in self.state.history
            ],
            "run_dir": str(self.files.dir.resolve()),
        }


def run_distill(cfg: DistillConfig, home: HomeSettings, resume: bool = False) -> DistillResult:
    """Train, checkpoint each epoch, keep the best epoch, register it as a student of the teacher."""
    ctx = ddp.init_distributed(cfg.device)
    try:
        return Distiller(cfg, home, ctx).run(resume)
    finally:
        ddp.shutdown(ctx)
