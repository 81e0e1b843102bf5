"""Text generation with SmolLM2-135M through a real ``lorad serve``: /generate, /generate_stream,
mixed-adapter batches, the KV cache budget, disconnects, bad input and ``loractl generate``.

The daemon runs the model imported from its GGUF with ``model.quantized_compute: fp32`` where a
test compares token for token (fp32 products give the same values whatever the batch;
int8 compute rounds activations, so a batch's shape can move a token: README, "The language
model"). The reference is an independent greedy loop over a plain ONNX Runtime session of the
same file, with its own KV cache handling.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import threading
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from lorad.adapters.bert_builder import TOKENIZER_KEY
from lorad.adapters.llama_builder import past_names, present_names
from lorad.adapters.onnx_compat import set_quantized_compute
from lorad.adapters.peft_format import WEIGHTS_FILE
from lorad.daemon.ctl import main as loractl_main
from lorad.daemon.ctl.client import multipart_body
from tests.integration.lorad_process import RunningDaemon, start_daemon, wait_until
from tests.smollm2_files import DATA, write_model

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

MODEL = "smollm2"
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
KV_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
PEFT = DATA / "peft_adapter"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("smollm2") / "smollm2.onnx")


def _config(path: Path, model: Path, *, trainer: bool = False, **generation: Any) -> Path:
    targets = json.loads((PEFT / "adapter_config.json").read_text())["target_modules"]
    doc = {"model": {"name": MODEL, "path": str(model), "targets": sorted(targets), "rank": 8,
                     "quantized_compute": "fp32"},
           "generation": {"max_concurrent": 8, **generation}, "trainer": {"enabled": trainer}}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def daemon(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    tmp = tmp_path_factory.mktemp("generate")
    d = start_daemon(tmp / "state", "--config", str(_config(tmp / "lorad.yaml", model_file)))
    try:
        for name, factor in (("alice", 3.0), ("bob", -4.0), ("carol", 6.0)):
            files = {f.name: f.read_bytes() for f in PEFT.iterdir()}
            files[WEIGHTS_FILE] = _scaled_b(files[WEIGHTS_FILE], factor)
            body, ctype = multipart_body(files)
            r = d.request("PUT", f"/v2/models/{MODEL}/adapters/{name}", body=body, content_type=ctype)
            assert r.status in (200, 201), r.body
        yield d
    finally:
        d.stop()


def _scaled_b(weights: bytes, factor: float) -> bytes:
    tensors = load_safetensors(weights)
    return save_safetensors({k: (v * np.float32(factor) if "lora_B" in k else v) for k, v in tensors.items()})


def _generate(d: RunningDaemon, text: str, **params: Any) -> dict[str, Any]:
    r = d.request("POST", f"/v2/models/{MODEL}/generate", json_body={"text_input": text, "parameters": params})
    assert r.status == 200, r.body
    return r.json()


def _stream(d: RunningDaemon, text: str, **params: Any) -> list[dict[str, Any]]:
    r = d.request("POST", f"/v2/models/{MODEL}/generate_stream", json_body={"text_input": text, "parameters": params})
    assert r.status == 200, r.body
    assert r.headers["Content-Type"].startswith("text/event-stream")
    return [json.loads(line[6:]) for line in r.body.decode().splitlines() if line.startswith("data: ")]


def _metric(d: RunningDaemon, name: str) -> float:
    text = d.request("GET", "/metrics").body.decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m is not None, name
    return float(m.group(1))


class _Reference:
    """Greedy decoding written independently of lorad's loop: a plain session, batch 1."""

    def __init__(self, model_file: Path) -> None:
        from tokenizers import Tokenizer  # not at the top: the ort-training venv collects this module without it

        model = set_quantized_compute(onnx.load(str(model_file)), "fp32")
        self.tokenizer = Tokenizer.from_str({p.key: p.value for p in model.metadata_props}[TOKENIZER_KEY])
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.outputs = ["logits"] + [n for i in range(LAYERS) for n in present_names(i)]

    def greedy(self, text: str, max_tokens: int) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)] * (2 * LAYERS)
        new: list[int] = []
        feed, start = ids, 0
        while len(new) < max_tokens:
            total = start + len(feed)
            feeds = {"input_ids": np.array([feed], np.int64), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.arange(start, total, dtype=np.int64)[None]}
            feeds.update({n: p for n, p in zip([n for i in range(LAYERS) for n in past_names(i)], past, strict=True)})
            out = self.session.run(self.outputs, feeds)
            past, token = out[1:], int(out[0][0, -1].argmax())
            if token == 2:  # <|im_end|>, the end-of-sequence token
                break
            new.append(token)
            feed, start = [token], total
        return new


def test_greedy_generation_equals_an_independent_greedy_loop_and_the_stream_says_the_same(
        daemon: RunningDaemon, model_file: Path) -> None:
    ref = _Reference(model_file)
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        expected = ref.tokenizer.decode(ref.greedy(prompt, 24))
        doc = _generate(daemon, prompt, max_tokens=24)
        assert doc["text_output"] == expected
        assert (doc["model_name"], doc["finish_reason"], doc["usage"]["completion_tokens"]) == (MODEL, "length", 24)
        events = _stream(daemon, prompt, max_tokens=24)
        assert "".join(e["text_output"] for e in events) == expected
        assert len(events) > 10 and events[-1]["finish_reason"] == "length"
    assert _generate(daemon, "The capital of France is", max_tokens=2)["text_output"] == " Paris."


def test_concurrent_generations_with_different_adapters_share_decode_steps_and_answer_as_alone(
        daemon: RunningDaemon) -> None:
    prompts = ["Once upon a time", "The weather today", "My favourite food is", "In 1969, the",
               "Machine learning is", "Dear Sir,", "The best way to learn", "Yesterday I went"]
    adapters: list[str | None] = ["alice", "bob", "carol", None, "alice", "bob", "carol", None]
    alone = [_generate(daemon, p, max_tokens=20, **({"adapter": a} if a else {}))["text_output"]
             for p, a in zip(prompts, adapters, strict=True)]
    base = [_generate(daemon, p, max_tokens=20)["text_output"] for p in prompts]
    assert sum(a != b for a, b in zip(alone, base, strict=True)) >= 3  # the adapters change the text
    steps, tokens = _metric(daemon, "lorad_generation_steps_total"), _metric(daemon, "lorad_generated_tokens_total")
    together: list[str | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        start.wait()
        together[i] = _generate(daemon, prompts[i], max_tokens=20,
                                **({"adapter": adapters[i]} if adapters[i] else {}))["text_output"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    new_steps = _metric(daemon, "lorad_generation_steps_total") - steps
    new_tokens = _metric(daemon, "lorad_generated_tokens_total") - tokens
    assert new_tokens == 8 * 20 and new_steps < new_tokens / 2  # decode steps were shared


def test_composition_seeds_stop_strings_chat_and_suggestions(daemon: RunningDaemon) -> None:
    composed = _generate(daemon, "Once upon a time", max_tokens=16,
                         adapters=[{"name": "alice", "weight": 1.0}, {"name": "bob", "weight": 0.5}])["text_output"]
    # alice + 0.5·bob is the PEFT adapter's delta × (3 - 2): bob is it with B × -4, alice with B × 3.
    files = {f.name: f.read_bytes() for f in PEFT.iterdir()}
    body, ctype = multipart_body(files)
    assert daemon.request("PUT", f"/v2/models/{MODEL}/adapters/unit", body=body, content_type=ctype).status == 201
    assert composed == _generate(daemon, "Once upon a time", max_tokens=16, adapter="unit")["text_output"]

    sampled = [_generate(daemon, "Once upon a time", max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=s)["text_output"]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]

    full = _generate(daemon, "The capital of France is", max_tokens=12)["text_output"]
    cut = _generate(daemon, "The capital of France is", max_tokens=12, stop=["\n"])
    assert (cut["text_output"], cut["finish_reason"]) == (full.split("\n")[0], "stop")

    chat = _generate(daemon, "What is the capital of France?", max_tokens=24, chat=True)
    assert "Paris" in chat["text_output"] and chat["usage"]["prompt_tokens"] > 20  # the template's system turn

    r = daemon.request("POST", f"/v2/models/{MODEL}/generate",
                       json_body={"text_input": "I would like a cup of ", "parameters": {"mode": "suggest", "k": 3}})
    assert r.status == 200, r.body
    words = [s["word"] for s in r.json()["suggestions"]]
    assert words[0] == "coffee" and len(words) == 3
    healed = _generate(daemon, "The capital of France is P", mode="suggest", k=2)["suggestions"]
    assert (healed[0]["word"], healed[0]["completion"]) == ("Paris", "aris")


@pytest.mark.parametrize(("params", "field"), [
    ({"max_tokens": 0}, "parameters.max_tokens"),
    ({"max_tokens": 5000}, "parameters.max_tokens"),
    ({"temperature": -1}, "parameters.temperature"),
    ({"top_p": 0}, "parameters.top_p"),
    ({"top_k": 1.5}, "parameters.top_k"),
    ({"seed": "x"}, "parameters.seed"),
    ({"stop": ["a"] * 9}, "parameters.stop"),
    ({"mode": "fast"}, "parameters.mode"),
    ({"temperatur": 1}, "temperatur"),
    ({"system": "be brief"}, "parameters.system"),
    ({"mode": "suggest", "chat": True}, "parameters.chat"),
    ({"adapter": 3}, "parameters.adapter"),
])
def test_bad_parameters_are_a_400_naming_the_field(daemon: RunningDaemon, params: dict[str, Any], field: str) -> None:
    r = daemon.request("POST", f"/v2/models/{MODEL}/generate", json_body={"text_input": "hi", "parameters": params})
    assert r.status == 400 and field in r.json()["error"], r.body


def test_bad_prompts_are_a_400(daemon: RunningDaemon) -> None:
    for body, says in (({"text_input": ""}, "text_input"), ({"prompt": "hi"}, "prompt"), ([1, 2], "JSON object"),
                       ({"text_input": "word " * 2100, "parameters": {"max_tokens": 10}}, "context")):
        r = daemon.request("POST", f"/v2/models/{MODEL}/generate", json_body=body)
        assert r.status == 400 and says in r.json()["error"], r.body
    r = daemon.request("POST", f"/v2/models/{MODEL}/generate", body=b"{not json", content_type="application/json")
    assert r.status == 400
    r = daemon.request("POST", f"/v2/models/{MODEL}/generate_stream", json_body={"text_input": "x", "parameters": {"mode": "suggest"}})
    assert r.status == 400 and "/generate" in r.json()["error"]
    r = daemon.request("POST", "/v2/models/other/generate", json_body={"text_input": "x"})
    assert r.status == 404


def _open_stream(d: RunningDaemon, text: str, **params: Any) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urlsplit(d.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    conn.request("POST", f"/v2/models/{MODEL}/generate_stream", body=json.dumps({"text_input": text, "parameters": params}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first piece of text arrived
    return conn, response


def test_a_client_that_leaves_mid_stream_frees_its_slot(daemon: RunningDaemon) -> None:
    conn, _ = _open_stream(daemon, "Count to a thousand: 1, 2, 3,", max_tokens=1000)
    assert _metric(daemon, "lorad_generations_running") == 1
    conn.sock.close() if conn.sock else None
    conn.close()
    wait_until(lambda: _metric(daemon, "lorad_generations_running") == 0, 30, "the abandoned generation to end")
    assert _metric(daemon, "lorad_generation_kv_cache_reserved_bytes") == 0


def test_kv_cache_budget_refuses_with_503_while_full_and_serves_after(model_file: Path, tmp_path: Path) -> None:
    # Room for one generation of up to 200 tokens, not two; the trainer on (the default).
    budget = 300 * KV_BYTES_PER_TOKEN
    config = _config(tmp_path / "lorad.yaml", model_file, trainer=True, kv_cache_bytes=budget)
    d = start_daemon(tmp_path / "state", "--config", str(config))
    try:
        ready = d.request("GET", "/v2/health/ready").json()
        assert ready["ready"] and "disabled" not in ready.get("training", {}), ready
        conn, response = _open_stream(d, "Count to a thousand: 1, 2, 3,", max_tokens=190)
        r = d.request("POST", f"/v2/models/{MODEL}/generate", json_body={"text_input": "Hello", "parameters": {"max_tokens": 190}})
        assert r.status == 503 and "generation.kv_cache_bytes" in r.json()["error"], r.body
        r = d.request("POST", f"/v2/models/{MODEL}/generate", json_body={"text_input": "Hello", "parameters": {"max_tokens": 400}})
        assert r.status == 400 and "max_tokens" in r.json()["error"]  # never fits: not a retry-later
        response.read()  # the first generation runs to its end
        conn.close()
        assert _generate(d, "Hello", max_tokens=190)["usage"]["completion_tokens"] > 0
        assert _metric(d, "lorad_generation_kv_cache_budget_bytes") == budget
    finally:
        d.stop()


def test_loractl_generate_streams_and_suggests(daemon: RunningDaemon) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert loractl_main(["--url", daemon.url, "--model", MODEL, "generate", "alice", "The capital of France is",
                             "--max-tokens", "8"]) == 0
    assert out.getvalue().rstrip("\n") == _generate(daemon, "The capital of France is", max_tokens=8, adapter="alice")["text_output"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert loractl_main(["--url", daemon.url, "--model", MODEL, "generate", "-", "I would like a cup of ", "--suggest", "2"]) == 0
    assert out.getvalue().splitlines()[0].startswith("coffee\t")
    assert loractl_main(["--url", daemon.url, "--model", MODEL, "generate", "nobody", "x"]) == 1


def test_check_config_opens_the_generation_session(model_file: Path, tmp_path: Path) -> None:
    from lorad.daemon.cli import main as lorad_main

    assert lorad_main(["check-config", str(_config(tmp_path / "lorad.yaml", model_file))]) == 0
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model_file.read_bytes()[: 1 << 20])  # a truncated file: ONNX cannot load it
    assert lorad_main(["check-config", str(_config(tmp_path / "broken.yaml", broken))]) != 0
