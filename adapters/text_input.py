"""The text front step of a model that declares a tokenizer: strings in, token tensors out.

A model built by :mod:`lorad.adapters.bert_builder` carries its ``tokenizer.json``, its token
limit and its label names in ONNX ``metadata_props``; config values may override each. For
such a model the served interface is one ``BYTES`` input ``text`` of shape ``[N]``
(UTF-8 strings) instead of the encoder's token tensors, and the outputs gain ``label``
(``BYTES [N]``, the most probable label's name) when the model has label names.

Tokenizing uses the Hugging Face ``tokenizers`` library (the ``lorad[minilm]`` extra);
every bad string is a :class:`TextInputError` (an HTTP 400) naming which one and why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .bert_builder import INPUT_NAMES, LABELS_KEY, MAX_TOKENS_KEY, TOKENIZER_KEY

__all__ = ["TextInputError", "TextSetupError", "TextSpec", "TextFrontEnd", "TEXT_INPUT", "LABEL_OUTPUT"]

TEXT_INPUT = "text"
LABEL_OUTPUT = "label"


class TextInputError(ValueError):
    """A request's text cannot be tokenized for this model (HTTP 400)."""


class TextSetupError(ValueError):
    """The text front end of a model cannot be built; ``key`` is the ``model.*`` setting to change."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(message)


@dataclass(frozen=True)
class TextSpec:
    """A text-side tensor as the Open Inference Protocol describes it (cf. engine.TensorSpec)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class TextFrontEnd:
    """Tokenizes ``[N]`` UTF-8 strings into the encoder's ``input_ids`` / ``attention_mask`` / ``token_type_ids``."""

    def __init__(self, tokenizer_json: str, *, max_tokens: int, labels: Sequence[str] = (),
                 model_inputs: Sequence[str] = INPUT_NAMES) -> None:
        if max_tokens <= 2:
            raise ValueError(f"max_tokens must leave room for text between the special tokens, got {max_tokens}")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # the extra is optional: say which one to install
            raise RuntimeError("this model declares a tokenizer; install it with: pip install 'lorad[minilm]'") from e
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"the tokenizer cannot be loaded: {e}") from e
        # Lengths are checked, never silently cut; a request is padded to the length bucket of
        # its longest text (see encode).
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.labels = tuple(labels)
        unknown = sorted(set(model_inputs) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"model inputs {unknown} are not token tensors this front end makes; allowed: {', '.join(INPUT_NAMES)}")
        self._model_inputs = tuple(model_inputs)
        self._pad_id = _pad_id(tokenizer_json)

    @classmethod
    def from_model(
        cls,
        model: onnx.ModelProto,
        *,
        tokenizer: Path | None = None,
        labels: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> TextFrontEnd | None:
        """The front end a model declares (config values override), or ``None`` for a numeric model.

        Raises :class:`TextSetupError` naming the config key to change: the override that is
        wrong (``model.tokenizer``, ``model.labels``, ``model.max_text_tokens``), or
        ``model.path`` for what the model file itself declares.
        """
        meta = {p.key: p.value for p in model.metadata_props}
        if tokenizer is not None:
            try:
                tokenizer_json: str | None = tokenizer.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TextSetupError("model.tokenizer", f"cannot read tokenizer {str(tokenizer)!r}: {e}") from e
        else:
            tokenizer_json = meta.get(TOKENIZER_KEY)
        if tokenizer_json is None:
            if labels:
                raise TextSetupError("model.labels", "label names are given but the model declares no tokenizer; "
                                                     "set model.tokenizer")
            return None
        labels_key = "model.labels" if labels is not None else "model.path"
        if labels is None:
            try:
                labels = _labels_of(meta.get(LABELS_KEY))
            except ValueError as e:
                raise TextSetupError("model.path", str(e)) from e
        max_key = "model.max_text_tokens" if max_tokens is not None else "model.path"
        if max_tokens is None:
            declared = meta.get(MAX_TOKENS_KEY)
            max_tokens = int(declared) if declared and declared.isdigit() else 512
        if max_tokens <= 2:
            raise TextSetupError(max_key, f"max_tokens must leave room for text between the special tokens, got {max_tokens}")
        classes = _classes_of(model)
        if labels and classes is not None and len(labels) != classes:
            raise TextSetupError(labels_key, f"{len(labels)} label names are given but the model scores {classes} classes")
        graph_inputs = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
        unknown = sorted(set(graph_inputs) - set(INPUT_NAMES))
        if unknown:
            raise TextSetupError("model.path", f"model inputs {unknown} are not token tensors this front end makes; "
                                               f"allowed: {', '.join(INPUT_NAMES)}")
        try:
            return cls(tokenizer_json, max_tokens=max_tokens, labels=labels, model_inputs=graph_inputs)
        except RuntimeError as e:  # the tokenizers extra is not installed
            raise TextSetupError("model.path", str(e)) from e
        except ValueError as e:  # tokenizers refused the file
            raise TextSetupError("model.tokenizer" if tokenizer is not None else "model.path", str(e)) from e

    # -- the served interface ---------------------------------------------------------

    @property
    def inputs(self) -> list[TextSpec]:
        return [TextSpec(TEXT_INPUT, "BYTES", (-1,))]

    def outputs(self, model_outputs: Sequence[Any]) -> list[Any]:
        """The model's outputs, plus ``label`` when there are label names."""
        extra = [TextSpec(LABEL_OUTPUT, "BYTES", (-1,))] if self.labels else []
        return list(model_outputs) + extra

    # -- per request --------------------------------------------------------------------

    def encode(self, inputs: Mapping[str, np.ndarray], *, length: int | None = None) -> dict[str, np.ndarray]:
        """``{"text": [N] bytes}`` → the encoder's int64 ``[N, S]`` tensors.

        S is ``length`` when given (a training example: a fixed length that does not depend
        on the data), else the length bucket of the longest text (:meth:`bucket`), so that
        concurrent requests of similar lengths share one batched call. Padding is masked
        out: it does not change what the model answers.
        """
        if TEXT_INPUT not in inputs:
            raise TextInputError(f"this text model takes the input {TEXT_INPUT!r} (BYTES [N], UTF-8 strings)")
        texts = _decode_utf8(inputs[TEXT_INPUT])
        encodings = self._tokenizer.encode_batch(texts)
        for i, enc in enumerate(encodings):
            if len(enc.ids) > self.max_tokens:
                raise TextInputError(
                    f"input {TEXT_INPUT!r}[{i}] is {len(enc.ids)} tokens long; this model takes at most "
                    f"{self.max_tokens} tokens per text (about {self.max_tokens - 2} words or word pieces)"
                )
        longest = max(len(e.ids) for e in encodings)
        length = self.bucket(longest) if length is None else length
        if longest > length:
            raise TextInputError(f"a text of {longest} tokens does not fit the fixed length {length}")
        ids = np.full((len(texts), length), self._pad_id, np.int64)
        mask = np.zeros((len(texts), length), np.int64)
        types = np.zeros((len(texts), length), np.int64)
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[i, :n], mask[i, :n], types[i, :n] = enc.ids, 1, enc.type_ids
        tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: tensors[name] for name in self._model_inputs}

    def bucket(self, tokens: int) -> int:
        """The padded length of a request whose longest text has ``tokens`` tokens: the next
        power of two from 8, at most :attr:`max_tokens`."""
        size = 8
        while size < tokens:
            size *= 2
        return min(size, self.max_tokens)

    def label_index(self, label: object) -> int:
        """A label given by name (one of :attr:`labels`) or class number, as a class number."""
        if isinstance(label, str):
            if label not in self.labels:
                shown = ", ".join(self.labels[:8]) + (", …" if len(self.labels) > 8 else "")
                raise TextInputError(f"label {label!r} is not a label of this model; allowed: {shown or 'class numbers'}")
            return self.labels.index(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise TextInputError(f"label {label!r} must be a label name or a class number")
        if self.labels and not 0 <= label < len(self.labels):
            raise TextInputError(f"label {label} is not a class of this model; allowed: 0..{len(self.labels) - 1} "
                                 "or a label name")
        return label

    def decode(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add the most probable label's name per row (from ``probabilities`` or ``logits``)."""
        scores = outputs.get("probabilities", outputs.get("logits"))
        if not self.labels or scores is None:
            return dict(outputs)
        best = np.asarray(scores).argmax(axis=-1)
        names = np.array([self.labels[int(i)].encode() for i in best], dtype=object)
        return {**outputs, LABEL_OUTPUT: names}


def _decode_utf8(column: np.ndarray) -> list[str]:
    if column.ndim != 1 or len(column) == 0:
        raise TextInputError(f"input {TEXT_INPUT!r} must be a non-empty [N] array of strings")
    texts = []
    for i, raw in enumerate(column):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextInputError(f"input {TEXT_INPUT!r}[{i}] is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise TextInputError(f"input {TEXT_INPUT!r}[{i}] is empty; send at least one word per text")
        texts.append(text)
    return texts


def _classes_of(model: onnx.ModelProto) -> int | None:
    for out in model.graph.output:
        if out.name in ("logits", "probabilities"):
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 2 and dims[1].HasField("dim_value"):
                return int(dims[1].dim_value)
    return None


def _labels_of(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    labels = json.loads(raw)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"model metadata {LABELS_KEY!r} must be a JSON list of strings")
    return tuple(labels)


def _pad_id(tokenizer_json: str) -> int:
    """The padding id the tokenizer file configures (BERT: 0 for ``[PAD]``)."""
    padding = json.loads(tokenizer_json).get("padding") or {}
    pad_id = padding.get("pad_id", 0)
    return pad_id if isinstance(pad_id, int) else 0
