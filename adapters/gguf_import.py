"""Import a LLaMA-architecture GGUF file (llama.cpp's format) as a LoRA-ready ONNX decoder.

No torch: the ``gguf`` package (numpy only, the ``lorad[llm]`` extra) reads the file, and
:mod:`lorad.adapters.llama_builder` writes the graph. What each GGUF tensor becomes:

=============  =====================================================================
GGUF type      in the ONNX model
=============  =====================================================================
``Q4_1``       ``MatMulNBits`` 4-bit, block 32: Q4_1's ``d·q + m`` is MatMulNBits'
               ``(q - z)·scale`` with ``scale = d`` and the float zero point
               ``z = -m/d`` (``scale = 1, z = -m`` and code 0 where ``d = 0``)
``Q4_0``       ``MatMulNBits`` 4-bit with the default zero point 8: ``d·(q - 8)``, exact
``Q8_0``       embedding only: int8 codes and fp32 scales, dequantised per gathered row
``F32/F16``    float initializers (norms; float linears become plain ``MatMul``)
=============  =====================================================================

Every weight takes its Hugging Face name (``blk.0.attn_q`` → ``model.layers.0.self_attn.q_proj``).
llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` for its interleaved
rotary embedding; the importer puts them back (a reordering of whole rows, so of whole
quantisation blocks: exact) so that the graph uses Hugging Face's ``rotate_half`` layout and
a PEFT adapter's ``lora_B`` rows line up with the base model's output features.

The tokenizer is rebuilt from the file's vocabulary, merges, token types and pre-tokenizer name
with the ``tokenizers`` library and stored in the model's metadata with the chat template and the
special token ids, so the one ``.onnx`` file is all a device needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .bert_builder import MAX_TOKENS_KEY, TOKENIZER_KEY
from .decoder import CHAT_TEMPLATE_KEY
from .llama_builder import BLOCK, FloatLinear, LlamaConfig, LlamaWeights, QuantEmbedding, QuantLinear, build_llama

__all__ = [
    "CHAT_TEMPLATE_KEY",
    "GgufFile",
    "read_gguf",
    "llama_config",
    "llama_weights",
    "gguf_tokenizer_json",
    "import_gguf",
    "unpermute_rows",
    "q4_1_to_nbits",
    "q4_0_to_nbits",
    "q8_0_to_embedding",
]


# GGML type ids (ggml.h); named here so the module reads without the gguf package.
_F32, _F16, _Q4_0, _Q4_1, _Q8_0 = 0, 1, 2, 3, 8
_TYPE_NAMES = {_F32: "F32", _F16: "F16", _Q4_0: "Q4_0", _Q4_1: "Q4_1", _Q8_0: "Q8_0"}
_LINEAR_TYPES = (_Q4_0, _Q4_1, _F32, _F16)
_EMBEDDING_TYPES = (_Q8_0, _F32, _F16)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) whose splitting `tokenizers` reproduces:
# each digit alone, then GPT-2's byte-level regex (llama-vocab.cpp groups these five), or GPT-2's
# regex alone.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "exaone")
_GPT2 = ("gpt2", "default")


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # numpy order: [rows, cols] (GGUF's ne reversed)
    data: np.ndarray  # rows of raw blocks (uint8) for quantised types, values otherwise


@dataclass(frozen=True)
class GgufFile:
    """The metadata and tensors of one GGUF file (arrays are views of a memory map)."""

    path: Path
    fields: Mapping[str, Any]
    tensors: Mapping[str, GgufTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.fields[key]


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # the extra is optional: say which one to install
        raise RuntimeError("importing a GGUF model needs the gguf package: pip install 'lorad[llm]'") from e
    return gguf


def _field_value(field: Any) -> Any:
    """A ReaderField's value from its parts (works on gguf 0.10 and later, with or without ``contents()``)."""
    gguf = _gguf()
    types = list(field.types)
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    def one(index: int, kind: Any) -> Any:
        part = field.parts[index]
        if kind == string:
            return bytes(part).decode("utf-8")
        value = part.tolist()[0] if hasattr(part, "tolist") else part
        return value

    if not types:
        return None
    if types[0] == array:
        return [one(i, types[-1]) for i in field.data]
    return one(field.data[0], types[0])


def read_gguf(path: Path) -> GgufFile:
    """Open ``path`` (memory-mapped); ValueError naming the file for anything that is not GGUF."""
    gguf = _gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: no such file") from e
    except (OSError, ValueError, IndexError) as e:  # gguf raises ValueError for a bad magic, IndexError when cut short
        raise ValueError(f"{path} is not a GGUF file: {e}") from e
    fields = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {
        t.name: GgufTensor(t.name, int(t.tensor_type), tuple(int(n) for n in reversed(t.shape.tolist())), t.data)
        for t in reader.tensors
    }
    return GgufFile(path, fields, tensors)


# --- Quantised blocks ---------------------------------------------------------------------


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, np.uint8)
    if raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"quantised rows must be [rows, k·{block_bytes}] bytes, got {raw.shape}")
    return raw.reshape(raw.shape[0], -1, block_bytes)


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    """[rows, blocks, 32] 4-bit codes in element order → MatMulNBits bytes (even element low)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _q4_codes(qs: np.ndarray) -> np.ndarray:
    """GGML's 16 bytes per block hold elements 0..15 in the low nibbles, 16..31 in the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def q4_1_to_nbits(raw: np.ndarray) -> QuantLinear:
    """GGUF Q4_1 rows (``[out, in/32·20]`` bytes: fp16 d, fp16 m, 16 bytes of codes) as MatMulNBits."""
    blocks = _blocks(raw, 20)
    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    codes = _q4_codes(blocks[..., 4:])
    flat = d == 0  # every value of the block is m: code 0, scale 1, zero point -m
    codes[flat] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_points = np.where(flat, -m.astype(np.float64), -m.astype(np.float64) / d.astype(np.float64)).astype(np.float32)
    scales = np.where(flat, np.float32(1), d).astype(np.float32)
    return QuantLinear(_pack_codes(codes), scales, zero_points)


def q4_0_to_nbits(raw: np.ndarray) -> QuantLinear:
    """GGUF Q4_0 rows (fp16 d, 16 bytes of codes; value ``d·(q - 8)``) as MatMulNBits, default zero point."""
    blocks = _blocks(raw, 18)
    return QuantLinear(_pack_codes(_q4_codes(blocks[..., 2:])), _fp16(blocks, 0), None)


def q8_0_to_embedding(raw: np.ndarray) -> QuantEmbedding:
    """GGUF Q8_0 rows (fp16 d, 32 int8 codes; value ``d·q``) as an 8-bit table."""
    blocks = _blocks(raw, 2 + BLOCK)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(blocks.shape[0], -1)
    return QuantEmbedding(codes, _fp16(blocks, 0))


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of a q/k projection: within each head, GGUF row ``2i + j``
    is Hugging Face row ``j·(head_dim/2) + i``. Works on raw block rows (whole rows move)."""
    n = rows.shape[0]
    if n % (2 * heads):
        raise ValueError(f"{n} rows cannot be split into {heads} heads of two halves")
    return np.ascontiguousarray(rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


# --- Config and weights ---------------------------------------------------------------------


def _int(f: GgufFile, key: str, default: int | None = None) -> int:
    value = f.get(key, default)
    if value is None:
        raise ValueError(f"{f.path}: GGUF metadata has no {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{f.path}: {key!r} must be a positive integer, got {value!r}")
    return value


def llama_config(f: GgufFile) -> LlamaConfig:
    """The graph's hyper-parameters from the ``llama.*`` metadata; ValueError for what it cannot build."""
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{f.path}: general.architecture {arch!r} is not supported; allowed: 'llama'")
    if f.get("llama.rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in f.tensors:
        raise ValueError(f"{f.path}: RoPE scaling ({f.get('llama.rope.scaling.type') or 'rope_freqs.weight'}) is not supported")
    heads = _int(f, "llama.attention.head_count")
    hidden = _int(f, "llama.embedding_length")
    embedding = f.tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{f.path}: no tensor 'token_embd.weight'")
    vocab = f.get("llama.vocab_size") or embedding.shape[0]
    rope_dim = f.get("llama.rope.dimension_count", hidden // heads)
    if rope_dim != hidden // heads:
        raise ValueError(f"{f.path}: llama.rope.dimension_count {rope_dim} is not the head dimension {hidden // heads}; "
                         "partial rotary embeddings are not supported")
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=_int(f, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_int(f, "llama.attention.head_count_kv", heads),
        intermediate_size=_int(f, "llama.feed_forward_length"),
        vocab_size=int(vocab),
        rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(f.require("llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=_int(f, "llama.context_length"),
        tie_word_embeddings="output.weight" not in f.tensors,
    )


def _tensor(f: GgufFile, name: str) -> GgufTensor:
    if name not in f.tensors:
        raise ValueError(f"{f.path}: no tensor {name!r}")
    return f.tensors[name]


def _type_error(f: GgufFile, t: GgufTensor, allowed: tuple[int, ...]) -> ValueError:
    kind = _TYPE_NAMES.get(t.type_id, f"GGML type {t.type_id}")
    return ValueError(f"{f.path}: tensor {t.name!r} is {kind}, which lorad cannot import there; "
                      f"allowed: {', '.join(_TYPE_NAMES[a] for a in allowed)}")


def _linear(f: GgufFile, name: str, rows: Callable[[np.ndarray], np.ndarray] = lambda r: r) -> QuantLinear | FloatLinear:
    t = _tensor(f, name)
    if t.type_id == _Q4_1:
        return q4_1_to_nbits(rows(t.data))
    if t.type_id == _Q4_0:
        return q4_0_to_nbits(rows(t.data))
    if t.type_id in (_F32, _F16):
        return FloatLinear(rows(np.asarray(t.data, np.float32).reshape(t.shape)))
    raise _type_error(f, t, _LINEAR_TYPES)


def _vector(f: GgufFile, name: str) -> np.ndarray:
    t = _tensor(f, name)
    if t.type_id not in (_F32, _F16):
        raise _type_error(f, t, (_F32, _F16))
    return np.asarray(t.data, np.float32).reshape(t.shape)


def llama_weights(f: GgufFile, cfg: LlamaConfig) -> LlamaWeights:
    """Every tensor under its Hugging Face name, q/k rows back in Hugging Face's order."""
    linears: dict[str, QuantLinear | FloatLinear] = {}
    norms: dict[str, np.ndarray] = {}
    for i in range(cfg.num_hidden_layers):
        for gguf_name, hf in _LAYER_TENSORS.items():
            name, target = f"blk.{i}.{gguf_name}.weight", f"model.layers.{i}.{hf}"
            if hf.endswith("layernorm"):
                norms[f"{target}.weight"] = _vector(f, name)
            elif gguf_name == "attn_q":
                linears[target] = _linear(f, name, lambda r: unpermute_rows(r, cfg.num_attention_heads))
            elif gguf_name == "attn_k":
                linears[target] = _linear(f, name, lambda r: unpermute_rows(r, cfg.num_key_value_heads))
            else:
                linears[target] = _linear(f, name)
    norms["model.norm.weight"] = _vector(f, "output_norm.weight")
    emb = _tensor(f, "token_embd.weight")
    if emb.type_id == _Q8_0:
        embedding: QuantEmbedding | np.ndarray = q8_0_to_embedding(emb.data)
    elif emb.type_id in (_F32, _F16):
        embedding = np.asarray(emb.data, np.float32).reshape(emb.shape)
    else:
        raise _type_error(f, emb, _EMBEDDING_TYPES)
    lm_head = None if cfg.tie_word_embeddings else _linear(f, "output.weight")
    return LlamaWeights(embedding, linears, norms, lm_head)


# --- Tokenizer ------------------------------------------------------------------------------


def gguf_tokenizer_json(f: GgufFile) -> str:
    """The file's byte-level BPE tokenizer as a ``tokenizer.json`` string (``tokenizers`` library).

    Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain
    added tokens, so ``<|im_start|>`` stays whole; a BOS token is prepended when the file says so.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError as e:
        raise RuntimeError("rebuilding the tokenizer needs the tokenizers package: pip install 'lorad[llm]'") from e
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported; allowed: 'gpt2' (byte-level BPE)")
    pre = f.get("tokenizer.ggml.pre", "default")
    pre_tokenizer: pre_tokenizers.PreTokenizer
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _GPT2:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not supported; allowed: {', '.join(_DIGITS_THEN_GPT2 + _GPT2)}")
    tokens: list[str] = f.require("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
    types: list[int] = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{f.path}: tokenizer.ggml.tokens has duplicate tokens")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 4])
    bos = f.get("tokenizer.ggml.bos_token_id")
    if f.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                                                 special_tokens=[(tokens[bos], bos)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{f.path}: the rebuilt tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                         f"the file lists {len(tokens)}")
    return str(tokenizer.to_str())


def _special_ids(f: GgufFile) -> dict[str, Any]:
    ids = {name: f.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding", "unknown")}
    return {f"{name}_token_id": value for name, value in ids.items() if value is not None}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def import_gguf(path: Path) -> onnx.ModelProto:
    """Build the LoRA-ready decoder, tokenizer and chat template included, from a GGUF file."""
    path = Path(path)
    f = read_gguf(path)
    cfg = llama_config(f)
    weights = llama_weights(f, cfg)
    metadata = {TOKENIZER_KEY: gguf_tokenizer_json(f), MAX_TOKENS_KEY: str(cfg.max_position_embeddings)}
    template = f.get("tokenizer.chat_template")
    if isinstance(template, str):
        metadata[CHAT_TEMPLATE_KEY] = template
    info = {**_special_ids(f), "source": path.name, "source_sha256": _sha256(path), "name": f.get("general.name")}
    return build_llama(cfg, weights, metadata=metadata, llm_info=info)

