"""Mixed-adapter batches in plain ONNX: LoRA banks with a per-row slot index.

The banked inference graph gives every target weight ``W`` two bank inputs,
``A [S, in, r]`` and ``B [S, r, out]`` (S slots of the slot rank r), and the graph one
``lora_slot [N]`` int64 input naming each batch row's slot. Each row gathers its own
adapter and multiplies with it, the segmented gather matrix-vector product that
Punica, S-LoRA and LoRAX run as custom GPU kernels, written here in standard operators
(Gather, batched MatMul) so any execution provider runs it::

    y[n] = x[n]·W + (x[n]·A[slot[n]])·B[slot[n]]

Slot 0 is all zeros and serves base-model rows exactly. A target's input may have more
rows than the batch (an exporter flattens ``[N, T, H]`` to ``[N·T, H]``): it is viewed as
``[N, -1, in]``, which holds whenever rows are batch-major, as every exporter lays them.

:class:`AdapterBanks` owns the bank arrays and the session over the banked graph and
places prepared adapters into slots; a slot is never rewritten while a batch that uses it
runs (:meth:`AdapterBanks.acquire` / :meth:`AdapterBanks.release`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .errors import AdapterStorageError
from .lora_graph import LoraTarget, splice_after_targets
from .onnx_compat import for_runtime, open_session

__all__ = ["SLOT_INPUT", "bank_input_names", "make_banked_inference_graph", "AdapterBanks", "PreparedLike"]

#: The per-row slot index input of the banked graph (int64 ``[N]``; 0 = base model).
SLOT_INPUT = "lora_slot"


def bank_input_names(weight: str) -> tuple[str, str]:
    """Names of the bank inputs ``A [S, in, r]`` and ``B [S, r, out]`` of a target."""
    return f"lora_bank.{weight}.A", f"lora_bank.{weight}.B"


def make_banked_inference_graph(
    model: onnx.ModelProto, targets: Sequence[LoraTarget], *, rank: int, slots: int | str = "S"
) -> onnx.ModelProto:
    """Derive the banked serving graph of ``model`` (see the module docstring)."""
    if rank <= 0:
        raise ValueError(f"slot rank must be a positive integer, got {rank}")
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    existing = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    if SLOT_INPUT in existing:
        raise ValueError(f"model already has a tensor named {SLOT_INPUT!r}")
    graph.input.append(helper.make_tensor_value_info(SLOT_INPUT, TensorProto.INT64, ["N"]))
    head: list[onnx.NodeProto] = [
        helper.make_node("Shape", [SLOT_INPUT], ["lora_bank/rows"], name="lora_bank/rows"),
    ]
    gathered: dict[str, tuple[str, str]] = {}
    for t in targets:
        a_bank, b_bank = bank_input_names(t.weight)
        if a_bank in existing or b_bank in existing:
            raise ValueError(f"model already has a tensor named {a_bank!r} or {b_bank!r}")
        graph.input.append(helper.make_tensor_value_info(a_bank, TensorProto.FLOAT, [slots, t.in_features, rank]))
        graph.input.append(helper.make_tensor_value_info(b_bank, TensorProto.FLOAT, [slots, rank, t.out_features]))
        a_rows, b_rows = f"lora_bank/{t.weight}/A_rows", f"lora_bank/{t.weight}/B_rows"
        # One gather per target, shared by every node that uses the weight.
        head.append(helper.make_node("Gather", [a_bank, SLOT_INPUT], [a_rows], name=a_rows, axis=0))
        head.append(helper.make_node("Gather", [b_bank, SLOT_INPUT], [b_rows], name=b_rows, axis=0))
        gathered[t.weight] = (a_rows, b_rows)

    batch_major = _batch_major_inputs(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    splice_after_targets(
        graph, targets,
        lambda node, t, prefix: _banked_path(graph, node, t, gathered[t.weight], prefix, batch_major.get(node.input[0]),
                                             opset),
        head=head)
    if not any("lora_bank/rows" in n.input for n in graph.node):  # every target reads batch-major rows
        graph.node.remove(next(n for n in graph.node if n.name == "lora_bank/rows"))
    onnx.checker.check_model(derived)
    return for_runtime(derived)


def _batch_major_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """Tensors ``[batch, M, features]`` (rank 3) or ``[batch, features]`` (rank 2) whose first
    dimension is the batch dimension of the graph's first input, by ONNX shape inference
    (over the graph without its weights' bytes) and the ``value_info`` an exporter declared:
    tensor → rank. A target reading one needs no ``[N, -1, in]`` view (each costs two
    Reshapes, a Shape and a Concat per target and call); a flattened ``[N·T, in]`` row
    tensor has an unknown first dimension and keeps it."""
    graph = model.graph
    if not graph.input or not graph.input[0].type.tensor_type.shape.dim:
        return {}
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not batch:
        return {}
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    for init in graph.initializer:  # shapes are what inference needs; small constants (shapes, axes) as they are
        if init.data_location != TensorProto.EXTERNAL and int(np.prod(init.dims)) <= 64:
            light.graph.initializer.append(init)
        else:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light).graph.value_info
    except Exception:  # an op the checker does not know (contrib ops): the declared shapes only
        inferred = graph.value_info
    found: dict[str, int] = {}
    for v in (*graph.input, *graph.value_info, *inferred):
        dims = v.type.tensor_type.shape.dim
        if len(dims) in (2, 3) and dims[0].dim_param == batch:
            found[v.name] = len(dims)
    return found


def _banked_path(
    graph: onnx.GraphProto, node: onnx.NodeProto, target: LoraTarget, rows: tuple[str, str], prefix: str,
    batch_major: int | None, opset: int,
) -> list[onnx.NodeProto]:
    """Nodes making ``node``'s output ``base + (x·A[slot])·B[slot]`` row by row; ``batch_major``
    is the rank of x when its first dimension is known to be the batch (else None)."""
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], suffix: str, **attrs: Any) -> str:
        out = f"{prefix}/{suffix}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(suffix: str, value: np.ndarray) -> str:
        name = f"{prefix}/{suffix}"
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    out = node.output[0]
    base_out = f"{prefix}/base"
    node.output[0] = base_out
    x = node.input[0]
    axes = const("axis1", np.array([1], np.int64)) if batch_major == 2 and opset >= 13 else None

    def axis1(op: str, tensor: str, suffix: str) -> str:  # Unsqueeze/Squeeze of axis 1
        return add(op, [tensor, axes], suffix) if axes is not None else add(op, [tensor], suffix, axes=[1])

    if batch_major == 2:  # [N, in] → [N, 1, in]
        x = axis1("Unsqueeze", x, "x_rows")
    elif batch_major is None:
        inner = const("inner", np.array([-1, target.in_features], np.int64))
        view = add("Concat", ["lora_bank/rows", inner], "view", axis=0)
        x = add("Reshape", [x, view], "x_rows")  # [N, M, in]
    xa = add("MatMul", [x, rows[0]], "xA")  # [N, M, r]
    delta = add("MatMul", [xa, rows[1]], "xAB")  # [N, M, out]
    if batch_major == 2:
        delta = axis1("Squeeze", delta, "xAB_view")
    elif batch_major is None:
        delta = add("Reshape", [delta, add("Shape", [base_out], "base_shape")], "xAB_view")
    if target.gemm_alpha != 1.0:
        delta = add("Mul", [delta, const("gemm_alpha", np.array(target.gemm_alpha, np.float32))], "xAB_alpha")
    nodes.append(helper.make_node("Add", [base_out, delta], [out], name=f"{prefix}/add"))
    return nodes


class PreparedLike(Protocol):
    """What the banks read of an :class:`lorad.adapters.engine.PreparedAdapter`."""

    @property
    def matrices(self) -> Mapping[str, tuple[np.ndarray, np.ndarray]]: ...


class _Slot:
    __slots__ = ("item", "refs")

    def __init__(self) -> None:
        #: The prepared adapter it holds, weakly: an adapter the cache dropped is not kept
        #: alive by the banks, and its slot is free for another.
        self.item: weakref.ref[object] | None = None
        self.refs = 0


class AdapterBanks:
    """Bank arrays, slot placement and the session over the banked graph.

    ``slots`` adapter slots (plus slot 0, the zero slot). A slot knows the prepared adapter
    it holds (by identity, so a new version or a composition never matches an old slot)
    and a count of the batches using it; free slots are reused least recently used first.
    The banks take ``slots × slot_bytes`` bytes, allocated once: at construction, or with
    ``lazy`` when the first adapter is placed (the session too, at the first call), so a
    daemon whose requests never mix pays for neither.
    """

    def __init__(
        self,
        base_model: onnx.ModelProto,
        targets: Sequence[LoraTarget],
        *,
        rank: int,
        slots: int,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
        options: Any = None,
        lazy: bool = False,
    ) -> None:
        """``options``: the session's ``SessionOptions`` (the engine's: its threads, shared
        tables); None: ``intra_op_threads`` and lorad's defaults."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.rank = rank
        self._targets = list(targets)
        self._base_model, self._providers, self._threads = base_model, list(providers), intra_op_threads
        self._options = options
        self._session: Any = None
        self._banks: dict[str, np.ndarray] = {}
        self.slot_bytes = sum(4 * rank * (t.in_features + t.out_features) for t in self._targets)
        self._lock = threading.Lock()
        self._table: OrderedDict[int, _Slot] = OrderedDict((i, _Slot()) for i in range(1, slots + 1))
        self._where: dict[int, int] = {}  # id(prepared adapter) → its slot, checked against the slot's weakref
        self._local = threading.local()
        if not lazy:
            with self._lock:
                self._allocate()
            self.session  # noqa: B018 - opened now

    @property
    def session(self) -> Any:
        """The session over the banked graph (opened at the first call when ``lazy``)."""
        with self._lock:
            if self._session is None:
                graph = make_banked_inference_graph(self._base_model, self._targets, rank=self.rank, slots=self.slots + 1)
                options = self._options
                if options is None:
                    options = ort.SessionOptions()
                    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    options.intra_op_num_threads = self._threads
                    options.enable_cpu_mem_arena = False  # as the engine's session (engine.py says why)
                try:
                    self._session = open_session(graph, options, self._providers)
                except Exception as e:  # ORT raises its own untyped errors for invalid graphs
                    raise AdapterStorageError(f"ONNX Runtime could not load the banked graph: {e}") from e
                self._output_names = [o.name for o in self._session.get_outputs()]
            return self._session

    def _allocate(self) -> None:
        if not self._banks:
            for t in self._targets:
                a_bank, b_bank = bank_input_names(t.weight)
                self._banks[a_bank] = np.zeros((self.slots + 1, t.in_features, self.rank), np.float32)
                self._banks[b_bank] = np.zeros((self.slots + 1, self.rank, t.out_features), np.float32)

    @property
    def opened(self) -> bool:
        """Whether the banks' session is open (a lazy one opens at the first mixed batch)."""
        return self._session is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the bank arrays (allocated or to be)."""
        return self.slot_bytes * (self.slots + 1)

    def acquire(self, prepared: PreparedLike | None) -> int | None:
        """The slot holding ``prepared`` (placing it if needed), counted as in use until
        :meth:`release`; 0 for the base model; None when every slot is in use."""
        return self.acquire_all([prepared])[0]

    def acquire_all(self, adapters: Sequence[PreparedLike | None]) -> list[int | None]:
        """:meth:`acquire` of each, under one lock (a batch's rows)."""
        with self._lock:
            return [self._acquire(p) for p in adapters]

    def _acquire(self, prepared: PreparedLike | None) -> int | None:
        if prepared is None:
            return 0
        index = self._where.get(id(prepared))
        if index is not None:
            slot = self._table[index]
            if slot.item is not None and slot.item() is prepared:
                slot.refs += 1
                self._table.move_to_end(index)
                return index
        free = next((i for i, s in self._table.items() if s.refs == 0), None)  # least recently used
        if free is None:
            return None
        self._allocate()
        slot = self._table[free]
        self._where = {k: v for k, v in self._where.items() if v != free}  # one entry per slot at most
        slot.refs = 1
        slot.item = weakref.ref(prepared)
        self._where[id(prepared)] = free
        self._table.move_to_end(free)
        # Written under the lock: no batch uses this slot (refs was 0), and no other
        # thread can place into it meanwhile.
        for t in self._targets:
            a_bank, b_bank = bank_input_names(t.weight)
            pair = prepared.matrices.get(t.weight)
            if pair is None:  # the adapter leaves this target alone
                self._banks[a_bank][free] = 0
                self._banks[b_bank][free] = 0
            else:
                self._banks[a_bank][free], self._banks[b_bank][free] = pair
        return free

    def release(self, *slots: int) -> None:
        """End one use of each of ``slots`` (from :meth:`acquire`; 0 is never held)."""
        with self._lock:
            for slot in slots:
                if slot:
                    self._table[slot].refs -= 1

    def in_use(self) -> dict[int, int]:
        """Slot → number of batches using it (for tests and inspection)."""
        with self._lock:
            return {i: s.refs for i, s in self._table.items() if s.refs}

    def _binding(self) -> Any:
        """This thread's IO binding, with the banks bound once: the bank arrays are written in
        place, never replaced (a decoder with 210 targets: 420 binds, 0.9 ms, saved per call)."""
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self.session.io_binding()
            with self._lock:
                self._allocate()  # a batch of base-model rows only: slot 0's zeros
            for name, bank in self._banks.items():
                binding.bind_cpu_input(name, bank)
            self._local.binding = binding
        return binding

    def run(self, inputs: Mapping[str, np.ndarray], slots: np.ndarray) -> dict[str, np.ndarray]:
        """One call over a mixed batch: ``slots[n]`` is row n's slot (from :meth:`acquire`)."""
        binding = self._binding()
        # Kept referenced until the call returns: the binding points into these arrays.
        feeds = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        feeds[SLOT_INPUT] = np.ascontiguousarray(slots, dtype=np.int64)
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in self._output_names:  # each call: a bound output would be taken as preallocated
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))
