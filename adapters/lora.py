"""The LoRA adapter as lorad holds it in memory.

Orientation follows the ONNX graph, not torch: for a target weight ``W`` of shape
``[in, out]`` (as used by ``MatMul(x, W)``), ``A`` is ``[in, r]`` and ``B`` is ``[r, out]``,
so the adapted output is ``x·W + scale·(x·A)·B``. PEFT stores the transposes
(``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``); :mod:`lorad.adapters.peft_format`
converts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

__all__ = ["LoraWeights", "LoraAdapter", "lora_scale"]


def lora_scale(alpha: float, rank: int, *, use_rslora: bool) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraWeights:
    """A and B of one target weight, float32, ONNX orientation."""

    A: np.ndarray  # [in, r]
    B: np.ndarray  # [r, out]

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[1] != self.B.shape[0]:
            raise ValueError(f"A {self.A.shape} and B {self.B.shape} do not form a rank-r pair")

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.A.nbytes + self.B.nbytes)


@dataclass(frozen=True)
class LoraAdapter:
    """A whole adapter: per-target weights plus the hyper-parameters that define its scale.

    ``weights`` is keyed by ONNX weight (initializer) name. ``base_fingerprint`` is the
    fingerprint of the base model the adapter was made for
    (:func:`lorad.adapters.lora_graph.fingerprint`).
    """

    rank: int
    alpha: float
    weights: Mapping[str, LoraWeights]
    base_fingerprint: str
    use_rslora: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("an adapter needs at least one target weight")
        for name, w in self.weights.items():
            if w.rank != self.rank:
                raise ValueError(f"target {name!r} has rank {w.rank}, adapter rank is {self.rank}")
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, use_rslora=self.use_rslora)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())
