"""``loractl infer`` and ``loractl health``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .client import ApiError, UsageError, quoted
from .context import Context, add_command

__all__ = ["register"]

_SHOW_VALUES = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "infer",
        _infer,
        help="run one inference request",
        description="Send tensors as --input NAME=JSON (a number or nested list; the batch "
        "dimension is added when missing) or a whole Open Inference Protocol request with --data FILE.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", metavar="NAME=JSON", help="one input tensor (repeatable)")
    src.add_argument("--data", type=Path, metavar="FILE", help="a JSON infer request body")
    p.add_argument("--adapter", help="adapter name (default: the base model)")
    p.add_argument("--output", action="append", metavar="NAME", help="only these outputs (repeatable)")

    add_command(sub, "health", _health, help="is the daemon live and ready (exit 0 when ready)")


def _request_from_inputs(args: argparse.Namespace, ctx: Context) -> dict[str, object]:
    import numpy as np  # here, not at the top: loractl's other commands start without numpy

    meta = ctx.client.call("GET", f"/v2/models/{quoted(ctx.model)}")
    specs = {t["name"]: t for t in meta.get("inputs", [])} if isinstance(meta, dict) else {}
    tensors = []
    for item in args.input:
        name, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--input {item!r}: expected NAME=JSON")
        spec = specs.get(name)
        if spec is None:
            raise UsageError(f"--input {name!r}: the model has no such input; its inputs are: {', '.join(specs)}")
        try:
            value = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--input {name!r}: not valid JSON: {e}") from e
        array = np.asarray(value)
        if array.dtype == object:
            raise UsageError(f"--input {name!r}: the nested lists are ragged")
        shape = list(array.shape)
        if len(shape) == len(spec["shape"]) - 1:
            shape = [1, *shape]
        tensors.append({"name": name, "datatype": spec["datatype"], "shape": shape, "data": array.ravel().tolist()})
    return {"inputs": tensors}


def _infer(args: argparse.Namespace, ctx: Context) -> int:
    if args.data is not None:
        try:
            body = json.loads(args.data.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--data {str(args.data)!r}: cannot read a JSON request: {e}") from e
        if not isinstance(body, dict):
            raise UsageError(f"--data {str(args.data)!r}: the request must be a JSON object")
    else:
        body = _request_from_inputs(args, ctx)
    if args.adapter:
        params = body.setdefault("parameters", {})
        if isinstance(params, dict):
            params["adapter"] = args.adapter
    if args.output:
        body["outputs"] = [{"name": n} for n in args.output]
    data = ctx.client.call("POST", f"/v2/models/{quoted(ctx.model)}/infer", json_body=body)
    ctx.emit(data, _render_infer)
    return 0


def _render_infer(d: object) -> str:
    import numpy as np  # here, not at the top: loractl's other commands start without numpy

    if not isinstance(d, dict):
        return str(d)
    params = d.get("parameters") or {}
    adapter = params.get("adapter") if isinstance(params, dict) else None
    version = params.get("adapter_version") if isinstance(params, dict) else None
    lines = [f"model {d.get('model_name')} · " + (f"adapter {adapter} v{version}" if adapter else "base model")]
    for out in d.get("outputs", []):
        values = out.get("data", [])
        shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values[:_SHOW_VALUES])
        more = f", … ({len(values)} values)" if len(values) > _SHOW_VALUES else ""
        lines.append(f"{out.get('name')} {out.get('datatype')} {out.get('shape')}: [{shown}{more}]")
        shape = out.get("shape") or []
        if len(shape) == 2 and shape[0] >= 1 and values and isinstance(values[0], float):
            rows = np.asarray(values, dtype=np.float64).reshape(shape)
            lines.append(f"  argmax per row: {rows.argmax(axis=1).tolist()}")
    return "\n".join(lines)


def _health(args: argparse.Namespace, ctx: Context) -> int:
    live = ctx.client.call("GET", "/v2/health/live")
    try:
        ready = ctx.client.call("GET", "/v2/health/ready")
    except ApiError as e:
        if e.status != 503:
            raise
        ready = {"ready": False}
    doc = {
        "live": bool(isinstance(live, dict) and live.get("live")),
        "ready": bool(isinstance(ready, dict) and ready.get("ready")),
        "url": ctx.client.where,
    }
    ctx.emit(doc, lambda d: f"lorad at {doc['url']}: live {'yes' if doc['live'] else 'no'}, ready {'yes' if doc['ready'] else 'no'}")
    return 0 if doc["ready"] else 1
