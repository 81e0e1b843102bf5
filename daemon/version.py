"""lorad's version (one source, ``lorad.__version__``, which pyproject.toml reads too) and ONNX Runtime's."""

from __future__ import annotations

from lorad import __version__

__all__ = ["lorad_version", "ort_version"]


def lorad_version() -> str:
    return __version__


def ort_version() -> str:
    """The onnxruntime distribution's version, without importing it (loractl stays quick)."""
    from importlib import metadata  # scans the installed distributions: only for --version

    for dist in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu", "onnxruntime"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "none"
