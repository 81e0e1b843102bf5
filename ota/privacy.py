"""Privacy provenance of an adapter: its DP record, signed into the target, and the
device's policy on it. Pure: parsing and checking, no I/O but :func:`read_privacy_record`.

The record travels in the signed target metadata (``custom["lorad"]["privacy"]``, real
numbers as decimal strings since canonical JSON has no floats), so a device checks it
with the same trust as the payload. Where the fleet tool reads it from
(``lorad_privacy.json`` next to the PEFT files, format ``lorad-privacy/1``)::

    {"format": "lorad-privacy/1", "epsilon": 2.9, "delta": 1e-5, "accountant": "rdp",
     "sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 1200, "unit": "example"}

``unit`` is what one privacy unit is: ``example`` (per-example DP) or ``user``. A version the
device's trainer made also says what it was trained on, so the fleet can aggregate it:
``examples`` (the private estimate of the count the run was planned from, never the exact
count), ``example`` (what one example is, e.g. one submitted text of a language model) and
``base_fingerprint`` (the base model it was trained against).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UpdateRejectedError

__all__ = ["PRIVACY_FILE", "PRIVACY_FORMAT", "PrivacyRecord", "PrivacyPolicy", "read_privacy_record"]

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
        if self.unit not in _UNITS:
            problems.append(f"unit {self.unit!r} (allowed {_UNITS})")
        if problems:
            raise ValueError("invalid privacy record: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The file form (numbers as JSON numbers); fields not known are left out."""
        return {"format": PRIVACY_FORMAT, **{k: v for k, v in asdict(self).items() if v is not None}}

    def to_signed(self) -> dict[str, Any]:
        """The form signed into target metadata: TUF's canonical JSON has no floats, so
        real numbers are decimal strings (``repr``, exact round trip)."""
        return {k: repr(v) if isinstance(v, float) else v for k, v in self.to_dict().items()}

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
            return cls(epsilon=_num(d, "epsilon"), delta=_num(d, "delta"), accountant=str(d["accountant"]),
                       sample_rate=_num(d, "sample_rate"), noise_multiplier=_num(d, "noise_multiplier"),
                       steps=steps, unit=str(d.get("unit", "example")),
                       examples=_num(d, "examples") if d.get("examples") is not None else None, **texts)
        except KeyError as e:
            raise ValueError(f"privacy record lacks {e.args[0]!r}") from e
        except (TypeError, AttributeError) as e:
            raise ValueError(f"privacy record: {e}") from e


def read_privacy_record(adapter_dir: Path, explicit: Path | None = None) -> PrivacyRecord | None:
    """The record in ``explicit`` (must exist) or ``adapter_dir/lorad_privacy.json`` (optional)."""
    path = explicit if explicit is not None else Path(adapter_dir) / PRIVACY_FILE
    if not path.is_file():
        if explicit is not None:
            raise ValueError(f"--privacy-record {explicit}: no such file")
        return None
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON privacy record: {e}") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: a privacy record is a JSON object")
    try:
        return PrivacyRecord.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


@dataclass(frozen=True)
class PrivacyPolicy:
    """What a device accepts: ε at most ``max_epsilon`` (None: any); without a record only
    if ``require_record`` is False."""

    max_epsilon: float | None = None
    require_record: bool = False

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and not self.max_epsilon >= 0:
            raise ValueError(f"max_epsilon must be >= 0 (or None), got {self.max_epsilon}")

    def check(self, adapter: str, version: int, record: PrivacyRecord | None) -> None:
        """Raise UpdateRejectedError with the precise reason if the adapter may not be installed."""
        if record is None:
            if self.require_record:
                raise UpdateRejectedError("privacy_record_missing", f"{adapter} v{version} carries no "
                                          f"privacy record; ota.policy.require_privacy_record is set")
            return
        if self.max_epsilon is not None and record.epsilon > self.max_epsilon:
            raise UpdateRejectedError("privacy_budget", f"{adapter} v{version} was trained with "
                                      f"epsilon={record.epsilon:g} (delta={record.delta:g}, {record.accountant}, "
                                      f"per {record.unit}); this device allows at most "
                                      f"ota.policy.max_epsilon={self.max_epsilon:g}")
