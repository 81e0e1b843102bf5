"""The inference engine: ONNX Runtime sessions over one base model serve it and every adapter.

Two sessions, opened when first used: the base model's own graph, which answers every
request without an adapter at the base model's cost, and the fused LoRA graph of
:mod:`lorad.adapters.lora_fused`, which answers every adapter with it as session inputs.
They share the tables only gathered from (a text model's embeddings), the largest
initializers no kernel re-packs. An adapter is turned once into a :class:`PreparedAdapter`
(checked against the base model, scale folded into B, laid out as the LoRA session's
inputs, one copy of its numbers) so that switching adapters between requests costs no
I/O and no conversion.

CPU and CUDA share this code path: ``device`` selects the execution provider and where
the adapter tensors live; the tests run it on CPU.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import AdapterStorageError, BaseModelMismatchError, InvalidAdapterError
from .input_domains import input_domains
from .llama_builder import LLM_CONFIG_KEY
from .lora import LoraAdapter, LoraWeights
from .lora_fused import FusedLayout, make_fused_inference_graph
from .lora_graph import LoraTarget, digest_model, find_targets, fingerprint
from .memory import trim_now
from .merged import MergedPath, merge_blocker, merged_model
from .module_paths import ModulePaths
from .onnx_compat import for_runtime, open_session, set_quantized_compute
from .quantize import QUANTIZATION_KEY

__all__ = ["TensorSpec", "PreparedAdapter", "InferenceEngine", "DEVICES", "MAX_LORA_MAGNITUDE"]

log = logging.getLogger(__name__)

DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_T = TypeVar("_T")

#: Largest |entry| of A and of scale·B that an adapter may have. Trained LoRA matrices stay
#: far below 1 (PEFT starts B at 0); entries this large only come from a broken or hostile
#: file (e.g. lora_alpha 1e38) and would turn every answer into NaN or infinity.
MAX_LORA_MAGNITUDE = 1e4

_OIP_DATATYPES = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(int16)": ("INT16", np.int16),
    "tensor(int8)": ("INT8", np.int8),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(bool)": ("BOOL", np.bool_),
}


_ONNX_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float", onnx.TensorProto.DOUBLE: "double", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the Open Inference Protocol describes it."""

    name: str
    datatype: str  # OIP name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 for a dynamic dimension

    @property
    def numpy_dtype(self) -> np.dtype:
        for oip, dtype in _OIP_DATATYPES.values():
            if oip == self.datatype:
                return np.dtype(dtype)
        raise ValueError(f"no numpy type for {self.datatype}")


@dataclass(frozen=True, eq=False)
class PreparedAdapter:
    """An adapter ready to serve: immutable, so a request that holds it sees one version."""

    name: str
    version: int
    rank: int
    nbytes: int
    adapter: LoraAdapter = field(repr=False)
    #: The engine session's inputs for this adapter, made by the engine once, when first read.
    make_feeds: Callable[[], Mapping[str, ort.OrtValue]] = field(repr=False)
    #: Per target weight: (A [in, slot rank], scale·B [slot rank, out]), zero-padded; what
    #: the banks of mixed batches copy into a slot.
    matrices: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)

    @property
    def feeds(self) -> Mapping[str, ort.OrtValue]:
        return self.make_feeds()


def _once(make: Callable[[], _T]) -> Callable[[], _T]:
    """``make()`` computed at the first call, under a lock, and kept."""
    lock = threading.Lock()
    box: list[_T] = []

    def get() -> _T:
        with lock:
            if not box:
                box.append(make())
            return box[0]

    return get


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _graph_specs(graph: onnx.GraphProto, which: str) -> Iterator[TensorSpec]:
    """The graph's inputs (initializers excluded) or outputs, as ONNX Runtime lists them."""
    inits = {i.name for i in graph.initializer}
    for v in graph.input if which == "input" else graph.output:
        if v.name in inits:
            continue
        elem = v.type.tensor_type.elem_type
        kind = f"tensor({_ONNX_TYPE_NAMES.get(elem, str(elem))})"
        if kind not in _OIP_DATATYPES:
            raise ValueError(f"tensor {v.name!r} has type {kind}, which lorad cannot serve")
        dims = v.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        yield TensorSpec(v.name, _OIP_DATATYPES[kind][0], shape)


class InferenceEngine:
    """Owns the ORT session over the LoRA inference graph derived from one base model."""

    def __init__(
        self,
        model: onnx.ModelProto | str | Path,
        *,
        targets: Sequence[str],
        rank: int,
        weight_names: Mapping[str, str] | None = None,
        device: str = "cpu",
        intra_op_threads: int = 0,
        allow_spinning: bool = True,
        quantized_compute: str = "int8",
        merged_bytes: int = 0,
    ) -> None:
        """``merged_bytes``: the most the merged copy of the target weights may take for the
        merged fast path (:mod:`lorad.adapters.merged`); 0 turns it off."""
        if device not in DEVICES:
            raise ValueError(f"device {device!r} is not supported; allowed: {', '.join(DEVICES)}")
        if rank <= 0:
            raise ValueError(f"slot rank must be a positive integer, got {rank}")
        base = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        ir_version = base.ir_version
        quantised = any(n.op_type == "MatMulNBits" for n in base.graph.node)
        if quantised:
            base = set_quantized_compute(_copy(base) if isinstance(model, onnx.ModelProto) else base, quantized_compute)
        # Unlowered: an 8-bit target must stay a MatMulNBits to be found and get its LoRA
        # path; the derived graphs go through for_runtime with that path in place.
        self.base_model = for_runtime(base, lower_nbits8=False)
        #: The file the base session opens as it is (no copy written): the model given by
        #: path and served unchanged.
        self._base_file = str(model) if not isinstance(model, onnx.ModelProto) and not quantised \
            and base.ir_version == ir_version else None
        #: The values integer inputs may hold (token ids within the vocabulary, 0/1 masks).
        self.input_domains = input_domains(base)
        #: Module path of every LoRA-able weight: how PEFT names meet ONNX names.
        self.module_paths = ModulePaths.from_model(base, overrides=weight_names)
        self.targets: list[LoraTarget] = find_targets(base, targets, paths=self.module_paths)
        self.fingerprint = fingerprint(base, self.targets)
        self.rank = rank
        self.requested_device = device
        self.active_device = self._pick_device(device)
        self._ort_device = "cuda" if self.active_device == "cuda" else "cpu"

        self._threads, self._allow_spinning = intra_op_threads, allow_spinning
        self.providers = [DEVICES[self.active_device]] + (["CPUExecutionProvider"] if self.active_device != "cpu" else [])
        self.inputs = list(_graph_specs(self.base_model.graph, "input"))
        self.outputs = list(_graph_specs(self.base_model.graph, "output"))
        self._output_names = [o.name for o in self.outputs]
        self._by_weight = {t.weight: t for t in self.targets}
        #: Tables only gathered from (embeddings), shared by every session of this engine.
        self._shared = _gather_tables(self.base_model)
        self._base_lock, self._lora_lock = threading.Lock(), threading.Lock()
        self._local = threading.local()
        self._base_session: ort.InferenceSession | None = None
        self._lora: tuple[ort.InferenceSession | None, FusedLayout] | None = None
        self._on_demand = LLM_CONFIG_KEY in {p.key for p in base.metadata_props}
        #: The merged fast path, or None: then :attr:`merge_off` says why (off, not allowed for
        #: this model, or over its budget).
        self.merged: MergedPath | None = None
        merged_need = sum(t.in_features * t.out_features * 4 for t in self.targets)
        blocker = merge_blocker(self.base_model, self.targets) if merged_bytes else "cache.merged_bytes is 0"
        if blocker is None and merged_need > merged_bytes:
            blocker = f"the merged target weights would take {merged_need} bytes, over cache.merged_bytes {merged_bytes}"
        if blocker is None and self._on_demand:
            blocker = "a decoder language model generates in its own session"
        self.merge_off: str | None = blocker
        if blocker is None:
            self.merged = MergedPath(self._merged_session)
        else:
            log.info("no merged fast path for this model: %s", blocker)
        if not self._on_demand:
            # A decoder language model generates in its own session (lorad.adapters.generation):
            # these open at the first /infer, not to hold another copy of the weights.
            self.base_session  # noqa: B018 - opened now: the daemon is ready when it serves

    @property
    def base_session(self) -> ort.InferenceSession:
        """The session over the base model's own graph: requests without an adapter."""
        session = self._base_session
        if session is not None:
            return session
        with self._base_lock:
            if self._base_session is None:
                graph: onnx.ModelProto | str = self.base_model
                if self._base_file is not None:
                    graph = self._base_file
                elif any(n.op_type == "MatMulNBits" for n in self.base_model.graph.node):
                    graph = for_runtime(_copy(self.base_model))  # 8-bit products as float ops where set so
                self._base_session = self._new_session(graph, "base model")
            return self._base_session

    @property
    def session(self) -> ort.InferenceSession:
        """The session over the fused LoRA graph: requests with an adapter."""
        session = self._lora_parts(open_session=True)[0]
        assert session is not None
        return session

    @property
    def layout(self) -> FusedLayout:
        """The LoRA session's adapter inputs (built with its graph, at the first adapter)."""
        return self._lora_parts(open_session=False)[1]

    def _lora_parts(self, *, open_session: bool) -> tuple[ort.InferenceSession | None, FusedLayout]:
        parts = self._lora
        if parts is not None and (parts[0] is not None or not open_session):
            return parts
        # Its own lock: base-model requests go on while the LoRA graph is built (MiniLM: ~1 s).
        with self._lora_lock:
            if self._lora is None or (open_session and self._lora[0] is None):
                graph, layout = make_fused_inference_graph(self.base_model, self.targets, rank=self.rank)
                # A decoder prepares adapters for its banks without the session (see prepare).
                session = self._new_session(graph, "LoRA graph") if open_session or not self._on_demand else None
                self._lora = (session, self._lora[1] if self._lora is not None else layout)
            return self._lora

    def session_options(self) -> ort.SessionOptions:
        """Options of every session over this base model (the banks' too): its threads and
        spinning, no CPU arena, the shared embedding tables."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self._threads
        # No CPU arena: ORT's arena keeps a large request's peak for good (MiniLM: +210 MB
        # after one 8k-token call), while without it the memory goes back (with
        # malloc_trim, adapters/memory.py); measured no slower on MiniLM or the demo MLP.
        options.enable_cpu_mem_arena = False
        if not self._allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, value in self._shared.items():
            options.add_initializer(name, value)
        return options

    def _new_session(self, graph: onnx.ModelProto | str, what: str) -> ort.InferenceSession:
        """A session over ``graph`` (a model, or the path of a file ORT reads as it is)."""
        try:
            if isinstance(graph, str):
                return ort.InferenceSession(graph, self.session_options(), providers=self.providers)
            return open_session(graph, self.session_options(), self.providers)
        except Exception as e:  # ORT raises its own untyped errors for invalid graphs
            raise AdapterStorageError(f"ONNX Runtime could not load the {what}: {e}") from e

    def _merged_session(self, prepared: PreparedAdapter) -> ort.InferenceSession:
        return self._new_session(merged_model(self.base_model, self.targets, prepared.matrices), "merged adapter")

    def release_session(self) -> None:
        """Close a decoder's on-demand sessions (opened by /infer or the trainer's validation
        gate: SmolLM2, about 350 MB each); their next use opens them again. Calls running on
        them finish. Other models keep theirs: they are their serving path."""
        if self._on_demand:
            with self._base_lock:
                self._base_session = None
            with self._lora_lock:
                if self._lora is not None:
                    self._lora = (None, self._lora[1])
            trim_now()  # glibc would keep the freed pages

    @functools.cached_property
    def model_digest(self) -> str:
        """The base model's identity (:func:`digest_model`), computed at the first use
        (a training run's artifact key) and kept: serialising MiniLM takes most of a second."""
        return digest_model(self.base_model)

    @staticmethod
    def _pick_device(requested: str) -> str:
        if DEVICES[requested] in ort.get_available_providers():
            return requested
        # No silent fallback: say it once; the daemon also exports requested vs active.
        log.warning("device %r requested but %s is not available in this ONNX Runtime; serving on cpu", requested, DEVICES[requested])
        return "cpu"

    def _device_feeds(self, arrays: Mapping[str, np.ndarray]) -> dict[str, ort.OrtValue]:
        return {n: ort.OrtValue.ortvalue_from_numpy(a, self._ort_device, 0) for n, a in arrays.items()}

    def check(self, adapter: LoraAdapter) -> None:
        """Refuse an adapter that was made for another model or does not fit its slots."""
        if adapter.base_fingerprint and adapter.base_fingerprint != self.fingerprint:
            quantised = ""
            if any(p.key == QUANTIZATION_KEY for p in self.base_model.metadata_props):
                quantised = ("; this base is quantised (lorad quantize-model), a base of its own: an adapter lorad "
                             "made for the fp32 model is bound to that model. Train again on this base, or bring "
                             "the adapter as plain PEFT files (without lorad's base record)")
            raise BaseModelMismatchError(
                f"adapter was made for base model {adapter.base_fingerprint}, this daemon serves {self.fingerprint}"
                + quantised
            )
        if adapter.rank > self.rank:
            raise InvalidAdapterError(f"adapter rank {adapter.rank} exceeds the slot rank {self.rank} of this model")
        scale = adapter.scale
        if not (math.isfinite(scale) and scale > 0):
            raise InvalidAdapterError(f"adapter scale {scale!r} (lora_alpha {adapter.alpha!r}) must be a finite number > 0")
        for weight, w in adapter.weights.items():
            for what, m in (("A", w.A), ("scale·B", w.B * np.float64(scale))):
                peak = float(np.max(np.abs(m), initial=0.0))
                if not peak <= MAX_LORA_MAGNITUDE:  # also refuses NaN
                    raise InvalidAdapterError(
                        f"adapter matrix {what} of {weight!r} has an entry of magnitude {peak:.3g}; allowed at most"
                        f" {MAX_LORA_MAGNITUDE:g} (check lora_alpha {adapter.alpha!r} and the saved matrices)"
                    )
            target = self._by_weight.get(weight)
            module = self.module_paths.module_of(weight)
            if target is None:
                allowed = ", ".join(sorted(self.module_paths.module_of(t.weight) for t in self.targets))
                raise InvalidAdapterError(
                    f"adapter targets module {module!r} (ONNX weight {weight!r}), which is not a LoRA target of "
                    f"this model; targets (model.targets): {allowed}"
                )
            if w.A.shape[0] != target.in_features or w.B.shape[1] != target.out_features:
                raise InvalidAdapterError(
                    f"adapter matrices for module {module!r} have A {list(w.A.shape)} and B {list(w.B.shape)}; "
                    f"this model needs A [{target.in_features}, r] and B [r, {target.out_features}]"
                )

    def prepare(self, adapter: LoraAdapter, *, name: str, version: int) -> PreparedAdapter:
        """Check, fold the scale into B, lay out as the LoRA session's inputs (zero-padded to
        the slot rank) and place on the device. The prepared adapter holds one copy of the
        numbers: its matrices, and the adapter it keeps for compositions, are views of the
        session inputs (its ``adapter`` has scale 1, B scaled)."""
        self.check(adapter)
        scale = np.float32(adapter.scale)
        arrays, matrices = self.layout.place({w: (p.A, p.B * scale) for w, p in adapter.weights.items()})
        r = adapter.rank
        folded = LoraAdapter(r, float(r), {w: LoraWeights(a[:, :r], b[:r]) for w, (a, b) in matrices.items()},
                             adapter.base_fingerprint, extra=adapter.extra)
        held = {id(a): a.nbytes for a in arrays.values() if not _is_shared_zero(a)}
        if self._ort_device == "cpu":
            ready = self._device_feeds(arrays)  # OrtValues over these arrays: no copy
            make_feeds: Callable[[], Mapping[str, ort.OrtValue]] = lambda: ready  # noqa: E731
        else:  # a copy on the device, made when first read (a decoder generates from the banks)
            make_feeds = _once(lambda: self._device_feeds(arrays))
            held = {k: 2 * v for k, v in held.items()}
        return PreparedAdapter(name, version, r, sum(held.values()), folded, make_feeds, matrices)

    def run(self, inputs: Mapping[str, np.ndarray], adapter: PreparedAdapter | None = None) -> dict[str, np.ndarray]:
        """Run one request; ``inputs`` are already checked against :attr:`inputs`."""
        names = self._output_names
        if adapter is None:  # the base model's own session: nothing to bind but the request
            return dict(zip(names, self.base_session.run(names, dict(inputs)), strict=True))
        merged = self.merged.session_for(adapter) if self.merged is not None else None
        if merged is not None:
            return dict(zip(names, merged.run(names, dict(inputs)), strict=True))
        binding = self._binding(adapter)
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:  # each call: a bound output would be taken as preallocated
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
        binding.clear_binding_outputs()  # ORT's buffers: not kept until the next call
        return outputs

    def _binding(self, adapter: PreparedAdapter) -> ort.IOBinding:
        """This thread's IO binding of the LoRA session with ``adapter``'s inputs bound: kept
        while the thread serves the same adapter (binding MiniLM's 60 LoRA inputs costs
        about 3% of its forward), rebound when it changes. A thread keeps its last
        adapter's inputs referenced until it serves another."""
        local = self._local
        session = self.session
        binding = getattr(local, "binding", None)
        if binding is None or local.session is not session:
            binding = local.binding = session.io_binding()
            local.session, local.bound = session, None
        if local.bound is not adapter:
            for name, value in adapter.feeds.items():
                binding.bind_ortvalue_input(name, value)
            local.bound = adapter
        return binding


def _is_shared_zero(array: np.ndarray) -> bool:
    """A zero input the layout shares between adapters (not this adapter's memory)."""
    return not array.flags.writeable


#: Smallest table worth sharing between sessions.
_SHARED_MIN_BYTES = 1 << 16


def _gather_tables(model: onnx.ModelProto) -> dict[str, ort.OrtValue]:
    """Initializers that only ``Gather`` nodes read (a text model's embedding tables): ONNX
    Runtime packs no copy of them for a kernel, so one array serves every session (the
    weights of MatMul and Gemm each session packs for itself, and keeps no other copy)."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    tables = {}
    for init in model.graph.initializer:
        ops = readers.get(init.name, set())
        if ops == {"Gather"} and not init.external_data:
            array = numpy_helper.to_array(init)
            if array.nbytes >= _SHARED_MIN_BYTES:
                tables[init.name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    return tables
