"""``lorad inspect-model MODEL.onnx``: what lorad can put LoRA on, and under which names.

For every LoRA-able weight (a MatMul/Gemm weight, see :mod:`lorad.adapters.module_paths`): its
ONNX name, the module path lorad recovered and from where, its shape and layout, and the
``model.targets`` entry that selects it, PEFT style. A weight without a recovered path
says why; PEFT adapters cannot name it until ``model.weight_names`` maps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from lorad.adapters.module_paths import LinearWeight, ModulePaths

__all__ = ["inspect_model", "render", "to_json"]


def _row(w: LinearWeight) -> dict[str, Any]:
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
    return {
        "model": str(path),
        "weights": [_row(w) for w in paths.weights],
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
    table = [("ONNX weight", "module path", "recovered from", "op", "shape", "layout", "target")]
    for r in rows:
        table.append((r["weight"], r["module"] or "(not recovered)", r["source"] or "-", r["op"],
                      "x".join(map(str, r["shape"])), r["layout"], r["target"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    for r in rows:
        if r["note"]:
            lines.append(f"note: {r['weight']}: {r['note']}")
        if r["unsupported"]:
            lines.append(f"note: {r['weight']} cannot be a target: {r['unsupported']}")
    lines.append("")
    lines.append(f"model.{report['config']}")
    if report["unrecovered"]:
        lines.append(f"{len(report['unrecovered'])} weights have no module path: PEFT adapters cannot name them "
                     "unless model.weight_names maps them ({PEFT module: ONNX weight})")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
