"""deploy/prometheus and deploy/grafana: promtool accepts them, and every series they read exists.

The recording rules are unit-tested with ``promtool test rules`` (deploy/prometheus/rules_test.yml:
known input series, expected recorded values). The names they and the dashboard read are checked
against the metrics the real server exports, so renaming a metric breaks this test.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from testing import harness

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "triton-diffusion.json"
PROMTOOL = Path(sys.executable).parent / "promtool"  # scripts/setup.sh puts it in the venv
METRIC = re.compile(r"\b((?:nv|diffusion)_[a-z_]+|model:[a-z_:0-9]+)\b")


def promtool(*args):
    assert PROMTOOL.is_file(), f"{PROMTOOL} missing: run scripts/setup.sh (it unpacks Debian's prometheus package)"
    return subprocess.run([str(PROMTOOL), *args], cwd=PROMETHEUS, capture_output=True, text=True)


def test_promtool_accepts_the_config_and_the_rules_compute_what_they_claim():
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def rule_expressions():
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_series_the_rules_and_the_dashboard_read_exists(server):
    exported = set(re.findall(r"^(\w+)(?:\{|\s)", harness.metrics_text(server), re.MULTILINE))
    assert f'model="{TINY}"' in harness.metrics_text(server)
    recorded = {rule["record"] for rule in rule_expressions() if "record" in rule}
    expressions = [rule["expr"] for rule in rule_expressions()]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    expressions += [target["expr"] for panel in panels for target in panel["targets"]]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used, "no metric names found"
    missing = {name for name in used if name not in exported and name not in recorded}
    assert not missing, f"read by the rules or dashboard but neither exported by the server nor recorded: {missing}"
    # The dashboard plots every recorded series.
    assert recorded <= used
