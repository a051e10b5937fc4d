"""The Dockerfile, docker-compose.yml, the nginx configuration and the Kubernetes
manifests carry the essentials (no Docker engine or cluster here): the compose file
and the manifests are parsed and checked, the manifests also against the Kubernetes
API schemas bundled with `kubernetes-validate` (offline), and nginx itself checks its
configuration when it is installed."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO, skip_or_fail

SECRET_WORDS = re.compile(r"(token|secret|password|passwd|api[_-]?key)", re.I)
K8S = REPO / "deploy" / "k8s"
NGINX = REPO / "deploy" / "nginx" / "nginx.conf"
K8S_VERSION = "1.30"


def dockerfile_instructions(path=REPO / "Dockerfile") -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
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


def replicas(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if re.fullmatch(r"vpr-\d+", name)}


def test_compose_runs_replicas_behind_nginx():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    servers = replicas(compose)
    assert len(servers) >= 2, "N server replicas"
    devices_seen: list[str] = []
    for name, vpr in servers.items():
        assert "ports" not in vpr, f"{name}: replicas are reached through the proxy only"
        assert "/readyz" in " ".join(vpr["healthcheck"]["test"])
        assert "vpr-data:/data" in vpr["volumes"], "every replica mounts the one shared home"
        env = vpr["environment"]
        assert env["VPR_HOME"] == "/data" and env["VPR_REPLICA_NAME"] == name
        for key in ("VPR_FOLLOW_INTERVAL_S", "VPR_LEASE_TTL_S", "VPR_INDEX_BACKEND", "VPR_INDEX_MILVUS_URI"):
            assert key in env
        (device,) = vpr["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        devices_seen += device["device_ids"]
        for key, value in env.items():
            if SECRET_WORDS.search(key) and not key.endswith("_FILE"):
                raise AssertionError(f"secret value in compose environment: {key}")
            if key.endswith("_FILE") and SECRET_WORDS.search(key):
                assert str(value).startswith("/run/secrets/")
    assert len(devices_seen) == len(set(devices_seen)) == len(servers), "one GPU per replica"
    proxy = compose["services"]["proxy"]
    assert proxy["ports"] == ["8000:8000"]
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert proxy["build"] == "deploy/nginx"
    base = dockerfile_instructions(REPO / "deploy" / "nginx" / "Dockerfile")
    assert base[0] == ("FROM", "debian:bookworm-slim") and any("install" in a and "nginx" in a for _, a in base)
    assert compose["secrets"]["vpr_admin_token"]["file"].startswith("./secrets/")
    milvus = compose["services"]["milvus"]
    assert milvus["profiles"] == ["milvus"], "Milvus is optional"
    assert "19530:19530" in milvus["ports"]


def test_nginx_conf_balances_every_replica_with_websockets_and_session_affinity():
    text = NGINX.read_text()
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\n    \}", text, re.S))
    assert set(upstreams) == {"vpr_any", "vpr_session"}
    for body in upstreams.values():
        assert sorted(re.findall(r"server (vpr-\d+):8000", body)) == sorted(replicas(compose)), "one line per replica"
    assert "least_conn;" in upstreams["vpr_any"]
    assert "hash $http_x_vpr_session consistent;" in upstreams["vpr_session"]
    stream = re.search(r"location = /v1/stream \{(.*?)\}", text, re.S)
    assert stream and "proxy_set_header Upgrade $http_upgrade;" in stream.group(1)
    assert "proxy_set_header Connection $connection_upgrade;" in stream.group(1)
    query = re.search(r"location /v1/query \{(.*?)\}", text, re.S)
    assert query and "http_503" in query.group(1) and "non_idempotent" in query.group(1)
    admin = re.search(r"location /v1/admin/ \{(.*?)\}", text, re.S)
    assert admin and "non_idempotent" not in admin.group(1), "an admin request is never sent twice"
    assert re.search(r"(?m)^\s*listen 8000;", text)


def test_nginx_accepts_the_conf(tmp_path):
    """nginx -t on the configuration as the tests run it (upstreams on loopback)."""
    from vpr.server.harness import nginx_binary, render_nginx_conf

    binary = nginx_binary()
    if binary is None:
        skip_or_fail("nginx is not installed (.ci/install-proxy.sh)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(NGINX.read_text(), ["127.0.0.1:1", "127.0.0.1:2"], 8, tmp_path))
    out = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def k8s_documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_k8s_manifests_validate_against_the_api_schemas():
    try:
        import kubernetes_validate
    except ImportError as e:
        skip_or_fail(f"kubernetes-validate is not installed (dev extras): {e}")
    docs = k8s_documents()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Deployment", "Service", "Ingress"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError with the path
    bad = {**docs[1], "spec": {**docs[1]["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_k8s_essentials():
    docs = {d["kind"]: d for d in k8s_documents()}
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every replica mounts the shared home"
    dep = docs["Deployment"]
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, "one GPU per replica"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["VPR_HOME"]["value"] == "/data"
    assert env["VPR_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["VPR_ADMIN_TOKEN_FILE"]["value"].startswith("/run/secrets/")
    assert not any(SECRET_WORDS.search(n) and not n.endswith("_FILE") for n in env)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["home"] == "/data"
    assert volumes["home"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc = docs["Service"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    ingress = docs["Ingress"]
    notes = ingress["metadata"]["annotations"]
    assert "$http_x_vpr_session" in notes["nginx.ingress.kubernetes.io/upstream-hash-by"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600, "long-lived websockets"
