"""The device's policy on an adapter's privacy record (:mod:`lorad.adapters.privacy_record`:
the record, signed into a fleet update's target metadata), and reading the record a fleet
tool publishes (``lorad_privacy.json`` next to the PEFT files). Pure: parsing and checking,
no I/O but :func:`read_privacy_record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorad.adapters.privacy_record import PRIVACY_FILE, PRIVACY_FORMAT, PrivacyRecord

from .errors import UpdateRejectedError

__all__ = ["PRIVACY_FILE", "PRIVACY_FORMAT", "PrivacyRecord", "PrivacyPolicy", "read_privacy_record"]


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
