"""Training benchmark: DP-SGD step cost, clip-and-noise throughput, serving under training, memory.

On the reference encoder (:mod:`benchmarks.reference_encoder`, LoRA rank 8 on its 12
projections) at batch 16 and 64:

- ``nondp_step_ms`` / ``dp_step_ms`` / ``dp_overhead_ratio``: median time of one optimizer
  step of the plain ORT training graph vs lorad's private graph (per-example clip, secure
  noise drawn on the host, scale), same batch, same threads;
- ``opacus_step_ms`` / ``dp_vs_opacus_ratio``: the same architecture in torch with Opacus
  (hooks mode), only when torch and opacus are importable, else null;
- ``clip_noise_gbps`` / ``memcpy_gbps``: the clip-and-noise subgraph cut out of the real
  training graph, run alone as an ORT session on per-example gradients of the right size;
  bytes = per-example gradient bytes consumed per second, against numpy copying the same bytes;
- ``serving_p99_ratio_during_training``: p99 latency of single requests through
  AdapterService while training steps run as the trainer runs them by default (a child
  process at nice 10 in SCHED_IDLE, one intra-op thread, no spinning) / p99 without
  training; for contrast ``serving_p99_ratio_process_nice_only`` (the child without
  SCHED_IDLE) and ``serving_p99_ratio_training_in_thread`` (steps in a reniced thread of
  the serving process: ORT's training call holds the GIL for a whole step);
- ``peak_rss_mb``: peak resident memory of a child process that only trains (batch 64).

The top-level step figures are batch 64's; every batch's are under ``batches``.

    .venv/bin/python -m benchmarks.training [--quick]
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
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

from adapters.engine import InferenceEngine
from adapters.lora_graph import per_example_name
from adapters.registry import AdapterRegistry
from adapters.service import AdapterService
from benchmarks.timing import best_medians, median_seconds
from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from trainer.artifacts import (
    CLIP_NORM_INPUT,
    GRAD_SCALE_INPUT,
    NOISE_INPUT,
    ArtifactConfig,
    TrainingArtifacts,
    build_artifacts,
)
from trainer.dp_step import DPSettings, DPStepper
from trainer.noise import SecureNoise
from trainer.scheduler import lower_thread_priority
from trainer.stepper_process import StepperProcess

RANK = 8
BATCHES = (16, 64)
SEQ, D_MODEL, CLASSES = 16, 384, 10
_CONFIG = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=RANK, alpha=2.0 * RANK)


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, SEQ, D_MODEL)).astype(np.float32),
            "labels": rng.integers(0, CLASSES, n).astype(np.int64)}


def _median_ms(fn: Callable[[], object], n: int) -> float:
    return median_seconds(fn, n) * 1e3


def _artifacts(model: onnx.ModelProto, cache: Path, *, private: bool) -> TrainingArtifacts:
    return build_artifacts(model, ArtifactConfig(**{**_CONFIG.__dict__, "private": private}), cache_dir=cache)


def _steppers(model: onnx.ModelProto, cache: Path, batch: int, threads: int) -> tuple[DPStepper, DPStepper]:
    plain = DPStepper(_artifacts(model, cache, private=False), learning_rate=1e-3, dp=None, noise=None,
                      expected_batch_size=batch, intra_op_threads=threads)
    private = DPStepper(_artifacts(model, cache, private=True), learning_rate=1e-3,
                        dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=batch),
                        noise=SecureNoise(), intra_op_threads=threads)
    return plain, private


def measure_steps(model: onnx.ModelProto, cache: Path, *, quick: bool) -> dict[str, dict[str, Any]]:
    n, rounds = (5, 2) if quick else (15, 3)
    out = {}
    for batch in BATCHES:
        plain, private = _steppers(model, cache, batch, threads=0)
        data = _batch(batch, seed=batch)
        best = {k: v * 1e3 for k, v in best_medians(
            {"plain": lambda: plain.step(data), "private": lambda: private.step(data)}, n, rounds=rounds).items()}
        out[str(batch)] = {
            "nondp_step_ms": round(best["plain"], 2),
            "dp_step_ms": round(best["private"], 2),
            "dp_overhead_ratio": round(best["private"] / best["plain"], 3),
        }
    return out


def measure_clip_noise(model: onnx.ModelProto, cache: Path, *, quick: bool) -> dict[str, float]:
    """The production clip-and-noise subgraph, cut out of the training graph, run alone."""
    artifacts = _artifacts(model, cache, private=True)
    names = [name for name, _ in artifacts.trainable]
    inputs = [f"{per_example_name(n)}_grad" for n in names] + [CLIP_NORM_INPUT, NOISE_INPUT, GRAD_SCALE_INPUT]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip_noise.onnx"
        onnx.utils.extract_model(str(artifacts.training_model), str(path), inputs, [f"{n}_grad" for n in names],
                                 check_model=False)
        sub = onnx.load(str(path))
        assert {i.name for i in sub.graph.input} == set(inputs), "the extracted subgraph reads other tensors"
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch = 64
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {f"{per_example_name(n)}_grad": rng.normal(size=(batch, *shape)).astype(np.float32)
             for n, shape in artifacts.trainable}
    feeds[CLIP_NORM_INPUT] = np.array(1.0, np.float32)
    feeds[NOISE_INPUT] = SecureNoise().gaussian64(artifacts.noise_size, 1.0)
    feeds[GRAD_SCALE_INPUT] = np.array(1.0 / batch, np.float32)
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    out_names = [o.name for o in session.get_outputs()]
    grad_bytes = batch * artifacts.noise_size * 4
    n = 20 if quick else 100
    clip_ms = _median_ms(lambda: session.run_with_ort_values(out_names, values), n)
    src = np.concatenate([v.ravel() for k, v in feeds.items() if k.endswith("per_example_grad")])
    dst = np.empty_like(src)
    copy_ms = _median_ms(lambda: np.copyto(dst, src), n)
    clip_gbps = grad_bytes / (clip_ms / 1e3) / 1e9
    copy_gbps = grad_bytes / (copy_ms / 1e3) / 1e9
    return {"clip_noise_gbps": round(clip_gbps, 3), "memcpy_gbps": round(copy_gbps, 3),
            "clip_noise_vs_memcpy": round(clip_gbps / copy_gbps, 3),
            "clip_noise_bytes": grad_bytes}


def measure_serving_under_training(model: onnx.ModelProto, cache: Path, *, quick: bool) -> dict[str, float]:
    """p99 of single requests idle, then while training steps run as the trainer runs them
    (a child process at nice 10, one intra-op thread), and for contrast in a thread of
    this process (ORT's training call holds the GIL for a whole step)."""
    requests = 300 if quick else 1500
    artifacts = _artifacts(model, cache, private=True)
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=16)
    engine = InferenceEngine(model, targets=REFERENCE_TARGETS, rank=RANK)
    data = _batch(16, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"), cache_budget_bytes=64 << 20)
        in_thread = DPStepper(artifacts, learning_rate=1e-3, dp=dp, noise=SecureNoise(), intra_op_threads=1)
        service.install("bench", in_thread.export_adapter())
        feeds = {"x": _batch(1, seed=1)["x"]}

        def p99_ms() -> float:
            for _ in range(30):
                service.infer(feeds, "bench")
            lat = []
            for _ in range(requests):
                t0 = time.perf_counter()
                service.infer(feeds, "bench")
                lat.append(time.perf_counter() - t0)
            return float(np.percentile(lat, 99)) * 1e3

        def while_training(step: Callable[[], object], *, renice: bool) -> tuple[float, int]:
            stop, steps = threading.Event(), [0]

            def train() -> None:
                if renice:
                    lower_thread_priority(10)  # as trainer.scheduler's worker does
                while not stop.is_set():
                    step()
                    steps[0] += 1

            thread = threading.Thread(target=train, name="bench-trainer")
            thread.start()
            try:
                while steps[0] < 2:  # training really running before measuring
                    time.sleep(0.01)
                return p99_ms(), steps[0]
            finally:
                stop.set()
                thread.join()

        idle = p99_ms()
        # As the trainer runs by default (trainer.isolate, trainer.sched_idle, niceness 10).
        with StepperProcess(artifacts, learning_rate=1e-3, dp=dp, noise_seed=None, intra_op_threads=1,
                            niceness=10, idle_class=True) as isolated:
            busy, steps = while_training(lambda: isolated.step(data), renice=False)
        with StepperProcess(artifacts, learning_rate=1e-3, dp=dp, noise_seed=None, intra_op_threads=1,
                            niceness=10) as isolated:
            nice_only, _ = while_training(lambda: isolated.step(data), renice=False)
        threaded, _ = while_training(lambda: in_thread.step(data), renice=True)
    return {"serving_p99_ms_idle": round(idle, 3), "serving_p99_ms_during_training": round(busy, 3),
            "serving_p99_ratio_during_training": round(busy / idle, 3), "training_steps_during": steps,
            "serving_p99_ratio_process_nice_only": round(nice_only / idle, 3),
            "serving_p99_ratio_training_in_thread": round(threaded / idle, 3)}


def _peak_rss_child(cache: Path, steps: int) -> None:
    model = build_reference_encoder()
    stepper = _steppers(model, cache, 64, threads=0)[1]
    data = _batch(64, seed=3)
    for _ in range(steps):
        stepper.step(data)
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measure_peak_rss(cache: Path, *, quick: bool) -> float:
    cmd = [sys.executable, "-m", "benchmarks.training", "--rss-child", str(cache), "--steps", "5" if quick else "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def measure_opacus(model: onnx.ModelProto, *, quick: bool) -> dict[str, float] | None:
    try:
        from benchmarks import _opacus_reference
    except ImportError:
        return None  # torch or opacus not installed: the figures are null
    n = 5 if quick else 15
    return {str(b): _opacus_reference.step_ms(model, batch=b, rank=RANK, repeats=n) for b in BATCHES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        _peak_rss_child(args.rss_child, args.steps)
        return
    model = build_reference_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "artifacts"
        steps = measure_steps(model, cache, quick=args.quick)
        print("steps: " + json.dumps(steps), flush=True)
        clip = measure_clip_noise(model, cache, quick=args.quick)
        print("clip-and-noise: " + json.dumps(clip), flush=True)
        serving = measure_serving_under_training(model, cache, quick=args.quick)
        print("serving: " + json.dumps(serving), flush=True)
        rss = measure_peak_rss(cache, quick=args.quick)
    opacus = measure_opacus(model, quick=args.quick)
    for b, figures in steps.items():
        o = opacus.get(b) if opacus else None
        figures["opacus_step_ms"] = round(o, 2) if o else None
        figures["dp_vs_opacus_ratio"] = round(figures["dp_step_ms"] / o, 3) if o else None
    top: dict[str, Any] = dict(steps["64"])
    summary = {
        **top,
        **{f"{k}_batch16": v for k, v in steps["16"].items()},
        **clip,
        **serving,
        "peak_rss_mb": rss,
        "batches": steps,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ort": ort.__version__, "quick": args.quick, "rank": RANK, "step_intra_op_threads": "ort default"},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
