"""lorad's version, from the installed distribution's metadata (one place: pyproject.toml)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["lorad_version", "ort_version"]


def lorad_version() -> str:
    try:
        return metadata.version("lorad")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


def ort_version() -> str:
    """The onnxruntime distribution's version, without importing it (loractl stays quick)."""
    for dist in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu", "onnxruntime"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "none"
