"""Import a BERT-family encoder (Hugging Face ``config.json`` + ``model.safetensors``) as ONNX.

No torch: the graph is written with :mod:`onnx.helper` from the checkpoint's numpy
arrays, node for node as a PyTorch exporter emits ``BertModel`` (opset 17, standard ops
only: Gather embeddings, single-output LayerNormalization, Erf GELU, additive attention
mask, Softmax attention), followed by sentence-transformers' mean pooling and L2
normalisation, and optionally a classification head.

Every weight keeps its Hugging Face module path (``encoder.layer.0.attention.self.query.weight``),
so PEFT adapters trained on the torch model load unchanged (PEFT module ``m`` is ONNX weight
``m.weight``). Linear weights are stored in ``x·W`` orientation (``[in, out]``, the transpose
of torch's ``[out, in]``) under that name, as the inputs of plain ``MatMul`` nodes.

The tokenizer (``tokenizer.json``), its token limit and the head's label names travel in the
model's ``metadata_props`` (see :mod:`lorad.adapters.text_input`), so one ``.onnx`` file is all a
device needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_compat import OPSET, for_runtime

__all__ = [
    "BertConfig",
    "ClassifierHead",
    "INPUT_NAMES",
    "EMBEDDING_OUTPUT",
    "LABELS_KEY",
    "TOKENIZER_KEY",
    "MAX_TOKENS_KEY",
    "read_bert_config",
    "load_checkpoint",
    "build_bert",
    "import_bert_dir",
]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EMBEDDING_OUTPUT = "sentence_embedding"
TOKENIZER_KEY = "lorad.text.tokenizer"
MAX_TOKENS_KEY = "lorad.text.max_tokens"
LABELS_KEY = "lorad.labels"

_SUPPORTED_ACTS = ("gelu",)


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that shape the graph."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ClassifierHead:
    """A linear head on the pooled, normalised embedding: ``logits = e·Wᵀ + b`` (torch layout)."""

    weight: np.ndarray  # [classes, hidden]
    bias: np.ndarray  # [classes]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"head weight must be [classes, hidden] and bias [classes]; got {self.weight.shape} and {self.bias.shape}")
        if len(self.labels) != self.weight.shape[0] or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"head needs {self.weight.shape[0]} distinct label names, got {list(self.labels)}")


def read_bert_config(path: Path) -> BertConfig:
    """Parse ``config.json``; ValueError naming the field for anything this builder cannot build."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a model config: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type != "bert":
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; allowed: 'bert'")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported; allowed: 'absolute'")
    if raw.get("hidden_act", "gelu") not in _SUPPORTED_ACTS:
        raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported; allowed: {', '.join(_SUPPORTED_ACTS)}")
    ints = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "type_vocab_size"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: {key!r} must be a positive integer, got {value!r}")
        ints[key] = value
    if ints["hidden_size"] % ints["num_attention_heads"]:
        raise ValueError(f"{path}: hidden_size {ints['hidden_size']} is not a multiple of num_attention_heads {ints['num_attention_heads']}")
    eps = raw.get("layer_norm_eps", 1e-12)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{path}: 'layer_norm_eps' must be a positive number, got {eps!r}")
    return BertConfig(**ints, layer_norm_eps=float(eps), hidden_act=str(raw.get("hidden_act", "gelu")))


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors checkpoint as float32 numpy arrays, ``bert.`` prefix removed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot read safetensors weights: {e}") from e
    out = {}
    for key, value in tensors.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        out[name] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return out


class _Graph:
    """Accumulates nodes and initialisers; names nodes by module path as exporters do."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._count = 0

    def weight(self, name: str, *, transpose: bool = False) -> str:
        """An initializer with the checkpoint's tensor ``name`` (transposed for MatMul)."""
        if name not in self.weights:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        if name not in self.inits:
            array = self.weights[name]
            if transpose:
                array = np.ascontiguousarray(array.T)
            self.inits[name] = numpy_helper.from_array(array, name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], scope: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{scope}/{op_type}_{self._count}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{scope}/{op_type}_{self._count}", **attrs))
        return out

    def linear(self, x: str, module: str) -> str:
        """``x·Wᵀ + b`` of torch's ``nn.Linear`` ``module``, as MatMul + Add."""
        scope = "/" + module.replace(".", "/")
        y = self.op("MatMul", [x, self.weight(f"{module}.weight", transpose=True)], scope)
        return self.op("Add", [y, self.weight(f"{module}.bias")], scope)

    def layer_norm(self, x: str, module: str, eps: float) -> str:
        return self.op("LayerNormalization", [x, self.weight(f"{module}.weight"), self.weight(f"{module}.bias")],
                       "/" + module.replace(".", "/"), axis=-1, epsilon=eps)


def _embeddings(g: _Graph, cfg: BertConfig) -> str:
    s = "/embeddings"
    words = g.op("Gather", [g.weight("embeddings.word_embeddings.weight"), "input_ids"], s)
    types = g.op("Gather", [g.weight("embeddings.token_type_embeddings.weight"), "token_type_ids"], s)
    # position_ids = arange(seq_len), broadcast over the batch
    shape = g.op("Shape", ["input_ids"], s)
    seq = g.op("Gather", [shape, g.const("const_one_i64", np.array(1, np.int64))], s, axis=0)
    positions = g.op("Range", [g.const("const_zero_i64", np.array(0, np.int64)), seq, "const_one_i64"], s)
    pos = g.op("Gather", [g.weight("embeddings.position_embeddings.weight"), positions], s)
    total = g.op("Add", [g.op("Add", [words, types], s), pos], s)
    return g.layer_norm(total, "embeddings.LayerNorm", cfg.layer_norm_eps)


def _attention_bias(g: _Graph) -> str:
    """``(1 - mask) * finfo(float32).min`` as [N, 1, 1, S], added to every head's scores."""
    s = "/extended_attention_mask"
    mask = g.op("Cast", ["attention_mask"], s, to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const("const_axes_1_2", np.array([1, 2], np.int64))], s)
    inverted = g.op("Sub", [g.const("const_one_f", np.array(1.0, np.float32)), mask], s)
    return g.op("Mul", [inverted, g.const("const_finfo_min", np.array(np.finfo(np.float32).min, np.float32))], s)


def _heads(g: _Graph, x: str, cfg: BertConfig, scope: str) -> str:
    """[N, S, H] → [N, heads, S, head_size]."""
    shape = g.const("const_heads_shape", np.array([0, 0, cfg.num_attention_heads, cfg.head_size], np.int64))
    return g.op("Transpose", [g.op("Reshape", [x, shape], scope)], scope, perm=[0, 2, 1, 3])


def _layer(g: _Graph, x: str, bias: str, cfg: BertConfig, i: int) -> str:
    p = f"encoder.layer.{i}"
    s = f"/encoder/layer.{i}/attention/self"
    q = _heads(g, g.linear(x, f"{p}.attention.self.query"), cfg, s)
    k = _heads(g, g.linear(x, f"{p}.attention.self.key"), cfg, s)
    v = _heads(g, g.linear(x, f"{p}.attention.self.value"), cfg, s)
    scores = g.op("MatMul", [q, g.op("Transpose", [k], s, perm=[0, 1, 3, 2])], s)
    scores = g.op("Div", [scores, g.const("const_sqrt_head", np.array(math.sqrt(cfg.head_size), np.float32))], s)
    probs = g.op("Softmax", [g.op("Add", [scores, bias], s)], s, axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, v], s)], s, perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, g.const("const_hidden_shape", np.array([0, 0, cfg.hidden_size], np.int64))], s)
    attn = g.linear(context, f"{p}.attention.output.dense")
    x = g.layer_norm(g.op("Add", [attn, x], s), f"{p}.attention.output.LayerNorm", cfg.layer_norm_eps)

    inter = g.linear(x, f"{p}.intermediate.dense")
    si = f"/encoder/layer.{i}/intermediate/intermediate_act_fn"
    erf = g.op("Erf", [g.op("Div", [inter, g.const("const_sqrt2", np.array(math.sqrt(2.0), np.float32))], si)], si)
    gelu = g.op("Mul", [g.op("Mul", [inter, g.op("Add", [erf, "const_one_f"], si)], si),
                        g.const("const_half", np.array(0.5, np.float32))], si)
    out = g.linear(gelu, f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [out, x], s), f"{p}.output.LayerNorm", cfg.layer_norm_eps)


def _mean_pool_normalize(g: _Graph, hidden: str) -> str:
    """sentence-transformers' Pooling(mean) then Normalize: masked mean over tokens, L2 norm."""
    s = "/pooling"
    mask = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], s, to=TensorProto.FLOAT),
                              g.const("const_axes_2", np.array([2], np.int64))], s)
    axis1 = g.const("const_axes_1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [hidden, mask], s), axis1], s, keepdims=0)
    counts = g.op("Clip", [g.op("ReduceSum", [mask, axis1], s, keepdims=0), g.const("const_count_min", np.array(1e-9, np.float32))], s)
    mean = g.op("Div", [summed, counts], s)
    sn = "/normalize"
    norm = g.op("ReduceL2", [mean], sn, axes=[1], keepdims=1)  # axes is an attribute until opset 18
    norm = g.op("Clip", [norm, g.const("const_norm_min", np.array(1e-12, np.float32))], sn)
    return g.op("Div", [mean, norm], sn)


def build_bert(
    cfg: BertConfig,
    weights: Mapping[str, np.ndarray],
    *,
    head: ClassifierHead | None = None,
    tokenizer_json: str | None = None,
    max_tokens: int | None = None,
) -> onnx.ModelProto:
    """The encoder (+ pooling, + optional head) as an ONNX model; weights by HF module path."""
    g = _Graph(weights)
    hidden = _embeddings(g, cfg)
    bias = _attention_bias(g)
    for i in range(cfg.num_hidden_layers):
        hidden = _layer(g, hidden, bias, cfg, i)
    embedding = _mean_pool_normalize(g, hidden)
    g.nodes.append(helper.make_node("Identity", [embedding], [EMBEDDING_OUTPUT], name="/sentence_embedding/Identity"))

    dyn = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dyn) for n in INPUT_NAMES]
    outputs = [helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["batch", cfg.hidden_size])]
    if head is not None:
        if head.weight.shape[1] != cfg.hidden_size:
            raise ValueError(f"head weight is {list(head.weight.shape)}; this encoder needs [classes, {cfg.hidden_size}]")
        g.inits["classifier.weight"] = numpy_helper.from_array(head.weight.astype(np.float32), "classifier.weight")
        g.inits["classifier.bias"] = numpy_helper.from_array(head.bias.astype(np.float32), "classifier.bias")
        g.nodes.append(helper.make_node("Gemm", [EMBEDDING_OUTPUT, "classifier.weight", "classifier.bias"], ["logits"],
                                        name="/classifier/Gemm", transB=1))
        g.nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="/Softmax", axis=-1))
        classes = len(head.labels)
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", classes]) for n in ("logits", "probabilities")]

    graph = helper.make_graph(g.nodes, "bert", inputs, outputs, list(g.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lorad.bert_builder")
    meta = {}
    if tokenizer_json is not None:
        meta[TOKENIZER_KEY] = tokenizer_json
    if max_tokens is not None:
        meta[MAX_TOKENS_KEY] = str(max_tokens)
    if head is not None:
        meta[LABELS_KEY] = json.dumps(list(head.labels))
    helper.set_model_props(model, meta)
    for_runtime(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _max_tokens_of(src: Path, cfg: BertConfig) -> int:
    """sentence-transformers' ``max_seq_length`` when the directory has it, else the position table."""
    st = src / "sentence_bert_config.json"
    if st.is_file():
        value = json.loads(st.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and 0 < value <= cfg.max_position_embeddings:
            return value
    return cfg.max_position_embeddings


def import_bert_dir(src: Path, *, head: ClassifierHead | None = None) -> onnx.ModelProto:
    """Build from a Hugging Face model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``)."""
    src = Path(src)
    for name in ("config.json", "model.safetensors"):
        if not (src / name).is_file():
            raise ValueError(f"{src} has no {name}; expected a Hugging Face model directory with config.json and model.safetensors")
    cfg = read_bert_config(src / "config.json")
    tokenizer = src / "tokenizer.json"
    return build_bert(
        cfg,
        load_checkpoint(src / "model.safetensors"),
        head=head,
        tokenizer_json=tokenizer.read_text(encoding="utf-8") if tokenizer.is_file() else None,
        max_tokens=_max_tokens_of(src, cfg),
    )
