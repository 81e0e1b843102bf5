"""Stored examples into batches: one row per example, never more.

An example holds each input WITHOUT its batch dimension (``normalize_example`` strips a
leading 1 when a client sends ``[1, ...]``), so one stored example is exactly one row of
a batch and per-example clipping bounds exactly one example's influence — the unit the
privacy guarantee is stated in. An example that no longer fits the model (a different
base model was deployed since it was stored) is skipped, not fatal: dropping it is the
same as its gradient being zero, which the clipping bound already covers.

Dynamic non-batch dimensions (a sequence length) are padded with zeros, or truncated,
to one fixed length ``pad_to`` that does not depend on the data: every example is used
whatever the lengths of the others, and each row is a function of its own example
only, so removing one example changes one row and nothing else. Zero is the padding
of the usual conventions (token id 0 is ``[PAD]`` in BERT-style vocabularies, and an
``attention_mask`` padded with 0 masks the padding out).

Values are bounded at ingestion (:func:`normalize_example`): a non-finite value or one
larger than ``max_abs`` is refused, so that a stored example cannot overflow the
training arithmetic (the training graph also drops any example whose gradient is not
finite, see trainer/artifacts.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import BadTrainingDataError
from .example_store import Example

__all__ = ["TensorLayout", "normalize_example", "fits", "collate", "DEFAULT_MAX_ABS"]

#: Largest magnitude of a stored input or label value (a pixel, a token id, a feature).
DEFAULT_MAX_ABS = 1e6


@dataclass(frozen=True)
class TensorLayout:
    """A batched tensor the model takes: name, numpy dtype, shape (first dim = batch;
    None or -1 for a dynamic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def row_ok(self, value: np.ndarray) -> bool:
        want = self.shape[1:]
        return value.ndim == len(want) and all(d is None or d < 0 or d == g for g, d in zip(value.shape, want, strict=True))


    @property
    def dynamic(self) -> bool:
        """Whether a non-batch dimension is dynamic."""
        return any(d is None or d < 0 for d in self.shape[1:])

    def padded(self, row: np.ndarray, length: int) -> np.ndarray:
        """``row`` with every dynamic dimension zero-padded or truncated to ``length``."""
        out = row
        for axis, d in enumerate(self.shape[1:]):
            if d is not None and d >= 0:
                continue
            size = out.shape[axis]
            if size > length:
                out = np.take(out, np.arange(length), axis=axis)
            elif size < length:
                widths = [(0, 0)] * out.ndim
                widths[axis] = (0, length - size)
                out = np.pad(out, widths)
        return out


def _row(value: npt.ArrayLike, layout: TensorLayout) -> np.ndarray | None:
    array = np.asarray(value)
    if array.ndim == len(layout.shape) and array.ndim and array.shape[0] == 1:
        array = array[0]
    if not layout.row_ok(array) or not np.can_cast(array.dtype, layout.dtype, "same_kind"):
        return None
    return array.astype(layout.dtype, copy=False)


def _bounded(array: np.ndarray, max_abs: float) -> bool:
    if array.dtype.kind == "f":
        wide = array.astype(np.float64, copy=False)
        return bool(np.all(np.isfinite(wide)) and np.all(np.abs(wide) <= max_abs))
    if array.dtype.kind in "iu":
        return bool(array.size == 0 or np.max(np.abs(array.astype(np.float64))) <= max_abs)
    return True


def fits(example: Example, layouts: Sequence[TensorLayout]) -> bool:
    """Whether every input of ``layouts`` is present in ``example`` and fits one row."""
    return all(
        (value := example.inputs.get(t.name)) is not None and _row(value, t) is not None for t in layouts
    )


def normalize_example(
    inputs: Mapping[str, npt.ArrayLike], label: npt.ArrayLike,
    *, inputs_layout: Sequence[TensorLayout], label_layout: TensorLayout, max_abs: float = DEFAULT_MAX_ABS,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Check one example against the model and return it as rows (no batch dimension).

    Every value must be finite and at most ``max_abs`` in magnitude.

    Raises BadTrainingDataError naming the tensor, what was given and what is allowed.
    """
    wanted = {t.name for t in inputs_layout}
    if set(inputs) != wanted:
        raise BadTrainingDataError(f"an example needs exactly the inputs {sorted(wanted)}, got {sorted(inputs)}")
    rows: dict[str, np.ndarray] = {}
    for layout in (*inputs_layout, label_layout):
        value = label if layout is label_layout else inputs[layout.name]
        row = _row(value, layout)
        if row is None:
            given = np.asarray(value)
            dims = ", ".join("*" if d is None or d < 0 else str(d) for d in layout.shape[1:])
            raise BadTrainingDataError(
                f"{'label' if layout is label_layout else 'input ' + repr(layout.name)} has shape "
                f"{list(given.shape)} and dtype {given.dtype}; one example needs shape [{dims}] "
                f"(or [1, {dims}]) of {layout.dtype}")
        if not _bounded(np.asarray(value), max_abs):
            what = "label" if layout is label_layout else f"input {layout.name!r}"
            raise BadTrainingDataError(
                f"{what} holds a value that is not finite or larger than {max_abs:g} in magnitude; "
                f"allowed: finite numbers in [-{max_abs:g}, {max_abs:g}] (trainer.store.max_abs_value)")
        rows[layout.name] = row
    label_row = rows.pop(label_layout.name)
    return rows, label_row


def collate(
    examples: Sequence[Example], *, inputs_layout: Sequence[TensorLayout], label_layout: TensorLayout | None,
    pad_to: int | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Stack examples into a batch; returns (batch, number of examples skipped as unfit).

    With ``pad_to``, every dynamic non-batch dimension is padded or truncated to it, so
    rows of any length share the batch. Without it, rows must agree with the first
    accepted one in their dynamic dimensions (the others are skipped and counted): only
    for scoring, never for a private training step, where one example's length must not
    decide whether the others are used.
    """
    columns: dict[str, list[np.ndarray]] = {t.name: [] for t in inputs_layout}
    if label_layout is not None:
        columns[label_layout.name] = []
    layouts = [*inputs_layout, *([label_layout] if label_layout is not None else [])]
    skipped = 0
    first: dict[str, tuple[int, ...]] = {}
    for ex in examples:
        rows = {}
        for layout in layouts:
            value = ex.label if layout is label_layout else ex.inputs.get(layout.name)
            row = None if value is None else _row(value, layout)
            if row is not None and pad_to is not None and layout.dynamic:
                row = layout.padded(row, pad_to)
            if row is None or row.shape != first.get(layout.name, row.shape):
                break
            rows[layout.name] = row
        else:
            first = first or {name: row.shape for name, row in rows.items()}
            for name, row in rows.items():
                columns[name].append(row)
            continue
        skipped += 1
    batch = {}
    for layout in layouts:
        rows_of = columns[layout.name]
        if rows_of:
            batch[layout.name] = np.stack(rows_of)
        else:
            fill = 1 if pad_to is None else pad_to
            empty = [0, *(fill if d is None or d < 0 else d for d in layout.shape[1:])]
            batch[layout.name] = np.zeros(empty, dtype=layout.dtype)
    return batch, skipped
