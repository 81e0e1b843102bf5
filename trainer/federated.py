"""One device's side of federated DP-LoRA: a round of the federation is a local DP run.

The federation trains B only (FFA-LoRA). A stays frozen at its initial value, which every
device computes on its own from public inputs alone (the base model, the targets, rank,
``a_init`` and ``init_seed``: trainer/artifacts.py), so the devices share A without sending
it, and averaging their B is averaging their adapters: with a shared A,
mean_i(A·B_i) = A·mean_i(B_i). (Averaging A and B separately would not be: the mean of
products is not the product of means.) The federation checks that a device's A is the
federation's by its digest (:func:`a_digest`).

A round on the device (:meth:`FederatedDevice.train_round`):

1. the federation's B is checked against this device's artifacts: names, shapes, finite
   values, and the digest of A. A mismatch (another base model, rank, target list or
   seed) is refused before anything is charged;
2. the device's policy decides whether it may train now (idle, power, time window: the
   ``trainer.policy`` an automatic run obeys); a busy device declines, charged nothing;
3. one training run of the federated adapter goes through the scheduler, starting from
   the federation's B, on every local example (nothing is held out: the update is not
   validated or installed here). Its noise is calibrated so that the run spends at most
   ``round_epsilon`` of the adapter's budget, and the ledger charges it before the first
   step, exactly as a local run's;
4. the trained B is handed back, checked finite. It leaves the device only through the
   federation's secure aggregation (daemon/federated/client_app.py); the aggregate comes
   back, with the federation's privacy record, as a signed OTA update.

The federated adapter never trains locally otherwise (no automatic run, no start test) and
an interrupted round never resumes: the next round closes it at its recorded progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lorad.adapters.lora_graph import lora_input_names

from .errors import TrainerError
from .federated_start import RoundRefused, RoundStart, a_digest, check_start, check_update, frozen_a

if TYPE_CHECKING:
    from .artifacts import TrainingArtifacts
    from .config import AdapterTrainingConfig
    from .run import RunControl, RunProgress, TrainingRun
    from .service import TrainerService

__all__ = ["RoundStart", "RoundOutcome", "RoundRefused", "RoundDeclined", "FederatedDevice", "a_digest",
           "check_start", "check_update"]

_log = logging.getLogger(__name__)


class RoundDeclined(TrainerError):
    """The device may not train now (its policy, or its budget); nothing was charged."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("this device declines the round: " + "; ".join(reasons))


@dataclass(frozen=True)
class RoundOutcome:
    """The trained B and what the round cost this device."""

    round: int
    run_id: int
    b: dict[str, np.ndarray]
    steps: int
    #: ε of the adapter before and after the round (the ledger's composition).
    epsilon_before: float
    epsilon_after: float


class FederatedDevice:
    """This device as a member of a federation, for one adapter (the daemon's
    ``federated:`` section; a benchmark's simulated users)."""

    def __init__(self, trainer: TrainerService, *, adapter: str, round_epsilon: float, min_examples: int,
                 max_round_s: float = 3600.0) -> None:
        if adapter not in trainer.federated:
            raise ValueError(f"adapter {adapter!r} must be among the trainer's federated adapters "
                             f"(TrainerService(federated=...)); it has {sorted(trainer.federated)}")
        if not round_epsilon > 0 or not max_round_s > 0 or min_examples < 1:
            raise ValueError("round_epsilon and max_round_s must be > 0, min_examples >= 1")
        self.trainer = trainer
        self.adapter = adapter
        self.round_epsilon = round_epsilon
        self.min_examples = min_examples
        self.max_round_s = max_round_s
        self._artifacts: TrainingArtifacts | None = None

    # -- what the federation may know ---------------------------------------------------------

    def config(self) -> AdapterTrainingConfig:
        """The round's run settings: the adapter's trainer settings, B only, σ calibrated
        to spend at most ``round_epsilon`` of what the budget has left."""
        base = self.trainer.config.for_adapter(self.adapter)
        left = base.target_epsilon - self.trainer.ledger.state(self.adapter).epsilon_spent
        fraction = 1.0 if left <= self.round_epsilon else self.round_epsilon / left
        return base.model_copy(update={"freeze_a": True, "noise_multiplier": None, "budget_fraction": fraction,
                                       "min_train_examples": self.min_examples})

    def artifacts(self) -> TrainingArtifacts:
        """The round's training artifacts (built once; public inputs only)."""
        if self._artifacts is None:
            from .model_setup import preflight

            if self.trainer.env.backend != "portable":
                raise RoundRefused("federated rounds train with the portable backend (trainer.backend: portable or "
                                   f"auto); this device uses {self.trainer.env.backend}")
            self._artifacts = preflight(self.trainer.adapters, self.config(),
                                        cache_dir=self.trainer.env.state_dir / "artifacts", backend="portable")
        return self._artifacts

    def info(self) -> dict[str, Any]:
        """What the federation checks before a round (all public): the base model, A's
        digest, B's shapes, the LoRA scale, the budget, and whether the device may train now."""
        a = self.artifacts()
        cfg = a.config
        spent = float(self.trainer.ledger.state(self.adapter).epsilon_spent)
        budget = self.trainer.config.for_adapter(self.adapter).target_epsilon
        reasons = list(self.trainer.policy.device().reasons)
        if not self.trainer.available:
            reasons.append(self.trainer.unavailable_reason or "training unavailable")
        if budget - spent <= min(0.01, budget / 100):  # the plan's calibration tolerance
            reasons.append(f"privacy budget spent (ε {spent:.4g} of {budget:.4g})")
        return {
            "adapter": self.adapter, "base_fingerprint": a.base_fingerprint, "a_digest": a_digest(frozen_a(a)),
            "rank": cfg.rank, "alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
            "shapes": {name: list(shape) for name, shape in a.trainable},
            "targets": [t.weight for t in a.targets],
            "epsilon_spent": spent, "epsilon_budget": budget, "round_epsilon": self.round_epsilon,
            "ready": not reasons, "reasons": reasons,
        }

    def initial_a(self) -> dict[str, np.ndarray]:
        """The frozen A (public: a function of the base model and the seed), by LoRA name."""
        return frozen_a(self.artifacts())

    # -- a round ------------------------------------------------------------------------------

    def train_round(self, start: RoundStart) -> RoundOutcome:
        """Train one round from the federation's B (see the module docstring).

        Raises :class:`RoundRefused` (does not fit), :class:`RoundDeclined` (not now),
        PrivacyBudgetExceededError (nothing charged), ValueError (too few examples by the
        private count, which was charged), TrainingConflictError (another run of the
        adapter), or TrainerError when the charged run fails.
        """
        from .run import TrainingRun

        artifacts = self.artifacts()
        check_start(artifacts, start)  # again in the run's begin; here for a clear error first
        if not self.trainer.available:
            raise RoundDeclined([self.trainer.unavailable_reason or "training unavailable"])
        decision = self.trainer.policy.device()
        if not decision.allowed:
            raise RoundDeclined(list(decision.reasons))
        before = float(self.trainer.ledger.state(self.adapter).epsilon_spent)
        config = self.config()

        def make_run(adapter: str, control: RunControl, progress: Callable[[RunProgress], None],
                     between: Callable[[], None]) -> TrainingRun:
            control.time_left_s = self.max_round_s
            return TrainingRun(self.trainer.env, adapter, config, control=control, on_progress=progress,
                               on_step=between, federated=start)

        job = self.trainer.scheduler.submit(self.adapter, make_run)
        try:
            result = job.finished.result(timeout=self.max_round_s)
        except FutureTimeout:
            job.control.cancel()
            raise TrainerError(f"federated round {start.round} took longer than max_round_s {self.max_round_s:g} s; "
                               "it was cancelled (its charge stands)") from None
        if result.status != "delivered" or job.run.update is None:
            raise TrainerError(f"federated round {start.round}: run {result.run_id} {result.status}: {result.reason}")
        b = {lora_input_names(weight)[1]: np.asarray(w.B, np.float32) for weight, w in job.run.update.weights.items()}
        check_update(b, dict(artifacts.trainable), what="the trained update")
        after = float(self.trainer.ledger.state(self.adapter).epsilon_spent)
        return RoundOutcome(start.round, result.run_id, b, result.steps_done, before, after)

