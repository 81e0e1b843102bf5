"""A language model's training examples (trainer/lm_examples.py): a text cut into
non-overlapping token windows whose every token but the first is predicted exactly once,
window rows batched with their text's index, per-text scores against a hand computation,
the tokenizer's refusals, and the served decoder's feeds for a batch of windows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lorad.adapters.engine import InferenceEngine, TensorSpec
from lorad.adapters.llama_builder import build_llama
from lorad.trainer.errors import BadTrainingDataError
from lorad.trainer.example_store import Example
from lorad.trainer.lm_examples import TOKENS, TextExamples, collate_texts, lm_scores, serving_feeds, windows_of
from lorad.trainer.portable_graph import EXAMPLE_INDEX_INPUT, IGNORED_LABEL
from tests.unit.test_llama_builder import CFG, _tiny

X = IGNORED_LABEL


def _text(example_id: int, tokens: list[int] | np.ndarray) -> Example:
    return Example(example_id, "a", {TOKENS: np.asarray(tokens, np.int32)}, np.zeros(0, np.int64), 0.0)


# -- windows_of ----------------------------------------------------------------------------------


def test_windows_do_not_overlap_and_the_last_position_predicts_the_next_windows_first_token() -> None:
    ids, mask, labels = windows_of(np.arange(11, 18, dtype=np.int32), 3)  # 7 tokens: 3 windows, 2 padded
    assert ids.dtype == mask.dtype == labels.dtype == np.int64
    np.testing.assert_array_equal(ids, [[11, 12, 13], [14, 15, 16], [17, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    # Position i is labelled with the token after it, across window boundaries (13 -> 14,
    # 16 -> 17); the text's last token predicts nothing and padding is not scored.
    np.testing.assert_array_equal(labels, [[12, 13, 14], [15, 16, 17], [X, X, X]])


def test_every_token_but_the_first_is_predicted_exactly_once() -> None:
    tokens = np.random.default_rng(0).integers(0, 1000, 23)
    for window in (2, 5, 8, 23, 40):
        ids, mask, labels = windows_of(tokens, window)
        assert ids.shape == (-(-23 // window), window)
        np.testing.assert_array_equal(ids[mask == 1], tokens)
        np.testing.assert_array_equal(labels[labels != X], tokens[1:])
        assert not ids[mask == 0].any() and (labels[mask == 0] == X).all()


def test_a_text_of_exactly_one_window_is_one_unpadded_row() -> None:
    ids, mask, labels = windows_of(np.array([5, 6, 7, 8]), 4)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1]])
    np.testing.assert_array_equal(labels, [[6, 7, 8, X]])
    # Two whole windows: no third, empty one.
    ids, mask, labels = windows_of(np.arange(1, 9), 4)
    assert ids.shape == (2, 4) and mask.all()
    np.testing.assert_array_equal(labels, [[2, 3, 4, 5], [6, 7, 8, X]])


# -- collate_texts -------------------------------------------------------------------------------


def test_collate_gives_consecutive_window_rows_with_each_texts_index_and_skips_non_texts() -> None:
    texts = [[1, 2, 3, 4, 5], [6, 7], list(range(10, 19))]  # 2, 1 and 3 windows of 4
    examples = [
        _text(1, texts[0]),
        Example(2, "a", {"x": np.ones(3, np.float32)}, np.zeros(0, np.int64), 0.0),  # no token ids
        _text(3, texts[1]),
        _text(4, [9]),  # one token: nothing to predict
        Example(5, "a", {TOKENS: np.ones((2, 3), np.int32)}, np.zeros(0, np.int64), 0.0),  # not a 1-D text
        _text(6, texts[2]),
    ]
    batch, skipped = collate_texts(examples, window=4, label_input="targets")
    assert skipped == 3
    assert set(batch) == {"input_ids", "attention_mask", EXAMPLE_INDEX_INPUT, "targets"}
    # Indices count the texts kept: a skipped example leaves no gap.
    np.testing.assert_array_equal(batch[EXAMPLE_INDEX_INPUT], [0, 0, 1, 2, 2, 2])
    assert batch[EXAMPLE_INDEX_INPUT].dtype == np.int64
    want = [windows_of(np.asarray(t), 4) for t in texts]
    for k, name in enumerate(("input_ids", "attention_mask", "targets")):
        assert batch[name].dtype == np.int64
        np.testing.assert_array_equal(batch[name], np.concatenate([w[k] for w in want]))


@pytest.mark.parametrize("examples", [[], [Example(1, "a", {"x": np.ones(2)}, np.zeros(0), 0.0), _text(2, [4])]])
def test_an_empty_batch_has_zero_rows_of_the_window_length(examples: list[Example]) -> None:
    batch, skipped = collate_texts(examples, window=6, label_input="labels")
    assert skipped == len(examples)
    for name in ("input_ids", "attention_mask", "labels"):
        assert batch[name].shape == (0, 6) and batch[name].dtype == np.int64
    assert batch[EXAMPLE_INDEX_INPUT].shape == (0,) and batch[EXAMPLE_INDEX_INPUT].dtype == np.int64


# -- lm_scores -----------------------------------------------------------------------------------


def _scored_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of 4 windows of 3 positions over 5 tokens: text 0 has windows 0-1 (the second
    half padding), text 1 windows 2-3 (its second all padding: no scored position)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (4, 3, 5)).astype(np.float32)
    labels = np.array([[1, 4, 0], [2, X, X], [3, 3, 1], [X, X, X]])
    return logits, labels, np.array([0, 0, 1, 1])


def test_loss_is_each_texts_mean_negative_log_likelihood_over_its_scored_positions() -> None:
    logits, labels, index = _scored_batch()
    z = logits.astype(np.float64)
    nll = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, np.maximum(labels, 0)[..., None], -1)[..., 0]
    # By hand: text 0 scores positions (0,0), (0,1), (0,2), (1,0); text 1 (2,0), (2,1), (2,2).
    want = [(nll[0, 0] + nll[0, 1] + nll[0, 2] + nll[1, 0]) / 4, (nll[2, 0] + nll[2, 1] + nll[2, 2]) / 3]
    np.testing.assert_allclose(lm_scores(logits, labels, index, "loss"), want, rtol=1e-6)
    # Large logits: the same loss (the log-sum-exp is taken stably).
    np.testing.assert_allclose(lm_scores(logits + np.float32(500), labels, index, "loss"), want, rtol=1e-4)


def test_accuracy_is_the_share_of_scored_positions_ranked_first() -> None:
    logits, labels, index = _scored_batch()
    top = logits.argmax(-1)
    labels[0, 0], labels[0, 1] = top[0, 0], (top[0, 1] + 1) % 5  # one hit, one miss for certain
    hits = top == labels
    want = [(hits[0].sum() + hits[1, 0]) / 4, hits[2].sum() / 3]
    assert lm_scores(logits, labels, index, "accuracy") == pytest.approx(want)
    assert lm_scores(np.zeros((0, 3, 5)), np.zeros((0, 3), np.int64), np.zeros(0, np.int64), "loss") == []


# -- TextExamples --------------------------------------------------------------------------------


def _tokenizer_json(words: int) -> str:
    import tokenizers  # here, not at the top: the ort-training venv (which deselects this) lacks it
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return str(tok.to_str())


def test_encode_keeps_a_texts_token_ids_as_one_unlabelled_example() -> None:
    texts = TextExamples(_tokenizer_json(50), vocab_size=50)
    inputs, label = texts.encode("w3 w17 w5 w49", max_tokens=4)
    assert set(inputs) == {TOKENS}
    np.testing.assert_array_equal(inputs[TOKENS], [3, 17, 5, 49])
    assert inputs[TOKENS].dtype == np.int32 and label.size == 0


@pytest.mark.parametrize("text, words", [
    ("", "has 0 token(s); a training text needs at least 2"),
    ("w7", "has 1 token(s)"),
    ("w1 w2 w3 w4 w5", "has 5 tokens; one example holds at most 4 (trainer.max_text_tokens)"),
    (b"w1 w2", "'text' must be a string, got bytes"),
])
def test_encode_refuses_an_empty_a_one_token_or_a_too_long_text(text: Any, words: str) -> None:
    texts = TextExamples(_tokenizer_json(50), vocab_size=50)
    with pytest.raises(BadTrainingDataError) as e:
        texts.encode(text, max_tokens=4)
    assert words in str(e.value)


def test_encode_refuses_ids_outside_the_models_vocabulary() -> None:
    texts = TextExamples(_tokenizer_json(50), vocab_size=20)  # the tokenizer knows more words than the model
    assert texts.encode("w1 w19", max_tokens=8)[0][TOKENS].tolist() == [1, 19]
    with pytest.raises(BadTrainingDataError, match="outside the model's vocabulary of 20"):
        texts.encode("w1 w20", max_tokens=8)


# -- serving_feeds -------------------------------------------------------------------------------


def test_serving_feeds_give_positions_from_the_mask_and_an_empty_cache() -> None:
    ids, mask, _ = windows_of(np.array([3, 9, 4, 22, 7, 31]), 4)  # the second window holds 2 tokens
    specs = [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1)),
             TensorSpec("position_ids", "INT64", (-1, -1)), TensorSpec("past.0.key", "FP32", (-1, 2, -1, 16)),
             TensorSpec("flags", "INT32", (-1, 3))]
    feeds = serving_feeds({"input_ids": ids, "attention_mask": mask, "labels": np.zeros_like(ids)}, specs)
    assert set(feeds) == {"input_ids", "attention_mask", "position_ids", "past.0.key", "flags"}  # labels not fed
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2, 3], [0, 1, 1, 1]])  # 1 where masked
    assert feeds["past.0.key"].shape == (2, 2, 0, 16) and feeds["past.0.key"].dtype == np.float32
    assert feeds["flags"].shape == (2, 3) and feeds["flags"].dtype == np.int32 and not feeds["flags"].any()


def test_serving_feeds_run_the_served_decoder_and_right_padding_changes_no_scored_position() -> None:
    weights, _ = _tiny(2)
    engine = InferenceEngine(build_llama(CFG, weights), targets=["q_proj", "v_proj"], rank=2,
                             quantized_compute="fp32", intra_op_threads=1, allow_spinning=False)
    tokens = np.array([3, 9, 4, 22, 7, 31, 12])
    ids, mask, labels = windows_of(tokens, 5)  # the second window: 2 tokens, 3 of padding
    feeds = serving_feeds({"input_ids": ids, "attention_mask": mask}, engine.inputs)
    assert set(feeds) == {s.name for s in engine.inputs}
    logits = engine.run(feeds)["logits"]
    assert logits.shape == (2, 5, CFG.vocab_size)
    alone = engine.run(serving_feeds({"input_ids": tokens[None, 5:], "attention_mask": np.ones((1, 2), np.int64)},
                                     engine.inputs))["logits"]
    np.testing.assert_allclose(logits[1, :2], alone[0], rtol=1e-4, atol=1e-5)
    assert all(np.isfinite(lm_scores(logits, labels, np.zeros(2, np.int64), "loss")))
