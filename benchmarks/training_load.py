"""Training on the device next to serving: a MiniLM run at the defaults, and what it costs serving.

On examples/intents (all-MiniLM-L6-v2, its shipped ``lorad.yaml``), each through a real
``lorad serve`` (:class:`benchmarks.personalisation.Daemon`), with alice's ``train.jsonl``
added as text examples:

- ``minilm_run_s_defaults``: one ``train`` at the shipped defaults (ε 8, batch_size 64 →
  every one of her ~55 training examples each step, 30 epochs → 30 steps, padded to the
  model's token limit, ``max_text_tokens`` 64), as **process CPU seconds** of the daemon
  and its children from the trigger to the finished run (preflight and artifact build,
  the step process, the gate): the run's time on an idle machine, where its one training
  thread never waits for a core (the wall time on this shared machine is in
  ``minilm_run.wall_s``). Goal ≤ 300 s.
- ``serving_p99_during_training_ratio``: a second daemon serves single-text requests
  (``/infer``, no adapter) at a steady ``--rate`` from a client thread here (open loop:
  latency counts from each request's scheduled time, so a stall is not hidden by the
  requests it delays) while a run trains (``--batch-size``, the defaults' 64); the run is
  paused and resumed (``/v2/trainer/pause``, ``/resume``) every ``--window`` seconds, so
  idle and training windows interleave under the same outside load, until ``--steps``
  (50) steps fell in training windows and as many paused windows followed. p99 of the
  training windows / p99 of the paused ones; requests sent while a pause waits for its
  step to end count for neither. ``training_steps_during``: the steps taken during the
  training windows. Goals: ratio ≤ 1.25 over ≥ 50 steps.
- ``dp_vs_opacus_minilm_b16_1thread``: from :func:`benchmarks.minilm.measure_dp_vs_opacus`
  (process CPU time of one private step against one Opacus step, one process, one thread
  each); ``--skip-opacus`` leaves it out.

The last line is one JSON object; it carries ``loadavg`` and withholds goal verdicts when
the load was above 1.5 per core (:class:`benchmarks.load.LoadWatch`).

    .venv/bin/python -m benchmarks.training_load [--steps 50] [--batch-size 64] [--rate 10] [--window 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.intents_model import INTENTS, cached_intents_model
from benchmarks.load import LoadWatch
from benchmarks.personalisation import Daemon, _jsonl

RUN_GOAL_S = 300.0
P99_GOAL = 1.25
MIN_STEPS = 50
USER = "alice"


def _config(work: Path, model: Path, name: str, defaults: dict[str, Any] | None = None) -> Path:
    config = yaml.safe_load((INTENTS / "lorad.yaml").read_text())
    config["model"]["path"] = str(model)
    config.pop("state_dir", None)
    config["trainer"].setdefault("defaults", {}).update(defaults or {})
    path = work / f"lorad-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children and its live descendants (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(p: int) -> list[str]:
        text = Path(f"/proc/{p}/stat").read_text()
        return text[text.rindex(")") + 2:].split()

    def children(p: int) -> list[int]:
        out: list[int] = []
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    fields = stat(pid)
    total = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    todo = children(pid)
    while todo:
        child = todo.pop()
        try:
            total += sum(int(v) for v in stat(child)[11:13])  # live: its own time only
            todo += children(child)
        except OSError:
            pass
    return total / tick


def _add_examples(daemon: Daemon, user: str) -> None:
    base = f"/v2/models/{daemon.model}/adapters/{user}"
    for ex in _jsonl(INTENTS / "data" / "users" / user / "train.jsonl"):
        daemon.call("POST", f"{base}/examples", {"text": ex["text"], "label": ex["label"]})


def _status(daemon: Daemon, user: str) -> dict[str, Any]:
    doc: dict[str, Any] = daemon.call("GET", f"/v2/models/{daemon.model}/adapters/{user}/train")
    return doc


def _steps_of(doc: dict[str, Any]) -> int:
    return int(doc.get("steps_done") or 0)


def measure_run_at_defaults(work: Path, model: Path) -> dict[str, Any]:
    """``minilm_run_s_defaults`` (see the module docstring)."""
    daemon = Daemon(_config(work, model, "defaults"), work / "state-defaults")
    try:
        _add_examples(daemon, USER)
        cpu0, wall0 = _tree_cpu_s(daemon.proc.pid), time.monotonic()
        run_id = daemon.call("POST", f"/v2/models/{daemon.model}/adapters/{USER}/train")["run_id"]
        steps = 0
        while True:
            doc = _status(daemon, USER)
            if doc.get("run_id") == run_id and doc.get("state") == "finished":
                break
            steps = max(steps, _steps_of(doc))
            time.sleep(0.5)
        cpu, wall = _tree_cpu_s(daemon.proc.pid) - cpu0, time.monotonic() - wall0
    finally:
        daemon.stop()
    steps = _steps_of(doc) or steps
    return {"minilm_run_s_defaults": round(cpu, 1),
            "minilm_run": {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "status": doc.get("status"),
                           "steps": steps, "cpu_s_per_step": round(cpu / steps, 2) if steps else None,
                           "epsilon_spent": doc.get("epsilon_spent")}}


class _Load:
    """Single-text requests at a steady rate from one thread; latencies by phase."""

    def __init__(self, daemon: Daemon, rate: float, texts: list[str]) -> None:
        self.daemon, self.period, self.texts = daemon, 1.0 / rate, texts
        self.phase = "warmup"
        self.latencies: dict[str, list[float]] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load", daemon=True)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        path = f"/v2/models/{self.daemon.model}/infer"
        due = time.monotonic()
        k = 0
        while not self._stop.is_set():
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            phase = self.phase
            text = self.texts[k % len(self.texts)]
            doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}],
                   "outputs": [{"name": "label"}]}
            try:
                self.daemon.call("POST", path, doc)
            except Exception:  # counted, not fatal: a benchmark under load must finish
                self.errors += 1
                phase = "error"
            done = time.monotonic()
            if phase == self.phase:  # a request that straddles a phase change counts for neither
                self.latencies.setdefault(phase, []).append(done - due)
            k += 1
            due += self.period
            if due < done - 1.0:  # far behind (the process was stopped): start the schedule afresh
                due = done


def measure_serving_during_training(work: Path, model: Path, *, steps: int, batch_size: float, rate: float,
                                    window: float) -> dict[str, Any]:
    """``serving_p99_during_training_ratio`` and ``training_steps_during`` (see the module
    docstring): windows alternate until ``steps`` steps fell in training windows and as
    many paused windows followed; the run (planned much longer) is left unfinished."""
    planned = 4 * steps
    daemon = Daemon(_config(work, model, "load", {"steps": planned, "epochs": None, "batch_size": batch_size}),
                    work / "state-load")
    texts = [ex["text"] for ex in _jsonl(INTENTS / "data" / "users" / USER / "test.jsonl")]
    steps_during = 0
    windows = {"training": 0, "paused": 0}
    try:
        _add_examples(daemon, USER)
        with _Load(daemon, rate, texts) as load:
            time.sleep(3.0)  # warm-up requests: not counted
            daemon.call("POST", f"/v2/models/{daemon.model}/adapters/{USER}/train")
            # Wait for the first step: the preflight (artifact build) is not training.
            load.phase = "preflight"
            while _steps_of(doc := _status(daemon, USER)) < 1 and doc.get("state") != "finished":
                time.sleep(0.2)
            training = True
            # Ends before a training window, once enough steps fell in training windows and as
            # many paused windows followed.
            while not (training and steps_during >= steps and windows["paused"] >= windows["training"]):
                before = _steps_of(_status(daemon, USER))
                load.phase = "training" if training else "paused"
                time.sleep(window)
                doc = _status(daemon, USER)
                if doc.get("state") == "finished":  # only if the run went faster than planned
                    load.phase = "after"
                    break
                windows["training" if training else "paused"] += 1
                load.phase = "switching"
                if training:
                    steps_during += _steps_of(doc) - before
                    daemon.call("POST", "/v2/trainer/pause")
                    while (d := _status(daemon, USER)).get("phase") != "paused" and d.get("state") != "finished":
                        time.sleep(0.1)  # the step under way ends first
                else:
                    daemon.call("POST", "/v2/trainer/resume")
                training = not training
            load.phase = "after"
        lat = load.latencies
        errors = load.errors
    finally:
        daemon.stop()
    p99 = {k: float(np.percentile(v, 99)) * 1e3 for k, v in lat.items() if k in ("training", "paused") and v}
    ratio = round(p99["training"] / p99["paused"], 3) if {"training", "paused"} <= p99.keys() else None
    return {"serving_p99_during_training_ratio": ratio, "training_steps_during": steps_during,
            "serving": {"rate_per_s": rate, "window_s": window, "windows": windows, "errors": errors,
                        "requests": {k: len(v) for k, v in lat.items()},
                        "p99_ms": {k: round(v, 2) for k, v in p99.items()},
                        "p50_ms": {k: round(float(np.percentile(v, 50)) * 1e3, 2) for k, v in lat.items()
                                   if k in ("training", "paused") and v},
                        "run_planned_steps": planned, "run_batch_size": batch_size}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=MIN_STEPS,
                        help=f"training steps to measure serving beside (default {MIN_STEPS})")
    parser.add_argument("--batch-size", type=float, default=64.0, help="its expected batch size (default 64: the defaults)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of each training / paused window (default 10)")
    parser.add_argument("--skip-run", action="store_true", help="leave out minilm_run_s_defaults")
    parser.add_argument("--skip-load", action="store_true", help="leave out the serving figures")
    parser.add_argument("--skip-opacus", action="store_true", help="leave out dp_vs_opacus_minilm_b16_1thread")
    args = parser.parse_args(argv)
    watch = LoadWatch()
    out: dict[str, Any] = {}
    goals: dict[str, bool | None] = {}
    with tempfile.TemporaryDirectory(prefix="lorad-training-load-") as tmp:
        work = Path(tmp)
        model = cached_intents_model()
        if not args.skip_run:
            out.update(measure_run_at_defaults(work, model))
            goals["minilm_run_s_defaults_le_300"] = out["minilm_run_s_defaults"] <= RUN_GOAL_S
            print(json.dumps({"minilm_run_s_defaults": out["minilm_run_s_defaults"]}), flush=True)
        if not args.skip_load:
            out.update(measure_serving_during_training(work, model, steps=args.steps, batch_size=args.batch_size,
                                                       rate=args.rate, window=args.window))
            ratio = out["serving_p99_during_training_ratio"]
            goals["serving_p99_ratio_le_1.25"] = ratio is not None and ratio <= P99_GOAL
            goals["training_steps_during_ge_50"] = out["training_steps_during"] >= MIN_STEPS
            print(json.dumps({k: out[k] for k in ("serving_p99_during_training_ratio", "training_steps_during")}),
                  flush=True)
        if not args.skip_opacus:
            from benchmarks.minilm import DP_VS_OPACUS_GOAL, build_model, measure_dp_vs_opacus

            figures, why = measure_dp_vs_opacus(build_model(), work / "artifacts", batches=(16,))
            out.update(figures)
            if why:
                out.setdefault("reasons", {})["dp_vs_opacus_minilm_b16_1thread"] = why
            else:
                goals["dp_vs_opacus_minilm_b16_le_0.7"] = figures["dp_vs_opacus_minilm_b16_1thread"] <= DP_VS_OPACUS_GOAL
    out["goals"] = goals
    out["machine"] = {"cores": os.cpu_count()}
    print(json.dumps(watch.seal(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
