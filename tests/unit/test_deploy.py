"""deploy/: the Grafana dashboard and alert rules load and only name metrics that /metrics serves."""

import json
import re
from pathlib import Path

import yaml

from orchestrator.metrics import CATALOGUE

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_sum", "_count")


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b(streamgen_[a-z_]+)", expr))


def known(name: str) -> bool:
    base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), name)
    return name in CATALOGUE or base in CATALOGUE


def _balanced(expr: str) -> bool:
    depth = 0
    for ch in expr:
        depth += {"(": 1, ")": -1, "[": 1, "]": -1, "{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_dashboard_loads_and_names_only_served_metrics():
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    used = set()
    for e in exprs:
        assert _balanced(e), e
        names = referenced(e)
        assert names, e
        assert all(known(n) for n in names), (e, [n for n in names if not known(n)])
        used |= {next((n[: -len(s)] for s in SUFFIXES if n.endswith(s)), n) for n in names}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert len(used) >= 15  # the dashboard covers most of the catalogue


def test_alert_rules_load_and_name_only_served_metrics():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    for e in exprs:
        assert _balanced(e), e
        assert referenced(e) and all(known(n) for n in referenced(e)), e


DEPRECATED = {"streamgen_stage_queue_depth": "streamgen_stage_microbatches_inflight"}
"""Old name -> new name, kept as an alias for one release; dashboards and alerts use the new one."""


def test_dashboard_and_rules_use_new_metric_names_and_the_aliases_still_exist():
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]] + \
        [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(referenced(e) for e in exprs))
    for old, new in DEPRECATED.items():
        assert old not in used and new in used, (old, new)
        assert old in CATALOGUE and new in CATALOGUE  # both served during the deprecation release
