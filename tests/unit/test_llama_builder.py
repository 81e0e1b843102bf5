"""The LLaMA decoder builder on a tiny random model: GGUF block conversions, LoRA after MatMulNBits,
fingerprints of quantised weights, module paths. No GGUF file or gguf package needed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lorad.adapters.engine import InferenceEngine
from lorad.adapters.gguf_import import q4_0_to_nbits, q4_1_to_nbits, q8_0_to_embedding, unpermute_rows
from lorad.adapters.llama_builder import (
    FloatLinear,
    LlamaConfig,
    LlamaWeights,
    QuantEmbedding,
    QuantLinear,
    build_llama,
    past_names,
    position_ids_from_mask,
)
from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.lora_banks import SLOT_INPUT, bank_input_names, make_banked_inference_graph
from lorad.adapters.lora_graph import find_targets, fingerprint
from lorad.adapters.module_paths import ModulePaths

CFG = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  vocab_size=50, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=128)
LEAVES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 96), "mlp.up_proj": (64, 96), "mlp.down_proj": (96, 64)}


def _q4_1_rows(d: np.ndarray, m: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """GGML Q4_1 bytes of rows with per-block d, m ([rows, blocks]) and codes ([rows, blocks, 32])."""
    rows, blocks = d.shape
    out = np.zeros((rows, blocks, 20), np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = m.astype(np.float16)[..., None].view(np.uint8)
    out[..., 4:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(rows, -1)


def _random_q4_1(rng: np.random.Generator, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF rows, the float64 values they hold) for a [fan_out, fan_in] weight."""
    blocks = fan_in // 32
    d = rng.uniform(0.005, 0.05, (fan_out, blocks)).astype(np.float16)
    m = rng.uniform(-0.3, 0.0, (fan_out, blocks)).astype(np.float16)
    d[0, 0] = 0  # a constant block: every value is m
    codes = rng.integers(0, 16, (fan_out, blocks, 32)).astype(np.uint8)
    values = d.astype(np.float64)[..., None] * codes + m.astype(np.float64)[..., None]
    return _q4_1_rows(d, m, codes), values.reshape(fan_out, fan_in)


def _tiny(seed: int = 0, *, quantised: bool = True) -> tuple[LlamaWeights, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    linears: dict[str, QuantLinear | FloatLinear] = {}
    dense: dict[str, np.ndarray] = {}
    norms = {"model.norm.weight": rng.uniform(0.5, 1.5, 64).astype(np.float32)}
    for i in range(CFG.num_hidden_layers):
        for leaf, (fan_in, fan_out) in LEAVES.items():
            raw, values = _random_q4_1(rng, fan_in, fan_out)
            name = f"model.layers.{i}.{leaf}"
            linears[name] = q4_1_to_nbits(raw) if quantised else FloatLinear(values.astype(np.float32))
            dense[name] = values
        for norm in ("input_layernorm", "post_attention_layernorm"):
            norms[f"model.layers.{i}.{norm}.weight"] = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    codes = rng.integers(-127, 128, (CFG.vocab_size, 64)).astype(np.int8)
    scales = rng.uniform(0.001, 0.01, (CFG.vocab_size, 2)).astype(np.float16).astype(np.float32)
    return LlamaWeights(QuantEmbedding(codes, scales), linears, norms), dense


def _feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, ids.shape[1])}
    for i in range(CFG.num_hidden_layers):
        for name in past_names(i):
            feeds[name] = np.zeros((ids.shape[0], CFG.num_key_value_heads, 0, CFG.head_dim), np.float32)
    return feeds


def test_q4_1_maps_exactly_to_scale_and_float_zero_point() -> None:
    raw, values = _random_q4_1(np.random.default_rng(1), 96, 8)
    lin = q4_1_to_nbits(raw)
    assert lin.packed.shape == (8, 3, 16) and lin.zero_points is not None
    np.testing.assert_allclose(lin.dequantize(), values, rtol=0, atol=2e-7)
    assert lin.scales[0, 0] == 1 and lin.zero_points[0, 0] == -values[0, 0]  # d = 0: code 0, scale 1, zero point -m


def test_q4_0_and_q8_0_blocks() -> None:
    rng = np.random.default_rng(2)
    d = rng.uniform(0.01, 0.1, (4, 2)).astype(np.float16)
    codes = rng.integers(0, 16, (4, 2, 32)).astype(np.uint8)
    raw = np.zeros((4, 2, 18), np.uint8)
    raw[..., 0:2] = d[..., None].view(np.uint8)
    raw[..., 2:] = codes[..., :16] | (codes[..., 16:] << 4)
    lin = q4_0_to_nbits(raw.reshape(4, -1))
    assert lin.zero_points is None
    np.testing.assert_array_equal(lin.dequantize(), (d.astype(np.float32)[..., None] * (codes.astype(np.float32) - 8)).reshape(4, 64))

    q = rng.integers(-128, 128, (3, 2, 32)).astype(np.int8)
    raw8 = np.zeros((3, 2, 34), np.uint8)
    raw8[..., 0:2] = d[:3, :, None].view(np.uint8)
    raw8[..., 2:] = q.view(np.uint8)
    emb = q8_0_to_embedding(raw8.reshape(3, -1))
    np.testing.assert_array_equal(emb.dequantize(), (d[:3].astype(np.float32)[..., None] * q).reshape(3, 64))


def test_unpermute_rows_undoes_llama_cpps_permute() -> None:
    heads, head_dim = 3, 8
    w = np.arange(heads * head_dim * 5, dtype=np.float64).reshape(heads * head_dim, 5)
    # llama.cpp's convert_hf_to_gguf.py: reshape(heads, 2, dim/2/heads...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)
    with pytest.raises(ValueError, match="cannot be split into 5 heads"):
        unpermute_rows(w, 5)


def test_lora_after_matmulnbits_equals_lora_on_the_dequantised_float_model() -> None:
    """The engine splices ``x·A·B·scale`` after each MatMulNBits target: the same outputs as
    the float model with W + scale·(A·B)ᵀ merged in (built from the same values as MatMul)."""
    quantised, dense = _tiny()
    model = build_llama(CFG, quantised)
    targets = ["q_proj", "v_proj", "down_proj"]
    # fp32 compute: the float reference's arithmetic (int8 compute rounds activations).
    engine = InferenceEngine(model, targets=targets, rank=4, quantized_compute="fp32")
    assert {t.op for t in engine.targets} == {"MatMulNBits"} and len(engine.targets) == 6
    rng = np.random.default_rng(3)
    weights, merged = {}, {}
    for t in engine.targets:
        a = rng.normal(0, 0.2, (t.in_features, 2)).astype(np.float32)
        b = rng.normal(0, 0.2, (2, t.out_features)).astype(np.float32)
        weights[t.weight] = LoraWeights(a, b)
        module = engine.module_paths.module_of(t.weight)
        merged[module] = dense[module] + 1.5 * (a.astype(np.float64) @ b).T
    adapter = LoraAdapter(rank=2, alpha=3.0, weights=weights, base_fingerprint=engine.fingerprint)  # scale 1.5
    ids = np.array([[3, 17, 5, 42, 9, 0, 33]])
    adapted = engine.run(_feeds(ids), engine.prepare(adapter, name="a", version=1))["logits"]
    base = engine.run(_feeds(ids))["logits"]

    float_linears = {name: FloatLinear(merged.get(name, values).astype(np.float32)) for name, values in dense.items()}
    reference = build_llama(CFG, LlamaWeights(quantised.embedding, float_linears, quantised.norms))
    expected = InferenceEngine(reference, targets=["q_proj"], rank=4, quantized_compute="fp32").run(_feeds(ids))["logits"]
    np.testing.assert_allclose(adapted, expected, atol=1e-4)
    assert np.abs(adapted - base).max() > 1e-2

    # The banked graph of mixed batches splices the same nodes: row 0 the adapter, row 1 the base.
    banked = make_banked_inference_graph(engine.base_model, engine.targets, rank=2, slots=2)
    feeds: dict[str, np.ndarray] = {**_feeds(np.concatenate([ids, ids])), SLOT_INPUT: np.array([1, 0])}
    for t in engine.targets:
        a_bank, b_bank = bank_input_names(t.weight)
        feeds[a_bank] = np.zeros((2, t.in_features, 2), np.float32)
        feeds[b_bank] = np.zeros((2, 2, t.out_features), np.float32)
        feeds[a_bank][1], feeds[b_bank][1] = weights[t.weight].A, weights[t.weight].B * np.float32(1.5)
    rows = ort.InferenceSession(banked.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(rows[0], adapted[0], atol=1e-4)
    np.testing.assert_allclose(rows[1], base[0], atol=1e-4)


def test_module_paths_and_fingerprint_of_quantised_weights() -> None:
    weights, _ = _tiny()
    model = build_llama(CFG, weights)
    paths = ModulePaths.from_model(model)
    assert {w.module for w in paths.weights} == {f"model.layers.{i}.{leaf}" for i in range(2) for leaf in LEAVES}
    down = paths.by_module["model.layers.1.mlp.down_proj"]
    assert (down.op, down.in_features, down.out_features, down.source) == ("MatMulNBits", 96, 64, "node_name")

    targets = find_targets(model, ["q_proj"])
    before = fingerprint(model, targets)
    assert before == fingerprint(build_llama(CFG, weights), find_targets(model, ["q_proj"]))
    for suffix in ("weight_scales", "weight_block_offsets", "weight_Q4"):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        init = next(i for i in changed.graph.initializer if i.name == f"model.layers.0.self_attn.q_proj.{suffix}")
        array = onnx.numpy_helper.to_array(init).copy()
        array.flat[0] = array.flat[0] + 1
        init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
        assert fingerprint(changed, targets) != before, suffix


def test_position_ids_and_config_checks() -> None:
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask, 3), [[0, 1, 2], [2, 3, 4]])
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        LlamaConfig(**{**CFG.__dict__, "num_key_value_heads": 3})
    weights, _ = _tiny()
    broken = LlamaWeights(weights.embedding, {k: v for k, v in weights.linears.items() if "up_proj" not in k}, weights.norms)
    with pytest.raises(ValueError, match=r"no weights for model\.layers\.0\.mlp\.up_proj"):
        build_llama(CFG, broken)
