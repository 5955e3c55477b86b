"""deploy/'s Grafana dashboard and Prometheus config: well formed, and every metric they query is one a
DvD process exports (a renamed metric fails here, not on an operator's empty panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dvd.language_server.metrics import STATS as LANGUAGE_STATS
from dvd.language_server.metrics import LanguageMetrics
from dvd.metrics import COUNTER
from dvd.pipeline.metrics import GatewayMetrics
from dvd.vision_server.metrics import STATS as VISION_STATS
from dvd.vision_server.metrics import VisionMetrics

DEPLOY = Path(__file__).parents[2] / "deploy"


def exported() -> set[str]:
    """Every sample name a gateway, vision or language server exports."""
    names = {s.name + ("_total" if s.kind == COUNTER else "") for s in VISION_STATS + LANGUAGE_STATS}
    for registry in (VisionMetrics(dict, 1).registry, LanguageMetrics(dict).registry,
                     GatewayMetrics(dict, int).registry):
        # every sample name each registered metric declares (a labelled one has no sample until used)
        names |= {name for declared in registry._collector_to_names.values() for name in declared}
    return names


def test_the_dashboard_queries_only_metrics_dvd_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) > 20
    queried = {name for expr in exprs for name in re.findall(r"\bdvd_[a-z_]+", expr)}
    assert not queried - exported(), sorted(queried - exported())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]


def test_the_prometheus_config_scrapes_the_gateway_and_discovers_the_servers() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["dvd-gateway"]["static_configs"][0]["targets"]
    discovery = jobs["dvd-servers"]["http_sd_configs"][0]
    assert discovery["url"].endswith("/v1/scrape_targets")  # pipeline/http_app.py serves it
