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
from lorad.adapters.lora import LoraWeights
from lorad.adapters.lora_graph import find_targets, lora_input_names, make_inference_graph
from lorad.adapters.onnx_compat import set_quantized_compute
from lorad.trainer.autodiff import Emitter, backward, graph_constants, infer_tensor_infos
from lorad.trainer.portable_graph import (
    CARRIED_SUM_INPUT,
    EXAMPLE_INDEX_INPUT,
    GRAD_OUTPUT,
    IGNORED_LABEL,
    LEARNING_RATE_INPUT,
    LOSS_OUTPUT,
    PARAMS_INPUT,
    build_step_graphs,
)
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


def _lm_batch(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    """Left-padded token windows and their next-token labels (-100 where nothing counts)."""
    ids = rng.integers(0, CFG.vocab_size, (rows, length))
    mask = np.ones_like(ids)
    for r in range(rows):
        mask[r, : r % 3] = 0
    labels = np.full_like(ids, IGNORED_LABEL)
    counted = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    labels[:, :-1][counted] = ids[:, 1:][counted]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, length),
             "labels": labels}
    for i in range(CFG.num_hidden_layers):
        for name in past_names(i):
            feeds[name] = np.zeros((rows, CFG.num_key_value_heads, 0, CFG.head_dim), np.float32)
    return feeds


def test_a_private_step_of_next_token_loss_clips_each_example_of_a_4bit_decoder() -> None:
    """The portable DP step on a decoder with the causal LM loss: its clipped sum is
    Σ_n min(1, C/‖G_n‖)·G_n with G_n each example's gradient alone (an example of two
    windows clipped as one), and the unclipped sum is the gradient of the summed loss
    (finite differences of the eval graph)."""
    weights, _ = _tiny(4)
    base = set_quantized_compute(build_llama(CFG, weights), "fp32")
    targets = find_targets(base, ["q_proj", "v_proj"])
    rng = np.random.default_rng(1)
    init = {t.weight: LoraWeights(rng.normal(0, 0.2, (t.in_features, 2)).astype(np.float32),
                                  rng.normal(0, 0.2, (2, t.out_features)).astype(np.float32)) for t in targets}
    trainable = [(name, shape) for t in targets
                 for name, shape in zip(lora_input_names(t.weight), ((t.in_features, 2), (2, t.out_features)), strict=True)]
    graphs = build_step_graphs(
        base, targets, init=init, scale=2.0, trainable=trainable, output="logits", loss="causal_lm", label_input="labels",
        private=True, optimizer="sgd", weight_decay=0.0, reserved_inputs=["labels", "clip", "noise", "scale"],
        clip_norm_input="clip", noise_input="noise", grad_scale_input="scale")
    options = ort.SessionOptions()
    step = ort.InferenceSession(graphs.step.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ConstantFolding"])
    evaluate = ort.InferenceSession(graphs.eval.SerializeToString(), options, providers=["CPUExecutionProvider"])
    params = np.concatenate([init[t.weight].A.ravel().tolist() + init[t.weight].B.ravel().tolist() for t in targets])
    params = params.astype(np.float32)
    total = params.size

    def gradient(batch: dict[str, np.ndarray], clip: float) -> np.ndarray:
        feeds = {**batch, PARAMS_INPUT: params, "clip": np.array(clip, np.float32), "noise": np.zeros(total, np.float64),
                 "scale": np.array(1.0, np.float32), LEARNING_RATE_INPUT: np.array(0.0, np.float32),
                 CARRIED_SUM_INPUT: np.zeros(total, np.float64)}
        return step.run([GRAD_OUTPUT], feeds)[0].astype(np.float64)

    batch = _lm_batch(rng, 6, 9)
    # Six windows, four examples (texts): windows 1-2 and 4-5 are one text each.
    batch[EXAMPLE_INDEX_INPUT] = np.array([0, 1, 1, 2, 3, 3])
    rows_of = [[0], [1, 2], [3], [4, 5]]
    alone = [gradient({**{k: v[r] for k, v in batch.items() if k != EXAMPLE_INDEX_INPUT},
                       EXAMPLE_INDEX_INPUT: np.zeros(len(r), np.int64)}, 1e9) for r in rows_of]
    norms = [float(np.linalg.norm(g)) for g in alone]
    clip = float(np.median(norms))  # some examples clipped, some not
    expected = sum(min(1.0, clip / (nrm + 1e-6)) * g for g, nrm in zip(alone, norms, strict=True))
    np.testing.assert_allclose(gradient(batch, clip), expected, rtol=2e-4, atol=2e-5 * max(norms))
    unclipped = gradient(batch, 1e9)
    np.testing.assert_allclose(unclipped, sum(alone), rtol=2e-4, atol=2e-5 * max(norms))

    def loss(p: np.ndarray) -> float:
        return float(evaluate.run([LOSS_OUTPUT], {**batch, PARAMS_INPUT: p.astype(np.float32)})[0])

    for _ in range(3):
        v = rng.normal(size=total)
        v /= np.linalg.norm(v)
        fd = (loss(params + 1e-2 * v) - loss(params - 1e-2 * v)) / 2e-2
        assert abs(float(unclipped @ v) - fd) <= 2e-2 * max(1.0, abs(fd)), (float(unclipped @ v), fd)
