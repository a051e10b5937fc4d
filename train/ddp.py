"""Data-parallel training: one code path for 1 process, torchrun on GPUs, or CPUs.

Launched by `torchrun --nproc-per-node N -m vpr.cli.main train distill ...`, each
process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment and joins a
process group: NCCL when it has a GPU, gloo on CPU. Without those variables
(a plain `vpr train distill`) nothing is initialised and the helpers below
are no-ops, so the training loop never branches on "distributed or not".
`launch_local` starts N CPU processes the same way torchrun would (tests).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None, timeout_s: float = 1800) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device.

    `device`: "cpu", "cuda" or None (CUDA when available). Under torchrun with
    CUDA, process k uses GPU LOCAL_RANK.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if want_cuda:
        dev = torch.device("cuda", local) if world > 1 else torch.device(device or "cuda")
        dev = dev if dev.index is not None else torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    log.info("process %d of %d joined (%s, %s)", rank, world, backend, dev)
    return DistContext(rank, world, local, dev, backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def wrap(module: nn.Module, ctx: DistContext, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around the trainable module when there are several processes."""
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def no_sync(module: nn.Module):
    """Skip the gradient all-reduce for all but the last micro-batch of a step."""
    return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def all_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average scalar metrics over processes (same keys on every process)."""
    if not ctx.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor(
        [float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu"
    )
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist())}


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """rank 0's `obj` on every process (small JSON-like objects)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    fn(*args)


def launch_local(world_size: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` in `world_size` fresh CPU processes with torchrun's
    environment (gloo). `fn` must be importable (a module-level function)."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _child, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn"
    )
