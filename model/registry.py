"""Versioned models under $VPR_HOME/models/<name>/<version>/.

Each version holds `weights.safetensors` and `manifest.json`; `active` holds
the served version. Names, versions, the pointer and atomic publication are
the shared `VersionedStore`'s (model/store.py); what is the registry's own:
the weights, the sha256 the manifest records for them (checked before a byte
of the tensors is read), the config they must match. Nothing is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vpr.model.config import ModelConfig
from vpr.model.fileio import atomic_write_json, sha256_file
from vpr.model.network import VPRNet, build_model
from vpr.model.store import MANIFEST_FILE, BadSpec, NotFound, Ref, StoreError, VersionedStore, now_iso
from vpr.model.store import check_name as _check_name

ROLES = ("teacher", "student")
WEIGHTS_FILE = "weights.safetensors"
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

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


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

    def cleanup_partial(self) -> int:
        """Remove temp folders left by a killed writer; returns how many."""
        return self._store.cleanup()

    # ---- reading ------------------------------------------------------
    def manifest(self, spec: str | ModelRef) -> dict[str, Any]:
        return self._store.read_manifest(self.resolve(spec))

    def verify(self, spec: str | ModelRef) -> dict[str, Any]:
        """Check weights against the manifest's sha256 and config; returns the manifest."""
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
        return m

    def load(self, spec: str | ModelRef, device: torch.device | str = "cpu") -> LoadedModel:
        ref = self.resolve(spec)
        m = self.verify(ref)
        weights = self.dir(ref) / WEIGHTS_FILE
        net = build_model(m["config"])
        try:
            state = load_file(str(weights))
            net.load_state_dict(state, strict=True)
        except Exception as e:
            raise RegistryError(f"{weights}: does not match its config ({e})") from e
        net.eval()
        return LoadedModel(ref, net.to(device), m)
