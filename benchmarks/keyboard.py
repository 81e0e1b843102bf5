"""Keyboard benchmark: predictive text that learns each user's words, privately (DP-LoRA on SmolLM2-135M Q4_1).

The users are those of ``examples/keyboard`` (per-user phone messages with clashing nicknames,
trade jargon and recurring phrases; 300 training and 80 held-out texts each). For each user it
trains, on the portable backend and against the 4-bit base lorad serves (``int8`` compute),
rank-8 LoRA on q, k, v, o of every layer, batches of 16 texts (Poisson sampling, q = 16/n),
64-token windows, AdamW, the same number of steps for every variant:

* ``nonprivate``: no clipping, no noise;
* ``eps1``, ``eps3``, ``eps8``: DP-SGD, each text one example clipped to C, σ calibrated by the
  RDP accountant so that the run is (ε, δ = 1/(10 n))-DP, ``--seeds`` seeds each (mean reported,
  the per-seed values too).

and scores the user's held-out texts with the base model and each adapter, through the served
graph (int8 compute) in one forward per text:

* **next-word top-3 accuracy** (``users.<u>.{base, nonprivate, eps1, eps3, eps8}``): for every
  word after the third (``examples/keyboard/make_data.py``'s ``next_word_cases``), whether the
  word's first token is among the model's three most likely next tokens after the text before
  it (teacher-forced: what a keyboard's suggestion strip offers before the word is typed; a
  word of several tokens counts by its first);
* **perplexity** (``users.<u>.ppl_*``): exp of the mean next-token loss over the held-out texts'
  tokens.

Then, in one process, interleaved, the same threads (``--threads``): ``dp_step_ms`` and
``nondp_step_ms`` (one step of 16 windows, the private and the plain step graphs, the batch
whole), ``dp_step_ms_parts`` (the private step in the daemon's default parts of 2 windows), and
``opacus_step_ms`` (``benchmarks/_opacus_decoder.py --time`` in a torch environment: the same
model dequantised to fp32 in transformers, LoRA on the same projections, Opacus' per-sample
clipping and noise, the same batch, rank and threads), ``dp_vs_opacus = dp_step_ms /
opacus_step_ms``.

Last, a real ``lorad serve`` of the model with the trainer on (defaults: parts of 2 windows, one
SCHED_IDLE training thread): one user's texts added over HTTP, generation latency measured
idle, then during a private run of ``--daemon-steps`` (≥ 50) steps with generation requests
going on all along, one every ``--pace-s`` seconds (a keyboard asks as the user types; a
continuous load would leave the SCHED_IDLE trainer no CPU at all on two cores, by design);
``generation_p99_idle_ms``, ``generation_p99_training_ms`` and their ratio
``yield_ratio``; ``peak_rss_mb``: the largest sum of the RSS of the daemon and its training
child sampled every 0.2 s while serving and training (``daemon_vmhwm_mb``: the daemon's own
VmHWM).

The last line printed is one JSON object. ``run_s`` is the wall time of the whole benchmark.

    .venv/bin/python -m benchmarks.keyboard [--users alice,bob,carol] [--seeds 3] [--steps 40]
        [--threads 2] [--torch-python .venv-ref/bin/python] [--daemon-steps 50] [--skip-daemon]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from benchmarks.load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "keyboard" / "data" / "users"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16.0
BATCH, WINDOW = 16, 64
EPSILONS = (1.0, 3.0, 8.0)
CLIP_NORM = 1.0
LEARNING_RATE = 0.01
EVAL_WINDOWS = 8  # windows per scoring call: 8 × 64 × 49,152 logits = 100 MB


def _make_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("keyboard_make_data", REPO / "examples" / "keyboard" / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _texts(user: str, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (DATA / user / f"{split}.jsonl").read_text().splitlines() if line]


# --- scoring ---------------------------------------------------------------------------------


class Scorer:
    """The served graph with LoRA inputs (int8 compute, as lorad serves it), scoring texts."""

    def __init__(self, model: onnx.ModelProto, tokenizer: Any, threads: int, vocab: int) -> None:
        import onnxruntime as ort

        from lorad.adapters.decoder import without_cache
        from lorad.adapters.lora_graph import find_targets, lora_input_names, make_inference_graph
        from lorad.adapters.onnx_compat import for_runtime

        self.targets = find_targets(model, TARGETS)
        graph = for_runtime(make_inference_graph(without_cache(model), self.targets, rank=RANK))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.names = {t.weight: lora_input_names(t.weight) for t in self.targets}
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.cases = _make_data().next_word_cases

    def lora_feeds(self, values: dict[str, np.ndarray] | None, scale: float) -> dict[str, np.ndarray]:
        feeds = {}
        for t in self.targets:
            a, b = self.names[t.weight]
            if values is None:
                feeds[a] = np.zeros((t.in_features, RANK), np.float32)
                feeds[b] = np.zeros((RANK, t.out_features), np.float32)
            else:
                feeds[a], feeds[b] = values[a], (values[b] * scale).astype(np.float32)
        return feeds

    def score(self, texts: Sequence[str], values: dict[str, np.ndarray] | None, scale: float) -> dict[str, float]:
        """Next-word top-3 accuracy and perplexity of ``texts`` (see the module docstring)."""
        from lorad.trainer.lm_examples import windows_of

        lora = self.lora_feeds(values, scale)
        hits = cases = 0
        nll, tokens = 0.0, 0
        for text in texts:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            ids, mask, labels = windows_of(np.asarray(enc.ids), WINDOW)
            logits = np.concatenate([
                self.session.run(["logits"], {"input_ids": ids[i:i + EVAL_WINDOWS], "attention_mask": mask[i:i + EVAL_WINDOWS],
                                              **lora})[0] for i in range(0, len(ids), EVAL_WINDOWS)]).reshape(-1, self.vocab)
            flat_labels = labels.reshape(-1)
            counted = flat_labels != -100
            top = logits[counted].astype(np.float64)
            top -= top.max(axis=1, keepdims=True)
            log_p = top - np.log(np.exp(top).sum(axis=1, keepdims=True))
            nll -= float(log_p[np.arange(len(log_p)), flat_labels[counted]].sum())
            tokens += int(counted.sum())
            starts = {start: j for j, (start, _end) in enumerate(enc.offsets)}
            for prefix, _word in self.cases(text):
                j = starts.get(len(prefix))
                if j is None:  # the space before the word opens its token
                    j = starts.get(len(prefix) - 1)
                if not j:
                    continue
                cases += 1
                hits += int(enc.ids[j] in np.argpartition(logits[j - 1], -3)[-3:])
        return {"top3": hits / max(cases, 1), "ppl": math.exp(nll / max(tokens, 1)), "cases": cases}


# --- training --------------------------------------------------------------------------------


def train(artifacts: Any, examples: list[Any], *, steps: int, epsilon: float | None, seed: int, threads: int,
          part_rows: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One run on ``examples``; returns the LoRA values and what the run was (σ, q, δ)."""
    from lorad.trainer.accountant import calibrate_sigma
    from lorad.trainer.config import default_delta
    from lorad.trainer.dp_step import DPSettings
    from lorad.trainer.lm_examples import collate_texts
    from lorad.trainer.noise import SeededNoise
    from lorad.trainer.portable import PortableStepper

    n = len(examples)
    q = BATCH / n
    delta = default_delta(n)
    if epsilon is None:
        stepper = PortableStepper(artifacts, learning_rate=LEARNING_RATE, dp=None, noise=None, expected_batch_size=BATCH,
                                  intra_op_threads=threads, max_part_rows=part_rows)
        sigma = 0.0
    else:
        sigma = calibrate_sigma(target_epsilon=epsilon, delta=delta, q=q, steps=steps, accountant="rdp")
        stepper = PortableStepper(artifacts, learning_rate=LEARNING_RATE,
                                  dp=DPSettings(noise_multiplier=sigma, clip_norm=CLIP_NORM, expected_batch_size=BATCH),
                                  noise=SeededNoise(seed), intra_op_threads=threads, max_part_rows=part_rows)
    rng = np.random.default_rng(1000 + seed)
    try:
        for _ in range(steps):
            picked = [ex for ex in examples if rng.random() < q]
            batch, _ = collate_texts(picked, window=WINDOW, label_input=artifacts.label_input)
            stepper.step(batch)
        return stepper.parameters(), {"sigma": sigma, "q": q, "delta": delta}
    finally:
        stepper.close()


def step_times(private: Any, plain: Any, batch: dict[str, np.ndarray], *, threads: int, rounds: int) -> dict[str, float]:
    """Median ms of one step of each graph on ``batch``, interleaved round by round."""
    from lorad.trainer.dp_step import DPSettings
    from lorad.trainer.noise import SeededNoise
    from lorad.trainer.portable import PortableStepper

    dp = DPSettings(noise_multiplier=1.0, clip_norm=CLIP_NORM, expected_batch_size=BATCH)
    steppers = {
        "dp_step_ms": PortableStepper(private, learning_rate=LEARNING_RATE, dp=dp, noise=SeededNoise(0),
                                      intra_op_threads=threads),
        "nondp_step_ms": PortableStepper(plain, learning_rate=LEARNING_RATE, dp=None, noise=None, expected_batch_size=BATCH,
                                         intra_op_threads=threads),
        "dp_step_ms_parts": PortableStepper(private, learning_rate=LEARNING_RATE, dp=dp, noise=SeededNoise(0),
                                            intra_op_threads=threads, max_part_rows=2),
    }
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(rounds + 1):
        for key, stepper in steppers.items():
            began = time.perf_counter()
            stepper.step(batch)
            if r:  # the first round warms up
                times[key].append((time.perf_counter() - began) * 1000)
    for stepper in steppers.values():
        stepper.close()
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def opacus_step(torch_python: Path, threads: int) -> dict[str, Any]:
    if not torch_python.exists():
        return {"opacus_error": f"{torch_python} not found (a venv with torch, transformers, opacus, gguf)"}
    cmd = [str(torch_python), "-m", "benchmarks._opacus_decoder", "--time", "--batch", str(BATCH), "--window", str(WINDOW),
           "--rank", str(RANK), "--threads", str(threads), "--targets", *TARGETS]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600, check=False)
    if done.returncode != 0:
        return {"opacus_error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the daemon: memory and yield -----------------------------------------------------------


def _tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children (the training step process), MB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            line = next(x for x in Path(f"/proc/{p}/status").read_text().splitlines() if x.startswith("VmRSS"))
            total += int(line.split()[1])
        except (OSError, StopIteration):
            continue
    return total / 1024


def daemon_phase(model_path: Path, user: str, *, steps: int, threads: int, pace_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lorad.yaml"
        config.write_text(json.dumps({
            "model": {"name": "smollm2", "path": str(model_path), "targets": TARGETS, "rank": RANK,
                      "intra_op_threads": threads},
            "generation": {"max_concurrent": 2},
            "trainer": {"schedule": False, "intra_op_threads": threads, "store": {"max_examples_per_user": 400},
                        "defaults": {"steps": steps, "epochs": None, "batch_size": BATCH, "rank": RANK,
                                     "target_epsilon": 8.0, "clip_norm": CLIP_NORM, "learning_rate": LEARNING_RATE,
                                     "min_train_examples": 50, "min_holdout_examples": 20}}}))
        state = Path(tmp) / "state"
        proc = subprocess.Popen([sys.executable, "-m", "lorad.daemon.cli", "serve", "--config", str(config), "--port", "0",
                                 "--state-dir", str(state)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            deadline = time.monotonic() + 300
            while not (state / "lorad.addr").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    return {"daemon_error": "lorad serve did not start"}
                time.sleep(0.1)
            url = json.loads((state / "lorad.addr").read_text())["url"] + "/v2/models/smollm2"
            token = (state / "api-token").read_text().strip()

            def call(method: str, path: str, body: Any = None) -> Any:
                data = json.dumps(body).encode() if body is not None else None
                req = urllib.request.Request(url + path, data=data, method=method,
                                             headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    return json.loads(r.read())

            for line in (DATA / user / "train.jsonl").read_text().splitlines():
                call("POST", f"/adapters/{user}/examples", json.loads(line))
            prompts = _texts(user, "test")

            def generation_ms(i: int) -> float:
                began = time.perf_counter()
                call("POST", "/generate", {"text_input": " ".join(prompts[i % len(prompts)].split()[:6]),
                                           "parameters": {"max_tokens": 8}})
                return (time.perf_counter() - began) * 1000

            def paced(i: int) -> float:
                """One request, then the rest of the user's pause (a keyboard asks as the user types)."""
                began = time.perf_counter()
                ms = generation_ms(i)
                time.sleep(max(0.0, pace_s - (time.perf_counter() - began)))
                return ms

            idle = [paced(i) for i in range(60)]
            call("POST", f"/adapters/{user}/train")
            during: list[float] = []
            began = time.monotonic()
            while True:
                doc = call("GET", f"/adapters/{user}/train")
                if doc.get("state") == "finished":
                    break
                if doc.get("phase") == "training":
                    during.append(paced(len(during)))
                else:
                    time.sleep(0.2)
            trained_s = time.monotonic() - began
            hwm = next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
            p99_idle = float(np.percentile(idle, 99))
            p99_training = float(np.percentile(during, 99)) if during else math.nan
            return {"generation_p99_idle_ms": round(p99_idle, 1), "generation_p99_training_ms": round(p99_training, 1),
                    "yield_ratio": round(p99_training / p99_idle, 3), "generations_during_training": len(during),
                    "daemon_run": {"status": doc.get("status"), "steps": steps, "seconds": round(trained_s, 1)},
                    "peak_rss_mb": round(peak[0], 1), "daemon_vmhwm_mb": round(int(hwm.split()[1]) / 1024, 1)}
        finally:
            stop.set()
            proc.terminate()
            proc.wait(timeout=120)


# --- the benchmark --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from lorad.adapters.decoder import DecoderSpec
    from lorad.adapters.gguf_import import import_gguf
    from lorad.trainer.artifacts import ArtifactConfig, build_artifacts
    from lorad.trainer.example_store import Example
    from lorad.trainer.lm_examples import TextExamples, collate_texts

    from .generation import find_gguf

    began = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="lorad-keyboard-"))
    model = import_gguf(args.gguf or find_gguf())
    model_path = work / "smollm2.onnx"
    onnx.save(model, str(model_path))
    spec = DecoderSpec.from_model(model)
    assert spec is not None
    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    texts = TextExamples(spec.tokenizer_json, vocab_size=spec.vocab_size)
    private, plain = (build_artifacts(model, ArtifactConfig(targets=tuple(TARGETS), rank=RANK, alpha=ALPHA, loss="causal_lm",
                                                            output="logits", private=dp),
                                      cache_dir=work / "artifacts", backend="portable") for dp in (True, False))
    scorer = Scorer(model, tokenizer, args.threads, spec.vocab_size)
    scale = ALPHA / RANK
    del model

    users: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for user in args.users:
        train_texts, test_texts = _texts(user, "train"), _texts(user, "test")
        examples = [Example(i, user, texts.encode(t, max_tokens=1024)[0], np.zeros(0, np.int64), 0.0)
                    for i, t in enumerate(train_texts)]
        base = scorer.score(test_texts, None, scale)
        row: dict[str, Any] = {"base": base["top3"], "ppl_base": base["ppl"], "cases": base["cases"]}
        values, _ = train(plain, examples, steps=args.steps, epsilon=None, seed=0, threads=args.threads)
        got = scorer.score(test_texts, values, scale)
        row["nonprivate"], row["ppl_nonprivate"] = got["top3"], got["ppl"]
        for eps in EPSILONS:
            key = f"eps{eps:g}"
            top3, ppl = [], []
            for seed in range(args.seeds):
                values, info = train(private, examples, steps=args.steps, epsilon=eps, seed=seed, threads=args.threads)
                got = scorer.score(test_texts, values, scale)
                top3.append(got["top3"])
                ppl.append(got["ppl"])
                runs[f"{user}.{key}.seed{seed}"] = {**info, "top3": got["top3"], "ppl": got["ppl"]}
            row[key], row[f"ppl_{key}"] = statistics.mean(top3), statistics.mean(ppl)
            row[f"{key}_seeds"] = top3
        users[user] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        print(json.dumps({"user": user, **users[user]}), flush=True)

    batch, _ = collate_texts([Example(i, "b", texts.encode(t, max_tokens=1024)[0], np.zeros(0, np.int64), 0.0)
                              for i, t in enumerate(_texts(args.users[0], "train")[:BATCH])],
                             window=WINDOW, label_input=private.label_input)
    timing = step_times(private, plain, batch, threads=args.threads, rounds=args.rounds)
    opacus = opacus_step(args.torch_python, args.threads)
    daemon = {} if args.skip_daemon else daemon_phase(model_path, args.users[0], steps=args.daemon_steps,
                                                      threads=args.threads, pace_s=args.pace_s)
    goals = {
        u: {"eps8_within_5_points_of_nonprivate": row["nonprivate"] - row["eps8"] <= 0.05,
            "eps8_15_points_above_base": row["eps8"] - row["base"] >= 0.15} for u, row in users.items()}
    dp_vs_opacus = (round(timing["dp_step_ms"] / opacus["opacus_step_ms"], 3)
                    if "opacus_step_ms" in opacus else None)
    return {
        "users": users, "runs": runs, **timing, "dp_nondp_ratio": round(timing["dp_step_ms"] / timing["nondp_step_ms"], 3),
        "opacus_step_ms": opacus.get("opacus_step_ms"), "dp_vs_opacus": dp_vs_opacus, "opacus": opacus, **daemon,
        "goals": goals, "settings": {"steps": args.steps, "seeds": args.seeds, "batch": BATCH, "window": WINDOW,
                                     "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "clip_norm": CLIP_NORM,
                                     "learning_rate": LEARNING_RATE, "threads": args.threads,
                                     "quantized_compute": "int8", "daemon_steps": args.daemon_steps, "pace_s": args.pace_s},
        "load_before": load0, "run_s": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=lambda s: s.split(","), default=["alice", "bob", "carol"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps of every run (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the step comparison")
    parser.add_argument("--torch-python", type=Path, default=REPO / ".venv-ref" / "bin" / "python")
    parser.add_argument("--daemon-steps", type=int, default=50)
    parser.add_argument("--pace-s", type=float, default=1.0,
                        help="one generation request every this many seconds, idle and during training")
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--gguf", type=Path)
    args = parser.parse_args()
    load = LoadWatch()
    print(json.dumps(load.seal(run(args))))


if __name__ == "__main__":
    main()
