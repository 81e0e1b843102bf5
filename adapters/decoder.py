"""What lorad reads of a decoder language model: its shape, special tokens, tokenizer and chat template.

A model written by :mod:`lorad.adapters.llama_builder` (``lorad import-model gguf``) declares
itself in ``metadata_props``: the decoder's config as JSON under
:data:`~lorad.adapters.llama_builder.LLM_CONFIG_KEY`, its ``tokenizer.json`` and its Jinja chat
template. :meth:`DecoderSpec.from_model` gives None for any other model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .bert_builder import TOKENIZER_KEY
from .llama_builder import LLM_CONFIG_KEY, past_names, present_names

__all__ = ["DecoderSpec", "CHAT_TEMPLATE_KEY", "ChatTemplateError", "without_cache"]

CHAT_TEMPLATE_KEY = "lorad.text.chat_template"


class ChatTemplateError(ValueError):
    """The chat template cannot render these messages (an HTTP 400)."""


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder's shape (for its KV cache) and its text side."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tokenizer_json: str
    chat_template: str | None

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> DecoderSpec | None:
        meta = {p.key: p.value for p in model.metadata_props}
        raw = meta.get(LLM_CONFIG_KEY)
        if raw is None:
            return None
        info: Mapping[str, Any] = json.loads(raw)
        tokenizer = meta.get(TOKENIZER_KEY)
        if tokenizer is None:
            raise ValueError(f"decoder model declares {LLM_CONFIG_KEY} but no tokenizer ({TOKENIZER_KEY})")
        eos = info.get("eos_token_id")
        return cls(
            layers=int(info["num_hidden_layers"]), kv_heads=int(info["num_key_value_heads"]), head_dim=int(info["head_dim"]),
            vocab_size=int(info["vocab_size"]), max_positions=int(info["max_position_embeddings"]),
            eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])),
            bos_token_id=int(info["bos_token_id"]) if info.get("bos_token_id") is not None else None,
            tokenizer_json=tokenizer, chat_template=meta.get(CHAT_TEMPLATE_KEY),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one sequence takes (fp32 keys and values, every layer)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * 4

    @property
    def past_inputs(self) -> list[str]:
        return [n for i in range(self.layers) for n in past_names(i)]

    @property
    def present_outputs(self) -> list[str]:
        return [n for i in range(self.layers) for n in present_names(i)]

    def render_chat(self, messages: Sequence[Mapping[str, str]], *, bos_token: str = "", eos_token: str = "") -> str:
        """The prompt for ``messages`` ([{role, content}]) by the model's own chat template,
        rendered in Jinja's sandbox (the template comes from the model file), with the
        assistant's turn opened."""
        if self.chat_template is None:
            raise ChatTemplateError("this model declares no chat template; send the prompt as text without 'chat'")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.chat_template).render(messages=list(messages), add_generation_prompt=True,
                                                              bos_token=bos_token, eos_token=eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed: {e}") from e


def without_cache(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as training and scoring see it: whole windows of ``input_ids`` and
    ``attention_mask`` in, ``logits`` of every position out. The KV cache inputs become
    empty tensors made in the graph, ``position_ids`` are computed from the mask as
    :func:`~lorad.adapters.llama_builder.position_ids_from_mask` does (a right-padded
    window's pad positions get positions past its text, which nothing counts), and the
    ``present`` outputs are dropped (a copy; ``model`` is unchanged)."""
    raw = {p.key: p.value for p in model.metadata_props}.get(LLM_CONFIG_KEY)
    if raw is None:
        raise ValueError(f"not a decoder language model (no {LLM_CONFIG_KEY} metadata)")
    info = json.loads(raw)
    layers, kv_heads, head_dim = (int(info[k]) for k in ("num_hidden_layers", "num_key_value_heads", "head_dim"))
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    past = {n for i in range(layers) for n in past_names(i)}
    kept = [i for i in graph.input if i.name not in past and i.name != "position_ids"]
    del graph.input[:]
    graph.input.extend(kept)
    logits = [o for o in graph.output if o.name == "logits"]
    del graph.output[:]
    graph.output.extend(logits)
    scope = "/lorad/without_cache"

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, f"{scope}/{name}"))
        return f"{scope}/{name}"

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{scope}/{out}"], name=f"{scope}/{out}", **attrs)

    nodes = [
        node("Shape", ["input_ids"], "batch", start=0, end=1),
        node("Concat", [f"{scope}/batch", const("cache_tail", np.array([kv_heads, 0, head_dim], np.int64))],
             "cache_shape", axis=0),
        node("ConstantOfShape", [f"{scope}/cache_shape"], "empty_cache",
             value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        node("CumSum", ["attention_mask", const("axis1", np.array(1, np.int64))], "count"),
        node("Sub", [f"{scope}/count", const("one", np.array(1, np.int64))], "positions"),
        node("Cast", ["attention_mask"], "attended", to=TensorProto.BOOL),
    ]
    nodes.append(helper.make_node("Where", [f"{scope}/attended", f"{scope}/positions", const("pad_position", np.array(1, np.int64))],
                                  ["position_ids"], name=f"{scope}/position_ids"))
    nodes += [helper.make_node("Identity", [f"{scope}/empty_cache"], [name], name=f"{scope}/{name}") for name in sorted(past)]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    return derived
