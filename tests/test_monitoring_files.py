"""Operator files in deploy/: alert rules pass promtool's check and unit tests; the Grafana
dashboard has a panel (with a query) for each thing an operator watches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ditserve-dashboard.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed: .ci/run must install Debian's prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_alert_rules_check():
    result = subprocess.run([promtool(), "check", "rules", "ditserve-alerts.yaml"], cwd=DEPLOY / "prometheus",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 rules found" in result.stdout


def test_alert_rules_unit_tests():
    result = subprocess.run([promtool(), "test", "rules", "ditserve-alerts_test.yaml"], cwd=DEPLOY / "prometheus",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def dashboard_queries() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard["panels"]}


@pytest.mark.parametrize("words,metric", [
    ("Queue wait", "ray_ditserve_queue_wait_seconds_bucket"),
    ("Throughput", "ray_ditserve_job_latency_seconds_count"),
    ("replicas per deployment", "ray_serve_deployment_replica_healthy"),
    ("batch size", "ray_ditserve_denoise_batch_size"),
    ("step time", "ray_ditserve_denoise_step_seconds_bucket"),
    ("Jobs by state", "ray_ditserve_jobs"),
    ("rejections", "ray_ditserve_admission_rejections_total"),
    ("Accelerator seconds", "ray_ditserve_accelerator_seconds_per_job"),
])
def test_dashboard_has_a_panel_for(words, metric):
    panels = {title: exprs for title, exprs in dashboard_queries().items() if words.lower() in title.lower()}
    assert panels, f"no panel titled with {words!r}"
    assert any(metric in expr for exprs in panels.values() for expr in exprs)
