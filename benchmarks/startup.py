"""Start-up CPU: ``lorad serve`` from process start to READY=1, against the bare-session floor;
and ``loractl`` commands that touch no model.

Issue 23, item 4. For each kind (``demo``: the embedded demo model; ``minilm``: the
examples/intents model, built by ``examples/intents/build.py`` once and cached), each round
runs, in a new random order:

- the daemon: a real ``lorad serve`` child with a temporary config and state directory
  and a real sd_notify socket (``NOTIFY_SOCKET``, a Unix datagram socket bound here). When
  ``READY=1`` arrives the child's CPU time is read from
  ``/proc/<pid>/stat`` (utime + stime of every thread, plus waited-for children): CPU from
  process start to ready, not wall time, so the other processes on the machine do not count;
- the floor: a child Python that imports onnxruntime and numpy, opens an
  ``InferenceSession`` on the same model file and runs it once; its own ``getrusage``.

The ratio is of the medians. A first, untimed start per kind installs the demo adapters
into the state directory and writes bytecode caches (children run with bytecode writing
on, as an installed package has its ``.pyc`` files): the rounds measure a restart, which
is what a device does at every boot.

``loractl``: CPU seconds (``os.wait4``'s rusage) of ``loractl --help``, of ``loractl health``
with no daemon (refused at once), and of ``loractl fleet keys`` on a fleet repository made
once with ``loractl fleet init``: commands that load no model.

    python -m benchmarks.startup [--rounds 5] [--kinds demo minilm] [--tree DIR]

``--tree DIR`` measures the lorad found in DIR instead (a checkout of another commit: the
children run with DIR as their working directory). The last line printed is one JSON object;
goal verdicts are withheld when the load was too high (:class:`benchmarks.load.LoadWatch`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.intents_model import INTENTS, REPO, cached_intents_model
from benchmarks.load import LoadWatch

__all__ = ["KINDS", "measure_ready", "measure_loractl", "main"]

KINDS = ("demo", "minilm")
#: The goals of issue 23, item 4.
MAX_READY_VS_FLOOR = 2.0
MAX_LORACTL_CPU_S = 0.5

_READY_TIMEOUT_S = 300.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# The floor: what any server of this model must do (import, open, run once), nothing else.
_FLOOR = """
import resource, sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = {}
for i in session.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    feeds[i.name] = np.ones(shape, np.int64) if "int" in i.type else np.zeros(shape, np.float32)
session.run(None, feeds)
r = resource.getrusage(resource.RUSAGE_SELF)
print(r.ru_utime + r.ru_stime)
"""


def _child_env() -> dict[str, str]:
    """The benchmark's environment, with bytecode caching on (as an installed package has it)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def model_file(kind: str) -> Path:
    """The ONNX file ``kind`` serves (MiniLM built and cached on first use)."""
    if kind == "demo":
        from lorad.daemon.demo import demo_model_path

        return demo_model_path()
    if kind == "minilm":
        return cached_intents_model()
    raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")


def _write_config(kind: str, model: Path, path: Path) -> None:
    """A config file for ``kind``: the demo's defaults, or examples/intents/lorad.yaml with
    its model path pointing at the built model (the state directory comes from the flag)."""
    import yaml

    if kind == "demo":
        doc: dict[str, Any] = {"server": {"host": "127.0.0.1", "port": 0}}
    else:
        doc = yaml.safe_load((INTENTS / "lorad.yaml").read_text(encoding="utf-8"))
        doc["model"]["path"] = str(model)
        doc.pop("state_dir", None)
        doc["server"] = {**doc.get("server", {}), "host": "127.0.0.1", "port": 0}
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid``, and of its waited-for children, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / _CLK_TCK


@contextlib.contextmanager
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    d = tempfile.mkdtemp(prefix="lorad-su-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def daemon_ready_cpu(config: Path, state_dir: Path, *, tree: Path = REPO) -> float:
    """CPU seconds of one ``lorad serve`` child from its start to its READY=1."""
    with _notify_socket() as (sock, path):
        env = {**_child_env(), "NOTIFY_SOCKET": path}
        log = state_dir.parent / f"{state_dir.name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lorad.daemon.cli", "serve", "--config", str(config),
                 "--state-dir", str(state_dir), "--port", "0"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tree, env=env)
        try:
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise RuntimeError(f"lorad serve did not get ready (exit {proc.returncode}); see {log}")
                sock.settimeout(min(left, 1.0))  # a bounded wait: notices a child that died instead
                try:
                    message = sock.recv(4096).decode(errors="replace")
                except TimeoutError:
                    continue
                if "READY=1" in message.splitlines():
                    return _proc_cpu_s(proc.pid)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def floor_cpu(model: Path) -> float:
    """CPU seconds of a Python child that imports onnxruntime, opens ``model`` and runs it once."""
    done = subprocess.run([sys.executable, "-c", _FLOOR, str(model)], capture_output=True, text=True,
                          env=_child_env(), timeout=_READY_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the floor session failed on {model}:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


def measure_ready(kind: str, *, rounds: int = 5, tree: Path = REPO, seed: int = 0) -> dict[str, Any]:
    """Median CPU seconds to READY of ``lorad serve`` for ``kind``, of the floor, and their ratio
    (keys ``ready_cpu_vs_floor_<kind>``, ``ready_cpu_s_<kind>``, ``floor_cpu_s_<kind>``)."""
    model = model_file(kind)
    order = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix=f"lorad-startup-{kind}-") as tmp:
        work = Path(tmp)
        config, state_dir = work / "lorad.yaml", work / "state"
        _write_config(kind, model, config)
        first = daemon_ready_cpu(config, state_dir, tree=tree)  # demo adapters, bytecode caches
        floor_cpu(model)
        samples: dict[str, list[float]] = {"ready": [], "floor": []}
        for _ in range(rounds):
            sides = ["ready", "floor"]
            order.shuffle(sides)
            for side in sides:
                samples[side].append(daemon_ready_cpu(config, state_dir, tree=tree) if side == "ready"
                                     else floor_cpu(model))
    ready, floor = statistics.median(samples["ready"]), statistics.median(samples["floor"])
    return {
        f"ready_cpu_vs_floor_{kind}": round(ready / floor, 3),
        f"ready_cpu_s_{kind}": round(ready, 3),
        f"floor_cpu_s_{kind}": round(floor, 3),
        f"first_start_cpu_s_{kind}": round(first, 3),
        f"samples_{kind}": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }


def _cpu_of(argv: Sequence[str], *, tree: Path) -> float:
    """CPU seconds (user + system, from ``os.wait4``) of one child command."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=_child_env())
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0  # reaped here; Popen must not wait for it again
    return usage.ru_utime + usage.ru_stime


def measure_loractl(*, rounds: int = 5, tree: Path = REPO, seed: int = 0) -> dict[str, Any]:
    """Median CPU seconds of loractl commands that load no model: ``--help``, ``health``
    against no daemon, and ``fleet keys`` on a fresh fleet repository."""
    ctl = [sys.executable, "-m", "lorad.daemon.ctl"]
    with tempfile.TemporaryDirectory(prefix="lorad-startup-ctl-") as tmp:
        repo = Path(tmp) / "fleet"
        init = subprocess.run([*ctl, "fleet", "init", str(repo)], capture_output=True, text=True, cwd=tree,
                              env=_child_env(), timeout=300, check=False)
        if init.returncode != 0:
            raise RuntimeError(f"loractl fleet init failed:\n{init.stderr}")
        with socket.socket() as s:  # a port nobody listens on: health is refused at once
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        commands = {
            "help": [*ctl, "--help"],
            "health": [*ctl, "--url", f"http://127.0.0.1:{closed_port}", "--state-dir", tmp, "health"],
            "fleet_keys": [*ctl, "fleet", "keys", str(repo)],
        }
        for argv in commands.values():
            _cpu_of(argv, tree=tree)  # bytecode caches
        order = random.Random(seed)
        samples: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(rounds):
            names = list(commands)
            order.shuffle(names)
            for name in names:
                samples[name].append(_cpu_of(commands[name], tree=tree))
    return {f"loractl_{k}_cpu_s": round(statistics.median(v), 3) for k, v in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each side (medians)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--no-loractl", action="store_true", help="skip the loractl commands")
    parser.add_argument("--tree", type=Path, default=REPO, help="measure the lorad in this source tree")
    args = parser.parse_args(argv)
    watch = LoadWatch()
    result: dict[str, Any] = {"tree": str(args.tree), "rounds": args.rounds}
    for kind in args.kinds:
        result.update(measure_ready(kind, rounds=args.rounds, tree=args.tree))
    if not args.no_loractl:
        result.update(measure_loractl(rounds=args.rounds, tree=args.tree))
    goals: dict[str, bool] = {f"ready_cpu_vs_floor_{k}_le_{MAX_READY_VS_FLOOR:g}":
                              result[f"ready_cpu_vs_floor_{k}"] <= MAX_READY_VS_FLOOR for k in args.kinds}
    goals.update({f"{k}_le_{MAX_LORACTL_CPU_S:g}": v <= MAX_LORACTL_CPU_S
                  for k, v in result.items() if k.startswith("loractl_")})
    result["goals"] = goals
    print(json.dumps(watch.seal(result), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
