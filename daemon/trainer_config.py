"""The ``trainer:`` section of the daemon config, parsed by :mod:`trainer.config`.

A separate small module so that :mod:`daemon.config` can import and register it at its
top without importing the HTTP layer (loractl reads the config too and stays quick to
start); it imports :mod:`daemon.config` only when called, so there is no import cycle.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

from trainer.config import TrainerConfig, TrainerConfigError, parse_trainer_section

if TYPE_CHECKING:
    from daemon.config import ParseContext, SectionReader

__all__ = ["trainer_section"]


def trainer_section(r: SectionReader, ctx: ParseContext) -> TrainerConfig:
    """The ``trainer`` entry of :data:`daemon.config.SECTIONS`."""
    # Hand over exactly the keys the trainer knows; the reader's finish() names any other.
    data = {f.name: r.raw(f.name) for f in fields(TrainerConfig)}
    try:
        return parse_trainer_section({k: v for k, v in data.items() if v is not None}, prefix="trainer")
    except TrainerConfigError as e:
        from daemon.config import ConfigError

        raise ConfigError(e.key, e.detail) from None
