#!/usr/bin/env python
"""Where the tracker loses: its motion model against one that is told the walker's speed.

On the validation split of bench/track_validate.py (day_left even frames the
database, odd frames a walk; no test query is read), per quality:

- `tracker`: THE tracker (`TrackSettings()` defaults), through `tracked_ranks`;
- `hmm, speed known`: a dense forward filter over all database places whose
  motion kernel is centred one place ahead (the split's true speed), width 1;
- `hmm, no speed`: the same filter with the kernel centred where the walker was
  (width 3): what a filter that does not estimate speed can do.

Both dense filters see only the frame's `candidates` best scores (the others at
the last candidate's score), as the tracker does, with temperature `--temperature`
(absolute cosine units) and jump chance 0.01. A diagnostic, not a tuning run:
nothing here sets a default.

    .venv/bin/python bench/track_motion.py --home /tmp/track-home --out bench/results/track_motion.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from track_validate import add_split_arguments, load_split, walks  # noqa: E402

from vpr.evaluation.evaluate import database_hubness, tracked_ranks  # noqa: E402
from vpr.model.fileio import atomic_write_json  # noqa: E402
from vpr.settings import TrackSettings  # noqa: E402


def dense_filter(scores: np.ndarray, positives, seq: np.ndarray, centre: float, width: float, temp: float, k: int):
    """Recall@1 of a dense forward filter over all places on the frames `seq`."""
    n = scores.shape[1]
    idx = np.arange(n)
    kernel = np.exp(-0.5 * ((idx[:, None] - (idx[None, :] + centre)) / width) ** 2)
    kernel /= kernel.sum(0, keepdims=True)
    belief = np.full(n, 1.0 / n)
    hits = []
    for i in seq:
        top = np.argsort(-scores[i])[:k]
        s = np.full(n, scores[i, top[-1]])
        s[top] = scores[i, top]
        prior = 0.99 * kernel @ belief + 0.01 / n
        belief = prior * np.exp((s - s.max()) / temp)
        belief /= belief.sum()
        hits.append(bool(np.isin(belief.argmax(), positives[i])))
    return float(np.mean(hits))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(p)
    p.add_argument("--temperature", type=float, default=0.08)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "track_motion.json")
    args = p.parse_args(argv)
    db, described, ds, per_quality = load_split(args.home, args.gardens, args.teacher, args.student, args.quality)
    settings = TrackSettings()
    splits = walks(len(ds.queries))
    hub = database_hubness(db, ds)
    rows = []
    cands, temp = settings.candidates, args.temperature
    for spec, qd in described:
        scores = qd @ db.T
        row = {"quality": spec, **per_quality[spec]}
        methods = {
            "tracker": lambda seq, qd=qd: float(np.mean(tracked_ranks(db, qd, ds, [seq], settings, 1, hub)[seq] == 0)),
            "hmm, speed known": lambda seq, sc=scores: dense_filter(sc, ds.positives, seq, 1.0, 1.0, temp, cands),
            "hmm, no speed": lambda seq, sc=scores: dense_filter(sc, ds.positives, seq, 0.0, 3.0, temp, cands),
        }
        for name, fn in methods.items():
            r = [fn(seq) for _, seq in splits]
            row[name] = {"walk": r[0], "splices": float(np.mean(r[1:]))}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "frame_r5"}, flush=True)
    atomic_write_json(args.out, {"what": __doc__.splitlines()[0], "settings": settings.model_dump(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
