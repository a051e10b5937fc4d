"""Versioned models under $VPR_HOME/models/<name>/<version>/.

Each version holds `weights.safetensors` and `manifest.json`; `active` holds
the served version. Names, versions, the pointer and atomic publication are
the shared `VersionedStore`'s (model/store.py); what is the registry's own:
the weights, the sha256 the manifest records for them (checked before a byte
of the tensors is read), the config they must match. Nothing is ever unpickled.

Artifacts: files derived from a version's weights (an ONNX export, its int8
quantization; `model.export`) live in the version's own folder under
`artifacts/` and are listed in its manifest under `artifacts.<kind>` with their
sha256, size and source (`name@version` and the weights' sha256). They are
the one other thing that may be added to a published version (besides its
metrics): adding one never changes the weights or what they compute, and a
reader checks an artifact's sha256 before using it (`verified_artifact`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vpr.model.config import ModelConfig
from vpr.model.fileio import atomic_write_json, fsync_dir, sha256_file
from vpr.model.network import VPRNet, build_model
from vpr.model.store import MANIFEST_FILE, BadSpec, NotFound, Ref, StoreError, VersionedStore, now_iso
from vpr.model.store import check_name as _check_name

ROLES = ("teacher", "student")
WEIGHTS_FILE = "weights.safetensors"
ARTIFACTS_DIR = "artifacts"
ARTIFACT_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
ModelRef = Ref  # a model version, `name@version`

__all__ = [
    "ROLES",
    "BadModelSpec",
    "LoadedModel",
    "ModelNotFound",
    "ModelRef",
    "Registry",
    "RegistryError",
    "check_name",
    "now_iso",
    "verified_artifact",
]


class RegistryError(StoreError):
    """A registry entry that is missing, ambiguous or fails verification."""


class ModelNotFound(RegistryError, NotFound):
    """No such model name or version."""


class BadModelSpec(RegistryError, BadSpec):
    """A malformed model name or `name@version`."""


@dataclass
class LoadedModel:
    ref: ModelRef
    net: VPRNet
    manifest: dict[str, Any]
    folder: Path | None = None  # the version's folder (its artifacts), when loaded from a registry
    # Engines prepared for this model (`model.engines.prepare`), kept with it so that they go when it goes.
    engines: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


def verified_artifact(folder: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The file of artifact `kind` of the model version in `folder` and its manifest
    entry, read afresh (an export may have been added after the model was loaded)
    and checked against its sha256. Raises RegistryError naming the fix."""
    manifest_path = folder / MANIFEST_FILE
    try:
        m = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"{manifest_path}: cannot read the manifest ({e})") from e
    ref = f"{m.get('name')}@{m.get('version')}"
    entry = (m.get("artifacts") or {}).get(kind)
    if not isinstance(entry, dict):
        raise RegistryError(f"model {ref} has no {kind!r} export; run `vpr model export {ref} --format {kind}`")
    path = folder / str(entry.get("file", ""))
    if not path.is_file() or folder.resolve() not in path.resolve().parents:
        fix = f"vpr model export {ref} --format {kind}"
        raise RegistryError(f"{path}: the {kind!r} export of {ref} is missing; run `{fix}`")
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        raise RegistryError(f"{path}: sha256 mismatch: manifest says {entry.get('sha256')}, file has {actual}")
    if entry.get("source_sha256") != m.get("sha256"):
        raise RegistryError(f"{path}: exported from other weights than {ref}'s; export it again")
    return path, entry


def check_name(name: str) -> str:
    return _check_name(name, "model", BadModelSpec)


class Registry:
    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir)
        self._store = VersionedStore(
            self.root,
            "model",
            error=RegistryError,
            not_found=ModelNotFound,
            bad_spec=BadModelSpec,
            latest_if_inactive=True,
        )

    # ---- naming -------------------------------------------------------
    def names(self) -> list[str]:
        return self._store.names()

    def versions(self, name: str) -> list[int]:
        return self._store.versions(name)

    def active(self, name: str) -> ModelRef | None:
        return self._store.active(name)

    def resolve(self, spec: str | ModelRef) -> ModelRef:
        """`name@version`, or `name` for its active (else latest) version."""
        return self._store.resolve(spec)

    def dir(self, ref: ModelRef) -> Path:
        return self._store.dir(ref)

    # ---- writing ------------------------------------------------------
    def register(
        self,
        name: str,
        net: VPRNet,
        role: str,
        parent: str | None = None,
        details: dict | None = None,
        metrics: dict | None = None,
    ) -> ModelRef:
        if role not in ROLES:
            raise RegistryError(f"bad role {role!r}; choose one of {ROLES}")
        with self._store.stage(name) as tmp:
            weights = tmp / WEIGHTS_FILE
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(weights), metadata={"format": "pt", "model": name})
            manifest = {
                "role": role,
                "config": net.config.model_dump(),
                "descriptor_dim": net.descriptor_dim,
                "sha256": sha256_file(weights),
                "parent": parent,
                "details": details or {},
                "metrics": metrics or {},
                "created": now_iso(),
            }
            return self._store.publish(tmp, manifest)  # adds name and version

    def activate(self, spec: str | ModelRef) -> ModelRef:
        return self._store.activate(spec)

    def update_metrics(self, spec: str | ModelRef, metrics: dict) -> None:
        """Merge `metrics` into a version's manifest (the one field that may
        change after publication), under the writer lock so no update is lost."""
        ref = self.resolve(spec)
        with self._store.writer(ref.name):
            m = self.manifest(ref)
            m["metrics"] = {**m.get("metrics", {}), **metrics}
            atomic_write_json(self.dir(ref) / MANIFEST_FILE, m)

    def add_artifact(
        self, spec: str | ModelRef, kind: str, build: Callable[[Path], dict[str, Any]], suffix: str = ".onnx"
    ) -> dict[str, Any]:
        """Add (or replace) artifact `kind` of a model version: `build(path)` writes
        the file at `path` (a hidden temporary in the version's folder, so the
        bytes are built without holding the lock) and returns details for its
        manifest entry. The file is fsynced, renamed into place and recorded with
        its sha256 and source under the writer lock. Returns the entry."""
        if not ARTIFACT_KIND_RE.match(kind):
            raise RegistryError(f"bad artifact kind {kind!r}: lowercase letters, digits and '-'")
        ref = self.resolve(spec)
        folder = self.dir(ref)
        out_dir = folder / ARTIFACTS_DIR
        out_dir.mkdir(exist_ok=True)
        target = out_dir / f"{kind}{suffix}"
        tmp = out_dir / f".{kind}-{uuid.uuid4().hex[:8]}.tmp{suffix}"
        try:
            details = build(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            sha = sha256_file(tmp)
            with self._store.writer(ref.name):
                m = self.manifest(ref)
                os.replace(tmp, target)
                fsync_dir(out_dir)
                entry = {
                    **details,
                    "kind": kind,
                    "file": f"{ARTIFACTS_DIR}/{target.name}",
                    "sha256": sha,
                    "bytes": target.stat().st_size,
                    "source": str(ref),
                    "source_sha256": m["sha256"],
                    "created": now_iso(),
                }
                m["artifacts"] = {**(m.get("artifacts") or {}), kind: entry}
                atomic_write_json(folder / MANIFEST_FILE, m)
        finally:
            tmp.unlink(missing_ok=True)
        return entry

    def artifact(self, spec: str | ModelRef, kind: str) -> tuple[Path, dict[str, Any]]:
        """The checked file of artifact `kind` of a model version and its entry."""
        return verified_artifact(self.dir(self.resolve(spec)), kind)

    def cleanup_partial(self) -> int:
        """Remove temp folders left by a killed writer; returns how many."""
        return self._store.cleanup()

    # ---- reading ------------------------------------------------------
    def manifest(self, spec: str | ModelRef) -> dict[str, Any]:
        return self._store.read_manifest(self.resolve(spec))

    def verify(self, spec: str | ModelRef, artifacts: bool = True) -> dict[str, Any]:
        """Check weights against the manifest's sha256 and config (and, with
        `artifacts`, every exported artifact against its own); returns the manifest."""
        ref = self.resolve(spec)
        m = self.manifest(ref)
        weights = self.dir(ref) / WEIGHTS_FILE
        if not weights.exists():
            raise RegistryError(f"{weights}: missing weights file")
        actual = sha256_file(weights)
        if actual != m.get("sha256"):
            raise RegistryError(f"{weights}: sha256 mismatch: manifest says {m.get('sha256')}, file has {actual}")
        try:
            ModelConfig.model_validate(m["config"])
        except Exception as e:
            raise RegistryError(f"{self.dir(ref) / MANIFEST_FILE}: invalid config ({e})") from e
        for kind in m.get("artifacts") or {} if artifacts else {}:
            self.artifact(ref, kind)
        return m

    def load(self, spec: str | ModelRef, device: torch.device | str = "cpu") -> LoadedModel:
        ref = self.resolve(spec)
        m = self.verify(ref, artifacts=False)  # an engine checks the artifact it uses
        weights = self.dir(ref) / WEIGHTS_FILE
        net = build_model(m["config"])
        try:
            state = load_file(str(weights))
            net.load_state_dict(state, strict=True)
        except Exception as e:
            raise RegistryError(f"{weights}: does not match its config ({e})") from e
        net.eval()
        return LoadedModel(ref, net.to(device), m, self.dir(ref))
