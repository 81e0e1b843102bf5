"""Text in over real HTTP: the shipped examples/intents config served by a real daemon on MiniLM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import yaml

from lorad.adapters.peft_format import read_peft_dir
from lorad.daemon.ctl.client import multipart_body
from tests.integration.lorad_process import REPO, Response, RunningDaemon, run_loractl, run_lorad, start_daemon

pytestmark = [pytest.mark.minilm, pytest.mark.slow]

EXAMPLE = REPO / "examples" / "intents"
DATA = REPO / "tests" / "data" / "minilm"
INFER = "/v2/models/intents/infer"


@pytest.fixture(scope="module")
def intents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    root = tmp_path_factory.mktemp("intents")
    # The example as a user runs it: build.py next to the shipped lorad.yaml, which names build/intents.onnx.
    shutil.copy(EXAMPLE / "lorad.yaml", root / "lorad.yaml")
    build = subprocess.run([sys.executable, str(EXAMPLE / "build.py"), "--out", str(root / "build" / "intents.onnx"),
                            "--data", str(root / "data")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert build.returncode == 0, build.stderr
    accuracy = json.loads(build.stdout.splitlines()[-1])["base_head_accuracy"]
    assert accuracy["generic"] >= 0.95
    d = start_daemon(root / "state", "--config", str(root / "lorad.yaml"))
    yield d
    assert d.stop() == 0, d.logs()


def _infer(d: RunningDaemon, texts: list[Any], *, adapter: str | None = None, outputs: tuple[str, ...] = ()) -> Response:
    doc: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    if adapter:
        doc["parameters"] = {"adapter": adapter}
    if outputs:
        doc["outputs"] = [{"name": n} for n in outputs]
    return d.request("POST", INFER, json_body=doc)


def _output(r: Response, name: str) -> Any:
    assert r.status == 200, r.body
    return next(o for o in r.json()["outputs"] if o["name"] == name)


def test_metadata_declares_text_in_and_label_names_out(intents: RunningDaemon) -> None:
    meta = intents.request("GET", "/v2/models/intents").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "label", "datatype": "BYTES", "shape": [-1]} in meta["outputs"]
    labels = meta["parameters"]["labels"]
    assert len(labels) == 16 and "kitchen/light_off" in labels


def test_generic_phrasings_get_their_intent(intents: RunningDaemon) -> None:
    r = _infer(intents, ["switch off the kitchen lights", "make the office warmer"], outputs=("label", "probabilities"))
    assert _output(r, "label")["data"] == ["kitchen/light_off", "office/warmer"]
    probs = np.array(_output(r, "probabilities")["data"]).reshape(2, 16)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_uploaded_peft_adapter_serves_torch_outputs(intents: RunningDaemon) -> None:
    body, ctype = multipart_body(read_peft_dir(DATA / "peft_adapter"))
    up = intents.request("PUT", "/v2/models/intents/adapters/peft-ref", body=body, content_type=ctype)
    assert up.status in (200, 201), up.body
    reference = json.loads((DATA / "reference.json").read_text())
    r = _infer(intents, reference["sentences"], adapter="peft-ref", outputs=("sentence_embedding",))
    assert r.json()["parameters"]["adapter"] == "peft-ref"
    got = np.array(_output(r, "sentence_embedding")["data"]).reshape(len(reference["sentences"]), 384)
    np.testing.assert_allclose(got, np.array(reference["peft"]["embeddings"]), atol=1e-4)


@pytest.mark.parametrize(("data", "message"), [
    ([""], "input 'text'[0] is empty"),
    (["lights on", "   "], "input 'text'[1] is empty"),
    (["light " * 80], "input 'text'[0] is 82 tokens long; this model takes at most 64 tokens"),
    (["fine", "\ud800 lamp"], "input 'text'[1] is not valid UTF-8"),
    ([7], "BYTES data must be strings"),
])
def test_bad_text_is_a_400_naming_the_problem(intents: RunningDaemon, data: list[Any], message: str) -> None:
    r = _infer(intents, data)
    assert r.status == 400, r.body
    assert message in r.json()["error"]


def test_invalid_utf8_body_and_numeric_datatype_are_400s(intents: RunningDaemon) -> None:
    raw = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\xff"]}]}'
    r = intents.request("POST", INFER, body=raw, content_type="application/json")
    assert r.status == 400 and "not valid UTF-8" in r.json()["error"]
    r = intents.request("POST", INFER, json_body={"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
    assert r.status == 400 and "the model expects 'BYTES'" in r.json()["error"]
    assert intents.proc.poll() is None


def test_a_users_peft_adapter_learns_their_words(intents: RunningDaemon) -> None:
    # examples/intents/adapters/alice was trained with PEFT in torch by train_user_peft.py.
    body, ctype = multipart_body(read_peft_dir(EXAMPLE / "adapters" / "alice"))
    up = intents.request("PUT", "/v2/models/intents/adapters/alice", body=body, content_type=ctype)
    assert up.status in (200, 201), up.body
    rows = [json.loads(line) for line in (EXAMPLE / "data" / "users" / "alice" / "test.jsonl").read_text().splitlines()]
    texts, truth = [r["text"] for r in rows], [r["label"] for r in rows]

    def accuracy(adapter: str | None) -> float:
        got = _output(_infer(intents, texts, adapter=adapter, outputs=("label",)), "label")["data"]
        return float(np.mean([g == t for g, t in zip(got, truth, strict=True)]))

    base, alice = accuracy(None), accuracy("alice")
    assert alice >= 0.9 and alice > base + 0.3, (base, alice)
    # Alice's "den" is her living room; the base head has no idea which room that is.
    assert _output(_infer(intents, ["turn on the den lights"], adapter="alice", outputs=("label",)), "label")["data"] == \
        ["living_room/light_on"]


def test_text_examples_go_in_as_text_with_label_names(intents: RunningDaemon) -> None:
    # The user's own JSONL, as examples/intents/data ships it, through loractl alone.
    train = EXAMPLE / "data" / "users" / "bob" / "train.jsonl"
    p = run_loractl("--state-dir", str(intents.state_dir), "--json", "examples", "add", "carol", "--file", str(train))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line for line in train.read_text().splitlines() if line.strip()]
    assert json.loads(p.stdout) == {"adapter": "carol", "added": len(lines), "examples": len(lines)}
    p = run_loractl("--state-dir", str(intents.state_dir), "examples", "add", "carol", "--text", "lamp on in the den",
                    "--label", "living_room/light_on")
    assert p.returncode == 0, p.stderr
    path = "/v2/models/intents/adapters/carol/examples"
    bad = {
        "a label the model does not have": ({"text": "lamp on", "label": "garage/light_on"},
                                            "label 'garage/light_on' is not a label of this model; allowed:"),
        "a class number out of range": ({"text": "lamp on", "label": 16}, "allowed: 0..15"),
        "a text over the token limit": ({"text": "light " * 80, "label": 0}, "at most 64 tokens"),
        "an empty text": ({"text": "  ", "label": 0}, "is empty"),
    }
    for what, (body, message) in bad.items():
        r = intents.request("POST", path, json_body=body)
        assert r.status == 422 and message in r.json()["error"], (what, r.body)
    r = intents.request("POST", path, json_body={"text": ["a list"], "label": 0})
    assert r.status == 400 and "'text' must be a string" in r.json()["error"]
    assert intents.request("GET", path).json()["examples"] == len(lines) + 1  # nothing bad was stored


def test_the_shipped_config_trains_out_of_the_box(intents: RunningDaemon) -> None:
    # The checks a run makes before it is charged pass on the example as shipped: the loss
    # reads the intent logits (not the sentence embedding, the model's first output).
    config = intents.state_dir.parent / "lorad.yaml"
    p = run_lorad("check-config", str(config))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["trainer"]["enabled"] is True
    wrong = config.parent / "wrong-output.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["trainer"]["defaults"]["output"] = "sentence_embedding"
    wrong.write_text(yaml.safe_dump(doc))
    p = run_lorad("check-config", str(wrong))
    assert p.returncode == 2
    assert "trainer.defaults.output" in p.stderr and "names 16 labels but output 'sentence_embedding' scores 384" in p.stderr
    assert "logits" in p.stderr  # what to choose instead
