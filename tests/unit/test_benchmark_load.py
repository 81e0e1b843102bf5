"""benchmarks/load.py: a run's goal verdicts are withheld when the machine was loaded."""

from __future__ import annotations

from benchmarks.load import MAX_LOAD_PER_CORE, LoadWatch


def _result() -> dict[str, object]:
    return {"latency_ms": 23.4, "goals": {"speedup": 1.42, "speedup_ok": False, "users": {"alice": {"ok": True}}},
            "goals_met": {"e2e": True}, "loadavg": {"note": "kept"}}


def test_an_idle_run_keeps_its_verdicts_and_records_the_load() -> None:
    sealed = LoadWatch(before=(0.4, 0.5, 0.6)).seal(_result(), after=(1.1, 0.9, 0.8), cores=2)
    assert sealed["goals"] == {"speedup": 1.42, "speedup_ok": False, "users": {"alice": {"ok": True}}}
    assert sealed["goals_met"] == {"e2e": True}
    assert sealed["verdicts_withheld"] is None
    assert sealed["loadavg"] == {"note": "kept", "before": [0.4, 0.5, 0.6], "after": [1.1, 0.9, 0.8], "cores": 2,
                                 "max_1min_per_core": 0.55}


def test_a_loaded_run_prints_its_figures_but_no_verdict() -> None:
    busy = 2 * MAX_LOAD_PER_CORE + 0.2
    sealed = LoadWatch(before=(busy, 1.0, 1.0)).seal(_result(), after=(0.5, 0.5, 0.5), cores=2)
    assert sealed["latency_ms"] == 23.4
    assert sealed["goals"] == {"speedup": 1.42, "speedup_ok": None, "users": {"alice": {"ok": None}}}
    assert sealed["goals_met"] == {"e2e": None}
    assert "3.20 on 2 cores" in sealed["verdicts_withheld"]
