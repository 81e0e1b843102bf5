"""Hot swap under load: clients infer while adapters are loaded, evicted and replaced.

Each (adapter, version) leaves a distinct mark in the logits of one probe input (see
``DemoMath.marker_adapter``): adapter ``mK`` adds ``amount`` to logit column K, and every
uploaded version has its own amount. A response is correct only when its logits carry
exactly the mark of the version it reports.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np

from tests.integration.lorad_process import DemoMath, RunningDaemon, digit_probe, logits_of

NAMES = {"m0": 0, "m1": 1, "m2": 2}
CLIENTS = 4
DURATION_S = 4.0


def test_swaps_under_load_are_consistent(daemon: RunningDaemon, demo_math: DemoMath) -> None:
    probe = digit_probe()
    base = logits_of(daemon.infer(probe))[0]
    amounts: dict[tuple[str, int], float] = {}
    lock = threading.Lock()
    counter = [0]

    def upload(name: str) -> None:
        with lock:
            counter[0] += 1
            amount = float(counter[0])
        r = daemon.upload(name, demo_math.marker_adapter(probe, NAMES[name], amount))
        assert r.status == 201, r.body
        with lock:
            amounts[(name, r.json()["version"])] = amount

    for name in NAMES:
        upload(name)
        assert daemon.action(name, "load").status == 200

    stop = threading.Event()
    results: list[tuple[str, int | None, str | None, np.ndarray | None]] = []
    errors: list[str] = []

    def client(i: int) -> None:
        names = list(NAMES)
        k = i
        while not stop.is_set():
            name = names[k % len(names)]
            k += 1
            r = daemon.infer(probe, name)
            if r.status != 200:
                errors.append(f"{name}: {r.status} {r.body[:200]!r}")
                continue
            p = r.json()["parameters"]
            results.append((name, p["adapter_version"], p["adapter"], logits_of(r)[0]))

    mutations: Counter[str] = Counter()

    def mutator() -> None:
        i = 0
        deadline = time.monotonic() + DURATION_S
        while time.monotonic() < deadline:
            name = list(NAMES)[i % len(NAMES)]
            step = i % 4
            if step in (0, 2):
                upload(name)
                mutations["upload"] += 1
            elif step == 1:
                assert daemon.action(name, "evict").status == 200
                mutations["evict"] += 1
            else:
                assert daemon.action(name, "load").status == 200
                mutations["load"] += 1
            i += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        mutator()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:5]
    assert len(results) > 50 and mutations["upload"] >= 5 and mutations["evict"] >= 2

    seen_versions: dict[str, set[int]] = {n: set() for n in NAMES}
    for name, version, reported, logits in results:
        assert reported == name and version is not None and logits is not None
        assert (name, version) in amounts, (name, version)
        expected = base.copy()
        expected[NAMES[name]] += amounts[(name, version)]
        np.testing.assert_allclose(logits, expected, atol=2e-3, err_msg=f"{name} v{version}")
        seen_versions[name].add(version)
    # the swaps were visible to later requests without a restart
    assert sum(len(v) for v in seen_versions.values()) > len(NAMES)
    assert daemon.proc.poll() is None
