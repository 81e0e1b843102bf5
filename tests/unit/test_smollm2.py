"""SmolLM2-135M-Instruct imported from its GGUF file without torch, checked against two references.

* Hugging Face transformers loading the same GGUF (``gguf_file=``) and PEFT on it: token ids of
  every line of a 2,121-line corpus, the top logits at 640 positions of real text, and a PEFT
  adapter's logits, computed once by ``tests/data/smollm2/make_reference.py`` (versions in
  ``reference.json``).
* A float64 numpy forward written here from gguf's own dequantisation, in llama.cpp's layout
  (q/k rows as the file stores them, rotary embedding on adjacent pairs): independent of the
  importer's un-permutation and of ONNX Runtime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lorad.adapters.bert_builder import TOKENIZER_KEY
from lorad.adapters.engine import InferenceEngine
from lorad.adapters.gguf_import import (
    CHAT_TEMPLATE_KEY,
    GgufFile,
    import_gguf,
    llama_config,
    llama_weights,
    q8_0_to_embedding,
    read_gguf,
    unpermute_rows,
)
from lorad.adapters.llama_builder import (
    LLM_CONFIG_KEY,
    LlamaConfig,
    QuantLinear,
    past_names,
    position_ids_from_mask,
    present_names,
)
from lorad.adapters.module_paths import ModulePaths
from lorad.adapters.onnx_compat import set_quantized_compute
from lorad.adapters.peft_format import load_peft, read_peft_dir
from tests.smollm2_files import gguf_path

pytestmark = pytest.mark.smollm2

DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2"
REFERENCE = np.load(DATA / "reference.npz")
META = json.loads((DATA / "reference.json").read_text(encoding="utf-8"))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def gguf_file() -> GgufFile:
    return read_gguf(gguf_path())


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return import_gguf(gguf_path())


@pytest.fixture(scope="module")
def cfg(gguf_file: GgufFile) -> LlamaConfig:
    return llama_config(gguf_file)


def _session(model: onnx.ModelProto, compute: str) -> ort.InferenceSession:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(set_quantized_compute(copy, compute).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The model as lorad serves it by default (model.quantized_compute int8: activations
    quantised per block inside the 4- and 8-bit products, as llama.cpp computes)."""
    return _session(model, "int8")


@pytest.fixture(scope="module")
def exact_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """model.quantized_compute fp32: the dequantised weights times fp32 activations."""
    return _session(model, "fp32")


def _tokenizer(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    return Tokenizer.from_str({p.key: p.value for p in model.metadata_props}[TOKENIZER_KEY])


def _ragged(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def _feeds(cfg: LlamaConfig, ids: np.ndarray, mask: np.ndarray, past: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One call's inputs: ``mask`` covers past and new tokens; no ``past`` means an empty cache."""
    n, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, s)}
    empty = np.zeros((n, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    for i in range(cfg.num_hidden_layers):
        key, value = past_names(i)
        feeds[key] = empty if past is None else past[2 * i]
        feeds[value] = empty if past is None else past[2 * i + 1]
    return feeds


def _run(session: ort.InferenceSession, cfg: LlamaConfig, ids: np.ndarray, mask: np.ndarray,
         past: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    names = ["logits"] + [n for i in range(cfg.num_hidden_layers) for n in present_names(i)]
    out = session.run(names, _feeds(cfg, ids, mask, past))
    return out[0], out[1:]


# --- The float64 reference, in llama.cpp's layout ------------------------------------------


def _dequantized(f: GgufFile, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = f.tensors[name]
    return np.asarray(dequantize(t.data, GGMLQuantizationType(t.type_id)), np.float64).reshape(t.shape)


def _reference_logits(f: GgufFile, cfg: LlamaConfig, ids: Sequence[int]) -> np.ndarray:
    """Logits ``[seq, vocab]`` of one unpadded sequence, float64, llama.cpp's arithmetic:
    q/k weights as stored (permuted) and RoPE rotating adjacent pairs (x₂ᵢ, x₂ᵢ₊₁)."""
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    s = len(ids)
    table = _dequantized(f, "token_embd.weight")
    x = table[list(ids)]
    angles = np.arange(s)[:, None] * cfg.rope_theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rms(v: np.ndarray, weight: str) -> np.ndarray:
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps) * _dequantized(f, weight)

    def rope(v: np.ndarray) -> np.ndarray:
        out = np.empty_like(v)
        out[..., 0::2] = v[..., 0::2] * cos - v[..., 1::2] * sin
        out[..., 1::2] = v[..., 0::2] * sin + v[..., 1::2] * cos
        return out

    causal = np.triu(np.full((s, s), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        def w(name: str, i: int = i) -> np.ndarray:
            return _dequantized(f, f"blk.{i}.{name}.weight")

        h = rms(x, f"blk.{i}.attn_norm.weight")
        q = rope((h @ w("attn_q").T).reshape(s, heads, d))
        k = rope((h @ w("attn_k").T).reshape(s, kv, d))
        v = (h @ w("attn_v").T).reshape(s, kv, d)
        ctx = np.empty((s, heads, d))
        for head in range(heads):
            scores = q[:, head] @ k[:, head // (heads // kv)].T / np.sqrt(d) + causal
            p = np.exp(scores - scores.max(-1, keepdims=True))
            ctx[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head // (heads // kv)]
        x = x + ctx.reshape(s, heads * d) @ w("attn_output").T
        h = rms(x, f"blk.{i}.ffn_norm.weight")
        gate = h @ w("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    return rms(x, "output_norm.weight") @ table.T


# --- Tests ----------------------------------------------------------------------------------


def test_config_and_tensor_types_are_those_of_the_file(gguf_file: GgufFile, cfg: LlamaConfig) -> None:
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    kinds = [t.type_id for t in gguf_file.tensors.values()]
    assert (kinds.count(3), kinds.count(8), kinds.count(0)) == (210, 1, 61)  # Q4_1, Q8_0, F32


def test_matmulnbits_weights_equal_ggufs_own_dequantisation(gguf_file: GgufFile, cfg: LlamaConfig) -> None:
    """Every 4-bit matrix, as MatMulNBits defines it and as ONNX Runtime computes it (x = I),
    against gguf.quants.dequantize of the same rows (q/k un-permuted the same way)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = llama_weights(gguf_file, cfg)
    worst_definition = worst_runtime = 0.0
    for i in range(cfg.num_hidden_layers):
        nodes, inits, outputs, expected = [], [], [], {}
        for gguf_name, leaf in zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
                                   LINEARS, strict=True):
            reference = _dequantized(gguf_file, f"blk.{i}.{gguf_name}.weight")
            if gguf_name in ("attn_q", "attn_k"):
                reference = unpermute_rows(reference, cfg.num_attention_heads if gguf_name == "attn_q" else cfg.num_key_value_heads)
            lin = weights.linears[f"model.layers.{i}.{leaf}"]
            assert isinstance(lin, QuantLinear) and lin.zero_points is not None
            worst_definition = max(worst_definition, float(np.abs(lin.dequantize() - reference).max()))
            names = [f"{leaf}.B", f"{leaf}.scales", f"{leaf}.zp"]
            inits += [numpy_helper.from_array(a, n) for a, n in zip((lin.packed, lin.scales, lin.zero_points), names, strict=True)]
            nodes.append(helper.make_node("MatMulNBits", [f"eye{lin.in_features}", *names], [leaf], domain="com.microsoft",
                                          K=lin.in_features, N=lin.out_features, bits=4, block_size=32))
            outputs.append(helper.make_tensor_value_info(leaf, TensorProto.FLOAT, None))
            expected[leaf] = reference
        inputs = [helper.make_tensor_value_info(f"eye{k}", TensorProto.FLOAT, [k, k]) for k in (cfg.hidden_size, cfg.intermediate_size)]
        m = helper.make_model(helper.make_graph(nodes, "check", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 9
        got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            list(expected), {f"eye{k}": np.eye(k, dtype=np.float32) for k in (cfg.hidden_size, cfg.intermediate_size)})
        for out, reference in zip(got, expected.values(), strict=True):
            worst_runtime = max(worst_runtime, float(np.abs(out.T - reference).max()))
    # d·q + m against (q + m/d)·d in fp32: a rounding of m/d, never more than a few ulp of the weights.
    assert worst_definition < 1e-6, worst_definition
    assert worst_runtime < 1e-6, worst_runtime

    embedding = q8_0_to_embedding(gguf_file.tensors["token_embd.weight"].data)
    assert np.array_equal(embedding.dequantize(), _dequantized(gguf_file, "token_embd.weight").astype(np.float32))


def test_logits_match_transformers_on_640_positions_of_real_text(
        exact_session: ort.InferenceSession, session: ort.InferenceSession, cfg: LlamaConfig) -> None:
    ids = REFERENCE["text_ids"][None]
    top_ids = REFERENCE["top_ids"].astype(np.int64)
    assert len(top_ids) >= 500
    logits = _run(exact_session, cfg, ids, np.ones_like(ids))[0][0]
    agreement = float((logits.argmax(-1) == top_ids[:, 0]).mean())
    assert agreement >= 0.99, agreement
    np.testing.assert_allclose(np.take_along_axis(logits, top_ids, -1), REFERENCE["top_logits"], atol=1e-3)
    np.testing.assert_allclose(logits[REFERENCE["full_positions"]], REFERENCE["full_logits"], atol=1e-3)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(logsumexp, REFERENCE["logsumexp"], atol=1e-3)
    # int8 compute (the default) rounds the activations as llama.cpp does: measured 97.3%
    # top-1 agreement with transformers' fp32 forward; its perplexity is within 1% of llama.cpp's.
    served = _run(session, cfg, ids, np.ones_like(ids))[0][0]
    assert float((served.argmax(-1) == top_ids[:, 0]).mean()) >= 0.96


def test_logits_match_a_float64_reference_and_left_padding_changes_nothing(
    exact_session: ort.InferenceSession, gguf_file: GgufFile, cfg: LlamaConfig, model: onnx.ModelProto
) -> None:
    tokenizer = _tokenizer(model)
    prompts = ["The capital of France is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "x"]
    encoded = [tokenizer.encode(p).ids for p in prompts]
    longest = max(len(e) for e in encoded)
    ids = np.full((len(prompts), longest), 2, np.int64)  # padding_token_id
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):  # left padding, as generation pads a batch
        ids[row, longest - len(e):], mask[row, longest - len(e):] = e, 1
    batched = _run(exact_session, cfg, ids, mask)[0]
    for row, e in enumerate(encoded):
        reference = _reference_logits(gguf_file, cfg, e)
        alone = _run(exact_session, cfg, np.array([e]), np.ones((1, len(e)), np.int64))[0][0]
        np.testing.assert_allclose(alone, reference, atol=2e-3)
        np.testing.assert_allclose(batched[row, longest - len(e):], alone, atol=1e-4)
        assert (alone.argmax(-1) == reference.argmax(-1)).all()
    assert tokenizer.decode([int(batched[0, -1].argmax())]) == " Paris"


def test_incremental_decoding_with_the_kv_cache_equals_one_full_forward(
    exact_session: ort.InferenceSession, cfg: LlamaConfig, model: onnx.ModelProto
) -> None:
    tokenizer = _tokenizer(model)
    rows = [tokenizer.encode(t).ids for t in ("lorad serves LoRA adapters on edge devices and trains them",
                                              "Hot swap without restarting the process")]
    total = max(len(r) for r in rows)
    ids = np.full((2, total), 2, np.int64)
    mask = np.zeros_like(ids)
    for row, r in enumerate(rows):
        ids[row, total - len(r):], mask[row, total - len(r):] = r, 1
    full = _run(exact_session, cfg, ids, mask)[0]

    prefill = total - 5
    logits, past = _run(exact_session, cfg, ids[:, :prefill], mask[:, :prefill])
    steps = [logits]
    for start, stop in ((prefill, prefill + 1), (prefill + 1, prefill + 3), (prefill + 3, total)):  # 1, 2 then 2 tokens
        logits, past = _run(exact_session, cfg, ids[:, start:stop], mask[:, :stop], past)
        assert past[0].shape == (2, cfg.num_key_value_heads, stop, cfg.head_dim)
        steps.append(logits)
    incremental = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    # fp32 compute: a batch of any shape gives the same values to fp32 rounding. (int8 compute
    # rounds each activation to 8 bits, so a last-bit difference between two call shapes can
    # move a rounding step: logits then differ by up to about 1; model.quantized_compute says so.)
    np.testing.assert_allclose(incremental[real], full[real], atol=1e-4)


def test_tokenizer_matches_transformers_on_the_corpus_and_round_trips(model: onnx.ModelProto) -> None:
    """transformers builds the GGUF tokenizer without llama.cpp's ``smollm`` pre-tokenizer (each
    digit alone, as SmolLM2's own tokenizer.json also splits); lorad keeps it. Lines differ only
    where that step does, so without it lorad's tokenizer equals transformers' on every line."""
    from tokenizers import Tokenizer, pre_tokenizers

    tokenizer = _tokenizer(model)
    lines = (DATA / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 1000
    expected = _ragged(REFERENCE["corpus_ids"], REFERENCE["corpus_offsets"])
    ours = [e.ids for e in tokenizer.encode_batch(lines)]
    same = sum(a == b for a, b in zip(ours, expected, strict=True)) / len(lines)
    assert same >= 0.99, same
    for line, ids in zip(lines, ours, strict=True):
        assert tokenizer.decode(ids) == line

    gpt2_only = Tokenizer.from_str(tokenizer.to_str())
    gpt2_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert [e.ids for e in gpt2_only.encode_batch(lines)] == expected
    probes = _ragged(REFERENCE["probe_ids"], REFERENCE["probe_offsets"])
    assert [gpt2_only.encode(p).ids for p in META["probes"]] == probes
    assert tokenizer.encode("12345").ids == [tokenizer.token_to_id(c) for c in "12345"]  # digits alone

    chat = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert chat[0] == 1 and chat[-1] == 2  # control tokens stay whole
    meta = {p.key: p.value for p in model.metadata_props}
    assert "<|im_start|>" in meta[CHAT_TEMPLATE_KEY]
    info = json.loads(meta[LLM_CONFIG_KEY])
    assert (info["eos_token_id"], info["bos_token_id"], info["num_key_value_heads"], info["head_dim"]) == (2, 1, 3, 64)


def test_linears_keep_hugging_face_module_paths(model: onnx.ModelProto) -> None:
    paths = ModulePaths.from_model(model)
    expected = {f"model.layers.{i}.{leaf}" for i in range(30) for leaf in LINEARS}
    assert {w.module for w in paths.weights} == expected
    assert {(w.op, w.source) for w in paths.weights} == {("MatMulNBits", "node_name")}
    q = paths.by_module["model.layers.0.self_attn.q_proj"]
    assert (q.weight, q.in_features, q.out_features) == ("model.layers.0.self_attn.q_proj.weight_Q4", 576, 576)
    assert (paths.by_module["model.layers.3.mlp.down_proj"].in_features, paths.by_module["model.layers.3.mlp.down_proj"].out_features) == (1536, 576)
    assert paths.suggested_targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and not ops & {"GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization"}


def test_peft_adapter_of_the_transformers_model_loads_unchanged_and_matches_peft(model: onnx.ModelProto) -> None:
    engine = InferenceEngine(model, targets=["q_proj", "v_proj", "down_proj"], rank=8, quantized_compute="fp32")
    adapter = load_peft(read_peft_dir(DATA / "peft_adapter"), weight_of=engine.module_paths.weight_of)
    assert len(adapter.weights) == 9
    prepared = engine.prepare(adapter, name="peft", version=1)
    cfg = LlamaConfig(**{k: v for k, v in json.loads({p.key: p.value for p in model.metadata_props}[LLM_CONFIG_KEY]).items()
                         if k in LlamaConfig.__dataclass_fields__})
    ids = REFERENCE["peft_ids"][None]
    feeds = _feeds(cfg, ids, np.ones_like(ids))
    adapted = engine.run(feeds, prepared)["logits"][0]
    top_ids = REFERENCE["peft_top_ids"].astype(np.int64)
    np.testing.assert_allclose(np.take_along_axis(adapted, top_ids, -1), REFERENCE["peft_top_logits"], atol=1e-3)
    assert (adapted.argmax(-1) == top_ids[:, 0]).all()
    base = engine.run(feeds)["logits"][0]
    assert np.abs(adapted - base).max() > 0.5  # the adapter changes the output: the check can fail


def test_import_and_inspect_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorad.daemon.cli import main

    assert main(["import-model", "gguf", str(tmp_path / "nothing.gguf"), str(tmp_path / "x.onnx")]) == 2
    assert "nothing.gguf: no such file" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(64))
    assert main(["import-model", "gguf", str(tmp_path / "bad.gguf"), str(tmp_path / "x.onnx")]) == 2
    assert "bad.gguf is not a GGUF file" in capsys.readouterr().err

    out = tmp_path / "smollm2.onnx"
    assert main(["import-model", "gguf", str(gguf_path()), str(out)]) == 0
    assert "210 LoRA-able linear weights named by module path" in capsys.readouterr().out
    assert main(["inspect-model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["module"]: r for r in report["weights"]}
    assert rows["model.layers.0.self_attn.q_proj"]["op"] == "MatMulNBits"
    assert report["config"] == "targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"


def test_perplexity_on_held_out_text_is_within_one_percent_of_llama_cpp(
        session: ort.InferenceSession, cfg: LlamaConfig, model: onnx.ModelProto) -> None:
    # tests/data/smollm2/llamacpp_reference.json (make_llamacpp_reference.py): llama.cpp's
    # perplexity of heldout.txt, computed as llama-perplexity does: 512-token windows from an
    # empty cache, the second half of each scored, log-softmax in float64.
    ref = json.loads((Path(__file__).resolve().parents[1] / "data" / "smollm2" / "llamacpp_reference.json").read_text())
    p = ref["perplexity"]
    ids = np.asarray(ref["token_ids"], np.int64)
    text = (Path(__file__).resolve().parents[1] / "data" / "smollm2" / "heldout.txt").read_text()
    assert _tokenizer(model).encode(text).ids == ids.tolist()  # the same tokens llama.cpp scored
    n_ctx, first = p["n_ctx"], p["first_scored_position"]
    nll = 0.0
    count = 0
    for w in range(p["n_chunk"]):
        window = ids[w * n_ctx:(w + 1) * n_ctx][None, :]
        logits, _ = _run(session, cfg, window, np.ones_like(window))
        scores = logits[0, first:n_ctx - 1].astype(np.float64)
        log_z = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
        targets = window[0, first + 1:n_ctx]
        nll += float(np.sum(log_z - scores[np.arange(len(targets)), targets]))
        count += len(targets)
    assert count == p["count"]
    ours = float(np.exp(nll / count))
    assert abs(ours / p["perplexity"] - 1) < 0.01, (ours, p["perplexity"])
