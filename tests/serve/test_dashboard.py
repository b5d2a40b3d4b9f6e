"""The shipped Grafana dashboard (deploy/grafana/apparate.json) draws only what a running server
exports: every query's metrics, and the labels it selects or groups by, are in a real server's
`/metrics` after it has served (with early exits, so that per-site series exist)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import image_request, served_cnn, serving, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "apparate.json"
METRIC = re.compile(r"\b(apparate_[a-z_]+)\b(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|ignoring|without)\s*\(([^)]*)\)")
SELECTOR_LABEL = re.compile(r"([a-z_]+)\s*=~?")


def queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    assert out, "the dashboard has no queries"
    return out


def exported(url: str) -> dict[str, set[str]]:
    """Series name (with _total, _bucket, ...) -> its label names, from a live /metrics."""
    names: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in fam.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_every_dashboard_query_names_what_the_server_exports(tiny_cnn):
    from apparate.core.controller import Config
    from apparate.serve.control import ControlOptions

    served = served_cnn(tiny_cnn)
    opts = ControlOptions(policy="static", initial=Config((0,), (1.0,)), update_profile=False)
    with serving(served, control_opts=opts) as live:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            for s in range(4):
                assert c.post("/v2/models/tiny/infer", json=image_request(2, seed=s)).status_code == 200
        assert wait_for(lambda: "apparate_exits_total" in exported(live.url), timeout=30)
        names = exported(live.url)
    assert {"apparate_slo_seconds", "apparate_accuracy_constraint", "apparate_within_slo_total"} <= set(names)
    bad = []
    for title, expr in queries():
        found = METRIC.findall(expr)
        if not found:
            bad.append(f"{title}: {expr!r} names no apparate metric")
        labels_here: set[str] = set()
        for metric, selector in found:
            if metric not in names:
                bad.append(f"{title}: {metric} is not exported")
                continue
            labels_here |= names[metric]
            for label in SELECTOR_LABEL.findall(selector):
                if label not in names[metric]:
                    bad.append(f"{title}: {metric} has no label {label!r}")
        for group in GROUPING.findall(expr):
            for label in (g.strip() for g in group.split(",") if g.strip()):
                if label not in labels_here:
                    bad.append(f"{title}: groups by {label!r}, which none of its metrics has")
    assert not bad, "\n".join(bad)


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for what in ("goodput", "p50", "p99", "per exit", "accuracy", "active ramps", "thresholds", "shed"):
        assert what in titles, what
