"""lorad: an edge daemon serving a frozen ONNX base model with hot-swapped LoRA adapters,
trained on the device with differential privacy and updated over signed OTA.

The repository keeps one folder per part (``daemon/``, ``adapters/``, ``trainer/``,
``ota/``); this package links them under one name, so an install adds ``lorad`` and
nothing else to site-packages: ``lorad.daemon``, ``lorad.adapters``, ``lorad.trainer``,
``lorad.ota``.
"""

#: The one version source: pyproject.toml reads it, ``lorad --version`` and
#: ``loractl --version`` print it.
__version__ = "0.2.0.dev0"

__all__ = ["__version__"]
