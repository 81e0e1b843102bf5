"""Keep ONNX files loadable by the ONNX Runtime versions lorad runs on.

onnx >= 1.17 stamps new models with IR versions that ONNX Runtime 1.19 (the last
release with the on-device training APIs on PyPI) rejects, so every model lorad writes or
derives goes through :func:`for_runtime`.
"""

from __future__ import annotations

import onnx

__all__ = ["MAX_IR_VERSION", "OPSET", "for_runtime"]

MAX_IR_VERSION = 9
OPSET = 17


def for_runtime(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version in place to one the runtime accepts, and return the model."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model
