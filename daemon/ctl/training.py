"""``loractl train``, ``loractl privacy`` and ``loractl examples ...``.

``train ADAPTER`` starts a manual run and follows it with a progress bar (polling the
daemon's progress endpoint); Ctrl-C stops following, not training. ``privacy`` prints
what the ledger charged, with every run's q, σ, C and steps so that ε can be recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import ApiError, ConnectError, UsageError, quoted
from .context import Context, add_command
from .output import number, table

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["register"]

_DONE_STATES = ("finished", "idle")
_RUN_COLUMNS = ("run_id", "status", "q", "sigma", "clip_norm", "steps_charged", "examples", "energy_joules", "accountant",
                "delta", "started_at", "ended_at")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "train", _train, help="train an adapter now (differentially private), with progress",
                    description="Start a manual DP-SGD run of ADAPTER on the examples stored on the device and "
                    "follow it until it ends (Ctrl-C stops following; the run goes on).")
    p.add_argument("adapter")
    p.add_argument("--detach", action="store_true", help="start the run and return at once")
    p.add_argument("--cancel", action="store_true", help="cancel the adapter's queued or running run instead")
    p.add_argument("--status", action="store_true", help="show the adapter's run progress or last result")
    p.add_argument("--poll", type=float, default=0.5, metavar="SECONDS", help="progress poll interval (default 0.5)")

    p = add_command(sub, "privacy", _privacy, help="privacy spent per adapter (ε, δ, budget, every run); "
                    "'privacy audit ADAPTER' runs the one-run canary audit",
                    description="'loractl privacy [ADAPTER]' prints the ledger. 'loractl privacy audit ADAPTER' "
                    "trains once on a copy of ADAPTER's data with gradient canaries clipped like its examples and "
                    "prints the estimated ε (Andrew et al. 2024) and a rigorous lower bound (Steinke, Nasr, Jagielski "
                    "2023) next to the accounted ε; exit 1 on a violation; nothing is served or charged.")
    p.add_argument("words", nargs="*", metavar="ADAPTER | audit ADAPTER",
                   help="one adapter (default: every adapter in the ledger), or 'audit ADAPTER'")
    p.add_argument("--canaries", type=int, default=1000, help="canaries of the audit (default 1000)")

    group = sub.add_parser("examples", help="local training examples (stay on the device)")
    cmds = group.add_subparsers(dest="examples_command", required=True, metavar="ACTION")
    p = add_command(cmds, "add", _examples_add, help="store training examples for ADAPTER",
                    description="One example from --text (a text model, with --label; a language model's text "
                    "alone) or --input NAME=JSON (repeatable) with --label; or many from --file with one JSON "
                    'object per line: {"text": "...", "label": "label name"} for a text model (the JSONL of '
                    'examples/intents/data), {"text": "...", "user": "id"} for a language model (the JSONL of '
                    'examples/keyboard/data), or {"inputs": {NAME: nested list, ...}, "label": L}; a --file whose '
                    "first line does not start with '{' is plain text, one language-model example per line. "
                    "Texts are tokenized by the daemon, with the tokenizer it serves with.")
    p.add_argument("adapter")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="TEXT", help="the text of one example (a model that carries a tokenizer, "
                     "or a language model)")
    src.add_argument("--input", action="append", metavar="NAME=JSON", help="one input tensor of the example")
    src.add_argument("--file", type=Path, metavar="FILE", help="JSON lines, one example per line")
    p.add_argument("--label", metavar="LABEL", help="the label: with --text a label name (kitchen/light_off) or "
                   "class number; with --input a class number or a nested list (JSON)")
    p.add_argument("--user", metavar="ID", help="who contributed the examples (trainer.store.max_examples_per_user "
                   "bounds how many one user may add)")
    p = add_command(cmds, "count", _examples_count, help="how many examples ADAPTER has")
    p.add_argument("adapter")
    p = add_command(cmds, "delete", _examples_delete, help="delete every stored example of ADAPTER",
                    description="The privacy already spent on them stays in the ledger.")
    p.add_argument("adapter")


def _base(ctx: Context, adapter: str) -> str:
    return f"/v2/models/{quoted(ctx.model)}/adapters/{quoted(adapter)}"


# ---------------------------------------------------------------- train


def _train(args: argparse.Namespace, ctx: Context) -> int:
    path = f"{_base(ctx, args.adapter)}/train"
    if args.cancel:
        ctx.emit(ctx.client.call("POST", path + "/cancel", auth=True), lambda d: f"cancelled training of {args.adapter}")
        return 0
    if args.status:
        ctx.emit(ctx.client.call("GET", path, auth="optional"), _render_status)
        return 0
    started = ctx.client.call("POST", path, auth=True)
    run_id = started.get("run_id") if isinstance(started, dict) else None
    if args.detach:
        ctx.emit(started, lambda d: f"training run {run_id} of {args.adapter} started")
        return 0
    try:
        final = _follow(ctx, path, run_id, args.poll, show_bar=not ctx.as_json)
    except KeyboardInterrupt:
        print(f"\nstopped following; run {run_id} goes on (loractl train {args.adapter} --status)", file=sys.stderr)
        return 1
    ctx.emit(final, _render_status)
    return 0 if final.get("status") == "accepted" else 1


def _follow(ctx: Context, path: str, run_id: object, poll: float, *, show_bar: bool) -> dict[str, Any]:
    bar: tqdm[Any] | None = None
    try:
        while True:
            doc = ctx.client.call("GET", path, auth="optional")
            status = doc if isinstance(doc, dict) else {}
            same_run = status.get("run_id") == run_id
            if same_run and status.get("state") in _DONE_STATES:
                return status
            planned, done = status.get("planned_steps"), status.get("steps_done") or 0
            if show_bar and same_run and isinstance(planned, int):
                if bar is None:
                    import tqdm as progress  # here: only a followed run shows a bar

                    bar = progress.tqdm(total=planned, unit="step", desc=f"run {run_id}", file=sys.stderr, dynamic_ncols=True)
                bar.update(max(0, int(done) - bar.n))
                eps = status.get("epsilon")
                waiting = status.get("waiting_for") or []
                bar.set_postfix_str(", ".join(
                    [f"ε {eps:.3g}" if isinstance(eps, (int, float)) else "", str(status.get("phase", "")),
                     *(["paused"] if status.get("paused") else []), *[str(w) for w in waiting]]).strip(", "))
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()


def _render_status(d: object) -> str:
    if not isinstance(d, dict):
        return str(d)
    state = d.get("state")
    if state in ("running", "queued"):
        head = f"run {d.get('run_id')} of {d.get('adapter')}: {state}"
        if d.get("phase"):
            head += f", {d['phase']}"
        planned = d.get("planned_steps")
        steps = f"{number(d.get('steps_done') or 0)}/{number(planned)} steps" if planned is not None else "steps not planned yet"
        eps = d.get("epsilon")
        spent = (f"ε spent by this run so far {number(eps)} (accounted at step {number(d.get('epsilon_steps'))})"
                 if eps is not None else "no ε accounted by this run yet")
        return f"{head}, {steps}, {spent}"
    if state == "finished":
        version = f", serving version {d['version']}" if d.get("version") else ""
        reason = f"; {d['reason']}" if d.get("reason") else ""
        backoff = d.get("backoff")
        waiting = (f"\nautomatic runs wait {number(backoff.get('retry_in_s'))} s more after "
                   f"{backoff.get('failures')} failed run(s) in a row (loractl train {d.get('adapter')} starts one now)"
                   if isinstance(backoff, dict) else "")
        return (f"run {d.get('run_id')} of {d.get('adapter')}: {d.get('status')} after {number(d.get('steps_done'))}/"
                f"{number(d.get('planned_steps'))} steps{version}{reason}; ε spent by this run "
                f"{number(d.get('epsilon_spent'))} (the adapter's total: loractl privacy {d.get('adapter')}){waiting}")
    return f"{d.get('adapter')}: no training run yet (loractl examples count {d.get('adapter')})"


# ---------------------------------------------------------------- privacy


def _privacy(args: argparse.Namespace, ctx: Context) -> int:
    words = list(args.words)
    if len(words) == 2 and words[0] == "audit":
        audit = ctx.client.call("POST", f"{_base(ctx, words[1])}/privacy/audit", auth=True,
                                json_body={"canaries": args.canaries})
        ctx.emit(audit, _render_audit)
        return 0 if isinstance(audit, dict) and audit.get("consistent") else 1
    if len(words) > 1:
        raise UsageError("expected 'loractl privacy [ADAPTER]' or 'loractl privacy audit ADAPTER'")
    adapter = words[0] if words else None
    if adapter:
        data = ctx.client.call("GET", f"{_base(ctx, adapter)}/privacy", auth="optional")
    else:
        data = ctx.client.call("GET", f"/v2/models/{quoted(ctx.model)}/privacy", auth="optional")
    ctx.emit(data, _render_privacy)
    return 0


def _render_privacy(d: object) -> str:
    states = d if isinstance(d, list) else [d]
    if not states:
        return "no adapter has been trained"
    blocks = []
    for s in states:
        if not isinstance(s, dict):
            continue
        head = (f"{s.get('adapter')}: ε spent over all runs {number(s.get('epsilon_spent'))} of budget "
                f"{number(s.get('budget_epsilon'))} (left {number(s.get('budget_left'))}) at δ {number(s.get('delta'))}, "
                f"accountant {s.get('accountant')}")
        if s.get("energy_joules") is not None:
            head += f", energy of all runs {number(s.get('energy_joules'))} J"
        runs = [[r.get(c) for c in _RUN_COLUMNS] for r in s.get("runs", []) if isinstance(r, dict)]
        blocks.append(head + ("\n" + table(runs, [c.upper() for c in _RUN_COLUMNS]) if runs else "\nno runs"))
    return "\n\n".join(blocks)


def _render_audit(d: object) -> str:
    if not isinstance(d, dict):
        return str(d)

    def eps(key: str) -> str:
        # null: unbounded (σ = 0 accounted, or scores that leave no doubt)
        return "unbounded" if d.get(key) is None else number(d.get(key))

    verdict = ("consistent: the audit found no leak beyond the accounted ε" if d.get("consistent")
               else "INCONSISTENT: the run leaks more than its accounted ε")
    faults = ""
    if d.get("noise_multiplier_applied", d.get("sigma")) != d.get("sigma") or d.get(
            "clip_norm_applied", d.get("clip_norm")) != d.get("clip_norm"):
        faults = (f"\ntest-only fault: the run applied σ {number(d.get('noise_multiplier_applied'))} and "
                  f"C {number(d.get('clip_norm_applied'))}")
    return (f"{d.get('adapter')}: estimated ε {eps('epsilon_estimate')} (lower confidence bound "
            f"{eps('epsilon_estimate_lower')} at {number(d.get('confidence'))}) vs the accounted ε of one run at this "
            f"configuration {eps('epsilon_accounted')} at δ {number(d.get('delta'))} "
            f"(not the ledger's total over all runs: loractl privacy {d.get('adapter')})\n"
            f"rigorous lower bound {eps('epsilon_lower_bound')} ({d.get('correct')} of {d.get('guesses')} guesses "
            f"right); {d.get('canaries')} canaries, {d.get('inserted')} inserted; configuration of "
            f"{d.get('configuration')}: q {number(d.get('q'))}, σ {number(d.get('sigma'))}, "
            f"C {number(d.get('clip_norm'))}, {d.get('steps')} steps{faults}\n{verdict}")


# ---------------------------------------------------------------- examples


def _examples_add(args: argparse.Namespace, ctx: Context) -> int:
    """Every example is converted and checked before the first is sent, so a bad line
    stores nothing; a refusal by the server says how many were stored before it."""
    if args.file is not None:
        if args.label is not None:
            raise UsageError("--label goes with --text or --input; in --file each line carries its own label")
        examples = _read_lines(args.file)
    elif args.text is not None:
        # A text classifier needs --label, a language model takes none: the daemon says which.
        label = {} if args.label is None else {"label": int(args.label) if args.label.isdigit() else args.label}
        examples = [("--text", {"text": args.text, **label})]
    else:
        if args.label is None:
            raise UsageError("--input needs --label")
        named = {}
        for item in args.input:
            name, sep, text = item.partition("=")
            if not sep:
                raise UsageError(f"--input {item!r}: expected NAME=JSON")
            named[name] = _json_arg(f"--input {name}", text)
        examples = [("--input", {"inputs": named, "label": _json_arg("--label", args.label)})]
    specs = _input_specs(ctx)
    prefix = f"{args.file}: " if args.file is not None else ""
    user = {"user": args.user} if args.user is not None else {}
    text_model = set(specs) == {"text"}
    bodies = []
    for where, ex in examples:
        if "text" in ex:
            if "label" in ex and not text_model:
                raise UsageError(f"{prefix}{where}: this model takes no labelled text (its inputs: "
                                 f"{', '.join(specs)}); give {{\"inputs\": {{NAME: nested list}}, \"label\": L}}, "
                                 "or for a language model the text alone")
            bodies.append((where, {**user, **ex}))
        else:
            bodies.append((where, {"inputs": _tensors(ex["inputs"], specs, prefix + where), "label": ex["label"],
                                   **user, **({"user": ex["user"]} if "user" in ex else {})}))
    last: object = None
    for added, (where, body) in enumerate(bodies):
        try:
            last = ctx.client.call("POST", f"{_base(ctx, args.adapter)}/examples", json_body=body, auth=True)
        except ApiError as e:
            raise ApiError(e.status, f"added {added} of {len(bodies)}; {where} refused: {e.message}") from e
        except ConnectError as e:
            raise ConnectError(f"added {added} of {len(bodies)}; {where} not sent: {e}") from e
    count = last.get("examples") if isinstance(last, dict) else None
    ctx.emit({"adapter": args.adapter, "added": len(bodies), "examples": count},
             lambda d: f"added {len(bodies)} example(s) to {args.adapter}; it now has {count}")
    return 0


def _examples_count(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call("GET", f"{_base(ctx, args.adapter)}/examples", auth=True)
    ctx.emit(data, lambda d: f"{args.adapter}: {d.get('examples') if isinstance(d, dict) else d} examples")
    return 0


def _examples_delete(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.client.call("DELETE", f"{_base(ctx, args.adapter)}/examples", auth=True)
    ctx.emit(data, lambda d: f"{args.adapter}: deleted {d.get('deleted') if isinstance(d, dict) else d} examples")
    return 0


def _input_specs(ctx: Context) -> dict[str, dict[str, Any]]:
    meta = ctx.client.call("GET", f"/v2/models/{quoted(ctx.model)}")
    return {t["name"]: t for t in meta.get("inputs", [])} if isinstance(meta, dict) else {}


def _json_arg(what: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"{what}: not valid JSON: {e}") from e


def _read_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """("line N", example) for every non-blank line; UsageError names the first bad line.
    JSON lines, or plain text (one language-model example per line) when the first
    non-blank line does not start with ``{``."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from e
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if numbered and not numbered[0][1].lstrip().startswith("{"):
        return [(f"line {n}", {"text": line}) for n, line in numbered]
    out = []
    for n, line in numbered:
        doc = _json_arg(f"{path}: line {n}", line)
        text_ok = isinstance(doc, dict) and isinstance(doc.get("text"), str)
        labelled = isinstance(doc, dict) and "label" in doc
        if not isinstance(doc, dict) or not (text_ok or (isinstance(doc.get("inputs"), dict) and labelled)):
            raise UsageError(f'{path}: line {n}: expected {{"text": "...", "label": "label name"}}, '
                             f'{{"text": "...", "user": "id"}} (a language model) or '
                             f'{{"inputs": {{NAME: nested list}}, "label": L}}')
        user = doc.get("user")
        if user is not None and not isinstance(user, str):
            raise UsageError(f"{path}: line {n}: 'user' must be a string, got {user!r}")
        doc = {k: v for k, v in doc.items() if k in ("text", "inputs", "label", "user")}
        out.append((f"line {n}", doc))
    if not out:
        raise UsageError(f"--file {str(path)!r}: no examples in it")
    return out


def _tensors(inputs: object, specs: dict[str, dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """OIP input tensors of one example (a batch dimension of 1 is added when missing)."""
    import numpy as np  # here, not at the top: loractl's other commands start without numpy
    if not isinstance(inputs, dict):
        raise UsageError(f"{where}: inputs must map input names to nested lists")
    tensors = []
    for name, value in inputs.items():
        spec = specs.get(name)
        if spec is None:
            raise UsageError(f"{where}: the model has no input {name!r}; its inputs are: {', '.join(specs)}")
        try:
            array = np.asarray(value)
        except ValueError:  # numpy refuses ragged nested lists
            array = np.asarray(None, dtype=object)
        if array.dtype.kind not in "biuf":
            raise UsageError(f"{where}: input {name!r} must be a nested list of numbers of one shape (not ragged)")
        shape = list(array.shape)
        wanted = [int(d) for d in spec["shape"]]
        if len(shape) == len(wanted) - 1:
            shape = [1, *shape]
        if len(shape) != len(wanted) or any(w >= 0 and d != w for d, w in zip(shape[1:], wanted[1:], strict=True)):
            dims = ", ".join("*" if w < 0 else str(w) for w in wanted[1:])
            raise UsageError(f"{where}: input {name!r} has shape {list(array.shape)}; the model takes "
                             f"[{dims}] (or [1, {dims}]) per example")
        tensors.append({"name": name, "datatype": spec["datatype"], "shape": shape, "data": array.ravel().tolist()})
    return tensors
