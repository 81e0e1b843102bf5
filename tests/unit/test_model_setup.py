"""trainer/model_setup.py: the padded length of training batches and the rows of one pass."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import onnx
import pytest

from lorad.adapters.llama_builder import LLM_CONFIG_KEY
from lorad.trainer.config import AdapterTrainingConfig
from lorad.trainer.model_setup import DEFAULT_PAD_LENGTH, pad_length, part_rows


def _service(*, text_tokens: int | None, language_model: bool) -> Any:
    base = onnx.ModelProto()
    if language_model:
        base.metadata_props.add(key=LLM_CONFIG_KEY, value="{}")
    text = SimpleNamespace(max_tokens=text_tokens) if text_tokens is not None else None
    return SimpleNamespace(text=text, engine=SimpleNamespace(base_model=base))


@pytest.mark.parametrize(("text_tokens", "language_model", "configured", "expected"), [
    (64, False, None, 64),                      # a text model: its token limit (examples/intents: 64)
    (None, True, None, 48),                     # a language model: its window
    (None, False, None, DEFAULT_PAD_LENGTH),    # tensors in: the fixed default
    (64, False, 32, 32),                        # trainer.pad_length wins
])
def test_pad_length_is_the_models_limit_not_a_fixed_128(text_tokens: int | None, language_model: bool,
                                                        configured: int | None, expected: int) -> None:
    config = AdapterTrainingConfig(pad_length=configured, window_tokens=48)
    assert pad_length(_service(text_tokens=text_tokens, language_model=language_model), config) == expected


@pytest.mark.parametrize(("text_tokens", "language_model", "configured", "expected"), [
    (64, False, None, 8),      # examples/intents: 512 tokens' worth of examples a pass
    (32, False, None, 16),
    (1024, False, None, 1),    # one example is more than the budget: one a pass
    (None, True, None, 2),     # a language model: 2 windows
    (None, False, None, None),  # tensors in: the whole batch
    (64, False, 16, 16),       # trainer.part_rows wins
])
def test_part_rows_of_a_text_model_fill_the_token_budget(text_tokens: int | None, language_model: bool,
                                                         configured: int | None, expected: int | None) -> None:
    config = AdapterTrainingConfig(part_rows=configured)
    assert part_rows(_service(text_tokens=text_tokens, language_model=language_model), config) == expected
