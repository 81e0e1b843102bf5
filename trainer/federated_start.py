"""What a federated round starts from, and the checks made before anything is charged
(trainer/federated.py says what a round is; trainer/run.py trains it).

A round starts from the federation's B and the digest of its A. :func:`check_start` refuses
one that does not fit this device's training artifacts; :func:`write_start_checkpoint`
turns the federation's B into the step-0 checkpoint the run resumes from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import TrainerError

if TYPE_CHECKING:
    from .artifacts import TrainingArtifacts

__all__ = ["RoundStart", "RoundRefused", "a_digest", "frozen_a", "check_start", "check_update",
           "write_start_checkpoint"]


class RoundRefused(TrainerError):
    """The federation's round does not fit this device (another base model, A, rank, shape,
    non-finite values) or its backend cannot train it; nothing was charged."""


@dataclass(frozen=True)
class RoundStart:
    """What the federation sends for one round: its B (by the LoRA B tensor names of
    trainer/artifacts.py, ``lora.<weight>.B``) and the digest of the A it was trained with."""

    round: int
    b: Mapping[str, np.ndarray]
    a_digest: str


def a_digest(a: Mapping[str, np.ndarray]) -> str:
    """sha256 over the frozen A tensors (sorted names, shapes, float32 little-endian bytes)."""
    h = hashlib.sha256()
    for name in sorted(a):
        value = np.ascontiguousarray(a[name], dtype="<f4")
        h.update(f"{name}:{list(value.shape)}\n".encode())
        h.update(value.tobytes())
    return "sha256:" + h.hexdigest()


def frozen_a(artifacts: TrainingArtifacts) -> dict[str, np.ndarray]:
    """The frozen A tensors of the artifacts (portable backend, ``freeze_a``)."""
    with np.load(artifacts.directory / "frozen_parameters.npz") as frozen:
        return {name: np.array(frozen[name], np.float32) for name in artifacts.frozen}


def check_update(b: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], *, what: str) -> None:
    """``b`` has exactly the tensors of ``shapes``, each of its shape, all finite; raises
    :class:`RoundRefused` naming the first problem."""
    missing, extra = sorted(set(shapes) - set(b)), sorted(set(b) - set(shapes))
    if missing or extra:
        raise RoundRefused(f"{what} has the wrong tensors: missing {missing[:3]}, unexpected {extra[:3]} "
                           f"({len(shapes)} expected, e.g. {sorted(shapes)[:2]})")
    for name, shape in shapes.items():
        value = np.asarray(b[name])
        if tuple(value.shape) != tuple(shape):
            raise RoundRefused(f"{what}: {name} has shape {list(value.shape)}, this model needs {list(shape)}")
        if not np.all(np.isfinite(value)):
            raise RoundRefused(f"{what}: {name} has non-finite values (NaN or infinity)")


def check_start(artifacts: TrainingArtifacts, start: RoundStart) -> None:
    """Refuse a round that does not fit the artifacts, before anything is charged."""
    if artifacts.backend != "portable":
        raise RoundRefused("federated rounds train with the portable backend (trainer.backend: portable or auto); "
                           f"this device uses {artifacts.backend}")
    if not artifacts.config.freeze_a:
        raise RoundRefused("federated rounds train B only (freeze_a)")
    if not start.round >= 1:
        raise RoundRefused(f"round {start.round}: rounds count from 1")
    mine = a_digest(frozen_a(artifacts))
    if start.a_digest != mine:
        raise RoundRefused(f"the federation's LoRA A ({start.a_digest[:19]}…) is not this device's ({mine[:19]}…): "
                           "the base model, targets, rank, a_init or init_seed differ")
    check_update(start.b, dict(artifacts.trainable), what="the federation's B")


def write_start_checkpoint(artifacts: TrainingArtifacts, start: RoundStart, path: Path) -> None:
    """A portable checkpoint at step 0 whose parameters are the federation's B (fresh
    optimiser moments: each round is a new run)."""
    from .portable import write_checkpoint

    flat = np.concatenate([np.asarray(start.b[name], np.float32).reshape(-1) for name, _ in artifacts.trainable])
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    zeros = np.zeros_like(flat)
    write_checkpoint(path, flat, zeros, zeros.copy(), 0)
