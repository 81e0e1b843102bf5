"""lorad's own reverse-mode differentiation of ONNX graphs (the portable training backend).

:mod:`.emitter` writes typed nodes, :mod:`.rules` holds one gradient rule per op,
:mod:`.backward` walks a graph backwards with them.
"""

from .backward import backward, graph_constants, requires_grad
from .emitter import Emitter, TensorInfo, infer_tensor_infos
from .rules import RULES, UnsupportedNodeError

__all__ = ["backward", "graph_constants", "requires_grad", "Emitter", "TensorInfo", "infer_tensor_infos", "RULES",
           "UnsupportedNodeError"]
