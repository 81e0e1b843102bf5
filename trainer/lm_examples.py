"""A language model's training examples: the user's text, cut into token windows.

**The privacy unit is one submitted text.** :class:`TextExamples` tokenizes a text with the
model's own tokenizer (as generation does: no special tokens added) and the store keeps its
token ids as ONE example, however long it is (up to ``max_text_tokens``). At training time
:func:`collate_texts` cuts every sampled text into windows of ``window_tokens`` tokens, a
length from the configuration, never from the data, and gives each window row the index of
its text (:data:`~lorad.trainer.portable_graph.EXAMPLE_INDEX_INPUT`): the step graph sums a
text's windows' gradients before clipping, so one text moves the update by at most C
however many windows it has. Where texts carry a user id, the store's per-user limit
(``trainer.store.max_examples_per_user``) bounds each user's texts, and the guarantee is
per user (trainer/service.py).

Windows do not overlap: window k holds tokens [kL, (k+1)L) and position i of it is scored
on the token after it, also across a window boundary (the last position of a window
predicts the next window's first token), so every token but a text's first is predicted
exactly once. A text's last window is right-padded; padded positions are not scored
(label -100).

The validation gate scores a held-out text by the same windows through the serving
session: :func:`lm_scores` gives each text its mean next-token loss over its scored
tokens, or the share of them the model ranks first (``accuracy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lorad.adapters.llama_builder import position_ids_from_mask

from .errors import BadTrainingDataError
from .example_store import Example
from .portable_graph import EXAMPLE_INDEX_INPUT, IGNORED_LABEL

__all__ = ["TOKENS", "TextExamples", "windows_of", "collate_texts", "window_scores", "example_scores", "lm_scores",
           "serving_feeds"]

#: The stored example's one tensor: the text's token ids (int32 [tokens]).
TOKENS = "input_ids"
_NO_LABEL = np.zeros(0, np.int64)


class TextExamples:
    """Tokenizes texts into stored examples (see the module docstring)."""

    def __init__(self, tokenizer_json: str, *, vocab_size: int) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self._vocab = vocab_size

    def encode(self, text: str, *, max_tokens: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(inputs, label) of one example: the token ids, and an empty label (a text's
        labels are its own next tokens). BadTrainingDataError for an empty or too long text."""
        if not isinstance(text, str):
            raise BadTrainingDataError(f"'text' must be a string, got {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) < 2:
            raise BadTrainingDataError(f"the text has {len(ids)} token(s); a training text needs at least 2 (its "
                                       "first token is context, the others are predicted)")
        if len(ids) > max_tokens:
            raise BadTrainingDataError(
                f"the text has {len(ids)} tokens; one example holds at most {max_tokens} "
                "(trainer.max_text_tokens): split it, knowing each part then counts as an example of its own")
        tokens = np.asarray(ids, np.int32)
        if int(tokens.max()) >= self._vocab or int(tokens.min()) < 0:
            raise BadTrainingDataError(f"the tokenizer gave ids outside the model's vocabulary of {self._vocab}")
        return {TOKENS: tokens}, _NO_LABEL


def windows_of(tokens: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, labels), each int64 ``[windows, window]``, of one text."""
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    count = max(1, -(-tokens.size // window))
    ids = np.zeros(count * window, np.int64)
    ids[: tokens.size] = tokens
    mask = np.zeros(count * window, np.int64)
    mask[: tokens.size] = 1
    labels = np.full(count * window, IGNORED_LABEL, np.int64)
    labels[: tokens.size - 1] = tokens[1:]
    return ids.reshape(count, window), mask.reshape(count, window), labels.reshape(count, window)


def collate_texts(examples: Sequence[Example], *, window: int, label_input: str) -> tuple[dict[str, np.ndarray], int]:
    """A batch of window rows (with each row's example index) of ``examples``; returns (batch,
    number of examples skipped: stored without token ids)."""
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    index: list[np.ndarray] = []
    skipped = 0
    for ex in examples:
        tokens = ex.inputs.get(TOKENS)
        if tokens is None or tokens.ndim != 1 or tokens.size < 2:
            skipped += 1
            continue
        i, m, lab = windows_of(tokens, window)
        ids.append(i)
        masks.append(m)
        labels.append(lab)
        index.append(np.full(len(i), len(index), np.int64))
    if not ids:
        empty = np.zeros((0, window), np.int64)
        return {"input_ids": empty, "attention_mask": empty, EXAMPLE_INDEX_INPUT: np.zeros(0, np.int64),
                label_input: empty}, skipped
    return {"input_ids": np.concatenate(ids), "attention_mask": np.concatenate(masks),
            EXAMPLE_INDEX_INPUT: np.concatenate(index), label_input: np.concatenate(labels)}, skipped


def window_scores(logits: Any, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per window row: the summed score of its scored positions (next-token loss, or top-1
    hits for ``accuracy``) and how many there are; one row at a time, so that the float64
    work holds one window's logits (64 × 49,152: 25 MB), not the batch's."""
    logits = np.asarray(logits)
    sums = np.zeros(len(labels))
    counts = np.zeros(len(labels))
    for r, (row, label) in enumerate(zip(logits, labels, strict=True)):
        counted = label != IGNORED_LABEL
        if not counted.any():
            continue
        scored, target = row[counted], label[counted]
        if metric == "accuracy":
            per_token = (scored.argmax(axis=-1) == target).astype(np.float64)
        else:
            wide = scored.astype(np.float64)
            top = wide.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(wide - top).sum(axis=-1)) + top[:, 0]
            per_token = log_z - wide[np.arange(len(target)), target]
        sums[r], counts[r] = per_token.sum(), counted.sum()
    return sums, counts


def example_scores(sums: np.ndarray, counts: np.ndarray, example_index: np.ndarray) -> list[float]:
    """Per example: its windows' summed scores over their scored positions (a mean)."""
    examples = int(example_index.max()) + 1 if example_index.size else 0
    total = np.bincount(example_index, weights=sums, minlength=examples)
    scored = np.bincount(example_index, weights=counts, minlength=examples)
    return (total / np.maximum(scored, 1)).tolist()


def lm_scores(logits: Any, labels: np.ndarray, example_index: np.ndarray, metric: str) -> list[float]:
    """Per example: the mean next-token loss over its scored positions (``loss``), or the
    share of them whose label the model ranks first (``accuracy``)."""
    return example_scores(*window_scores(logits, labels, metric), example_index)


def serving_feeds(batch: Mapping[str, np.ndarray], specs: Sequence[Any]) -> dict[str, np.ndarray]:
    """The served decoder's inputs for a batch of windows: its ids and mask, positions from
    the mask, and an empty KV cache (every other input, its dynamic dimensions 0)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    feeds = {"input_ids": ids, "attention_mask": mask}
    for s in specs:
        if s.name == "position_ids":
            feeds[s.name] = position_ids_from_mask(mask, mask.shape[1])
        elif s.name not in feeds:
            feeds[s.name] = np.zeros([len(ids), *(0 if d < 0 else d for d in s.shape[1:])], s.numpy_dtype)
    return feeds
