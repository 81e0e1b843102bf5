"""Personalisation on the device, end to end: examples/intents through a real daemon.

For each user of examples/intents (alice, bob) and each budget ε ∈ {1, 3, 8}, a fresh
``lorad serve`` with the shipped ``examples/intents/lorad.yaml`` (its target ε replaced)
runs the loop a user runs with ``loractl``, as the same HTTP calls:

1. add the user's ``train.jsonl`` as text examples (``loractl examples add ADAPTER --file``);
2. train (``loractl train ADAPTER``): one DP run through the validation gate;
3. score the user's held-out ``test.jsonl`` with the DP adapter the run trained (uploaded
   from where the gate kept it when it was rejected) and with what is served after the run
   (the base model if the gate rejected it).

Also the base model's and the shipped PEFT adapter's test accuracy, each run's wall time
and ε spent, and the gate's acceptance rate: for every ε = 8 candidate, the gate decision
repeated with 40 seeded noise draws on the same held-out split (the gate's noise is its
only randomness once the candidate is trained).

The last line is one JSON object: ``users.<u>.{base, peft, eps1, eps3, eps8,
served_eps8, gate_accept_rate_eps8, run_s_eps8, accepted_eps8, epsilon_spent_eps8}`` (and
the same for ε 1 and 3; accuracies are means over the seeds: ``eps*`` of the DP adapter,
``served_*`` of what serves after the run), plus ``loadavg`` before and after.

    .venv/bin/python -m benchmarks.personalisation [--seeds 3] [--users alice bob]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.intents_model import INTENTS, build_intents_model

REPO = Path(__file__).resolve().parents[1]
EPSILONS = (1.0, 3.0, 8.0)
GATE_TRIALS = 40


class Daemon:
    """A real ``lorad serve`` on a free port with its own state directory."""

    def __init__(self, config: Path, state: Path) -> None:
        from lorad.daemon.ctl.client import Client

        self.log = state.parent / f"{state.name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lorad.daemon.cli", "serve", "--config", str(config), "--port", "0",
                 "--state-dir", str(state)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        addr = state / "lorad.addr"
        deadline = time.monotonic() + 300
        while not (addr.is_file() and json.loads(addr.read_text()).get("pid") == self.proc.pid):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lorad did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)
        doc = json.loads(addr.read_text())
        token = (state / "api-token").read_text().strip()
        self.client = Client(url=doc["url"], unix_socket=None, token=lambda: token, timeout=600)
        self.model = doc["model"]

    def call(self, method: str, path: str, body: object = None) -> Any:
        return self.client.call(method, path, json_body=body, auth=True)

    def labels(self, texts: list[str], adapter: str | None) -> list[str]:
        doc: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
                               "outputs": [{"name": "label"}]}
        if adapter is not None:
            doc["parameters"] = {"adapter": adapter}
        out = self.call("POST", f"/v2/models/{self.model}/infer", doc)
        return list(out["outputs"][0]["data"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def _upload(daemon: Daemon, name: str, directory: Path) -> None:
    """``loractl adapters upload NAME DIR``."""
    from lorad.adapters.peft_format import read_peft_dir
    from lorad.daemon.ctl.client import multipart_body

    body, ctype = multipart_body(read_peft_dir(directory))
    daemon.client.call("PUT", f"/v2/models/{daemon.model}/adapters/{name}", body=body, content_type=ctype, auth=True)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _accuracy(daemon: Daemon, test: list[dict[str, Any]], adapter: str | None) -> float:
    got = daemon.labels([t["text"] for t in test], adapter)
    return float(np.mean([g == t["label"] for g, t in zip(got, test, strict=True)]))


def _config(work: Path, model: Path, epsilon: float) -> Path:
    config = yaml.safe_load((INTENTS / "lorad.yaml").read_text())
    config["model"]["path"] = str(model)
    config.pop("state_dir", None)
    config["trainer"].setdefault("defaults", {})["target_epsilon"] = epsilon
    path = work / f"lorad-eps{epsilon:g}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(daemon: Daemon, user: str, train: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
    from lorad.daemon.ctl.client import ApiError

    base = f"/v2/models/{daemon.model}/adapters/{user}"
    for ex in train:
        daemon.call("POST", f"{base}/examples", {"text": ex["text"], "label": ex["label"]})
    start = time.monotonic()
    try:
        run_id = daemon.call("POST", f"{base}/train")["run_id"]
    except ApiError as e:  # refused before anything was charged (e.g. a budget too small for the run)
        return {"status": "refused", "reason": e.message, "epsilon_spent": 0.0}, 0.0
    while True:
        doc = daemon.call("GET", f"{base}/train")
        if doc.get("run_id") == run_id and doc.get("state") == "finished":
            return doc, time.monotonic() - start
        time.sleep(0.5)


def _gate_accept_rate(config: Path, state: Path, user: str) -> float:
    """The ε = 8 candidate's gate decision over GATE_TRIALS seeded noise draws (in-process,
    on the daemon's stored examples and trained version, after the daemon stopped)."""
    from lorad.adapters.peft_format import read_peft_dir
    from lorad.adapters.registry import AdapterRegistry
    from lorad.adapters.service import AdapterService
    from lorad.daemon.config import load_config
    from lorad.daemon.preflight import open_engine, text_front_end
    from lorad.trainer.example_store import ExampleStore
    from lorad.trainer.model_setup import loss_output, pad_length, training_loss
    from lorad.trainer.noise import SeededNoise
    from lorad.trainer.validation import validate_candidate

    cfg = load_config(config, overrides={"state_dir": str(state)})
    c = cfg.trainer.for_adapter(user)
    engine = open_engine(cfg)
    service = AdapterService(engine, AdapterRegistry(Path(tempfile.mkdtemp()) / "adapters"), cache_budget_bytes=64 << 20,
                             text=text_front_end(cfg, engine))
    registry = AdapterRegistry(state / "adapters")
    version = registry.current_version(user)
    rejected = sorted((state / "trainer" / "rejected" / user).glob("*"))
    files = (read_peft_dir(rejected[-1]) if version is None else
             {f: registry.read_file(user, version, f) for f in ("adapter_model.safetensors", "adapter_config.json")})
    candidate = service.parse(files)
    s = cfg.trainer.store
    store = ExampleStore(state / "trainer" / "examples.sqlite3", max_examples_per_adapter=s.max_examples_per_adapter,
                         max_bytes=s.max_bytes, retention_days=s.retention_days)
    try:
        _, holdout_ids = store.split(user, c.holdout_fraction, c.split_seed)
        holdout = store.load(holdout_ids)
    finally:
        store.close()
    accepted = 0
    for seed in range(GATE_TRIALS):
        gate = validate_candidate(service, user, candidate, holdout, metric=c.validation_metric, loss=training_loss(service, c),
                                  output=loss_output(service, c).name, margin=c.validation_margin,
                                  noise=SeededNoise(seed), noise_multiplier=c.gate_noise_multiplier,
                                  score_clip=c.gate_clip, pad_to=pad_length(service, c))
        accepted += gate.accepted
    return accepted / GATE_TRIALS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="runs per user and ε (default 3)")
    parser.add_argument("--users", nargs="+", default=["alice", "bob"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    out: dict[str, Any] = {"users": {}}
    with tempfile.TemporaryDirectory(prefix="lorad-personalisation-") as tmp:
        work = Path(tmp)
        model = build_intents_model(work / "build" / "intents.onnx")
        for user in args.users:
            data = INTENTS / "data" / "users" / user
            train, test = _jsonl(data / "train.jsonl"), _jsonl(data / "test.jsonl")
            figures: dict[str, Any] = {}
            daemon = Daemon(_config(work, model, 8.0), work / f"{user}-base")
            try:
                figures["base"] = _accuracy(daemon, test, None)
                shipped = INTENTS / "adapters" / user
                if shipped.is_dir():
                    _upload(daemon, f"{user}-peft", shipped)
                    figures["peft"] = _accuracy(daemon, test, f"{user}-peft")
                else:
                    figures["peft"] = None
            finally:
                daemon.stop()
            for eps in args.epsilons:
                key = f"eps{eps:g}"
                accs, served, run_s, accepted, spent, gate = [], [], [], [], [], []
                statuses: list[str] = []
                refusals: list[str] = []
                for seed in range(args.seeds):
                    state = work / f"{user}-{key}-{seed}"
                    daemon = Daemon(_config(work, model, eps), state)
                    try:
                        result, seconds = _train(daemon, user, train)
                        ok = result["status"] == "accepted"
                        served.append(_accuracy(daemon, test, user if ok else None))
                        if not ok and result["status"] == "rejected":  # the candidate, kept aside by the gate
                            kept = state / "trainer" / "rejected" / user / str(result["run_id"])
                            _upload(daemon, f"{user}-candidate", kept)
                        accs.append(served[-1] if ok else _accuracy(daemon, test, f"{user}-candidate")
                                    if result["status"] == "rejected" else float("nan"))
                    finally:
                        daemon.stop()
                    run_s.append(seconds)
                    statuses.append(result["status"])
                    if result["status"] == "refused":
                        refusals.append(result["reason"])
                    accepted.append(result["status"] == "accepted")
                    spent.append(result.get("epsilon_spent"))
                    if eps == 8.0 and result["status"] in ("accepted", "rejected"):
                        gate.append(_gate_accept_rate(_config(work, model, eps), state, user))
                    print(json.dumps({"user": user, "epsilon": eps, "seed": seed, "status": result["status"],
                                      "accuracy": accs[-1], "run_s": round(seconds, 1), "reason": result["reason"]}),
                          flush=True)
                    if result["status"] == "refused":
                        break  # refused before any charge, for a reason the next seed would meet as well
                figures[key] = float(np.nanmean(accs)) if not np.isnan(accs).all() else None
                if any(r == "refused" for r in statuses):
                    figures[f"refused_{key}"] = refusals[0]
                figures[f"served_{key}"] = float(np.mean(served))
                figures[f"accepted_{key}"] = float(np.mean(accepted))
                figures[f"run_s_{key}"] = round(float(np.mean(run_s)), 1)
                figures[f"epsilon_spent_{key}"] = spent
                if gate:
                    figures[f"gate_accept_rate_{key}"] = float(np.mean(gate))
            out["users"][user] = figures
    out["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    out["machine"] = {"cores": os.cpu_count(), "seeds": args.seeds, "gate_trials": GATE_TRIALS}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
