"""Text generation from a decoder with a KV cache, every running generation sharing each decode step.

One thread (:class:`Generator`) owns the running generations as one batch: a KV cache per
layer of shape ``[rows, kv_heads, width, head_dim]``, rows left-padded to a common width (a
row's attention mask is 0 over its padding, and its positions count its own tokens only).
Each turn of the loop runs at most one prefill chunk of a waiting prompt, then one decode
step for every running row in one call of the banked graph (:mod:`lorad.adapters.lora_banks`):
each row gathers its own adapter's LoRA matrices by slot, so eight users with eight adapters
cost one forward per token, not eight. A prompt that finishes its prefill joins the batch
(padding it, or the batch, on the left); a row that finishes leaves it, and padding columns
no row needs any more are cut.

Memory is bounded before a generation starts: it reserves ``prompt + max_tokens`` tokens of
KV cache, and the batch's cache (rows × the longest reservation × bytes per token) must fit
``kv_cache_bytes`` or the request is refused (:class:`KvCacheFullError`, an HTTP 503). The
cache is never larger than that (a decode step holds the old and new cache for a moment).

Sampling is per row: greedy at temperature 0, else temperature, top-k and top-p (nucleus)
with the row's own seeded generator, so a seeded request gives the same text alone or in a
batch. Text leaves as it is decoded, held back only while it may be the start of a stop
string or an incomplete UTF-8 character.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .decoder import DecoderSpec
from .engine import InferenceEngine, PreparedAdapter
from .errors import OverloadedError
from .lora_banks import AdapterBanks

__all__ = ["SamplingParams", "Generator", "Generation", "KvCacheFullError", "TextStream", "sample", "Suggestion",
           "last_position_graph"]

_log = logging.getLogger(__name__)



class KvCacheFullError(OverloadedError):
    """The KV cache budget has no room for this generation now (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one generation picks its tokens (the generate extension's ``parameters``)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax at temperature 0, else a draw from the
    tempered distribution restricted to the top-k tokens and the top-p probability mass."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        candidates = np.argpartition(x, -params.top_k)[-params.top_k:]
    else:
        candidates = np.arange(x.size)
    order = candidates[np.argsort(-x[candidates], kind="stable")]
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


class TextStream:
    """Turns a generation's tokens into text deltas, honouring stop strings.

    The text is decoded from all tokens so far (byte-level BPE pieces only form characters
    together); a delta is held back while the text ends in an incomplete UTF-8 character or
    in what may be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self.text = ""
        self._sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (the text to send now, whether a stop string ended the text)."""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character still incomplete
            return "", False
        self.text = text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            return self._send(len(self.text)), True
        hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._send(len(text) - hold), False

    def finish(self) -> str:
        """What is still held back, sent when the generation ends for another reason."""
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        delta = self.text[self._sent:upto] if upto > self._sent else ""
        self._sent = max(self._sent, upto)
        return delta


@dataclass(frozen=True)
class Suggestion:
    """One predicted next word: ``completion`` is the text to append to the prefix, ``word``
    the whole word it makes (the prefix's unfinished word included)."""

    word: str
    completion: str
    probability: float


#: Events a generation reports (called from the generator's thread): ("text", str),
#: ("done", {"finish_reason", "prompt_tokens", "completion_tokens"}) or ("error", Exception).
#: ``finish_reason``: ``stop`` (an end-of-sequence token or a stop string), ``length``
#: (max_tokens or the context), ``cancelled`` (the client left, or the daemon stopped).
EventSink = Callable[[str, Any], None]


@dataclass(eq=False)
class Generation:
    """One running generation (a row of the batch once its prompt is prefilled)."""

    prompt: list[int]
    params: SamplingParams
    slot: int
    on_event: EventSink
    release: contextlib.ExitStack
    rng: np.random.Generator
    stream: TextStream
    #: Prompt tokens prefilled so far, and their cache while prefilling (batch of one).
    prefilled: int = 0
    past: list[np.ndarray] | None = None
    #: Tokens in the cache (the next token's position) and the token to feed next.
    length: int = 0
    next_token: int = 0
    generated: int = 0
    ended: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def final_length(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    def cancel(self) -> None:
        """The client left: the generation ends at the generator's next turn and frees its slot."""
        self.cancelled.set()


def last_position_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computing ``logits`` for the last position only: generation needs no more, and
    the LM head over every prompt position is most of a prefill's work (49,152 × 576 per token)."""
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer["logits"]
    while node.op_type == "Identity":
        node = producer[node.input[0]]
    hidden = node.input[0]
    last = f"{hidden}/last_position"
    starts, ends, axes = (f"{last}/{k}" for k in ("starts", "ends", "axes"))
    for name, value in ((starts, -1), (ends, np.iinfo(np.int64).max), (axes, 1)):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([value], np.int64), name))
    index = list(graph.node).index(node)
    graph.node.insert(index, helper.make_node("Slice", [hidden, starts, ends, axes], [last], name=last))
    node.input[0] = last
    return derived


class Generator:
    """The generation loop over the banked graph of a decoder (see the module docstring)."""

    def __init__(
        self,
        engine: InferenceEngine,
        spec: DecoderSpec,
        tokenizer: Any,
        *,
        slots: int,
        max_rows: int,
        kv_cache_bytes: int,
        max_context: int,
        prefill_chunk: int = 128,
        intra_op_threads: int = 0,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        #: Called when the last running generation ended (the daemon returns freed memory).
        self._on_idle = on_idle
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.kv_cache_bytes = kv_cache_bytes
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.banks = AdapterBanks(last_position_graph(engine.base_model), engine.targets, rank=engine.rank, slots=slots,
                                  providers=engine.providers, intra_op_threads=intra_op_threads)
        self._empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), np.float32)
        self._presents = spec.present_outputs
        self._pasts = spec.past_inputs
        self._cv = threading.Condition()
        self._waiting: list[Generation] = []
        self._rows: list[Generation] = []
        self._closed = False
        # The batch (owned by the loop's thread): cache per past input, mask [rows, width].
        self._cache: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)
        self.steps = 0  # decode steps run (a step serves every running row)
        self.tokens = 0  # tokens generated
        self._thread = threading.Thread(target=self._loop, name="lorad-generate", daemon=True)
        self._thread.start()

    # -- admission (request threads)

    def reserved_bytes(self) -> int:
        """The cache the running and waiting generations may reach."""
        with self._cv:
            return self._padded_bytes([g.final_length for g in self._live()])

    def _padded_bytes(self, lengths: Sequence[int]) -> int:
        """Rows of these reserved lengths, each padded to the longest."""
        return len(lengths) * max(lengths, default=0) * self.spec.kv_bytes_per_token

    def _live(self) -> list[Generation]:
        """Generations that have not ended (a row that ended stays until its step is over)."""
        return [g for g in (*self._rows, *self._waiting) if not g.ended]

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse (ValueError naming the field) a generation that could never run here."""
        if prompt_tokens + max_tokens > self.max_context:
            raise ValueError(
                f"text_input has {prompt_tokens} tokens and max_tokens is {max_tokens}: together over the context of "
                f"{self.max_context} tokens (generation.max_context); shorten the prompt or lower max_tokens")
        alone = (prompt_tokens + max_tokens) * self.spec.kv_bytes_per_token
        if alone > self.kv_cache_bytes:
            raise ValueError(
                f"a generation of {prompt_tokens} prompt tokens and max_tokens {max_tokens} needs {alone} bytes of KV "
                f"cache, more than the whole budget of {self.kv_cache_bytes} (generation.kv_cache_bytes); lower max_tokens")

    def submit(self, prompt: Sequence[int], params: SamplingParams, prepared: PreparedAdapter | None,
               on_event: EventSink, release: contextlib.ExitStack) -> Generation:
        """Start a generation; ``release`` is closed when it ends (the adapter's lease), or at
        once when it is refused: ValueError when it can never run here,
        :class:`KvCacheFullError` or :class:`OverloadedError` when it cannot start now."""
        try:
            if not prompt:
                raise ValueError("text_input is empty: a generation needs at least one prompt token")
            self.check_length(len(prompt), params.max_tokens)
            slot = self.banks.acquire(prepared)
            if slot is None:
                raise OverloadedError(f"all {self.banks.slots} adapter slots of running generations are in use; retry later")
            release.callback(self.banks.release, slot)
            gen = Generation(list(prompt), params, slot, on_event, release,
                             np.random.default_rng(params.seed), TextStream(self.tokenizer, params.stop))
            with self._cv:
                if self._closed:
                    raise OverloadedError("the daemon is stopping")
                live = self._live()
                if len(live) >= self.max_rows:
                    raise OverloadedError(f"{self.max_rows} generations are running (generation.max_concurrent); retry later")
                need = self._padded_bytes([g.final_length for g in live] + [gen.final_length])
                if need > self.kv_cache_bytes:
                    raise KvCacheFullError(
                        f"the KV cache is full: running generations and this one may need {need} bytes, the budget is "
                        f"{self.kv_cache_bytes} (generation.kv_cache_bytes); retry later or lower max_tokens")
                self._waiting.append(gen)
                self._cv.notify()
        except BaseException:
            release.close()
            raise
        return gen

    def running(self) -> int:
        with self._cv:
            return len(self._live())

    def stats(self) -> dict[str, int]:
        """Counts for /metrics: running, tokens, steps, reserved_bytes, budget_bytes."""
        return {"running": self.running(), "tokens": self.tokens, "steps": self.steps,
                "reserved_bytes": self.reserved_bytes(), "budget_bytes": self.kv_cache_bytes}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        for gen in (*self._rows, *self._waiting):
            self._end(gen, "cancelled")

    # -- the loop (its own thread)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._closed:
                    return
                waiting = self._waiting[0] if self._waiting else None
            try:
                self._drop_cancelled()
                if waiting is not None and not waiting.cancelled.is_set():
                    self._prefill(waiting)
                if self._rows:
                    self._decode()
            except Exception as e:  # ORT failing mid-batch: every generation in it ends with the error
                _log.exception("generation step failed")
                with self._cv:
                    failed, self._rows = [*self._rows, *([waiting] if waiting in self._waiting else [])], []
                for gen in failed:
                    gen.on_event("error", e)
                    self._end(gen, None)
                self._cache, self._mask = [], np.zeros((0, 0), np.int64)

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self._pasts, past, strict=True))
        return feeds

    def _prefill(self, gen: Generation) -> None:
        """One chunk of ``gen``'s prompt; when the prompt is done, its first token and its row."""
        stop = min(len(gen.prompt), gen.prefilled + self.prefill_chunk)
        logits, gen.past = self._prefill_chunk(gen.prompt, gen.prefilled, stop, gen.past, gen.slot)
        gen.prefilled = stop
        if stop < len(gen.prompt):
            return
        gen.length = stop  # it stays in _waiting (and its reservation counted) until it joins or ends
        if self._take(gen, logits):
            self._join(gen)
        gen.past = None

    def _prefill_chunk(self, prompt: Sequence[int], start: int, stop: int, past: list[np.ndarray] | None,
                       slot: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Tokens ``start:stop`` of a prompt after its cache ``past`` (None: empty), batch of one:
        (the last position's logits, the cache through ``stop``)."""
        ids = np.array([prompt[start:stop]], np.int64)
        out = self.banks.run(self._feeds(ids, np.ones((1, stop), np.int64), np.arange(start, stop, dtype=np.int64)[None],
                                         past if past is not None else [self._empty] * len(self._pasts)),
                             np.array([slot]))
        return out["logits"][0, -1], [out[n] for n in self._presents]

    def _join(self, gen: Generation) -> None:
        assert gen.past is not None
        length, width = gen.length, self._mask.shape[1]
        row_mask = np.ones((1, length), np.int64)
        past = gen.past
        if self._rows and length < width:
            past = [_pad_left(p, width - length) for p in past]
            row_mask = _pad_left(row_mask, width - length)
        elif self._rows and length > width:
            self._cache = [_pad_left(p, length - width) for p in self._cache]
            self._mask = _pad_left(self._mask, length - width)
        if self._rows:
            self._cache = [np.concatenate([c, p], axis=0) for c, p in zip(self._cache, past, strict=True)]
            self._mask = np.concatenate([self._mask, row_mask], axis=0)
        else:
            self._cache, self._mask = list(past), row_mask
        with self._cv:
            self._waiting.remove(gen)
            self._rows.append(gen)

    def _decode(self) -> None:
        rows = list(self._rows)
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), np.int64)], axis=1)
        ids = np.array([[g.next_token] for g in rows], np.int64)
        positions = np.array([[g.length] for g in rows], np.int64)
        out = self.banks.run(self._feeds(ids, mask, positions, self._cache), np.array([g.slot for g in rows]))
        self._cache, self._mask = [out[n] for n in self._presents], mask
        self.steps += 1
        logits = out["logits"][:, -1]
        keep = []
        for i, gen in enumerate(rows):
            gen.length += 1
            if self._take(gen, logits[i]):
                keep.append(i)
        if len(keep) < len(rows):
            self._shrink(keep)

    def _take(self, gen: Generation, logits: np.ndarray) -> bool:
        """Sample ``gen``'s next token and send its text; False when the generation ended."""
        if gen.cancelled.is_set():
            self._end(gen, "cancelled")
            return False
        token = sample(logits, gen.params, gen.rng)
        gen.generated += 1
        self.tokens += 1
        if token in self.spec.eos_token_ids:
            self._end(gen, "stop")
            return False
        delta, stopped = gen.stream.push(token)
        if delta:
            gen.on_event("text", delta)
        if stopped:
            self._end(gen, "stop")
            return False
        if gen.generated >= gen.params.max_tokens or gen.length + 1 > self.max_context:
            self._end(gen, "length")
            return False
        gen.next_token = token
        return True

    def _end(self, gen: Generation, reason: str | None) -> None:
        """Free what ``gen`` holds (its reservation, slot and lease), then tell its client:
        a client that hears "done" finds the room free (the row leaves the batch at the
        end of the step)."""
        with self._cv:
            gen.ended = True
            if gen in self._waiting:
                self._waiting.remove(gen)
        gen.release.close()
        if reason is not None:
            rest = gen.stream.finish() if reason != "cancelled" else ""
            if rest:
                gen.on_event("text", rest)
            gen.on_event("done", {"finish_reason": reason, "prompt_tokens": len(gen.prompt),
                                  "completion_tokens": gen.generated})

    def _drop_cancelled(self) -> None:
        with self._cv:
            waiting = [g for g in self._waiting if g.cancelled.is_set()]
        for gen in waiting:
            self._end(gen, "cancelled")
        keep = [i for i, g in enumerate(self._rows) if not g.cancelled.is_set()]
        if len(keep) < len(self._rows):
            for g in self._rows:
                if g.cancelled.is_set():
                    self._end(g, "cancelled")
            self._shrink(keep)

    def _shrink(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` and cut the padding columns no remaining row attends."""
        with self._cv:
            self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = [], np.zeros((0, 0), np.int64)
            if self._on_idle is not None:
                self._on_idle()
            return
        index = np.asarray(keep)
        mask = self._mask[index]
        first = int(np.argmax(mask.any(axis=0)))
        self._mask = mask[:, first:]
        self._cache = [np.ascontiguousarray(c[index][:, :, first:]) for c in self._cache]

    # -- predictive text (a request thread; the session runs concurrent calls)

    def suggest(self, prefix: str, prepared: PreparedAdapter | None, *, k: int, max_word_tokens: int = 4) -> list[Suggestion]:
        """The ``k`` most likely next words after ``prefix``, or completions of its unfinished last word.

        Token healing: the prompt is the prefix without its last word and trailing space
        (``"I love choc"`` → ``"I love"``), and the tokens generated must spell that remainder
        (``" choc"``) first, so that the model picks its own tokenization of the word
        (``" chocolate"``) instead of continuing the unnatural token ``" choc"``. The ``4k`` most
        likely first tokens are extended together in one batch, greedily, until each word ends;
        a word's probability is its share of the candidates' probability (the candidates that
        spell what was typed), summed over tokenizations of the word.
        A prefix that ends in a space asks for the next word; one that does not, for the
        completions of its last word (which may be the word as typed).
        """
        partial = prefix.split()[-1] if prefix and not prefix[-1].isspace() else ""
        head = prefix[:len(prefix) - len(partial)].rstrip()
        required = prefix[len(head):]
        prompt = list(self.tokenizer.encode(head, add_special_tokens=False).ids) if head else []
        if not prompt:  # nothing before the word to condition on: no healing
            prompt, required = list(self.tokenizer.encode(prefix, add_special_tokens=False).ids), ""
        if not prompt:
            raise ValueError("text_input is empty after tokenizing; give at least one token of text")
        steps = max_word_tokens + len(required)
        self.check_length(len(prompt), steps)
        slot = self.banks.acquire(prepared)
        if slot is None:
            raise OverloadedError(f"all {self.banks.slots} adapter slots are in use; retry later")
        try:
            past: list[np.ndarray] | None = None
            for start in range(0, len(prompt), self.prefill_chunk):
                last, past = self._prefill_chunk(prompt, start, min(len(prompt), start + self.prefill_chunk), past, slot)
            assert past is not None
            first = _log_softmax(last)
            first[~self._spells(required, "")] = -np.inf
            ranked = [int(t) for t in np.argsort(-first)[:4 * k] if np.isfinite(first[t])]
            rows, texts = [[t] for t in ranked], [self._pieces[t] for t in ranked]
            score = np.array([first[t] for t in ranked])
            open_rows = [len(t) < len(required) or bool(t[len(required):].strip()) for t in texts]
            past = [np.repeat(p, len(rows), axis=0) for p in past]
            length = len(prompt)
            for _ in range(steps - 1):
                if not any(open_rows):
                    break
                ids = np.array([[r[-1]] for r in rows], np.int64)
                out = self.banks.run(self._feeds(ids, np.ones((len(rows), length + 1), np.int64),
                                                 np.full((len(rows), 1), length, np.int64), past), np.full(len(rows), slot))
                past = [out[n] for n in self._presents]
                length += 1
                for i, r in enumerate(rows):
                    if not open_rows[i]:
                        continue
                    logp = _log_softmax(out["logits"][i, -1])
                    if len(texts[i]) < len(required):  # still spelling the prefix's word
                        logp[~self._spells(required, texts[i])] = -np.inf
                    nxt = int(np.argmax(logp))
                    piece = self._pieces[nxt]
                    if len(texts[i]) >= len(required) and (nxt in self.spec.eos_token_ids or not piece[:1].isalnum()):
                        open_rows[i] = False  # the next token starts another word (or ends the text)
                        continue
                    r.append(nxt)
                    texts[i] += piece
                    score[i] += logp[nxt]
                    open_rows[i] = not np.isneginf(logp[nxt])
        finally:
            self.banks.release(slot)
        spelled = np.array([len(t) >= len(required) for t in texts])
        if not spelled.any():
            return []
        # Probabilities given what was typed: shares of the candidates that spell it.
        typed = float(np.log(np.exp(score[spelled] - score[spelled].max()).sum()) + score[spelled].max())
        found: dict[str, tuple[str, float]] = {}
        for text, s, ok in zip(texts, score - typed, spelled, strict=True):
            if not ok:
                continue  # never finished spelling the word
            completion = text[len(required):]
            word = (partial + completion).strip() if partial else completion.strip()
            if word:
                kept = found.get(word, (completion, 0.0))
                found[word] = (kept[0], kept[1] + float(np.exp(s)))
        best = sorted(found.items(), key=lambda item: -item[1][1])[:k]
        return [Suggestion(word, completion, p) for word, (completion, p) in best]

    @functools.cached_property
    def _pieces(self) -> list[str]:
        """Each token's text (byte-level pieces that are not whole characters decode to U+FFFD)."""
        return [self.tokenizer.decode([t], skip_special_tokens=True) for t in range(self.spec.vocab_size)]

    def _spells(self, required: str, done: str) -> np.ndarray:
        """Tokens that keep ``done + piece`` consistent with spelling ``required`` first."""
        return self._spelling(required[len(done):])

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one generator per daemon; rows of a call share prefixes
    def _spelling(self, rest: str) -> np.ndarray:
        if not rest:
            return np.ones(self.spec.vocab_size, bool)
        return np.array([bool(p) and "\ufffd" not in p and (p.startswith(rest) or rest.startswith(p)) for p in self._pieces])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def _pad_left(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with ``n`` zero columns before its sequence axis (2 for a cache, 1 for a mask)."""
    axis = 2 if a.ndim == 4 else 1
    shape = list(a.shape)
    shape[axis] = n
    return np.concatenate([np.zeros(shape, a.dtype), a], axis=axis)
