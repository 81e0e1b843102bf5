"""Every capability on every model, through a real daemon.

One real ``lorad serve`` per model of tests/model_matrix.py (the demo MLP, MiniLM with text,
every torch/Optimum export), with the micro-batcher, the trainer and OTA on, and the real
Mosquitto of tests/conftest.py. The rows:

- a PEFT adapter made with real peft serves what torch + peft answered;
- concurrent requests with different adapters (≥ 3 adapters, 16 clients) get exactly the
  answers of single requests, and share batched calls;
- a per-request composition is the exact weighted sum of its adapters;
- the adapter that dominates the requests is served merged into the weights, exactly, and a
  new version of it answers from its first request;
- an uploaded adapter exports byte-identical;
- a DP training run on examples given as the user gives them (text for a text model) goes
  through the validation gate and its version serves;
- a fleet publication installs over MQTT, passes its health check and serves;
- a federated round (the daemon is a member of a real SuperLink's federation) trains from
  the federation's B through the daemon's routes, hands back B only, charges the device at
  most its round ε, installs nothing, and refuses a round of another A uncharged.

A model added to MODEL_CASES enters every row with no new test code.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from benchmarks.flower import SuperLink
from benchmarks.mosquitto import Broker
from lorad.adapters.merged import WINDOW
from lorad.adapters.peft_format import WEIGHTS_FILE, read_peft_dir
from lorad.daemon.ctl import main as loractl_main
from lorad.daemon.federated import wire
from lorad.ota.cli import main as fleet_main
from tests.integration.lorad_process import RunningDaemon, batcher_counts, fleet_args, start_daemon, wait_until
from tests.model_matrix import MODEL_CASES, ModelCase

pytestmark = pytest.mark.slow

CLIENTS = 16
#: What single and batched calls of the same rows may differ by (another GEMM blocking).
BATCH_ATOL = 1e-5
#: The adapter each matrix daemon contributes to its federation (the federated row).
FEDERATED = "fleet"


@dataclass
class Served:
    case: ModelCase
    daemon: RunningDaemon
    config: Path
    base: str  # /v2/models/{name}
    #: What the base model and the model with the case's PEFT adapter answer.
    expected_base: np.ndarray
    expected_adapted: np.ndarray
    peft_dir: Path

    def infer(self, adapter: str | None = None, *, adapters: list[dict[str, Any]] | None = None) -> np.ndarray:
        doc: dict[str, Any] = {"inputs": self.case.inputs, "outputs": [{"name": self.case.output}]}
        if adapter is not None:
            doc["parameters"] = {"adapter": adapter}
        if adapters is not None:
            doc["parameters"] = {"adapters": adapters}
        r = self.daemon.request("POST", f"{self.base}/infer", json_body=doc)
        assert r.status == 200, r.body
        [out] = r.json()["outputs"]
        return np.asarray(out["data"], np.float64).reshape(out["shape"])

    def inspect(self, name: str) -> dict[str, Any]:
        r = self.daemon.request("GET", f"{self.base}/adapters/{name}")
        assert r.status == 200, r.body
        return dict(r.json())

    def adapters(self) -> set[str]:
        r = self.daemon.request("GET", f"{self.base}/adapters")
        assert r.status == 200, r.body
        return {a["name"] for a in r.json()}

    def upload(self, name: str, files: dict[str, bytes]) -> None:
        from lorad.daemon.ctl.client import multipart_body

        body, ctype = multipart_body(files)
        r = self.daemon.request("PUT", f"{self.base}/adapters/{name}", body=body, content_type=ctype)
        assert r.status in (200, 201), r.body


def _scaled_b(files: dict[str, bytes], factor: float) -> dict[str, bytes]:
    """The same PEFT adapter with every B multiplied by ``factor`` (its delta times factor)."""
    tensors = load_safetensors(files[WEIGHTS_FILE])
    scaled = {k: (v * np.asarray(factor, v.dtype) if "lora_B" in k else v) for k, v in tensors.items()}
    return {**files, WEIGHTS_FILE: save_safetensors(scaled)}






@pytest.fixture(scope="module")
def fleet_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("matrix-fleet") / "repo"
    assert fleet_main(["fleet", "init", str(repo), "--threshold", "targets=1"]) == 0
    return repo


@pytest.fixture(scope="module",
                params=[pytest.param(c, id=c.id, marks=[getattr(pytest.mark, m) for m in c.marks]) for c in MODEL_CASES])
def served(request: pytest.FixtureRequest, broker: Broker, fleet_repo: Path, superlink: SuperLink,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    case: ModelCase = request.param
    tmp = tmp_path_factory.mktemp(case.id)
    broker.clear_retained()
    section = case.model_section(tmp)
    config = {
        "model": {"name": case.id, **section},
        "trainer": {
            "enabled": True, "testing": True, "noise": "seeded", "noise_seed": 3, "schedule": False,
            # A federated round obeys the device policy (tests/unit/test_federated_round.py); the
            # suite's own load must not keep it from training here.
            "policy": {"max_load_per_cpu": 1000.0, "max_requests_per_s": 1e6},
            # CI-sized: a few steps on a few examples; the gate's margin accepts any candidate
            # that is not far worse, so the row checks the path, not the learning (the
            # personalisation benchmark measures that).
            "defaults": {"min_train_examples": 8, "min_holdout_examples": 4, "holdout_fraction": 0.25,
                         "gate_noise_multiplier": 1.0, "validation_margin": -10.0, "steps": 3, "epochs": None,
                         "batch_size": 8, "rank": 4, "target_epsilon": 50.0, **case.training},
        },
        "ota": {"enabled": True, "device_id": "dev1", "groups": ["east"],
                "trusted_root": str(fleet_repo / "metadata" / "1.root.json"),
                "broker": {"host": "127.0.0.1", "port": broker.port, "ca_file": str(broker.ca),
                           "cert_file": str(broker.cert("dev1")), "key_file": str(broker.key("dev1")),
                           "username": "dev1", "password_file": str(broker.password_file("dev1")), "timeout_s": 5},
                "status_interval_s": 1},
        # A member of a real federation (its SuperNode joins the module's SuperLink); the
        # federated row drives its rounds through the daemon's /v2/federated routes.
        "federated": superlink.federated_section(adapter=FEDERATED, round_epsilon=5.0, min_examples=8),
    }
    path = tmp / "lorad.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = start_daemon(tmp / "state", "--config", str(path))
    served = Served(case, daemon, path, f"/v2/models/{case.id}", *case.expected(section),
                    case.peft_for(tmp))
    files = read_peft_dir(served.peft_dir)
    served.upload("ref", files)
    served.upload("ref-copy", files)
    served.upload("neg", _scaled_b(files, -1.0))
    served.upload("half", _scaled_b(files, 0.5))
    try:
        yield served
    finally:
        assert daemon.stop() == 0, daemon.logs()


def test_a_peft_adapter_serves_what_torch_and_peft_answer(served: Served) -> None:
    case = served.case
    np.testing.assert_allclose(served.infer(), served.expected_base, atol=case.atol)
    np.testing.assert_allclose(served.infer("ref"), served.expected_adapted, atol=case.atol)
    # The adapter changes the answers by more than the tolerance: the check can fail.
    assert np.abs(served.expected_adapted - served.expected_base).max() > 10 * case.atol


def test_concurrent_mixed_batches_answer_as_single_requests(served: Served) -> None:
    choices = [None, "ref", "neg", "half"]
    single = {a: served.infer(a) for a in choices}
    before = batcher_counts(served.daemon)
    errors: list[str] = []
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        start.wait(timeout=60)
        for k in range(3):
            adapter = choices[(i + k) % len(choices)]
            try:
                got = served.infer(adapter)
            except AssertionError as e:
                errors.append(f"{adapter}: {e}")
                return
            if not np.allclose(got, single[adapter], atol=BATCH_ATOL, rtol=0):
                errors.append(f"{adapter}: max difference {np.abs(got - single[adapter]).max():.3g}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    calls, requests = (a - b for a, b in zip(batcher_counts(served.daemon), before, strict=True))
    assert requests == CLIENTS * 3
    assert calls < requests, "concurrent requests never shared a batched call"




def test_composition_is_the_exact_weighted_sum(served: Served) -> None:
    case = served.case
    halves = served.infer(adapters=[{"name": "ref", "weight": 0.5}, {"name": "ref-copy", "weight": 0.5}])
    np.testing.assert_allclose(halves, served.expected_adapted, atol=case.atol)
    cancelled = served.infer(adapters=[{"name": "ref", "weight": 1.0}, {"name": "neg", "weight": 1.0}])
    np.testing.assert_allclose(cancelled, served.expected_base, atol=case.atol)


def test_the_dominant_adapter_is_merged_and_a_new_version_serves_at_once(served: Served) -> None:
    """One adapter answering most requests is served by a merged session (adapters/merged.py)
    with what torch + peft answered; a new version of it answers from its first request;
    a quantised base says why it never merges."""
    case = served.case
    for _ in range(WINDOW // 2 + 1):
        served.infer("ref")
    merge = served.inspect("ref")["merge"]
    if merge["enabled"]:
        wait_until(lambda: served.inspect("ref")["merge"]["merged"], 120, "the dominant adapter to be merged")
    else:  # the merged path is off only where the model's targets cannot be merged exactly
        assert "-int" in case.id and "quantised" in merge["reason"], merge
    np.testing.assert_allclose(served.infer("ref"), served.expected_adapted, atol=case.atol)
    files = read_peft_dir(served.peft_dir)
    half = served.infer("half")
    try:
        served.upload("ref", _scaled_b(files, 0.5))  # hot swap while merged
        np.testing.assert_allclose(served.infer("ref"), half, atol=BATCH_ATOL)
        assert not served.inspect("ref")["merge"]["merged"]  # the merge was of the old version
    finally:
        served.upload("ref", files)
    np.testing.assert_allclose(served.infer("ref"), served.expected_adapted, atol=case.atol)


def test_an_upload_exports_byte_identical(served: Served) -> None:
    r = served.daemon.request("GET", f"{served.base}/adapters/ref/files")
    assert r.status == 200, r.body
    with tarfile.open(fileobj=io.BytesIO(r.body)) as tar:
        exported = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    assert exported == read_peft_dir(served.peft_dir)


def test_a_dp_run_on_user_examples_passes_the_gate_and_serves(served: Served) -> None:
    d = served.daemon
    for body in served.case.examples(np.random.default_rng(11), 32):
        r = d.request("POST", f"{served.base}/adapters/trained/examples", json_body=body)
        assert r.status == 201, r.body
    r = d.request("POST", f"{served.base}/adapters/trained/train")
    assert r.status == 202, r.body
    run_id = r.json()["run_id"]

    def finished() -> dict[str, Any] | None:
        doc = d.request("GET", f"{served.base}/adapters/trained/train").json()
        return doc if doc.get("run_id") == run_id and doc.get("state") == "finished" else None

    result = wait_until(finished, 600, "the training run")
    assert result["status"] == "accepted", result
    r = d.request("POST", f"{served.base}/infer",
                  json_body={"inputs": served.case.inputs, "parameters": {"adapter": "trained"}})
    assert r.status == 200, r.body
    assert r.json()["parameters"] == {"adapter": "trained", "adapter_version": result["version"]}
    privacy = d.request("GET", f"{served.base}/adapters/trained/privacy").json()
    assert privacy["runs"][-1]["status"] == "completed"


def test_a_federated_round_trains_from_the_federations_b_and_charges_the_device(served: Served) -> None:
    d = served.daemon
    for body in served.case.examples(np.random.default_rng(12), 16):
        r = d.request("POST", f"{served.base}/adapters/{FEDERATED}/examples", json_body=body)
        assert r.status == 201, r.body
    info = d.request("GET", "/v2/federated").json()
    assert info["ready"] and info["adapter"] == FEDERATED, info["reasons"]
    start = {name: np.zeros(shape, np.float32) for name, shape in info["shapes"].items()}
    # A round that does not fit (another A) is refused before anything is charged.
    r = d.request("POST", "/v2/federated/round", json_body={
        "round": 1, "a_digest": "sha256:" + "0" * 64, "b": wire.to_text(start)})
    assert r.status == 422 and "is not this device's" in r.json()["error"], r.body
    privacy = f"{served.base}/adapters/{FEDERATED}/privacy"
    assert d.request("GET", privacy).json()["runs"] == []
    r = d.request("POST", "/v2/federated/round", json_body={"round": 1, "a_digest": info["a_digest"],
                                                             "b": wire.to_text(start)})
    assert r.status == 200, r.body
    doc = r.json()
    trained = wire.from_text(doc["b"], what="b")
    assert {k: list(v.shape) for k, v in trained.items()} == info["shapes"]
    assert any(np.any(v != 0) for v in trained.values())
    assert 0 < doc["epsilon_after"] - doc["epsilon_before"] <= 5.0 + 0.05
    runs = d.request("GET", privacy).json()["runs"]
    assert [r["status"] for r in runs] == ["completed"]
    assert FEDERATED not in served.adapters()  # nothing installed: the update went to the federation


def test_a_fleet_update_installs_passes_its_health_check_and_serves(served: Served, broker: Broker,
                                                                    fleet_repo: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    name = f"ota-{served.case.id}"
    capsys.readouterr()
    rc = loractl_main(["--json", "fleet", "publish", str(fleet_repo), "--name", name,
                       "--adapter", str(served.peft_dir), "--group", "east", "--config", str(served.config),
                       *fleet_args(broker)])
    assert rc == 0, capsys.readouterr()
    # An install is kept only if the swapped-in version answers the probes the fleet tool
    # recorded with the base model (otherwise it is rolled back and never listed).
    wait_until(lambda: name in served.adapters(), 120, f"the OTA install of {name}")
    np.testing.assert_allclose(served.infer(name), served.expected_adapted, atol=served.case.atol)
