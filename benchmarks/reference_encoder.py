"""The reference encoder the serving and training benchmarks measure.

A small pre-LayerNorm transformer encoder written directly in ONNX with random weights
from a seeded numpy generator, so that every machine builds the same bytes without torch
or a download: input ``x`` float32 ``[N, seq_len, d_model]`` (no embedding table), per
layer LayerNorm → multi-head self-attention → residual, LayerNorm → GELU FFN → residual,
then a final LayerNorm, mean-pool over the sequence and a linear classifier → ``logits``
``[N, num_classes]``.

Every linear layer is ``MatMul(x, W)`` with ``W`` ``[in, out]`` plus a bias ``Add``; the
12 layer projections (``layers.{i}.attn.{q,k,v,o}_proj.weight``,
``layers.{i}.ffn.{up,down}_proj.weight``) are the LoRA targets
(:data:`REFERENCE_TARGETS`). The classifier ``head.weight`` is not a target.

Choices made for ORT's training graph builder: LayerNormalization declares all three
outputs (mean and inverse std-dev are needed by its gradient) and GELU is written with
``Erf``, which has a gradient in ORT training (the fused ``Gelu`` contrib op is avoided).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["REFERENCE_TARGETS", "build_reference_encoder"]

REFERENCE_TARGETS = ["layers.*_proj.weight"]

_IR_VERSION = 9
_OPSET = 17


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def tmp(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [self.tmp(f"{hint}_out{k}" if n_out > 1 else hint) for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.tmp(f"{hint}_node"), **attrs))
        return outs

    def linear(self, x: str, prefix: str, d_in: int, d_out: int) -> str:
        w = self.rng.normal(0.0, 1.0 / math.sqrt(d_in), size=(d_in, d_out)).astype(np.float32)
        b = self.rng.normal(0.0, 0.02, size=(d_out,)).astype(np.float32)
        self.const(f"{prefix}.weight", w)
        self.const(f"{prefix}.bias", b)
        (h,) = self.node("MatMul", [x, f"{prefix}.weight"], f"{prefix}.matmul")
        (y,) = self.node("Add", [h, f"{prefix}.bias"], f"{prefix}.add")
        return y

    def layer_norm(self, x: str, prefix: str, d: int) -> str:
        gamma = (1.0 + self.rng.normal(0.0, 0.02, size=(d,))).astype(np.float32)
        beta = self.rng.normal(0.0, 0.02, size=(d,)).astype(np.float32)
        self.const(f"{prefix}.weight", gamma)
        self.const(f"{prefix}.bias", beta)
        y, _mean, _inv_std = self.node(
            "LayerNormalization", [x, f"{prefix}.weight", f"{prefix}.bias"], prefix, n_out=3,
            axis=-1, epsilon=1e-5,
        )
        return y


def _attention(b: _Builder, x: str, i: int, d_model: int, heads: int) -> str:
    d_head = d_model // heads
    p = f"layers.{i}.attn"
    q = b.linear(x, f"{p}.q_proj", d_model, d_model)
    k = b.linear(x, f"{p}.k_proj", d_model, d_model)
    v = b.linear(x, f"{p}.v_proj", d_model, d_model)
    split = b.const(f"{p}.split_heads_shape", np.array([0, 0, heads, d_head], dtype=np.int64))
    (q,) = b.node("Reshape", [q, split], f"{p}.q_split")
    (k,) = b.node("Reshape", [k, split], f"{p}.k_split")
    (v,) = b.node("Reshape", [v, split], f"{p}.v_split")
    (q,) = b.node("Transpose", [q], f"{p}.q_t", perm=[0, 2, 1, 3])  # [N, H, S, Dh]
    (k,) = b.node("Transpose", [k], f"{p}.k_t", perm=[0, 2, 3, 1])  # [N, H, Dh, S]
    (v,) = b.node("Transpose", [v], f"{p}.v_t", perm=[0, 2, 1, 3])  # [N, H, S, Dh]
    (scores,) = b.node("MatMul", [q, k], f"{p}.scores")
    scale = b.const(f"{p}.scale", np.array(1.0 / math.sqrt(d_head), dtype=np.float32))
    (scores,) = b.node("Mul", [scores, scale], f"{p}.scaled")
    (probs,) = b.node("Softmax", [scores], f"{p}.softmax", axis=-1)
    (ctx,) = b.node("MatMul", [probs, v], f"{p}.context")
    (ctx,) = b.node("Transpose", [ctx], f"{p}.ctx_t", perm=[0, 2, 1, 3])  # [N, S, H, Dh]
    merge = b.const(f"{p}.merge_heads_shape", np.array([0, 0, d_model], dtype=np.int64))
    (ctx,) = b.node("Reshape", [ctx, merge], f"{p}.merge")
    return b.linear(ctx, f"{p}.o_proj", d_model, d_model)


def _gelu(b: _Builder, x: str, prefix: str) -> str:
    inv_sqrt2 = b.const(f"{prefix}.gelu_inv_sqrt2", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))
    one = b.const(f"{prefix}.gelu_one", np.array(1.0, dtype=np.float32))
    half = b.const(f"{prefix}.gelu_half", np.array(0.5, dtype=np.float32))
    (t,) = b.node("Mul", [x, inv_sqrt2], f"{prefix}.gelu_scale")
    (t,) = b.node("Erf", [t], f"{prefix}.gelu_erf")
    (t,) = b.node("Add", [t, one], f"{prefix}.gelu_add")
    (t,) = b.node("Mul", [x, t], f"{prefix}.gelu_mul")
    (y,) = b.node("Mul", [t, half], f"{prefix}.gelu_half")
    return y


def build_reference_encoder(
    *,
    layers: int = 2,
    d_model: int = 384,
    heads: int = 6,
    ffn: int = 768,
    seq_len: int = 16,
    num_classes: int = 10,
    seed: int = 0,
    batch: str | int = "N",
) -> onnx.ModelProto:
    """Build the encoder; the same arguments always give the same model bytes."""
    if layers < 1 or d_model < 1 or ffn < 1 or seq_len < 1 or num_classes < 1:
        raise ValueError("layers, d_model, ffn, seq_len and num_classes must all be positive")
    if heads < 1 or d_model % heads:
        raise ValueError(f"d_model={d_model} must be a positive multiple of heads={heads}")
    b = _Builder(np.random.default_rng(seed))
    h = "x"
    for i in range(layers):
        a = b.layer_norm(h, f"layers.{i}.norm1", d_model)
        a = _attention(b, a, i, d_model, heads)
        (h,) = b.node("Add", [h, a], f"layers.{i}.attn_residual")
        f = b.layer_norm(h, f"layers.{i}.norm2", d_model)
        f = b.linear(f, f"layers.{i}.ffn.up_proj", d_model, ffn)
        f = _gelu(b, f, f"layers.{i}.ffn")
        f = b.linear(f, f"layers.{i}.ffn.down_proj", ffn, d_model)
        (h,) = b.node("Add", [h, f], f"layers.{i}.ffn_residual")
    h = b.layer_norm(h, "final_norm", d_model)
    (pooled,) = b.node("ReduceMean", [h], "pool", axes=[1], keepdims=0)
    w = b.rng.normal(0.0, 1.0 / math.sqrt(d_model), size=(d_model, num_classes)).astype(np.float32)
    b.const("head.weight", w)
    b.const("head.bias", np.zeros(num_classes, dtype=np.float32))
    (logits,) = b.node("MatMul", [pooled, "head.weight"], "head.matmul")
    b.nodes.append(helper.make_node("Add", [logits, "head.bias"], ["logits"], name="head.add"))

    graph = helper.make_graph(
        b.nodes,
        "lorad_reference_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq_len, d_model])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes])],
        initializer=b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="lorad.benchmarks"
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model
