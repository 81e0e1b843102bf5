"""LoRA tensors between the ClientApp and its daemon, and in Flower's records.

One encoding for a set of named float32 tensors: a safetensors file, base64 in JSON (the
daemon's ``/v2/federated`` routes) or raw bytes in a Flower ConfigRecord (A, sent once to
the ServerApp). Flower's own ``Parameters`` carry B during a round, as a list in the
federation's tensor order (:func:`ordered`, :func:`named`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["to_bytes", "from_bytes", "to_text", "from_text", "ordered", "named"]


def to_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()})


def from_bytes(data: bytes, *, what: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; ValueError naming ``what`` if it is not one of float32 tensors."""
    from safetensors.numpy import load

    try:
        tensors = load(bytes(data))
    except Exception as e:  # safetensors raises its own SafetensorError for any damage
        raise ValueError(f"{what} is not a safetensors file: {e}") from None
    bad = sorted(name for name, value in tensors.items() if value.dtype != np.float32)
    if bad:
        raise ValueError(f"{what}: tensors {bad[:3]} are not float32")
    return tensors


def to_text(tensors: Mapping[str, np.ndarray]) -> str:
    return base64.b64encode(to_bytes(tensors)).decode("ascii")


def from_text(text: object, *, what: str) -> dict[str, np.ndarray]:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string of a safetensors file")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    return from_bytes(data, what=what)


def ordered(tensors: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """The tensors as a list in ``names`` order (Flower's Parameters)."""
    return [np.asarray(tensors[name], np.float32) for name in names]


def named(arrays: Sequence[np.ndarray], names: Sequence[str], *, what: str) -> dict[str, np.ndarray]:
    """A list of Flower's Parameters back into named tensors; ValueError on a count mismatch."""
    if len(arrays) != len(names):
        raise ValueError(f"{what} has {len(arrays)} tensors, the federation's adapter has {len(names)}")
    return {name: np.asarray(value) for name, value in zip(names, arrays, strict=True)}
