"""The Dockerfile and docker-compose.yml carry the essentials (no Docker engine here)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

SECRET_WORDS = re.compile(r"(token|secret|password|passwd|api[_-]?key)", re.I)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            rows.append((op.upper(), rest.strip()))
    return rows


def test_dockerfile_essentials():
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    assert ins[0][0] == "FROM" and "nvidia/cuda" in ins[0][1] and "runtime" in ins[0][1]
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    health = " ".join(arg for op, arg in ins if op == "HEALTHCHECK")
    assert "/readyz" in health
    assert any(op == "VOLUME" and "/data" in arg for op, arg in ins)
    assert any(op == "EXPOSE" and "8000" in arg for op, arg in ins)
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), "USER after installs"
    for op, arg in ins:
        if op in ("ENV", "ARG"):
            assert not SECRET_WORDS.search(arg), f"a secret is baked into the image: {op} {arg}"
        if op in ("COPY", "ADD"):
            assert not re.search(r"\b(var|secrets)\b|\.safetensors|\.faiss", arg), f"state copied into image: {arg}"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"var", ".venv", "secrets"} <= set(ignored)


def test_compose_essentials():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    vpr = compose["services"]["vpr"]
    assert "8000:8000" in vpr["ports"]
    assert "/readyz" in " ".join(vpr["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in vpr["volumes"])
    assert vpr["environment"]["VPR_HOME"] == "/data"
    devices = vpr["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    for key, value in vpr["environment"].items():
        if SECRET_WORDS.search(key) and not key.endswith("_FILE"):
            raise AssertionError(f"secret value in compose environment: {key}")
        if key.endswith("_FILE") and SECRET_WORDS.search(key):
            assert str(value).startswith("/run/secrets/")
    assert compose["secrets"]["vpr_admin_token"]["file"].startswith("./secrets/")
    milvus = compose["services"]["milvus"]
    assert milvus["profiles"] == ["milvus"], "Milvus is optional"
    assert "19530:19530" in milvus["ports"]
