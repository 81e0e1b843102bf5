"""Per-request composition of adapters: a weighted sum of LoRA deltas, exactly.

``Σ_i w_i·s_i·(x·A_i)·B_i`` is one LoRA product with the factors concatenated along the
rank: ``A = [A_1 | A_2 | …]`` and ``B = [w_1·s_1·B_1 ; w_2·s_2·B_2 ; …]``, so a
composition is an ordinary adapter of rank ``Σ r_i`` (scale 1) and runs through the same
slot as any adapter. The slot rank bounds the total rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidAdapterError
from .lora import LoraAdapter, LoraWeights

__all__ = ["AdapterWeight", "MAX_COMPOSITION", "MAX_WEIGHT", "compose"]

#: Adapters one request may compose.
MAX_COMPOSITION = 8
#: Largest |weight| of one adapter in a composition.
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class AdapterWeight:
    """One term of a composition: adapter ``name`` scaled by ``weight``."""

    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a composed adapter needs a name")
        if not (math.isfinite(self.weight) and abs(self.weight) <= MAX_WEIGHT):
            raise ValueError(
                f"weight {self.weight!r} of adapter {self.name!r} is not allowed; weights are finite numbers"
                f" in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]"
            )


def compose(parts: Sequence[tuple[LoraAdapter, float]], *, slot_rank: int) -> LoraAdapter:
    """The exact weighted sum of ``parts`` (adapter, weight) as one adapter of scale 1.

    ValueError when the total rank exceeds ``slot_rank``; InvalidAdapterError when the
    parts were made for different base models.
    """
    if not parts:
        raise ValueError("a composition needs at least one adapter")
    total = sum(a.rank for a, _ in parts)
    if total > slot_rank:
        ranks = " + ".join(str(a.rank) for a, _ in parts)
        raise ValueError(
            f"the composed adapters have total rank {ranks} = {total}, more than the slot rank {slot_rank}"
            " of this model; compose fewer or smaller adapters, or raise model.rank"
        )
    fingerprints = {a.base_fingerprint for a, _ in parts if a.base_fingerprint}
    if len(fingerprints) > 1:
        raise InvalidAdapterError(f"the composed adapters were made for different base models: {sorted(fingerprints)}")
    shapes: dict[str, tuple[int, int]] = {}
    for adapter, _ in parts:
        for weight, w in adapter.weights.items():
            shapes.setdefault(weight, (w.A.shape[0], w.B.shape[1]))
    weights: dict[str, LoraWeights] = {}
    for weight, (n_in, n_out) in sorted(shapes.items()):
        a_blocks, b_blocks = [], []
        for adapter, coefficient in parts:
            part = adapter.weights.get(weight)
            if part is None:  # this part does not adapt the weight: a zero block of its rank
                a_blocks.append(np.zeros((n_in, adapter.rank), np.float32))
                b_blocks.append(np.zeros((adapter.rank, n_out), np.float32))
            else:
                a_blocks.append(part.A)
                b_blocks.append((part.B * np.float32(coefficient * adapter.scale)).astype(np.float32))
        weights[weight] = LoraWeights(A=np.hstack(a_blocks), B=np.vstack(b_blocks))
    return LoraAdapter(
        rank=total,
        alpha=float(total),  # scale alpha/r = 1: the parts' scales are folded into B
        weights=weights,
        base_fingerprint=fingerprints.pop() if fingerprints else "",
    )
