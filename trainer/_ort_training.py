"""The one place that imports ONNX Runtime's training APIs.

Upstream microsoft/onnxruntime#22070: ``onnxruntime/training/__init__.py`` imports
``.optim``, which imports torch, so ``import onnxruntime.training.api`` fails (or drags
in torch) on a device without torch, although the on-device training API
(``api``), the artifact builder (``onnxblock``, ``artifacts``) and their native code do
not need it. We register a bare package module for ``onnxruntime.training`` carrying the
real ``__path__``/``__spec__`` so its submodules import normally while its ``__init__``
never runs. If an ``onnxruntime.training`` module is already loaded (someone imported
it with torch present), that one is used as is.

Plain ``onnxruntime`` wheels (e.g. on aarch64) ship no training APIs; then
:func:`load` raises :class:`TrainingUnavailableError` saying so.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainingUnavailableError", "OrtTraining", "load"]

_PACKAGE = "onnxruntime.training"


class TrainingUnavailableError(RuntimeError):
    """The installed onnxruntime has no on-device training APIs."""


@dataclass(frozen=True)
class OrtTraining:
    """The training modules: ``api`` (Module, Optimizer, CheckpointState), ``onnxblock``,
    ``artifacts``."""

    api: Any
    onnxblock: Any
    artifacts: Any


_loaded: OrtTraining | None = None


def _register_bare_package() -> None:
    if _PACKAGE in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or spec.submodule_search_locations is None:
        raise TrainingUnavailableError(
            "the installed onnxruntime has no training APIs (onnxruntime.training not found); "
            "install onnxruntime-training-cpu==1.19.2 on x86_64, or an onnxruntime built "
            "with --enable_training_apis (see yocto/) on other machines"
        )
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__package__ = _PACKAGE
    sys.modules[_PACKAGE] = package


def load() -> OrtTraining:
    """Import and return the training modules, or raise TrainingUnavailableError."""
    global _loaded
    if _loaded is None:
        _register_bare_package()
        try:
            api = importlib.import_module(f"{_PACKAGE}.api")
            onnxblock = importlib.import_module(f"{_PACKAGE}.onnxblock")
            artifacts = importlib.import_module(f"{_PACKAGE}.artifacts")
        except ImportError as e:
            raise TrainingUnavailableError(
                f"onnxruntime's training APIs failed to import ({e}); this onnxruntime build "
                "was made without --enable_training_apis"
            ) from e
        _loaded = OrtTraining(api=api, onnxblock=onnxblock, artifacts=artifacts)
    return _loaded
