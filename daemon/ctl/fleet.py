"""``loractl fleet ...``: the fleet's OTA tools (root of trust, publish, keys, commands,
status), defined in :mod:`lorad.ota.cli` so they work without a daemon. This module gives
them what only the daemon knows: how to read a device's ``lorad.yaml`` (``publish --config``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorad.ota.cli import ModelSection
from lorad.ota.cli import register as _register

__all__ = ["register", "model_section"]


def model_section(path: Path) -> ModelSection:
    """The model section of the device config at ``path``, as the daemon reads it.

    Only ``model:`` is validated: the other sections name device files (TLS keys, the
    trusted root) that the fleet machine does not have. Raises ValueError (the config
    error, naming the key) for a bad file.
    """
    import yaml

    from lorad.daemon.config import ConfigError, _ConfigLoader, build_config
    from lorad.daemon.demo import demo_model_path

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)
    except OSError as e:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError("", f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {str(path)!r} must be a mapping of sections")
    model = build_config({"model": data.get("model") or {}}, base_dir=path.absolute().parent, environ={}).model
    return ModelSection(
        path=model.path if model.path is not None else demo_model_path(),
        targets=tuple(model.targets),
        rank=model.rank,
        weight_names=dict(model.weight_names),
        quantized_compute=model.quantized_compute,
    )


def register(sub: argparse._SubParsersAction) -> None:
    from lorad.daemon.ctl.federate import register_federate

    _register(sub, model_loader=model_section, extend=register_federate)
