"""TrainerService: the facade the daemon calls (HTTP handlers, loractl, metrics, OTA status).

It owns the example store, the privacy ledger and the scheduler, all under
``<state_dir>/trainer/``, and is built once from the ``trainer:`` config section:
``start()`` after the AdapterService is up, ``close()`` before it goes (close interrupts
a run at its next step; the run resumes at the next start).

Training runs on the backend ``trainer.backend`` selects (trainer/backends.py): the
portable backend runs on every onnxruntime, so plain wheels (e.g. on aarch64) train too.
When the configured backend cannot run here (``ort-training`` without the training APIs),
the service says so once in the log and in :meth:`status` / the metrics, keeps collecting
examples and answering privacy queries, and refuses to train with
:class:`TrainingUnavailableError` — no silent fallback to the other backend.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from lorad.adapters.decoder import DecoderSpec
from lorad.adapters.service import AdapterService
from lorad.adapters.text_input import TEXT_INPUT, TextInputError

from ._names import check_adapter_name
from ._ort_training import TrainingUnavailableError
from .accountant import AccountantName
from .artifacts import Backend
from .backends import resolve_backend
from .batching import TensorLayout, normalize_example
from .config import TrainerConfig, check_noise_source, default_delta, make_noise_source
from .errors import BadTrainingDataError, PrivacyBudgetExceededError
from .example_store import ExampleStore
from .ledger import PrivacyLedger, PrivacyState, run_charges
from .noise import NoiseSource
from .policy import Decision, SystemProbe, TrainingPolicy
from .released import released_versions, trained_adapters, with_released
from .run import RunControl, RunProgress, RunResult, TrainerEnv, TrainingRun, last_trained_example, pending_release
from .scheduler import TrainingConflictError, TrainingScheduler
from .start_test import StartTests

if TYPE_CHECKING:  # a language model's examples only (imported where used: see __init__)
    from .lm_examples import TextExamples

__all__ = ["TrainerService", "TrainerStats", "TrainingUnavailableError", "EXAMPLES_FILE", "LEDGER_FILE"]

_log = logging.getLogger(__name__)

#: The neighbouring relation every ε of this trainer is for (see example_store.py: the
#: store never replaces an example by another, so add-or-remove is what can happen).
NEIGHBOURING = ("add-or-remove one example (Poisson sampling); the store never replaces or evicts an example to make "
                "room for another (a full store refuses new ones), and retention deletes by age only")
#: What unauthenticated callers see of a run's status (the rest is private: see below).
_PUBLIC_RUN_KEYS = ("state", "adapter", "run_id", "status", "version")
#: Run record fields left out of the public privacy report: times and energy measure the
#: run's duration, which follows its Poisson batch sizes.
_PRIVATE_RUN_KEYS = ("started_at", "ended_at", "energy_joules")

EXAMPLES_FILE = "examples.sqlite3"
LEDGER_FILE = "privacy-ledger.json"
START_TESTS_FILE = "start-tests.json"


class TrainerStats:
    """Counts the metrics read at scrape time (so they cannot drift from what happened)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: collections.Counter[str] = collections.Counter()
        self.steps = 0

    def count_run(self, result: RunResult) -> None:
        # Steps are counted when the run ends, not as they go: /metrics is open, and a
        # step's duration follows its Poisson batch size (the data).
        with self._lock:
            self.runs[result.status] += 1
            self.steps += result.steps_done


class TrainerService:
    """Examples in, privacy state and trained adapters out."""

    def __init__(
        self,
        config: TrainerConfig,
        *,
        adapters: AdapterService,
        state_dir: Path,
        noise: NoiseSource | None = None,
        request_rate: Callable[[], float] = lambda: 0.0,
        power_watts: Callable[[], float | None] = lambda: None,
        energy_joules: Callable[[], float] | None = None,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
        rng: Callable[[], np.random.Generator] | None = None,
        federated: Collection[str] = (),
    ) -> None:
        self.config = config
        #: Adapters this device trains only in federated rounds (trainer/federated.py): no
        #: automatic or resumed local run, no start test.
        self.federated = frozenset(federated)
        self.adapters = adapters
        self.dir = Path(state_dir) / "trainer"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        noise = noise if noise is not None else make_noise_source(config)
        check_noise_source(noise, config)
        self.stats = TrainerStats()
        self._closed = False
        spec = DecoderSpec.from_model(adapters.engine.base_model)
        self._texts: TextExamples | None = None
        if spec is not None:  # the token windows of a language model's texts (its graph helpers load with them)
            from .lm_examples import TextExamples

            self._texts = TextExamples(spec.tokenizer_json, vocab_size=spec.vocab_size)
        self._audit_lock = threading.Lock()
        s = config.store
        self.store = ExampleStore(self.dir / EXAMPLES_FILE, max_examples_per_adapter=s.max_examples_per_adapter,
                                  max_bytes=s.max_bytes, retention_days=s.retention_days)
        try:
            self.ledger = PrivacyLedger(self.dir / LEDGER_FILE)
        except BaseException:
            self.store.close()
            raise
        # dp_accounting (scipy: about 1 s of CPU) is imported at the first ε of a non-empty
        # history, not here: a fresh device never needs it to serve. The daemon warms it in
        # the background once it serves (lorad.daemon.app) when the ledger already holds runs.
        self.unavailable_reason: str | None = None
        backend: Backend = "portable"
        try:
            backend = resolve_backend(config.backend)
        except TrainingUnavailableError as e:
            self.unavailable_reason = str(e)
            _log.warning("on-device training is unavailable: %s; examples are still collected", e)
        else:
            _log.info("training backend: %s (trainer.backend: %s, device %s)", backend, config.backend, config.device)
        self.backend = backend
        self.start_tests = StartTests(self.dir / START_TESTS_FILE, noise, interval_s=config.policy.start_test_interval_s)
        self.env = TrainerEnv(
            service=adapters, store=self.store, ledger=self.ledger, state_dir=self.dir, noise=noise, backend=backend,
            rng=rng or _rng_for(config), device=config.device, intra_op_threads=config.intra_op_threads,
            isolate=config.isolate, niceness=config.niceness, sched_idle=config.sched_idle,
            energy_joules=energy_joules, guarantee=lambda adapter: self._guarantee(self.ledger.state(adapter)),
        )
        self.policy = TrainingPolicy(config.policy, probe=SystemProbe(proc_root=proc_root, sys_root=sys_root),
                                     request_rate=request_rate, power_watts=power_watts)
        self.scheduler = TrainingScheduler(
            make_run=self._make_run, policy=self.policy, candidates=self._candidates,
            adapter_ready=self._adapter_ready, interrupted=self._interrupted,
            interval_s=config.check_interval_s, niceness=config.niceness, idle_class=config.sched_idle,
            auto=config.schedule,
            on_result=self.stats.count_run,
        )

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.available:
            self.scheduler.start()

    def close(self) -> None:
        """Stop the scheduler (the run checkpoints), then the ledger and the store; twice is fine."""
        if self._closed:
            return
        self._closed = True
        try:
            self.scheduler.stop()
        finally:
            self.ledger.close()
            self.store.close()

    # -- examples ----------------------------------------------------------------------------

    @property
    def takes_text(self) -> bool:
        """Whether examples may be text: a text classifier's (with a label) or a language model's."""
        return self.adapters.text is not None or self._texts is not None

    @property
    def language_model(self) -> bool:
        """Whether an example is a text alone (a decoder language model: trainer/lm_examples.py)."""
        return self._texts is not None

    def add_text_example(self, adapter: str, text: str, label: str | int | None = None, *,
                         user: str | None = None) -> int:
        """Store one text: a language model's example is the text itself (one privacy unit,
        however many token windows it spans); a text classifier's is tokenized, padded to
        the adapter's fixed training length, and stored with its label (a label name or
        class number)."""
        from .model_setup import pad_length

        check_adapter_name(adapter)
        if self._texts is not None:
            if label is not None:
                raise BadTrainingDataError("a language model learns from the text alone: send {\"text\": \"...\", "
                                           "\"user\": optional user id} without a label")
            self._check_user(user)
            inputs, no_label = self._texts.encode(text, max_tokens=self.config.for_adapter(adapter).max_text_tokens)
            return self.store.add(adapter, inputs, no_label, user=user,
                                  max_per_user=self.config.store.max_examples_per_user)
        front = self.adapters.text
        if front is None:
            raise BadTrainingDataError("this model takes no text: send the example as {\"inputs\": [tensors], "
                                       "\"label\": ...}")
        if label is None:
            raise BadTrainingDataError("a text example of this model needs its label: {\"text\": \"...\", "
                                       "\"label\": label name or class number}")
        try:
            tensors = front.encode({TEXT_INPUT: np.array([text.encode()], dtype=object)},
                                   length=pad_length(self.adapters, self.config.for_adapter(adapter)))
            index = front.label_index(label)
        except TextInputError as e:
            raise BadTrainingDataError(str(e)) from e
        return self.add_example(adapter, {k: v[0] for k, v in tensors.items()}, np.asarray(index, np.int64), user=user)

    def add_example(self, adapter: str, inputs: Mapping[str, npt.ArrayLike], label: npt.ArrayLike,
                    *, user: str | None = None) -> int:
        """Check one labelled example against the model and store it; returns its id."""
        from .validation import engine_layouts

        check_adapter_name(adapter)
        if self._texts is not None:
            raise BadTrainingDataError("a language model learns from text: send {\"text\": \"...\", \"user\": optional "
                                       "user id} (loractl examples add ADAPTER --text or --file), not tensors")
        self._check_user(user)
        rows, label_row = normalize_example(inputs, label, inputs_layout=engine_layouts(self.adapters.model_inputs),
                                            label_layout=self._label_layout(adapter),
                                            max_abs=self.config.store.max_abs_value)
        self._check_label(adapter, label_row)
        self._check_domains(rows)
        example_id = self.store.add(adapter, rows, label_row, user=user,
                                    max_per_user=self.config.store.max_examples_per_user)
        return example_id

    def _check_user(self, user: str | None) -> None:
        if user is None and self.config.store.max_examples_per_user is not None:
            # The guarantee is per user (privacy_state): an example of nobody in particular
            # could be a user's k+1-th.
            raise BadTrainingDataError(
                "this example names no user; with trainer.store.max_examples_per_user set the guarantee is per user, "
                "so every example must carry its user id (\"user\": \"...\", loractl examples add --user ID)")

    def examples_count(self, adapter: str) -> int:
        check_adapter_name(adapter)
        return self.store.count(adapter)

    def delete_examples(self, adapter: str) -> int:
        """Remove every stored example of ``adapter``; returns how many.

        The privacy already spent on them stays in the ledger: deleting data does not
        undo what earlier runs learned from it.
        """
        check_adapter_name(adapter)
        status = self.scheduler.adapter_status(adapter) or {}
        if status.get("state") in ("queued", "running"):
            raise TrainingConflictError(
                f"adapter {adapter!r} has a training run {status['state']}; cancel it before deleting its examples")
        return self.store.delete_adapter(adapter)

    def _label_layout(self, adapter: str) -> TensorLayout:
        from .model_setup import training_loss

        c = self.config.for_adapter(adapter)
        if training_loss(self.adapters, c) == "cross_entropy":
            return TensorLayout("label", np.dtype(np.int64), (None,))
        out = self._output_spec(adapter)
        return TensorLayout("label", np.dtype(np.float32), tuple(None if d < 0 else d for d in out.shape))

    def _output_spec(self, adapter: str) -> Any:
        from .model_setup import loss_output

        return loss_output(self.adapters, self.config.for_adapter(adapter))

    def _check_domains(self, rows: Mapping[str, np.ndarray]) -> None:
        """Token ids within the model's vocabulary, masks 0/1: a value outside would fail a
        private run (or make its loss NaN), found now instead."""
        for name, row in rows.items():
            domain = self.adapters.engine.input_domains.get(name)
            if domain is None or not row.size:
                continue
            low, high = int(row.min()), int(row.max())
            if low < domain.low or high > domain.high:
                bad = high if high > domain.high else low
                raise BadTrainingDataError(f"input {name!r} holds {bad}; allowed: {domain.describe()}")

    def _check_label(self, adapter: str, label: np.ndarray) -> None:
        from .model_setup import training_loss

        if training_loss(self.adapters, self.config.for_adapter(adapter)) != "cross_entropy":
            return
        classes = self._output_spec(adapter).shape[-1]
        if classes > 0 and not 0 <= int(label) < classes:
            raise BadTrainingDataError(f"label {int(label)} is not a class of this model; allowed: 0..{classes - 1}")

    # -- training ----------------------------------------------------------------------------

    def trigger(self, adapter: str) -> int:
        """Start a manual run (ledger charged before it returns); returns the run id."""
        check_adapter_name(adapter)
        if not self.available:
            raise TrainingUnavailableError(self.unavailable_reason or "training unavailable")
        return self.scheduler.trigger(adapter)

    def pause(self) -> None:
        self.scheduler.pause()

    def resume(self) -> None:
        self.scheduler.resume()

    def cancel(self, adapter: str) -> bool:
        check_adapter_name(adapter)
        return self.scheduler.cancel(adapter)

    def run_status(self, adapter: str, *, private: bool = True) -> dict[str, Any]:
        """The adapter's queued/running run with progress, else its last result.

        ``private=False`` is what unauthenticated callers get (the privacy boundary, see the
        module docstring): the state, the run id and an ended run's status and installed
        version, without progress, timing, reasons or back-off."""
        check_adapter_name(adapter)
        status = self.scheduler.adapter_status(adapter) or {"state": "idle", "adapter": adapter}
        if not private:
            status = {k: status[k] for k in _PUBLIC_RUN_KEYS if k in status}
        return {**status, "available": self.available}

    def status(self, *, private: bool = True) -> dict[str, Any]:
        """The scheduler's state; ``private=False``: whether it runs, is paused, and which
        run is in progress (a charged run is in the public ledger), nothing per adapter."""
        scheduler = self.scheduler.status()
        if not private:
            current = scheduler["current"]
            scheduler = {k: scheduler[k] for k in ("running", "paused", "automatic")}
            scheduler["current"] = {k: current[k] for k in ("adapter", "run_id")} if current else None
        return {"available": self.available, "unavailable_reason": self.unavailable_reason, "backend": self.backend,
                **scheduler}

    # -- privacy -----------------------------------------------------------------------------

    def privacy_state(self, adapter: str, *, private: bool = True) -> dict[str, Any]:
        """ε spent, δ, budget and every run's (q, σ, C, steps, examples, accountant),
        enough to recompute ε independently. Also what the OTA status reports.

        ``private=False`` (unauthenticated callers) leaves out what the mechanisms do not
        cover: each run's start and end times and the energy it took (a run's duration
        follows its Poisson batch sizes, so the data).

        Never less than the stored versions record (trainer/released.py): a ledger that
        lost runs shows in ``ledger_missing_runs`` and ``ledger_warning``."""
        check_adapter_name(adapter)
        ledger_state = self.ledger.state(adapter)
        state = ledger_state.to_dict()
        c = self.config.for_adapter(adapter)
        state["configured_budget_epsilon"] = c.target_epsilon
        state["neighbouring"] = NEIGHBOURING
        state.update(self._guarantee(ledger_state))
        state = with_released(state, released_versions(self.adapters.registry, adapter))
        state["noise"] = "secure" if getattr(self.env.noise, "secure", False) else "seeded (testing only)"
        if not private:
            state["runs"] = [{k: v for k, v in r.items() if k not in _PRIVATE_RUN_KEYS} for r in state["runs"]]
            return state
        # What the personalisation cost, next to its ε: runs ended on a device with a power source.
        measured = [float(r["energy_joules"]) for r in state["runs"] if "energy_joules" in r]
        state["energy_joules"] = sum(measured) if measured else None
        return state

    def audit(self, adapter: str, *, canaries: int = 1000, noise_multiplier: float | None = None) -> dict[str, Any]:
        """The one-run canary audit of the adapter (trainer/audit.py), on a copy of its data:
        nothing is served, stored or charged. One audit at a time. ``noise_multiplier``
        (test-only) is the noise actually added; the configuration's σ is still accounted."""
        from .audit import audit_adapter

        check_adapter_name(adapter)
        if not self.available:
            raise TrainingUnavailableError(self.unavailable_reason or "training unavailable")
        if not self._audit_lock.acquire(blocking=False):
            raise TrainingConflictError("an audit is already running; wait for it to finish")
        try:
            result = audit_adapter(self.env, adapter, self.config.for_adapter(adapter), canaries=canaries,
                                   noise_multiplier=noise_multiplier)
        finally:
            self._audit_lock.release()
        return result.to_dict()

    def privacy_states(self, *, private: bool = True) -> list[dict[str, Any]]:
        names = set(self.ledger.adapters()) | set(trained_adapters(self.adapters.registry))
        return [self.privacy_state(a, private=private) for a in sorted(names)]

    def public_adapters(self) -> list[str]:
        """Adapters whose existence is public: configured, served, or charged in the ledger.

        An adapter that only has stored examples is not among them: that examples exist
        for a name is private, so it gets no metric series, no scheduler entry and no
        automatic run (a manual run charges it, and from then on it is in the ledger)."""
        names = set(self.config.adapters) | set(self.ledger.adapters())
        names |= {i.name for i in self.adapters.list_adapters()}
        return sorted(names)

    def _guarantee(self, state: PrivacyState) -> dict[str, Any]:
        """Per example, or per user where the configuration makes every example name its
        user and bounds each user's examples (then the store refuses any other).

        Per user, ε composes over every adapter on the device, because one user's examples
        may be in all of them (and a composed request, ``"adapters": [...]``, reveals what
        all of its adapters learned): ``device_user_epsilon_spent`` is that composition,
        the bound for any one user of the device. Each run counts as Gaussian mechanisms of
        sensitivity k·C without subsampling (joint convexity: Poisson sampling of a user's
        examples can only lower the divergence), so q = 1 and σ/k, each query σ/k."""
        k = self.config.store.max_examples_per_user
        if k is None:
            return {"guarantee": "per example"}
        states = [self.ledger.state(a) for a in self.ledger.adapters()]
        deltas = [s.delta for s in (*states, state) if s.delta is not None]
        accountant = state.accountant or self.config.for_adapter(state.adapter).accountant
        return {"guarantee": "per user", "max_examples_per_user": k,
                "user_epsilon_spent": _user_epsilon([state], k, min(deltas, default=None), accountant),
                "device_user_epsilon_spent": _user_epsilon(states, k, min(deltas, default=None), accountant),
                "user_neighbouring": f"add-or-remove one user's examples (at most {k} per adapter, each naming its "
                                     "user), composed over every adapter of the device"}

    # -- scheduler hooks ---------------------------------------------------------------------

    def _make_run(self, adapter: str, control: RunControl, on_progress: Callable[[RunProgress], None],
                  between_steps: Callable[[], None]) -> TrainingRun:
        return TrainingRun(self.env, adapter, self.config.for_adapter(adapter), control=control,
                           on_progress=on_progress, on_step=between_steps)

    def _candidates(self) -> list[str]:
        # Retention is applied on the scheduler's clock, not only when examples arrive.
        self.store.enforce_retention()
        # Adapters configured for training or trained here before, whether or not they
        # have examples: which adapters get a start test (and its charge) must not depend
        # on the data. An adapter that is only served (the demo's, a fleet's) gets none.
        return sorted((set(self.config.adapters) | set(self.ledger.adapters())) - self.federated)

    def _adapter_ready(self, adapter: str) -> Decision:
        """Budget left (public), then the adapter's private start test (start_test.py)."""
        c = self.config.for_adapter(adapter)
        state = self.ledger.state(adapter)
        if state.epsilon_spent >= c.target_epsilon:
            return Decision.of(["privacy budget spent"])
        new = self.store.count(adapter, since_id=last_trained_example(self.dir, adapter))
        train, holdout = self.store.split(adapter, c.holdout_fraction, c.split_seed)
        value = min(new - self.config.policy.min_new_examples, c.shortfall(len(train), len(holdout)))

        def charge() -> None:
            self.ledger.charge_queries(
                adapter, mechanisms=[("start_test", "epsilon", c.start_test_epsilon)], accountant=c.accountant,
                delta=c.delta or state.delta or default_delta(1.0), budget_epsilon=c.target_epsilon,
                clip_norm=c.clip_norm)

        try:
            start = self.start_tests.check(adapter, value, epsilon=c.start_test_epsilon, charge=charge)
        except PrivacyBudgetExceededError:
            return Decision.of(["privacy budget left is too small for a start test"])
        # The same words whatever the counts (GET /v2/trainer shows them with the token).
        return Decision.of([] if start else [
            f"waiting for enough new examples (min_new_examples {self.config.policy.min_new_examples}, "
            f"min_train_examples {c.min_train_examples}, {c.holdout_needed} held out; a private test decides)"])

    def _interrupted(self) -> list[str]:
        """Adapters with a run to finish at start: charged and interrupted while training,
        or trained and paid for but stopped while validating (never released)."""
        # A federated round never resumes: the next round closes it (trainer/run.py).
        return [a for a in self.ledger.adapters() if a not in self.federated
                and (any(r["status"] == "running" for r in self.ledger.state(a).runs)
                     or pending_release(self.dir, self.ledger, a))]


def _user_epsilon(states: list[PrivacyState], k: int, delta: float | None, accountant: AccountantName) -> float:
    from .accountant import PureCharge, RunCharge, epsilon

    # A pure ε₀-DP test is k·ε₀-DP for a group of k (group privacy).
    charges = [c if k == 1 else PureCharge(c.epsilon * k) if isinstance(c, PureCharge)
               else RunCharge(q=1.0, sigma=c.sigma / k, steps=c.steps)
               for state in states for r in state.runs for c in run_charges(r)]
    if not charges or delta is None:
        return 0.0
    return epsilon(runs=charges, delta=delta, accountant=accountant)


def _rng_for(config: TrainerConfig) -> Callable[[], np.random.Generator]:
    if config.noise == "seeded":  # testing only (the config refuses it otherwise)
        seed = config.noise_seed or 0
        return lambda: np.random.default_rng(seed)
    return _secret_rng


def _secret_rng() -> np.random.Generator:
    # The Poisson sample must stay secret (amplification by subsampling assumes it): seed
    # from the kernel's CSPRNG; which examples were sampled is never written anywhere.
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
