"""Small ONNX models and random adapters for the adapters/ unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lorad.adapters.lora import LoraAdapter, LoraWeights
from lorad.adapters.lora_graph import LoraTarget


def tiny_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [N, 3, 6] → MatMul(fc1, 3-D) → Relu → Reshape [N*3, 5] → Gemm(fc2, transB=1, alpha=0.5, bias)."""
    rng = np.random.default_rng(seed)
    w = {
        "fc1.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "fc2.weight": rng.normal(size=(4, 5)).astype(np.float32),  # [out, in]: transB=1
        "fc2.bias": rng.normal(size=(4,)).astype(np.float32),
        "shape": np.array([-1, 5], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["r2"]),
        helper.make_node("Gemm", ["r2", "fc2.weight", "fc2.bias"], ["y"], transB=1, alpha=0.5, beta=1.0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model, w


def tiny_reference(w: dict[str, np.ndarray], x: np.ndarray, adapter: LoraAdapter | None) -> np.ndarray:
    """numpy reference of the tiny model with ``x·W + s·(x·A)·B`` on each target."""

    def delta(name: str, inp: np.ndarray) -> np.ndarray:
        if adapter is None or name not in adapter.weights:
            return np.zeros(1, np.float32)
        lw = adapter.weights[name]
        return adapter.scale * (inp @ lw.A) @ lw.B

    h = x @ w["fc1.weight"] + delta("fc1.weight", x)
    r = np.maximum(h, 0).reshape(-1, 5)
    return 0.5 * (r @ w["fc2.weight"].T + delta("fc2.weight", r)) + w["fc2.bias"]


def random_adapter(
    targets: list[LoraTarget], fingerprint: str, *, rank: int, seed: int = 1, alpha: float = 8.0, scale: float = 1.0
) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    return LoraAdapter(
        rank=rank,
        alpha=alpha,
        base_fingerprint=fingerprint,
        weights={
            t.weight: LoraWeights(
                (rng.normal(size=(t.in_features, rank)) * scale).astype(np.float32),
                (rng.normal(size=(rank, t.out_features)) * scale).astype(np.float32),
            )
            for t in targets
        },
    )


def serving_cases() -> dict[str, tuple[onnx.ModelProto, list[str], dict[str, np.ndarray]]]:
    """Models whose LoRA paths differ in form, with their target patterns and inputs: ``tiny``
    (Gemm with transB and alpha, weights stored [out, in]; a flattened input), ``demo`` (2-D
    MatMul + bias) and ``encoder`` (q/k/v sharing an input; MatMul + bias on 3-D rows)."""
    from benchmarks.reference_encoder import REFERENCE_TARGETS, build_reference_encoder
    from lorad.daemon.demo import DEMO_TARGETS, demo_model_path

    rng = np.random.default_rng(0)
    return {
        "tiny": (tiny_model()[0], ["fc*"], {"x": rng.normal(size=(2, 3, 6)).astype(np.float32)}),
        "demo": (onnx.load(str(demo_model_path())), list(DEMO_TARGETS), {"pixels": rng.random((3, 64), dtype=np.float32)}),
        "encoder": (build_reference_encoder(), REFERENCE_TARGETS, {"x": rng.normal(size=(2, 16, 384)).astype(np.float32)}),
    }
