"""The Helm chart, the plain manifests and the image's install steps.

Rendering and linting go through Helm's own library (helm-python-sdk), and
every rendered object is validated against the Kubernetes schemas of a
current release (kubernetes-validate); no helm binary, no cluster, no Docker.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from workers.cli import build_parser

helm_python = pytest.importorskip("helm_python", reason="SKIPPED LOUDLY: helm-python-sdk missing")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="SKIPPED LOUDLY: kubernetes-validate missing"
)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "stui-sessions"
# Custom resources of the Prometheus operator: no schema in kubernetes-validate.
CRDS = {"ServiceMonitor", "PrometheusRule"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "redis-cluster": {
        "redis": {
            "mode": "cluster",
            "url": "redis://redis-cluster-0.redis:6379/0",
            "password": {"existingSecret": "redis", "key": "password"},
        }
    },
    "redis-sentinel": {
        "redis": {
            "mode": "sentinel",
            "url": "redis://unused:6379/0",
            "sentinel": {
                "addresses": ["s-0.sentinel:26379", "s-1.sentinel:26379"],
                "masterName": "stui",
            },
        }
    },
    "auth-on": {
        "curve": {"enabled": True, "serverKeySecret": "#   ZeroMQ CURVE **Secret** Certificate\n"}
    },
    "monitoring-and-network-policy": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        },
        "front": {"workers": 2, "service": {"type": "ClusterIP"}},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="stui", namespace="stui")
    finally:
        chart.close()
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c for d in by_kind(docs, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
    ]


def test_chart_lints_clean() -> None:
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_renders_and_validates(name: str) -> None:
    docs = render(VALUE_SETS[name])
    version = kubernetes_validate.utils.latest_version()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_optional_objects_follow_their_switches() -> None:
    default_kinds = {d["kind"] for d in render({})}
    assert not default_kinds & (CRDS | {"NetworkPolicy", "Secret"})
    on = render(VALUE_SETS["monitoring-and-network-policy"])
    assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= {d["kind"] for d in on}
    rule = by_kind(on, "PrometheusRule")[0]
    alerts = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    assert rule["spec"] == alerts  # the chart ships the very rules of deploy/
    assert (CHART / "files" / "alerts.yml").read_text() == (
        ROOT / "deploy" / "alerts.yml"
    ).read_text()
    auth = render(VALUE_SETS["auth-on"])
    assert by_kind(auth, "Secret")
    config = by_kind(auth, "ConfigMap")[0]["data"]
    assert config["STUI_CURVE"] == "true" and config["STUI_CURVE_KEY_FILE"]


def test_services_ports_and_grace_periods() -> None:
    docs = render({})
    zmq_service = next(s for s in by_kind(docs, "Service") if s["spec"]["type"] == "LoadBalancer")
    default_port = int(Settings().bind.rsplit(":", 1)[1])
    assert zmq_service["spec"]["ports"][0]["port"] == default_port == 5555
    metrics = next(
        s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")
    )
    assert metrics["spec"]["type"] == "ClusterIP"
    front = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-front"))
    pod = front["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    front_container = next(c for c in pod["containers"] if c["name"] == "front")
    assert front_container["ports"][0]["containerPort"] == default_port
    grace = float(front_container["args"][front_container["args"].index("--shutdown-grace") + 1])
    config = by_kind(docs, "ConfigMap")[0]["data"]
    assert float(config["STUI_SHUTDOWN_GRACE"]) == grace
    assert pod["terminationGracePeriodSeconds"] > grace
    scheduler = next(
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-scheduler")
    )
    assert scheduler["spec"]["replicas"] == 2
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == front["metadata"]["name"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_container_args_are_real_cli_commands(name: str) -> None:
    parser = build_parser()
    roles = set()
    for container in containers(render(VALUE_SETS[name])):
        args = container["args"]
        parsed = parser.parse_args(args)  # SystemExit on an unknown command or flag
        roles.add(parsed.command)
    assert roles == {"front", "scheduler", "http"}


def test_security_context_everywhere() -> None:
    for name, values in VALUE_SETS.items():
        for doc in by_kind(render(values), "Deployment"):
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert sc["allowPrivilegeEscalation"] is False
                assert c["resources"]["requests"] and c["resources"]["limits"]
            assert pod["topologySpreadConstraints"]


def test_plain_manifests_match_the_chart() -> None:
    """deploy/kubernetes/ is the chart rendered with its defaults, kept in sync."""
    rendered = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "render_manifests.py"), "--stdout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "deploy" / "kubernetes" / "stui-sessions.yaml").read_text()
    assert rendered == committed, "run deploy/render_manifests.py"
    version = kubernetes_validate.utils.latest_version()
    for doc in yaml.safe_load_all(committed):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


def test_compose_file_runs_real_roles() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    parser = build_parser()
    roles = set()
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        command = service["command"]
        args = shlex.split(command) if isinstance(command, str) else command
        roles.add(parser.parse_args(args).command)
    assert roles == {"front", "scheduler", "http"}


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    assert final.startswith("python:3.11-slim")
    assert "gcc" not in final and "build-essential" not in final and "apt-get install" not in final
    assert re.search(r"(?m)^USER 10001", final)
    assert re.search(r'(?m)^ENTRYPOINT \["stui-sessions"\]', final)  # exec form
    assert "HEALTHCHECK" in final
    assert "deploy/image/install.sh" in text
    ignore = (ROOT / ".dockerignore").read_text()
    assert "!service/" in ignore and "!workers/" in ignore


@pytest.mark.slow
def test_image_install_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    """The Dockerfile's install step (deploy/image/install.sh) into a new
    virtual environment, then --help of every role from the entry point."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        ["sh", str(ROOT / "deploy" / "image" / "install.sh"), str(venv), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for role in ("front", "scheduler", "http", "call"):
        helped = subprocess.run(
            [str(venv / "bin" / "stui-sessions"), role, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
        assert helped.returncode == 0 and "usage" in helped.stdout, role


def _status(app: Any, path: str) -> int:
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.input": None}
    list(app(environ, lambda status, headers, *_: seen.append(status)))
    return int(seen[0].split()[0])


def test_probes_hit_the_http_apps_real_routes(tmp_path: Path) -> None:
    import fakeredis

    from service.http_app import make_app

    settings = Settings(redis_url="redis://unused").model_copy(
        update={"metrics_dir": tmp_path, "heartbeat_max_age": 0.0})
    app = make_app(settings, fakeredis.FakeRedis())
    assert _status(app, "/nowhere") == 404  # the check below can tell a route from none
    docs = render({})
    for container in containers(docs):
        for probe_name in ("livenessProbe", "readinessProbe"):
            probe = container.get(probe_name)
            if not probe or "httpGet" not in probe:
                continue
            path = probe["httpGet"]["path"]
            assert _status(app, path) == 200, (container["name"], path)
            port_name = probe["httpGet"]["port"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports[port_name] == int(settings.http_bind.rsplit(":", 1)[1])
    probed = {c["readinessProbe"]["httpGet"]["path"] for c in containers(docs)
              if "httpGet" in c.get("readinessProbe", {})}
    assert probed == {"/readyz"}
