"""ONNX Runtime training artifacts for DP-LoRA, derived from the serving base graph.

:func:`build_artifacts` takes the same base ONNX model the inference engine serves and
writes the four files ORT's on-device training API needs (training model, eval model,
optimizer model, checkpoint), with only the LoRA matrices trainable (A and B per target,
or B only with A frozen at its initial value). The base weights stay constants inside the
graphs. A starts random (PEFT's initialisation) or, with ``a_init="principal"``, at the
top-r left singular vectors of the target's base weight (:func:`_principal_a`); B starts
at zero either way.
The loss uses SUM reduction, so the gradient of the loss is the sum of the examples'
gradients. Results are cached on disk under a key made of the base model's digest and
the configuration.

Private artifacts (``ArtifactConfig.private``) compute DP-SGD's update in the graph.
:func:`lorad.adapters.lora_graph.make_training_graph` broadcasts every trainable LoRA matrix
to one copy per example, so ORT's gradient builder yields, per parameter ``P``, the
per-example gradients ``G_P`` (``[N, *P.shape]``) and a ``ReduceSum`` over axis 0 that
sums them into ``P_grad``. We replace those ReduceSums by one subgraph that follows the
algorithm's steps:

1. clip: ``norm[n] = sqrt(Σ_P ‖G_P[n]‖²)`` over ALL LoRA parameters of example n, and
   ``factor[n] = min(1, C / (norm[n] + 1e-6))``; an example whose ``norm[n]`` is not
   finite (an inf or NaN in its gradient) gets ``factor[n] = 0`` and its rows of every
   ``G_P`` are replaced by zeros, so it counts as a zero gradient instead of turning
   the whole sum into NaN;
2. accumulate: ``S_P = Σ_n factor[n]·G_P[n]`` (one GEMV over the flattened gradients);
3. add noise: ``S_P + noise_P`` where ``noise_P`` is the parameter's slice of the float64
   graph input :data:`NOISE_INPUT` (drawn on the host, N(0, σ²C²)); the sum is computed in
   float64 and rounded to float32 once;
4. scale: ``× grad_scale`` (e.g. 1/expected batch size under Poisson sampling),

and the result is the ``P_grad`` that ORT's gradient accumulator and the stock optimizer
consume. C, the noise and the scale are inputs, so one set of artifacts serves every
(σ, C, q). Non-private artifacts are the plain ORT training graph (no per-example
copies) with the same ``grad_scale`` input; they are the baseline the benchmark compares
against.

Every ORT-internal convention this relies on is checked while rewriting
(:func:`_expect`), so an ORT version that builds gradients differently fails here with
a message instead of training wrongly.

``backend="portable"`` builds the other backend's files instead: one step graph and one
eval graph made by lorad's own graph surgery (:mod:`lorad.trainer.portable_graph`), which any
onnxruntime runs, plus the initial parameters. Both backends share this module's
configuration, metadata and cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lorad.adapters.decoder import without_cache
from lorad.adapters.fsutil import atomic_replace_dir
from lorad.adapters.lora import LoraWeights, lora_scale
from lorad.adapters.lora_graph import (
    LoraTarget,
    digest_model,
    find_targets,
    fingerprint,
    lora_input_names,
    make_training_graph,
    per_example_name,
)
from lorad.adapters.memory import trim_now
from lorad.adapters.onnx_compat import for_runtime

from ._graph_prune import drop_unused
from ._ort_training import load as _load_ort_training
from .ort_gradients import gradient_error, prepare_for_gradients

__all__ = [
    "A_INITS",
    "AInit",
    "BACKENDS",
    "Backend",
    "CLIP_NORM_INPUT",
    "NOISE_INPUT",
    "GRAD_SCALE_INPUT",
    "ArtifactConfig",
    "TrainingArtifacts",
    "OrtConventionError",
    "build_artifacts",
]

CLIP_NORM_INPUT = "dp.clip_norm"
NOISE_INPUT = "dp.noise"
GRAD_SCALE_INPUT = "dp.grad_scale"

# Bump when the generated graphs change meaning, so stale cache entries are not reused
# (v6: exported graphs prepared for gradients, batch_input, non-finite examples dropped).
_FORMAT = "lorad-training-artifacts-v6"
_META = "lorad_artifacts.json"
_CLIP_EPSILON = 1e-6  # as Opacus: keeps C/norm finite for a zero gradient

_PORTABLE_FORMAT = "lorad-portable-step-v6"
_ISOLATE_BYTES = 64 << 20

#: The training backends (trainer/backends.py chooses one).
Backend = Literal["portable", "ort-training"]
BACKENDS: tuple[Backend, ...] = ("portable", "ort-training")

#: How LoRA A starts: PEFT's random init, or the base weight's principal directions.
AInit = Literal["random", "principal"]
A_INITS: tuple[AInit, ...] = ("random", "principal")
#: Column norm of a principal A: about that of the random A (uniform in ±1/√in has an
#: expected column norm of 1/√3 ≈ 0.58), so alpha and the learning rate keep their meaning.
_PRINCIPAL_A_NORM = 0.6

Loss = Literal["cross_entropy", "mse", "causal_lm"]
Optimizer = Literal["adamw", "sgd"]
_LABEL_INPUTS: dict[str, str] = {"cross_entropy": "labels", "mse": "target", "causal_lm": "labels"}


class OrtConventionError(RuntimeError):
    """ONNX Runtime built the gradient graph differently from what lorad relies on."""


@dataclass(frozen=True)
class ArtifactConfig:
    """What the training graphs are made of (not σ, C, q or the learning rate: those are
    run-time inputs).

    ``targets``: glob patterns over weight names (as the serving config). ``freeze_a``:
    train B only, A stays at its initial value. ``private``: per-example clip + noise
    graph; False builds the plain non-private graph. ``output``: the model output the
    loss reads (default: the first). ``init_seed``: seed of A's random initial value
    (B starts at zero, as PEFT does). ``a_init``: ``"random"`` (PEFT's init) or
    ``"principal"`` (each target's A is the top-``rank`` left singular vectors of its base
    weight, scaled to column norm 0.6: computed from the public base model only, so it
    costs no privacy; ``rank`` must not exceed any target's ``in_features``).
    """

    targets: tuple[str, ...]
    rank: int
    alpha: float
    use_rslora: bool = False
    freeze_a: bool = False
    private: bool = True
    loss: Loss = "cross_entropy"
    output: str | None = None
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    init_seed: int = 0
    a_init: AInit = "random"

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("ArtifactConfig.targets: give at least one glob pattern over weight names")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank <= 0:
            raise ValueError(f"ArtifactConfig.rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"ArtifactConfig.alpha must be positive, got {self.alpha}")
        if self.loss not in _LABEL_INPUTS:
            raise ValueError(f"ArtifactConfig.loss must be one of {sorted(_LABEL_INPUTS)}, got {self.loss!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"ArtifactConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise ValueError(f"ArtifactConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer == "sgd" and self.weight_decay:
            raise ValueError("ArtifactConfig.weight_decay is only supported with optimizer 'adamw'")
        if self.a_init not in A_INITS:
            raise ValueError(f"ArtifactConfig.a_init must be one of {list(A_INITS)}, got {self.a_init!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, use_rslora=self.use_rslora)


@dataclass(frozen=True)
class TrainingArtifacts:
    """A generated (or cached) set of artifacts and what the driver needs to know of them.

    ``trainable``: names and shapes of the trainable LoRA tensors, in the order of the
    noise vector's slices. ``frozen``: LoRA tensors kept fixed (A in frozen-A mode).
    ``data_inputs``: the model inputs plus the label input, fed per batch, with their
    element types (numpy names) and shapes (None for a dynamic dimension; the first is
    the batch).
    """

    directory: Path
    config: ArtifactConfig
    targets: tuple[LoraTarget, ...]
    base_fingerprint: str
    trainable: tuple[tuple[str, tuple[int, ...]], ...]
    frozen: tuple[str, ...]
    data_inputs: tuple[str, ...]
    label_input: str
    input_dtypes: tuple[str, ...]
    input_shapes: tuple[tuple[int | None, ...], ...]
    backend: Backend = "ort-training"
    #: Whether the base's weights are packed (MatMulNBits): sessions keep them packed (trainer/portable.py).
    quantized_base: bool = False

    @property
    def step_model(self) -> Path:
        """The portable backend's whole-step graph."""
        return self.directory / "step_model.onnx"

    @property
    def initial_parameters(self) -> Path:
        """The portable backend's initial flat parameter vector (``.npy``)."""
        return self.directory / "initial_parameters.npy"

    @property
    def training_model(self) -> Path:
        return self.directory / "training_model.onnx"

    @property
    def eval_model(self) -> Path:
        return self.directory / "eval_model.onnx"

    @property
    def optimizer_model(self) -> Path:
        return self.directory / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoint"

    @property
    def noise_size(self) -> int:
        """Length of the noise input: the number of trainable LoRA parameters."""
        return sum(int(np.prod(shape)) for _, shape in self.trainable)


def build_artifacts(
    model: onnx.ModelProto, config: ArtifactConfig, *, cache_dir: Path, backend: Backend = "ort-training",
    model_digest: str | None = None, isolate: bool = False,
) -> TrainingArtifacts:
    """Return the artifacts of ``backend`` for ``model`` and ``config``, generating them if not cached.

    Entries are keyed by a digest of the whole base model (``model_digest``: computed once
    by the caller that loaded the model, else here), the configuration, the backend, the
    ORT version and lorad's artifact format; a new entry is written to a staging
    directory and renamed into place, so a crash never leaves a half-written entry.

    ``isolate``: generate a model of more than 64 MiB in a child process (the daemon's
    trainer asks for it). Generating holds several copies of the model at once (SmolLM2-135M:
    a peak of about 1 GB, 0.5 GB of it kept by the allocator afterwards); in a child all of
    it is returned when it exits. A small model is not worth the child's start.
    """
    import onnxruntime

    if backend not in BACKENDS:
        raise ValueError(f"training backend must be one of {list(BACKENDS)}, got {backend!r}")
    targets = find_targets(model, config.targets)
    digest = model_digest or digest_model(model)
    key_src = json.dumps(
        {
            "format": _FORMAT if backend == "ort-training" else _PORTABLE_FORMAT,
            "backend": backend,
            "per_example": _portable_per_example() if backend == "portable" else None,
            "ort": onnxruntime.__version__,
            "model": digest,
            "config": dataclasses.asdict(config),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / _META).is_file():
        return _read_meta(final, config)

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        if isolate and model.ByteSize() > _ISOLATE_BYTES:
            meta = _generate_in_child(model, config, backend, staging)
        else:
            meta = _generate_entry(model, config, backend, targets, staging)
        (staging / _META).write_text(json.dumps(meta, sort_keys=True, indent=1))
        try:
            atomic_replace_dir(staging, final)
        except OSError:
            if not (final / _META).is_file():
                raise
            # Another process generated the same entry first; use that one.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _read_meta(final, config)


def _generate_entry(model: onnx.ModelProto, config: ArtifactConfig, backend: Backend, targets: Sequence[LoraTarget],
                    directory: Path) -> dict[str, Any]:
    generate = _generate if backend == "ort-training" else _generate_portable
    return generate(model, config, targets, directory)


def _generate_in_child(model: onnx.ModelProto, config: ArtifactConfig, backend: Backend, directory: Path) -> dict[str, Any]:
    """:func:`_generate_entry` in a spawned process that reads the model from a file in ``directory``."""
    import multiprocessing

    source = directory / ".base_model.onnx"
    onnx.save(model, os.fspath(source))
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_generate, args=(send, os.fspath(source), config, backend, os.fspath(directory)),
                            name="lorad-artifacts", daemon=True)
    child.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:
        outcome = ("error", False, f"the artifact builder process died (exit code {child.exitcode})")
    finally:
        child.join()
        source.unlink(missing_ok=True)
        trim_now()  # the model's serialised copy, freed: glibc would keep its pages
    if outcome[0] == "error":
        # What the callers tell apart: a model that cannot be trained (ValueError) from a failure.
        raise (ValueError if outcome[1] else RuntimeError)(outcome[2])
    meta: dict[str, Any] = outcome[1]
    return meta


def _child_generate(conn: Any, source: str, config: ArtifactConfig, backend: Backend, directory: str) -> None:
    try:
        model = onnx.load(source)
        meta = _generate_entry(model, config, backend, find_targets(model, config.targets), Path(directory))
        conn.send(("ok", meta))
    except Exception as e:
        conn.send(("error", isinstance(e, ValueError), str(e)))
    finally:
        conn.close()


def _initial_lora(
    model: onnx.ModelProto, targets: Sequence[LoraTarget], config: ArtifactConfig
) -> dict[str, LoraWeights]:
    """A per ``config.a_init``, B = 0, so training starts from the base model's outputs."""
    rng = np.random.default_rng(config.init_seed)
    inits = {i.name: i for i in model.graph.initializer} if config.a_init == "principal" else {}
    init = {}
    for t in targets:
        if config.a_init == "principal":
            weight = numpy_helper.to_array(inits[t.weight])
            a = _principal_a(weight.T if t.transposed else weight, config.rank, rng, name=t.weight)
        else:
            # PEFT's default: A ~ kaiming-uniform (bound 1/sqrt(in)).
            bound = 1.0 / np.sqrt(t.in_features)
            a = rng.uniform(-bound, bound, size=(t.in_features, config.rank)).astype(np.float32)
        init[t.weight] = LoraWeights(a, np.zeros((config.rank, t.out_features), np.float32))
    return init


def _principal_a(weight: np.ndarray, rank: int, rng: np.random.Generator, *, name: str) -> np.ndarray:
    """A ``[in, rank]`` whose columns are the top left singular vectors of ``weight``
    (``[in, out]``, the ``x·W`` orientation), times :data:`_PRINCIPAL_A_NORM`: the input
    directions the frozen layer responds to most. Past ``min(in, out)`` singular vectors
    the columns continue with a random orthonormal complement (from ``rng``). Each
    column's sign is fixed (its largest entry positive), so the result does not depend
    on the LAPACK build.
    """
    fan_in = weight.shape[0]
    if rank > fan_in:
        raise ValueError(
            f"a_init 'principal' needs rank <= the in_features of every target, but {name!r} has {fan_in} "
            f"inputs and rank is {rank} (A cannot have more orthonormal columns than rows); lower trainer.rank "
            "or use a_init: random"
        )
    u = np.linalg.svd(weight.astype(np.float64), full_matrices=False)[0]
    k = min(rank, u.shape[1])
    a = np.empty((fan_in, rank))
    a[:, :k] = u[:, :k]
    if k < rank:
        extra = rng.standard_normal((fan_in, rank - k))
        extra -= u @ (u.T @ extra)
        a[:, k:] = np.linalg.qr(extra)[0]
    signs = np.sign(a[np.abs(a).argmax(axis=0), np.arange(rank)])  # unit columns: never 0
    return (a * signs * _PRINCIPAL_A_NORM).astype(np.float32)


def _portable_per_example() -> str:
    from . import portable_graph

    return portable_graph.PER_EXAMPLE


def _split_trainable(
    targets: Sequence[LoraTarget], config: ArtifactConfig, init: dict[str, LoraWeights]
) -> tuple[list[tuple[str, tuple[int, ...]]], list[str]]:
    """(trainable names and shapes in the noise vector's order, frozen names)."""
    trainable: list[tuple[str, tuple[int, ...]]] = []
    frozen: list[str] = []
    for t in targets:
        a_name, b_name = lora_input_names(t.weight)
        w = init[t.weight]
        if config.freeze_a:
            frozen.append(a_name)
        else:
            trainable.append((a_name, tuple(w.A.shape)))
        trainable.append((b_name, tuple(w.B.shape)))
    return trainable, frozen


def _generate_portable(
    model: onnx.ModelProto, config: ArtifactConfig, targets: Sequence[LoraTarget], directory: Path
) -> dict[str, Any]:
    from .portable_graph import EXAMPLE_INDEX_INPUT, build_step_graphs

    init = _initial_lora(model, targets, config)
    trainable, frozen = _split_trainable(targets, config, init)
    label_input = _LABEL_INPUTS[config.loss]
    outputs = [o.name for o in model.graph.output]
    output = config.output or outputs[0]
    base_fingerprint = fingerprint(model, targets)
    if config.loss == "causal_lm":
        # Whole windows in, the logits of every position out: no KV cache (adapters/decoder.py).
        model = without_cache(model)
    graphs = build_step_graphs(
        model, targets, init=init, scale=config.scale, trainable=trainable, output=output, loss=config.loss,
        label_input=label_input, private=config.private, optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        reserved_inputs=[label_input, CLIP_NORM_INPUT, NOISE_INPUT, GRAD_SCALE_INPUT, EXAMPLE_INDEX_INPUT],
        clip_norm_input=CLIP_NORM_INPUT, noise_input=NOISE_INPUT, grad_scale_input=GRAD_SCALE_INPUT,
    )
    onnx.checker.check_model(graphs.step)
    onnx.save(graphs.step, os.fspath(directory / "step_model.onnx"))
    onnx.save(graphs.eval, os.fspath(directory / "eval_model.onnx"))
    values = {**{lora_input_names(t.weight)[0]: init[t.weight].A for t in targets},
              **{lora_input_names(t.weight)[1]: init[t.weight].B for t in targets}}
    flat = np.concatenate([values[name].reshape(-1) for name, _ in trainable]).astype(np.float32)
    np.save(directory / "initial_parameters.npy", flat)
    frozen_values: dict[str, Any] = {name: values[name] for name in frozen}
    np.savez(directory / "frozen_parameters.npz", **frozen_values)
    # A language model's window rows carry their example's index (trainer/lm_examples.py).
    index = [EXAMPLE_INDEX_INPUT] if config.loss == "causal_lm" else []
    data_inputs = [*graphs.model_inputs, *index, label_input]
    return {
        "format": _PORTABLE_FORMAT,
        "backend": "portable",
        "config": dataclasses.asdict(config),
        "targets": [dataclasses.asdict(t) for t in targets],
        "base_fingerprint": base_fingerprint,
        "quantized_base": any(n.op_type == "MatMulNBits" for n in model.graph.node),
        "trainable": [[name, list(shape)] for name, shape in trainable],
        "frozen": frozen,
        "data_inputs": data_inputs,
        "label_input": label_input,
        **_describe_inputs(graphs.step, data_inputs),
    }


def _generate(
    model: onnx.ModelProto, config: ArtifactConfig, targets: Sequence[LoraTarget], directory: Path
) -> dict[str, Any]:
    if config.loss == "causal_lm":
        raise ValueError("the ort-training backend trains no language model (causal_lm); use trainer.backend: portable")
    ort_training = _load_ort_training()
    onnxblock, artifacts = ort_training.onnxblock, ort_training.artifacts
    init = _initial_lora(model, targets, config)
    trainable, frozen = _split_trainable(targets, config, init)
    trainable_names = [name for name, _ in trainable]

    # Every data input has the batch first (the trainer stacks examples on axis 0).
    base_inits = {i.name for i in model.graph.initializer}
    batch_input = next(i.name for i in model.graph.input if i.name not in base_inits)
    graph = make_training_graph(
        model, targets, init=init, scale=config.scale,
        per_example=trainable_names if config.private else (), batch_input=batch_input,
    )
    outputs = [o.name for o in graph.graph.output]
    output = config.output or outputs[0]
    if output not in outputs:
        raise ValueError(f"ArtifactConfig.output {output!r} is not a model output; outputs: {outputs}")
    label_input = _LABEL_INPUTS[config.loss]
    # Older exporters also list initializers as graph inputs; those are not data.
    initializers = {i.name for i in graph.graph.initializer}
    model_inputs = [i.name for i in graph.graph.input if i.name not in initializers]
    reserved = {label_input, CLIP_NORM_INPUT, NOISE_INPUT, GRAD_SCALE_INPUT}
    if reserved & set(model_inputs):
        raise ValueError(f"the base model's inputs {model_inputs} collide with the trainer's {sorted(reserved)}")

    loss: Any
    if config.loss == "cross_entropy":
        loss = onnxblock.loss.CrossEntropyLoss(reduction="sum")
    else:
        loss = onnxblock.loss.MSELoss(reduction="sum")
    optimizer: Any
    optimizer = onnxblock.optim.AdamW(weight_decay=config.weight_decay) if config.optimizer == "adamw" else onnxblock.optim.SGD()

    # Exported graphs spell some ops in ways ORT's gradient builder rejects.
    prepare_for_gradients(graph)
    try:
        with _without_native_info_logs():
            artifacts.generate_artifacts(
                graph,
                requires_grad=trainable_names,
                frozen_params=frozen,
                loss=loss,
                optimizer=optimizer,
                artifact_directory=os.fspath(directory),
                loss_input_names=[output],
            )
    except RuntimeError as e:  # ORT's gradient builder raises bare RuntimeErrors (C++ asserts)
        raise ValueError(gradient_error(graph, e)) from e

    training = onnx.load(os.fspath(directory / "training_model.onnx"))
    noise_size = sum(int(np.prod(shape)) for _, shape in trainable)
    _add_scalar_inputs(training, {*trainable_names, *frozen}, private=config.private, noise_size=noise_size)
    if config.private:
        _clip_noise_scale(training, trainable)
    else:
        _scale_only(training, trainable)
    # e.g. what fed the replaced ReduceSums
    drop_unused(training.graph)
    onnx.checker.check_model(training)
    onnx.save(for_runtime(training), os.fspath(directory / "training_model.onnx"))
    for name in ("eval_model.onnx", "optimizer_model.onnx"):
        m = onnx.load(os.fspath(directory / name))
        onnx.save(for_runtime(m), os.fspath(directory / name))

    return {
        "format": _FORMAT,
        "config": dataclasses.asdict(config),
        "targets": [dataclasses.asdict(t) for t in targets],
        "base_fingerprint": fingerprint(model, targets),
        "trainable": [[name, list(shape)] for name, shape in trainable],
        "frozen": frozen,
        "data_inputs": [*model_inputs, label_input],
        "label_input": label_input,
        **_describe_inputs(training, [*model_inputs, label_input]),
    }


def _describe_inputs(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, Any]:
    infos = {i.name: i.type.tensor_type for i in model.graph.input}
    dtypes, shapes = [], []
    for name in names:
        tensor_type = infos[name]
        dtypes.append(np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name)
        shapes.append([d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim])
    return {"input_dtypes": dtypes, "input_shapes": shapes}


@contextlib.contextmanager
def _without_native_info_logs() -> Iterator[None]:
    """ORT's gradient builder logs every graph transformer at INFO level straight to file
    descriptor 2, whatever the configured severity. Capture that descriptor while it
    runs and pass on every line that is not such an INFO line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True) if b" [I:onnxruntime:" not in line]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))


def _read_meta(directory: Path, config: ArtifactConfig) -> TrainingArtifacts:
    meta = json.loads((directory / _META).read_text())
    if meta.get("format") not in (_FORMAT, _PORTABLE_FORMAT) or meta.get("config") != json.loads(json.dumps(dataclasses.asdict(config))):
        raise RuntimeError(f"training artifact cache entry {directory} does not match its key; delete it")
    return TrainingArtifacts(
        directory=directory,
        config=config,
        targets=tuple(LoraTarget(**t) for t in meta["targets"]),
        base_fingerprint=meta["base_fingerprint"],
        trainable=tuple((name, tuple(shape)) for name, shape in meta["trainable"]),
        frozen=tuple(meta["frozen"]),
        data_inputs=tuple(meta["data_inputs"]),
        label_input=meta["label_input"],
        input_dtypes=tuple(meta["input_dtypes"]),
        input_shapes=tuple(tuple(shape) for shape in meta["input_shapes"]),
        backend=meta.get("backend", "ort-training"),
        quantized_base=bool(meta.get("quantized_base", False)),
    )


# --- Rewriting ORT's gradient graph -------------------------------------------------------

# ORT 1.19 conventions relied on below (onnxruntime/training/onnxblock/_training_graph_utils.py
# and the C++ GradientGraphBuilder):
#   * the gradient of parameter P is the tensor named "P_grad";
#   * it is consumed by an InPlaceAccumulatorV2 (domain com.microsoft) whose inputs are
#     ["P_grad.accumulation.buffer", "P_grad", "lazy_reset_grad"];
#   * accumulator nodes come after every gradient computation in the node list;
#   * the gradient of an Expand output E is the tensor "E_grad", and Expand's gradient
#     reduces it with ONE ReduceSum(E_grad, axes) -> "P_grad", keepdims=0, axes a
#     constant initializer equal to [0] when only the leading (batch) axis was added.


def _expect(condition: bool, what: str) -> None:
    if not condition:
        import onnxruntime

        raise OrtConventionError(
            f"onnxruntime {onnxruntime.__version__} built the training graph differently from what "
            f"lorad's DP-SGD rewrite relies on: {what}. The per-example clipping cannot be applied "
            "safely; pin onnxruntime-training 1.19.x or update trainer/artifacts.py."
        )


def _add_scalar_inputs(model: onnx.ModelProto, params: set[str], *, private: bool, noise_size: int) -> None:
    extra = [helper.make_tensor_value_info(GRAD_SCALE_INPUT, TensorProto.FLOAT, [])]
    if private:
        extra += [
            helper.make_tensor_value_info(CLIP_NORM_INPUT, TensorProto.FLOAT, []),
            helper.make_tensor_value_info(NOISE_INPUT, TensorProto.DOUBLE, [noise_size]),
        ]
    # User inputs must precede the parameters and gradient buffers ORT appended.
    names = [i.name for i in model.graph.input]
    _expect("lazy_reset_grad" in names, "no graph input 'lazy_reset_grad'")
    _expect(params <= set(names), f"LoRA parameters {sorted(params - set(names))[:3]} are not graph inputs")
    first_param = min(k for k, n in enumerate(names) if n in params or n.endswith(".accumulation.buffer"))
    for k, vi in enumerate(extra):
        model.graph.input.insert(first_param + k, vi)


def _accumulator_index(graph: onnx.GraphProto, name: str) -> int:
    grad = f"{name}_grad"
    found = [
        k for k, n in enumerate(graph.node)
        if n.op_type == "InPlaceAccumulatorV2" and len(n.input) >= 2 and n.input[1] == grad
    ]
    _expect(len(found) == 1, f"expected one InPlaceAccumulatorV2 consuming {grad!r}, found {len(found)}")
    node = graph.node[found[0]]
    _expect(node.domain == "com.microsoft", f"accumulator of {grad!r} is in domain {node.domain!r}")
    _expect(
        node.input[0] == f"{grad}.accumulation.buffer",
        f"accumulator of {grad!r} reads buffer {node.input[0]!r}, expected {grad + '.accumulation.buffer'!r}",
    )
    return found[0]


def _insert_before_accumulators(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    first = next((k for k, n in enumerate(graph.node) if n.op_type == "InPlaceAccumulatorV2"), None)
    _expect(first is not None, "no InPlaceAccumulatorV2 node in the training graph")
    assert first is not None
    later = [n.name or n.op_type for n in graph.node[first:] if n.op_type != "InPlaceAccumulatorV2"]
    _expect(not later, f"gradient nodes come after the first accumulator: {later[:5]}")
    for k, node in enumerate(nodes):
        graph.node.insert(first + k, node)


def _scale_only(model: onnx.ModelProto, trainable: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Non-private graph: ``P_grad × grad_scale`` feeds the accumulator."""
    graph = model.graph
    nodes = []
    for name, _ in trainable:
        accumulator = graph.node[_accumulator_index(graph, name)]
        scaled = f"dp/{name}/grad_scaled"
        nodes.append(helper.make_node("Mul", [f"{name}_grad", GRAD_SCALE_INPUT], [scaled], name=scaled))
        accumulator.input[1] = scaled
    _insert_before_accumulators(graph, nodes)


def _clip_noise_scale(model: onnx.ModelProto, trainable: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Replace the per-parameter ReduceSums over examples by clip, accumulate, noise, scale."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for out in node.output:
            producers.setdefault(out, []).append(node)

    reduce_sums = []
    for name, _shape in trainable:
        grad = f"{name}_grad"
        found = producers.get(grad, [])
        _expect(len(found) == 1, f"expected one node producing {grad!r}, found {len(found)}")
        node = found[0]
        _expect(node.op_type == "ReduceSum", f"{grad!r} is produced by {node.op_type}, expected ReduceSum")
        expected_in = f"{per_example_name(name)}_grad"
        _expect(
            len(node.input) == 2 and node.input[0] == expected_in,
            f"the ReduceSum producing {grad!r} reads {list(node.input)}, expected [{expected_in!r}, axes]",
        )
        keepdims = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "keepdims"), 1)
        _expect(keepdims == 0, f"the ReduceSum producing {grad!r} has keepdims={keepdims}, expected 0")
        axes = inits.get(node.input[1])
        _expect(
            axes is not None and numpy_helper.to_array(axes).tolist() == [0],
            f"the ReduceSum producing {grad!r} does not reduce exactly axis 0 with constant axes",
        )
        _expect(expected_in in producers, f"no node produces the per-example gradient {expected_in!r}")
        reduce_sums.append(node)
        _accumulator_index(graph, name)

    for node in reduce_sums:
        graph.node.remove(node)

    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    # 1. clip: flat per-example L2 norm over every LoRA parameter of the example.
    flats, squares = [], []
    for name, shape in trainable:
        numel = int(np.prod(shape))
        # [0, numel]: "0" copies N, which also keeps an empty batch (N = 0) well defined.
        flat = add(
            "Reshape",
            [f"{per_example_name(name)}_grad", const(f"dp/{name}/flat_shape", np.array([0, numel], np.int64))],
            f"dp/{name}/per_example_grad_flat",
        )
        flats.append(flat)
        # Σ g² as Mul, then ReduceSum over blocks of the row and over the blocks: ORT 1.19's
        # ReduceSumSquare over one long row runs at a third of the speed (and sums less
        # accurately) on the per-example gradients, which are the bulk of a DP step's bytes.
        block = _row_block(numel)
        squared = add("Mul", [flat, flat], f"dp/{name}/per_example_grad_sq")
        blocked = add(
            "Reshape",
            [squared, const(f"dp/{name}/block_shape", np.array([0, numel // block, block], np.int64))],
            f"dp/{name}/per_example_grad_sq_blocks",
        )
        partial = add("ReduceSum", [blocked, const(f"dp/{name}/axis2", np.array([2], np.int64))],
                      f"dp/{name}/per_example_sq_partial", keepdims=0)
        squares.append(add("ReduceSum", [partial, const(f"dp/{name}/axis1", np.array([1], np.int64))],
                           f"dp/{name}/per_example_sq_norm", keepdims=0))
    total = add("Sum", squares, "dp/per_example_sq_norm")
    # 1b. drop non-finite examples. An example whose gradient holds an inf or NaN (or whose
    # squared norm overflows float32) has a non-finite total; its factor would be C/inf = 0
    # and 0·inf = NaN in the product below would reach every parameter, so one example
    # would decide whether the whole step is usable. Such an example counts as a zero
    # gradient (a contribution of norm 0 <= C: the clipping bound still holds), both in
    # its factor and in its rows of G (Where, not Mul: 0·inf is NaN).
    bad = add("Or", [add("IsNaN", [total], "dp/per_example_is_nan"),
                     add("IsInf", [total], "dp/per_example_is_inf")], "dp/per_example_non_finite")
    zero = const("dp/zero", np.array(0.0, np.float32))
    norm = add("Sqrt", [add("Where", [bad, zero, total], "dp/per_example_sq_norm_finite")], "dp/per_example_norm")
    denom = add("Add", [norm, const("dp/clip_epsilon", np.array(_CLIP_EPSILON, np.float32))], "dp/norm_eps")
    ratio = add("Div", [CLIP_NORM_INPUT, denom], "dp/clip_ratio")
    clipped_factor = add("Min", [ratio, const("dp/one", np.array(1.0, np.float32))], "dp/clip_factor_raw")
    factor = add("Where", [bad, zero, clipped_factor], "dp/clip_factor")
    row = add("Unsqueeze", [factor, const("dp/axis0", np.array([0], np.int64))], "dp/clip_factor_row")
    bad_col = add("Unsqueeze", [bad, const("dp/axis1", np.array([1], np.int64))], "dp/per_example_non_finite_col")
    finite_flats = [add("Where", [bad_col, zero, flat], f"{flat}_finite") for flat in flats]

    # 2. accumulate: Σ_n factor[n]·G[n] as one [1, N] × [N, numel] product per parameter.
    sums = [add("MatMul", [row, flat], f"dp/{name}/clipped_sum") for (name, _), flat in zip(trainable, finite_flats, strict=True)]
    # Steps 3 and 4 run once over every parameter's sum laid end to end (the order of the
    # noise vector), not once per parameter: they are cheap, their kernel launches are not.
    joined = add("Concat", sums, "dp/clipped_sum_row", axis=1)
    clipped = add("Reshape", [joined, const("dp/flat", np.array([-1], np.int64))], "dp/clipped_sum")
    # 3. add noise. The sum is widened and the float64 noise added exactly, then rounded
    # to float32 once: a float32 addition would let the low bits of the sum show through
    # where noise and sum nearly cancel (the floating-point attacks on DP noise).
    wide = add("Cast", [clipped], "dp/clipped_sum_f64", to=TensorProto.DOUBLE)
    noised = add("Add", [wide, NOISE_INPUT], "dp/noised_sum_f64")
    rounded = add("Cast", [noised], "dp/noised_sum", to=TensorProto.FLOAT)
    # 4. scale, then hand each parameter its slice in its own shape.
    scaled = add("Mul", [rounded, GRAD_SCALE_INPUT], "dp/scaled_sum")
    sizes = np.array([int(np.prod(shape)) for _, shape in trainable], np.int64)
    pieces = [f"dp/{name}/scaled" for name, _ in trainable]
    nodes.append(helper.make_node("Split", [scaled, const("dp/split_sizes", sizes)], pieces, name="dp/split", axis=0))
    for (name, shape), piece in zip(trainable, pieces, strict=True):
        add("Reshape", [piece, const(f"dp/{name}/shape", np.array(shape, np.int64))], f"{name}_grad")

    _insert_before_accumulators(graph, nodes)


def _row_block(numel: int) -> int:
    """The largest power of two up to 256 that divides ``numel``."""
    block = 256
    while numel % block:
        block //= 2
    return block


