"""The models of the capability × model matrix, as data: every model lorad claims to serve.

Each :class:`ModelCase` says how to serve the model (its ``model:`` config section, built
from files the repository ships or makes), which PEFT adapter made with real peft belongs
to it and what torch + peft answered with it (reference values committed with the script
that made them), and how a user gives it one training example. The matrix test
(tests/integration/test_model_matrix.py) runs every capability on every case; a model
added here enters every row without new test code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.intents_model import INTENTS, build_intents_model
from lorad.adapters.peft_format import load_peft, read_peft_dir
from lorad.daemon.demo import DEMO_RANK, DEMO_TARGETS, demo_adapter_dirs, demo_model_path

REPO = Path(__file__).resolve().parents[1]
EXPORTED = REPO / "tests" / "data" / "exported"
MINILM = REPO / "tests" / "data" / "minilm"

__all__ = ["ModelCase", "MODEL_CASES"]


@dataclass(frozen=True)
class ModelCase:
    """One model of the matrix (see the module docstring)."""

    id: str
    #: ``model:`` section for a daemon whose scratch directory is the argument.
    model_section: Callable[[Path], dict[str, Any]]
    #: The served interface's input tensors (OIP JSON) of the reference rows.
    inputs: list[dict[str, Any]]
    rows: int
    #: The output the references are of, and its values without and with ``peft_dir``.
    output: str
    base: np.ndarray
    adapted: np.ndarray
    peft_dir: Path
    #: JSON bodies of ``POST …/examples``, one per example, from a seeded generator.
    examples: Callable[[np.random.Generator, int], list[dict[str, Any]]]
    atol: float = 1e-4
    #: ``trainer.defaults`` a user of this model sets (e.g. a sequence length its position
    #: table allows: lorad refuses, before charging, one it cannot score).
    training: dict[str, Any] = field(default_factory=dict)
    #: Extra requirements of the case (pytest marks' names), e.g. the MiniLM weights.
    marks: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------- tensors models


def _int_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": "INT64", "shape": list(array.shape), "data": array.ravel().tolist()}


def _token_examples(names: tuple[str, ...], vocab: int, classes: int) -> Callable[[np.random.Generator, int], list[dict[str, Any]]]:
    """Token examples of a text encoder exported with tensor inputs: ids, a mask that keeps
    a random prefix, zero token types; a random class."""
    def make(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            length = int(rng.integers(3, 9))
            tensors = {"input_ids": rng.integers(1, vocab, size=(1, 8)),
                       "attention_mask": (np.arange(8) < length).astype(np.int64)[None],
                       "token_type_ids": np.zeros((1, 8), np.int64)}
            out.append({"inputs": [_int_tensor(k, tensors[k]) for k in names], "label": int(rng.integers(classes))})
        return out
    return make


def _exported(case_id: str, file: str, prefix: str, adapter: str, input_names: tuple[str, ...]) -> ModelCase:
    ref = np.load(EXPORTED / "reference.npz")
    # The Conv1D export was probed with the encoder's inputs (make_exported_fixtures.py).
    inputs = {n: ref[f"{prefix}.{n}"] if f"{prefix}.{n}" in ref.files else ref[f"encoder.{n}"] for n in input_names}
    targets = json.loads((EXPORTED / adapter / "adapter_config.json").read_text())["target_modules"]
    base, adapted = ref[f"{prefix}.base"], ref[f"{prefix}.{adapter}"]
    vocab = int(inputs["input_ids"].max()) + 1
    return ModelCase(
        id=case_id,
        model_section=lambda _tmp: {"path": str(EXPORTED / file), "targets": sorted(targets), "rank": 8},
        inputs=[_int_tensor(n, inputs[n]) for n in input_names], rows=len(base), output="logits",
        base=base, adapted=adapted, peft_dir=EXPORTED / adapter,
        examples=_token_examples(input_names, vocab, base.shape[1]),
        # The exports take sequences of the probes' length (the tiny BERT has 32 positions).
        training={"pad_length": inputs["input_ids"].shape[1]},
    )


# ---------------------------------------------------------------- the demo MLP


def _demo_reference(pixels: np.ndarray, adapter_dir: Path | None) -> np.ndarray:
    """The demo MLP in float64 numpy, each target weight W replaced by W + s·A·B."""
    model = onnx.load(str(demo_model_path()))
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    if adapter_dir is not None:
        adapter = load_peft(read_peft_dir(adapter_dir))
        for weight, m in adapter.weights.items():
            w[weight] = w[weight] + adapter.scale * (m.A.astype(np.float64) @ m.B.astype(np.float64))
    h = np.maximum(pixels @ w["fc1.weight"] + w["fc1.bias"], 0)
    h = np.maximum(h @ w["fc2.weight"] + w["fc2.bias"], 0)
    return h @ w["head.weight"] + w["head.bias"]


def _demo_case() -> ModelCase:
    pixels = np.random.default_rng(7).random((3, 64)).astype(np.float32)
    adapter = demo_adapter_dirs()["mirror"]

    def examples(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        x = rng.random((n, 64)).astype(np.float32)
        return [{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}],
                 "label": int(rng.integers(10))} for row in x]

    return ModelCase(
        # Slot rank twice the adapters': a composition of two of them fits one slot.
        id="demo", model_section=lambda _tmp: {"targets": list(DEMO_TARGETS), "rank": 2 * DEMO_RANK},
        inputs=[{"name": "pixels", "datatype": "FP32", "shape": [3, 64], "data": pixels.ravel().tolist()}], rows=3,
        output="logits", base=_demo_reference(pixels.astype(np.float64), None),
        adapted=_demo_reference(pixels.astype(np.float64), adapter), peft_dir=adapter, examples=examples,
    )


# ---------------------------------------------------------------- MiniLM with text


def _minilm_case() -> ModelCase:
    ref = json.loads((MINILM / "reference.json").read_text())
    sentences = ref["sentences"]
    train = [json.loads(line) for line in (INTENTS / "data" / "users" / "alice" / "train.jsonl").read_text().splitlines()
             if line.strip()]

    def examples(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
        picked = rng.choice(len(train), size=min(n, len(train)), replace=False)
        return [{"text": train[i]["text"], "label": train[i]["label"]} for i in picked]

    def section(tmp: Path) -> dict[str, Any]:
        model = build_intents_model(tmp.parent / "intents-build" / "intents.onnx")
        return {"path": str(model), "targets": ["encoder.layer.*.weight", "classifier.weight"], "rank": 8,
                "max_text_tokens": 64}

    return ModelCase(
        id="minilm-text", model_section=section,
        inputs=[{"name": "text", "datatype": "BYTES", "shape": [len(sentences)], "data": sentences}],
        rows=len(sentences), output="sentence_embedding", base=np.asarray(ref["embeddings"]),
        adapted=np.asarray(ref["peft"]["embeddings"]), peft_dir=MINILM / "peft_adapter", examples=examples,
        marks=("minilm",),
    )


MODEL_CASES: list[ModelCase] = [
    _demo_case(),
    _minilm_case(),
    _exported("torchscript-17", "encoder_torchscript_17.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("torchscript-20", "encoder_torchscript_20.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("dynamo-17", "encoder_dynamo_17.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("dynamo-20", "encoder_dynamo_20.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("optimum-bert", "bert_optimum_17.onnx", "bert", "peft_bert", ("input_ids", "attention_mask", "token_type_ids")),
    _exported("gpt2-conv1d", "conv1d_torchscript_17.onnx", "conv1d", "peft_conv1d", ("input_ids", "attention_mask")),
]
