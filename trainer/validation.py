"""The validation gate: serve a newly trained version only if it is better, privately.

The candidate and the version served now (the base model for an adapter's first
version) are scored on the adapter's held-out split through the one model-level
inference API (:meth:`AdapterService.run`, model tensors in), so what is measured is what
would be served, for a text model too. Per held-out example, the improvement
``u = score(candidate) - score(current)`` (accuracy: 1/0 correct; loss: the current
loss minus the candidate's) is compared with ``margin`` and clipped:
``e = clip(u - margin, -b, b)`` with ``b = score_clip``. The candidate is accepted iff

    Σ e + N(0, (σ_g·b)²) > 0,

a Gaussian mechanism of sensitivity ``b`` (adding or removing one held-out example moves
the sum by at most b). Its σ_g is charged to the privacy ledger as one Gaussian query
with the run (``mechanisms: validation_gate``), before training starts, so the public
accept/reject bit is covered by the adapter's accounted ε like every training step.
(Held-out examples are never sampled for training; the ledger still composes the gate
with the training steps, an over-count, never an under-count.)

The exact scores are computed from private examples and are a local record only: they
are written to the rejected version's ``reason.json`` on the device (mode 0600) and
never put into logs, metrics, adapter metadata or HTTP answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorad.adapters.engine import TensorSpec
from lorad.adapters.fsutil import atomic_write_bytes
from lorad.adapters.lora import LoraAdapter
from lorad.adapters.peft_format import dump_peft
from lorad.adapters.service import AdapterService

from .batching import TensorLayout, collate, fits
from .dp_step import GaussianNoise
from .example_store import Example
from .portable_graph import EXAMPLE_INDEX_INPUT

__all__ = ["GATE_BATCH", "GateResult", "validate_candidate", "keep_rejected", "engine_layouts", "per_example_scores"]

GATE_BATCH = 256
GATE_WINDOWS = 4


@dataclass(frozen=True)
class GateResult:
    accepted: bool
    metric: str
    #: "base" or "v<N>": what the candidate was compared with.
    baseline: str
    baseline_version: int | None
    baseline_score: float
    candidate_score: float
    margin: float
    examples: int
    #: Σ clip(u - margin, -b, b) + noise: the released decision is ``noisy_sum > 0``.
    noisy_sum: float = math.nan
    noise_multiplier: float = 0.0

    @property
    def reason(self) -> str:
        """Why, without the private scores (those stay in reason.json on the device)."""
        how = "private decision, " if self.noise_multiplier > 0 else "NON-private decision, "
        if self.examples == 0:
            return "no held-out examples to validate on"
        if self.accepted:
            return f"held-out {self.metric} beats {self.baseline}'s by more than margin {self.margin:g} ({how}σ {self.noise_multiplier:g})"
        return (f"held-out {self.metric} does not beat {self.baseline}'s by more than margin {self.margin:g} "
                f"({how}σ {self.noise_multiplier:g})")


def engine_layouts(specs: Sequence[TensorSpec]) -> list[TensorLayout]:
    return [TensorLayout(s.name, s.numpy_dtype, tuple(None if d < 0 else d for d in s.shape)) for s in specs]


def validate_candidate(
    service: AdapterService, adapter_name: str, candidate: LoraAdapter, holdout: Sequence[Example],
    *, metric: str, loss: str, output: str, margin: float,
    noise: GaussianNoise | None, noise_multiplier: float, score_clip: float = 1.0, pad_to: int | None = None,
    calls: int = 1, window: int = 64,
) -> GateResult:
    """Score and decide (see the module docstring); ``noise=None`` only in tests and
    comparisons (a non-private decision).

    With ``pad_to`` (a run passes its fixed training length), every chunk of held-out
    examples is scored as one padded batch, so the number of calls the gate makes (seen in
    cache and batcher counters) does not depend on the examples' lengths; ``calls`` (a run
    passes a number planned from its public, noisy count) chunks them into that many
    batches, more only when they would exceed 256 rows each. A language model's held-out
    texts (``loss="causal_lm"``) are scored by their windows of ``window`` tokens, each text
    by its mean next-token loss or top-1 accuracy."""
    version = service.registry.current_version(adapter_name)
    prepared = service.candidate(candidate, name=adapter_name)
    current_adapter = adapter_name if version is not None else None
    if loss == "causal_lm":
        base_scores, cand_scores, seen_version = _text_scores(service, current_adapter, prepared, holdout, metric=metric,
                                                              output=output, window=window, calls=calls)
    else:
        base_scores, cand_scores, seen_version = _tensor_scores(service, current_adapter, prepared, holdout,
                                                                metric=metric, loss=loss, output=output, pad_to=pad_to,
                                                                calls=calls)
    n = len(cand_scores)
    base = float(np.mean(base_scores)) if n else math.nan
    cand = float(np.mean(cand_scores)) if n else math.nan
    better = np.asarray(cand_scores) - np.asarray(base_scores)
    if metric != "accuracy":
        better = -better  # loss: lower is better
    # One example whose score is not finite (a NaN loss from a hostile input) counts as the
    # worst case the clip allows, against the candidate: it can move the sum by b, as any
    # other example can, and never turn the whole decision into NaN (a rejection).
    better = np.where(np.isfinite(better), better, -np.inf)
    total = float(np.sum(np.clip(better - margin, -score_clip, score_clip)))
    if noise is not None and noise_multiplier > 0:
        total += float(noise.gaussian64(1, noise_multiplier * score_clip)[0])
    accepted = n > 0 and total > 0
    return GateResult(
        accepted=accepted, metric=metric, baseline="base" if version is None else f"v{seen_version or version}",
        baseline_version=seen_version if version is not None else None,
        baseline_score=base, candidate_score=cand, margin=margin, examples=n, noisy_sum=total,
        noise_multiplier=noise_multiplier if noise is not None else 0.0,
    )


_Scores = tuple[list[float], list[float], int | None]


def _tensor_scores(service: AdapterService, current: str | None, prepared: Any, holdout: Sequence[Example], *,
                   metric: str, loss: str, output: str, pad_to: int | None, calls: int) -> _Scores:
    layouts = engine_layouts(service.model_inputs)
    base_scores: list[float] = []
    cand_scores: list[float] = []
    seen_version: int | None = None
    # Examples that no longer fit the model are left out of both scores alike.
    fitting = [ex for ex in holdout if fits(ex, layouts)]
    size = max(1, math.ceil(len(fitting) / max(calls, math.ceil(len(fitting) / GATE_BATCH), 1)))
    for start in range(0, len(fitting), size):
        chunk = fitting[start : start + size]
        _, skipped = collate(chunk, inputs_layout=layouts, label_layout=None, pad_to=pad_to)
        # Without pad_to, rows of different dynamic shapes cannot share a batch: one by one.
        for group in ([chunk] if not skipped else [[ex] for ex in chunk]):
            inputs, _ = collate(group, inputs_layout=layouts, label_layout=None, pad_to=pad_to)
            labels = [np.asarray(ex.label) for ex in group]
            # Model tensors through the one inference path (batcher included), as serving runs them.
            now = service.run(inputs, current)
            seen_version = now.version
            new = service.run(inputs, prepared)
            base_scores.extend(per_example_scores(now.outputs[output], labels, metric, loss))
            cand_scores.extend(per_example_scores(new.outputs[output], labels, metric, loss))
    return base_scores, cand_scores, seen_version


def _text_scores(service: AdapterService, current: str | None, prepared: Any, holdout: Sequence[Example], *,
                 metric: str, output: str, window: int, calls: int) -> _Scores:
    """A language model's held-out texts, by their windows (trainer/lm_examples.py), in
    ``calls`` batches, more only where a batch would pass GATE_WINDOWS windows (the
    logits of a window are 64 × the vocabulary: 12 MB for SmolLM2)."""
    from .lm_examples import collate_texts, example_scores, serving_feeds, window_scores

    base_scores: list[float] = []
    cand_scores: list[float] = []
    seen_version: int | None = None
    texts = list(holdout)
    size = max(1, math.ceil(len(texts) / max(calls, 1)))
    for start in range(0, len(texts), size):
        batch, _ = collate_texts(texts[start : start + size], window=window, label_input="labels")
        index, labels = batch[EXAMPLE_INDEX_INPUT], batch["labels"]
        sums = {"base": np.zeros(len(index)), "cand": np.zeros(len(index))}
        counts = np.zeros(len(index))
        # Each sub-batch is scored as it comes: its logits (8 × 64 × 49,152) are not kept.
        for lo in range(0, len(index), GATE_WINDOWS):
            rows = slice(lo, lo + GATE_WINDOWS)
            feeds = serving_feeds({k: v[rows] for k, v in batch.items()}, service.model_inputs)
            now = service.run(feeds, current)
            seen_version = now.version
            sums["base"][rows], counts[rows] = window_scores(now.outputs[output], labels[rows], metric)
            del now
            sums["cand"][rows], _ = window_scores(service.run(feeds, prepared).outputs[output], labels[rows], metric)
        base_scores.extend(example_scores(sums["base"], counts, index))
        cand_scores.extend(example_scores(sums["cand"], counts, index))
    return base_scores, cand_scores, seen_version


def per_example_scores(outputs: np.ndarray, labels: list[np.ndarray], metric: str, loss: str) -> list[float]:
    out = np.asarray(outputs, dtype=np.float64)
    if loss == "cross_entropy":
        classes = np.array([int(np.asarray(lab).reshape(-1)[0]) for lab in labels])
        if metric == "accuracy":
            return (out.argmax(axis=-1) == classes).astype(np.float64).tolist()
        shifted = out - out.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1))
        picked = shifted[np.arange(len(classes)), np.clip(classes, 0, out.shape[-1] - 1)]
        return (log_z - picked).tolist()
    target = np.stack([np.asarray(lab, dtype=np.float64).reshape(out.shape[1:]) for lab in labels])
    return ((out - target) ** 2).reshape(len(labels), -1).sum(axis=1).tolist()


def keep_rejected(
    directory: Path,
    candidate: LoraAdapter,
    gate: GateResult,
    *,
    run_id: int,
    module_of: Callable[[str], str] | None = None,
) -> Path:
    """Store a rejected version as PEFT files plus reason.json under ``directory``.

    ``module_of`` names tensors by the served model's PEFT module paths, as every file
    lorad writes (:meth:`lorad.adapters.service.AdapterService.dump`).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in dump_peft(candidate, module_of=module_of).items():
        atomic_write_bytes(directory / name, data, mode=0o600)
    doc = {"run_id": run_id, "reason": gate.reason, **asdict(gate)}
    atomic_write_bytes(directory / "reason.json", (json.dumps(doc, indent=1, default=str) + "\n").encode(), mode=0o600)
    return directory
