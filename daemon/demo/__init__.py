"""The embedded default model ``demo``: what lorad serves when given no configuration.

The model
    A small classifier of handwritten digits, trained on scikit-learn's bundled digits
    data set (1797 images of 8×8 pixels, offline, no download). It is a multi-layer
    perceptron ``64 → 128 → 128 → 10`` with ReLU::

        pixels  float32 [N, 64]   the 8×8 image row by row, grey levels scaled to 0..1
          fc1   MatMul fc1.weight [64, 128]  + fc1.bias  → Relu
          fc2   MatMul fc2.weight [128, 128] + fc2.bias  → Relu
          head  MatMul head.weight [128, 10] + head.bias → logits
        logits         float32 [N, 10]   one score per digit 0..9
        probabilities  float32 [N, 10]   Softmax of the logits

    The weights are stored as ``MatMul`` initializers in ``[in, out]`` orientation and
    named after a torch module tree (``fc1.weight``, ``head.bias``, …), so PEFT module
    names (``base_model.model.fc1``) map onto them. The file's ``metadata_props`` record
    how it was made and the accuracies measured when it was built (keys
    ``lorad.demo.*``).

The demo adapters
    LoRA adapters on the three linear weights (:data:`DEMO_TARGETS`), shipped as PEFT
    files (``adapter_model.safetensors`` + ``adapter_config.json``) under
    ``adapters/<name>/``. Each teaches the frozen base model a task it fails at:

    ``mirror`` (rank 8)
        digits mirrored left to right; the base model reads them poorly, the adapter
        recovers them.
    ``plus-one`` (rank 8)
        answers ``(digit + 1) mod 10`` for ordinary images, so every prediction moves.
    ``invert`` (rank 2)
        white-on-black images (``1 - pixels``); being of rank 2 it is zero-padded to the
        slot rank :data:`DEMO_RANK` when served.

Everything here is produced by ``python -m lorad.daemon.demo.build`` (see
:mod:`lorad.daemon.demo.build`), deterministically from a fixed seed; the unit tests rebuild
it and compare with what ships.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = [
    "DEMO_MODEL_NAME",
    "DEMO_TARGETS",
    "DEMO_RANK",
    "demo_model_path",
    "demo_adapter_dirs",
]

#: The name under which the daemon serves the embedded model.
DEMO_MODEL_NAME = "demo"
#: LoRA target patterns over the demo model's weight names (PEFT ``target_modules`` style).
DEMO_TARGETS: tuple[str, ...] = ("fc*.weight", "head.weight")
#: Slot rank the demo model is served with; the demo adapters have this rank or less.
DEMO_RANK = 8

_MODEL_FILE = "demo_model.onnx"
_ADAPTERS_DIR = "adapters"
_PEFT_CONFIG = "adapter_config.json"


def _package_dir() -> Path:
    root = resources.files(__name__)
    if not isinstance(root, Path):
        raise RuntimeError(
            f"lorad.daemon.demo is installed as {root!r}, not as files on disk; "
            "install lorad as a regular (unzipped) package to use the embedded model"
        )
    return root


def demo_model_path() -> Path:
    """Path of the embedded base model ``demo_model.onnx``."""
    return _package_dir() / _MODEL_FILE


def demo_adapter_dirs() -> dict[str, Path]:
    """The demo adapters by name, each a directory of PEFT files, sorted by name."""
    root = _package_dir() / _ADAPTERS_DIR
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if (d / _PEFT_CONFIG).is_file()}
