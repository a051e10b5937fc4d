"""One call per `vpr index` subcommand: resolve the home, the registry model
and the images, then do the work through `IndexStore`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpr.index.meta import Entry
from vpr.index.store import Hit, IndexRef, IndexStore
from vpr.model.preprocess import list_images
from vpr.settings import HomeSettings, IndexSettings

log = logging.getLogger(__name__)


def store_for(home: HomeSettings, settings: IndexSettings | None = None) -> IndexStore:
    return IndexStore(home.indexes_dir, settings)


def _load_model(home: HomeSettings, spec: str, device: Any = None):
    from vpr.model.extract import default_device
    from vpr.model.registry import Registry

    return Registry(home.models_dir).load(spec, device or default_device())


def folder_entries(folder: Path) -> list[Entry]:
    """Every image directly in `folder`, labelled by file stem."""
    return [Entry(p.resolve(), p.stem) for p in list_images(Path(folder))]


def _items_and_root(
    items: Sequence[Any] | None, images: Path | None, root: Path | None, dataset_root: Path | None
) -> tuple[list[Any], Path]:
    if (items is None) == (images is None):
        raise ValueError("give either database items (a dataset) or an image folder")
    if images is not None:
        return folder_entries(images), Path(root or images)
    if root is None and dataset_root is None:
        raise ValueError("a root folder is needed to store image paths relative to it")
    base = root or dataset_root
    # exactly one of items / images is given (checked above) and images is None here;
    # root or dataset_root is set (checked above)
    assert items is not None and base is not None
    return list(items), Path(base)


def build_index(
    home: HomeSettings,
    model_spec: str,
    name: str,
    *,
    items: Sequence[Any] | None = None,
    images: Path | None = None,
    root: Path | None = None,
    dataset_root: Path | None = None,
    factory: str = "Flat",
    batch_size: int = 8,
    activate: bool = True,
    device: Any = None,
    skip_bad: bool = False,
    settings: IndexSettings | None = None,
) -> IndexRef:
    entries, root = _items_and_root(items, images, root, dataset_root)
    store = store_for(home, settings)
    model = _load_model(home, model_spec, device)
    log.info("building index %s from %d images with %s (%s)", name, len(entries), model.ref, factory)
    return store.build(
        name,
        model,
        entries,
        root,
        factory=factory,
        batch_size=batch_size,
        activate=activate,
        device=device,
        skip_bad=skip_bad,
    )


def add_images(
    home: HomeSettings,
    index_spec: str,
    model_spec: str | None = None,
    *,
    items: Sequence[Any] | None = None,
    images: Path | None = None,
    files: Sequence[Path] = (),
    batch_size: int = 8,
    activate: bool = True,
    device: Any = None,
    skip_bad: bool = False,
    skip_existing: bool = False,
    settings: IndexSettings | None = None,
) -> IndexRef:
    store = store_for(home, settings)
    m = store.manifest(index_spec)
    entries: list[Any] = list(items or [])
    if images is not None:
        entries += folder_entries(images)
    entries += [Entry(Path(f).resolve(), Path(f).stem) for f in files]
    if not entries:
        raise ValueError("nothing to add: give images, a folder or a dataset")
    model = _load_model(home, model_spec or m["model"], device)
    return store.add(
        index_spec,
        model,
        entries,
        batch_size=batch_size,
        activate=activate,
        device=device,
        skip_bad=skip_bad,
        skip_existing=skip_existing,
    )


def remove_items(
    home: HomeSettings,
    index_spec: str,
    ids: Sequence[int] = (),
    paths: Sequence[str] = (),
    labels: Sequence[str] = (),
    activate: bool = True,
    settings: IndexSettings | None = None,
) -> IndexRef:
    return store_for(home, settings).remove(index_spec, ids=ids, paths=paths, labels=labels, activate=activate)


def list_indexes(home: HomeSettings) -> dict[str, list[dict]]:
    store = store_for(home)
    return {name: store.info(name) for name in store.names()}


def show_index(home: HomeSettings, spec: str, verify: bool = False, items: int = 0) -> dict:
    """The manifest of a version (and its first `items` metadata rows)."""
    store = store_for(home)
    m = store.verify(spec) if verify else store.manifest(spec)
    out = {"manifest": m, "verified": verify}
    if items:
        from vpr.index.meta import MetaReader

        ref = store.resolve(spec)
        reader = MetaReader(store.dir(ref) / "meta.sqlite")
        try:
            out["items"] = list(reader.iter_rows(items))
        finally:
            reader.close()
    return out


def activate_index(home: HomeSettings, spec: str) -> IndexRef:
    return store_for(home).activate(spec)


def prune_index(home: HomeSettings, name: str, keep: int) -> list[IndexRef]:
    return store_for(home).prune(name, keep)


def search_images(
    home: HomeSettings,
    index_spec: str,
    images: Sequence[Path],
    model_spec: str | None = None,
    k: int = 5,
    params: dict | None = None,
    batch_size: int = 8,
    device: Any = None,
    settings: IndexSettings | None = None,
) -> tuple[IndexRef, str, list[list[Hit]]]:
    """Describe query images with a compatible model and search; refuses a
    model the index cannot be searched with (see check_compatible)."""
    from vpr.describe.describe import describe

    store = store_for(home, settings)
    manifest = store.manifest(index_spec)
    model = _load_model(home, model_spec or manifest["model"], device)
    index = store.load(index_spec, model=model)
    try:
        q = describe(model, [Path(p) for p in images], batch_size=batch_size, progress=len(images) > 16 and "queries")
        return index.ref, str(model.ref), index.search(q.desc, k, params)
    finally:
        index.close()
