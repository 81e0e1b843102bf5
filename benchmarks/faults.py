"""Faults stay small: what a real ``lorad serve`` does under each fault, and its memory
under the worst text requests.

For each fault: whether serving continued (a base and an adapter inference answer 200
afterwards, from the same daemon or from a restart on the damaged state), whether
anything acknowledged was lost, and the HTTP codes the fault's requests got.

- ``corrupt_*``: one state file damaged, then a restart: an adapter's ``current``
  pointer (garbage), its version's ``lorad.json`` (truncated), a version directory
  deleted, the privacy ledger, the example store, the API token file (the one file
  without which the daemon refuses to start, by design: it guards every change).
- ``disk_full_*``: the state directory on a 32 MiB tmpfs, filled; an upload, an example,
  a training run, and a restart (root only: the tmpfs is mounted).
- ``sigkill_uploads``: uploads while the daemon is SIGKILLed at random moments; after
  each restart every upload that was answered 201 must be there.
- ``malformed_*``: bad requests by class; none may get a 5xx.
- ``memory.minilm_4x_worst``: examples/intents (MiniLM) with 256-token texts: four
  concurrent requests of 256 texts × 256 tokens (the default ``max_request_tokens``),
  the daemon's peak RSS over idle (VmHWM, reset through ``/proc/PID/clear_refs``) and a
  one-text request's latency during them over its idle latency (medians).

    .venv/bin/python -m benchmarks.faults [--skip-memory]

Last line: {"faults": {NAME: {"serving_continued", "lost", "codes"}}, "memory":
{"minilm_4x_worst": {"peak_rss_over_idle_mb", "one_text_latency_vs_idle", ...}},
"loadavg": [...]}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.intents_model import build_intents_model
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.peft_format import dump_peft
from lorad.daemon.ctl.client import multipart_body

REPO = Path(__file__).resolve().parents[1]
_CACHE = Path(os.environ.get("LORAD_BENCH_CACHE", Path.home() / ".cache" / "lorad-bench"))


class Daemon:
    """A ``lorad serve`` child on a free port; its URL from the address file or its log."""

    def __init__(self, state: Path, config: Path | None = None) -> None:
        self.state = state
        state.parent.mkdir(parents=True, exist_ok=True)
        self.log = state.parent / f"{state.name}.log"
        args = [sys.executable, "-m", "lorad.daemon.cli", "serve", "--port", "0", "--state-dir", str(state)]
        if config is not None:
            args += ["--config", str(config)]
        start = self.log.stat().st_size if self.log.exists() else 0  # this process's part of the log
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 180
        self.url = ""
        while not self.url:
            text = self.log.read_bytes()[start:].decode(errors="replace")
            marker = "lorad: serving model "
            if marker in text:
                line = [ln for ln in text.splitlines() if marker in ln][-1]
                self.url = line.split(" at ")[1].split()[0]
            elif self.proc.poll() is not None:
                raise RuntimeError(f"lorad exited with {self.proc.returncode}")
            elif time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("lorad did not start")
            else:
                time.sleep(0.05)  # polling a child's log, outside any test
        self.token = (state / "api-token").read_text().strip()

    def request(self, method: str, path: str, body: bytes | None = None, *, ctype: str = "application/json",
                token: bool = True, timeout: float = 600) -> tuple[int, bytes]:
        headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {self.token}"} if token else {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, b""

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


_PIXELS = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.25] * 64}]})


def _serving(d: Daemon) -> bool:
    base = d.request("POST", "/v2/models/demo/infer", _PIXELS.encode())[0]
    with_adapter = json.loads(_PIXELS)
    with_adapter["parameters"] = {"adapter": "mirror"}
    return base == 200 and d.request("POST", "/v2/models/demo/infer", json.dumps(with_adapter).encode())[0] == 200


def _adapter_files(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    weights = {"head.weight": LoraWeights(rng.standard_normal((128, 2)).astype(np.float32) * 0.1,
                                          rng.standard_normal((2, 10)).astype(np.float32) * 0.1)}
    return dump_peft(LoraAdapter(rank=2, alpha=2.0, weights=weights, base_fingerprint=""))


def _upload(d: Daemon, name: str, seed: int) -> int:
    body, ctype = multipart_body(_adapter_files(seed))
    return d.request("PUT", f"/v2/models/demo/adapters/{name}", body, ctype=ctype)[0]


def _result(serving: bool, lost: int, codes: list[int], **extra: Any) -> dict[str, Any]:
    return {"serving_continued": serving, "lost": lost, "codes": sorted(set(codes)), **extra}


# ---------------------------------------------------------------- corrupt state files

def _corrupt(kind: str, state: Path) -> None:
    keep = state / "adapters" / "keep"
    if kind == "adapter_current":
        (keep / "current").write_bytes(b"\xff\xfe not a version")
    elif kind == "adapter_meta":
        meta = keep / "1" / "lorad.json"
        meta.write_bytes(meta.read_bytes()[:7])
    elif kind == "adapter_version_dir":
        shutil.rmtree(keep / "1")
    elif kind == "ledger":
        (state / "trainer" / "privacy-ledger.json").write_bytes(b"{\"format\": 3")
    elif kind == "examples_db":
        for extra in (state / "trainer").glob("examples.sqlite3-*"):
            extra.unlink()
        (state / "trainer" / "examples.sqlite3").write_bytes(b"garbage" * 100)
    elif kind == "token_file":
        (state / "api-token").write_bytes(b"\x00")
    else:
        raise ValueError(kind)


def corrupt_faults(work: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in ("adapter_current", "adapter_meta", "adapter_version_dir", "ledger", "examples_db", "token_file"):
        state = work / f"corrupt-{kind}" / "state"
        d = Daemon(state)
        codes = [_upload(d, "keep", 1), _upload(d, "other", 2)]
        d.request("POST", "/v2/models/demo/adapters/keep/examples", json.dumps(
            {**json.loads(_PIXELS), "label": 1}).encode())
        d.stop()
        _corrupt(kind, state)
        try:
            d = Daemon(state)
        except RuntimeError as e:  # the token file: refusing to start is the design
            out[kind] = _result(False, 0, codes, start=str(e), log_tail=(state.parent / "state.log").read_text()[-300:])
            continue
        listing = d.request("GET", "/v2/models/demo/adapters")[0]
        other = json.loads(_PIXELS)
        other["parameters"] = {"adapter": "other"}
        other_code = d.request("POST", "/v2/models/demo/infer", json.dumps(other).encode())[0]
        keep = dict(other, parameters={"adapter": "keep"})
        keep_code = d.request("POST", "/v2/models/demo/infer", json.dumps(keep).encode())[0]
        train = d.request("POST", "/v2/models/demo/adapters/keep/train")[0]
        out[kind] = _result(_serving(d) and other_code == 200, 0 if other_code == 200 else 1,
                            [*codes, listing, other_code, keep_code, train],
                            listing=listing, damaged_adapter=keep_code, other_adapter=other_code, train=train)
        d.stop()
    return out


# ---------------------------------------------------------------- a full disk

@contextlib.contextmanager
def _small_disk(work: Path) -> Iterator[Path | None]:
    mount = work / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)


def disk_full_faults(work: Path) -> dict[str, dict[str, Any]]:
    with _small_disk(work) as disk:
        if disk is None:
            return {"disk_full": {"skipped": "mounting a tmpfs needs root"}}
        state = disk / "state"
        d = Daemon(state)
        acknowledged = [f"a{i}" for i in range(3) if _upload(d, f"a{i}", i) == 201]
        _fill(disk)
        out = {
            "disk_full_upload": [_upload(d, "late", 9)],
            "disk_full_example": [d.request("POST", "/v2/models/demo/adapters/a0/examples", json.dumps(
                {**json.loads(_PIXELS), "label": 1}).encode())[0]],
            "disk_full_train": [d.request("POST", "/v2/models/demo/adapters/a0/train")[0]],
        }
        serving = _serving(d)
        d.stop()
        _fill(disk)
        d = Daemon(state)
        listed = json.loads(d.request("GET", "/v2/models/demo/adapters")[1])
        lost = len(set(acknowledged) - {a["name"] for a in listed})
        ready = json.loads(d.request("GET", "/v2/health/ready")[1])
        results = {k: _result(serving, lost, v) for k, v in out.items()}
        results["disk_full_restart"] = _result(_serving(d), lost, [200], health=ready)
        d.stop()
        return results


# ---------------------------------------------------------------- SIGKILL during writes

def sigkill_faults(work: Path, *, rounds: int = 8) -> dict[str, dict[str, Any]]:
    state = work / "sigkill" / "state"
    rng = random.Random(5)
    acknowledged: set[str] = set()
    codes: list[int] = []
    serving = True
    for r in range(rounds):
        d = Daemon(state)
        stop = threading.Event()

        def upload_loop(d: Daemon = d, r: int = r, stop: threading.Event = stop) -> None:
            i = 0
            while not stop.is_set():
                name = f"r{r}-{i}"
                code = _upload(d, name, r * 100 + i)
                codes.append(code)
                if code == 201:
                    acknowledged.add(name)
                i += 1

        t = threading.Thread(target=upload_loop)
        t.start()
        time.sleep(rng.uniform(0.05, 0.5))  # a random moment in the middle of uploads
        d.kill()
        stop.set()
        t.join()
        d = Daemon(state)
        listed = {a["name"] for a in json.loads(d.request("GET", "/v2/models/demo/adapters")[1])}
        serving = serving and _serving(d)
        lost = len(acknowledged - listed)
        d.stop()
        if lost:
            break
    return {"sigkill_uploads": _result(serving, lost, [c for c in codes if c], acknowledged=len(acknowledged))}


# ---------------------------------------------------------------- malformed requests

def malformed_faults(work: Path) -> dict[str, dict[str, Any]]:
    d = Daemon(work / "malformed" / "state")
    infer = "/v2/models/demo/infer"
    deep = b"[" * 1000 + b"]" * 1000
    cases: dict[str, list[tuple[str, str, bytes]]] = {
        "malformed_json": [("POST", infer, b"{"), ("POST", infer, b"\xff\xfe"), ("POST", infer, b"null")],
        "malformed_nesting": [("POST", infer, b'{"inputs": ' + deep + b"}"),
                              ("POST", "/v2/models/demo/adapters/mirror/privacy/audit", deep)],
        "malformed_tensor": [
            ("POST", infer, json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                                    "data": [[0.1] * 3, [0.2]]}]}).encode()),
            ("POST", infer, json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [0, 64],
                                                    "data": []}]}).encode()),
            ("POST", infer, json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                                    "data": [1e400] * 64}]}).encode()),
        ],
        "malformed_query": [("GET", "/v2/models/demo/adapters/mirror?version=%D9%A1", b""),
                            ("POST", "/v2/models/demo/adapters/mirror/rollback?version=-1", b"")],
        "malformed_upload": [("PUT", "/v2/models/demo/adapters/bad", b"--x\r\nnot multipart")],
    }
    out = {}
    for name, requests in cases.items():
        codes = [d.request(m, p, b or None)[0] for m, p, b in requests]
        out[name] = _result(_serving(d), 0, codes, server_errors=sum(c >= 500 or c == 0 for c in codes))
    d.stop()
    return out


# ---------------------------------------------------------------- memory

def memory_minilm(work: Path) -> dict[str, Any]:
    model = build_intents_model(_CACHE / "intents" / "intents.onnx")
    config = work / "minilm.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "intents", "path": str(model), "targets": ["encoder.layer.*.weight", "classifier.weight"],
                  "rank": 8, "max_text_tokens": 256},
        "trainer": {"enabled": False},
    }))
    d = Daemon(work / "minilm" / "state", config)
    try:
        words = " ".join(["turn the living room lights on please"] * 36)  # ~254 tokens
        big = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [256], "data": [words] * 256}]})
        one = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                      "data": ["turn on the kitchen light"]}]}).encode()

        def latency() -> float:
            t = time.perf_counter()
            code = d.request("POST", "/v2/models/intents/infer", one)[0]
            assert code == 200, code
            return time.perf_counter() - t

        for _ in range(3):
            latency()
        idle_latency = float(np.median([latency() for _ in range(20)]))
        idle = d.rss_kb()
        Path(f"/proc/{d.proc.pid}/clear_refs").write_text("5")  # reset VmHWM
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(
            d.request("POST", "/v2/models/intents/infer", big.encode())[0])) for _ in range(4)]
        for t in threads:
            t.start()
        during: list[float] = []
        while any(t.is_alive() for t in threads):
            during.append(latency())
        for t in threads:
            t.join()
        peak = d.rss_kb("VmHWM")
        time.sleep(1.0)  # the trim after large requests runs after the answers
        after = d.rss_kb()
        return {"peak_rss_over_idle_mb": round((peak - idle) / 1024, 1),
                "one_text_latency_vs_idle": round(float(np.median(during)) / idle_latency, 2) if during else None,
                "one_text_latency_idle_ms": round(idle_latency * 1e3, 2),
                "one_text_latency_during_ms": round(float(np.median(during)) * 1e3, 2) if during else None,
                "one_text_requests_during": len(during), "statuses": sorted(set(codes)),
                "idle_rss_mb": round(idle / 1024, 1), "rss_after_over_idle_mb": round((after - idle) / 1024, 1)}
    finally:
        d.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-memory", action="store_true", help="leave out the MiniLM memory case")
    args = parser.parse_args(argv)
    started = time.monotonic()
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorad-faults-") as tmp:
        work = Path(tmp)
        faults: dict[str, dict[str, Any]] = {}
        steps: list[Callable[[Path], dict[str, dict[str, Any]]]] = [
            corrupt_faults, disk_full_faults, sigkill_faults, malformed_faults]
        for step in steps:
            faults.update(step(work))
            print(json.dumps({k: faults[k] for k in list(faults)[-6:]}), file=sys.stderr)
        memory = {} if args.skip_memory else {"minilm_4x_worst": memory_minilm(work)}
    print(json.dumps({"faults": faults, "memory": memory, "wall_s": round(time.monotonic() - started, 1),
                      "loadavg": [round(x, 2) for x in (*before, *os.getloadavg())]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
