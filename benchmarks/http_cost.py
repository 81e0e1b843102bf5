"""HTTP cost per request: server CPU time of ``lorad serve`` against a minimal aiohttp OIP server.

Both servers are real processes on loopback; a load generator in a third process (raw
HTTP/1.1 keep-alive connections, asyncio, standard library only) drives one of them at a
time at a fixed concurrency. What counts is the *server* process's CPU time (utime +
stime of ``/proc/PID/stat``, every thread) over the measured window, divided by the
requests answered: robust to the machine's load, unlike wall time. The two servers are
measured in rounds, in random order within each round.

- demo model, concurrency 1, 8 and 32: ``lorad serve`` (embedded demo model) against a
  minimal aiohttp handler (``json.loads`` → numpy → ``session.run`` → ``json.dumps``);
  lorad also with the binary tensor extension (``Inference-Header-Content-Length``);
- MiniLM (``examples/intents``), concurrency 8, base and with an uploaded adapter: lorad
  against a bare session plus tokenizer in the same minimal handler (the same length
  buckets as lorad's text front end, so both run the same tensors).

Both sides run ONNX Runtime with one intra-op thread. The last line printed is one JSON
object with ``http_cpu_vs_minimal_demo_c1``/``_c8``/``_c32``, ``http_cpu_vs_bare_minilm_c8``,
``http_cpu_vs_bare_minilm_c8_adapter`` (ratios) and the raw milliseconds per request.

    .venv/bin/python -m benchmarks.http_cost [--quick] [--no-minilm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import LoadWatch

__all__ = ["measure_demo", "measure_minilm", "main"]

REPO = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")
#: Goal: lorad's CPU per request at most this many times the minimal server's.
GOAL_RATIO = 1.1
_TEXT = "turn on the kitchen light please"


# ---------------------------------------------------------------- processes


def _cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class _Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    token: str | None = None


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                doc: dict[str, Any] = json.loads(path.read_text())
            except ValueError:
                doc = {}
            if doc.get("pid") == proc.pid and doc.get("url"):
                return doc
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not start:\n{log.read_text(errors='replace')[-4000:]}")


@contextmanager
def _process(name: str, argv: list[str], addr: Path, log: Path) -> Iterator[_Server]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        doc = _wait_for(addr, proc, log)
        yield _Server(name, proc, doc["url"])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _lorad(work: Path, model: Path | None, server: Mapping[str, Any] | None = None) -> Any:
    """``lorad serve`` on port 0 with one intra-op thread and no trainer (``server``: more
    settings of its ``server`` section)."""
    import yaml

    state = work / "state"
    cfg: dict[str, Any] = {"model": {"intra_op_threads": 1}, "trainer": {"enabled": False}, "server": dict(server or {})}
    if model is not None:
        cfg["model"].update({"name": "intents", "path": str(model), "rank": 8,
                             "targets": ["encoder.layer.*.weight", "classifier.weight"], "max_text_tokens": 64})
    (work / "lorad.yaml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent / "lorad"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad.daemon.cli"]
    return _process("lorad", [*cmd, "serve", "--port", "0", "--state-dir", str(state), "--config", str(work / "lorad.yaml")],
                    state / "lorad.addr", work / "lorad.log")


def _minimal(work: Path, model: Path, *, text: bool) -> Any:
    argv = [sys.executable, "-m", "benchmarks.http_cost", "_minimal", str(model), str(work / "minimal.addr")]
    return _process("minimal", [*argv, *(["--text"] if text else [])], work / "minimal.addr", work / "minimal.log")


# ---------------------------------------------------------------- the minimal server


def _serve_minimal(model: Path, addr: Path, *, text: bool) -> None:
    """The floor: one aiohttp route, JSON → numpy → session.run → JSON, all in the event loop."""
    import onnxruntime as ort
    from aiohttp import web

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    tok = labels = None
    if text:
        from tokenizers import Tokenizer

        meta = session.get_modelmeta().custom_metadata_map
        from lorad.adapters.bert_builder import LABELS_KEY, TOKENIZER_KEY

        tok = Tokenizer.from_str(meta[TOKENIZER_KEY])
        tok.no_padding()  # padded to lorad's length buckets below: both run the same tensors
        tok.no_truncation()
        labels = json.loads(meta[LABELS_KEY])
        model_inputs = {i.name for i in session.get_inputs()}

    async def infer(request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        t = doc["inputs"][0]
        if tok is None:
            feeds = {t["name"]: np.array(t["data"], np.float32).reshape(t["shape"])}
        else:
            encs = tok.encode_batch(t["data"])
            longest = max(len(e.ids) for e in encs)
            size = 8
            while size < longest:
                size *= 2
            ids = np.zeros((len(encs), size), np.int64)
            mask = np.zeros_like(ids)
            for i, e in enumerate(encs):
                ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
            all_feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            feeds = {k: v for k, v in all_feeds.items() if k in model_inputs}
        results = session.run(None, feeds)
        out = [{"name": n, "datatype": "FP32", "shape": list(r.shape), "data": r.ravel().tolist()}
               for n, r in zip(outputs, results, strict=True)]
        if labels is not None:
            best = results[-1].argmax(axis=-1)
            out.append({"name": "label", "datatype": "BYTES", "shape": [len(best)], "data": [labels[i] for i in best]})
        body = {"model_name": request.match_info["model"], "id": doc.get("id"), "outputs": out}
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/v2/models/{model}/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        addr.write_text(json.dumps({"pid": os.getpid(), "url": f"http://{host}:{port}"}))
        await asyncio.Event().wait()

    asyncio.run(start())


# ---------------------------------------------------------------- the load generator


async def _drive(url: str, path: str, body: bytes, headers: Mapping[str, str], concurrency: int) -> None:
    """Keep ``concurrency`` connections busy; each stdin line ``N`` runs N requests in all
    and answers ``OK ERRORS`` on stdout."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode()
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    loop = asyncio.get_running_loop()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(head + body)
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return status.split(b" ", 2)[1] == b"200"

    async def worker(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], left: list[int], counts: list[int]) -> None:
        while left[0] > 0:
            left[0] -= 1
            counts[0 if await one(*conn) else 1] += 1

    while line := await loop.run_in_executor(None, sys.stdin.readline):
        left, counts = [int(line)], [0, 0]
        await asyncio.gather(*(worker(c, left, counts) for c in conns))
        print(counts[0], counts[1], flush=True)


@dataclass
class _Figure:
    cpu_s: float = 0.0
    requests: int = 0
    errors: int = 0

    @property
    def ms(self) -> float:
        return 1e3 * self.cpu_s / max(1, self.requests)


def _measure(server: _Server, body: bytes, headers: Mapping[str, str], *, concurrency: int, n: int, warmup: int,
             path: str, into: _Figure) -> None:
    spec = json.dumps({"url": server.url, "path": path, "body": body.hex(), "headers": dict(headers), "c": concurrency})
    gen = subprocess.Popen([sys.executable, "-m", "benchmarks.http_cost", "_load", spec], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, cwd=REPO, text=True)
    assert gen.stdin is not None and gen.stdout is not None
    try:
        gen.stdin.write(f"{warmup}\n")
        gen.stdin.flush()
        ok, bad = map(int, gen.stdout.readline().split())
        if ok == 0:
            raise RuntimeError(f"{server.name}: every warm-up request failed ({bad})")
        before = _cpu_s(server.proc.pid)
        gen.stdin.write(f"{n}\n")
        gen.stdin.flush()
        ok, bad = map(int, gen.stdout.readline().split())
        into.cpu_s += _cpu_s(server.proc.pid) - before
        into.requests += ok + bad
        into.errors += bad
    finally:
        gen.stdin.close()
        gen.wait(30)


def _binary_body(pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(pixels, "<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def _interleave(pairs: list[tuple[str, _Server, bytes, dict[str, str], int, int]], figures: dict[str, _Figure], *,
                rounds: int, n: int, warmup: int, path: str) -> None:
    for _ in range(rounds):
        order = list(pairs)
        random.shuffle(order)
        for key, server, body, headers, concurrency, scale in order:
            _measure(server, body, headers, concurrency=concurrency, n=n * scale, warmup=warmup, path=path,
                     into=figures.setdefault(key, _Figure()))


def measure_demo(work: Path, *, rounds: int, n: int, binary: bool = True) -> dict[str, float]:
    """lorad vs the minimal server on the demo model at concurrency 1, 8 and 32 (ms of server CPU per request)."""
    from lorad.daemon.demo import demo_model_path

    pixels = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                   "data": pixels.ravel().tolist()}]}).encode()
    binary_body, binary_headers = _binary_body(pixels)
    js = {"Content-Type": "application/json"}
    figures: dict[str, _Figure] = {}
    (work / "lorad").mkdir()
    (work / "minimal").mkdir()
    with ExitStack() as stack:
        lorad = stack.enter_context(_lorad(work / "lorad", None))
        minimal = stack.enter_context(_minimal(work / "minimal", demo_model_path(), text=False))
        pairs = []
        for c in (1, 8, 32):
            scale = 1 if c == 1 else 2
            pairs += [(f"lorad_c{c}", lorad, body, js, c, scale), (f"minimal_c{c}", minimal, body, js, c, scale)]
            if binary:
                pairs.append((f"lorad_binary_c{c}", lorad, binary_body, binary_headers, c, scale))
        _interleave(pairs, figures, rounds=rounds, n=n, warmup=200, path="/v2/models/demo/infer")
    out: dict[str, float] = {}
    for c in (1, 8, 32):
        lo, mi = figures[f"lorad_c{c}"], figures[f"minimal_c{c}"]
        out[f"http_cpu_vs_minimal_demo_c{c}"] = round(lo.ms / mi.ms, 3)
        out[f"lorad_cpu_ms_demo_c{c}"] = round(lo.ms, 4)
        out[f"minimal_cpu_ms_demo_c{c}"] = round(mi.ms, 4)
        if binary:  # the binary extension (not a goal: the minimal server speaks JSON only)
            bi = figures[f"lorad_binary_c{c}"]
            out[f"lorad_binary_vs_minimal_demo_c{c}"] = round(bi.ms / mi.ms, 3)
            out[f"lorad_binary_cpu_ms_demo_c{c}"] = round(bi.ms, 4)
    out["errors"] = sum(f.errors for f in figures.values())
    return out


def _upload_alice(server: _Server, state: Path) -> None:
    import urllib.request

    from lorad.daemon.ctl.client import multipart_body

    alice = REPO / "examples" / "intents" / "adapters" / "alice"
    body, ctype = multipart_body({p.name: p.read_bytes() for p in alice.iterdir()})
    token = (state / "api-token").read_text().strip()
    req = urllib.request.Request(f"{server.url}/v2/models/intents/adapters/alice", data=body, method="PUT",
                                 headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 201, r.status


def measure_minilm(work: Path, *, rounds: int, n: int) -> dict[str, float]:
    """lorad vs a bare session plus tokenizer on MiniLM at concurrency 8, base and with an adapter."""
    from benchmarks.intents_model import cached_intents_model

    model = cached_intents_model()
    doc: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [_TEXT]}]}
    body = json.dumps(doc).encode()
    adapted = json.dumps({**doc, "parameters": {"adapter": "alice"}}).encode()
    js = {"Content-Type": "application/json"}
    figures: dict[str, _Figure] = {}
    (work / "lorad").mkdir()
    (work / "minimal").mkdir()
    with ExitStack() as stack:
        lorad = stack.enter_context(_lorad(work / "lorad", model))
        _upload_alice(lorad, work / "lorad" / "state")
        bare = stack.enter_context(_minimal(work / "minimal", model, text=True))
        pairs = [("lorad", lorad, body, js, 8, 1), ("lorad_adapter", lorad, adapted, js, 8, 1), ("bare", bare, body, js, 8, 1)]
        _interleave(pairs, figures, rounds=rounds, n=n, warmup=30, path="/v2/models/intents/infer")
    lo, ad, ba = figures["lorad"], figures["lorad_adapter"], figures["bare"]
    return {
        "http_cpu_vs_bare_minilm_c8": round(lo.ms / ba.ms, 3),
        "http_cpu_vs_bare_minilm_c8_adapter": round(ad.ms / ba.ms, 3),
        "lorad_cpu_ms_minilm_c8": round(lo.ms, 3),
        "lorad_adapter_cpu_ms_minilm_c8": round(ad.ms, 3),
        "bare_cpu_ms_minilm_c8": round(ba.ms, 3),
        "errors": sum(f.errors for f in figures.values()),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_minimal":
        _serve_minimal(Path(sys.argv[2]), Path(sys.argv[3]), text="--text" in sys.argv)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        spec = json.loads(sys.argv[2])
        asyncio.run(_drive(spec["url"], spec["path"], bytes.fromhex(spec["body"]), spec["headers"], spec["c"]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--no-minilm", action="store_true", help="the demo model only")
    parser.add_argument("--no-demo", action="store_true", help="MiniLM only")
    parser.add_argument("--no-binary", action="store_true", help="JSON bodies only (a lorad without the binary extension)")
    args = parser.parse_args()
    watch = LoadWatch()
    rounds, n = (2, 600) if args.quick else (3, 1500)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_demo:
            (Path(tmp) / "demo").mkdir()
            demo = measure_demo(Path(tmp) / "demo", rounds=rounds, n=n, binary=not args.no_binary)
            print(json.dumps({"demo": demo}), flush=True)
            result.update({k: v for k, v in demo.items() if k != "errors"})
            result["errors_demo"] = demo["errors"]
        if not args.no_minilm:
            (Path(tmp) / "minilm").mkdir()
            minilm = measure_minilm(Path(tmp) / "minilm", rounds=rounds, n=max(150, n // 5))
            print(json.dumps({"minilm": minilm}), flush=True)
            result.update({k: v for k, v in minilm.items() if k != "errors"})
            result["errors_minilm"] = minilm["errors"]
    goals = {k: v <= GOAL_RATIO for k, v in result.items() if k.startswith("http_cpu_vs_")}
    result["goals"] = goals
    result["goals_met"] = all(goals.values())
    print(json.dumps(watch.seal(result)))


if __name__ == "__main__":
    main()
