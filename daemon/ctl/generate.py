"""``loractl generate``: text from a decoder language model, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .client import ApiError, quoted
from .context import Context, add_command

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "generate", _generate, help="generate text with an adapter (decoder language models)",
        description="Stream the continuation of PROMPT to the terminal as it is generated (/generate_stream), "
                    "with adapter ADAPTER ('-' for the base model). --suggest K prints the K most likely next "
                    "words instead (a PROMPT ending in a space), or completions of its last word.",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter name, or - for the base model")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue (with --chat, the user's message)")
    p.add_argument("--max-tokens", type=int, help="tokens to generate at most (default: the daemon's generation.default_max_tokens)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default); higher samples more freely")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this probability mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, help="the same seed gives the same text")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the text before TEXT (repeatable)")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the model's chat template")
    p.add_argument("--system", help="a system message (with --chat)")
    p.add_argument("--suggest", type=int, metavar="K", help="print the K most likely next words instead of generating")


def _generate(args: argparse.Namespace, ctx: Context) -> int:
    params: dict[str, Any] = {}
    if args.adapter != "-":
        params["adapter"] = args.adapter
    for key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "system"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.chat:
        params["chat"] = True
    body = {"text_input": args.prompt, "parameters": params}
    path = f"/v2/models/{quoted(ctx.model)}"
    if args.suggest is not None:
        params.update(mode="suggest", k=args.suggest)
        doc = ctx.client.call("POST", path + "/generate", json_body=body)
        ctx.emit(doc, _render_suggestions)
        return 0
    if ctx.as_json:  # one document for scripts
        ctx.emit(ctx.client.call("POST", path + "/generate", json_body=body), str)
        return 0
    last: dict[str, Any] = {}
    for event in ctx.client.events(path + "/generate_stream", json_body=body):
        if "error" in event:
            sys.stdout.write("\n")
            raise ApiError(500, str(event["error"]))
        sys.stdout.write(str(event.get("text_output", "")))
        sys.stdout.flush()
        last = event
    usage = last.get("usage") or {}
    sys.stdout.write("\n")
    sys.stderr.write(f"[{last.get('finish_reason', '?')}: {usage.get('completion_tokens', '?')} tokens]\n")
    return 0


def _render_suggestions(doc: object) -> str:
    if not isinstance(doc, dict):
        return str(doc)
    return "\n".join(f"{s.get('word')}\t{float(s.get('probability', 0)):.3f}" for s in doc.get("suggestions", []))
