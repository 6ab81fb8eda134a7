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
FULLNAME = "stui-stui-sessions"  # release "stui" of chart "stui-sessions"
BACKUP_KEY_SECRET = f"{FULLNAME}-backup-key"

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
    "exposed-with-curve": {
        "curve": {"enabled": True, "existingSecret": "stui-curve"},
        "front": {
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]}
        },
    },
    "exposed-acknowledged": {
        "front": {"service": {"type": "NodePort", "allowUnauthenticatedExternal": True}},
        "networkPolicy": {"enabled": False},
    },
    "own-backup-key": {
        "backups": {"existingKeySecret": "backup-hmac", "existingKeySecretKey": "k"}
    },
}
EXPOSED_WITHOUT_CURVE = "front.service.allowUnauthenticatedExternal=true"


def render_files(values: dict[str, Any]) -> dict[str, str]:
    chart = helm_python.Chart.load(str(CHART))
    try:
        out: dict[str, str] = chart.render(values, name="stui", namespace="stui")
    finally:
        chart.close()
    return out


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    out = render_files(values)
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
    default = render({})
    default_kinds = {d["kind"] for d in default}
    assert not default_kinds & CRDS
    # On by default: the NetworkPolicy, and the Secret of the backup key only.
    assert {"NetworkPolicy", "Secret"} <= default_kinds
    assert [s["metadata"]["name"] for s in by_kind(default, "Secret")] == [BACKUP_KEY_SECRET]
    assert "NetworkPolicy" not in {d["kind"] for d in render({"networkPolicy": {"enabled": False}})}
    on = render(VALUE_SETS["monitoring-and-network-policy"])
    assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= {d["kind"] for d in on}
    rule = by_kind(on, "PrometheusRule")[0]
    alerts = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    assert rule["spec"] == alerts  # the chart ships the very rules of deploy/
    assert (CHART / "files" / "alerts.yml").read_text() == (
        ROOT / "deploy" / "alerts.yml"
    ).read_text()
    auth = render(VALUE_SETS["auth-on"])
    assert {s["metadata"]["name"] for s in by_kind(auth, "Secret")} == {
        BACKUP_KEY_SECRET,
        "stui-stui-sessions-curve",
    }
    config = by_kind(auth, "ConfigMap")[0]["data"]
    assert config["STUI_CURVE"] == "true" and config["STUI_CURVE_KEY_FILE"]


def test_services_ports_and_grace_periods() -> None:
    docs = render({})
    zmq_service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == FULLNAME)
    assert zmq_service["spec"]["type"] == "ClusterIP"
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
    # A multi-process front stops within 1.5 x its grace + 2 s (the drain of
    # the public socket, then the workers'): Kubernetes must wait longer.
    assert pod["terminationGracePeriodSeconds"] > 1.5 * grace + 2
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
    plain = [doc for doc in yaml.safe_load_all(committed) if doc]
    for doc in plain:
        kubernetes_validate.validate(doc, version, strict=True)
    # The chart's defaults, object for object, but for the generated backup
    # key: no key is committed; the header says how to make its Secret, under
    # the name the scheduler already refers to.
    defaults = render({})
    assert [d for d in defaults if d["kind"] != "Secret"] == plain
    assert not by_kind(plain, "Secret")
    assert f"kubectl create secret generic {BACKUP_KEY_SECRET}" in committed
    assert _backup_key_ref(plain) == {"name": BACKUP_KEY_SECRET, "key": "backup-key"}
    assert _backup_key_ref(defaults) == _backup_key_ref(plain)
    # Secure by default, in the file people apply too.
    assert {s["spec"]["type"] for s in by_kind(plain, "Service")} == {"ClusterIP"}
    assert by_kind(plain, "NetworkPolicy")


def _front_service(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == FULLNAME)


def _scheduler_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in containers(docs) if c["name"] == "scheduler")


def _backup_key_ref(docs: list[dict[str, Any]]) -> dict[str, str]:
    env = {e["name"]: e for e in _scheduler_container(docs)["env"]}
    ref: dict[str, str] = env["STUI_BACKUP_KEY"]["valueFrom"]["secretKeyRef"]
    return ref


def _zmq_and_http_rules(policy: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert set(rules) == {5555, 9102}
    assert all(len(r["ports"]) == 1 for r in rules.values())
    return rules[5555], rules[9102]


def test_default_render_is_closed_to_the_outside() -> None:
    """Issue point 7: the defaults expose no unauthenticated port beyond the
    cluster; a NetworkPolicy admits the ZeroMQ port from the release and
    labelled client pods only, the HTTP port from Prometheus only."""
    docs = render({})
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["curve"]["enabled"] is False  # hence: no external Service
    assert not [s for s in by_kind(docs, "Service")
                if s["spec"]["type"] in ("LoadBalancer", "NodePort")]
    assert _front_service(docs)["spec"]["type"] == "ClusterIP"
    assert not any("externalIPs" in s["spec"] for s in by_kind(docs, "Service"))
    [policy] = by_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    # All pods of the release, both directions.
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "stui-sessions", "app.kubernetes.io/instance": "stui"}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    for d in by_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    zmq, http = _zmq_and_http_rules(policy)
    # Every rule names its peers: a rule without "from" would admit anyone.
    assert zmq["from"] == [
        {"podSelector": {"matchLabels": spec["podSelector"]["matchLabels"]}},
        {"podSelector": {"matchLabels": {"stui-sessions/client": "true"}}},
    ]
    assert http["from"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }]
    # Egress: Redis and DNS ports only.
    ports = {(p["port"], p["protocol"]) for r in spec["egress"] for p in r["ports"]}
    assert ports == {(6379, "TCP"), (26379, "TCP"), (53, "UDP"), (53, "TCP")}
    notes = render_files({})["stui-sessions/templates/NOTES.txt"]
    for said in ("ClusterIP", "reachable from inside the cluster only",
                 "stui-sessions/client=true", "CURVE authentication is off",
                 "curve.enabled=true", "docs/security.md", "Migrating from plain to CURVE"):
        assert said in notes, said


def test_network_policy_peers_are_configurable() -> None:
    prometheus = [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]
    nodes = [{"ipBlock": {"cidr": "10.0.0.0/16"}}]
    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ide"}}}]
    redis = [{"ipBlock": {"cidr": "10.1.2.3/32"}}]
    docs = render({"networkPolicy": {
        # null drops the default label (Helm merges maps with the defaults)
        "clientLabels": {"stui-sessions/client": None, "role": "stui"},
        "zmqFrom": clients, "metricsFrom": prometheus, "probesFrom": nodes, "redisTo": redis}})
    [policy] = by_kind(docs, "NetworkPolicy")
    zmq, http = _zmq_and_http_rules(policy)
    assert zmq["from"][1:] == [{"podSelector": {"matchLabels": {"role": "stui"}}}, *clients]
    assert http["from"] == prometheus + nodes
    assert policy["spec"]["egress"][0]["to"] == redis
    # Nobody named for the HTTP port: no rule for it, so nobody is admitted.
    [policy] = by_kind(render({"networkPolicy": {"metricsFrom": []}}), "NetworkPolicy")
    assert [r["ports"][0]["port"] for r in policy["spec"]["ingress"]] == [5555]
    # A peer of the wrong shape is refused by values.schema.json.
    with pytest.raises(helm_python.HelmError):
        render({"networkPolicy": {"zmqFrom": [{"podSelectr": {}}]}})


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_external_service_with_curve_off_does_not_render(service_type: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as failed:
        render({"front": {"service": {"type": service_type}}})
    message = str(failed.value)
    assert f"front.service.type is {service_type} but curve.enabled is false" in message
    assert "Turn on CURVE" in message and EXPOSED_WITHOUT_CURVE in message


def test_external_service_with_curve_on_renders() -> None:
    docs = render(VALUE_SETS["exposed-with-curve"])
    service = _front_service(docs)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert by_kind(docs, "ConfigMap")[0]["data"]["STUI_CURVE"] == "true"
    # The policy lets in clients from outside the cluster; the load balancer
    # narrows them to loadBalancerSourceRanges.
    [policy] = by_kind(docs, "NetworkPolicy")
    zmq, _ = _zmq_and_http_rules(policy)
    assert {"ipBlock": {"cidr": "0.0.0.0/0"}} in zmq["from"]
    notes = render_files(VALUE_SETS["exposed-with-curve"])["stui-sessions/templates/NOTES.txt"]
    assert "CURVE authentication is on" in notes and "203.0.113.0/24" in notes
    # The acknowledgement renders too, and the notes say what it means.
    acknowledged = render_files(VALUE_SETS["exposed-acknowledged"])
    assert "WARNING" in acknowledged["stui-sessions/templates/NOTES.txt"]


def test_backup_key_secret_is_generated_and_wired_to_the_scheduler() -> None:
    import base64

    docs = render({})
    [secret] = by_kind(docs, "Secret")
    assert secret["metadata"]["name"] == BACKUP_KEY_SECRET
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["backup-key"]).decode()
    assert len(key) == 64 and key.isalnum()
    assert _backup_key_ref(docs) == {"name": BACKUP_KEY_SECRET, "key": "backup-key"}
    assert "backup_key" in Settings.model_fields  # STUI_BACKUP_KEY is a real setting
    # Fronts do not get it.
    for c in containers(docs):
        if c["name"] != "scheduler":
            assert "STUI_BACKUP_KEY" not in {e["name"] for e in c.get("env", [])}
    # Offline (no cluster to look the Secret up in) every render makes a new key.
    [again] = by_kind(render({}), "Secret")
    assert again["data"] != secret["data"]
    # A given key is stored as given.
    given = "k" * 48
    [secret] = by_kind(render({"backups": {"key": given}}), "Secret")
    assert base64.b64decode(secret["data"]["backup-key"]).decode() == given
    with pytest.raises(helm_python.HelmError):  # the schema wants 32 characters at least
        render({"backups": {"key": "short"}})
    # An existing Secret: the chart makes none and refers to it.
    own = render(VALUE_SETS["own-backup-key"])
    assert not by_kind(own, "Secret")
    assert _backup_key_ref(own) == {"name": "backup-hmac", "key": "k"}


def test_front_only_release() -> None:
    """scheduler.enabled=false: the second release of a plain-to-CURVE
    migration, fronts only, against the Redis of the first."""
    docs = render({"scheduler": {"enabled": False}, **VALUE_SETS["exposed-with-curve"]})
    assert {d["metadata"]["name"] for d in by_kind(docs, "Deployment")} == {f"{FULLNAME}-front"}
    assert not by_kind(docs, "Secret") and not by_kind(docs, "PersistentVolumeClaim")
    assert [p["metadata"]["name"] for p in by_kind(docs, "PodDisruptionBudget")] == [
        f"{FULLNAME}-front"]
    version = kubernetes_validate.utils.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_probes_tolerate_one_slow_answer(name: str) -> None:
    """A liveness probe restarts the pod only after several timeouts of at
    least 2 s in a row; a readiness probe is as patient per try."""
    for container in containers(render(VALUE_SETS[name])):
        for probe_name in ("livenessProbe", "readinessProbe"):
            probe = container.get(probe_name)
            if not probe:
                continue
            where = (name, container["name"], probe_name)
            assert probe.get("timeoutSeconds", 1) >= 2, where
            assert probe.get("failureThreshold", 3) >= 3, where
            assert probe.get("periodSeconds", 10) > probe.get("timeoutSeconds", 1), where
        if container["name"] in ("http", "front"):
            assert "livenessProbe" in container, (name, container["name"])


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
        # Published on the loopback only: CURVE is off in this file.
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        # The schedulers' backup key: compose refuses to start without one
        # (${VAR:?message}), so no well-known placeholder key is ever used.
        if parser.parse_args(args).command == "scheduler":
            assert re.fullmatch(r"\$\{STUI_BACKUP_KEY:\?.+\}",
                                service["environment"]["STUI_BACKUP_KEY"]), name
    assert roles == {"front", "scheduler", "http"}


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    # The base is a build argument whose default is the slim image users get.
    assert re.search(r"(?m)^ARG BASE_IMAGE=python:3\.11-slim$", text)
    assert all(stage.startswith("${BASE_IMAGE}") for stage in stages)
    assert "gcc" not in final and "build-essential" not in final and "apt-get install" not in final
    assert re.search(r"(?m)^USER 10001", final)
    assert re.search(r'(?m)^ENTRYPOINT \["stui-sessions"\]', final)  # exec form
    # One check for every role: it probes what the running role recorded.
    assert re.search(r'(?m)^\s+CMD \["stui-sessions", "healthcheck"\]', final)
    assert "STUI_HEALTH_DIR=" in final
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
