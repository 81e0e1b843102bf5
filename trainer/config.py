"""The ``trainer:`` section of the daemon's YAML: typed, frozen, validated once.

:func:`parse_trainer_section` turns the section's mapping into a :class:`TrainerConfig`;
every :class:`TrainerConfigError` names the dotted key (``trainer.adapters.alice.clip_norm``),
the bad value and what is allowed. The daemon registers it as one more config section;
this module imports nothing of the daemon (the arrows go daemon → trainer).

Per adapter, :class:`AdapterTrainingConfig` holds what one DP-SGD run is made of. Numbers
that depend on how many examples the adapter has (q from an expected batch size, steps
from epochs, δ below 1/n, σ calibrated for a target ε) are resolved at run time by
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
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

# trainer.accountant imports dp_accounting (~1.5 s) only when ε is computed, and the noise
# sources are imported where used: loractl reads the daemon config (which includes this section).
from ._names import is_adapter_name
from .accountant import ACCOUNTANTS, AccountantName

if TYPE_CHECKING:
    from .accountant import RunCharge
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

_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


class TrainerConfigError(ValueError):
    """The trainer configuration is invalid; ``key`` is the dotted path of the bad value."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class StoreConfig:
    """Bounds of the local example store (oldest examples go first)."""

    max_examples_per_adapter: int = 10_000
    max_bytes: int = 256 * 1024**2
    retention_days: float = 90.0
    #: Largest single example accepted over HTTP (JSON body bytes).
    max_example_bytes: int = 1024**2
    #: Largest magnitude of any stored input or label value (non-finite values are refused).
    max_abs_value: float = 1e6
    #: Per-user contribution limit: examples one user id may add per adapter (None: no
    #: limit, and the guarantee is per example). With a limit k the privacy report also
    #: states the per-user ε (a user changes at most k examples).
    max_examples_per_user: int | None = None


@dataclass(frozen=True)
class PolicyConfig:
    """When the background scheduler may start (and keep running) a training run."""

    #: Examples added since the adapter's last completed run.
    min_new_examples: int = 100
    #: Serving requests per second above which the device is busy.
    max_requests_per_s: float = 5.0
    #: 1-minute load average divided by the CPU count above which the device is busy.
    max_load_per_cpu: float = 0.7
    #: Local time window ``(start, end)`` in minutes after midnight (may wrap midnight).
    time_window: tuple[int, int] | None = None
    require_external_power: bool = False
    #: Hottest thermal zone (°C) above which training waits.
    max_temperature_c: float | None = None


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


def default_delta(n: float) -> float:
    """δ well below 1/n (the probability of a total leak of one example's data)."""
    return min(1e-5, 1.0 / (10.0 * max(n, 1)))


@dataclass(frozen=True, kw_only=True)
class AdapterTrainingConfig:
    """One adapter's DP-SGD settings. ``None`` means "derive it at run time"."""

    #: The adapter's privacy budget: ε of all its runs composed, at ``delta``.
    target_epsilon: float = 8.0
    #: None: :func:`default_delta` of the number of training examples.
    delta: float | None = None
    #: Defaults of the DP-SGD numbers (C, optimizer, learning rate, batch size, epochs) come
    #: from benchmarks/sweep_defaults.py on the demo tasks with 400 examples (README).
    clip_norm: float = 0.1
    #: σ; None: calibrated so that this run spends ``budget_fraction`` of the budget left.
    noise_multiplier: float | None = None
    #: Share of the budget still left that one run spends (the rest stays for later runs
    #: on new data); 1.0 spends it all at once.
    budget_fraction: float = 0.5
    #: Noise std (in examples) of the private estimate of the number of training examples
    #: that q, steps, δ and σ are planned from; charged to the ledger as a Gaussian query.
    count_noise: float = 5.0
    #: Noise multiplier of the validation gate's private decision (noise std in units of
    #: ``gate_clip``); charged to the ledger as a Gaussian query.
    gate_noise_multiplier: float = 10.0
    #: Bound on one held-out example's score difference (loss or accuracy) in the gate.
    gate_clip: float = 1.0
    #: Fewer training examples than this: the run is refused before anything is charged.
    min_train_examples: int = 100
    #: Fewer held-out examples than this: the run is refused before anything is charged.
    min_holdout_examples: int = 20
    #: Dynamic non-batch dimensions (sequence length) are zero-padded or truncated to this.
    pad_length: int = 128
    accountant: AccountantName = "rdp"
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    freeze_a: bool = False
    learning_rate: float = 0.01
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    #: Model output the loss reads; None: the first output.
    output: str | None = None
    #: Exactly one of sampling_rate (q) and batch_size (expected q·n) is set.
    sampling_rate: float | None = None
    batch_size: float | None = 64.0
    #: Exactly one of steps and epochs (steps = ceil(epochs / q)) is set.
    steps: int | None = None
    epochs: float | None = 30.0
    validation_metric: ValidationMetric = "loss"
    #: The new version is installed only if its held-out score beats the current one's by
    #: more than this (mean per example, decided privately); negative: may be that much worse.
    validation_margin: float = 0.0
    holdout_fraction: float = 0.2
    split_seed: int = 0
    init_seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        _validate_adapter(self, "AdapterTrainingConfig")

    def plan(
        self, n: float, *, prior: Sequence[RunCharge] = (), ledger_delta: float | None = None,
        adapter: str = "adapter",
    ) -> RunPlan:
        """Resolve q, steps, δ and σ for a run over (an estimate of) ``n`` training examples.

        ``n`` is the private estimate of the count (never the exact count: q, the steps,
        σ, δ and the update's scale 1/(q·n) all follow from it and are published).
        ``prior`` is what the ledger already charged at ``ledger_delta``; σ is calibrated
        so that the run (with its count and gate queries) spends ``budget_fraction`` of
        what is left.
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
        mechanisms = (("example_count", self.count_noise), ("validation_gate", self.gate_noise_multiplier))
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
                       examples=int(round(n)), mechanisms=mechanisms)

    def check_enough(self, n_train: int, n_holdout: int) -> None:
        """Refuse, before anything is charged, a run that cannot learn or be validated.

        This reads the exact counts; the refusal goes only to the (authenticated) caller
        that started the run or to the device's log, never into the published ledger.
        """
        # The message carries no exact count: an automatic run's refusal is shown by the
        # open GET /v2/trainer (`loractl examples count`, with the token, shows the count).
        if n_train < self.min_train_examples or n_holdout < self.min_holdout_examples:
            raise ValueError(
                f"too few examples to train at ε={self.target_epsilon:g}: a run needs at least "
                f"{self.min_train_examples} training and {self.min_holdout_examples} held-out examples "
                f"(min_train_examples, min_holdout_examples; holdout_fraction={self.holdout_fraction:g} of "
                "the examples are held out for validation). Add examples; nothing was charged")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """The whole ``trainer:`` section."""

    #: Whether the daemon collects examples and trains at all.
    enabled: bool = True
    #: Whether the scheduler starts runs by itself when the policy allows (manual runs always can).
    schedule: bool = True
    #: Test mode: permits predictable (seeded) noise and sampling. Never on a real device.
    testing: bool = False
    noise: NoiseKind = "secure"
    noise_seed: int | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    #: ORT intra-op threads of the training session: 1 keeps training on the one
    #: low-priority worker thread (pool threads would compete with serving).
    intra_op_threads: int = 1
    #: Nice value of the training thread (Linux applies it per thread) and step process.
    niceness: int = 10
    #: Run the DP-SGD steps in a child process: ORT's training call holds the GIL for a
    #: whole step, which would stall serving threads of the daemon (trainer/stepper_process.py).
    isolate: bool = True
    #: Also put training in SCHED_IDLE (Linux): it runs only on CPU time serving does not want.
    sched_idle: bool = True
    check_interval_s: float = 60.0
    store: StoreConfig = field(default_factory=StoreConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    defaults: AdapterTrainingConfig = field(default_factory=AdapterTrainingConfig)
    #: Per-adapter overrides, already merged over ``defaults``.
    adapters: Mapping[str, AdapterTrainingConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", MappingProxyType(dict(self.adapters)))
        if self.noise == "seeded" and not self.testing:
            raise TrainerConfigError(
                "trainer.noise", "got 'seeded'; predictable noise voids the privacy guarantee and is "
                "allowed only with trainer.testing: true; allowed in production: secure")
        if self.noise_seed is not None and self.noise != "seeded":
            raise TrainerConfigError("trainer.noise_seed", "is only allowed with trainer.noise: seeded")

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


# ---------------------------------------------------------------- parsing


def parse_trainer_section(data: object, *, prefix: str = "trainer") -> TrainerConfig:
    """Validate the ``trainer:`` mapping (None = all defaults) into a :class:`TrainerConfig`."""
    r = _Reader(data, prefix)
    d = TrainerConfig()
    testing = r.boolean("testing", d.testing)
    noise = r.choice("noise", d.noise, ("secure", "seeded"))
    seed = r.integer("noise_seed", None, minimum=0)
    if noise == "seeded" and not testing:
        raise TrainerConfigError(r.key("noise"), "got 'seeded'; predictable noise voids the privacy guarantee and "
                                 f"is allowed only with {r.key('testing')}: true; allowed in production: secure")
    if seed is not None and noise != "seeded":
        raise TrainerConfigError(r.key("noise_seed"), f"got {seed}; only allowed with {r.key('noise')}: seeded")
    defaults = _parse_adapter(r.section("defaults"), AdapterTrainingConfig())
    adapters_reader = r.section("adapters")
    adapters = {}
    for name in adapters_reader.names():
        if not is_adapter_name(name):
            raise TrainerConfigError(adapters_reader.key(name), f"{name!r} is not an adapter name; allowed: "
                                     "letters, digits, '.', '_', '-' (1-64, not starting with a symbol)")
        adapters[name] = _parse_adapter(adapters_reader.section(name), defaults)
    config = TrainerConfig(
        enabled=r.boolean("enabled", d.enabled),
        schedule=r.boolean("schedule", d.schedule),
        testing=testing,
        noise=noise,
        noise_seed=seed,
        device=r.choice("device", d.device, ("cpu", "cuda")),
        intra_op_threads=r.integer("intra_op_threads", d.intra_op_threads, minimum=0, maximum=256) or 0,
        niceness=r.integer("niceness", d.niceness, minimum=0, maximum=19) or 0,
        isolate=r.boolean("isolate", d.isolate),
        sched_idle=r.boolean("sched_idle", d.sched_idle),
        check_interval_s=r.number("check_interval_s", d.check_interval_s, minimum=0.1),
        store=_parse_store(r.section("store")),
        policy=_parse_policy(r.section("policy")),
        defaults=defaults,
        adapters=adapters,
    )
    r.finish()
    return config


def _parse_store(r: _Reader) -> StoreConfig:
    d = StoreConfig()
    out = StoreConfig(
        max_examples_per_adapter=r.integer("max_examples_per_adapter", d.max_examples_per_adapter, minimum=1) or 1,
        max_bytes=r.byte_size("max_bytes", d.max_bytes),
        retention_days=r.number("retention_days", d.retention_days, minimum=1e-3),
        max_example_bytes=r.byte_size("max_example_bytes", d.max_example_bytes),
        max_abs_value=r.number("max_abs_value", d.max_abs_value, minimum=1.0),
        max_examples_per_user=r.integer("max_examples_per_user", None, minimum=1),
    )
    r.finish()
    return out


def _parse_policy(r: _Reader) -> PolicyConfig:
    d = PolicyConfig()
    window = r.raw("time_window")
    out = PolicyConfig(
        min_new_examples=r.integer("min_new_examples", d.min_new_examples, minimum=1) or 1,
        max_requests_per_s=r.number("max_requests_per_s", d.max_requests_per_s, minimum=0.0),
        max_load_per_cpu=r.number("max_load_per_cpu", d.max_load_per_cpu, minimum=0.0),
        time_window=None if window is None else _time_window(window, r.key("time_window")),
        require_external_power=r.boolean("require_external_power", d.require_external_power),
        max_temperature_c=r.number("max_temperature_c", None, minimum=0.0, maximum=200.0),
    )
    r.finish()
    return out


def _time_window(value: object, key: str) -> tuple[int, int]:
    allowed = 'expected "HH:MM-HH:MM" in local time, e.g. "01:00-05:00" (may wrap midnight)'
    parts = value.split("-") if isinstance(value, str) else []
    matches = [_TIME.match(p.strip()) for p in parts]
    if len(parts) != 2 or not all(matches):
        raise TrainerConfigError(key, f"got {value!r}; {allowed}")
    start, end = (int(m.group(1)) * 60 + int(m.group(2)) for m in matches if m)
    if start == end:
        raise TrainerConfigError(key, f"got {value!r}; the window is empty (start equals end); {allowed}")
    return start, end


def _parse_adapter(r: _Reader, base: AdapterTrainingConfig) -> AdapterTrainingConfig:
    """Keys given here override ``base``; the result is validated as a whole."""
    changes: dict[str, Any] = {}
    floats = {"target_epsilon", "clip_norm", "alpha", "learning_rate", "weight_decay", "validation_margin",
              "holdout_fraction", "delta", "noise_multiplier", "sampling_rate", "batch_size", "epochs",
              "budget_fraction", "count_noise", "gate_noise_multiplier", "gate_clip"}
    ints = {"rank", "steps", "split_seed", "init_seed", "checkpoint_every", "min_train_examples",
            "min_holdout_examples", "pad_length"}
    bools = {"use_rslora", "freeze_a"}
    choices: dict[str, Sequence[str]] = {
        "accountant": ACCOUNTANTS, "optimizer": ("adamw", "sgd"), "loss": ("cross_entropy", "mse"),
        "validation_metric": ("loss", "accuracy"),
    }
    for f in fields(AdapterTrainingConfig):
        if f.name in floats:
            value: Any = r.number(f.name, None)
        elif f.name in ints:
            value = r.integer(f.name, None)
        elif f.name in bools:
            value = r.boolean(f.name, None)
        elif f.name in choices:
            value = r.choice(f.name, None, choices[f.name])
        else:
            value = r.string(f.name, None)
        if value is not None:
            changes[f.name] = value
    # Giving one of a mutually exclusive pair replaces the other inherited one.
    for a, b in (("sampling_rate", "batch_size"), ("steps", "epochs")):
        if a in changes and b not in changes:
            changes[b] = None
        elif b in changes and a not in changes:
            changes[a] = None
    r.finish()
    try:
        return replace(base, **changes)
    except TrainerConfigError as e:
        # Name the key where the user wrote it, not the dataclass field.
        raise TrainerConfigError(f"{r.prefix}.{e.key.rsplit('.', 1)[-1]}", e.detail) from None


def _validate_adapter(c: AdapterTrainingConfig, prefix: str) -> None:
    def fail(key: str, message: str) -> None:
        raise TrainerConfigError(f"{prefix}.{key}", message)

    def positive(key: str, value: float | None, *, upper: float = math.inf, closed: bool = False) -> None:
        if value is None:
            return
        ok = math.isfinite(value) and 0 < value and (value <= upper if closed else value < upper)
        if not ok:
            bound = f" and {'<=' if closed else '<'} {upper:g}" if math.isfinite(upper) else ""
            fail(key, f"got {value!r}; expected a number > 0{bound}")

    positive("target_epsilon", c.target_epsilon)
    positive("clip_norm", c.clip_norm)
    positive("delta", c.delta, upper=1.0)
    positive("noise_multiplier", c.noise_multiplier)
    positive("alpha", c.alpha)
    positive("learning_rate", c.learning_rate)
    positive("sampling_rate", c.sampling_rate, upper=1.0, closed=True)
    positive("batch_size", c.batch_size)
    positive("epochs", c.epochs)
    positive("budget_fraction", c.budget_fraction, upper=1.0, closed=True)
    positive("count_noise", c.count_noise)
    positive("gate_noise_multiplier", c.gate_noise_multiplier)
    positive("gate_clip", c.gate_clip)
    for key, value, lo in (("min_train_examples", c.min_train_examples, 1),
                           ("min_holdout_examples", c.min_holdout_examples, 1), ("pad_length", c.pad_length, 1),
                           ("rank", c.rank, 1),
                           ("steps", c.steps, 1), ("checkpoint_every", c.checkpoint_every, 1),
                           ("split_seed", c.split_seed, 0), ("init_seed", c.init_seed, 0)):
        if value is not None and value < lo:
            fail(key, f"got {value}; expected an integer >= {lo}")
    if (c.sampling_rate is None) == (c.batch_size is None):
        fail("sampling_rate", "give exactly one of sampling_rate (q, each example's probability to be in a "
             "step's batch) and batch_size (the expected batch size q·n)")
    if (c.steps is None) == (c.epochs is None):
        fail("steps", "give exactly one of steps and epochs (steps = ceil(epochs / q))")
    if c.accountant not in ACCOUNTANTS:
        fail("accountant", f"got {c.accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    if not (math.isfinite(c.weight_decay) and c.weight_decay >= 0):
        fail("weight_decay", f"got {c.weight_decay!r}; expected a number >= 0")
    if c.weight_decay and c.optimizer != "adamw":
        fail("weight_decay", f"got {c.weight_decay}; weight decay needs optimizer: adamw")
    if not math.isfinite(c.validation_margin):
        fail("validation_margin", f"got {c.validation_margin!r}; expected a finite number")
    if not 0 < c.holdout_fraction < 1:
        fail("holdout_fraction", f"got {c.holdout_fraction!r}; expected a number > 0 and < 1 (the validation "
             "gate needs held-out examples)")
    if c.validation_metric == "accuracy" and c.loss != "cross_entropy":
        fail("validation_metric", "got 'accuracy'; accuracy needs loss: cross_entropy (use 'loss' with mse)")
    if c.output is not None and not c.output:
        fail("output", "got an empty string; expected a model output name")


class _Reader:
    """Typed access to one mapping; :meth:`finish` rejects keys no getter asked for."""

    def __init__(self, data: object, prefix: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
            raise TrainerConfigError(prefix, f"got {_show(data)}; expected a mapping of keys to values")
        self.data: Mapping[str, object] = data
        self.prefix = prefix
        self._known: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def names(self) -> list[str]:
        self._known.update(self.data)
        return list(self.data)

    def raw(self, name: str) -> object:
        self._known.add(name)
        return self.data.get(name)

    def section(self, name: str) -> _Reader:
        return _Reader(self.raw(name), self.key(name))

    def boolean(self, name: str, default: Any) -> Any:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise TrainerConfigError(self.key(name), f"got {_show(value)}; expected true or false")
        return value

    def integer(self, name: str, default: int | None, *, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or (
                minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise TrainerConfigError(self.key(name), f"got {_show(value)}; expected an integer{_range(minimum, maximum)}")
        return value

    def number(self, name: str, default: Any, *, minimum: float | None = None, maximum: float | None = None) -> Any:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise TrainerConfigError(self.key(name), f"got {_show(value)}; expected a number{_range(minimum, maximum)}")
        return float(value)

    def string(self, name: str, default: str | None) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise TrainerConfigError(self.key(name), f"got {_show(value)}; expected a non-empty string")
        return value

    def choice(self, name: str, default: Any, allowed: Sequence[str]) -> Any:
        value = self.raw(name)
        if value is None:
            return default
        if value not in allowed:
            raise TrainerConfigError(self.key(name), f"got {_show(value)}; allowed: {', '.join(allowed)}")
        return value

    def byte_size(self, name: str, default: int) -> int:
        value = self.raw(name)
        allowed = 'expected a positive number of bytes or a string like "64MiB", "500kB" (B, kB, MB, GB, KiB, MiB, GiB)'
        if value is None:
            return default
        n: float = -1
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if not (math.isfinite(n) and n >= 1):
            raise TrainerConfigError(self.key(name), f"got {_show(value)}; {allowed}")
        return int(n)

    def finish(self) -> None:
        unknown = sorted(k for k in self.data if k not in self._known)
        if unknown:
            raise TrainerConfigError(self.key(unknown[0]),
                                     f"unknown key; allowed keys: {', '.join(sorted(self._known))}")


def _show(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f" >= {minimum:g}"
    if maximum is not None:
        return f" <= {maximum:g}"
    return ""
