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
from onnx import TensorProto, helper, numpy_helper

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
    #: For a model made at fixture time (a quantised base): ``(base, adapted)`` computed from
    #: the ``model:`` section actually served, in place of ``base`` and ``adapted``.
    references: Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]] | None = None

    #: The PEFT adapter as this case's user has it, given the scratch directory (a quantised
    #: base takes no adapter lorad bound to another base; see :func:`_quantised`).
    adapter_dir: Callable[[Path], Path] | None = None

    def peft_for(self, tmp: Path) -> Path:
        return self.adapter_dir(tmp) if self.adapter_dir is not None else self.peft_dir

    def expected(self, section: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """What the base model and the model with ``peft_dir`` answer for ``inputs``."""
        return self.references(section) if self.references is not None else (self.base, self.adapted)


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


# ---------------------------------------------------------------- quantised bases


def dequantised_by_ort(model: onnx.ModelProto, node: onnx.NodeProto, feed: np.ndarray) -> np.ndarray:
    """What ONNX Runtime's own kernel of one quantised ``node`` answers for ``feed``: the
    dequantised weight, read through the op (identity rows for MatMulNBits, every row
    index for GatherBlockQuantized)."""
    import onnxruntime as ort

    inits = {i.name: i for i in model.graph.initializer}
    single = onnx.NodeProto()
    single.CopyFrom(node)
    single.input[0 if node.op_type == "MatMulNBits" else 1] = "feed"
    single.output[0] = "out"
    single.ClearField("metadata_props")
    for a in list(single.attribute):
        if a.name == "accuracy_level":
            single.attribute.remove(a)  # fp32 compute: the exact dequantised product
    elem = helper.np_dtype_to_tensor_dtype(feed.dtype)
    graph = helper.make_graph([single], "dequantise", [helper.make_tensor_value_info("feed", elem, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [inits[n] for n in single.input if n in inits])
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import))
    tiny.ir_version = model.ir_version
    session = ort.InferenceSession(tiny.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["out"], {"feed": feed})[0])


def _float_reference(quantised: onnx.ModelProto, fp32: onnx.ModelProto, peft_dir: Path | None) -> onnx.ModelProto:
    """``quantised`` with every quantised weight replaced by its dequantised float value and,
    with ``peft_dir``, the PEFT adapter's ``s·A·B`` merged into those weights: the model
    a LoRA path on the quantised base must answer as. Weights are matched to the adapter
    through the fp32 model's module paths (checked against torch by the fp32 cases) and the
    output each linear computes."""
    from lorad.adapters.module_paths import ModulePaths

    deltas: dict[str, np.ndarray] = {}  # output of an fp32 linear -> s·A·B in x·W orientation
    if peft_dir is not None:
        paths = ModulePaths.from_model(fp32)
        adapter = load_peft(read_peft_dir(peft_dir), weight_of=paths.weight_of)
        by_name = {n.name: n for n in fp32.graph.node}
        for weight, m in adapter.weights.items():
            for node_name in paths.by_weight[weight].nodes:
                deltas[by_name[node_name].output[0]] = adapter.scale * (m.A.astype(np.float64) @ m.B.astype(np.float64))
    model = onnx.ModelProto()
    model.CopyFrom(quantised)
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            k = int(next(a.i for a in node.attribute if a.name == "K"))
            w = dequantised_by_ort(quantised, node, np.eye(k, dtype=np.float32)).astype(np.float64)  # [in, out]
            out = node.output[0]
            w = w + deltas.get(out, deltas.get(out.removesuffix(".matmul"), 0.0))
            name = f"{out}.dequantised"
            graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), name))
            nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        elif node.domain == "com.microsoft" and node.op_type == "GatherBlockQuantized":
            rows = next(int(i.dims[0]) for i in graph.initializer if i.name == node.input[0])
            table = dequantised_by_ort(quantised, node, np.arange(rows, dtype=np.int64))
            name = f"{node.output[0]}.dequantised"
            graph.initializer.append(numpy_helper.from_array(table.astype(np.float32), name))
            nodes.append(helper.make_node("Gather", [name, node.input[1]], list(node.output), name=node.name))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for n in nodes for name in n.input}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _feeds(case: ModelCase, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The reference rows as the graph's input tensors (tokenised, for a text model)."""
    from lorad.adapters.text_input import TextFrontEnd

    arrays = {t["name"]: np.asarray(t["data"], object if t["datatype"] == "BYTES" else None).reshape(t["shape"])
              for t in case.inputs}
    front = TextFrontEnd.from_model(model)
    if front is not None:
        return front.encode({k: np.asarray([s.encode() for s in v], object) for k, v in arrays.items()})
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return {k: v.astype(types[k]) for k, v in arrays.items()}


def _quantised(case: ModelCase, weights: str) -> ModelCase:
    """``case`` on its base quantised by ``lorad quantize-model --weights WEIGHTS``, served with
    ``quantized_compute: fp32`` so that what it answers is exactly the dequantised model's;
    the references come from ONNX Runtime running that float model (see
    :func:`_float_reference`), never from lorad's serving path."""
    from lorad.adapters.quantize import quantize_model

    def section(tmp: Path) -> dict[str, Any]:
        inner = case.model_section(tmp)
        fp32 = Path(inner.get("path") or demo_model_path())
        out = tmp / f"{fp32.stem}-{weights}.onnx"
        onnx.save(quantize_model(onnx.load(str(fp32)), weights), str(out))
        return {**inner, "path": str(out), "quantized_compute": "fp32"}

    def references(served: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        import onnxruntime as ort

        quantised = onnx.load(served["path"])
        fp32 = onnx.load(str(case.model_section(Path(served["path"]).parent).get("path") or demo_model_path()))
        feeds = _feeds(case, quantised)
        answers = []
        for peft in (None, case.peft_dir):
            session = ort.InferenceSession(_float_reference(quantised, fp32, peft).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            answers.append(np.asarray(session.run([case.output], feeds)[0], np.float64))
        return answers[0], answers[1]

    def adapter_dir(tmp: Path) -> Path:
        """The case's PEFT files without lorad's record of the fp32 base (the demo adapters
        have one): an adapter lorad made for one base is refused by another, quantised or not
        (tests/unit/test_quantize.py), so a user brings it as plain PEFT files."""
        from lorad.adapters.peft_format import without_base_record

        files = read_peft_dir(case.peft_dir)
        plain = without_base_record(files)
        if plain == files:
            return case.peft_dir
        out = tmp / "peft-plain"
        out.mkdir(exist_ok=True)
        for name, data in plain.items():
            (out / name).write_bytes(data)
        return out

    return ModelCase(id=f"{case.id}-{weights}", model_section=section, inputs=case.inputs, rows=case.rows,
                     output=case.output, base=case.base, adapted=case.adapted, peft_dir=case.peft_dir,
                     examples=case.examples, atol=case.atol, training=case.training, marks=case.marks,
                     references=references, adapter_dir=adapter_dir)


FP32_CASES: list[ModelCase] = [
    _demo_case(),
    _minilm_case(),
    _exported("torchscript-17", "encoder_torchscript_17.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("torchscript-20", "encoder_torchscript_20.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("dynamo-17", "encoder_dynamo_17.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("dynamo-20", "encoder_dynamo_20.onnx", "encoder", "peft_encoder_head", ("input_ids", "attention_mask")),
    _exported("optimum-bert", "bert_optimum_17.onnx", "bert", "peft_bert", ("input_ids", "attention_mask", "token_type_ids")),
    _exported("gpt2-conv1d", "conv1d_torchscript_17.onnx", "conv1d", "peft_conv1d", ("input_ids", "attention_mask")),
]

#: Every model on a base quantised to 8 and to 4 bits (adapters/quantize.py).
MODEL_CASES: list[ModelCase] = [*FP32_CASES, *(_quantised(c, w) for c in FP32_CASES for w in ("int8", "int4"))]
