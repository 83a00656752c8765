"""deploy/: the Swarm stack file, the proxy's and Prometheus' settings, the Grafana dashboard and the Kubernetes
manifests, read and checked without Docker or a cluster (the stack tier, tests/stack, runs the stack itself).
The manifests are checked against Kubernetes' own OpenAPI schemas (PyPI kubernetes-validate, offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from charrnn.service.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
KUBERNETES = "1.30.0"  # the oldest release the manifests promise (autoscaling/v2, policy/v1)


@pytest.fixture(scope="module")
def stack() -> dict:
    return yaml.safe_load((DEPLOY / "stack.yml").read_text())


def recorded() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"]}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_kubernetes_manifest_is_valid_against_the_schemas(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on an unknown or wrong field


def test_kubernetes_validation_refuses_a_wrong_manifest() -> None:
    (deployment, *_) = documents(DEPLOY / "k8s" / "app.yaml")
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_kubernetes_prometheus_records_the_same_rules() -> None:
    config_map = next(doc for doc in documents(DEPLOY / "k8s" / "prometheus.yaml") if doc["kind"] == "ConfigMap")
    assert yaml.safe_load(config_map["data"]["rules.yml"]) == yaml.safe_load(
        (DEPLOY / "prometheus" / "rules.yml").read_text()
    )


def test_the_kubernetes_pods_drain_within_their_grace_period() -> None:
    (deployment, *_) = documents(DEPLOY / "k8s" / "app.yaml")
    pod = deployment["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"]}
    drain, graceful = float(env["CHARRNN_DRAIN_SECONDS"]), float(env["CHARRNN_GRACEFUL_TIMEOUT"])
    readiness = pod["containers"][0]["readinessProbe"]
    assert drain > readiness["periodSeconds"] * readiness["failureThreshold"]  # dropped before it stops listening
    assert pod["terminationGracePeriodSeconds"] > drain + graceful
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_the_grafana_dashboard_draws_only_recorded_series() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "charrnn-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert set(expressions) == recorded()  # every recorded series drawn, nothing else


def test_the_stack_takes_its_settings_from_the_environment_with_the_issue_defaults(stack: dict) -> None:
    text = (DEPLOY / "stack.yml").read_text()
    for default in (
        "${CHARRNN_IMAGE:-charrnn:latest}",
        "${CHARRNN_PROXY_IMAGE:-charrnn-proxy:latest}",
        "${CHARRNN_PROMETHEUS_IMAGE:-charrnn-prometheus:latest}",
        "${CHARRNN_REPLICAS:-3}",
        "${CHARRNN_PROXY_PORT:-8080}",
        "${CHARRNN_PROMETHEUS_PORT:-9090}",
    ):
        assert default in text, default
    assert set(stack["services"]) == {"app", "proxy", "prometheus"}


def test_every_stack_service_is_read_only_with_a_tmpfs_swarm_honours(stack: dict) -> None:
    for name, service in stack["services"].items():
        assert service["read_only"] is True, name
        assert "tmpfs" not in service, name  # Swarm ignores the short syntax
        assert {"type": "tmpfs", "target": "/tmp"}.items() <= next(
            volume for volume in service["volumes"] if isinstance(volume, dict) and volume["target"] == "/tmp"
        ).items(), name


def test_a_stopping_replica_drains_and_finishes_its_streams_before_swarm_kills_it(stack: dict) -> None:
    app = stack["services"]["app"]
    env = app["environment"]
    default = lambda value: float(re.fullmatch(r"\$\{\w+:-([\d.]+)s?\}", value).group(1))  # noqa: E731
    drain, graceful = default(env["CHARRNN_DRAIN_SECONDS"]), default(env["CHARRNN_GRACEFUL_TIMEOUT"])
    assert default(app["stop_grace_period"]) > drain + graceful
    assert graceful == ServiceConfig().graceful_timeout
    # One port per task slot: a slot's new task can listen only once the old one is gone.
    assert app["deploy"]["update_config"]["order"] == "stop-first" and "{{" in env["CHARRNN_PORT"]
    # A hung replica: three failed checks, then the grace period, then a new task, all within 120 s.
    check = app["healthcheck"]
    detect = (float(check["interval"][:-1]) + float(check["timeout"][:-1])) * check["retries"]
    assert detect + default(app["stop_grace_period"]) < 90


def test_the_proxy_retries_only_what_got_no_byte_and_knows_every_slot() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"^\s*proxy_next_upstream error timeout non_idempotent;", conf, re.MULTILINE)
    assert "http_5" not in conf  # an answer a replica gave is passed on, never sent again elsewhere
    for image in ("proxy", "prometheus"):
        dockerfile = (DEPLOY / image / "Dockerfile").read_text()
        assert "CHARRNN_APP_PORT_PREFIX=181" in dockerfile and "CHARRNN_MAX_SLOTS=16" in dockerfile, image


def test_the_stack_file_uses_the_depends_on_form_swarm_reads() -> None:
    """docker-compose.yml is Compose's alone (`condition: service_healthy` orders its replicas' updates)."""
    for service in yaml.safe_load((DEPLOY / "stack.yml").read_text())["services"].values():
        assert isinstance(service.get("depends_on", []), list)
