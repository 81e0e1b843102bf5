"""A portable step taken in parts of whole examples (``PortableStepper(max_part_rows=k)``,
trainer/portable.py) is the step of the whole batch: the same parameters and moments (up to
float32 rounding of each part's clipped sum), private with the same seeded noise or not, on
the tiny 4-bit LLaMA decoder with the causal_lm loss (examples of 1 to 3 token windows) and
on the tiny encoder; the privacy audit's canaries see the examples' whole clipped sum; and
:func:`split_parts` cuts a batch only between examples.

The decoder computes its 4-bit products in fp32 here: with int8 compute the forward rounds
activations to 8 bits, so a parameter difference of float32 rounding can move an activation
across a rounding step and the two steppers' later steps differ by more than rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.reference_encoder import REFERENCE_TARGETS
from lorad.adapters.llama_builder import build_llama
from lorad.adapters.onnx_compat import set_quantized_compute
from lorad.trainer.artifacts import ArtifactConfig, TrainingArtifacts, build_artifacts
from lorad.trainer.dp_step import DPSettings
from lorad.trainer.example_store import Example
from lorad.trainer.lm_examples import TOKENS, collate_texts
from lorad.trainer.noise import SeededNoise
from lorad.trainer.portable import PortableStepper, split_parts
from lorad.trainer.portable_graph import EXAMPLE_INDEX_INPUT
from tests.unit.test_llama_builder import CFG, _tiny
from tests.unit.trainer_helpers import CLASSES, SEQ, CanaryRows, D, tiny_model

WINDOW = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("step-parts")


def _decoder_artifacts(cache: Path, **changes: Any) -> TrainingArtifacts:
    weights, _ = _tiny(6)
    config = ArtifactConfig(**{"targets": ("*q_proj*", "*v_proj*"), "rank": 2, "alpha": 4.0, "loss": "causal_lm",
                               "output": "logits", **changes})
    model = set_quantized_compute(build_llama(CFG, weights), "fp32")  # see the module docstring
    return build_artifacts(model, config, cache_dir=cache, backend="portable")


def _encoder_artifacts(cache: Path, **changes: Any) -> TrainingArtifacts:
    config = ArtifactConfig(**{"targets": tuple(REFERENCE_TARGETS), "rank": 4, "alpha": 8.0, **changes})
    return build_artifacts(tiny_model(), config, cache_dir=cache, backend="portable")


def _text_batch(seed: int, windows: list[int]) -> dict[str, np.ndarray]:
    """Texts of random tokens, text i spanning ``windows[i]`` windows (its last one padded)."""
    rng = np.random.default_rng(seed)
    examples = [Example(i, "a", {TOKENS: rng.integers(0, CFG.vocab_size, rng.integers((w - 1) * WINDOW + 2,
                                                                                       w * WINDOW + 1)).astype(np.int32)},
                        np.zeros(0, np.int64), 0.0) for i, w in enumerate(windows)]
    batch, skipped = collate_texts(examples, window=WINDOW, label_input="labels")
    assert skipped == 0 and len(batch["input_ids"]) == sum(windows)
    return batch


def _encoder_batch(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, SEQ, D)).astype(np.float32), "labels": rng.integers(0, CLASSES, n).astype(np.int64)}


#: Three steps per model; a 3-window text is longer than the decoder's parts of 2 rows.
DECODER_BATCHES = [[1, 3, 2, 1, 2], [2, 2, 1], [3, 1, 1, 3]]
ENCODER_BATCHES = [7, 4, 9]


def _batches(model: str) -> list[dict[str, np.ndarray]]:
    if model == "decoder":
        return [_text_batch(10 + k, w) for k, w in enumerate(DECODER_BATCHES)]
    return [_encoder_batch(10 + k, n) for k, n in enumerate(ENCODER_BATCHES)]


def _artifacts(model: str, cache: Path, **changes: Any) -> TrainingArtifacts:
    return (_decoder_artifacts if model == "decoder" else _encoder_artifacts)(cache, **changes)


def _median_norm(stepper: PortableStepper, batch: dict[str, np.ndarray]) -> float:
    """The median of the batch's per-example gradient norms (each example alone)."""
    index = batch.get(EXAMPLE_INDEX_INPUT, np.arange(len(batch["labels"])))
    norms = []
    for k in range(int(index.max()) + 1):
        rows = index == k
        one = {name: value[rows] for name, value in batch.items()}
        if EXAMPLE_INDEX_INPUT in one:
            one[EXAMPLE_INDEX_INPUT] = np.zeros(int(rows.sum()), np.int64)
        norms.append(float(np.linalg.norm(stepper.gradient(one, clip_norm=1e9)[0])))
    return float(np.median(norms))


def _assert_same_state(whole: PortableStepper, parts: PortableStepper, optimizer: str, lr: float) -> None:
    if optimizer == "sgd":  # the update is linear in the gradient
        np.testing.assert_allclose(parts._params, whole._params, rtol=1e-5,
                                   atol=1e-6 * float(np.abs(whole._params).max()))
        return
    for name in ("_m", "_v"):
        a, b = getattr(whole, name), getattr(parts, name)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()), err_msg=name)
    # AdamW's step m/(√v + ε) magnifies a gradient's rounding by up to lr/ε (ε = 1e-6) where
    # the gradient is about ε: the parameters agree to a small share of one step.
    np.testing.assert_allclose(parts._params, whole._params, rtol=0, atol=1e-3 * lr)


PRIVATE_CASES = [("decoder", 2, "sgd"), ("decoder", 2, "adamw"), ("decoder", 3, "adamw"), ("encoder", 3, "sgd"),
                 ("encoder", 3, "adamw")]


@pytest.mark.parametrize(("model", "part_rows", "optimizer"), PRIVATE_CASES)
def test_a_private_step_in_parts_is_the_whole_batchs_step(cache: Path, model: str, part_rows: int,
                                                          optimizer: str) -> None:
    artifacts = _artifacts(model, cache, optimizer=optimizer)
    batches = _batches(model)
    assert all(len(split_parts(b, part_rows)) >= 2 for b in batches)  # the steps do run in parts
    probe = PortableStepper(artifacts, learning_rate=0.05, noise=SeededNoise(0),
                            dp=DPSettings(noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=4.0))
    probe.step(batches[0])  # B leaves zero: every factor has a gradient
    clip = _median_norm(probe, batches[1])  # about half the examples clipped
    probe.close()
    dp = DPSettings(noise_multiplier=0.7, clip_norm=clip, expected_batch_size=4.0)
    whole = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(3), intra_op_threads=1)
    parts = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(3), intra_op_threads=1,
                            max_part_rows=part_rows)
    try:
        for batch in batches:
            want, got = whole.step(batch), parts.step(batch)
            examples = len(np.unique(batch[EXAMPLE_INDEX_INPUT])) if model == "decoder" else len(batch["labels"])
            assert got.batch_size == want.batch_size == examples and got.step == want.step
            assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-5)
            _assert_same_state(whole, parts, optimizer, 0.05)
    finally:
        whole.close()
        parts.close()


@pytest.mark.parametrize(("model", "part_rows", "optimizer"), [("decoder", 2, "sgd"), ("decoder", 2, "adamw"),
                                                               ("encoder", 3, "adamw")])
def test_a_non_private_step_in_parts_is_the_whole_batchs_step(cache: Path, model: str, part_rows: int,
                                                              optimizer: str) -> None:
    artifacts = _artifacts(model, cache, private=False, optimizer=optimizer)
    whole = PortableStepper(artifacts, learning_rate=0.05, dp=None, noise=None, expected_batch_size=4.0,
                            intra_op_threads=1)
    parts = PortableStepper(artifacts, learning_rate=0.05, dp=None, noise=None, expected_batch_size=4.0,
                            intra_op_threads=1, max_part_rows=part_rows)
    try:
        start = whole._params.copy()
        for batch in _batches(model):
            # From the same state each step: without noise AdamW's magnified rounding (see
            # _assert_same_state) would feed the next steps' gradients and grow.
            parts._params, parts._m, parts._v = whole._params.copy(), whole._m.copy(), whole._v.copy()
            want, got = whole.step(batch), parts.step(batch)
            assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-5)
            _assert_same_state(whole, parts, optimizer, 0.05)
        assert np.abs(whole._params - start).max() > 1e-3
    finally:
        whole.close()
        parts.close()


def test_an_empty_batch_in_parts_is_the_scaled_noise_alone(cache: Path) -> None:
    artifacts = _decoder_artifacts(cache, optimizer="sgd")
    dp = DPSettings(noise_multiplier=1.0, clip_norm=0.5, expected_batch_size=4.0)
    stepper = PortableStepper(artifacts, learning_rate=1.0, dp=dp, noise=SeededNoise(8), max_part_rows=1)
    try:
        empty = _text_batch(0, [])
        before = stepper._params.copy()
        result = stepper.step(empty)
        assert (result.batch_size, result.loss_sum) == (0, 0.0)
        want = SeededNoise(8).gaussian64(artifacts.noise_size, 0.5).astype(np.float32) / 4
        np.testing.assert_allclose(before - stepper._params, want, rtol=1e-6, atol=1e-7)
    finally:
        stepper.close()


# -- the privacy audit's canaries --------------------------------------------------------------




@pytest.mark.parametrize(("model", "part_rows"), [("decoder", 2), ("encoder", 3)])
def test_canaries_observe_the_examples_whole_clipped_sum_when_a_step_runs_in_parts(
        cache: Path, model: str, part_rows: int) -> None:
    artifacts = _artifacts(model, cache, optimizer="sgd")
    size = artifacts.noise_size
    rng = np.random.default_rng(4)
    canaries = rng.normal(size=(2, size)).astype(np.float32)
    canaries *= (np.array([4.0, 0.1]) / np.linalg.norm(canaries, axis=1))[:, None]  # one clipped, one not (C = 1)
    dp = DPSettings(noise_multiplier=0.5, clip_norm=1.0, expected_batch_size=4.0)
    feeds = {k: CanaryRows(canaries) for k in ("whole", "parts")}
    whole = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(2), canaries=feeds["whole"])
    parts = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(2), canaries=feeds["parts"],
                            max_part_rows=part_rows)
    plain = PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(2))
    try:
        for batch in _batches(model)[:2]:
            assert len(split_parts(batch, part_rows)) >= 2
            plain._params = whole._params.copy()  # the same parameters as the audited steppers
            clipped, _ = plain.gradient(batch, clip_norm=1.0)  # the examples' clipped sum, taken whole
            whole.step(batch)
            parts.step(batch)
            (released_whole, examples_whole), (released_parts, examples_parts) = feeds["whole"].seen[-1], \
                feeds["parts"].seen[-1]
            scale = float(np.abs(examples_whole).max())
            np.testing.assert_allclose(examples_parts, examples_whole, rtol=1e-5, atol=1e-6 * scale)
            np.testing.assert_allclose(examples_parts, clipped, rtol=1e-4, atol=1e-5 * scale)
            np.testing.assert_allclose(released_parts, released_whole, rtol=1e-5, atol=1e-6 * scale)
            # What the release holds beyond the examples: the canaries clipped to C, and the noise.
            noise = released_parts - examples_parts - (canaries[0] / 4 + canaries[1])
            assert abs(float(np.std(noise)) - 0.5) < 0.1
            np.testing.assert_allclose(parts._params, whole._params, rtol=1e-5, atol=1e-6)
    finally:
        whole.close()
        parts.close()
        plain.close()


# -- split_parts ---------------------------------------------------------------------------------


def _index_batch(index: list[int]) -> dict[str, np.ndarray]:
    rows = len(index)
    return {"input_ids": np.arange(rows * 3).reshape(rows, 3), EXAMPLE_INDEX_INPUT: np.asarray(index, np.int64),
            "labels": np.arange(rows) + 100}


def test_parts_hold_whole_examples_with_indices_restarting_at_zero() -> None:
    batch = _index_batch([0, 1, 1, 2, 3, 3, 3, 4, 5, 5])
    parts = split_parts(batch, 3)
    # Greedy in order: [0 1 1] [2] (with 3's three rows it would be 4) [3 3 3] [4 5 5].
    assert [p[EXAMPLE_INDEX_INPUT].tolist() for p in parts] == [[0, 1, 1], [0], [0, 0, 0], [0, 1, 1]]
    for name in ("input_ids", "labels"):
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), batch[name])
    assert all(set(p) == set(batch) for p in parts)


def test_an_example_longer_than_a_part_is_a_part_of_its_own() -> None:
    parts = split_parts(_index_batch([0, 1, 1, 1, 1, 2, 3]), 2)
    assert [p["labels"].tolist() for p in parts] == [[100], [101, 102, 103, 104], [105, 106]]
    assert [p[EXAMPLE_INDEX_INPUT].tolist() for p in parts] == [[0], [0, 0, 0, 0], [0, 1]]
    # Alone in the batch, or first and last.
    assert [p[EXAMPLE_INDEX_INPUT].tolist() for p in split_parts(_index_batch([0, 0, 0]), 1)] == [[0, 0, 0]]
    assert [p["labels"].tolist() for p in split_parts(_index_batch([0, 0, 0, 1, 2, 2, 2]), 2)] == \
        [[100, 101, 102], [103], [104, 105, 106]]


def test_without_example_indices_each_row_is_an_example() -> None:
    batch = {"x": np.arange(7.0)[:, None], "labels": np.arange(7)}
    parts = split_parts(batch, 3)
    assert [p["labels"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(EXAMPLE_INDEX_INPUT not in p for p in parts)


@pytest.mark.parametrize("max_rows", [None, 10, 50])
def test_no_limit_or_a_batch_within_it_is_one_part(max_rows: int | None) -> None:
    batch = _index_batch([0, 1, 1, 2, 3, 3, 3, 4, 5, 5])
    (part,) = split_parts(batch, max_rows)
    assert set(part) == set(batch) and all(part[k] is batch[k] for k in batch)
    assert split_parts(_index_batch([]), 2)[0]["labels"].shape == (0,)


def test_max_part_rows_below_one_is_refused(cache: Path) -> None:
    artifacts = _encoder_artifacts(cache)
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4.0)
    with pytest.raises(ValueError, match="max_part_rows must be >= 1"):
        PortableStepper(artifacts, learning_rate=0.05, dp=dp, noise=SeededNoise(0), max_part_rows=0)
