"""The files of one distillation run: checkpoints, state, metrics, plot.

    <run_dir>/state.json                 what was done: config, epoch, step, best
                                         (chosen by the label-free validation of
                                         train.validation), the untrained baseline,
                                         why it stopped, history, file names and sha256
    <run_dir>/checkpoint-e<E>.safetensors  student weights + optimizer moments +
                                         miner state after epoch E (resume point)
    <run_dir>/best.safetensors           student weights of the best epoch so far
    <run_dir>/metrics.jsonl              one JSON object per logged step / epoch
    <run_dir>/training.png               curves, written at the end

Tensors go to safetensors and everything else to JSON; nothing is pickled.
Each file is written to a temporary sibling and renamed; `state.json` is
written last and names the checkpoint it belongs to, so a run killed at any
point resumes from a consistent epoch.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vpr.model.fileio import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


@dataclass
class RunState:
    config: dict[str, Any]
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps done
    best: dict[str, Any] | None = None  # {"epoch", "score", "metrics"}
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    best_sha256: str | None = None
    optimizer_groups: list[dict[str, Any]] = field(default_factory=list)
    registered: str | None = None
    train_seconds: float = 0.0
    baseline: dict[str, Any] | None = None  # the validation of the untrained student (the teacher), epoch 0
    stopped: str | None = None  # why training ended before `epochs` (early stopping), else None
    # the highest held-out recall@1 of any epoch so far (the epoch choice measures from it);
    # None: no validation yet, or a state written before it was kept (then read off `history`)
    top_recall: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> RunState:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"{where}: unsupported run state format {data.get('format')!r} (expected {STATE_FORMAT})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class RunFiles:
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def exists(self) -> bool:
        return self.state_path.is_file()

    # ---- state ------------------------------------------------------------
    def read_state(self) -> RunState:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.state_path}: no run to resume here") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.state_path}: corrupt run state ({e})") from e
        return RunState.from_json(data, self.state_path)

    def write_state(self, state: RunState) -> None:
        atomic_write_json(self.state_path, state.to_json())

    # ---- tensors ----------------------------------------------------------
    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        """Atomically write `name` (safetensors); returns its sha256."""
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write_bytes(self.dir / name, data)
        return sha256_file(self.dir / name)

    def read_tensors(self, name: str, sha256: str | None) -> dict[str, torch.Tensor]:
        path = self.dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing (named by {self.state_path})") from None
        if sha256 is not None:
            import hashlib

            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise ValueError(f"{path}: sha256 {actual} does not match {self.state_path} ({sha256})")
        try:
            return st_load(data)
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e

    def remove_stale_checkpoints(self, keep: str) -> None:
        for p in self.dir.glob("checkpoint-e*.safetensors"):
            if p.name != keep:
                p.unlink(missing_ok=True)

    # ---- metrics ----------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        return out

    def truncate_metrics(self, epoch: int) -> None:
        """Keep only records of completed epochs <= `epoch` (a resumed run redoes the rest)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    # ---- plot -------------------------------------------------------------
    def plot(self, title: str) -> Path | None:
        """Loss per step, per-term epoch means and validation scores -> training.png."""
        records = self.read_metrics()
        steps = [r for r in records if r.get("kind") == "step"]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        if not steps and not epochs:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        has_val = any(r.get("val") for r in epochs)
        fig, axes = plt.subplots(1, 3 if has_val else 2, figsize=(15 if has_val else 10, 4))
        terms = sorted({k for r in steps for k in r.get("terms", {})})
        ax = axes[0]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="total", lw=1.2)
        for t in terms:
            ax.plot([r["step"] for r in steps], [r["terms"].get(t, float("nan")) for r in steps], label=t, lw=0.8)
        ax.set(xlabel="step", ylabel="loss", title="training loss (logged steps)")
        ax.legend()
        ax = axes[1]
        ax.plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], "o-", label="train")
        if any("val_loss" in (r.get("val") or {}) for r in epochs):
            ax.plot(
                [r["epoch"] for r in epochs if r.get("val")],
                [r["val"]["val_loss"] for r in epochs if r.get("val")],
                "s-",
                label="validation",
            )
        ax.set(xlabel="epoch", ylabel="loss", title="epoch mean loss")
        ax.legend()
        if has_val:
            ax = axes[2]
            keys = sorted({k for r in epochs for k in (r.get("val") or {}) if k.startswith("recall@")})
            for k in keys:
                ax.plot(
                    [r["epoch"] for r in epochs if r.get("val")],
                    [r["val"].get(k, float("nan")) for r in epochs if r.get("val")],
                    "o-",
                    label=k,
                )
            ax.set(xlabel="epoch", ylabel="recall (mean over qualities)", title="validation")
            if keys:
                ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        path = self.dir / PLOT_FILE
        atomic_write_bytes(path, buf.getvalue())
        return path


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    restored = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": restored})
