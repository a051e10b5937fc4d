"""The out-of-the-box demo: built once, then found again without building anything,
served by `vpr serve --demo`."""

from __future__ import annotations

import pytest

from vpr.cli import demo as demo_module
from vpr.cli.demo import INDEX, STUDENT, TEACHER, ensure_demo, existing_demo
from vpr.index.ops import store_for
from vpr.model.registry import Registry
from vpr.settings import HomeSettings


@pytest.mark.slow
def test_demo_builds_once_and_is_reused(home, monkeypatch):
    monkeypatch.setenv("VPR_DEMO_WEIGHTS", "/nonexistent/weights.safetensors")
    settings = HomeSettings(home=home)
    assert existing_demo(settings) is None
    demo = ensure_demo(settings, places=8, epochs=1, max_side=64)
    reg = Registry(settings.models_dir)
    student = reg.manifest(demo.model)
    assert student["role"] == "student" and student["parent"] == f"{TEACHER}@1"
    assert demo.model == f"{STUDENT}@1" and demo.index == f"{INDEX}@1"
    index = store_for(settings).load(INDEX)
    assert index.count == 8
    index.check_model(reg.load(demo.model))  # the student may query its teacher's index

    def rebuilt(*args, **kwargs):
        raise AssertionError("the second ensure_demo built part of the demo again")

    for step in ("make_route", "init_teacher", "build_index", "run_distill"):
        monkeypatch.setattr(demo_module, step, rebuilt)
    again = ensure_demo(settings, places=8, epochs=1, max_side=64)
    assert again == demo
    assert reg.versions(STUDENT) == [1] and reg.versions(TEACHER) == [1]
