"""lorad's private step on SmolLM2-135M against Opacus: the clipped sum of per-example LoRA
gradients of the next-token loss, for the GGUF file transformers and lorad both read.

The reference (tests/data/smollm2/dp_reference.npz, written by make_dp_reference.py next to
it with torch, transformers and opacus) is Opacus' ``grad_sample`` of hand-written LoRA
linears (rank 4, alpha 8, q_proj and v_proj of all 30 layers, A and B random) on
transformers' fp32 dequantisation of the Q4_1 weights, clipped by ``DPOptimizer`` to C, the
median of the three per-example norms (one example clipped, one not, the median one at the
boundary), no noise. Here the portable step graph (``build_step_graphs(loss="causal_lm",
private=True)``) of lorad's own import runs on the same batch, A, B and C with zero noise and
grad scale 1, with ``quantized_compute: fp32`` so that its forward multiplies by the same
dequantised weights (its backward always does).

Tolerances, with the measured values (onnxruntime 1.32.0 CPU, x86-64, 2 threads) and about 6× headroom
for other kernels and summation orders: each LoRA tensor's clipped sum within 2e-4 of that
tensor's norm (worst measured 3.3e-5, layer 7 q_proj A; median over the 120 tensors 8e-6;
the largest element difference 7e-6 of the largest element); per-example norms within
2e-5 (measured ≤ 4.2e-6); summed losses within 1e-5 (measured ≤ 6e-7). Both sides are fp32
through 30 layers with different kernels and summation orders (ONNX Runtime's MLAS against
torch's; Q4_1 dequantised as ``(q + m/d)·d`` against ``d·q + m``, a few ULP apart), so
agreement is to fp32 rounding amplified by depth, not bit-exact.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lorad.adapters.gguf_import import import_gguf
from lorad.adapters.lora import LoraWeights
from lorad.adapters.lora_graph import LoraTarget, find_targets, lora_input_names
from lorad.adapters.onnx_compat import set_quantized_compute
from lorad.trainer.portable_graph import (
    CARRIED_SUM_INPUT,
    EXAMPLE_INDEX_INPUT,
    GRAD_OUTPUT,
    LEARNING_RATE_INPUT,
    LOSS_OUTPUT,
    PARAMS_INPUT,
    build_step_graphs,
)
from tests.smollm2_files import DATA, gguf_path

pytestmark = pytest.mark.smollm2

REFERENCE = np.load(DATA / "dp_reference.npz")
META = json.loads(str(REFERENCE["meta"]))
_TENSOR_RTOL = 2e-4  # of each tensor's norm (module docstring)
_NORM_RTOL = 2e-5
_LOSS_RTOL = 1e-5  # summed over 30 counted positions: fp32 log-softmax of 49,152 logits


class _Step:
    """The private step graph of the imported model with the reference's LoRA targets."""

    def __init__(self, model: onnx.ModelProto) -> None:
        base = set_quantized_compute(model, "fp32")
        self.targets: list[LoraTarget] = find_targets(base, META["targets"])
        rank = int(META["rank"])
        self.trainable = [(name, shape) for t in self.targets
                          for name, shape in zip(lora_input_names(t.weight), ((t.in_features, rank), (rank, t.out_features)),
                                                 strict=True)]
        init = {t.weight: LoraWeights(*(REFERENCE[f"value:{name}"] for name in lora_input_names(t.weight)))
                for t in self.targets}
        graphs = build_step_graphs(
            base, self.targets, init=init, scale=float(REFERENCE["scale"]), trainable=self.trainable, output="logits",
            loss="causal_lm", label_input="labels", private=True, optimizer="sgd", weight_decay=0.0,
            reserved_inputs=["labels", "clip", "noise", "scale"], clip_norm_input="clip", noise_input="noise",
            grad_scale_input="scale")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        # No constant folding: the dequantised weights stay per-step values (test_decoder_gradients).
        self.session = ort.InferenceSession(graphs.step.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["ConstantFolding"])
        self.params = np.concatenate([REFERENCE[f"value:{name}"].ravel() for name, _ in self.trainable]).astype(np.float32)

    def run(self, rows: slice, clip: float) -> tuple[float, dict[str, np.ndarray]]:
        """(summed loss, clipped gradient sum by LoRA tensor) of the reference batch's ``rows``."""
        batch = {k: REFERENCE[k][rows] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
        n = len(batch["input_ids"])
        feeds: dict[str, np.ndarray] = {**batch, PARAMS_INPUT: self.params, "clip": np.array(clip, np.float32),
                                        "noise": np.zeros(self.params.size, np.float64), "scale": np.array(1.0, np.float32),
                                        LEARNING_RATE_INPUT: np.array(0.0, np.float32),
                                        CARRIED_SUM_INPUT: np.zeros(self.params.size, np.float64),
                                        EXAMPLE_INDEX_INPUT: np.arange(n, dtype=np.int64)}  # one window per example
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values."):
                _, heads, _, head_dim = i.shape
                feeds[i.name] = np.zeros((n, heads, 0, head_dim), np.float32)
        loss, flat = self.session.run([LOSS_OUTPUT, GRAD_OUTPUT], feeds)
        pieces = np.split(flat, np.cumsum([int(np.prod(shape)) for _, shape in self.trainable])[:-1])
        return float(loss), {name: p.reshape(shape) for (name, shape), p in zip(self.trainable, pieces, strict=True)}


@pytest.fixture(scope="module")
def step() -> _Step:
    return _Step(import_gguf(gguf_path()))


def test_the_reference_names_lorads_tensors_and_clips_one_example_of_three(step: _Step) -> None:
    named = {k.split(":", 1)[1] for k in REFERENCE.files if k.startswith("value:")}
    assert named == {name for name, _ in step.trainable}
    assert all(REFERENCE[f"clipped_sum:{name}"].shape == shape for name, shape in step.trainable)
    norms = REFERENCE["example_norms"]
    assert sorted(norms)[0] < REFERENCE["clip"] < sorted(norms)[2]
    assert (REFERENCE["attention_mask"] == 0).sum() == 3  # one right-padded row


def test_per_example_losses_and_norms_match_opacus(step: _Step) -> None:
    for n in range(3):
        loss, grads = step.run(slice(n, n + 1), 1e9)
        norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
        assert loss == pytest.approx(float(REFERENCE["example_losses"][n]), rel=_LOSS_RTOL)
        assert norm == pytest.approx(float(REFERENCE["example_norms"][n]), rel=_NORM_RTOL)


def test_private_step_clipped_sum_matches_opacus_per_tensor(step: _Step) -> None:
    loss, grads = step.run(slice(None), float(REFERENCE["clip"]))
    assert loss == pytest.approx(float(REFERENCE["loss_sum"]), rel=_LOSS_RTOL)
    worst = {}
    for name, got in grads.items():
        expected = REFERENCE[f"clipped_sum:{name}"].astype(np.float64)
        worst[name] = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    name = max(worst, key=worst.__getitem__)
    assert worst[name] <= _TENSOR_RTOL, (name, worst[name], sorted(worst.values())[-5:])
