"""The ``trainer:`` section of lorad's YAML: typed, frozen, validated once (pydantic).

:class:`TrainerConfig` and its parts are :class:`~lorad.adapters.config_types.ConfigModel` subclasses:
unknown keys are refused and every :class:`TrainerConfigError` (lorad's one
:class:`~lorad.adapters.config_types.ConfigError`) names the dotted key
(``trainer.adapters.alice.clip_norm``), the bad value and what is allowed. The daemon
composes it as one more section; this module imports nothing of the daemon.

Per adapter, :class:`AdapterTrainingConfig` holds what one DP-SGD run is made of; the
``adapters:`` entries are merged over ``defaults:`` while validating. Numbers that depend
on how many examples the adapter has (q from an expected batch size, steps from epochs,
δ below 1/n, σ calibrated for a target ε) are resolved at run time by
:meth:`AdapterTrainingConfig.plan`, which is a pure function of the config and n.

An example configuration::

    trainer:
      policy: {min_new_examples: 100, time_window: "01:00-05:00", require_external_power: true}
      defaults: {target_epsilon: 8, clip_norm: 0.1, batch_size: 64, epochs: 30}
      adapters:
        alice: {target_epsilon: 3, budget_fraction: 0.25}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_serializer, model_validator

from lorad.adapters.config_types import ByteSize, ConfigError, ConfigModel, FieldProblem, NonEmptyStr, got
from lorad.adapters.names import NAME_ALLOWED, is_name

# trainer.accountant imports dp_accounting (~1.5 s) only when ε is computed, and the noise
# sources are imported where used: loractl reads the daemon config (which includes this section).
from .accountant import AccountantName

if TYPE_CHECKING:
    from .accountant import Charge
    from .noise import NoiseSource

__all__ = [
    "TrainerConfigError",
    "StoreConfig",
    "PolicyConfig",
    "AdapterTrainingConfig",
    "TrainerConfig",
    "RunPlan",
    "parse_trainer_section",
    "make_noise_source",
    "check_noise_source",
    "default_delta",
]

ValidationMetric = Literal["loss", "accuracy"]
NoiseKind = Literal["secure", "seeded"]

#: The trainer's configuration errors are lorad's one ConfigError (key, detail).
TrainerConfigError = ConfigError

_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_WINDOW_ALLOWED = 'expected "HH:MM-HH:MM" in local time, e.g. "01:00-05:00" (may wrap midnight)'


def _time_window(value: object) -> object:
    """``"22:30-06:00"`` → (1350, 360) minutes after midnight; a (start, end) pair passes."""
    if not isinstance(value, str):
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 24 * 60 for v in value):
            if value[0] == value[1]:
                raise ValueError(f"got {got(value)}; the window is empty (start equals end); {_WINDOW_ALLOWED}")
            return tuple(value)
        raise ValueError(f"got {got(value)}; {_WINDOW_ALLOWED}")
    parts = value.split("-")
    matches = [_TIME.match(p.strip()) for p in parts]
    if len(parts) != 2 or not all(matches):
        raise ValueError(f"got {got(value)}; {_WINDOW_ALLOWED}")
    start, end = (int(m.group(1)) * 60 + int(m.group(2)) for m in matches if m)
    if start == end:
        raise ValueError(f"got {got(value)}; the window is empty (start equals end); {_WINDOW_ALLOWED}")
    return start, end


TimeWindow = Annotated[
    tuple[int, int], BeforeValidator(_time_window),
    WithJsonSchema({"type": "string", "pattern": r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$"}),
]


class StoreConfig(ConfigModel):
    """Bounds of the local example store (oldest examples go first)."""

    config_key = "trainer.store"

    max_examples_per_adapter: int = Field(10_000, ge=1, description="Examples kept per adapter; the oldest go first.")
    max_bytes: ByteSize = Field(256 * 1024**2, gt=0, description="Bytes of examples kept in all; the oldest go first.")
    retention_days: float = Field(90.0, ge=1e-3, description="Days an example is kept before it is erased.")
    max_example_bytes: ByteSize = Field(1024**2, gt=0, description="Largest single example accepted over HTTP "
                                                                   "(JSON body), bytes.")
    max_abs_value: float = Field(1e6, ge=1.0, description="Largest magnitude of any stored input or label value "
                                                          "(non-finite values are always refused).")
    max_examples_per_user: int | None = Field(
        None, ge=1, description="Per-user contribution limit: examples one user id may add per adapter; null: no "
                                "limit, and the guarantee is per example. With a limit k the privacy report also "
                                "states the per-user ε (a user changes at most k examples).")


class PolicyConfig(ConfigModel):
    """When the background scheduler may start (and keep running) a training run."""

    config_key = "trainer.policy"

    min_new_examples: int = Field(100, ge=1, description="Examples added since the adapter's last completed run.")
    max_requests_per_s: float = Field(5.0, ge=0.0, description="Serving requests per second above which the "
                                                               "device is busy.")
    max_load_per_cpu: float = Field(0.7, ge=0.0, description="1-minute load average divided by the CPU count "
                                                             "above which the device is busy.")
    time_window: TimeWindow | None = Field(
        None, description='Local time window "HH:MM-HH:MM" in which training may run (may wrap midnight); '
                          "null: any time. Held as (start, end) minutes after midnight.")
    require_external_power: bool = Field(False, description="Train only on mains power (not on battery).")
    max_temperature_c: float | None = Field(None, ge=0.0, le=200.0, description="Hottest thermal zone (°C) above "
                                                                                "which training waits; null: no limit.")
    max_power_watts: float | None = Field(
        None, ge=0.0, description="The device's draw (W, from the daemon's power source) above which training "
                                  "waits; null, or no power source, means no limit.")
    start_test_interval_s: float = Field(
        3600.0, ge=1.0, description="Seconds between two checks of an adapter's private start test (fewer checks "
                                    "allow a lower threshold margin: trainer/start_test.py).")
    min_battery_percent: float | None = Field(
        None, ge=0.0, le=100.0, description="Battery charge (%) below which training waits; devices without a "
                                            "battery pass; null: no limit.")

    @field_serializer("time_window")
    def _window_text(self, window: tuple[int, int] | None) -> str | None:
        if window is None:
            return None
        return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in window)


@dataclass(frozen=True)
class RunPlan:
    """What one run will do, everything the ledger records to recompute its ε."""

    q: float
    expected_batch_size: float
    steps: int
    sigma: float
    clip_norm: float
    delta: float
    accountant: AccountantName
    budget_epsilon: float
    #: The private estimate of the number of training examples the plan is made from.
    examples: int
    #: The run's other Gaussian queries (what, σ), charged with it (see trainer/ledger.py).
    mechanisms: tuple[tuple[str, float], ...] = ()


#: The acceptance probability the gate's minimum held-out size is planned for, and its
#: standard normal quantile.
GATE_POWER = 0.95
_GATE_Z = 1.6448536269514722


def default_delta(n: float) -> float:
    """δ well below 1/n (the probability of a total leak of one example's data)."""
    return min(1e-5, 1.0 / (10.0 * max(n, 1)))


class AdapterTrainingConfig(ConfigModel):
    """One adapter's DP-SGD settings. ``None`` means "derive it at run time"."""

    target_epsilon: float = Field(8.0, gt=0, description="The adapter's privacy budget: ε of all its runs "
                                                         "composed, at delta.")
    delta: float | None = Field(None, gt=0, lt=1, description="δ of the guarantee; null: min(1e-5, 1/(10 n)) "
                                                              "for n training examples.")
    # Defaults of the DP-SGD numbers (C, optimizer, learning rate, batch size, epochs) come
    # from benchmarks/sweep_defaults.py on the demo tasks with 400 examples (README).
    clip_norm: float = Field(0.1, gt=0, description="C: each example's gradient is clipped to this L2 norm.")
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ; null: calibrated so that this run spends budget_fraction of the budget left.")
    budget_fraction: float = Field(0.5, gt=0, le=1, description="Share of the budget still left that one run "
                                   "spends (the rest stays for later runs on new data); 1 spends it all at once.")
    count_noise: float = Field(5.0, gt=0, description="Noise std (in examples) of the private estimate of the "
                               "number of training examples that q, steps, δ and σ are planned from; charged to "
                               "the ledger as a Gaussian query.")
    gate_noise_multiplier: float = Field(10.0, gt=0, description="Noise multiplier of the validation gate's private "
                                         "decision (noise std in units of gate_clip); charged to the ledger as a "
                                         "Gaussian query.")
    start_test_epsilon: float = Field(0.5, gt=0, le=5, description="ε₀ of the sparse-vector test that decides "
                                      "when an automatic run starts (trainer/start_test.py): pure ε₀-DP however "
                                      "often it checks, charged to the ledger when each test begins.")
    gate_clip: float = Field(1.0, gt=0, description="Bound on one held-out example's score difference (loss or "
                             "accuracy) in the validation gate.")
    min_train_examples: int = Field(100, ge=1, description="Fewer training examples than this: the run is refused "
                                    "before anything is charged.")
    min_holdout_examples: int = Field(20, ge=1, description="Fewer held-out examples than this: the run is refused "
                                      "before anything is charged.")
    pad_length: int | None = Field(None, ge=1, description="Dynamic non-batch dimensions (sequence length) of "
                                   "training batches are zero-padded or truncated to this; null: a text model's "
                                   "token limit (model.max_text_tokens), else 128.")
    accountant: AccountantName = Field("rdp", description="Privacy accountant: rdp (Rényi DP) or pld "
                                                          "(privacy loss distributions, tighter).")
    rank: int = Field(8, ge=1, description="LoRA rank r of the adapter trained.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / r, or alpha / sqrt(r) with use_rslora).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    freeze_a: bool = Field(False, description="Train B only (A stays at its initial value: a_init).")
    a_init: Literal["random", "principal"] = Field(
        "random", description="Initial value of LoRA A (B starts at zero): random (PEFT's kaiming-uniform, seeded by "
                              "init_seed) or principal (each target's top-rank left singular vectors of its frozen "
                              "base weight, columns of norm 0.6; read from the public base model only, so it costs no "
                              "privacy; needs rank <= every target's in_features).")
    learning_rate: float = Field(0.01, gt=0, description="Optimiser step size.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimiser of the LoRA weights.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (needs optimizer: adamw).")
    loss: Literal["cross_entropy", "mse", "causal_lm"] | None = Field(
        None, description="Training loss: cross_entropy, mse, or causal_lm (next-token loss of a language model's "
                          "text); null: causal_lm for a decoder language model, else cross_entropy.")
    window_tokens: int = Field(64, ge=2, le=8192, description="A language model trains on windows of this many "
                               "tokens: each text is cut into them, the last one padded (trainer/lm_examples.py).")
    max_text_tokens: int = Field(1024, ge=2, le=1_000_000, description="Longest text (in tokens) one example of a "
                                 "language model may be; a longer one is refused, not split (one text is one "
                                 "privacy unit).")
    part_rows: int | None = Field(None, ge=1, description="Most rows (a language model's token windows) one forward "
                                  "and backward pass of a training step takes; a larger batch runs in parts of whole "
                                  "examples whose clipped gradients are summed: the same update in less memory (and, "
                                  "for a text model, less time: a part's activations stay in cache). null: 2 for a "
                                  "language model, 512 tokens' worth of examples for a text model (8 at 64 tokens), "
                                  "the whole batch for other models.")
    output: NonEmptyStr | None = Field(None, description="Model output the loss reads; null: the output named "
                                       "logits if the model has one, else the first output.")
    sampling_rate: float | None = Field(
        None, gt=0, le=1, description="q: each example's probability to be in a step's batch (Poisson sampling); "
                                      "give exactly one of sampling_rate and batch_size.")
    batch_size: float | None = Field(64.0, gt=0, description="Expected batch size q·n; exactly one of "
                                                             "sampling_rate and batch_size.")
    steps: int | None = Field(None, ge=1, description="Steps of one run; give exactly one of steps and epochs.")
    epochs: float | None = Field(30.0, gt=0, description="Passes over the data per run (steps = ceil(epochs / q)); "
                                                        "exactly one of steps and epochs.")
    validation_metric: ValidationMetric = Field("loss", description="What the validation gate compares: loss, "
                                                                    "or accuracy (needs loss: cross_entropy "
                                                                    "or causal_lm: top-1 next-token accuracy).")
    validation_margin: float = Field(0.0, description="The new version is installed only if its held-out score "
                                     "beats the current one's by more than this (mean per example, decided "
                                     "privately); negative: it may be that much worse.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of examples held out for the validation "
                                                                 "gate (never trained on).")
    split_seed: int = Field(0, ge=0, description="Seed of the train/holdout split.")
    init_seed: int = Field(0, ge=0, description="Seed of the LoRA A initialisation.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints of a run (resumed after "
                                                        "a restart).")

    @model_validator(mode="after")
    def _consistent(self) -> AdapterTrainingConfig:
        if (self.sampling_rate is None) == (self.batch_size is None):
            raise FieldProblem("sampling_rate", "give exactly one of sampling_rate (q, each example's probability to "
                               "be in a step's batch) and batch_size (the expected batch size q·n)")
        if (self.steps is None) == (self.epochs is None):
            raise FieldProblem("steps", "give exactly one of steps and epochs (steps = ceil(epochs / q))")
        if self.weight_decay and self.optimizer != "adamw":
            raise FieldProblem("weight_decay", f"got {self.weight_decay}; weight decay needs optimizer: adamw")
        if self.validation_metric == "accuracy" and self.loss == "mse":
            raise FieldProblem("validation_metric",
                               "got 'accuracy'; accuracy needs loss: cross_entropy or causal_lm (use 'loss' with mse)")
        return self

    @property
    def gate_examples_needed(self) -> int:
        """The fewest held-out examples with which the gate accepts a candidate that improves
        every one of them by the full clip bound with probability GATE_POWER (the noise is
        σ_g·b, the signal n·b): below it no private decision means anything."""
        return math.ceil(_GATE_Z * self.gate_noise_multiplier)

    def plan(
        self, n: float, *, prior: Sequence[Charge] = (), ledger_delta: float | None = None,
        adapter: str = "adapter", gate: bool = True,
    ) -> RunPlan:
        """Resolve q, steps, δ and σ for a run over (an estimate of) ``n`` training examples.

        ``n`` is the private estimate of the count (never the exact count: q, the steps,
        σ, δ and the update's scale 1/(q·n) all follow from it and are published).
        ``prior`` is what the ledger already charged at ``ledger_delta``; σ is calibrated
        so that the run (with its count and gate queries) spends ``budget_fraction`` of
        what is left. ``gate=False``: a run whose result is not validated here (a federated
        round's update goes to the federation), so no gate query is planned or charged.
        """
        n = max(float(n), 1.0)
        if self.sampling_rate is not None:
            q = self.sampling_rate
        else:
            assert self.batch_size is not None
            q = min(1.0, self.batch_size / n)
        steps = self.steps if self.steps is not None else max(1, math.ceil((self.epochs or 1.0) / q))
        delta = self.delta if self.delta is not None else default_delta(n)
        if delta >= 1.0 / n:
            raise ValueError(
                f"delta={delta:g} is not below 1/n = {1.0 / n:g} for about n={n:.0f} training examples; "
                "a δ that large allows leaking one example outright. Lower delta or leave it unset"
            )
        mechanisms: tuple[tuple[str, float], ...] = (("example_count", self.count_noise),)
        if gate:
            mechanisms += (("validation_gate", self.gate_noise_multiplier),)
        if self.noise_multiplier is not None:
            sigma = self.noise_multiplier
        else:
            from .accountant import RunCharge, calibrate_sigma, epsilon

            at_delta = min(delta, ledger_delta) if ledger_delta else delta
            queries = [RunCharge(q=1.0, sigma=s, steps=1) for _, s in mechanisms]
            spent = epsilon(runs=list(prior), delta=at_delta, accountant=self.accountant)
            goal = spent + self.budget_fraction * (self.target_epsilon - spent)
            tolerance = min(0.01, goal / 100)
            floor = epsilon(runs=[*prior, *queries], delta=at_delta, accountant=self.accountant)
            if floor >= goal - tolerance:
                # Not even the run's count and gate queries fit: nothing is charged.
                from .errors import PrivacyBudgetExceededError

                raise PrivacyBudgetExceededError(adapter, spent_epsilon=spent, requested_epsilon=floor,
                                                 budget_epsilon=self.target_epsilon)
            sigma = calibrate_sigma(
                target_epsilon=goal, delta=at_delta, q=q, steps=steps, accountant=self.accountant,
                prior=[*prior, *queries], tolerance=tolerance,
            )
        return RunPlan(q=q, expected_batch_size=q * n, steps=steps, sigma=sigma, clip_norm=self.clip_norm,
                       delta=delta, accountant=self.accountant, budget_epsilon=self.target_epsilon,
                       examples=round(n), mechanisms=mechanisms)

    @property
    def holdout_needed(self) -> int:
        """Held-out examples a run needs: min_holdout_examples, and enough for the gate."""
        return max(self.min_holdout_examples, self.gate_examples_needed)

    def shortfall(self, n_train: float, n_holdout: float) -> float:
        """How far the counts are above what a run needs (negative: short), in examples;
        changes by at most 1 when one example is added or removed (the start test's query)."""
        return min(n_train - self.min_train_examples, n_holdout - self.holdout_needed)

    def check_estimate(self, n_train: float, *, holdout: bool = True) -> None:
        """Refuse a run whose private estimate of the training examples (a charged count)
        says too few to learn or to validate; the held-out count is estimated from it and
        ``holdout_fraction`` (the split is by hash). Never the exact counts: whether a
        run is refused is public (the ledger records the refused run's count)."""
        if not holdout:  # a federated round: nothing is validated here
            if n_train < self.min_train_examples:
                raise ValueError(
                    f"too few examples for a federated round, by the private estimate of the count "
                    f"(≈{max(n_train, 0):.0f}, noise std {self.count_noise:g}): a round needs at least "
                    f"{self.min_train_examples} (federated.min_examples). The private count was charged (a query "
                    "record in the ledger); nothing else was")
            return
        held_out = n_train * self.holdout_fraction / (1.0 - self.holdout_fraction)
        if n_train < self.min_train_examples or held_out < self.holdout_needed:
            raise ValueError(
                f"too few examples to train at ε={self.target_epsilon:g}, by the private estimate of the count "
                f"(≈{max(n_train, 0):.0f} training examples, noise std {self.count_noise:g}): a run needs at least "
                f"{self.min_train_examples} training and {self.holdout_needed} held-out examples "
                f"(min_train_examples; min_holdout_examples, and {self.gate_examples_needed} for the validation gate "
                f"at gate_noise_multiplier {self.gate_noise_multiplier:g}; holdout_fraction={self.holdout_fraction:g} "
                "of the examples are held out). Add examples. The private count was charged (a query record in the "
                "ledger); nothing else was")


#: Giving one of a mutually exclusive pair in an adapter's entry replaces the inherited other.
_PAIRS = (("sampling_rate", "batch_size"), ("steps", "epochs"))


class TrainerConfig(ConfigModel):
    """The whole ``trainer:`` section."""

    config_key = "trainer"

    enabled: bool = Field(True, description="Whether the daemon collects examples and trains at all.")
    schedule: bool = Field(True, description="Whether the scheduler starts runs by itself when the policy "
                                             "allows (manual runs always can).")
    testing: bool = Field(False, description="Test mode: permits predictable (seeded) noise and sampling. "
                                             "Never on a real device.")
    noise: NoiseKind = Field("secure", description="Noise source of DP-SGD: secure (the OS CSPRNG), or seeded "
                                                   "(only with testing: true).")
    noise_seed: int | None = Field(None, ge=0, description="Seed of the seeded noise (only with noise: seeded).")
    backend: Literal["portable", "ort-training", "auto"] = Field(
        "auto", description="Training backend: portable (lorad's own DP-SGD step graph; any onnxruntime and "
                            "execution provider), ort-training (ONNX Runtime's training API; needs "
                            "onnxruntime-training-cpu 1.19.2 or a build with the training APIs), or auto (the faster "
                            "one the installed runtime supports: portable, as measured).")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Execution provider of training (either backend): "
                                                              "CPU, or CUDA on Jetson.")
    intra_op_threads: int = Field(1, ge=0, le=256, description="ORT intra-op threads of the training session: 1 "
                                  "keeps training on one low-priority thread (pool threads would compete with serving).")
    niceness: int = Field(10, ge=0, le=19, description="Nice value of the training thread and step process.")
    isolate: bool = Field(True, description="Run the DP-SGD steps in a child process (ORT's training call holds "
                                            "the GIL for a whole step, which would stall serving).")
    sched_idle: bool = Field(True, description="Also put training in SCHED_IDLE (Linux): it runs only on CPU time "
                                               "serving does not want.")
    check_interval_s: float = Field(60.0, ge=0.1, description="Seconds between the scheduler's policy checks.")
    store: StoreConfig = Field(default_factory=lambda: StoreConfig(), description="The local example store.")
    policy: PolicyConfig = Field(default_factory=lambda: PolicyConfig(), description="When automatic runs may start.")
    defaults: AdapterTrainingConfig = Field(default_factory=lambda: AdapterTrainingConfig(),
                                            description="DP-SGD settings of every adapter without its own entry.")
    adapters: Mapping[str, AdapterTrainingConfig] = Field(
        default_factory=dict, json_schema_extra={"default": {}}, description="Per-adapter settings (adapter name -> keys of defaults), merged over "
                                          "defaults; null: the defaults.")

    @model_validator(mode="before")
    @classmethod
    def _merge_adapters_over_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("adapters"), Mapping):
            return data
        base = data.get("defaults") or {}
        if isinstance(base, AdapterTrainingConfig):
            base = base.model_dump(exclude_unset=True)
        if not isinstance(base, Mapping):
            return data  # reported at trainer.defaults
        merged: dict[str, object] = {}
        for name, entry in data["adapters"].items():
            if not is_name(name):
                raise FieldProblem(f"adapters.{name}", f"{name!r} is not an adapter name; allowed: {NAME_ALLOWED}")
            if entry is None:
                entry = {}
            if isinstance(entry, Mapping):
                over = dict(entry)
                entry = {**base, **over}
                for a, b in _PAIRS:
                    if a in over and b not in over:
                        entry[b] = None
                    elif b in over and a not in over:
                        entry[a] = None
            merged[name] = entry
        return {**data, "adapters": merged}

    @model_validator(mode="after")
    def _seeded_noise_only_in_tests(self) -> TrainerConfig:
        # The one check of the seeded-noise rule (check_noise_source applies it to a source object).
        if self.noise == "seeded" and not self.testing:
            raise FieldProblem("noise", "got 'seeded'; predictable noise voids the privacy guarantee and is allowed "
                               "only with trainer.testing: true; allowed in production: secure")
        if self.noise_seed is not None and self.noise != "seeded":
            raise FieldProblem("noise_seed", f"got {self.noise_seed}; only allowed with trainer.noise: seeded")
        return self

    def for_adapter(self, name: str) -> AdapterTrainingConfig:
        return self.adapters.get(name, self.defaults)


def make_noise_source(config: TrainerConfig) -> NoiseSource:
    """SecureNoise, or SeededNoise when the (testing) config asks for it."""
    from .noise import SecureNoise, SeededNoise

    if config.noise == "seeded":
        return SeededNoise(config.noise_seed or 0)
    return SecureNoise()


def check_noise_source(noise: NoiseSource, config: TrainerConfig) -> None:
    """Refuse a predictable noise source outside test mode."""
    if not getattr(noise, "secure", False) and not config.testing:
        raise TrainerConfigError(
            "trainer.testing", f"is false, but the noise source {noise!r} is predictable; "
            "production training needs SecureNoise (set trainer.testing: true only in tests)")


def parse_trainer_section(data: object, *, prefix: str = "trainer") -> TrainerConfig:
    """Validate the ``trainer:`` mapping (None = all defaults) into a :class:`TrainerConfig`."""
    config: TrainerConfig = TrainerConfig.load(data, key=prefix)
    return config
