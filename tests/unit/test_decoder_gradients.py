"""The whole LLaMA decoder differentiates: the LoRA gradients of a tiny 4-bit decoder (the graph
``lorad import-model gguf`` writes, tests/unit/test_llama_builder.py's weights) through the
portable backend's rules (RMSNorm, RoPE, grouped-query attention with its causal mask, SwiGLU,
MatMulNBits with Q4_1 block offsets) against central finite differences of the forward.

``quantized_compute: fp32``: with int8 compute the forward rounds activations to 8 bits, so
its finite differences are noise; the backward graph always multiplies by the dequantised
weights (a straight-through gradient).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from lorad.adapters.llama_builder import build_llama, past_names, position_ids_from_mask
from lorad.adapters.lora_graph import find_targets, lora_input_names, make_inference_graph
from lorad.adapters.onnx_compat import set_quantized_compute
from lorad.trainer.autodiff import Emitter, backward, graph_constants, infer_tensor_infos
from tests.unit.test_llama_builder import CFG, _tiny


def test_lora_gradients_through_a_4bit_decoder_match_finite_differences() -> None:
    weights, _ = _tiny(3)
    base = set_quantized_compute(build_llama(CFG, weights), "fp32")
    targets = find_targets(base, ["q_proj", "v_proj", "o_proj", "down_proj"])
    model = make_inference_graph(base, targets, rank=2)
    e = Emitter("grad", 17, infer_tensor_infos(model), graph_constants(model.graph))
    sources = [name for t in targets for name in lora_input_names(t.weight)]
    grads = backward(model.graph, e, {"logits": "seed"}, sources, differentiate_sources=True)
    g = model.graph
    outputs = [f"grad.{s}" for s in sources]
    graph = helper.make_graph(
        [*g.node, *e.nodes, *[helper.make_node("Identity", [grads[s]], [f"grad.{s}"]) for s in sources]], "decoder_grad",
        [*g.input, helper.make_tensor_value_info("seed", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], [*g.initializer, *e.initializers])
    grad_model = helper.make_model(graph, opset_imports=list(model.opset_import))
    grad_model.ir_version = 9
    # No constant folding: the dequantised weights stay per-step values (the rule's docstring).
    backward_session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["ConstantFolding"])
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    ids = np.array([[3, 17, 5, 42, 9, 0, 33], [8, 8, 2, 11, 40, 7, 1]])
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: the mask and positions take part
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, ids.shape[1])}
    for i in range(CFG.num_hidden_layers):
        for name in past_names(i):
            feeds[name] = np.zeros((2, CFG.num_key_value_heads, 0, CFG.head_dim), np.float32)
    lora = {}
    for t in targets:
        a, b = lora_input_names(t.weight)
        lora[a] = rng.normal(0, 0.3, (t.in_features, 2)).astype(np.float32)
        lora[b] = rng.normal(0, 0.3, (2, t.out_features)).astype(np.float32)
    seed = (rng.normal(size=(2, ids.shape[1], CFG.vocab_size)) * mask[..., None]).astype(np.float32)
    got = dict(zip(sources, backward_session.run(outputs, {**feeds, **lora, "seed": seed}), strict=True))

    def loss(values: dict[str, np.ndarray]) -> float:
        return float(np.sum(forward.run(["logits"], {**feeds, **values})[0].astype(np.float64) * seed))

    for name in sources:
        assert got[name].shape == lora[name].shape
        for _ in range(2):
            v = rng.normal(size=lora[name].shape).astype(np.float32)
            v /= np.linalg.norm(v)
            h = 1e-2  # fp32 forward: a step long enough for its rounding, short for the curvature
            fd = (loss({**lora, name: lora[name] + h * v}) - loss({**lora, name: lora[name] - h * v})) / (2 * h)
            analytic = float(np.sum(got[name].astype(np.float64) * v))
            assert abs(analytic - fd) <= 2e-2 * max(1.0, abs(fd)), (name, analytic, fd)
