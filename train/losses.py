"""Distillation losses: each defined once here, each with a weight.

- `mse`: the student's global descriptor of the degraded image against the
  teacher's descriptor of the original.
- `ickd`: inter-channel correlation distillation on the last conv feature maps
  (Liu et al., "Exploring Inter-Channel Correlation for Diversity-preserved
  Knowledge Distillation", ICCV 2021), in a form that compares maps of
  different spatial sizes.
- `regions`: the student's conv map against the teacher's of the original,
  region by region: both pooled to a fixed grid, each region's channel vector
  compared (feature distillation, as the "hints" of Romero et al., FitNets,
  ICLR 2015, in a form that compares maps of different spatial sizes).
- `triplet`: the weakly supervised triplet ranking loss of NetVLAD
  (Arandjelovic et al., CVPR 2016), with the student's descriptor as the
  anchor and the teacher's descriptors (what the served index holds) as the
  positive and the negatives.

A loss set is written `mse+ickd` and parsed by `parse_loss`, the one place
that knows the names; weights by `parse_loss_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOSS_NAMES = ("mse", "ickd", "regions", "triplet")
DEFAULT_LOSS = "mse+ickd"
EPS = 1e-12


# ---- the terms ---------------------------------------------------------------
def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance ||s_b - t_b||^2.

    Summed over the descriptor dimensions rather than averaged: descriptors
    are L2-normalised, so the per-element mean would be ~1/D of this (1/32768
    for VGG16+NetVLAD) and the weight of the term would depend on D. For
    unit vectors this equals 2 - 2 cos(s, t), in [0, 4].
    """
    if student.shape != teacher.shape:
        raise ValueError(f"mse: student descriptors {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean()


def channel_correlation(fmap: torch.Tensor) -> torch.Tensor:
    """Row-normalised channel Gram matrices of conv maps: (B, C, h, w) -> (B, C, C).

    With F in R^{C x N} the map of one image flattened over its N = h*w
    locations:
        F^[:, n] = F[:, n] / ||F[:, n]||          (each location L2-normalised
                                                   over channels, as NetVLAD
                                                   sees its input)
        G        = F^ F^T / N                     (C x C channel correlation)
        G^[i, :] = G[i, :] / ||G[i, :]||          (rows L2-normalised)
    G is a mean over locations, so a map with another spatial size but the
    same distribution of local features (e.g. a tiled or nearest-upsampled
    copy) has the same G^. Zero rows (a channel that is zero everywhere) stay
    zero.
    """
    if fmap.dim() != 4:
        raise ValueError(f"ickd: expected a (B, C, h, w) feature map, got shape {tuple(fmap.shape)}")
    flat = F.normalize(fmap.float().flatten(2), p=2, dim=1, eps=EPS)  # (B, C, N)
    gram = torch.bmm(flat, flat.transpose(1, 2)) / flat.shape[2]
    return F.normalize(gram, p=2, dim=2, eps=EPS)


def ickd_loss(student_map: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Inter-channel correlation distillation, averaged over the batch:

        ickd(S, T) = (1/C) * sum_i || G^_S[i, :] - G^_T[i, :] ||^2

    with G^ from `channel_correlation` (see its docstring for the exact
    normalisations). `teacher` is either the teacher's feature map
    (B, C, h', w'), of any spatial size, or its precomputed G^ (B, C, C), which
    is what training caches. Each row of G^ is a unit vector, so the loss lies
    in [0, 4]; it is 0 when the student's local features have the same channel
    correlations as the teacher's.
    """
    gs = channel_correlation(student_map)
    gt = teacher.float() if teacher.dim() == 3 else channel_correlation(teacher)
    if gs.shape != gt.shape:
        raise ValueError(
            f"ickd: student has {gs.shape[1]} channels x batch {gs.shape[0]}, "
            f"teacher {gt.shape[1]} x {gt.shape[0]}; they must match"
        )
    return (gs - gt).pow(2).sum(dim=2).mean(dim=1).mean()


REGION_GRID = (4, 4)  # rows x columns of `region_features`


def region_features(fmap: torch.Tensor, grid: tuple[int, int] = REGION_GRID) -> torch.Tensor:
    """Per region of a fixed grid, the L2-normalised mean channel vector of a conv map:
    (B, C, h, w) -> (B, rows * columns, C). Maps of any size give the same grid
    (adaptive average pooling), so a student's map of an upsampled query compares
    with the teacher's of the original."""
    if fmap.dim() != 4:
        raise ValueError(f"regions: expected a (B, C, h, w) feature map, got shape {tuple(fmap.shape)}")
    pooled = F.adaptive_avg_pool2d(fmap.float(), grid).flatten(2)  # (B, C, R)
    return F.normalize(pooled.transpose(1, 2), p=2, dim=2, eps=EPS)


def region_loss(student_map: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and the regions of || r_S - r_T ||^2, with r from
    `region_features` (unit vectors, so in [0, 4]). `teacher` is either the
    teacher's map (B, C, h', w') or its precomputed region features (B, R, C),
    which is what training caches."""
    rs = region_features(student_map)
    rt = teacher.float() if teacher.dim() == 3 else region_features(teacher)
    if rs.shape != rt.shape:
        raise ValueError(f"regions: student {tuple(rs.shape)} vs teacher {tuple(rt.shape)}; they must match")
    return (rs - rt).pow(2).sum(dim=2).mean()


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    margin: float = 0.1,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triplet ranking loss with squared Euclidean distances:

        l(q) = mean_j max(0, m + ||q - p||^2 - ||q - n_j||^2)

    anchor (B, D), positive (B, D), negatives (B, M, D); `neg_mask` (B, M)
    marks the real negatives when anchors have fewer than M. The NetVLAD paper
    sums over its 10 negatives; the mean keeps the weight independent of M.
    The margin m is in squared-distance units (NetVLAD uses 0.1).
    """
    if anchor.shape != positive.shape or negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0]:
        raise ValueError(
            f"triplet: anchor {tuple(anchor.shape)}, positive {tuple(positive.shape)}, "
            f"negatives {tuple(negatives.shape)} do not fit (B, D), (B, D), (B, M, D)"
        )
    a = anchor.float()
    d_pos = (a - positive.float()).pow(2).sum(dim=1, keepdim=True)  # (B, 1)
    d_neg = (a.unsqueeze(1) - negatives.float()).pow(2).sum(dim=2)  # (B, M)
    hinge = F.relu(margin + d_pos - d_neg)
    if neg_mask is None:
        return hinge.mean()
    mask = neg_mask.to(hinge.dtype)
    per_anchor = (hinge * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_anchor.mean()


# ---- a weighted set of terms -----------------------------------------------
@dataclass(frozen=True)
class LossSet:
    """Which terms train the student and with what weight; `str()` is the spec."""

    terms: tuple[str, ...]
    weights: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return "+".join(self.terms)

    def __contains__(self, name: str) -> bool:
        return name in self.terms

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)

    @property
    def needs_maps(self) -> bool:
        return "ickd" in self.terms or "regions" in self.terms

    @property
    def needs_descriptors(self) -> bool:
        return "mse" in self.terms or "triplet" in self.terms

    def describe(self) -> dict[str, float]:
        return {t: self.weight(t) for t in self.terms}

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the computed terms (every term of the set must be there)."""
        missing = [t for t in self.terms if t not in parts]
        if missing:
            raise ValueError(f"loss terms {missing} were not computed")
        total = sum(self.weight(t) * parts[t] for t in self.terms)
        # sum() starts from the int 0; parse_loss never makes an empty set, so a term was added
        assert isinstance(total, torch.Tensor)
        return total


def parse_loss(spec: str, weights: str | dict[str, float] | None = None) -> LossSet:
    """`mse`, `ickd+mse`, `mse+ickd+triplet`... -> LossSet (canonical order mse, ickd, regions, triplet)."""
    names = [s.strip().lower() for s in str(spec).split("+")]
    if not spec or any(not n for n in names):
        raise ValueError(f"bad loss {spec!r}: expected terms joined by '+', e.g. {DEFAULT_LOSS}")
    unknown = [n for n in names if n not in LOSS_NAMES]
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown} in {spec!r}; choose from {', '.join(LOSS_NAMES)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"loss {spec!r} repeats {dup}")
    terms = tuple(n for n in LOSS_NAMES if n in names)
    w = parse_loss_weights(weights, terms) if not isinstance(weights, dict) else _check_weights(weights, terms)
    return LossSet(terms, w)


def parse_loss_weights(text: str | None, terms: tuple[str, ...]) -> dict[str, float]:
    """`mse=1,ickd=0.5`, or bare numbers in the order of `terms` (`1,0.5`); missing ones are 1."""
    if text is None or not str(text).strip():
        return {t: 1.0 for t in terms}
    parts = [p.strip() for p in str(text).split(",")]
    out: dict[str, float] = {}
    if all("=" in p for p in parts):
        for p in parts:
            name, _, value = p.partition("=")
            out[name.strip().lower()] = _number(value, p)
    elif not any("=" in p for p in parts):
        if len(parts) != len(terms):
            raise ValueError(
                f"--loss-weights {text!r}: {len(parts)} numbers for {len(terms)} terms "
                f"({'+'.join(terms)}); or write name=value pairs"
            )
        out = {t: _number(p, p) for t, p in zip(terms, parts)}
    else:
        raise ValueError(f"--loss-weights {text!r}: use either name=value pairs or bare numbers, not both")
    return _check_weights({**{t: 1.0 for t in terms}, **out}, terms)


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--loss-weights: {where!r} is not a number") from None


def _check_weights(weights: dict[str, float], terms: tuple[str, ...]) -> dict[str, float]:
    extra = sorted(set(weights) - set(terms))
    if extra:
        raise ValueError(f"--loss-weights names {extra}, which are not in the loss {'+'.join(terms)}")
    bad = {k: v for k, v in weights.items() if not (v >= 0 and v < float("inf"))}
    if bad:
        raise ValueError(f"--loss-weights must be finite and >= 0, got {bad}")
    if all(weights.get(t, 1.0) == 0 for t in terms):
        raise ValueError("--loss-weights are all zero: nothing would train")
    return {t: float(weights.get(t, 1.0)) for t in terms}
