"""The examples/intents base model, built as a user builds it (shared by the matrix tests
and the personalisation benchmark)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTENTS = REPO / "examples" / "intents"

__all__ = ["INTENTS", "build_intents_model"]


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
