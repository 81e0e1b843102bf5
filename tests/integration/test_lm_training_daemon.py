"""DP-LoRA on SmolLM2-135M (4-bit) through a real ``lorad serve``: a user's texts in with
``loractl examples add --file``, a private run on the portable backend against the quantised
base it serves, the validation gate, and the trained version generating.

CI-sized: a few steps on a few dozen of one keyboard user's texts (examples/keyboard/data),
with a large ε, so that the run is short and the gate (margin 0) accepts only a version that
does predict the user's held-out texts better than the base model.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from benchmarks.flower import SuperLink
from lorad.daemon.ctl import main as loractl_main
from lorad.daemon.federated import wire
from lorad.ota.privacy import PRIVACY_FILE, PrivacyRecord
from tests.integration.lorad_process import RunningDaemon, start_daemon, wait_until
from tests.smollm2_files import write_model

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

MODEL = "smollm2"
REPO = Path(__file__).resolve().parents[2]
BOB = REPO / "examples" / "keyboard" / "data" / "users" / "bob"
FEDERATED = "keyboard"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, superlink: SuperLink) -> Iterator[RunningDaemon]:
    tmp = tmp_path_factory.mktemp("lm-training")
    model = write_model(tmp / "smollm2.onnx")
    config = {
        "model": {"name": MODEL, "path": str(model), "targets": ["q_proj", "v_proj"], "rank": 8},
        "generation": {"max_concurrent": 2},
        "trainer": {
            "enabled": True, "testing": True, "noise": "seeded", "noise_seed": 5, "schedule": False,
            "intra_op_threads": 2,
            "store": {"max_examples_per_user": 100},
            "defaults": {"min_train_examples": 16, "min_holdout_examples": 8, "holdout_fraction": 0.25,
                         "gate_noise_multiplier": 0.5, "validation_margin": 0.0, "steps": 12, "epochs": None,
                         "batch_size": 8, "target_epsilon": 200.0, "learning_rate": 0.02, "clip_norm": 1.0},
            # The federation's adapter: two steps a round (the row checks the path).
            "adapters": {FEDERATED: {"steps": 2}},
            # A round obeys the device policy; the suite's own load must not keep it out.
            "policy": {"max_load_per_cpu": 1000.0, "max_requests_per_s": 1e6},
        },
        # The keyboard is the federation's classic: a member of a real SuperLink's federation.
        "federated": superlink.federated_section(adapter=FEDERATED, round_epsilon=20.0, min_examples=8),
    }
    path = tmp / "lorad.yaml"
    path.write_text(yaml.safe_dump(config))
    d = start_daemon(tmp / "state", "--config", str(path))
    try:
        yield d
    finally:
        assert d.stop() == 0, d.logs()


def _loractl(d: RunningDaemon, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = loractl_main(["--url", d.url, "--state-dir", str(d.state_dir), "--model", MODEL, *args])
    return rc, out.getvalue()


def test_bad_text_examples_are_refused_naming_what_is_allowed(daemon: RunningDaemon) -> None:
    base = f"/v2/models/{MODEL}/adapters/bob/examples"
    for body, words in (({"text": "see you at the bridge", "label": 3}, "(no label"),
                        ({"inputs": [], "label": 0}, '{"text": "...", "user"'),
                        ({"text": 42, "user": "bob"}, "'text' must be a string"),
                        ({"text": "x", "user": "bob"}, "at least 2"),
                        ({"text": "word " * 2000, "user": "bob"}, "trainer.max_text_tokens"),
                        ({"text": "on call again tonight"}, "names no user")):
        r = daemon.request("POST", base, json_body=body)
        assert r.status in (400, 422) and words in r.json()["error"], (body, r.body)
    assert daemon.request("GET", base).json()["examples"] == 0
    # Too few texts: refused once the (private, charged) count estimate says so; no steps run.
    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/bob/train")
    assert r.status == 400 and "too few examples" in r.json()["error"], r.body
    privacy = daemon.request("GET", f"/v2/models/{MODEL}/adapters/bob/privacy").json()
    assert not any(run.get("steps_done") for run in privacy["runs"]), privacy


def test_a_private_run_on_a_users_texts_passes_the_gate_and_generates(daemon: RunningDaemon, tmp_path: Path) -> None:
    lines = [json.loads(line) for line in (BOB / "train.jsonl").read_text().splitlines()][:48]
    jsonl = tmp_path / "bob.jsonl"
    jsonl.write_text("".join(json.dumps(doc) + "\n" for doc in lines))
    rc, out = _loractl(daemon, "examples", "add", "bob", "--file", str(jsonl))
    assert rc == 0, out
    assert daemon.request("GET", f"/v2/models/{MODEL}/adapters/bob/examples").json()["examples"] == 48
    # A plain-text file: one text per line.
    plain = tmp_path / "more.txt"
    plain.write_text("On call again tonight, ping me on the #incident-bridge channel\nSam approved the rollback\n")
    rc, out = _loractl(daemon, "examples", "add", "bob", "--file", str(plain), "--user", "bob")
    assert rc == 0, out

    r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/bob/train")
    assert r.status == 202, r.body
    run_id = r.json()["run_id"]

    def finished() -> dict[str, Any] | None:
        doc = daemon.request("GET", f"/v2/models/{MODEL}/adapters/bob/train").json()
        return doc if doc.get("run_id") == run_id and doc.get("state") == "finished" else None

    result = wait_until(finished, 900, "the training run")
    assert result["status"] == "accepted", (result, daemon.logs()[-3000:])

    prompt = "On call again tonight, ping me on the"
    base = daemon.request("POST", f"/v2/models/{MODEL}/generate",
                          json_body={"text_input": prompt, "parameters": {"max_tokens": 6}}).json()
    adapted = daemon.request("POST", f"/v2/models/{MODEL}/generate",
                             json_body={"text_input": prompt, "parameters": {"max_tokens": 6, "adapter": "bob"}})
    assert adapted.status == 200, adapted.body
    assert adapted.json()["text_output"] != base["text_output"]

    privacy = daemon.request("GET", f"/v2/models/{MODEL}/adapters/bob/privacy").json()
    assert privacy["runs"][-1]["status"] == "completed" and privacy["epsilon_spent"] > 0
    assert privacy["guarantee"] == "per user"
    info = daemon.request("GET", f"/v2/models/{MODEL}/adapters/bob").json()
    record = info["meta"]["privacy"]
    assert record["unit"] == "user" and record["example"].startswith("one submitted text")
    assert record["base_fingerprint"] == info["base_fingerprint"]
    assert record["examples"] > 0 and record["epsilon"] == pytest.approx(privacy["user_epsilon_spent"])
    # The exported version carries the record as lorad_privacy.json: what `loractl fleet
    # publish --adapter DIR` signs into the fleet's target metadata.
    r = daemon.request("GET", f"/v2/models/{MODEL}/adapters/bob/files")
    with tarfile.open(fileobj=io.BytesIO(r.body)) as tar:
        exported = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    assert PrivacyRecord.from_dict(json.loads(exported[PRIVACY_FILE])).to_dict() == record


def test_a_federated_round_on_the_language_model_trains_b_from_the_federations_start(daemon: RunningDaemon) -> None:
    for doc in [json.loads(line) for line in (BOB / "train.jsonl").read_text().splitlines()][:16]:
        r = daemon.request("POST", f"/v2/models/{MODEL}/adapters/{FEDERATED}/examples",
                           json_body={"text": doc["text"], "user": "bob"})
        assert r.status == 201, r.body
    info = daemon.request("GET", "/v2/federated").json()
    assert info["ready"], info["reasons"]
    start = {name: np.zeros(shape, np.float32) for name, shape in info["shapes"].items()}
    r = daemon.request("POST", "/v2/federated/round", json_body={"round": 1, "a_digest": info["a_digest"],
                                                                  "b": wire.to_text(start)})
    assert r.status == 200, r.body
    doc = r.json()
    trained = wire.from_text(doc["b"], what="b")
    assert set(trained) == set(info["shapes"]) and any(np.any(v != 0) for v in trained.values())
    assert doc["steps"] == 2 and 0 < doc["epsilon_after"] - doc["epsilon_before"] <= 20.0 + 0.1
    privacy = daemon.request("GET", f"/v2/models/{MODEL}/adapters/{FEDERATED}/privacy").json()
    assert [run["status"] for run in privacy["runs"]] == ["completed"]
