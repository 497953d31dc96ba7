"""deployment/: the production shape is valid and matches the code (Docker is not needed).

Every YAML file parses; every service of helper.stack.SERVICES has a
Kubernetes manifest and a compose service that run the right module on the
right port with readiness on /healthz; no secret value is committed; the
production settings (replica set with retryable writes, idempotent producers,
replicated topics) are there; and the Nginx template renders for a container
into a config ``nginx -t`` accepts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chatlib.kafka import topic_replication_factor

from helper.infra import ROOT
from helper.stack import SERVICES, ServiceSpec

DEPLOY = ROOT / "deployment"
K8S = DEPLOY / "k8s"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|MONGO_URL|CREDENTIAL|PRIVATE", re.I)


def load_all(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.load_all(fh, Loader=_LOADER) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_all(DEPLOY / "compose.yaml")
    return doc


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += load_all(path)
    return docs


def workload(name: str) -> dict[str, Any]:
    found = [
        d
        for d in load_all(K8S / f"{name}.yaml")
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"k8s/{name}.yaml must hold one Deployment or StatefulSet named {name}"
    return found[0]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def prefix(s: ServiceSpec) -> str:
    return s.package.upper()


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert DEPLOY / "compose.yaml" in files
    assert len(files) >= len(SERVICES) + 4
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        for d in docs:
            assert isinstance(d, dict), path


def test_every_k8s_object_is_well_formed_and_listed_in_the_kustomization() -> None:
    (kust,) = load_all(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for d in manifests():
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            selector = d["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), d["metadata"]["name"]


def test_services_select_existing_pods() -> None:
    docs = manifests()
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if "template" in d.get("spec", {})]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]


# --------------------------------------------------------------------------
# every service, in Kubernetes and in compose
# --------------------------------------------------------------------------


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_k8s_manifest_runs_the_service(s: ServiceSpec) -> None:
    w = workload(s.name)
    c = container(w)
    assert c["image"].startswith("chat-backend")
    assert c["command"] == ["python", "-m", f"services.{s.package}"]
    assert {"name": "http", "containerPort": s.port} in c["ports"]
    env = env_of(c)
    assert env[f"{prefix(s)}_HOST"] == "0.0.0.0"
    assert env[f"{prefix(s)}_PORT"] == str(s.port)
    assert {"configMapRef": {"name": "chat-config"}} in c["envFrom"]
    assert env["MONGO_URL"] == {"secretKeyRef": {"name": "chat-secrets", "key": "MONGO_URL"}}
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["port"] in ("http", s.port)
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert w["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    services = [
        d for d in load_all(K8S / f"{s.name}.yaml") if d["kind"] == "Service" and d["metadata"]["name"] == s.name
    ]
    assert len(services) == 1
    assert services[0]["spec"]["ports"][0]["port"] == s.port


@pytest.mark.parametrize("s", SERVICES, ids=lambda s: s.name)
def test_compose_runs_the_service(compose: dict[str, Any], s: ServiceSpec) -> None:
    svc = compose["services"][s.name]
    assert svc["image"].startswith("chat-backend")
    assert svc["build"]["dockerfile"] == "deployment/Dockerfile"
    assert f"python -m services.{s.package}" in " ".join(svc["command"])
    env = svc["environment"]
    assert env[f"{prefix(s)}_HOST"] == "0.0.0.0"
    assert str(env[f"{prefix(s)}_PORT"]) == str(s.port)
    assert f"http://127.0.0.1:{s.port}/healthz" in " ".join(svc["healthcheck"]["test"])
    assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert svc["depends_on"]["mongo-init"]["condition"] == "service_completed_successfully"


def test_gateway_runs_three_instances_named_after_their_pod_or_container(compose: dict[str, Any]) -> None:
    w = workload("gateway")
    assert w["kind"] == "StatefulSet" and w["spec"]["replicas"] == 3
    assert env_of(container(w))["GATEWAY_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    gw = compose["services"]["gateway"]
    assert gw["deploy"]["replicas"] == 3
    assert "GATEWAY_INSTANCE_ID=" in " ".join(gw["command"])
    assert "GATEWAY_INSTANCE_ID" not in gw["environment"]


def test_compose_dependencies_exist(compose: dict[str, Any]) -> None:
    names = set(compose["services"])
    for name, svc in compose["services"].items():
        assert set(svc.get("depends_on", {})) <= names, name


def test_nginx_upstreams_point_at_the_service_ports(compose: dict[str, Any]) -> None:
    public = {s.upstream: s for s in SERVICES if s.upstream}
    k8s_env = env_of(container(workload("nginx")))
    compose_env = compose["services"]["nginx"]["environment"]
    script = (DEPLOY / "nginx" / "render.sh").read_text()
    for upstream, s in public.items():
        expected = f"{s.name}:{s.port}"
        assert k8s_env[f"UPSTREAM_{upstream.upper()}"] == expected
        assert compose_env[f"UPSTREAM_{upstream.upper()}"] == expected
        assert f'{upstream}) echo "{expected}"' in script
    assert set(compose["services"]["nginx"]["depends_on"]) >= set(public)


# --------------------------------------------------------------------------
# infrastructure and production settings
# --------------------------------------------------------------------------


def test_compose_runs_kafka_in_kraft_mode_and_a_mongo_replica_set(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafkas = [n for n in services if n.startswith("kafka-")]
    assert len(kafkas) == 3
    for n in kafkas:
        assert services[n]["image"].startswith("apache/kafka:")
        assert "controller" in services[n]["environment"]["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in n for n in services)
    mongos = [n for n in services if re.fullmatch(r"mongo-\d", n)]
    assert len(mongos) == 3
    for n in mongos:
        assert "--replSet" in services[n]["command"]
    init = services["mongo-init"]
    script = DEPLOY / init["volumes"][0].split(":")[0].removeprefix("./")
    text = script.read_text()
    for n in mongos:
        assert f"{n}:27017" in text
    assert services["topics"]["command"] == ["python", "-m", "helper.run", "topics"]


def test_topics_job_creates_the_topics() -> None:
    (job,) = load_all(K8S / "topics-job.yaml")
    assert job["kind"] == "Job"
    c = container(job)
    assert c["command"] == ["python", "-m", "helper.run", "topics"]
    assert env_of(c)["GATEWAY_INSTANCES"] == "0"


def test_production_urls_and_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["profile"]["environment"]
    (config,) = load_all(K8S / "config.yaml")
    for settings in (env, config["data"]):
        assert str(settings["KAFKA_ENABLE_IDEMPOTENCE"]) == "true"
        assert str(settings["KAFKA_REPLICATION_FACTOR"]) == "3"
        assert len(settings["KAFKA_BOOTSTRAP_SERVERS"].split(",")) == 3
    assert "replicaSet=rs0" in env["MONGO_URL"] and "retryWrites=true" in env["MONGO_URL"]
    readme = (DEPLOY / "README.md").read_text()
    for fact in ("retryWrites=true", "KAFKA_ENABLE_IDEMPOTENCE=true", "gateway.<instance>.v1", "memory"):
        assert fact in readme


def test_replication_factor_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_REPLICATION_FACTOR", raising=False)
    assert topic_replication_factor() == 1
    monkeypatch.setenv("KAFKA_REPLICATION_FACTOR", "3")
    assert topic_replication_factor() == 3
    monkeypatch.setenv("KAFKA_REPLICATION_FACTOR", "zero")
    with pytest.raises(ValueError, match="KAFKA_REPLICATION_FACTOR"):
        topic_replication_factor()


# --------------------------------------------------------------------------
# images and secrets
# --------------------------------------------------------------------------


def test_service_image_is_slim_runtime_only_and_non_root() -> None:
    text = "\n".join(line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.startswith("#"))
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "pip install -r requirements.txt" in text
    assert "requirements-dev" not in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    runtime = "\n".join(
        line for line in (ROOT / "requirements.txt").read_text().lower().splitlines() if not line.startswith("#")
    )
    # Licences: the embedded servers run only as separate processes in development.
    assert "secantusdb" not in runtime and "calfkit" not in runtime


def test_nginx_image_renders_the_shared_template() -> None:
    text = (DEPLOY / "nginx" / "Dockerfile").read_text()
    assert "deployment/nginx/nginx.conf.tmpl" in text
    assert "/docker-entrypoint.d/" in text and "render.sh" in text
    assert "COPY docs/" in text and "COPY www/" in text


def test_no_secret_values_are_committed(compose: dict[str, Any]) -> None:
    for d in manifests():
        assert d["kind"] != "Secret", "create chat-secrets outside git (README.md)"
        if d["kind"] == "ConfigMap":
            secret_keys = [k for k in d["data"] if SECRET_WORDS.search(k) and not k.endswith("_FILE")]
            assert not secret_keys, f"secrets in a ConfigMap: {secret_keys}"
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in c.get("env", []):
                if SECRET_WORDS.search(e["name"]) and not e["name"].endswith("_FILE"):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_WORDS.search(key) and key not in ("MONGO_URL",) and not key.endswith("_FILE"):
                assert str(value).startswith("${") or value == "", f"{name}: {key} holds a value"
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    assert "deployment/secrets/" in (ROOT / ".gitignore").read_text()
    looks_secret = re.compile(
        r"BEGIN [A-Z ]*PRIVATE KEY|eyJ[A-Za-z0-9_-]{10,}\.|\b[0-9a-f]{32,}\b|AIza[0-9A-Za-z_-]{20,}"
    )
    for path in DEPLOY.rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            assert not looks_secret.search(path.read_text(errors="replace")), path


# --------------------------------------------------------------------------
# the nginx config a container renders
# --------------------------------------------------------------------------


def test_render_script_makes_a_valid_container_config(tmp_path: Path) -> None:
    template = DEPLOY / "nginx" / "nginx.conf.tmpl"
    names = sorted(set(re.findall(r"proxy_pass http://([A-Za-z0-9_]+)[;/]", template.read_text())))
    assert names
    env = {
        "PATH": os.environ["PATH"],
        "NGINX_TEMPLATE": str(template),
        "NGINX_VAR": str(tmp_path),
        "NGINX_LOG_FILES": "1",
        "WWW_ROOT": str(ROOT / "www"),
        "DOCS_ROOT": str(ROOT / "docs"),
        "PUBLIC_PORT": "18080",
    }
    # Loopback addresses, so nginx -t resolves them here.
    env.update({f"UPSTREAM_{n.upper()}": f"127.0.0.1:{9000 + i}" for i, n in enumerate(names)})
    env["UPSTREAM_GATEWAY"] = "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103"
    subprocess.run(["sh", str(DEPLOY / "nginx" / "render.sh")], env=env, check=True, capture_output=True)
    conf = (tmp_path / "nginx.conf").read_text()
    body = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    assert "{{" not in body
    assert "listen 18080 backlog=4096;" in body and "listen 127.0.0.1" not in body
    for n in names:
        assert f"upstream {n} {{" in body
    assert body.count("server 127.0.0.1:91") == 3
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run(
        [nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_render_script_refuses_an_upstream_it_cannot_place(tmp_path: Path) -> None:
    template = tmp_path / "t.conf"
    template.write_text("http { server { location / { proxy_pass http://mystery; } } }\n")
    env = {
        "PATH": os.environ["PATH"],
        "NGINX_TEMPLATE": str(template),
        "NGINX_VAR": str(tmp_path),
        "NGINX_LOG_FILES": "1",
    }
    out = subprocess.run(["sh", str(DEPLOY / "nginx" / "render.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "UPSTREAM_MYSTERY" in out.stderr
