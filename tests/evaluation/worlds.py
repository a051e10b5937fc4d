"""The evaluation tests' small world: a synthetic route and a registered tiny teacher."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import TINY_CONFIG
from vpr.data.synthetic import make_route
from vpr.model.clusters import init_clusters
from vpr.model.network import build_model
from vpr.model.registry import Registry
from vpr.model.store import Ref
from vpr.settings import HomeSettings


def route_and_teacher(root: Path) -> tuple[Path, HomeSettings, Registry, Ref, torch.nn.Module]:
    """A 10-place route under `root` and a home with a tiny teacher clustered on its database
    (seeded: the same world every time); returns the teacher network too."""
    route = make_route(root / "route", places=10, seed=1, size=(96, 72))
    home = HomeSettings(home=root / "home")
    reg = Registry(home.models_dir)
    torch.manual_seed(0)
    teacher = build_model(TINY_CONFIG)
    init_clusters(teacher, sorted((route / "database").iterdir()), samples=500)
    return route, home, reg, reg.register("tiny", teacher, "teacher"), teacher
