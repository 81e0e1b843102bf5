"""The generation loop on a tiny random LLaMA (tests/unit/test_llama_builder.py's): rows that join
and leave a running batch in every order answer as they do alone, each with its own adapter;
sampling, stop strings and the KV cache budget. No GGUF file needed."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ClassVar

import numpy as np
import pytest

from lorad.adapters.bert_builder import TOKENIZER_KEY
from lorad.adapters.decoder import DecoderSpec
from lorad.adapters.engine import InferenceEngine, PreparedAdapter
from lorad.adapters.errors import OverloadedError
from lorad.adapters.generation import Generator, KvCacheFullError, SamplingParams, TextStream, sample
from lorad.adapters.llama_builder import build_llama, past_names
from lorad.adapters.lora import LoraAdapter, LoraWeights
from tests.unit.test_llama_builder import CFG, _tiny

EOS = CFG.vocab_size - 1
VOCAB = [f"w{i}" for i in range(CFG.vocab_size)]


def _tokenizer() -> Any:
    # Imported here: the ort-training venv collects this module without the tokenizers package.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    weights, _ = _tiny(5)
    model = build_llama(CFG, weights, metadata={TOKENIZER_KEY: _tokenizer().to_str()}, llm_info={"eos_token_id": EOS})
    return InferenceEngine(model, targets=["q_proj", "v_proj", "down_proj"], rank=4, quantized_compute="fp32")


def _adapter(engine: InferenceEngine, seed: int) -> PreparedAdapter:
    rng = np.random.default_rng(seed)
    weights = {t.weight: LoraWeights(rng.normal(0, 0.3, (t.in_features, 4)).astype(np.float32),
                                     rng.normal(0, 0.3, (4, t.out_features)).astype(np.float32)) for t in engine.targets}
    return engine.prepare(LoraAdapter(rank=4, alpha=4.0, weights=weights, base_fingerprint=engine.fingerprint),
                          name=f"a{seed}", version=1)


def _generator(engine: InferenceEngine, **kw: Any) -> Generator:
    spec = DecoderSpec.from_model(engine.base_model)
    assert spec is not None
    args: dict[str, Any] = {"slots": 4, "max_rows": 8, "kv_cache_bytes": 1 << 24, "max_context": 128, "prefill_chunk": 5}
    return Generator(engine, spec, _tokenizer(), **{**args, **kw})


def _reference(engine: InferenceEngine, prompt: list[int], steps: int, prepared: PreparedAdapter | None) -> list[int]:
    """Greedy decoding with the engine's own (unbatched) session and a full forward per token."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        x = np.array([ids], np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
        for i in range(CFG.num_hidden_layers):
            for n in past_names(i):
                feeds[n] = np.zeros((1, CFG.num_key_value_heads, 0, CFG.head_dim), np.float32)
        token = int(engine.run(feeds, prepared)["logits"][0, -1].argmax())
        if token == EOS:
            break
        out.append(token)
        ids.append(token)
    return out


class _Collect:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.done = threading.Event()
        self.info: dict[str, Any] = {}

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "text":
            self.text.append(payload)
        else:
            self.info = payload if kind == "done" else {"error": payload}
            self.done.set()

    def tokens(self) -> list[int]:
        return [VOCAB.index(w) for w in "".join(self.text).split()]


def test_rows_joining_and_leaving_in_any_order_answer_as_alone(engine: InferenceEngine) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, EOS, n).tolist() for n in (3, 17, 1, 9, 26, 6)]
    steps = [12, 4, 20, 7, 9, 15]
    adapters = [None, _adapter(engine, 1), _adapter(engine, 2), None, _adapter(engine, 3), _adapter(engine, 1)]
    expected = [_reference(engine, p, s, a) for p, s, a in zip(prompts, steps, adapters, strict=True)]
    assert len({tuple(e) for e in expected}) == len(expected)
    gen = _generator(engine)
    try:
        # Submitted together: short and long prompts join a running batch on both sides
        # (padding the newcomer, or the batch), rows leave at different steps.
        sinks = [_Collect() for _ in prompts]
        for p, s, a, sink in zip(prompts, steps, adapters, sinks, strict=True):
            gen.submit(p, SamplingParams(max_tokens=s), a, sink, contextlib.ExitStack())
        for sink in sinks:
            assert sink.done.wait(60)
        assert [s.tokens() for s in sinks] == expected
        assert gen.steps < sum(len(e) for e in expected)  # rows shared steps
        assert gen.running() == 0 and gen.reserved_bytes() == 0 and gen.banks.in_use() == {}
    finally:
        gen.close()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine: InferenceEngine) -> None:
    gen = _generator(engine)
    try:
        params = SamplingParams(max_tokens=10, temperature=1.5, top_k=20, top_p=0.9, seed=7)
        alone = _Collect()
        gen.submit([1, 2, 3], params, None, alone, contextlib.ExitStack())
        assert alone.done.wait(60)
        together = [_Collect() for _ in range(3)]
        for i, sink in enumerate(together):
            gen.submit([1, 2, 3] if i == 1 else [4 + i] * (2 + i), params if i == 1 else SamplingParams(max_tokens=8), None,
                       sink, contextlib.ExitStack())
        for sink in together:
            assert sink.done.wait(60)
        assert together[1].text == alone.text
    finally:
        gen.close()


def test_sample_greedy_top_k_top_p_and_the_tempered_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.5, -1.0, 3.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(), rng) == 4
    assert all(sample(logits, SamplingParams(temperature=5.0, top_k=1), rng) == 4 for _ in range(20))
    assert all(sample(logits, SamplingParams(temperature=5.0, top_p=0.01), rng) == 4 for _ in range(20))
    draws = np.array([sample(logits, SamplingParams(temperature=2.0), rng) for _ in range(20000)])
    p = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), p, atol=0.015)
    draws = np.array([sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(5000)])
    assert set(draws.tolist()) == {0, 4}
    a = [sample(logits, SamplingParams(temperature=1.0, seed=3), np.random.default_rng(3)) for _ in range(5)]
    assert len(set(a)) == 1


def test_text_stream_holds_back_stop_prefixes_and_incomplete_characters() -> None:
    tok = _tokenizer()
    stream = TextStream(tok, stop=["w3 w4"])
    out = [stream.push(t) for t in (1, 2, 3)]
    assert [d for d, _ in out] == ["w1", " w2", " "] and not any(s for _, s in out)  # "w3" may start the stop
    assert stream.push(4) == ("", True)  # the stop string ends the text before it
    assert stream.text == "w1 w2 "
    stream = TextStream(tok, stop=["w3 w4"])
    for t in (1, 3):
        stream.push(t)
    assert stream.finish() == "w3"  # ended otherwise: what was held back is sent

    class Bytes:  # a byte-level tokenizer's pieces: "é" is two tokens
        pieces: ClassVar[dict[int, bytes]] = {0: b"a", 1: b"\xc3", 2: b"\xa9"}

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return b"".join(self.pieces[i] for i in ids).decode("utf-8", "replace")

    stream = TextStream(Bytes())
    assert [stream.push(t)[0] for t in (0, 1, 2)] == ["a", "", "é"]


class _Blocking(_Collect):
    """Holds the generator's loop in its first event until released: what is running stays running."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def __call__(self, kind: str, payload: Any) -> None:
        self.go.wait(30)
        super().__call__(kind, payload)


def test_kv_cache_budget_and_context_limits(engine: InferenceEngine) -> None:
    spec = DecoderSpec.from_model(engine.base_model)
    assert spec is not None
    gen = _generator(engine, kv_cache_bytes=60 * spec.kv_bytes_per_token)
    running = _Blocking()
    try:
        with pytest.raises(ValueError, match="max_tokens"):  # 65 tokens never fit 60: a 400, not a retry
            gen.submit([1] * 10, SamplingParams(max_tokens=55), None, _Collect(), contextlib.ExitStack())
        with pytest.raises(ValueError, match="context of 128"):
            gen.check_length(100, 40)
        gen.submit([1, 2], SamplingParams(max_tokens=30), None, running, contextlib.ExitStack())
        assert gen.reserved_bytes() == 32 * spec.kv_bytes_per_token
        with pytest.raises(KvCacheFullError, match=r"generation\.kv_cache_bytes"):  # 2 rows × 32 > 60 tokens
            gen.submit([3, 4], SamplingParams(max_tokens=30), None, _Collect(), contextlib.ExitStack())
        with pytest.raises(KvCacheFullError):  # a short one too: rows are padded to the longest reservation
            gen.submit([3], SamplingParams(max_tokens=2), None, _Collect(), contextlib.ExitStack())
    finally:
        running.go.set()
    try:
        assert running.done.wait(60)
        assert gen.reserved_bytes() == 0
        after = _Collect()
        gen.submit([3, 4], SamplingParams(max_tokens=30), None, after, contextlib.ExitStack())
        assert after.done.wait(60)
    finally:
        gen.close()


def test_adapter_slots_are_shared_and_a_refusal_releases_its_lease(engine: InferenceEngine) -> None:
    gen = _generator(engine, slots=1)
    a, b = _adapter(engine, 1), _adapter(engine, 2)
    running = _Blocking()
    try:
        gen.submit([1, 2], SamplingParams(max_tokens=5), a, running, contextlib.ExitStack())
        released: list[bool] = []
        lease = contextlib.ExitStack()
        lease.callback(released.append, True)
        with pytest.raises(OverloadedError, match="adapter slots"):
            gen.submit([5], SamplingParams(max_tokens=2), b, _Collect(), lease)
        assert released == [True]
        same = _Collect()
        gen.submit([5], SamplingParams(max_tokens=2), a, same, contextlib.ExitStack())  # a's slot is shared
        running.go.set()
        assert running.done.wait(60) and same.done.wait(60)
        assert gen.banks.in_use() == {}
    finally:
        running.go.set()
        gen.close()


def test_cancelled_generations_free_their_row_and_slot(engine: InferenceEngine) -> None:
    gen = _generator(engine)
    try:
        sink = _Collect()
        g = gen.submit([1, 2, 3], SamplingParams(max_tokens=100), _adapter(engine, 4), sink, contextlib.ExitStack())
        g.cancel()
        assert sink.done.wait(60)
        assert sink.info["finish_reason"] == "cancelled" and sink.info["completion_tokens"] < 100
        assert gen.running() == 0 and gen.banks.in_use() == {}
    finally:
        gen.close()
