"""Concurrency figures of the serving benchmark: mixed-adapter batching and bounded memory.

- :func:`measure_mixed`: 16 client threads, each on its own adapter (16 resident), send
  batch-1 requests for a fixed time through the micro-batcher (one ORT call per batch
  over the banked graph), then the same clients without an adapter, then today's path
  (one ORT call per request with its adapter). Throughputs and p99 latency.
- :func:`measure_large_requests`: a real ``lorad serve`` subprocess; four concurrent
  requests of ``server.max_batch_rows`` rows, the daemon's peak RSS above idle (the
  kernel's high-water mark, reset through ``/proc/PID/clear_refs``) and its RSS after;
  four concurrent 64 MiB bodies are refused with 413 before decoding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.timing import best_medians
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_banks import AdapterBanks
from lorad.adapters.micro_batcher import MicroBatcher
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService

__all__ = ["CLIENTS", "measure_mixed", "measure_large_requests"]

CLIENTS = 16
_REPO = Path(__file__).resolve().parent.parent


def _run_clients(n: int, seconds: float, call: Callable[[int], None]) -> tuple[float, list[float]]:
    """``n`` threads call ``call(i)`` in a loop for ``seconds``; (requests/s, latencies)."""
    stop = threading.Event()
    start = threading.Barrier(n + 1)
    latencies: list[list[float]] = [[] for _ in range(n)]

    def client(i: int) -> None:
        mine = latencies[i]
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            call(i)
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)  # the measuring window, not synchronisation
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [x for lat in latencies for x in lat]
    return len(flat) / elapsed, flat


def measure_mixed(
    engine: InferenceEngine, feeds: dict[str, np.ndarray], make_adapter: Callable[[int], object], *,
    seconds: float, max_wait_us: int = 500,
) -> dict[str, float]:
    """Mixed-adapter throughput with and without batching (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"), cache_budget_bytes=256 << 20)
        names = [f"user-{i}" for i in range(CLIENTS)]
        for i, name in enumerate(names):
            service.upload(name, dump_peft(make_adapter(1000 + i)))  # type: ignore[arg-type]
            service.pin(name)  # 16 resident
        banks = AdapterBanks(engine.base_model, engine.targets, rank=engine.rank, slots=CLIENTS)
        batcher = MicroBatcher(engine, banks, max_rows=1024, max_wait_us=max_wait_us)
        stack.callback(batcher.close)

        def batched(adapter: str | None) -> None:
            batcher.expect()
            with service.serving(adapter) as serving:
                batcher.submit(feeds, serving.prepared, expected=True).result()

        def mixed(i: int) -> None:
            batched(names[i])

        def base(i: int) -> None:
            batched(None)

        def per_call(i: int) -> None:
            service.infer(feeds, names[i])

        for fn in (mixed, base, per_call):  # warm up every path once
            _run_clients(CLIENTS, min(0.5, seconds), fn)
        figures: dict[str, tuple[float, list[float]]] = {}
        calls_before = batcher.counts()
        figures["mixed"] = _run_clients(CLIENTS, seconds, mixed)
        calls, requests = (a - b for a, b in zip(batcher.counts(), calls_before, strict=True))
        figures["base"] = _run_clients(CLIENTS, seconds, base)
        figures["per_call"] = _run_clients(CLIENTS, seconds, per_call)
        # One client alone: what the hand-off to the batcher's thread costs.
        alone = best_medians({"batched": lambda: mixed(0), "direct": lambda: per_call(0)}, 100, rounds=3, warmup=10)
    mixed_rps, mixed_lat = figures["mixed"]
    return {
        "mixed_throughput_rps": round(mixed_rps, 1),
        "base_throughput_rps": round(figures["base"][0], 1),
        "one_adapter_per_call_rps": round(figures["per_call"][0], 1),
        "mixed_vs_base_throughput": round(mixed_rps / figures["base"][0], 3),
        "mixed_vs_one_adapter_per_call": round(mixed_rps / figures["per_call"][0], 3),
        "p99_ms_mixed": round(float(np.percentile(mixed_lat, 99)) * 1e3, 3),
        "p99_ms_one_adapter_per_call": round(float(np.percentile(figures["per_call"][1], 99)) * 1e3, 3),
        "mean_batch_mixed": round(requests / max(calls, 1), 2),
        "single_client_batched_ms": round(alone["batched"] * 1e3, 3),
        "single_client_direct_ms": round(alone["direct"] * 1e3, 3),
    }


# ---------------------------------------------------------------- memory of large requests


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _post(url: str, body: bytes) -> tuple[int, int]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, len(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, len(e.read())


def _concurrently(n: int, fn: Callable[[], tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    lock = threading.Lock()

    def run() -> None:
        r = fn()
        with lock:
            out.append(r)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def measure_large_requests(*, max_batch_rows: int = 1024, rounds: int = 3) -> dict[str, object]:
    """Peak RSS of a real daemon (demo model) under four concurrent maximum-size requests."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        config = Path(tmp) / "lorad.yaml"
        config.write_text(f"server:\n  max_batch_rows: {max_batch_rows}\ntrainer:\n  enabled: false\n")
        log = open(Path(tmp) / "lorad.log", "wb")  # noqa: SIM115 - the daemon child writes it until the end
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorad.daemon.cli", "serve", "--port", "0", "--state-dir", str(state), "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=_REPO,
        )
        try:
            addr = state / "lorad.addr"
            deadline = time.monotonic() + 60
            while not (addr.exists() and json.loads(addr.read_text()).get("pid") == proc.pid):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lorad did not start:\n{(Path(tmp) / 'lorad.log').read_text()}")
                time.sleep(0.05)  # polling for the daemon's address file, outside any test
            url = json.loads(addr.read_text())["url"] + "/v2/models/demo/infer"
            rng = np.random.default_rng(0)
            pixels = rng.random((max_batch_rows, 64), dtype=np.float32)
            body = json.dumps({
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [max_batch_rows, 64], "data": pixels.ravel().tolist()}],
                "parameters": {"adapter": "mirror"},
            }).encode()
            _post(url, body)  # warm: the adapter is loaded, the arenas exist
            idle = _rss_kb(proc.pid, "VmRSS")
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
            statuses = []
            for _ in range(rounds):
                statuses += [s for s, _ in _concurrently(4, lambda: _post(url, body))]
            peak = _rss_kb(proc.pid, "VmHWM")
            after = _rss_kb(proc.pid, "VmRSS")
            huge = b'{"inputs": [' + b" " * (64 << 20) + b"]}"
            refused = [s for s, _ in _concurrently(4, lambda: _post(url, huge))]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    return {
        "large_request_rows": max_batch_rows,
        "large_request_body_bytes": len(body),
        "large_request_statuses": sorted(set(statuses)),
        "idle_rss_mb": round(idle / 1024, 1),
        "peak_rss_mb_large_requests": round(peak / 1024, 1),
        "peak_rss_above_idle_mb": round((peak - idle) / 1024, 1),
        "rss_after_mb": round(after / 1024, 1),
        "huge_64mib_request_statuses": sorted(set(refused)),
    }
