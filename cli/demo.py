"""The out-of-the-box demo: a synthetic route, a teacher, its index and a student.

`vpr serve --demo` calls `ensure_demo` before serving. The first run builds
everything under $VPR_HOME (about a minute or two on a laptop CPU); a later
run finds the registered student and the active index and returns at once.
Real VGG16 weights are used when found, or fetched (torchvision's ImageNet
VGG16 from the weights catalogue, sha256-checked) when downloads are allowed;
with VPR_OFFLINE=1 (or in CI) and no file, or when the fetch fails, the demo
says so plainly, with the command that brings the file, and uses a randomly
initialised backbone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vpr.data.datasets import open_dataset
from vpr.data.synthetic import make_route
from vpr.index.ops import build_index, store_for
from vpr.index.store import IndexStoreError
from vpr.model.catalogue import imagenet_entry
from vpr.model.config import BackboneConfig, ModelConfig, NetVLADConfig, PreprocessConfig
from vpr.model.extract import default_device
from vpr.model.fetch import FetchError, OfflineError
from vpr.model.registry import Registry, RegistryError
from vpr.model.teacher import init_teacher
from vpr.model.weights import WeightsError, ensure_imagenet
from vpr.settings import DemoSettings, HomeSettings
from vpr.train.distill import DistillConfig, run_distill

log = logging.getLogger(__name__)

TEACHER, STUDENT, INDEX = "demo-teacher", "demo-student", "demo"
VGG_FILE = "vgg16_imagenet_caffe_features.safetensors"


@dataclass(frozen=True)
class Demo:
    model: str  # the served student, NAME@VERSION
    index: str  # NAME@VERSION
    weights: str  # what the teacher's backbone was initialised from


def find_weights(home: HomeSettings) -> tuple[str, str]:
    """(weights argument for init_teacher, preprocessing mode).

    Looked for, in order: $VPR_DEMO_WEIGHTS, $VPR_HOME/weights/<VGG_FILE>, the
    `shared/weights` folder beside this checkout; then the catalogue's
    torchvision ImageNet VGG16 (in $VPR_HOME/weights, torchvision's local cache,
    or fetched unless downloads are off). ("none", "caffe") when there is none,
    after saying why."""
    candidates = [
        DemoSettings().weights,
        home.home / "weights" / VGG_FILE,
        Path(__file__).resolve().parents[2] / "shared" / "weights" / VGG_FILE,
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c), "caffe"
    entry = imagenet_entry("vgg16")
    try:
        ensure_imagenet("vgg16", home.weights_dir, offline=home.forbid_downloads)
        return "imagenet", "imagenet"
    except OfflineError as e:
        reason = str(e)
    except (FetchError, WeightsError) as e:
        reason = f"could not fetch {entry.name} ({e})"
    log.warning(
        "demo: no pretrained VGG16 weights: %s. Using a RANDOMLY INITIALISED backbone: the demo runs, but its "
        "matches are weak",
        reason,
    )
    return "none", "caffe"


def existing_demo(home: HomeSettings) -> Demo | None:
    """The demo already built under `home`, if its student and index load."""
    reg = Registry(home.models_dir)
    try:
        student = reg.resolve(STUDENT)
        index = store_for(home).resolve(INDEX)
        weights = reg.manifest(reg.manifest(student)["parent"])["details"].get("weights", "?")
    except (RegistryError, IndexStoreError, KeyError, TypeError, FileNotFoundError):
        return None
    return Demo(str(student), str(index), weights)


def ensure_demo(home: HomeSettings, places: int = 60, epochs: int = 2, max_side: int = 320) -> Demo:
    """Build (or find) the demo; returns what to serve."""
    found = existing_demo(home)
    if found:
        log.info("demo: serving %s on index %s (built earlier)", found.model, found.index)
        return found
    weights, mode = find_weights(home)
    if weights != "none":
        log.info("demo: teacher backbone weights from %s", weights)
    route = make_route(home.home / "demo" / "route", places=places, seed=0, progress=True)
    ds = open_dataset("folder", route)
    db_folder = route / "database"
    device = default_device()
    config = ModelConfig(
        backbone=BackboneConfig(name="vgg16"),
        netvlad=NetVLADConfig(clusters=32),
        preprocess=PreprocessConfig(mode=mode, max_side=max_side, small_policy="upsample"),
    )
    reg = Registry(home.models_dir)
    teacher = init_teacher(reg, TEACHER, config, weights, db_folder, samples=20_000, seed=0, device=device)
    log.info("demo: teacher %s registered; building index %s", teacher, INDEX)
    build_index(home, str(teacher), INDEX, items=ds.database, dataset_root=ds.root, activate=True)
    log.info("demo: distilling a student for small compressed queries (%d epochs)", epochs)
    run_distill(
        DistillConfig(
            teacher=str(teacher),
            name=STUDENT,
            images=db_folder,
            qualities=["h60-jpeg20", "h90-jpeg30"],
            epochs=epochs,
            activate=True,
            progress=True,
        ),
        home,
    )
    built = existing_demo(home)
    if built is None:
        raise RuntimeError(f"demo under {home.home} was built but does not load; see the log above")
    return built
