"""deploy/monitoring/: the alert rules pass `promtool check rules` and fire as meant
(`promtool test rules`), the PrometheusRule holds the same rules, the PodMonitor scrapes the
DaemonSet's admin port, the Grafana dashboard is well formed, and every metric a rule or a
panel names is one that running daemons export on /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes.kube_apiserver import serve_in_thread
from fakes.kube_helpers import fixture_objects
from helpers import DEMO_SNAPSHOT, ROOT, DaemonProcess, exported_names

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed"
)

Start = Callable[..., DaemonProcess]

# Names in PromQL that are functions, keywords or Prometheus's own series, not our metrics.
NOT_OURS = {"up"}


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exprs() -> list[str]:
    found = [rule["expr"] for rule in rules()]
    found += [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    return found


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (ours all start node_services_)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"\b(node_services_[a-z0-9_]+)\b", without_strings))
    names |= {n for n in re.findall(r"\b([a-z_]+)\s*(?:\{|$|\s*==)", without_strings) if n == "up"}
    return names


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


PROMTOOL_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
  - series: 'node_services_ipam_pool_used{{instance="a", network="pods", range="10.42.1.0/24"}}'
    values: '100x10 240x10'
  - series: 'node_services_ipam_pool_size{{instance="a", network="pods", range="10.42.1.0/24"}}'
    values: '254x20'
  - series: 'node_services_ready{{instance="a"}}'
    values: '1x5 0x10'
  - series: 'node_services_lame_duck{{instance="a"}}'
    values: '0x15'
  - series: 'node_services_ready{{instance="b"}}'
    values: '1x5 0x10'
  - series: 'node_services_lame_duck{{instance="b"}}'
    values: '0x5 1x10'
  - series: 'node_services_dns_forward_no_upstream_total{{instance="a"}}'
    values: '0x10 5x10'
  alert_rule_test:
  - eval_time: 9m
    alertname: NodeServicesDnsNoUpstream
    exp_alerts: []
  - eval_time: 12m
    alertname: NodeServicesDnsNoUpstream
    exp_alerts:
    - exp_labels: {{severity: warning, instance: a}}
      exp_annotations:
        summary: DNS on a answers REFUSED for names it has no upstream for
        description: Set upstreams (or dns_forward_zones); the daemon's log says what it found.
  - eval_time: 9m
    alertname: NodeServicesIPAMPoolNearlyFull
    exp_alerts: []
  - eval_time: 18m
    alertname: NodeServicesIPAMPoolNearlyFull
    exp_alerts:
    - exp_labels: {{severity: warning, instance: a, network: pods, range: 10.42.1.0/24}}
      exp_annotations:
        summary: IPAM pool 10.42.1.0/24 on a is over 90% used
  - eval_time: 14m
    alertname: NodeServicesNotReady
    exp_alerts:
    - exp_labels: {{severity: critical, instance: a}}
      exp_annotations:
        summary: node-services on a is not ready
        description: A source has not synced or a task died; `node-services status` says which.
"""


@needs_promtool
def test_the_rules_fire_as_meant(tmp_path: Path) -> None:
    # A full pool alerts after 5 m; not-ready alerts, but not for a lame duck (b: shutting down).
    assert PROMTOOL is not None
    tests = tmp_path / "tests.yaml"
    tests.write_text(PROMTOOL_TESTS.format(rules=json.dumps(str(RULES))))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_prometheusrule_holds_the_same_rules_and_the_podmonitor_the_admin_port() -> None:
    (rule,) = yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    (monitor,) = yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    daemonset = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text())
        if doc["kind"] == "DaemonSet"
    )
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
        daemonset["metadata"]["namespace"]
    ]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    (container,) = [
        c
        for c in daemonset["spec"]["template"]["spec"]["containers"]
        if c["name"] == "node-services"
    ]
    admin = container["args"][container["args"].index("--admin-listen") + 1]
    address = next(r for r in endpoint["relabelings"] if r.get("targetLabel") == "__address__")
    assert address["replacement"] == "$1:" + admin.rsplit(":", 1)[1]
    assert "ports" not in container  # a hostPort would forbid the update's surge pod


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "node-services" and board["title"] == "node-services"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "node_services_build_info" in variables["instance"]["definition"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "table"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
            assert metric_names(target["expr"]), target["expr"]


@pytest.fixture
def exported(daemon: Start, tmp_path: Path) -> Iterator[set[str]]:
    """Every sample and family name two daemons export: one with a snapshot, the Kubernetes
    source (fake API server) and IPAM; one with the overlay (waiting on a source that never
    syncs, so it touches no kernel state)."""
    ipam_dir = tmp_path / "ipam"
    ipam_dir.mkdir()
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [broken\n")
    with serve_in_thread() as api:
        for obj in fixture_objects():
            api.call(lambda obj=obj: api.server.put(obj))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(api.server.kubeconfig())
        full = daemon(
            "--snapshot",
            str(DEMO_SNAPSHOT),
            "--kubeconfig",
            str(kubeconfig),
            "--ipam-dir",
            str(ipam_dir),
            "--upstream",
            "127.0.0.1:1",
            env={"NODE_SERVICES_IPAM": "on"},
        )
        full.wait_for(lambda: full.get("/readyz")[0] == 200, what="ready", timeout=60)
        overlay = daemon("--snapshot", str(broken), "--overlay", "vxlan")
        overlay.wait_for(lambda: "not valid YAML" in overlay.output(), what="the waiting overlay")
        yield exported_names(full) | exported_names(overlay)


def test_every_metric_a_rule_or_panel_names_is_exported(exported: set[str]) -> None:
    named = set().union(*(metric_names(expr) for expr in exprs())) - NOT_OURS
    assert len(named) >= 20
    assert sorted(named - exported) == []
    # and the extraction itself finds what it should
    assert metric_names('sum(rate(node_services_dns_responses_total{rcode="SERVFAIL"}[5m]))') == {
        "node_services_dns_responses_total"
    }
