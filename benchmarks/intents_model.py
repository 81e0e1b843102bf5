"""The examples/intents base model, built as a user builds it (shared by the matrix tests
and the personalisation benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTENTS = REPO / "examples" / "intents"
#: Where benchmarks keep what they build once (``LORAD_BENCH_CACHE``).
CACHE = Path(os.environ.get("LORAD_BENCH_CACHE", Path.home() / ".cache" / "lorad-bench"))

__all__ = ["INTENTS", "CACHE", "build_intents_model", "cached_intents_model"]


def build_intents_model(out: Path) -> Path:
    """``examples/intents/build.py --out OUT`` (MiniLM imported without torch, the intents
    head fitted), unless ``out`` exists."""
    if not out.is_file():
        done = subprocess.run([sys.executable, str(INTENTS / "build.py"), "--out", str(out),
                               "--data", str(out.parent / "data")], capture_output=True, text=True, timeout=900,
                              cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"examples/intents/build.py failed:\n{done.stderr}")
    return out


def cached_intents_model() -> Path:
    """The examples/intents model, built once into :data:`CACHE`."""
    return build_intents_model(CACHE / "intents" / "intents.onnx")
