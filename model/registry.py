"""Versioned models under $VPR_HOME/models/<name>/<version>/.

Each version holds `weights.safetensors` and `manifest.json`; `active` holds
the served version. Versions are written into a hidden temporary sibling,
fsynced, then renamed into place, so a reader never sees half a version.
Loading checks the sha256 recorded in the manifest before reading a byte of
the tensors; nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vpr.model.config import ModelConfig
from vpr.model.fileio import atomic_write_json, fsync_dir, fsync_tree, read_pointer, sha256_file, write_pointer
from vpr.model.network import VPRNet, build_model

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("teacher", "student")


class RegistryError(ValueError):
    """A registry entry that is missing, ambiguous or fails verification."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class LoadedModel:
    ref: ModelRef
    net: VPRNet
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RegistryError(f"bad model name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    return name


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Registry:
    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir)

    # ---- naming -------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "manifest.json").exists())

    def active(self, name: str) -> ModelRef | None:
        v = read_pointer(self.root / name / "active")
        return ModelRef(name, int(v)) if v and v.isdigit() else None

    def resolve(self, spec: str | ModelRef) -> ModelRef:
        """`name@version`, or `name` for its active (else latest) version."""
        if isinstance(spec, ModelRef):
            ref = spec
        else:
            name, _, ver = str(spec).partition("@")
            check_name(name)
            if ver:
                if not ver.isdigit():
                    raise RegistryError(f"bad version in {spec!r}: expected NAME@<integer>")
                ref = ModelRef(name, int(ver))
            else:
                ref = self.active(name) or (ModelRef(name, self.versions(name)[-1]) if self.versions(name) else None)
                if ref is None:
                    raise RegistryError(f"no model named {name!r} in {self.root}")
        if not (self.dir(ref) / "manifest.json").exists():
            known = ", ".join(f"{ref.name}@{v}" for v in self.versions(ref.name)) or "none"
            raise RegistryError(f"model {ref} not found in {self.root} (versions: {known})")
        return ref

    def dir(self, ref: ModelRef) -> Path:
        return self.root / ref.name / str(ref.version)

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
        check_name(name)
        if role not in ROLES:
            raise RegistryError(f"bad role {role!r}; choose one of {ROLES}")
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=".tmp-"))
        try:
            weights = tmp / "weights.safetensors"
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(weights), metadata={"format": "pt", "model": name})
            manifest = {
                "name": name,
                "role": role,
                "config": net.config.model_dump(),
                "descriptor_dim": net.descriptor_dim,
                "sha256": sha256_file(weights),
                "parent": parent,
                "details": details or {},
                "metrics": metrics or {},
                "created": now_iso(),
            }
            while True:  # claim the next free version number by rename
                version = (self.versions(name) or [0])[-1] + 1
                manifest["version"] = version
                atomic_write_json(tmp / "manifest.json", manifest)
                fsync_tree(tmp)
                try:
                    tmp.rename(base / str(version))
                    break
                except OSError:
                    continue
            fsync_dir(base)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return ModelRef(name, version)

    def activate(self, spec: str | ModelRef) -> ModelRef:
        ref = self.resolve(spec)
        write_pointer(self.root / ref.name / "active", str(ref.version))
        return ref

    def update_metrics(self, spec: str | ModelRef, metrics: dict) -> None:
        ref = self.resolve(spec)
        m = self.manifest(ref)
        m["metrics"] = {**m.get("metrics", {}), **metrics}
        atomic_write_json(self.dir(ref) / "manifest.json", m)

    def cleanup_partial(self) -> int:
        """Remove temp folders left by a killed writer; returns how many."""
        n = 0
        for d in self.root.glob("*/.tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        return n

    # ---- reading ------------------------------------------------------
    def manifest(self, spec: str | ModelRef) -> dict[str, Any]:
        ref = self.resolve(spec)
        path = self.dir(ref) / "manifest.json"
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RegistryError(f"{path}: corrupt manifest ({e})") from e

    def verify(self, spec: str | ModelRef) -> dict[str, Any]:
        """Check weights against the manifest's sha256 and config; returns the manifest."""
        ref = self.resolve(spec)
        m = self.manifest(ref)
        weights = self.dir(ref) / "weights.safetensors"
        if not weights.exists():
            raise RegistryError(f"{weights}: missing weights file")
        actual = sha256_file(weights)
        if actual != m.get("sha256"):
            raise RegistryError(f"{weights}: sha256 mismatch: manifest says {m.get('sha256')}, file has {actual}")
        try:
            ModelConfig.model_validate(m["config"])
        except Exception as e:
            raise RegistryError(f"{self.dir(ref) / 'manifest.json'}: invalid config ({e})") from e
        return m

    def load(self, spec: str | ModelRef, device: torch.device | str = "cpu") -> LoadedModel:
        ref = self.resolve(spec)
        m = self.verify(ref)
        weights = self.dir(ref) / "weights.safetensors"
        net = build_model(m["config"])
        try:
            state = load_file(str(weights))
            net.load_state_dict(state, strict=True)
        except Exception as e:
            raise RegistryError(f"{weights}: does not match its config ({e})") from e
        net.eval()
        return LoadedModel(ref, net.to(device), m)
