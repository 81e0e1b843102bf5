"""The privacy record of an adapter version: what it was trained on, with which guarantee.

One format for what the device's trainer installs (``meta.privacy`` and the version's
``lorad_privacy.json``: trainer/run.py) and what a fleet update carries signed in its target
metadata (``custom["lorad"]["privacy"]``, real numbers as decimal strings since canonical
JSON has no floats: ota/privacy.py checks it against the device's policy)::

    {"format": "lorad-privacy/1", "epsilon": 2.9, "delta": 1e-5, "accountant": "rdp",
     "sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 1200, "unit": "example"}

``unit`` is what one privacy unit is: ``example`` (per-example DP) or ``user``. A version the
device's trainer made also says what it was trained on, so the fleet can aggregate it:
``examples`` (the private estimate of the count the run was planned from, never the exact
count), ``example`` (what one example is, e.g. one submitted text of a language model) and
``base_fingerprint`` (the base model it was trained against). A federated round's aggregate
(daemon/federated/server_app.py) is per ``user`` (one device's whole data, its update clipped
to ``clip_norm``), ``steps`` the rounds composed, and says how many ``clients`` were summed
and the ``local_epsilon`` each spent on its device in the round. Pure: parsing and checking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PRIVACY_FILE", "PRIVACY_FORMAT", "PrivacyRecord"]

PRIVACY_FILE = "lorad_privacy.json"
PRIVACY_FORMAT = "lorad-privacy/1"
_ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")
_UNITS = ("example", "user")


def _num(d: Mapping[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, str):  # the signed form: canonical JSON has no floats
        try:
            v = float(v)
        except ValueError:
            raise TypeError(f"{key} must be a finite number, got {d[key]!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{key} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class PrivacyRecord:
    """(ε, δ)-DP of one adapter as its accountant computed it."""

    epsilon: float
    delta: float
    accountant: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    unit: str = "example"
    examples: float | None = None
    example: str | None = None
    base_fingerprint: str | None = None
    #: A federated aggregate: the updates summed, their clip norm, each client's local ε.
    clients: int | None = None
    clip_norm: float | None = None
    local_epsilon: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.examples is not None and not (math.isfinite(self.examples) and self.examples >= 0):
            problems.append(f"examples {self.examples} (must be a finite number >= 0)")
        for key in ("example", "base_fingerprint"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                problems.append(f"{key} {getattr(self, key)!r} (must be a string)")
        if not self.epsilon >= 0:
            problems.append(f"epsilon {self.epsilon} (must be >= 0)")
        if not 0 < self.delta < 1:
            problems.append(f"delta {self.delta} (must be in (0, 1))")
        if self.accountant not in _ACCOUNTANTS:
            problems.append(f"accountant {self.accountant!r} (allowed {_ACCOUNTANTS})")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate {self.sample_rate} (must be in (0, 1])")
        if not self.noise_multiplier > 0:
            problems.append(f"noise_multiplier {self.noise_multiplier} (must be > 0)")
        if self.steps < 1:
            problems.append(f"steps {self.steps} (must be >= 1)")
        if self.clients is not None and (isinstance(self.clients, bool) or not isinstance(self.clients, int)
                                         or self.clients < 1):
            problems.append(f"clients {self.clients!r} (must be an integer >= 1)")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            problems.append(f"clip_norm {self.clip_norm} (must be > 0)")
        if self.local_epsilon is not None and not all(math.isfinite(e) and e >= 0 for e in self.local_epsilon):
            problems.append(f"local_epsilon {self.local_epsilon} (finite numbers >= 0)")
        if self.unit not in _UNITS:
            problems.append(f"unit {self.unit!r} (allowed {_UNITS})")
        if problems:
            raise ValueError("invalid privacy record: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The file form (numbers as JSON numbers); fields not known are left out."""
        out = {"format": PRIVACY_FORMAT, **{k: v for k, v in asdict(self).items() if v is not None}}
        if self.local_epsilon is not None:
            out["local_epsilon"] = list(self.local_epsilon)
        return out

    def to_signed(self) -> dict[str, Any]:
        """The form signed into target metadata: TUF's canonical JSON has no floats, so
        real numbers are decimal strings (``repr``, exact round trip)."""
        def signed(v: Any) -> Any:
            return repr(v) if isinstance(v, float) else [signed(x) for x in v] if isinstance(v, list) else v

        return {k: signed(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyRecord:
        """Parse; ValueError naming what is wrong."""
        try:
            if d.get("format", PRIVACY_FORMAT) != PRIVACY_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {PRIVACY_FORMAT!r}")
            steps = d["steps"]
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise TypeError(f"steps must be an integer, got {steps!r}")
            texts = {k: d[k] for k in ("example", "base_fingerprint") if d.get(k) is not None}
            if any(not isinstance(v, str) for v in texts.values()):
                raise TypeError(f"example and base_fingerprint must be strings, got {texts}")
            clients = d.get("clients")
            if clients is not None and (isinstance(clients, bool) or not isinstance(clients, int)):
                raise TypeError(f"clients must be an integer, got {clients!r}")
            local = d.get("local_epsilon")
            if local is not None and not isinstance(local, list):
                raise TypeError(f"local_epsilon must be a list of numbers, got {local!r}")
            return cls(epsilon=_num(d, "epsilon"), delta=_num(d, "delta"), accountant=str(d["accountant"]),
                       sample_rate=_num(d, "sample_rate"), noise_multiplier=_num(d, "noise_multiplier"),
                       steps=steps, unit=str(d.get("unit", "example")),
                       examples=_num(d, "examples") if d.get("examples") is not None else None,
                       clients=clients, clip_norm=_num(d, "clip_norm") if d.get("clip_norm") is not None else None,
                       local_epsilon=None if local is None else tuple(_num({"e": e}, "e") for e in local), **texts)
        except KeyError as e:
            raise ValueError(f"privacy record lacks {e.args[0]!r}") from e
        except (TypeError, AttributeError) as e:
            raise ValueError(f"privacy record: {e}") from e
