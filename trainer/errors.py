"""Errors raised by the trainer package.

Two roots, as the rest of lorad: :class:`BadTrainingDataError` when data from outside
(an example, a stored ledger or example database) is wrong, :class:`TrainingFailedError`
when the device or the runtime failed. Refusing to train because the privacy budget
would be exceeded is neither; it has its own class so that callers can tell the user
exactly what was refused. Caller mistakes are ValueError/RuntimeError.
"""

from __future__ import annotations

__all__ = [
    "TrainerError",
    "BadTrainingDataError",
    "TrainingFailedError",
    "PrivacyBudgetExceededError",
    "StoreFullError",
]


class TrainerError(Exception):
    """Base of every error of the trainer package."""


class BadTrainingDataError(TrainerError):
    """Data from outside (examples, a stored ledger, the example database) is wrong."""


class TrainingFailedError(TrainerError):
    """The device, the disk or the runtime failed while training or persisting state."""


class StoreFullError(TrainerError):
    """The example store is at one of its bounds; it refuses new examples rather than
    evict stored ones (an eviction would change two examples at once)."""


class PrivacyBudgetExceededError(TrainerError):
    """Training would take an adapter's ε above its budget; nothing was charged."""

    def __init__(
        self, adapter: str, *, spent_epsilon: float, requested_epsilon: float, budget_epsilon: float
    ) -> None:
        self.adapter = adapter
        self.spent_epsilon = spent_epsilon
        self.requested_epsilon = requested_epsilon
        self.budget_epsilon = budget_epsilon
        super().__init__(
            f"training adapter {adapter!r} would exceed its privacy budget: ε spent so far "
            f"{spent_epsilon:.4g}, ε after the requested run {requested_epsilon:.4g}, budget "
            f"ε {budget_epsilon:.4g}; lower the number of steps or the sampling rate, raise "
            f"the noise multiplier, or raise the budget"
        )
