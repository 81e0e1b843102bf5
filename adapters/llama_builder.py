"""Write a LLaMA-family decoder as a LoRA-ready ONNX graph with a KV cache, from quantised weights.

No torch: the graph is written with :mod:`onnx.helper` from numpy arrays. It is what Hugging
Face's ``LlamaForCausalLM`` computes (RMSNorm, rotary embeddings in the ``rotate_half`` layout,
grouped-query attention, SwiGLU MLP, tied or separate LM head), in fp32 activations, with:

* **4-bit linears as** ``com.microsoft.MatMulNBits`` (bits 4, block 32, int8 compute like
  llama.cpp's): ``y = x·Wᵀ`` with W dequantised per 32-value block as ``(code - 8)·scale``;
  GGUF Q4_1's ``d·q + m`` adds ``(m + 8d)`` times the block sums of ``x``, exactly (a float
  zero point would say the same but runs 50x slower in ONNX Runtime). Float linears are
  plain ``MatMul``.
* **Every linear named by its Hugging Face module path**: the node is
  ``/model/layers.0/self_attn/q_proj/MatMulNBits`` as Optimum names its ``MatMul``s, and the
  packed weight ``model.layers.0.self_attn.q_proj.weight_Q4`` (ONNX Runtime's quantiser's
  spelling), so :mod:`lorad.adapters.module_paths` recovers ``model.layers.0.self_attn.q_proj``
  and PEFT adapters trained on the Hugging Face model load with no mapping.
* **An 8-bit embedding table** (GGUF Q8_0: int8 codes, one scale per 32 values) kept 8-bit in
  the file and in memory: ``Gather`` of the codes and scales, then ``Cast``·``Sub``·``Mul``. A
  tied LM head reads the same table as an 8-bit ``MatMulNBits`` (zero point 128); runtimes
  whose CPU kernel lacks 8 bits (before 1.21) get an fp32 head from
  :func:`lorad.adapters.onnx_compat.for_runtime`.
* **Plain ONNX ops elsewhere** (opset 17): RMSNorm as ``Pow``/``ReduceMean``/``Sqrt``/``Div``
  (ONNX Runtime fuses it into ``SimplifiedLayerNormalization``), RoPE as ``Cos``/``Sin`` of
  ``position_ids × inv_freq``, attention as ``MatMul``/``Softmax`` with GQA by broadcasting
  ``[batch, kv_heads, groups, seq, dim]`` against ``[batch, kv_heads, 1, total, dim]``. The
  fused contrib ops (``GroupQueryAttention``, ``RotaryEmbedding``) change their inputs and
  padding rules between runtime releases and have no gradient in lorad's portable trainer.

Inputs and outputs follow Optimum's and onnxruntime-genai's names for decoder models:
``input_ids`` ``[batch, sequence]``, ``attention_mask`` ``[batch, total_sequence]`` (past +
new tokens, 1 = attend), ``position_ids`` ``[batch, sequence]``, and per layer ``i``
``past_key_values.{i}.key``/``.value`` ``[batch, kv_heads, past_sequence, head_dim]``; outputs
``logits`` ``[batch, sequence, vocab]`` and ``present.{i}.key``/``.value`` ``[batch, kv_heads,
total_sequence, head_dim]``. The first call passes pasts of length 0;
:func:`position_ids_from_mask` gives the positions Hugging Face's ``generate`` uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_compat import OPSET, for_runtime

__all__ = [
    "LlamaConfig",
    "QuantLinear",
    "FloatLinear",
    "QuantEmbedding",
    "LlamaWeights",
    "LLM_CONFIG_KEY",
    "build_llama",
    "past_names",
    "present_names",
    "position_ids_from_mask",
    "BLOCK",
]

#: Values per quantisation block (GGUF Q4_0/Q4_1/Q8_0 and the MatMulNBits block_size used here).
BLOCK = 32
#: Model metadata key: the decoder's shape as JSON (layers, heads, vocabulary, special tokens).
LLM_CONFIG_KEY = "lorad.llm"
_MS = "com.microsoft"
_Q8_CODES, _Q8_SCALES = "model.embed_tokens.weight_Q8", "model.embed_tokens.weight_scales"


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters that shape the graph (Hugging Face ``LlamaConfig`` names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_key_value_heads


@dataclass(frozen=True)
class QuantLinear:
    """A 4-bit linear ``y = x·Wᵀ`` in MatMulNBits layout: W is ``[out, in]``, quantised along ``in``.

    ``packed`` ``[out, in/32, 16]`` uint8 holds two codes per byte, the even element in the low
    nibble; ``scales`` and ``zero_points`` are ``[out, in/32]``; ``zero_points`` is float32 (any
    value) or None for the default 8. Value ``j`` of a block is ``(code_j - zero_point)·scale``.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    def __post_init__(self) -> None:
        if self.packed.dtype != np.uint8 or self.packed.ndim != 3 or self.packed.shape[2] != BLOCK // 2:
            raise ValueError(f"packed codes must be uint8 [out, blocks, {BLOCK // 2}], got {self.packed.dtype} {self.packed.shape}")
        if self.scales.shape != self.packed.shape[:2] or self.scales.dtype != np.float32:
            raise ValueError(f"scales must be float32 {list(self.packed.shape[:2])}, got {self.scales.dtype} {list(self.scales.shape)}")
        if self.zero_points is not None and (self.zero_points.shape != self.scales.shape or self.zero_points.dtype != np.float32):
            raise ValueError(f"zero points must be float32 {list(self.scales.shape)}, got "
                             f"{self.zero_points.dtype} {list(self.zero_points.shape)}")

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * BLOCK

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def dequantize(self) -> np.ndarray:
        """W ``[out, in]`` as float32, computed as MatMulNBits defines it (a reference for tests)."""
        codes = np.empty((*self.packed.shape[:2], BLOCK), np.float32)
        codes[..., 0::2] = self.packed & 0x0F
        codes[..., 1::2] = self.packed >> 4
        zp = np.float32(8) if self.zero_points is None else self.zero_points[..., None]
        return ((codes - zp) * self.scales[..., None]).reshape(self.out_features, self.in_features)


@dataclass(frozen=True)
class FloatLinear:
    """A float linear; ``weight`` is ``[out, in]`` (torch's layout)."""

    weight: np.ndarray

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class QuantEmbedding:
    """An 8-bit table: row ``v`` is ``codes[v]·scales[v]`` per 32-value block (GGUF Q8_0)."""

    codes: np.ndarray  # [vocab, hidden] int8
    scales: np.ndarray  # [vocab, hidden/32] float32

    def __post_init__(self) -> None:
        if self.codes.dtype != np.int8 or self.codes.ndim != 2 or self.codes.shape[1] % BLOCK:
            raise ValueError(f"embedding codes must be int8 [vocab, k·{BLOCK}], got {self.codes.dtype} {self.codes.shape}")
        if self.scales.shape != (self.codes.shape[0], self.codes.shape[1] // BLOCK) or self.scales.dtype != np.float32:
            raise ValueError(f"embedding scales must be float32 [vocab, hidden/{BLOCK}], got {self.scales.dtype} {self.scales.shape}")

    def dequantize(self) -> np.ndarray:
        v, h = self.codes.shape
        return (self.codes.reshape(v, -1, BLOCK).astype(np.float32) * self.scales[..., None]).reshape(v, h)


Linear = QuantLinear | FloatLinear
Embedding = QuantEmbedding | np.ndarray


@dataclass(frozen=True)
class LlamaWeights:
    """Weights by Hugging Face name: ``linears`` keyed by module path (``model.layers.0.self_attn.q_proj``),
    ``norms`` by parameter name (``model.layers.0.input_layernorm.weight``, ``model.norm.weight``).
    ``lm_head`` None means tied to the embedding."""

    embedding: Embedding
    linears: Mapping[str, Linear]
    norms: Mapping[str, np.ndarray]
    lm_head: Linear | None = None


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def position_ids_from_mask(attention_mask: np.ndarray, sequence: int) -> np.ndarray:
    """Positions of the last ``sequence`` tokens as Hugging Face's ``generate`` computes them:
    the running count of attended tokens minus one (left padding does not shift positions),
    1 where the mask is 0."""
    mask = np.asarray(attention_mask, np.int64)
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return np.ascontiguousarray(positions[:, -sequence:])


class _Graph:
    """Nodes and initializers; nodes are named ``{scope}/{op}_{n}`` with the module path as scope."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._sums: dict[str, str] = {}
        #: Input tensor → width of every linear of a decoder layer (for value_info).
        self.linear_inputs: dict[str, int] = {}
        self._count = 0

    def init(self, name: str, value: np.ndarray) -> str:
        if name in self.inits:
            raise ValueError(f"initializer {name!r} is written twice")
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], scope: str, *, outputs: int = 1, domain: str = "", **attrs: Any) -> Any:
        self._count += 1
        name = f"{scope}/{op_type}_{self._count}"
        names = [f"{name}_output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def block_sums(self, x: str, width: int) -> str:
        """``x`` ``[..., width]`` summed per 32-value block: ``[..., width/32]`` (computed once per ``x``)."""
        if x not in self._sums:
            scope = x.rsplit("/", 1)[0] + "/block_sums"
            blocks = self.op("Reshape", [x, self.i64(0, 0, width // BLOCK, BLOCK)], scope)
            self._sums[x] = self.op("ReduceSum", [blocks, self.i64(-1)], scope, keepdims=0)
        return self._sums[x]

    def i64(self, *values: int) -> str:
        return self.const("const_i64_" + "_".join(str(v).replace("-", "m") for v in values), np.array(values, np.int64))

    def f32(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, np.float32))


def _scope(module: str) -> str:
    return "/" + module.replace(".", "/")


def _linear(g: _Graph, x: str, module: str, w: Linear) -> str:
    """``x·Wᵀ`` of module ``module``; weights named ``{module}.weight_Q4`` (+ ``_scales``) for
    MatMulNBits, ``{module}.weight`` (``[in, out]``) for MatMul.

    A float zero point ``z`` (GGUF Q4_1) is not given to MatMulNBits: ONNX Runtime's CPU
    kernel has no fast path for float zero points (it dequantises the whole matrix on every
    call: 1.46 ms against 26 µs for a 576×1536 product at batch 1, onnxruntime 1.32). The
    same product is computed exactly as ``(code - 8)·scale`` (MatMulNBits' default zero point)
    plus a per-block offset ``(8 - z)·scale`` times the block sums of ``x``
    (:meth:`_Graph.block_sums`, shared by the linears reading the same ``x``).
    """
    scope = _scope(module)
    g.linear_inputs[x] = w.in_features
    if isinstance(w, FloatLinear):
        weight = g.init(f"{module}.weight", np.asarray(w.weight, np.float32).T)
        return g.op("MatMul", [x, weight], scope)
    inputs = [x, g.init(f"{module}.weight_Q4", w.packed), g.init(f"{module}.weight_scales", w.scales)]
    # accuracy_level 4: activations are quantised to int8 per block inside the product, as
    # llama.cpp does for its 4-bit kernels (q8_1); 2.7x faster at batch 1 than fp32 compute.
    y = g.op("MatMulNBits", inputs, scope, domain=_MS, K=w.in_features, N=w.out_features, bits=4, block_size=BLOCK,
             accuracy_level=4)
    if w.zero_points is None:
        return y
    offsets = ((np.float32(8) - w.zero_points) * w.scales).T  # [blocks, out]
    # [1, blocks, out]: three dimensions, so that the offsets' MatMul is not taken for a
    # LoRA-able linear of its own (module_paths only looks at 2-D weights).
    table = g.init(f"{module}.weight_block_offsets", np.ascontiguousarray(offsets[None], np.float32))
    return g.op("Add", [y, g.op("MatMul", [g.block_sums(x, w.in_features), table], f"{scope}/block_offsets")], scope)


def _rms_norm(g: _Graph, x: str, weight: str, eps: float) -> str:
    """``x / sqrt(mean(x²) + eps) · w``, the pattern ONNX Runtime fuses into SimplifiedLayerNormalization."""
    scope = _scope(weight.rsplit(".", 1)[0])
    var = g.op("ReduceMean", [g.op("Pow", [x, g.f32("const_two", 2.0)], scope)], scope, axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.f32(f"const_eps_{eps:g}", eps)], scope)], scope)
    return g.op("Mul", [g.op("Div", [x, std], scope), weight], scope)


def _embed(g: _Graph, emb: Embedding, cfg: LlamaConfig) -> str:
    scope = "/model/embed_tokens"
    if isinstance(emb, QuantEmbedding):
        # One table serves the embedding and the tied head: ``[vocab, blocks, 32]`` uint8 codes
        # offset by 128 (MatMulNBits' 8-bit layout, default zero point 128) and
        # ``[vocab, blocks]`` scales; row v is ``(code - 128)·scale``, exactly Q8_0's value.
        codes = g.init(_Q8_CODES, (emb.codes.astype(np.int16) + 128).astype(np.uint8).reshape(cfg.vocab_size, -1, BLOCK))
        scales = g.init(_Q8_SCALES, emb.scales)
        rows = g.op("Cast", [g.op("Gather", [codes, "input_ids"], scope)], scope, to=TensorProto.FLOAT)
        rows = g.op("Sub", [rows, g.f32("const_128", 128.0)], scope)
        rows = g.op("Mul", [rows, g.op("Unsqueeze", [g.op("Gather", [scales, "input_ids"], scope), g.i64(-1)], scope)], scope)
        return g.op("Reshape", [rows, g.i64(0, 0, cfg.hidden_size)], scope)
    table = g.init("model.embed_tokens.weight", np.asarray(emb, np.float32))
    return g.op("Gather", [table, "input_ids"], scope)


def _lm_head(g: _Graph, h: str, weights: LlamaWeights, cfg: LlamaConfig) -> str:
    if weights.lm_head is not None:
        return _linear(g, h, "lm_head", weights.lm_head)
    scope = "/lm_head"
    if isinstance(weights.embedding, QuantEmbedding):
        # The tied head reads the 8-bit table as an 8-bit MatMulNBits (28 MB read per token
        # instead of the 113 MB of an fp32 copy: the head is a third of a decode step's bytes).
        # Runtimes without 8-bit MatMulNBits get the fp32 form (onnx_compat.for_runtime).
        return g.op("MatMulNBits", [h, _Q8_CODES, _Q8_SCALES], scope, domain=_MS, K=cfg.hidden_size, N=cfg.vocab_size,
                    bits=8, block_size=BLOCK, accuracy_level=4)
    return g.op("MatMul", [h, g.op("Transpose", ["model.embed_tokens.weight"], scope, perm=[1, 0])], scope)


def _rope_tables(g: _Graph, cfg: LlamaConfig) -> tuple[str, str]:
    """cos and sin ``[batch, 1, seq, head_dim]`` of ``position_ids``, Hugging Face's layout
    (frequencies repeated over the two halves) and arithmetic (fp32 ``inv_freq``)."""
    scope = "/model/rotary_emb"
    d = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d))))
    inv = g.const("model.rotary_emb.inv_freq", inv_freq.astype(np.float32))
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], scope, to=TensorProto.FLOAT), g.i64(-1)], scope)
    freqs = g.op("Mul", [pos, inv], scope)  # [batch, seq, d/2]
    emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], scope, axis=-1), g.i64(1)], scope)
    return g.op("Cos", [emb], scope), g.op("Sin", [emb], scope)


def _rotate(g: _Graph, x: str, cos: str, sin: str, cfg: LlamaConfig, scope: str) -> str:
    """``x·cos + rotate_half(x)·sin`` with ``rotate_half([a, b]) = [-b, a]`` over the last axis."""
    half = cfg.head_dim // 2
    first, second = g.op("Split", [x, g.i64(half, half)], scope, outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [second], scope), first], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)


def _attention_bias(g: _Graph) -> str:
    """0 where a query may attend a key (causal and not padding), float32 min elsewhere:
    ``[batch, 1, 1, seq, total]``, broadcast over KV heads and query groups."""
    scope = "/model/attention_mask"
    past = g.op("Shape", [past_names(0)[0]], scope, start=2, end=3)
    seq = g.op("Shape", ["input_ids"], scope, start=1, end=2)
    total = g.op("Shape", ["attention_mask"], scope, start=1, end=2)
    zero, one = g.const("const_i64_scalar_0", np.array(0, np.int64)), g.const("const_i64_scalar_1", np.array(1, np.int64))
    squeeze = g.i64(0)
    past_s = g.op("Squeeze", [past, squeeze], scope)
    q_pos = g.op("Range", [past_s, g.op("Add", [past_s, g.op("Squeeze", [seq, squeeze], scope)], scope), one], scope)
    k_pos = g.op("Range", [zero, g.op("Squeeze", [total, squeeze], scope), one], scope)
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.i64(0)], scope), g.op("Unsqueeze", [q_pos, g.i64(1)], scope)], scope)
    keep = g.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL)
    keep = g.op("Unsqueeze", [keep, g.i64(1, 2, 3)], scope)  # [batch, 1, 1, 1, total]
    allowed = g.op("And", [keep, causal], scope)  # [batch, 1, 1, seq, total]
    return g.op("Where", [allowed, g.f32("const_zero_f", 0.0), g.f32("const_finfo_min", float(np.finfo(np.float32).min))], scope)


def _layer(g: _Graph, h: str, i: int, w: LlamaWeights, cfg: LlamaConfig, cos: str, sin: str, bias: str) -> str:
    p = f"model.layers.{i}"
    s = _scope(f"{p}.self_attn")
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = _rms_norm(g, h, g.init(f"{p}.input_layernorm.weight", w.norms[f"{p}.input_layernorm.weight"]), cfg.rms_norm_eps)
    q = _linear(g, x, f"{p}.self_attn.q_proj", w.linears[f"{p}.self_attn.q_proj"])
    k = _linear(g, x, f"{p}.self_attn.k_proj", w.linears[f"{p}.self_attn.k_proj"])
    v = _linear(g, x, f"{p}.self_attn.v_proj", w.linears[f"{p}.self_attn.v_proj"])
    q = g.op("Transpose", [g.op("Reshape", [q, g.i64(0, 0, heads, d)], s)], s, perm=[0, 2, 1, 3])  # [b, heads, seq, d]
    k = g.op("Transpose", [g.op("Reshape", [k, g.i64(0, 0, kv, d)], s)], s, perm=[0, 2, 1, 3])  # [b, kv, seq, d]
    v = g.op("Transpose", [g.op("Reshape", [v, g.i64(0, 0, kv, d)], s)], s, perm=[0, 2, 1, 3])
    q = _rotate(g, q, cos, sin, cfg, s)
    k = _rotate(g, k, cos, sin, cfg, s)
    past_k, past_v = past_names(i)
    present_k, present_v = present_names(i)
    g.nodes.append(helper.make_node("Concat", [past_k, k], [present_k], name=f"{s}/Concat_present_key", axis=2))
    g.nodes.append(helper.make_node("Concat", [past_v, v], [present_v], name=f"{s}/Concat_present_value", axis=2))
    # Query head h = kv_head·groups + group reads KV head h // groups (transformers' repeat_kv).
    q5 = g.op("Reshape", [q, g.i64(0, kv, heads // kv, -1, d)], s)  # [b, kv, groups, seq, d]
    k5 = g.op("Unsqueeze", [present_k, g.i64(2)], s)  # [b, kv, 1, total, d]
    v5 = g.op("Unsqueeze", [present_v, g.i64(2)], s)
    scores = g.op("MatMul", [q5, g.op("Transpose", [k5], s, perm=[0, 1, 2, 4, 3])], s)
    scores = g.op("Mul", [scores, g.f32(f"const_attn_scale_{d}", 1.0 / math.sqrt(d))], s)
    probs = g.op("Softmax", [g.op("Add", [scores, bias], s)], s, axis=-1)
    ctx = g.op("Reshape", [g.op("MatMul", [probs, v5], s), g.i64(0, heads, -1, d)], s)  # [b, heads, seq, d]
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], s, perm=[0, 2, 1, 3]), g.i64(0, 0, heads * d)], s)
    h = g.op("Add", [h, _linear(g, ctx, f"{p}.self_attn.o_proj", w.linears[f"{p}.self_attn.o_proj"])], s)

    m = _scope(f"{p}.mlp")
    x = _rms_norm(g, h, g.init(f"{p}.post_attention_layernorm.weight", w.norms[f"{p}.post_attention_layernorm.weight"]),
                  cfg.rms_norm_eps)
    gate = _linear(g, x, f"{p}.mlp.gate_proj", w.linears[f"{p}.mlp.gate_proj"])
    up = _linear(g, x, f"{p}.mlp.up_proj", w.linears[f"{p}.mlp.up_proj"])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], m)], m), up], m)  # SiLU(gate)·up
    return g.op("Add", [h, _linear(g, act, f"{p}.mlp.down_proj", w.linears[f"{p}.mlp.down_proj"])], m)


def _check_shapes(cfg: LlamaConfig, w: LlamaWeights) -> None:
    hidden, kv, inter = cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size
    expected = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
                "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
                "mlp.down_proj": (inter, hidden)}
    for i in range(cfg.num_hidden_layers):
        for leaf, (fan_in, fan_out) in expected.items():
            name = f"model.layers.{i}.{leaf}"
            if name not in w.linears:
                raise ValueError(f"no weights for {name}")
            lin = w.linears[name]
            if (lin.in_features, lin.out_features) != (fan_in, fan_out):
                raise ValueError(f"{name} is {lin.in_features} → {lin.out_features}; this config needs {fan_in} → {fan_out}")
        for norm in (f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"):
            if w.norms.get(norm) is None or w.norms[norm].shape != (hidden,):
                raise ValueError(f"{norm} must be [{hidden}]")
    if w.norms.get("model.norm.weight") is None or w.norms["model.norm.weight"].shape != (hidden,):
        raise ValueError(f"model.norm.weight must be [{hidden}]")
    table = w.embedding.codes if isinstance(w.embedding, QuantEmbedding) else w.embedding
    if tuple(table.shape) != (cfg.vocab_size, hidden):
        raise ValueError(f"the embedding is {list(table.shape)}; this config needs [{cfg.vocab_size}, {hidden}]")
    if w.lm_head is not None and (w.lm_head.in_features, w.lm_head.out_features) != (hidden, cfg.vocab_size):
        raise ValueError(f"lm_head is {w.lm_head.in_features} → {w.lm_head.out_features}; this config needs {hidden} → {cfg.vocab_size}")


def build_llama(
    cfg: LlamaConfig,
    weights: LlamaWeights,
    *,
    metadata: Mapping[str, str] | None = None,
    llm_info: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """The decoder with KV cache as an ONNX model (opset 17 + ``com.microsoft`` for MatMulNBits).

    ``metadata`` goes into ``metadata_props`` as given; ``llm_info`` (special token ids, the
    source file) joins the config in the JSON under :data:`LLM_CONFIG_KEY`.
    """
    _check_shapes(cfg, weights)
    g = _Graph()
    h = _embed(g, weights.embedding, cfg)
    cos, sin = _rope_tables(g, cfg)
    bias = _attention_bias(g)
    for i in range(cfg.num_hidden_layers):
        h = _layer(g, h, i, weights, cfg, cos, sin, bias)
    h = _rms_norm(g, h, g.init("model.norm.weight", weights.norms["model.norm.weight"]), cfg.rms_norm_eps)
    g.nodes.append(helper.make_node("Identity", [_lm_head(g, h, weights, cfg)], ["logits"], name="/lm_head/Identity"))

    kv_shape: list[str | int] = ["batch", cfg.num_key_value_heads, "past_sequence", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in past_names(i)]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", cfg.num_key_value_heads, "total_sequence",
                                                                         cfg.head_dim]) for n in present_names(i)]
    # The linears' inputs are [batch, sequence, features]: said, so that derived graphs (the
    # banked graph of mixed batches) need not reshape them.
    value_info = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "sequence", width])
                  for x, width in g.linear_inputs.items()]
    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, list(g.inits.values()), value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1)],
                              producer_name="lorad.llama_builder")
    info = {"architecture": "llama", **asdict(cfg), "head_dim": cfg.head_dim, **(llm_info or {})}
    meta = {LLM_CONFIG_KEY: json.dumps(info)}
    meta.update(metadata or {})
    helper.set_model_props(model, meta)
    for_runtime(model)
    onnx.checker.check_model(model)
    return model
