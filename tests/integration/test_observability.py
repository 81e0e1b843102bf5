"""/metrics of a real daemon (power source from a Jetson fixture tree, top_adapters 1):
promtool check metrics, the README's family table, bounded adapter labels, and the ops/
rules and dashboard checked against what exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorad.daemon.metrics import DaemonMetrics
from lorad.ota.metrics import UPDATE_RESULTS, OtaMetrics
from tests.integration.lorad_process import REPO, RunningDaemon, start_daemon

OPS = REPO / "ops"
RULES = [OPS / "prometheus/lorad-recording.rules.yml", OPS / "prometheus/lorad-alerts.rules.yml"]
FIXTURE = REPO / "tests/unit/power_fixtures/orin-nano-jp5/sys"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningDaemon, str]]:
    tmp = tmp_path_factory.mktemp("obs")
    shutil.copytree(FIXTURE, tmp / "sys")
    cfg = tmp / "lorad.yaml"
    cfg.write_text(yaml.safe_dump({
        "power": {"sys_root": str(tmp / "sys"), "sample_interval_s": 0.05, "limit_watts": 15},
        "metrics": {"top_adapters": 1},
    }))
    d = start_daemon(tmp / "state", "--config", str(cfg))
    try:
        x = np.full((1, 64), 0.5, dtype=np.float32)
        for adapter in ("mirror", "mirror", "invert", None):
            assert d.infer(x, adapter=adapter).status == 200
        assert d.infer(x, adapter="no-such-adapter").status == 404
        text = d.request("GET", "/metrics").body.decode()
        yield d, text
    finally:
        assert d.stop() == 0, d.logs()


def _families(text: str) -> dict[str, tuple[str, set[str]]]:
    """family as exposed (counters with _total) -> (type, label names)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k not in ("le", "quantile")}
        out[name] = (fam.type, labels)
    return out


def _ota_text() -> str:
    """OtaMetrics as the daemon registers them (with the daemon's switch for _created)."""
    disable_created_metrics()
    registry = CollectorRegistry()
    m = OtaMetrics(registry)
    m.watch(connected=lambda: False, fetched_bytes=lambda: 0)
    return generate_latest(registry).decode()


def _generation_text() -> str:
    """The generation loop's families, as a daemon serving a decoder language model registers them."""
    disable_created_metrics()
    m = DaemonMetrics(CollectorRegistry())
    m.watch_generator(lambda: {"running": 1, "tokens": 2, "steps": 1, "reserved_bytes": 3, "budget_bytes": 4})
    return "".join(line + "\n" for line in m.render().decode().splitlines() if "generat" in line)


def _federated_text() -> str:
    """The SuperNode's families, as a daemon with ``federated.enabled`` registers them."""
    disable_created_metrics()
    m = DaemonMetrics(CollectorRegistry())
    m.watch_federated(up=lambda: True, restarts=lambda: 2)
    return "".join(line + "\n" for line in m.render().decode().splitlines() if "federated" in line)


def _readme_table() -> dict[str, tuple[str, set[str]]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Metrics"):text.index("### Power and energy")]
    rows = {}
    for m in re.finditer(r"^\| `(lorad_[a-z_]+)` \| (\w+) \| ([^|]*) \|", section, re.M):
        labels = set(re.findall(r"`(\w+)`", m.group(3)))
        rows[m.group(1)] = (m.group(2), labels)
    return rows


def test_promtool_check_metrics_on_real_output(observed: tuple[RunningDaemon, str]) -> None:
    _, text = observed
    for exposition in (text, _ota_text()):
        done = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    assert "_created" not in text


def test_readme_lists_every_family_with_its_type_and_labels(observed: tuple[RunningDaemon, str]) -> None:
    _, text = observed
    exposed = {k: v for k, v in {**_families(text), **_families(_ota_text()), **_families(_generation_text()),
                                 **_families(_federated_text())}.items() if k.startswith("lorad_")}
    # with OTA disabled and nothing trained, a few families have no samples in this run
    # but are declared (TYPE line) all the same: compare names and types of all, labels
    # where there are samples
    documented = _readme_table()
    assert {k: v[0] for k, v in documented.items()} == {k: v[0] for k, v in exposed.items()}
    for name, (_, labels) in exposed.items():
        if labels:
            assert labels == documented[name][1], name
    assert any(f.startswith("process_") for f in _families(text)) and "python_info" in _families(text)


def test_per_adapter_labels_are_bounded_and_power_is_exported(observed: tuple[RunningDaemon, str]) -> None:
    d, text = observed
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    ok = {dict(k[1])["adapter"]: v for k, v in samples.items()
          if k[0] == "lorad_adapter_requests_total" and dict(k[1])["outcome"] == "ok"}
    assert ok == {"mirror": 2, "_other": 1, "_base": 1}  # top_adapters: 1; invert is the rest
    errors = {dict(k[1])["adapter"]: v for k, v in samples.items()
              if k[0] == "lorad_adapter_requests_total" and dict(k[1])["outcome"] == "error"}
    assert errors == {"_other": 1}  # a name that does not exist takes no label
    info = [dict(k[1]) for k in samples if k[0] == "lorad_build_info"]
    assert len(info) == 1 and info[0]["provider"] == "CPUExecutionProvider" and info[0]["backend"] == "cpu"
    assert samples[("lorad_power_source_info", (("reason", ""), ("source", "jetson-ina3221-hwmon")))] == 1
    assert samples[("lorad_power_draw_watts", ())] == pytest.approx(5.064 * 1.216)
    assert samples[("lorad_power_limit_watts", ())] == 15
    assert samples[("lorad_energy_joules_total", (("rail", "VDD_IN"),))] > 0
    phases = sum(v for k, v in samples.items() if k[0] == "lorad_energy_joules_total" and dict(k[1]).get("phase"))
    assert phases == pytest.approx(samples[("lorad_energy_joules_total", (("rail", "VDD_IN"),))], rel=0.05)
    logs = d.logs()
    assert "power: sampling jetson-ina3221-hwmon" in logs
    assert f"state directory {d.state_dir}; API token file {d.state_dir / 'api-token'}; listening at {d.url}" in logs


def test_ota_counters_exist_at_zero_for_every_result() -> None:
    fams = {f.name: f for f in text_string_to_metric_families(_ota_text())}
    got = {s.labels["result"]: s.value for s in fams["lorad_ota_updates"].samples if s.name.endswith("_total")}
    assert got == {r: 0.0 for r in UPDATE_RESULTS}


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", *map(str, RULES)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(["promtool", "test", "rules", "lorad-rules.test.yml"], cwd=OPS / "prometheus",
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (in braces or by/on clauses) or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        word = m.group(0)
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_names_parser() -> None:
    assert metric_names('sum by (instance, le) (rate(a_bucket{x="b{c}"}[5m])) / on(job) b:c:d > 0.8') == {"a_bucket", "b:c:d"}


def test_dashboard_and_rules_query_only_metrics_that_exist() -> None:
    known = set()
    for name, (kind, _) in _readme_table().items():
        known.add(name)
        if kind == "histogram":
            known |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    known |= {"up", "process_start_time_seconds"}
    rules = [r for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    dashboard = json.loads((OPS / "grafana/lorad-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for r in rules]
    assert len(exprs) > 20
    used: set[str] = set()
    for e in exprs:
        used |= metric_names(e)
    assert used - known - recorded == set()
    # every panel the issue asks for is there
    titles = " / ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("latency p95 by adapter", "cache", "ε spent", "ε remaining", "training runs", "power by rail",
                  "energy by phase", "ota update results"):
        assert topic in titles, topic
