"""Mixed-adapter batches and per-request composition over real HTTP.

Marker adapters (see ``DemoMath.marker_adapter``) add a known amount to one logit column
of the probe, so every answer shows which adapters, with which weights, produced it."""

from __future__ import annotations

import threading

import numpy as np

from tests.integration.lorad_process import MODEL, DemoMath, RunningDaemon, batcher_counts, digit_probe, logits_of

MARKERS = {f"mark{k}": (k, 1.0 + k) for k in range(8)}  # name → (logit column, amount)


def _setup(daemon: RunningDaemon, demo_math: DemoMath) -> tuple[np.ndarray, np.ndarray]:
    probe = digit_probe()
    for name, (column, amount) in MARKERS.items():
        if name not in daemon.adapters():
            assert daemon.upload(name, demo_math.marker_adapter(probe, column, amount)).status == 201
    return probe, logits_of(daemon.infer(probe))[0]


def test_concurrent_clients_on_different_adapters_get_their_own_answers(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    probe, base = _setup(daemon, demo_math)
    names = [*MARKERS, None, None]
    errors: list[str] = []
    start = threading.Barrier(len(names))

    def client(name: str | None) -> None:
        start.wait(timeout=30)
        for _ in range(15):
            r = daemon.infer(probe, name)
            if r.status != 200:
                errors.append(f"{name}: {r.status} {r.body[:200]!r}")
                return
            expected = base.copy()
            if name is not None:
                column, amount = MARKERS[name]
                expected[column] += amount
            params = r.json()["parameters"]
            if params["adapter"] != name or not np.allclose(logits_of(r)[0], expected, atol=1e-4):
                errors.append(f"{name}: answered {params} with {logits_of(r)[0]} instead of {expected}")
                return

    before = batcher_counts(daemon)
    threads = [threading.Thread(target=client, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    calls, requests = (a - b for a, b in zip(batcher_counts(daemon), before, strict=True))
    assert requests == len(names) * 15
    assert calls < requests  # concurrent requests shared calls




def test_composition_is_applied_exactly_and_reported(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    probe, base = _setup(daemon, demo_math)
    terms = [{"name": "mark1", "weight": 1.0}, {"name": "mark4", "weight": -0.5}]
    r = daemon.infer(probe, parameters={"adapters": terms})
    assert r.status == 200, r.body
    versions = {a["name"]: a["version"] for a in daemon.request("GET", f"/v2/models/{MODEL}/adapters").json()}
    assert r.json()["parameters"] == {"adapters": [
        {"name": "mark1", "version": versions["mark1"], "weight": 1.0},
        {"name": "mark4", "version": versions["mark4"], "weight": -0.5},
    ]}
    expected = base.copy()
    expected[1] += MARKERS["mark1"][1]
    expected[4] -= 0.5 * MARKERS["mark4"][1]
    np.testing.assert_allclose(logits_of(r)[0], expected, atol=1e-4)


def test_compositions_beyond_the_slot_rank_or_unknown_are_refused(daemon: RunningDaemon) -> None:
    too_big = daemon.infer(digit_probe(), parameters={"adapters": [{"name": "mirror"}, {"name": "invert"}]})
    assert too_big.status == 400 and "more than the slot rank 8" in too_big.json()["error"]
    unknown = daemon.infer(digit_probe(), parameters={"adapters": [{"name": "mirror"}, {"name": "nope"}]})
    assert unknown.status == 404 and "'nope'" in unknown.json()["error"]
