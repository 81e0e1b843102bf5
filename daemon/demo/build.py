"""Build the embedded demo model and its adapters: ``python -m lorad.daemon.demo.build [--out DIR]``.

Reproducible from data that ships with scikit-learn (extra ``demo``), with plain numpy,
in a few seconds on one core. The steps, one function each:

1. :func:`load_split` – the digits data set, pixels scaled to 0..1, a seeded 80/20 split;
2. :func:`train_base_model` – the MLP ``64 → 128 → 128 → 10`` (ReLU), Adam on
   cross-entropy, float64;
3. :func:`make_onnx_model` – the float32 ONNX graph (``MatMul`` + ``Add`` per layer,
   initializers named ``fc1.weight`` … ``head.bias``), IR 9, opset 17;
4. :func:`train_adapter` – per :data:`DEMO_TASKS`, LoRA ``A``/``B`` on every target with
   the base frozen, forward ``y = x·W + (alpha/r)·(x·A)·B``;
5. :func:`accuracy` – measured on the float32 weights that ship, recorded in the model's
   ``metadata_props``;
6. :func:`write_artifacts` – ``demo_model.onnx`` and ``adapters/<name>/`` as PEFT files.

Every random draw comes from generators seeded by :data:`SEED` and the step's name, so a
rebuild reproduces the same weights and accuracies (bit for bit on the same CPU and
numpy; BLAS kernels of other CPUs may round differently).
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lorad.adapters.fsutil import atomic_write_bytes
from lorad.adapters.lora import LoraAdapter, LoraWeights, lora_scale
from lorad.adapters.lora_graph import find_targets, fingerprint
from lorad.adapters.onnx_compat import MAX_IR_VERSION, OPSET
from lorad.adapters.peft_format import save_peft

from . import DEMO_RANK, DEMO_TARGETS

__all__ = [
    "SEED",
    "DigitsSplit",
    "DemoTask",
    "DEMO_TASKS",
    "BuildResult",
    "load_split",
    "train_base_model",
    "make_onnx_model",
    "train_adapter",
    "accuracy",
    "write_artifacts",
    "build",
    "main",
]

SEED = 0
TEST_FRACTION = 0.2
HIDDEN = 128
BATCH_SIZE = 64
BASE_EPOCHS = 40
BASE_LEARNING_RATE = 1e-3
ADAPTER_EPOCHS = 40
ADAPTER_LEARNING_RATE = 3e-3
#: alpha = ALPHA_PER_RANK · r, so every adapter has scale alpha/r = 2.
ALPHA_PER_RANK = 2.0

#: (module name, in features, out features) in graph order; the last one has no ReLU.
_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("fc1", 64, HIDDEN),
    ("fc2", HIDDEN, HIDDEN),
    ("head", HIDDEN, 10),
)
_INPUT = "pixels"
_LOGITS = "logits"
_PROBABILITIES = "probabilities"
_MODEL_FILE = "demo_model.onnx"
_ADAPTERS_DIR = "adapters"

Params = dict[str, np.ndarray]
#: Per target weight name: (A [in, r], B [r, out], scale).
_LoraPaths = Mapping[str, tuple[np.ndarray, np.ndarray, float]]


@dataclass(frozen=True)
class DigitsSplit:
    """Pixels float64 [n, 64] in 0..1 and labels int64 [n]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _mirror_pixels(x: np.ndarray) -> np.ndarray:
    """Mirror each 8×8 image left to right."""
    return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)


def _invert_pixels(x: np.ndarray) -> np.ndarray:
    """White on black instead of black on white."""
    return 1.0 - x


def _plus_one(y: np.ndarray) -> np.ndarray:
    return (y + 1) % 10


def _unchanged(a: np.ndarray) -> np.ndarray:
    return a


@dataclass(frozen=True)
class DemoTask:
    """What a demo adapter learns: a change of the inputs and/or of the labels."""

    name: str
    description: str
    rank: int
    pixels: Callable[[np.ndarray], np.ndarray]
    labels: Callable[[np.ndarray], np.ndarray]

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.pixels(x), self.labels(y)


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("mirror", "reads digits mirrored left to right", DEMO_RANK, _mirror_pixels, _unchanged),
    DemoTask("plus-one", "answers (digit + 1) mod 10", DEMO_RANK, _unchanged, _plus_one),
    DemoTask("invert", "reads white-on-black digits (rank 2: zero-padded to the slot rank)", 2, _invert_pixels, _unchanged),
)


@dataclass(frozen=True)
class BuildResult:
    model_path: Path
    adapter_dirs: dict[str, Path]
    metadata: dict[str, str]
    seconds: float


def _rng(step: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(step.encode())])


def load_split() -> DigitsSplit:
    """scikit-learn's bundled digits (grey levels 0..16) scaled to 0..1; seeded 80/20 split."""
    from sklearn.datasets import load_digits  # only the builder (and its tests) need sklearn

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    order = _rng("split").permutation(len(y))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(x[train], y[train], x[test], y[test])


def _forward(params: Params, x: np.ndarray, lora: _LoraPaths) -> list[np.ndarray]:
    """Activations ``[x, h1, h2, logits]`` (each layer's input, then the logits)."""
    acts = [x]
    h = x
    for name, _, _ in _LAYERS:
        weight = f"{name}.weight"
        z = h @ params[weight] + params[f"{name}.bias"]
        if weight in lora:
            a, b, scale = lora[weight]
            z = z + scale * ((h @ a) @ b)
        h = z if name == "head" else np.maximum(z, 0.0)
        acts.append(h)
    return acts


def _cross_entropy_grad(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean cross-entropy with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p / len(y)


def _backward(params: Params, acts: Sequence[np.ndarray], grad: np.ndarray, lora: _LoraPaths) -> Params:
    """Gradients of every base parameter and of every LoRA ``<weight>.A`` / ``<weight>.B``."""
    grads: Params = {}
    for index in reversed(range(len(_LAYERS))):
        name = _LAYERS[index][0]
        weight = f"{name}.weight"
        h = acts[index]
        if name != "head":
            grad = grad * (acts[index + 1] > 0)
        grads[weight] = h.T @ grad
        grads[f"{name}.bias"] = grad.sum(axis=0)
        grad_in = grad @ params[weight].T
        if weight in lora:
            a, b, scale = lora[weight]
            grad_xa = scale * (grad @ b.T)
            grads[f"{weight}.A"] = h.T @ grad_xa
            grads[f"{weight}.B"] = scale * ((h @ a).T @ grad)
            grad_in = grad_in + grad_xa @ a.T
        grad = grad_in
    return grads


class _Adam:
    def __init__(self, params: Params, learning_rate: float) -> None:
        self._lr = learning_rate
        self._m = {k: np.zeros_like(v) for k, v in params.items()}
        self._v = {k: np.zeros_like(v) for k, v in params.items()}
        self._t = 0

    def step(self, params: Params, grads: Mapping[str, np.ndarray]) -> None:
        """Update ``params`` in place; gradients of other tensors (the frozen ones) are ignored."""
        self._t += 1
        beta1, beta2 = 0.9, 0.999
        for k, p in params.items():
            g = grads[k]
            self._m[k] = beta1 * self._m[k] + (1 - beta1) * g
            self._v[k] = beta2 * self._v[k] + (1 - beta2) * g * g
            m_hat = self._m[k] / (1 - beta1**self._t)
            v_hat = self._v[k] / (1 - beta2**self._t)
            p -= self._lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def _minibatches(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + BATCH_SIZE] for i in range(0, n, BATCH_SIZE)]


def train_base_model(split: DigitsSplit) -> Params:
    """The MLP's weights ([in, out]) and biases, float64, He-initialised, trained with Adam."""
    rng = _rng("base")
    params: Params = {}
    for name, n_in, n_out in _LAYERS:
        params[f"{name}.weight"] = rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out))
        params[f"{name}.bias"] = np.zeros(n_out)
    optimizer = _Adam(params, BASE_LEARNING_RATE)
    for _ in range(BASE_EPOCHS):
        for batch in _minibatches(len(split.y_train), rng):
            acts = _forward(params, split.x_train[batch], {})
            grad = _cross_entropy_grad(acts[-1], split.y_train[batch])
            optimizer.step(params, _backward(params, acts, grad, {}))
    return params


def _shipped(params: Params) -> Params:
    """The float32 weights as they are stored in the ONNX file."""
    return {k: v.astype(np.float32) for k, v in params.items()}


def make_onnx_model(params: Params, metadata: Mapping[str, str] = {}) -> onnx.ModelProto:
    """``pixels [N, 64] → logits [N, 10], probabilities [N, 10]``; one MatMul + Add per layer."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    h = _INPUT
    for name, _, _ in _LAYERS:
        weight, bias = f"{name}.weight", f"{name}.bias"
        initializers.append(numpy_helper.from_array(np.asarray(params[weight], np.float32), weight))
        initializers.append(numpy_helper.from_array(np.asarray(params[bias], np.float32), bias))
        nodes.append(helper.make_node("MatMul", [h, weight], [f"{name}/matmul"], name=f"{name}/MatMul"))
        out = _LOGITS if name == "head" else f"{name}/add"
        nodes.append(helper.make_node("Add", [f"{name}/matmul", bias], [out], name=f"{name}/Add"))
        if name != "head":
            nodes.append(helper.make_node("Relu", [out], [f"{name}/relu"], name=f"{name}/Relu"))
            out = f"{name}/relu"
        h = out
    nodes.append(helper.make_node("Softmax", [_LOGITS], [_PROBABILITIES], name="Softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "lorad_demo_digits_mlp",
        [helper.make_tensor_value_info(_INPUT, TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info(_LOGITS, TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info(_PROBABILITIES, TensorProto.FLOAT, ["N", 10]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lorad daemon.demo.build",
        doc_string="lorad demo: 8x8 digit classifier (scikit-learn digits), MLP 64-128-128-10",
    )
    model.ir_version = MAX_IR_VERSION
    helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    return model


def train_adapter(base: Params, task: DemoTask, split: DigitsSplit, base_fingerprint: str) -> LoraAdapter:
    """LoRA of rank ``task.rank`` on every target, the base frozen; float32 for shipping.

    A starts random and B at zero (as PEFT does), so training starts from the base model.
    """
    rng = _rng(f"adapter/{task.name}")
    alpha = ALPHA_PER_RANK * task.rank
    scale = lora_scale(alpha, task.rank, use_rslora=False)
    lora_params: Params = {}
    for name, n_in, n_out in _LAYERS:
        lora_params[f"{name}.weight.A"] = rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, task.rank))
        lora_params[f"{name}.weight.B"] = np.zeros((task.rank, n_out))
    optimizer = _Adam(lora_params, ADAPTER_LEARNING_RATE)
    x, y = task.apply(split.x_train, split.y_train)
    for _ in range(ADAPTER_EPOCHS):
        for batch in _minibatches(len(y), rng):
            paths = {w: (lora_params[f"{w}.A"], lora_params[f"{w}.B"], scale) for w in _target_weights()}
            acts = _forward(base, x[batch], paths)
            grad = _cross_entropy_grad(acts[-1], y[batch])
            optimizer.step(lora_params, _backward(base, acts, grad, paths))
    weights = {
        w: LoraWeights(lora_params[f"{w}.A"].astype(np.float32), lora_params[f"{w}.B"].astype(np.float32))
        for w in _target_weights()
    }
    return LoraAdapter(rank=task.rank, alpha=alpha, weights=weights, base_fingerprint=base_fingerprint)


def _target_weights() -> list[str]:
    return [f"{name}.weight" for name, _, _ in _LAYERS]


def accuracy(params: Params, x: np.ndarray, y: np.ndarray, adapter: LoraAdapter | None = None) -> float:
    """Share of correct argmax predictions, computed in float32 as the daemon serves."""
    shipped = _shipped(params)
    paths: _LoraPaths = {}
    if adapter is not None:
        paths = {w: (lw.A, lw.B, adapter.scale) for w, lw in adapter.weights.items()}
    logits = _forward(shipped, x.astype(np.float32), paths)[-1]
    return float(np.mean(logits.argmax(axis=1) == y))


def write_artifacts(
    model: onnx.ModelProto, adapters: Mapping[str, LoraAdapter], out_dir: Path
) -> tuple[Path, dict[str, Path]]:
    """``out_dir/demo_model.onnx`` and ``out_dir/adapters/<name>/`` (PEFT), written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / _MODEL_FILE
    atomic_write_bytes(model_path, model.SerializeToString())
    adapter_dirs: dict[str, Path] = {}
    for name, adapter in adapters.items():
        directory = out_dir / _ADAPTERS_DIR / name
        save_peft(adapter, directory)
        adapter_dirs[name] = directory
    return model_path, adapter_dirs


def build(out_dir: Path) -> BuildResult:
    """Run every step and write the model and its adapters into ``out_dir``."""
    started = time.perf_counter()
    split = load_split()
    base = train_base_model(split)
    bare = make_onnx_model(base)
    base_fingerprint = fingerprint(bare, find_targets(bare, DEMO_TARGETS))
    metadata = {
        "lorad.demo.data": "sklearn.datasets.load_digits, pixels = grey level / 16",
        "lorad.demo.seed": str(SEED),
        "lorad.demo.test_images": str(len(split.y_test)),
        "lorad.demo.test_accuracy": f"{accuracy(base, split.x_test, split.y_test):.4f}",
        "lorad.demo.adapters": ",".join(t.name for t in DEMO_TASKS),
    }
    adapters: dict[str, LoraAdapter] = {}
    for task in DEMO_TASKS:
        adapter = train_adapter(base, task, split, base_fingerprint)
        x_test, y_test = task.apply(split.x_test, split.y_test)
        prefix = f"lorad.demo.adapter.{task.name}"
        metadata[f"{prefix}.task"] = task.description
        metadata[f"{prefix}.rank"] = str(task.rank)
        metadata[f"{prefix}.base_accuracy"] = f"{accuracy(base, x_test, y_test):.4f}"
        metadata[f"{prefix}.accuracy"] = f"{accuracy(base, x_test, y_test, adapter):.4f}"
        # Carried in the safetensors header, so `loractl inspect` can say what it does.
        adapters[task.name] = replace(adapter, extra={"lorad.demo.task": task.description})
    model_path, adapter_dirs = write_artifacts(make_onnx_model(base, metadata), adapters, out_dir)
    return BuildResult(model_path, adapter_dirs, metadata, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorad.daemon.demo.build", description="Build the embedded demo model and its adapters.")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory for demo_model.onnx and adapters/ (default: the daemon.demo package)",
    )
    args = parser.parse_args(argv)
    result = build(args.out)
    for key, value in result.metadata.items():
        print(f"{key} = {value}")
    print(f"wrote {result.model_path} and {len(result.adapter_dirs)} adapters in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
