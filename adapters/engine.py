"""The inference engine: one ONNX Runtime session serves the base model and every adapter.

The session runs the fused inference graph of :mod:`lorad.adapters.lora_fused`. An adapter is turned
once into a :class:`PreparedAdapter` (checked against the base model, zero-padded to the
slot rank, scale folded into B, copied to the device) so that switching adapters between
requests costs no I/O and no conversion. Requests without an adapter feed zero matrices,
which leaves the base model's outputs exactly unchanged.

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

from .errors import AdapterStorageError, BaseModelMismatchError, InvalidAdapterError
from .input_domains import input_domains
from .llama_builder import LLM_CONFIG_KEY
from .lora import LoraAdapter
from .lora_fused import FusedLayout, make_fused_inference_graph
from .lora_graph import LoraTarget, digest_model, find_targets, fingerprint
from .memory import trim_now
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
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device {device!r} is not supported; allowed: {', '.join(DEVICES)}")
        if rank <= 0:
            raise ValueError(f"slot rank must be a positive integer, got {rank}")
        base = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        if any(n.op_type == "MatMulNBits" for n in base.graph.node):
            base = set_quantized_compute(_copy(base) if isinstance(model, onnx.ModelProto) else base, quantized_compute)
        # Unlowered: an 8-bit target must stay a MatMulNBits to be found and get its LoRA
        # path; the derived graphs go through for_runtime with that path in place.
        self.base_model = for_runtime(base, lower_nbits8=False)
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
        graph, self._layout = self._fused_graph()
        self._graph: onnx.ModelProto | None = graph
        lora_names = set(self._layout.input_names)
        self.inputs = [s for s in _graph_specs(graph.graph, "input") if s.name not in lora_names]
        self.outputs = list(_graph_specs(graph.graph, "output"))
        self._output_names = [o.name for o in self.outputs]
        self._by_weight = {t.weight: t for t in self.targets}
        self._zero_feeds = self._device_feeds(self._layout.feeds({}))
        self._session: ort.InferenceSession | None = None
        self._session_lock = threading.Lock()
        self._on_demand = LLM_CONFIG_KEY in {p.key for p in base.metadata_props}
        if self._on_demand:
            # A decoder language model generates in its own session (lorad.adapters.generation):
            # this one opens at the first /infer, not to hold a second copy of the weights.
            self._graph = None
        else:
            self._open_session()

    def _fused_graph(self) -> tuple[onnx.ModelProto, FusedLayout]:
        # The fused form (shared A products, adds folded into bias adds and Gemms): the
        # same arithmetic as lora_graph.make_inference_graph with fewer kernels.
        return make_fused_inference_graph(self.base_model, self.targets, rank=self.rank)

    @property
    def session(self) -> ort.InferenceSession:
        """The ONNX Runtime session over the fused inference graph."""
        return self._session if self._session is not None else self._open_session()

    def release_session(self) -> None:
        """Close a decoder's on-demand session (opened by /infer or the trainer's validation
        gate: SmolLM2, about 350 MB); its next use opens it again. Calls running on it finish.
        Other models keep theirs: it is their serving path."""
        if self._on_demand:
            with self._session_lock:
                self._session = None
            trim_now()  # glibc would keep the freed pages

    def _open_session(self) -> ort.InferenceSession:
        with self._session_lock:
            if self._session is not None:
                return self._session
            graph = self._graph if self._graph is not None else self._fused_graph()[0]
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self._threads
            # No CPU arena: ORT's arena keeps a large request's peak for good (MiniLM: +210 MB
            # after one 8k-token call), while without it the memory goes back (with
            # malloc_trim, adapters/memory.py); measured no slower on MiniLM or the demo MLP.
            options.enable_cpu_mem_arena = False
            if not self._allow_spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self._session = open_session(graph, options, self.providers)
            except Exception as e:  # ORT raises its own untyped errors for invalid graphs
                raise AdapterStorageError(f"ONNX Runtime could not load the base model: {e}") from e
            self._graph = None  # ORT holds what it needs
            return self._session

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
        """Check, pad to the slot rank, fold the scale into B and place on the device."""
        self.check(adapter)
        matrices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for weight, w in adapter.weights.items():
            target = self._by_weight[weight]
            a = np.zeros((target.in_features, self.rank), np.float32)
            b = np.zeros((self.rank, target.out_features), np.float32)
            a[:, : adapter.rank] = w.A
            b[: adapter.rank, :] = w.B * np.float32(adapter.scale)
            matrices[weight] = (a, b)
        held = {id(m): m.nbytes for pair in matrices.values() for m in pair}

        def feeds() -> dict[str, ort.OrtValue]:
            arrays = self._layout.feeds(matrices)
            return self._device_feeds(arrays)

        if self._graph is None and self._session is None:
            # A decoder generates through the banks, which read the matrices: the engine
            # session's grouped inputs (about twice the matrices) are made if /infer asks.
            make_feeds = _once(feeds)
        else:
            arrays = self._layout.feeds(matrices)
            ready = self._device_feeds(arrays)
            held |= {id(a): a.nbytes for a in arrays.values()}  # the grouped inputs too
            make_feeds = lambda: ready  # noqa: E731
        return PreparedAdapter(name, version, adapter.rank, sum(held.values()), adapter, make_feeds, matrices)

    def run(self, inputs: Mapping[str, np.ndarray], adapter: PreparedAdapter | None = None) -> dict[str, np.ndarray]:
        """Run one request; ``inputs`` are already checked against :attr:`inputs`."""
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in (adapter.feeds if adapter is not None else self._zero_feeds).items():
            binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))
