"""``lorad inspect-model MODEL.onnx``: what lorad can put LoRA on, and under which names.

For every LoRA-able weight (a MatMul/Gemm weight, see :mod:`lorad.adapters.module_paths`): its
ONNX name, the module path lorad recovered and from where, its shape and layout, and the
``model.targets`` entry that selects it, PEFT style. A weight without a recovered path
says why; PEFT adapters cannot name it until ``model.weight_names`` maps it. Each weight's
storage (fp32, or int8/int4 with its block size and bytes: ``lorad quantize-model``) is
listed with it, embedding tables included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from lorad.adapters.module_paths import LinearWeight, ModulePaths
from lorad.adapters.quantize import QuantizedWeight, describe, quantization_of

__all__ = ["inspect_model", "render", "to_json"]


def _row(w: LinearWeight, stored: QuantizedWeight | None) -> dict[str, Any]:
    return {
        "weight": w.weight,
        "module": w.module,
        "source": w.source,
        "note": w.note or None,
        "op": w.op,
        "shape": list(w.shape),
        "layout": "[out, in]" if w.transposed else "[in, out]",
        "in_features": w.in_features,
        "out_features": w.out_features,
        "target": w.module.rsplit(".", 1)[-1] if w.module is not None else w.weight,
        "unsupported": w.unsupported or None,
        "dtype": stored.dtype if stored else None,
        "block": stored.block if stored else None,
        "bytes": stored.bytes if stored else None,
    }


def inspect_model(path: Path) -> dict[str, Any]:
    """The report as a JSON-ready dict; ValueError names what is wrong with the file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as e:
        raise ValueError(f"{path}: no such file") from e
    except Exception as e:  # protobuf raises its own untyped errors for a file that is not ONNX
        raise ValueError(f"{path} is not an ONNX model: {type(e).__name__}: {e}") from e
    paths = ModulePaths.from_model(model)
    targets = paths.suggested_targets()
    storage = quantization_of(model)
    by_weight = {q.weight: q for q in storage}
    meta = {p.key: p.value for p in model.metadata_props}
    return {
        "model": str(path),
        "weights": [_row(w, by_weight.get(w.weight)) for w in paths.weights],
        "embeddings": [{"weight": q.weight, "dtype": q.dtype, "block": q.block, "bytes": q.bytes}
                       for q in storage if q.op in ("Gather", "GatherBlockQuantized")],
        "storage": describe(storage),
        "quantization": json.loads(meta["lorad.quantization"]) if "lorad.quantization" in meta else None,
        "unrecovered": [w.weight for w in paths.weights if w.module is None],
        "targets": targets,
        "config": "targets: [" + ", ".join(targets) + "]",
    }


def render(report: dict[str, Any]) -> str:
    """The report as a table for people."""
    rows = report["weights"]
    lines = [f"{report['model']}: {len(rows)} LoRA-able MatMul/Gemm weights"]
    if not rows:
        return lines[0] + " (none: lorad puts LoRA on MatMul/Gemm nodes whose weight is a 2-D float initializer)"
    table = [("ONNX weight", "module path", "recovered from", "op", "shape", "layout", "stored", "target")]
    for r in rows:
        table.append((r["weight"], r["module"] or "(not recovered)", r["source"] or "-", r["op"],
                      "x".join(map(str, r["shape"])), r["layout"], _stored(r), r["target"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    for r in rows:
        if r["note"]:
            lines.append(f"note: {r['weight']}: {r['note']}")
        if r["unsupported"]:
            lines.append(f"note: {r['weight']} cannot be a target: {r['unsupported']}")
    for e in report["embeddings"]:
        lines.append(f"embedding table {e['weight']}: {_stored(e)}")
    totals = ", ".join(f"{t['weights']} {dtype} ({t['bytes'] / 1e6:.2f} MB)" for dtype, t in sorted(report["storage"].items()))
    lines.append(f"weights stored as: {totals}" + (f"; quantised by lorad quantize-model --weights "
                                                   f"{report['quantization']['weights']}" if report["quantization"] else ""))
    lines.append("")
    lines.append(f"model.{report['config']}")
    if report["unrecovered"]:
        lines.append(f"{len(report['unrecovered'])} weights have no module path: PEFT adapters cannot name them "
                     "unless model.weight_names maps them ({PEFT module: ONNX weight})")
    return "\n".join(lines)


def _stored(r: dict[str, Any]) -> str:
    """``int4/32 18.4 kB``: type, block (quantised only) and bytes."""
    if r["dtype"] is None:
        return "-"
    block = f"/{r['block']}" if r["block"] else ""
    return f"{r['dtype']}{block} {r['bytes'] / 1e3:.1f} kB"


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
