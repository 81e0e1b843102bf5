"""Quantised bases: fp32 vs int8 vs int4, on MiniLM (examples/intents) and the exported test encoders.

Each base model is quantised with ``lorad.adapters.quantize.quantize_model`` (ONNX Runtime's
MatMulNBits quantiser at its default block: 128 for int8, 32 for int4; int4 also quantises
the embedding tables), and the three files of one model are compared in one process, on the
same threads:

- ``latency_ms_seq{32,128}_b{1,8}``: process CPU time of one ``InferenceEngine.run`` (the
  served graph, LoRA slots at zero; ``model.quantized_compute`` at its default, int8), the
  three bases called in a random order in every round, median over rounds. CPU time, not
  wall time: this machine is shared, and a preempted call would count another process's
  work. A model with a position table shorter than the sequence (``max_positions``: the
  tiny BERT has 32) is timed at ``min(seq, max_positions)`` under the same key;
- ``bytes``: size of the model file;
- ``rss_mb`` / ``vm_rss_mb``: VmHWM / VmRSS of a real ``lorad serve`` on that base after a
  few /infer requests (before any training);
- ``cos_to_fp32`` / ``cos_to_fp32_mean``: min / mean over rows of the cosine to the fp32
  base's output: MiniLM's ``sentence_embedding`` of alice's test texts through the daemon,
  the exported encoders' ``logits`` for seeded random tokens through the engine.

MiniLM only (the exported encoders have no task: null), each through a daemon on that base
with the shipped ``examples/intents/lorad.yaml`` (model path, threads and noise replaced),
on alice's held-out ``test.jsonl`` (26 texts: one text is 3.8 points):

- ``acc_base``: the base model's head; ``acc_alice_peft``: alice's shipped PEFT adapter;
- ``acc_alice_dp8``: the adapter alice's on-device DP run (ε = 8) trains on this base,
  scored whether or not the validation gate accepted it (as benchmarks.personalisation does);
- ``acc_alice_dp8_fp32_trained``: the adapter the same run trained on the fp32 base, served
  on this base: exported, its ``lorad.base_fingerprint`` removed (lorad refuses an adapter
  recorded for another base; a user would bring it as plain PEFT files) and uploaded;
- ``gain_train_on_quantised``: ``acc_alice_dp8 - acc_alice_dp8_fp32_trained`` (int8, int4).

The DP runs use seeded noise (``trainer.testing``; the same draws for the three bases of one
seed, so the comparison between bases is paired); ``--seeds N`` repeats them with noise
seeds 0..N-1 and averages. Accuracies are fractions; drops are in percentage points.

``dynamic_int8_minilm``: the int8 lorad does not use, ONNX Runtime's ``quantize_dynamic``,
and lorad's int8 at block 32, against fp32 and lorad's int8 (block 128) as bare sessions:
``latency_ms_seq128_b1``, ``speedup_vs_fp32``, ``cos_to_fp32`` and ``batch_drift`` (a row's
embedding in a batch of 8 against alone). ``--only-bare`` measures this part alone.

The last line is one JSON object: ``models.<m>.<q>.{latency_ms_seq32_b1, latency_ms_seq32_b8,
latency_ms_seq128_b1, latency_ms_seq128_b8, bytes, rss_mb, vm_rss_mb, cos_to_fp32,
cos_to_fp32_mean, max_positions, acc_base, acc_alice_peft, acc_alice_dp8,
acc_alice_dp8_fp32_trained, gain_train_on_quantised, dp8_statuses, dp8_run_s}`` for m in
minilm, encoder_torchscript_17, bert_optimum_17 and q in fp32, int8, int4; ``goals`` (the
issue's: ``int8_speedup_seq128_b1`` = MiniLM fp32 / int8 latency, ≥ 1.5 with
``int8_acc_drop_points`` ≤ 1; ``int4_bytes_ratio`` ≤ 0.2 with ``int4_acc_drop_points`` ≤ 2; a
drop is the worse of acc_alice_dp8's and acc_alice_peft's, the booleans computed), ``threads``,
``seeds``, ``quick``, and ``loadavg`` and ``verdicts_withheld`` (benchmarks/load.py: the
verdicts are null when the load was above 1.5 per core).

    .venv/bin/python -m benchmarks.quantised [--quick] [--seeds 1] [--threads 1] [--only-bare]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml

from benchmarks.intents_model import INTENTS, build_intents_model
from benchmarks.load import LoadWatch
from benchmarks.personalisation import Daemon, _accuracy, _jsonl, _train, _upload
from benchmarks.timing import cpu_medians
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.input_domains import input_domains
from lorad.adapters.peft_format import CONFIG_FILE, read_peft_dir, without_base_record
from lorad.adapters.quantize import quantize_model

REPO = Path(__file__).resolve().parents[1]
EXPORTED = REPO / "tests" / "data" / "exported"
#: model key -> (fp32 file or None for the built MiniLM, PEFT adapter whose target_modules are the targets)
ENCODERS = {"encoder_torchscript_17": (EXPORTED / "encoder_torchscript_17.onnx", EXPORTED / "peft_encoder_head"),
            "bert_optimum_17": (EXPORTED / "bert_optimum_17.onnx", EXPORTED / "peft_bert")}
QUANTS = ("fp32", "int8", "int4")
SHAPES = ((32, 1), (32, 8), (128, 1), (128, 8))  # (seq, batch)
EPSILON = 8.0
USER = "alice"
COS_ROWS = 32


# ---------------------------------------------------------------- models


def _max_positions(model: onnx.ModelProto) -> int | None:
    """Rows of the position table: a constant 2-D Gather table whose indices do not come
    from a graph input (the word and token-type tables are indexed by input_ids and
    token_type_ids); None: the model has none (no limit from it)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = {i.name for i in graph.input} - set(inits)
    producer = {out: node for node in graph.node for out in node.output}
    rows = []
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        source, seen = node.input[1], set()
        # Follow first operands back (Cast, Unsqueeze, Range, Slice ...) to where the ids start.
        while source in producer and producer[source].input and source not in seen:
            seen.add(source)
            source = producer[source].input[0]
        if source not in inputs:
            rows.append(int(inits[node.input[0]].dims[0]))
    return min(rows) if rows else None


def _quantise(fp32: Path, out_dir: Path, stem: str) -> dict[str, Path]:
    model = onnx.load(str(fp32))
    paths = {"fp32": fp32}
    for q in ("int8", "int4"):
        paths[q] = out_dir / f"{stem}-{q}.onnx"
        onnx.save(quantize_model(model, q), str(paths[q]))
    return paths


def _peft_targets(adapter_dir: Path) -> tuple[list[str], int]:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    return list(config["target_modules"]), int(config["r"])


# ---------------------------------------------------------------- the int8 lorad does not use


def measure_dynamic_int8(fp32: Path, int8: Path, work: Path, *, threads: int, quick: bool) -> dict[str, Any]:
    """Why int8 is MatMulNBits at block 128: MiniLM as bare ONNX Runtime sessions (no LoRA) at
    fp32, as lorad's int8 (block 128, the default, and 32), and as
    ``onnxruntime.quantization.quantize_dynamic`` writes it (MatMulInteger, per-channel
    weights, activations scaled per tensor): latency at seq 128 batch 1 (interleaved as
    above), ``cos_to_fp32`` (min over the batch of 8) and ``batch_drift``, the largest
    difference between a row's ``sentence_embedding`` computed in a batch of 8 and alone."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # lorad's int8 at block 32 too: what the default block of 128 is chosen against.
    block32 = work / "minilm-int8-block32.onnx"
    onnx.save(quantize_model(onnx.load(str(fp32)), "int8", block=32), str(block32))
    dynamic = work / "minilm-int8-dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, extra_options={"MatMulConstBOnly": True})
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for k, p in (("fp32", fp32), ("int8", int8), ("int8_block32", block32), ("int8_dynamic", dynamic))}
    rng = np.random.default_rng(5)

    def feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
        return {"input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64)}

    one, eight = feeds(1, 128), feeds(8, 32)
    medians = cpu_medians({k: functools.partial(s.run, ["sentence_embedding"], one) for k, s in sessions.items()},
                           rounds=2 if quick else 15, reps=1 if quick else 3, seed=5)
    drift, cos = {}, {}
    reference = sessions["fp32"].run(["sentence_embedding"], eight)[0]
    for k, session in sessions.items():
        batched = session.run(["sentence_embedding"], eight)[0]
        cos[k] = round(float(_cosines(batched, reference).min()), 6)
        alone = np.concatenate([session.run(["sentence_embedding"], {n: v[i:i + 1] for n, v in eight.items()})[0]
                                for i in range(8)])
        drift[k] = float(np.abs(batched - alone).max())
    return {"latency_ms_seq128_b1": {k: round(v * 1e3, 3) for k, v in medians.items()},
            "speedup_vs_fp32": {k: round(medians["fp32"] / v, 3) for k, v in medians.items()},
            "cos_to_fp32": cos, "batch_drift": drift}


# ---------------------------------------------------------------- in-process: latency and logits


def _feeds(engine: InferenceEngine, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded token ids within the model's vocabulary (id 0 is usually padding: from 1),
    an all-ones mask, zero token types."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in engine.inputs:
        if spec.name == "input_ids":
            domain = engine.input_domains.get(spec.name)
            top = domain.high if domain is not None else 99
            feeds[spec.name] = rng.integers(1, top + 1, (batch, seq)).astype(np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, seq), np.int64)
        else:
            feeds[spec.name] = np.zeros((batch, seq), np.int64)
    return feeds


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def measure_engines(paths: Mapping[str, Path], targets: list[str], rank: int, *, threads: int, quick: bool,
                    seed: int, cos: bool) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Latency per shape (and, with ``cos``, cosine of logits to fp32) of the three bases."""
    max_pos = _max_positions(onnx.load(str(paths["fp32"])))
    # One thread, no spinning: a spinning pool burns CPU time waiting, which would count.
    engines = {q: InferenceEngine(p, targets=targets, rank=rank, intra_op_threads=threads,
                                  allow_spinning=False) for q, p in paths.items()}
    tiny = paths["fp32"].stat().st_size < (1 << 20)  # the test encoders: a call is ~0.1 ms, repeat it more
    rounds = 2 if quick else 15
    reps = (2 if quick else 20) if tiny else (1 if quick else 3)
    out: dict[str, dict[str, Any]] = {q: {"max_positions": max_pos} for q in paths}
    shape_feeds = {}
    for seq, batch in SHAPES:
        used = seq if max_pos is None else min(seq, max_pos)
        shape_feeds[(seq, batch)] = _feeds(engines["fp32"], batch, used, seed=seq * 10 + batch)
    calls = {f"{q}|{seq}|{batch}": (lambda e=e, f=f: e.run(f))
             for (seq, batch), f in shape_feeds.items() for q, e in engines.items()}
    medians = cpu_medians(calls, rounds=rounds, reps=reps, seed=seed)
    for key, seconds in medians.items():
        q, seq_text, batch_text = key.split("|")
        out[q][f"latency_ms_seq{seq_text}_b{batch_text}"] = round(seconds * 1e3, 4)
    if cos:
        feeds = _feeds(engines["fp32"], COS_ROWS, 128 if max_pos is None else min(128, max_pos), seed=seed + 1)
        logits = {q: e.run(feeds)["logits"] for q, e in engines.items()}
        for q in paths:
            c = _cosines(logits[q], logits["fp32"])
            out[q]["cos_to_fp32"], out[q]["cos_to_fp32_mean"] = round(float(c.min()), 6), round(float(c.mean()), 6)
    return out, max_pos


# ---------------------------------------------------------------- daemons


def _rss(pid: int) -> dict[str, float]:
    """VmHWM (peak) and VmRSS of a process, MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(int(fields["VmHWM"].split()[0]) / 1024, 1),
            "vm_rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1)}


def _intents_config(work: Path, model: Path, tag: str, *, seed: int, steps: int | None, threads: int) -> Path:
    """The shipped intents config on ``model``, at ε = 8, with seeded noise ``seed``."""
    config = yaml.safe_load((INTENTS / "lorad.yaml").read_text())
    config.pop("state_dir", None)
    config["model"]["path"] = str(model)
    config["model"]["intra_op_threads"] = threads
    trainer = config["trainer"]
    # Seeded noise (test mode): the three bases of one seed get the same draws, so their
    # difference is the base's, not the noise's. No scheduler: only the run started here.
    trainer.update(testing=True, noise="seeded", noise_seed=seed, schedule=False)
    defaults = trainer.setdefault("defaults", {})
    defaults["target_epsilon"] = EPSILON
    if steps is not None:  # --quick: the whole path (artifacts, steps, gate, export) in one step
        defaults.update(steps=steps, epochs=None)
    path = work / f"lorad-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _encoder_config(work: Path, model: Path, tag: str, targets: list[str], rank: int, threads: int) -> Path:
    config = {"model": {"name": tag.split("-")[0], "path": str(model), "targets": targets, "rank": rank,
                        "intra_op_threads": threads},
              "trainer": {"enabled": False}}
    path = work / f"lorad-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _infer(daemon: Daemon, inputs: list[dict[str, Any]], outputs: list[str],
           adapter: str | None = None) -> dict[str, np.ndarray]:
    doc: dict[str, Any] = {"inputs": inputs, "outputs": [{"name": n} for n in outputs]}
    if adapter is not None:
        doc["parameters"] = {"adapter": adapter}
    got = daemon.call("POST", f"/v2/models/{daemon.model}/infer", doc)
    return {o["name"]: np.asarray(o["data"], np.float64).reshape(o["shape"]) for o in got["outputs"]}


def _embeddings(daemon: Daemon, texts: list[str]) -> np.ndarray:
    return _infer(daemon, [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
                  ["sentence_embedding"])["sentence_embedding"]


def _trained_files(daemon: Daemon, state: Path, result: Mapping[str, Any]) -> dict[str, bytes] | None:
    """The PEFT files of the adapter a run trained: the served version if the gate accepted
    it (``loractl adapters export``), else the candidate the gate kept aside."""
    if result["status"] == "accepted":
        _, data = daemon.client.fetch(f"/v2/models/{daemon.model}/adapters/{USER}/files", accept="application/x-tar",
                                      auth=True)
        files = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if (content := tar.extractfile(member)) is not None:
                    files[member.name] = content.read()
        return files
    if result["status"] == "rejected":
        return read_peft_dir(state / "trainer" / "rejected" / USER / str(result["run_id"]))
    return None


def minilm_daemon_run(work: Path, q: str, model: Path, *, seed: int, first: bool, steps: int | None, threads: int,
                      train: list[dict[str, Any]], test: list[dict[str, Any]],
                      fp32_trained: Path | None) -> dict[str, Any]:
    """One daemon on one base for one noise seed: (first seed) base, PEFT, embeddings and
    RSS; alice's DP run and its adapter's accuracy; the fp32-trained adapter's accuracy;
    (fp32) that adapter, written as plain PEFT files to ``work/alice-dp8-fp32-seed<seed>``."""
    state = work / f"minilm-{q}-seed{seed}"
    daemon = Daemon(_intents_config(work, model, f"minilm-{q}-seed{seed}", seed=seed, steps=steps, threads=threads),
                    state)
    out: dict[str, Any] = {}
    try:
        if first:
            out["acc_base"] = _accuracy(daemon, test, None)
            _upload(daemon, f"{USER}-peft", INTENTS / "adapters" / USER)
            out["acc_alice_peft"] = _accuracy(daemon, test, f"{USER}-peft")
            out["embeddings"] = _embeddings(daemon, [t["text"] for t in test])
            out.update(_rss(daemon.proc.pid))  # served a few requests, nothing trained yet
        result, seconds = _train(daemon, USER, train)
        out["status"], out["run_s"] = result["status"], round(seconds, 1)
        if result["status"] == "accepted":
            out["acc_alice_dp8"] = _accuracy(daemon, test, USER)
        elif result["status"] == "rejected":  # the candidate, kept aside by the gate
            _upload(daemon, f"{USER}-candidate", state / "trainer" / "rejected" / USER / str(result["run_id"]))
            out["acc_alice_dp8"] = _accuracy(daemon, test, f"{USER}-candidate")
        else:
            out["acc_alice_dp8"], out["reason"] = float("nan"), result.get("reason")
        if q == "fp32":
            files = _trained_files(daemon, state, result)
            if files is not None:
                fp32_trained = work / f"{USER}-dp8-fp32-seed{seed}"
                fp32_trained.mkdir(exist_ok=True)
                for name, data in without_base_record(files).items():
                    (fp32_trained / name).write_bytes(data)
                out["fp32_trained"] = fp32_trained
        if fp32_trained is not None:
            _upload(daemon, f"{USER}-fp32-trained", fp32_trained)
            out["acc_alice_dp8_fp32_trained"] = _accuracy(daemon, test, f"{USER}-fp32-trained")
        else:
            out["acc_alice_dp8_fp32_trained"] = float("nan")
    finally:
        daemon.stop()
    return out


def encoder_daemon_rss(work: Path, m: str, q: str, model: Path, targets: list[str], rank: int, *, threads: int,
                       max_pos: int | None) -> dict[str, float]:
    daemon = Daemon(_encoder_config(work, model, f"{m}-{q}", targets, rank, threads), work / f"{m}-{q}")
    try:
        proto = onnx.load(str(model))
        inits = {i.name for i in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in inits]
        domain = input_domains(proto).get("input_ids")
        seq = 128 if max_pos is None else min(128, max_pos)
        rng = np.random.default_rng(0)
        for _ in range(3):
            ids = rng.integers(1, (domain.high if domain is not None else 31) + 1, (8, seq))
            data = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            inputs = [{"name": n, "datatype": "INT64", "shape": [8, seq],
                       "data": data.get(n, np.zeros_like(ids)).ravel().tolist()} for n in names]
            _infer(daemon, inputs, ["logits"])
        return _rss(daemon.proc.pid)
    finally:
        daemon.stop()


# ---------------------------------------------------------------- summary


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not np.isnan(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def _drop_points(fp32: Mapping[str, Any], q: Mapping[str, Any]) -> float | None:
    """Percentage points lost from fp32: the worse of the DP adapter's and the PEFT adapter's."""
    drops = [100 * (fp32[k] - q[k]) for k in ("acc_alice_dp8", "acc_alice_peft")
             if fp32.get(k) is not None and q.get(k) is not None]
    return round(max(drops), 2) if drops else None


def goals(minilm: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    fp32, int8, int4 = minilm["fp32"], minilm["int8"], minilm["int4"]
    speedup = round(fp32["latency_ms_seq128_b1"] / int8["latency_ms_seq128_b1"], 3)
    ratio = round(int4["bytes"] / fp32["bytes"], 4)
    drop8, drop4 = _drop_points(fp32, int8), _drop_points(fp32, int4)
    ok8 = None if drop8 is None else drop8 <= 1.0
    ok4 = None if drop4 is None else drop4 <= 2.0
    return {"int8_speedup_seq128_b1": speedup, "int8_acc_drop_points": drop8,
            "int4_bytes_ratio": ratio, "int4_acc_drop_points": drop4,
            "int8_speedup_ok": speedup >= 1.5, "int8_accuracy_ok": ok8,
            "int4_bytes_ok": ratio <= 0.2, "int4_accuracy_ok": ok4,
            "int8_met": speedup >= 1.5 and ok8 is True, "int4_met": ratio <= 0.2 and ok4 is True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 latency rounds, DP runs of 1 step")
    parser.add_argument("--seeds", type=int, default=1, help="DP runs per base, noise seeds 0..N-1 (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, engines and daemons (default 1)")
    parser.add_argument("--only-bare", action="store_true",
                        help="only dynamic_int8_minilm (bare sessions: fp32, int8 at blocks 128 and 32, dynamic int8)")
    args = parser.parse_args(argv)
    load = LoadWatch()
    steps = 1 if args.quick else None
    models: dict[str, dict[str, dict[str, Any]]] = {}

    with tempfile.TemporaryDirectory(prefix="lorad-quantised-") as tmp:
        work = Path(tmp)
        if args.only_bare:
            fp32 = build_intents_model(work / "build" / "intents.onnx")
            onnx.save(quantize_model(onnx.load(str(fp32)), "int8"), str(work / "minilm-int8.onnx"))
            bare = measure_dynamic_int8(fp32, work / "minilm-int8.onnx", work, threads=args.threads, quick=args.quick)
            print(json.dumps(load.seal({"dynamic_int8_minilm": bare, "threads": args.threads})))
            return 0
        intents = yaml.safe_load((INTENTS / "lorad.yaml").read_text())["model"]
        plan: dict[str, tuple[dict[str, Path], list[str], int]] = {
            "minilm": (_quantise(build_intents_model(work / "build" / "intents.onnx"), work, "minilm"),
                       list(intents["targets"]), int(intents["rank"]))}
        for m, (fp32, adapter) in ENCODERS.items():
            plan[m] = (_quantise(fp32, work, m), *_peft_targets(adapter))

        # In-process first, with no daemon running: latency, bytes, the encoders' logits.
        max_positions: dict[str, int | None] = {}
        for m, (paths, targets, rank) in plan.items():
            figures, max_positions[m] = measure_engines(paths, targets, rank, threads=args.threads, quick=args.quick,
                                                        seed=0, cos=m != "minilm")
            for q in QUANTS:
                figures[q]["bytes"] = paths[q].stat().st_size
            models[m] = figures
            print(json.dumps({"model": m, "latency_ms_seq128_b1": {q: figures[q]["latency_ms_seq128_b1"] for q in QUANTS},
                              "bytes": {q: figures[q]["bytes"] for q in QUANTS}}), flush=True)

        dynamic = measure_dynamic_int8(plan["minilm"][0]["fp32"], plan["minilm"][0]["int8"], work,
                                       threads=args.threads, quick=args.quick)
        print(json.dumps({"dynamic_int8": dynamic}), flush=True)

        # The exported encoders through a daemon: RSS only (no task).
        for m in ENCODERS:
            paths, targets, rank = plan[m]
            for q in QUANTS:
                models[m][q].update(encoder_daemon_rss(work, m, q, paths[q], targets, rank, threads=args.threads,
                                                       max_pos=max_positions[m]))
                models[m][q].update(acc_base=None, acc_alice_peft=None, acc_alice_dp8=None,
                                    acc_alice_dp8_fp32_trained=None, gain_train_on_quantised=None,
                                    dp8_statuses=None, dp8_run_s=None)

        # MiniLM through daemons: fp32 first in every seed (its adapter is served on the others).
        data = INTENTS / "data" / "users" / USER
        train, test = _jsonl(data / "train.jsonl"), _jsonl(data / "test.jsonl")
        paths = plan["minilm"][0]
        runs: dict[str, list[dict[str, Any]]] = {q: [] for q in QUANTS}
        for seed in range(args.seeds):
            fp32_trained: Path | None = None
            for q in QUANTS:
                run = minilm_daemon_run(work, q, paths[q], seed=seed, first=seed == 0, steps=steps,
                                        threads=args.threads, train=train, test=test, fp32_trained=fp32_trained)
                if q == "fp32":
                    fp32_trained = run.get("fp32_trained")
                runs[q].append(run)
                print(json.dumps({"model": "minilm", "base": q, "seed": seed, "status": run["status"],
                                  "run_s": run["run_s"], "acc_alice_dp8": run["acc_alice_dp8"],
                                  "acc_alice_dp8_fp32_trained": run["acc_alice_dp8_fp32_trained"],
                                  "reason": run.get("reason")}), flush=True)
        reference = runs["fp32"][0]["embeddings"]
        for q in QUANTS:
            first, fig = runs[q][0], models["minilm"][q]
            c = _cosines(first["embeddings"], reference)
            fig.update(rss_mb=first["rss_mb"], vm_rss_mb=first["vm_rss_mb"],
                       cos_to_fp32=round(float(c.min()), 6), cos_to_fp32_mean=round(float(c.mean()), 6),
                       acc_base=round(first["acc_base"], 4), acc_alice_peft=round(first["acc_alice_peft"], 4),
                       acc_alice_dp8=_mean([r["acc_alice_dp8"] for r in runs[q]]),
                       acc_alice_dp8_fp32_trained=_mean([r["acc_alice_dp8_fp32_trained"] for r in runs[q]]),
                       dp8_statuses=[r["status"] for r in runs[q]], dp8_run_s=[r["run_s"] for r in runs[q]])
            gains = [r["acc_alice_dp8"] - r["acc_alice_dp8_fp32_trained"] for r in runs[q]]
            fig["gain_train_on_quantised"] = None if q == "fp32" else _mean(gains)

    out = {"models": models, "goals": goals(models["minilm"]), "dynamic_int8_minilm": dynamic,
           "threads": args.threads, "seeds": args.seeds,
           "quick": args.quick, "machine": {"cores": os.cpu_count()}}
    print(json.dumps(load.seal(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
