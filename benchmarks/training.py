"""Training benchmark: both training backends side by side, against Opacus.

On the reference encoder (:mod:`benchmarks.reference_encoder`, LoRA rank 8 on its 12
projections) at batch 16 and 64, for each backend (``backends.portable`` on the current
onnxruntime of this environment; ``backends.ort-training`` measured by the same script in
``.venv-ort-training``, where onnxruntime-training 1.19.2 lives, when that venv exists):

- ``nondp_step_ms`` / ``dp_step_ms`` / ``dp_overhead_ratio``: median time of one optimizer
  step of the backend's plain graph vs its private graph (per-example clip, secure noise
  drawn on the host, scale), same batch, same threads, interleaved;
- ``opacus_step_ms`` / ``dp_vs_opacus_ratio``: the same architecture in torch with Opacus
  (hooks mode, as many threads as ORT's default pool), run by the torch environment
  (``--torch-python``, default /work/tv/bin/python) in a child process; null without it;
- ``clip_noise_gbps`` / ``memcpy_gbps`` / ``clip_noise_vs_memcpy``: the backend's
  clip-and-noise subgraph cut out of its real step graph, run alone on per-example
  gradients of the right size (bytes consumed per second), against numpy copying them;
- ``serving_p99_ratio_during_training``: p99 latency of single requests through
  AdapterService while at least 50 DP steps (batch 16) run as the trainer runs them by
  default (a child process at nice 10 in SCHED_IDLE, one intra-op thread) / p99 idle;
- ``peak_rss_mb``: peak resident memory of a child process that only trains (batch 64).

The ort-training child also times the portable backend on ORT 1.19.2 in its own process
(``portable_vs_ort_training_dp_step``: the two backends in ONE process and runtime), which
is what ``trainer.backend: auto`` is chosen from. Top-level keys are the default backend's
(portable) at batch 64, ``*_batch16`` at 16. The machine may be shared: compare ratios
measured within one run, not absolute times across runs.

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
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
from benchmarks.timing import best_medians, median_seconds
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.lora_graph import per_example_name
from lorad.adapters.registry import AdapterRegistry
from lorad.adapters.service import AdapterService
from lorad.trainer.artifacts import (
    CLIP_NORM_INPUT,
    GRAD_SCALE_INPUT,
    NOISE_INPUT,
    ArtifactConfig,
    Backend,
    TrainingArtifacts,
    build_artifacts,
)
from lorad.trainer.backends import open_stepper
from lorad.trainer.dp_step import DPSettings
from lorad.trainer.noise import SecureNoise
from lorad.trainer.portable_graph import GRAD_OUTPUT, per_example_flat
from lorad.trainer.stepper_process import StepperProcess

RANK = 8
BATCHES = (16, 64)
SEQ, D_MODEL, CLASSES = 16, 384, 10
_CONFIG = ArtifactConfig(targets=tuple(REFERENCE_TARGETS), rank=RANK, alpha=2.0 * RANK)


def _batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, SEQ, D_MODEL)).astype(np.float32),
            "labels": rng.integers(0, CLASSES, n).astype(np.int64)}


def _median_ms(fn: Any, n: int) -> float:
    return median_seconds(fn, n) * 1e3


def _artifacts(model: onnx.ModelProto, cache: Path, backend: Backend, *, private: bool) -> TrainingArtifacts:
    return build_artifacts(model, ArtifactConfig(**{**_CONFIG.__dict__, "private": private}), cache_dir=cache,
                           backend=backend)


def _steppers(model: onnx.ModelProto, cache: Path, backend: Backend, batch: int, threads: int) -> tuple[Any, Any]:
    plain = open_stepper(_artifacts(model, cache, backend, private=False), learning_rate=1e-3, dp=None, noise=None,
                         expected_batch_size=batch, intra_op_threads=threads)
    private = open_stepper(_artifacts(model, cache, backend, private=True), learning_rate=1e-3,
                           dp=DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=batch),
                           noise=SecureNoise(), intra_op_threads=threads)
    return plain, private


def measure_steps(model: onnx.ModelProto, cache: Path, backends: tuple[Backend, ...], *,
                  quick: bool) -> dict[str, dict[str, dict[str, Any]]]:
    """Per backend and batch: plain and private step times, all interleaved in one loop."""
    n, rounds = (5, 2) if quick else (7, 2)
    out: dict[str, dict[str, dict[str, Any]]] = {b: {} for b in backends}
    for batch in BATCHES:
        data = _batch(batch, seed=batch)
        fns = {}
        for backend in backends:
            plain, private = _steppers(model, cache, backend, batch, threads=0)
            fns[f"{backend}/plain"] = (lambda s=plain, d=data: s.step(d))
            fns[f"{backend}/private"] = (lambda s=private, d=data: s.step(d))
        best = {k: v * 1e3 for k, v in best_medians(fns, n, rounds=rounds).items()}
        for backend in backends:
            plain_ms, dp_ms = best[f"{backend}/plain"], best[f"{backend}/private"]
            out[backend][str(batch)] = {"nondp_step_ms": round(plain_ms, 2), "dp_step_ms": round(dp_ms, 2),
                                        "dp_overhead_ratio": round(dp_ms / plain_ms, 3)}
    return out


def _clip_noise_subgraph(artifacts: TrainingArtifacts) -> tuple[bytes, dict[str, tuple[int, ...]]]:
    """The clip-and-noise part of the backend's step graph: per-example gradients in, the
    optimizer's gradient out."""
    names = [name for name, _ in artifacts.trainable]
    shapes: dict[str, tuple[int, ...]] = {n: (int(np.prod(shape)),) for n, shape in artifacts.trainable}
    grads: dict[str, tuple[int, ...]]
    if artifacts.backend == "portable":
        grads = {per_example_flat(n): shapes[n] for n in names}
        source, outputs = artifacts.step_model, [GRAD_OUTPUT]
    else:
        grads = {f"{per_example_name(n)}_grad": shape for n, shape in artifacts.trainable}
        source, outputs = artifacts.training_model, [f"{n}_grad" for n in names]
    inputs = [*grads, CLIP_NORM_INPUT, NOISE_INPUT, GRAD_SCALE_INPUT]
    sub = _cut(onnx.load(str(source)), inputs, outputs)
    assert {i.name for i in sub.graph.input} == set(inputs), "the extracted subgraph reads other tensors"
    return sub.SerializeToString(), grads


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names an If/Loop body reads (onnx.utils.extract_model misses them)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            made = {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
            for n in g.node:
                names |= {i for i in n.input if i and i not in made} | _subgraph_reads(n)
    return names


def _cut(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (and constants)."""
    graph = model.graph
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    needed, todo, keep = set(inputs), list(outputs), set()
    while todo:
        name = todo.pop()
        if name in needed or name not in producer:
            continue
        needed.add(name)
        k = producer[name]
        if k not in keep:
            keep.add(k)
            node = graph.node[k]
            todo.extend(i for i in [*node.input, *_subgraph_reads(node)] if i)
    nodes = [n for k, n in enumerate(graph.node) if k in keep]
    used = {i for n in nodes for i in [*n.input, *_subgraph_reads(n)]}
    infos = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    known = onnx.shape_inference.infer_shapes(model)
    infos.update({v.name: v for v in known.graph.value_info})
    sub = onnx.helper.make_graph(nodes, "cut", [infos[i] for i in inputs], [infos[o] for o in outputs],
                                 initializer=[i for i in graph.initializer if i.name in used])
    out = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def measure_clip_noise(model: onnx.ModelProto, cache: Path, backend: Backend, *, quick: bool) -> dict[str, float]:
    artifacts = _artifacts(model, cache, backend, private=True)
    graph, grads = _clip_noise_subgraph(artifacts)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    batch = 64
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {k: rng.normal(size=(batch, *shape)).astype(np.float32) for k, shape in grads.items()}
    feeds[CLIP_NORM_INPUT] = np.array(1.0, np.float32)
    feeds[NOISE_INPUT] = SecureNoise().gaussian64(artifacts.noise_size, 1.0)
    feeds[GRAD_SCALE_INPUT] = np.array(1.0 / batch, np.float32)
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    out_names = [o.name for o in session.get_outputs()]
    grad_bytes = batch * artifacts.noise_size * 4
    n = 20 if quick else 100
    src = np.concatenate([feeds[k].ravel() for k in grads])
    dst = np.empty_like(src)
    best = best_medians({"clip": lambda: session.run_with_ort_values(out_names, values),
                         "copy": lambda: np.copyto(dst, src)}, n, rounds=2)
    clip_gbps = grad_bytes / best["clip"] / 1e9
    copy_gbps = grad_bytes / best["copy"] / 1e9
    return {"clip_noise_gbps": round(clip_gbps, 3), "memcpy_gbps": round(copy_gbps, 3),
            "clip_noise_vs_memcpy": round(clip_gbps / copy_gbps, 3), "clip_noise_bytes": grad_bytes}


def measure_serving_under_training(model: onnx.ModelProto, cache: Path, backend: Backend, *,
                                   quick: bool) -> dict[str, float]:
    """p99 of single requests idle, then while DP steps run as the trainer runs them (a
    child process at nice 10 in SCHED_IDLE, one intra-op thread), over >= 50 steps."""
    min_requests, min_steps, limit_s = (300, 10, 120.0) if quick else (1500, 50, 240.0)
    artifacts = _artifacts(model, cache, backend, private=True)
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=16)
    engine = InferenceEngine(model, targets=REFERENCE_TARGETS, rank=RANK)
    data = _batch(16, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        service = AdapterService(engine, AdapterRegistry(Path(tmp) / "adapters"), cache_budget_bytes=64 << 20)
        exporter = open_stepper(artifacts, learning_rate=1e-3, dp=dp, noise=SecureNoise(), intra_op_threads=1)
        service.install("bench", exporter.export_adapter())
        feeds = {"x": _batch(1, seed=1)["x"]}

        def one() -> float:
            t0 = time.perf_counter()
            service.infer(feeds, "bench")
            return time.perf_counter() - t0

        for _ in range(30):
            one()
        idle = float(np.percentile([one() for _ in range(min_requests)], 99)) * 1e3
        stop, steps = threading.Event(), [0]
        with StepperProcess(artifacts, learning_rate=1e-3, dp=dp, noise_seed=None, intra_op_threads=1,
                            niceness=10, idle_class=True) as isolated:
            def train() -> None:
                while not stop.is_set():
                    isolated.step(data)
                    steps[0] += 1

            thread = threading.Thread(target=train, name="bench-trainer")
            thread.start()
            try:
                while steps[0] < 1:  # training really running before measuring
                    time.sleep(0.01)
                start, first = time.monotonic(), steps[0]
                lat: list[float] = []
                while (len(lat) < min_requests or steps[0] - first < min_steps) and time.monotonic() - start < limit_s:
                    lat.append(one())
                during = steps[0] - first
            finally:
                stop.set()
                thread.join()
    busy = float(np.percentile(lat, 99)) * 1e3
    return {"serving_p99_ms_idle": round(idle, 3), "serving_p99_ms_during_training": round(busy, 3),
            "serving_p99_ratio_during_training": round(busy / idle, 3), "training_steps_during": during,
            "serving_requests_during": len(lat)}


def _peak_rss_child(cache: Path, backend: Backend, steps: int) -> None:
    model = build_reference_encoder()
    stepper = _steppers(model, cache, backend, 64, threads=0)[1]
    data = _batch(64, seed=3)
    for _ in range(steps):
        stepper.step(data)
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def _repo() -> Path:
    return Path(__file__).resolve().parent.parent


def measure_peak_rss(cache: Path, backend: Backend, *, quick: bool) -> float:
    cmd = [sys.executable, "-m", "benchmarks.training", "--rss-child", str(cache), "--backend", backend,
           "--steps", "5" if quick else "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True, cwd=_repo())
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def measure_opacus(torch_python: Path, *, quick: bool) -> dict[str, float] | None:
    if not torch_python.exists():
        return None  # no torch environment: the figures are null
    cmd = [str(torch_python), "-m", "benchmarks._opacus_reference", "--batches", *map(str, BATCHES),
           "--rank", str(RANK), "--repeats", "5" if quick else "15"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True, cwd=_repo(),
                          env={**os.environ, "PYTHONPATH": str(_repo())})
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_backend(model: onnx.ModelProto, cache: Path, backend: Backend, *, quick: bool,
                    compare_with: tuple[Backend, ...] = ()) -> dict[str, Any]:
    """Everything for one backend in this process (and, interleaved, the step times of
    ``compare_with`` on the same runtime)."""
    steps = measure_steps(model, cache, (backend, *compare_with), quick=quick)
    print(f"{backend} steps: " + json.dumps(steps), flush=True)
    figures: dict[str, Any] = {"batches": steps[backend]}
    figures.update(measure_clip_noise(model, cache, backend, quick=quick))
    figures.update(measure_serving_under_training(model, cache, backend, quick=quick))
    figures["peak_rss_mb"] = measure_peak_rss(cache, backend, quick=quick)
    figures["ort"] = ort.__version__
    for other in compare_with:
        figures[f"{other}_on_this_runtime"] = steps[other]
    print(f"{backend}: " + json.dumps(figures), flush=True)
    return figures


def _ort_training_child(venv: Path, *, quick: bool) -> dict[str, Any] | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    cmd = [str(python), "-m", "benchmarks.training", "--backend-child", "ort-training"] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True, cwd=_repo())
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--torch-python", type=Path, default=Path("/work/tv/bin/python"),
                        help="python of an environment with torch and opacus (default: %(default)s)")
    parser.add_argument("--ort-training-venv", type=Path, default=_repo() / ".venv-ort-training",
                        help="venv with onnxruntime-training for the ort-training backend (default: %(default)s)")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend-child", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="portable", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        _peak_rss_child(args.rss_child, args.backend, args.steps)
        return
    model = build_reference_encoder()
    if args.backend_child is not None:  # in .venv-ort-training: ort-training, and portable on ORT 1.19 beside it
        with tempfile.TemporaryDirectory() as tmp:
            figures = measure_backend(model, Path(tmp) / "artifacts", "ort-training", quick=args.quick,
                                      compare_with=("portable",))
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory() as tmp:
        backends: dict[str, Any] = {"portable": measure_backend(model, Path(tmp) / "artifacts", "portable",
                                                                quick=args.quick)}
    ort_training = _ort_training_child(args.ort_training_venv, quick=args.quick)
    if ort_training is not None:
        backends["ort-training"] = ort_training
        beside = ort_training["portable_on_this_runtime"]
        ort_training["portable_vs_ort_training_dp_step"] = {
            b: round(beside[b]["dp_step_ms"] / ort_training["batches"][b]["dp_step_ms"], 3) for b in beside}
    opacus = measure_opacus(args.torch_python, quick=args.quick)
    for figures in backends.values():
        for b, per_batch in figures["batches"].items():
            o = opacus.get(b) if opacus else None
            per_batch["opacus_step_ms"] = round(o, 2) if o else None
            per_batch["dp_vs_opacus_ratio"] = round(per_batch["dp_step_ms"] / o, 3) if o else None
    default = backends["portable"]
    summary = {
        "backend": "portable",
        **default["batches"]["64"],
        **{f"{k}_batch16": v for k, v in default["batches"]["16"].items()},
        **{k: v for k, v in default.items() if k != "batches"},
        "backends": backends,
        "models": {"minilm": None},  # hook: issue-8b adds MiniLM here
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_1min": round(os.getloadavg()[0], 2), "quick": args.quick, "rank": RANK,
                    "step_intra_op_threads": "ort default", "opacus_threads": os.cpu_count()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
