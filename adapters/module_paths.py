"""Which module of the exported torch model each MatMul/Gemm weight belongs to.

PEFT names LoRA tensors by module path (``layers.0.attn.q_proj``); exporters name ONNX
weights however they like: the TorchScript exporter keeps ``head.weight`` for a Gemm but
stores a MatMul weight transposed under ``onnx::MatMul_226``, the dynamo exporter calls it
``val_5``, Optimum is the TorchScript exporter on a Hugging Face model. The module path
survives elsewhere, and this module reads it back, per weight, from (in this order):

``override``     the user's ``model.weight_names`` (PEFT module → ONNX weight);
``name_scope``   dynamo's node metadata ``pkg.torch.onnx.name_scopes``
                 (``['', 'layers.0', 'layers.0.attn.q_proj', 'linear']``);
``node_name``    TorchScript/Optimum node names (``/layers.0/attn/q_proj/MatMul``);
``initializer``  the weight's own name when it is a torch parameter name (``head.weight``);
``bias``         the bias added to the product (``layers.0.up.bias``), which exporters keep
                 named even when the weight is anonymous (dynamo at opset 17).

A weight whose users disagree, or whose path another weight also claims, keeps no path
and says why; :class:`ModulePaths` is what the rest of lorad asks: PEFT module → weight
(:meth:`ModulePaths.weight_of`), weight → PEFT module (:meth:`ModulePaths.module_of`) and
which weights ``model.targets`` selects (:meth:`ModulePaths.select`).

A weight is "LoRA-able" when it is a 2-D float initializer that is the right operand of
a MatMul or the B operand of a Gemm, directly or through a ``Transpose`` (perm ``[1, 0]``),
which is how exporters that do not fold constants store ``x·Wᵀ``; or the packed uint8 ``B``
initializer of a ``com.microsoft.MatMulNBits`` (a 4-bit base weight: ``y = x·dequant(B)ᵀ``,
``K`` in and ``N`` out features from the node's attributes). LoRA's path reads the node's
input and adds to its output, so a quantised weight takes it as a float one does.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

__all__ = [
    "SOURCES",
    "LinearWeight",
    "ModulePaths",
    "linear_weight_resolver",
]

SOURCES = ("override", "name_scope", "node_name", "initializer", "bias")
_LINEAR_OPS = ("MatMul", "Gemm")
_NBITS = "MatMulNBits"
_MS_DOMAIN = "com.microsoft"
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_NODE_NAME = re.compile(r"^/(?P<path>[^/]+(?:/[^/]+)*)/(?:MatMulNBits|MatMul|Gemm)(?:_\d+)?$")
# A parameter name, possibly as lorad's quantiser left it: transposed to [in, out] (``.T``),
# then packed by ONNX Runtime's (``_Q4``/``_Q8``), see adapters/quantize.py.
_PARAM = re.compile(r"^(?P<module>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*?)\.(?P<kind>weight|bias)(?:\.T)?(?:_Q[248])?$")
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class LinearWeight:
    """One LoRA-able weight: where it is in the graph and which module it belongs to.

    ``shape`` is the initializer's; ``transposed`` means it is stored ``[out, in]`` (Gemm
    ``transB=1``, or a Transpose before the MatMul), so ``in_features``/``out_features``
    are those of ``x·W``. ``module`` is ``None`` when no source gave a usable path;
    ``note`` then says why. ``unsupported`` is set for uses lorad cannot add LoRA to.
    """

    weight: str
    op: str
    shape: tuple[int, int]
    transposed: bool
    gemm_alpha: float
    nodes: tuple[str, ...]
    module: str | None
    source: str | None
    note: str = ""
    unsupported: str = ""

    @property
    def in_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def peft_name(self) -> str:
        """The PEFT module name lorad writes for this weight."""
        return self.module if self.module is not None else _strip_weight(self.weight)


def _strip_weight(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value if isinstance(value, (int, float)) else default
    return default


def _is_matrix(init: onnx.TensorProto) -> bool:
    return init.data_type == TensorProto.FLOAT and len(init.dims) == 2


def _is_nbits(node: onnx.NodeProto) -> bool:
    return node.op_type == _NBITS and node.domain == _MS_DOMAIN


def linear_weight_resolver(graph: onnx.GraphProto) -> Callable[[onnx.NodeProto], tuple[str, bool] | None]:
    """A function giving, for a MatMul/Gemm/MatMulNBits node, ``(weight, through_transpose)`` or None.

    ``weight`` is the 2-D float initializer that is the node's second operand, directly
    or through a ``Transpose`` with perm ``[1, 0]``; for MatMulNBits, its packed ``B``.
    """
    # A table that a Gather also reads is a tied embedding, not a linear of its own: the tied
    # LM head of an imported GGUF model reads its 8-bit embedding table (llama_builder.py).
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input}
    matrices = {i.name for i in graph.initializer if _is_matrix(i)}
    packed = {i.name for i in graph.initializer if i.data_type == TensorProto.UINT8 and i.name not in gathered}
    transposed: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in matrices:
            perm = [a for a in node.attribute if a.name == "perm"]
            if not perm or list(perm[0].ints) == [1, 0]:
                transposed[node.output[0]] = node.input[0]

    def resolve(node: onnx.NodeProto) -> tuple[str, bool] | None:
        if _is_nbits(node):
            return (node.input[1], False) if len(node.input) >= 3 and node.input[1] in packed else None
        if node.op_type not in _LINEAR_OPS or len(node.input) < 2:
            return None
        operand = node.input[1]
        if operand in matrices:
            return operand, False
        if operand in transposed:
            return transposed[operand], True
        return None

    return resolve


def _scope_module(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # [module stack ..., fx node name]: the innermost module is the one before last.
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
                return scopes[-2]
    return None


def _node_name_module(node: onnx.NodeProto) -> str | None:
    m = _NODE_NAME.match(node.name)
    return ".".join(m.group("path").split("/")) if m else None


def _param_module(name: str, kind: str) -> str | None:
    m = _PARAM.match(name)
    return m.group("module") if m and m.group("kind") == kind else None


class ModulePaths:
    """The LoRA-able weights of one graph and the module path recovered for each."""

    def __init__(self, weights: Iterable[LinearWeight]) -> None:
        self.weights: tuple[LinearWeight, ...] = tuple(weights)
        self.by_weight: dict[str, LinearWeight] = {w.weight: w for w in self.weights}
        self.by_module: dict[str, LinearWeight] = {w.module: w for w in self.weights if w.module is not None}

    @classmethod
    def from_model(cls, model: onnx.ModelProto, *, overrides: Mapping[str, str] | None = None) -> ModulePaths:
        """Recover the module path of every LoRA-able weight of ``model``.

        ``overrides`` (``model.weight_names``) maps PEFT module names to ONNX weight names
        and wins over every other source; naming a weight that is not LoRA-able is an error.
        """
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        resolve = linear_weight_resolver(graph)
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)

        uses: dict[str, list[tuple[onnx.NodeProto, bool]]] = defaultdict(list)
        for node in graph.node:
            found = resolve(node)
            if found is not None:
                uses[found[0]].append((node, found[1]))

        def bias_module(node: onnx.NodeProto) -> str | None:
            if node.op_type == "Gemm" and len(node.input) > 2:
                return _param_module(node.input[2], "bias")
            for user in consumers.get(node.output[0], []):
                if user.op_type == "Add":
                    for other in user.input:
                        if other != node.output[0] and other in inits:
                            return _param_module(other, "bias")
            return None

        claims: dict[str, tuple[str | None, str | None, str]] = {}  # weight -> (module, source, note)
        for weight, nodes in uses.items():
            claims[weight] = _recover(weight, [n for n, _ in nodes], bias_module)

        by_override = {w: m for m, w in (overrides or {}).items()}
        unknown = sorted(set(by_override) - set(uses))
        if unknown:
            raise ValueError(
                f"model.weight_names names {unknown}, which are not MatMul/Gemm weights of the model; "
                f"LoRA-able weights: {', '.join(sorted(uses)[:20]) or '(none)'}"
            )
        for weight, given in by_override.items():
            claims[weight] = (given, "override", "")

        owners: dict[str, list[str]] = defaultdict(list)
        for weight, (claimed, _, _) in claims.items():
            if claimed is not None:
                owners[claimed].append(weight)

        weights = []
        for weight, nodes in uses.items():
            module, source, note = claims[weight]
            if module is not None and len(owners[module]) > 1 and source != "override":
                others = [w for w in owners[module] if w != weight]
                fallback = _param_module(weight, "weight")
                if fallback is not None and fallback not in owners:
                    module, source, note = fallback, "initializer", ""
                else:
                    module, source, note = None, None, f"module path {module!r} is also claimed by {others}"
            weights.append(_describe(inits[weight], nodes, module, source, note))
        return cls(weights)

    # -- PEFT names <-> ONNX weights ---------------------------------------------------

    def module_of(self, weight: str) -> str:
        """The PEFT module name for ``weight`` (its path, else its name without ``.weight``)."""
        w = self.by_weight.get(weight)
        return w.peft_name if w is not None else _strip_weight(weight)

    def weight_of(self, module: str) -> str | None:
        """The ONNX weight a PEFT module name refers to, or None.

        Tried in order: the recovered module path; an ONNX weight name (files lorad wrote
        before it recovered paths used those) or that name plus ``.weight``; a unique
        match where one dotted path ends with the other (a PEFT model trained on
        ``BertForSequenceClassification`` against an export of ``BertModel``).
        """
        if module in self.by_module:
            return self.by_module[module].weight
        for name in (module, f"{module}.weight"):
            if name in self.by_weight:
                return name
        matches = [w.weight for w in self.weights if w.module is not None and _suffix_related(w.module, module)]
        return matches[0] if len(matches) == 1 else None

    # -- model.targets -----------------------------------------------------------------

    def select(self, patterns: Sequence[str]) -> list[LinearWeight]:
        """The weights ``model.targets`` chooses, in graph order.

        A pattern matches a weight when it matches its module path as PEFT's
        ``target_modules`` does (the whole path or a dotted suffix: ``q_proj`` matches
        ``layers.0.attn.q_proj``), as a glob over the path or its dotted suffixes
        (``layers.*.q_proj``, ``*_proj``), or as a glob over the ONNX weight name or
        ``<module>.weight`` (``layers.*.attn.*_proj.weight``, ``onnx::MatMul_12``). Every
        pattern must match something, so a typo is reported instead of serving nothing.
        """
        if not patterns:
            raise ValueError("LoRA targets: give at least one module pattern or weight name")
        chosen: set[str] = set()
        for pattern in patterns:
            matched = [w.weight for w in self.weights if _matches(w, pattern)]
            if not matched:
                raise ValueError(
                    f"LoRA target pattern {pattern!r} matches no MatMul/Gemm weight; "
                    f"modules that can be targets: {self._candidates()} "
                    "(`lorad inspect-model MODEL.onnx` lists them all)"
                )
            chosen.update(matched)
        return [w for w in self.weights if w.weight in chosen]

    def _candidates(self) -> str:
        names = [w.peft_name for w in self.weights]
        return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "") or "(none)"

    def suggested_targets(self) -> list[str]:
        """The ``model.targets`` line a user would write: leaf module names, PEFT style."""
        leaves: list[str] = []
        for w in self.weights:
            leaf = w.module.rsplit(".", 1)[-1] if w.module is not None else w.weight
            if leaf not in leaves:
                leaves.append(leaf)
        return leaves


def _suffix_related(path: str, key: str) -> bool:
    return path.endswith("." + key) or key.endswith("." + path)


def _matches(w: LinearWeight, pattern: str) -> bool:
    names = [w.weight]
    if w.module is not None:
        names.append(f"{w.module}.weight")
        if not _GLOB.search(pattern) and (w.module == pattern or w.module.endswith("." + pattern)):
            return True
        if fnmatch.fnmatchcase(w.module, pattern) or fnmatch.fnmatchcase(w.module, "*." + pattern):
            return True
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


def _recover(
    weight: str, nodes: Sequence[onnx.NodeProto], bias_module: Callable[[onnx.NodeProto], str | None]
) -> tuple[str | None, str | None, str]:
    """(module, source, note) of one weight from the nodes that use it."""
    per_source: list[tuple[str, list[str | None]]] = [
        ("name_scope", [_scope_module(n) for n in nodes]),
        ("node_name", [_node_name_module(n) for n in nodes]),
        ("initializer", [_param_module(weight, "weight")]),
        ("bias", [bias_module(n) for n in nodes]),
    ]
    disagreement = ""
    for source, found in per_source:
        paths = {p for p in found if p is not None}
        if len(paths) == 1 and None not in found:
            return paths.pop(), source, ""
        if len(paths) > 1 and not disagreement:
            disagreement = f"used by several modules ({', '.join(sorted(paths))})"
    note = disagreement or (
        "no module path in the weight's name, its nodes' names or metadata, or its bias; "
        "map it with model.weight_names"
    )
    return None, None, note


def _describe(
    init: onnx.TensorProto,
    nodes: Sequence[tuple[onnx.NodeProto, bool]],
    module: str | None,
    source: str | None,
    note: str,
) -> LinearWeight:
    kinds = set()
    unsupported = ""
    shape = tuple(int(d) for d in init.dims[:2])
    for node, via_transpose in nodes:
        if _is_nbits(node):
            # x·Wᵀ with W [N, K] stored quantised: [in, out] = [K, N] as LoRA sees it.
            shape = (int(_attr(node, "K", 0)), int(_attr(node, "N", 0)))
            kinds.add((_NBITS, False, 1.0))
        elif node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                unsupported = "Gemm with transA=1 is not supported"
            kinds.add(("Gemm", bool(_attr(node, "transB", 0)) != via_transpose, float(_attr(node, "alpha", 1.0))))
        else:
            kinds.add(("MatMul", via_transpose, 1.0))
    if len(kinds) != 1:
        unsupported = unsupported or f"used by linear nodes of different kinds: {sorted(kinds)}"
    op, transposed, alpha = sorted(kinds)[0]
    return LinearWeight(
        weight=init.name,
        op=op,
        shape=(shape[0], shape[1]),
        transposed=transposed,
        gemm_alpha=alpha,
        nodes=tuple(n.name for n, _ in nodes),
        module=module,
        source=source,
        note=note,
        unsupported=unsupported,
    )
