"""On-device DP training end to end: a real ``lorad serve`` subprocess with the trainer on.

The demo digits classifier learns a relabelling its base cannot do — answer
``(digit + 1) mod 10``, the task of the demo adapter ``plus-one`` — from labelled
examples POSTed over real HTTP, trained by ``loractl train`` (the real CLI) with secure
noise, a σ calibrated to spend the adapter's whole budget in one run, and the
validation gate on. Then: the privacy ledger over HTTP and ``loractl privacy --json``,
ε recomputed from the run record alone, the new version served, a second run refused
for the budget, and the ledger unchanged after a restart on the same state directory.

The settings (400 examples, expected batch 80, 40 steps, learning rate 0.02) give the
trained version 0.5–0.8 accuracy on the relabelled task where the base model has ~0,
so the gate's verdict (held-out loss not worse than the base model's) is "accepted"
whatever the noise draws; measured well under 20 s on 2 cores.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from lorad.trainer.accountant import epsilon
from lorad.trainer.config import AdapterTrainingConfig, default_delta
from lorad.trainer.ledger import run_charges
from tests.integration.lorad_process import MODEL, RunningDaemon, logits_of, run_loractl, start_daemon

ADAPTER = "plus-one-dp"
BUDGET = 8.0
N_EXAMPLES = 400

TRAINER = {
    "enabled": True,
    # The test starts every run itself: no automatic runs behind its back.
    "schedule": False,
    "adapters": {
        # The defaults (what a first `loractl train` gets), except that this one run spends
        # the whole budget (default: half), so that the next one is refused.
        ADAPTER: {"target_epsilon": BUDGET, "budget_fraction": 1.0},
    },
}


@dataclass
class Lab:
    """The daemon under test, restartable on the same state directory and config."""

    state_dir: Path
    config: Path
    daemon: RunningDaemon

    def restart(self) -> None:
        code = self.daemon.stop()
        assert code == 0, f"lorad exited with {code} on SIGTERM:\n{self.daemon.logs()}"
        self.daemon = start_daemon(self.state_dir, "--config", str(self.config))

    def loractl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_loractl(*args, "--state-dir", str(self.state_dir), timeout=120)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lorad-train")
    config = root / "lorad.yaml"
    # A Jetson's power sensor (fixture tree: VDD_IN steady at 5.064 V × 1.216 A), so runs record their energy.
    shutil.copytree(Path(__file__).parents[1] / "unit/power_fixtures/orin-nano-jp5/sys", root / "sys")
    config.write_text(yaml.safe_dump({"trainer": TRAINER, "power": {"sys_root": str(root / "sys"),
                                                                    "sample_interval_s": 0.05}}))
    state = root / "state"
    lab = Lab(state, config, start_daemon(state, "--config", str(config)))
    yield lab
    code = lab.daemon.stop()
    assert code == 0, f"lorad exited with {code} on SIGTERM:\n{lab.daemon.logs()}"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as the demo model takes them, labelled digit + 1 (mod 10)."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    pixels = (digits.data[order] / 16.0).astype(np.float32)
    return pixels, (digits.target[order] + 1) % 10


def _example(pixels: np.ndarray, label: object) -> dict[str, object]:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels.ravel().tolist()}],
            "label": label}


def _path(adapter: str, what: str) -> str:
    return f"/v2/models/{MODEL}/adapters/{adapter}/{what}"


def _accuracy(d: RunningDaemon, pixels: np.ndarray, labels: np.ndarray, adapter: str | None) -> tuple[float, Any]:
    r = d.infer(pixels, adapter)
    assert r.status == 200, r.body
    return float((logits_of(r).argmax(axis=1) == labels).mean()), r.json()["parameters"]


def test_examples_need_the_token_and_are_checked(lab: Lab) -> None:
    d = lab.daemon
    path = _path("bob", "examples")
    x = _digits()[0][0]
    r = d.request("POST", path, json_body=_example(x, 3), token=None)
    assert r.status == 401 and "Bearer" in r.json()["error"]
    r = d.request("POST", path, json_body=_example(x, 3), token="not-the-token")
    assert r.status == 401
    assert d.request("GET", path).json() == {"adapter": "bob", "examples": 0}

    r = d.request("POST", path, json_body=_example(x, 10))
    assert r.status == 422 and "label 10" in r.json()["error"] and "0..9" in r.json()["error"], r.body
    two_rows = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": [0.0] * 128}], "label": 1}
    r = d.request("POST", path, json_body=two_rows)
    error = r.json()["error"]
    assert r.status == 422 and "'pixels'" in error and "[2, 64]" in error and "[64]" in error, r.body
    r = d.request("POST", path, json_body={**_example(x, 1), "weight": 2})
    assert r.status == 400 and "nothing else" in r.json()["error"]
    r = d.request("POST", path, body=b"[" * 100_000, content_type="application/json")
    assert r.status == 400 and "nested too deeply" in r.json()["error"], r.body
    r = d.request("POST", path, body=b"0" * (1024**2 + 1), content_type="application/json")
    assert r.status == 413 and "max_example_bytes" in r.json()["error"]
    r = d.request("POST", "/v2/models/resnet/adapters/bob/examples", json_body=_example(x, 3))
    assert r.status == 404 and "'resnet'" in r.json()["error"]
    assert d.request("GET", path).json() == {"adapter": "bob", "examples": 0}

    r = d.request("POST", path, json_body=_example(x, 3))
    assert r.status == 201 and r.json()["adapter"] == "bob" and r.json()["examples"] == 1, r.body


def test_train_privately_serve_refuse_over_budget_and_keep_the_ledger(lab: Lab) -> None:
    d = lab.daemon
    pixels, labels = _digits()
    train_x, train_y = pixels[:N_EXAMPLES], labels[:N_EXAMPLES]
    test_x, test_y = pixels[N_EXAMPLES:N_EXAMPLES + 300], labels[N_EXAMPLES:N_EXAMPLES + 300]
    for row, label in zip(train_x, train_y, strict=True):
        r = d.request("POST", _path(ADAPTER, "examples"), json_body=_example(row, int(label)))
        assert r.status == 201, r.body
    assert d.request("GET", _path(ADAPTER, "examples")).json()["examples"] == N_EXAMPLES
    assert d.request("POST", _path(ADAPTER, "train"), token=None).status == 401
    base_accuracy, _ = _accuracy(d, test_x, test_y, None)
    assert base_accuracy < 0.1  # the base model answers the digit, never digit + 1

    # -- one run with the real CLI, followed to the end
    p = lab.loractl("train", ADAPTER, "--poll", "0.2")
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{d.logs()}"
    assert "accepted" in p.stdout and "serving version 1" in p.stdout, p.stdout
    progress = d.request("GET", _path(ADAPTER, "train")).json()
    assert progress["state"] == "finished" and progress["status"] == "accepted", progress
    assert progress["version"] == 1 and progress["steps_done"] == progress["planned_steps"]
    assert "beats base" in progress["reason"] and "private decision" in progress["reason"]

    # -- the privacy ledger, over HTTP and through loractl
    r = d.request("GET", _path(ADAPTER, "privacy"))
    assert r.status == 200, r.body
    state = r.json()
    p = lab.loractl("privacy", ADAPTER, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == state
    assert 0 < state["epsilon_spent"] <= BUDGET and state["budget_epsilon"] == BUDGET
    assert state["budget_left"] == pytest.approx(BUDGET - state["epsilon_spent"])
    assert state["noise"] == "secure" and state["accountant"] == "rdp"
    (run,) = state["runs"]
    n = run["examples"]  # the private estimate the run was planned from
    assert 0.6 * N_EXAMPLES < n < N_EXAMPLES  # the held-out split is not trained on
    assert state["delta"] == run["delta"] == default_delta(n) < 1 / n
    assert run["status"] == "completed"
    defaults = AdapterTrainingConfig()
    assert run["steps_charged"] == run["steps_done"] == run["planned_steps"] == progress["planned_steps"]
    assert run["q"] == pytest.approx(defaults.batch_size / n, rel=0.01) and run["clip_norm"] == defaults.clip_norm
    assert run["sigma"] > 0.5
    assert [m["what"] for m in run["mechanisms"]] == ["example_count", "validation_gate"]
    started = datetime.datetime.fromisoformat(run["started_at"])
    ended = datetime.datetime.fromisoformat(run["ended_at"])
    assert started <= ended <= datetime.datetime.now(datetime.UTC)
    # What the personalisation cost, next to its ε: the training phase's energy over the run.
    watts = 5.064 * 1.216
    assert 0 < run["energy_joules"] <= watts * ((ended - started).total_seconds() + 1.0)
    assert state["energy_joules"] == run["energy_joules"]
    # Anyone can recompute ε from the record alone.
    recomputed = epsilon(runs=run_charges(run), delta=run["delta"], accountant=run["accountant"])
    assert recomputed == pytest.approx(state["epsilon_spent"], rel=1e-12)
    # σ was calibrated to spend (nearly) the whole budget in this one run (budget_fraction 1).
    assert state["epsilon_spent"] > BUDGET - 0.1
    everyone = d.request("GET", f"/v2/models/{MODEL}/privacy").json()
    assert [s["adapter"] for s in everyone] == [ADAPTER] and everyone[0] == state

    # -- the accepted version is listed and served
    listed = d.adapters()[ADAPTER]
    assert listed["version"] == 1
    accuracy, parameters = _accuracy(d, test_x, test_y, ADAPTER)
    assert parameters == {"adapter": ADAPTER, "adapter_version": 1}
    assert accuracy > max(0.3, base_accuracy + 0.2), accuracy
    status = d.request("GET", "/v2/trainer").json()
    assert status["available"] is True and status["automatic"] is False and status["current"] is None
    assert status["last"][ADAPTER]["status"] == "accepted"

    # -- a second run would exceed the budget: refused, nothing charged
    r = d.request("POST", _path(ADAPTER, "train"))
    assert r.status == 409, r.body
    error = r.json()["error"]
    assert "privacy budget" in error and f"budget ε {BUDGET:g}" in error, error
    assert d.request("GET", _path(ADAPTER, "privacy")).json() == state
    p = lab.loractl("train", ADAPTER)
    assert p.returncode == 1 and "409" in p.stderr and "privacy budget" in p.stderr, p.stderr

    # -- the ledger (and the trained version) survive a restart
    lab.restart()
    d = lab.daemon
    after = d.request("GET", _path(ADAPTER, "privacy")).json()
    assert after == state
    assert d.request("GET", _path(ADAPTER, "examples")).json()["examples"] == N_EXAMPLES
    assert _accuracy(d, test_x, test_y, ADAPTER) == (accuracy, parameters)
    r = d.request("POST", _path(ADAPTER, "train"))
    assert r.status == 409 and "privacy budget" in r.json()["error"]


def test_a_corrupt_ledger_is_refused_never_reset(tmp_path: Path) -> None:
    """Resetting an unreadable ledger would give the data its whole budget again: training
    stays off (and says why), serving goes on, and the file is left as it was."""
    ledger = tmp_path / "state" / "trainer" / "privacy-ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"format": "lorad-privacy-ledger", "version": 1, "next_run_id": 2, "adapters": {"a": {}}}\n')
    before = ledger.read_bytes()
    d = start_daemon(tmp_path / "state")
    try:
        assert d.request("GET", "/v2/health/ready").json()["training"]["disabled"] == "ledger_damaged"
        r = d.request("GET", _path(ADAPTER, "privacy"))
        assert r.status == 503 and "privacy ledger" in r.json()["error"] and "corrupt" in r.json()["error"], r.body
        assert "restore it from a backup" in r.json()["error"]
        assert d.request("POST", f"/v2/models/{MODEL}/infer", json_body={"inputs": [{
            "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}).status == 200
        assert "Traceback" not in d.logs()
    finally:
        d.stop()
    assert ledger.read_bytes() == before
