"""AdapterService: the one way adapters get into serving, and the one model-level inference API.

The daemon's HTTP API, the trainer and the OTA installer all go through here, so every
adapter is validated against the base model before it is stored, stored atomically
before it is served, and swapped in without reloading the base model: the next request
sees the new version, a running request keeps the one it started with.

Inference has one path, whoever asks (HTTP, the validation gate, OTA health checks, the
privacy audit, benchmarks):

- :meth:`AdapterService.encode` turns the served interface's inputs into the model's
  tensors: a text model's strings are tokenized here and nowhere else;
- :meth:`AdapterService.submit` / :meth:`AdapterService.run` run model tensors with the
  base model, an adapter, a composition or an unstored candidate, through the
  micro-batcher when the daemon has one (concurrent requests with different adapters
  share one banked call) and the engine's single-adapter graph otherwise;
- :meth:`AdapterService.decode` adds what the served interface shows on top of the
  model's outputs (a text model's ``label``); :meth:`AdapterService.infer` is the three.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from .cache import AdapterCache, CacheEntryInfo, CacheEvent
from .composition import AdapterWeight, compose
from .engine import InferenceEngine, PreparedAdapter
from .errors import AdapterDamagedError, AdapterNotFoundError, AdapterStorageError, InvalidAdapterError
from .lora import LoraAdapter, lora_scale
from .micro_batcher import MicroBatcher, PostWindow
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, dump_peft, load_peft
from .registry import AdapterRegistry, IndexedAdapter, StoredAdapter
from .request_cost import RequestCost, RequestLimits
from .text_input import TextFrontEnd

__all__ = ["AdapterInfo", "DamagedAdapterInfo", "AdapterUse", "InferResult", "Serving", "AdapterService", "Arrival", "Target", "Deliver"]

#: What a request runs with: the base model (None), a stored adapter by name, a weighted
#: composition, or an unstored candidate (the validation gate's).
Target = str | Sequence[AdapterWeight] | PreparedAdapter | None

_ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE)

#: What :meth:`AdapterService.post` hands a request's answer to, once: (result, None) or (None, error).
Deliver = Callable[["InferResult | None", "BaseException | None"], None]


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: int
    rank: int
    bytes: int
    cached: bool
    pinned: bool
    state: Literal["ready"] = "ready"


@dataclass(frozen=True)
class DamagedAdapterInfo:
    """A stored adapter that failed its check on disk (:class:`AdapterDamagedError`): listed,
    never served. ``reason`` may name state paths (the HTTP API shows it only to
    authenticated callers)."""

    name: str
    #: The damaged version; None when the pointer to the current one cannot be read.
    version: int | None
    reason: str
    #: Stored versions that pass the check: what a rollback can go to.
    versions: tuple[int, ...]
    rank: None = None
    bytes: None = None
    cached: bool = False
    pinned: bool = False
    state: Literal["damaged"] = "damaged"


@dataclass(frozen=True)
class AdapterUse:
    """One adapter of a composition as it answered: name, version and weight."""

    name: str
    version: int
    weight: float


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    adapter: str | None
    version: int | None
    #: The adapters of a per-request composition (empty for one adapter or none).
    composition: tuple[AdapterUse, ...] = ()


@dataclass(frozen=True)
class Serving:
    """What one request runs with, held for the request (see :meth:`AdapterService.serving`)."""

    prepared: PreparedAdapter | None
    adapter: str | None
    version: int | None
    composition: tuple[AdapterUse, ...] = ()

    def result(self, outputs: dict[str, np.ndarray]) -> InferResult:
        return InferResult(outputs, self.adapter, self.version, self.composition)


class Arrival:
    """A request announced to the micro-batcher before it is decoded, so that a batch being
    gathered waits for it; :meth:`close` withdraws it if it is never submitted."""

    def __init__(self, batcher: MicroBatcher | None) -> None:
        self._batcher = batcher
        if batcher is not None:
            batcher.expect()

    def take(self) -> bool:
        """Whether this arrival was still announced (and now is submitted)."""
        announced, self._batcher = self._batcher is not None, None
        return announced

    def close(self) -> None:
        """Withdraw the announcement if it was not submitted; safe to call twice."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.unexpect()


def _nothing() -> None:
    pass


def _meta_int(meta: Mapping[str, object], key: str) -> int:
    value = meta.get(key, 0)
    return value if isinstance(value, int) else 0


class AdapterService:
    """Validates, stores, caches and serves adapters of one base model."""

    def __init__(
        self,
        engine: InferenceEngine,
        registry: AdapterRegistry,
        *,
        cache_budget_bytes: int,
        model_name: str = "demo",
        on_cache_event: Callable[[CacheEvent, str], None] | None = None,
        text: TextFrontEnd | None = None,
        batcher: MicroBatcher | None = None,
        load_hook: Callable[[str, int], None] | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        """``batcher`` gathers concurrent calls into banked batches (None: one engine call
        per request). ``load_hook(name, version)`` runs when a cache miss has chosen the
        version it loads, before it reads the files (tests use it to interleave loads and
        changes)."""
        self.engine = engine
        self.batcher = batcher
        #: What a request costs (tokens or rows), its limit and its chunks (request_cost.py).
        self.cost = RequestCost(engine.inputs, engine.input_domains, limits or RequestLimits())
        #: For a model that declares a tokenizer: strings in, token tensors to the engine.
        self.text = text
        self.registry = registry
        self.model_name = model_name
        self._load_hook = load_hook
        self.cache: AdapterCache[PreparedAdapter] = AdapterCache(
            cache_budget_bytes, self._load_current, on_event=on_cache_event
        )
        # Changes (upload, install, rollback, delete) are rare; one lock keeps the
        # registry's current version and the cache's entry moving together.
        self._changes = threading.Lock()

    # -- serving -------------------------------------------------------------------------

    @property
    def inputs(self) -> Sequence[Any]:
        """What a request sends: the engine's tensors, or the text front end's ``text``."""
        return self.text.inputs if self.text is not None else self.engine.inputs

    @property
    def outputs(self) -> Sequence[Any]:
        return self.text.outputs(self.engine.outputs) if self.text is not None else self.engine.outputs

    @property
    def model_inputs(self) -> Sequence[Any]:
        """The tensors the model itself takes (what :meth:`run` takes)."""
        return self.engine.inputs

    @property
    def model_outputs(self) -> Sequence[Any]:
        return self.engine.outputs

    def encode(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The served interface's inputs as the model's tensors: a text model's strings are
        tokenized (the only place that does it); tensors pass as they are."""
        return self.text.encode(inputs) if self.text is not None else dict(inputs)

    def decode(self, result: InferResult) -> InferResult:
        """The model's outputs as the served interface shows them (a text model adds ``label``)."""
        return replace(result, outputs=self.text.decode(result.outputs)) if self.text is not None else result

    def infer(self, inputs: Mapping[str, np.ndarray], adapter: Target = None) -> InferResult:
        """One request of the served interface: encode, run, decode."""
        return self.decode(self.run(self.encode(inputs), adapter))

    def run(self, tensors: Mapping[str, np.ndarray], adapter: Target = None) -> InferResult:
        """Model tensors through the base model, an adapter, a composition or a candidate.

        A request above one chunk (request_cost.py) runs as consecutive calls of one chunk
        each, under one lease (every chunk sees the same version), and its outputs are
        joined: the memory it holds is one chunk's, whatever its size. Its chunks run on
        the engine in the caller's thread, not through the batcher, whose one thread
        would make every small request wait behind them."""
        if not self.cost.is_chunked(tensors):
            return self.submit(tensors, adapter).result()
        with self.serving(adapter) as serving:
            parts = [self.engine.run(chunk, serving.prepared) for chunk in self.cost.chunks(tensors)]
        return serving.result({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})

    def announce(self) -> Arrival:
        """Tell the batcher a request is on its way (see :class:`Arrival`)."""
        return Arrival(self.batcher)

    def submit(self, tensors: Mapping[str, np.ndarray], adapter: Target = None, *,
               arrival: Arrival | None = None) -> Future[InferResult]:
        """:meth:`post` with a future for the answer."""
        result: Future[InferResult] = Future()

        def deliver(answer: InferResult | None, error: BaseException | None) -> None:
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(answer)  # type: ignore[arg-type]

        self.post(tensors, adapter, deliver, arrival=arrival)
        return result

    def post(self, tensors: Mapping[str, np.ndarray], adapter: Target, deliver: Deliver, *,
             arrival: Arrival | None = None, window: PostWindow | None = None) -> None:
        """Run model tensors now (no batcher: ``deliver`` is called before this returns) or in
        the batcher's next batch (``deliver`` is called once, in the batcher's thread, with
        the answer or the error); errors before that (no such adapter) are raised here.
        Through ``window`` (the batcher's, for this thread), the request is handed over when
        the window is flushed, and may be answered then, in this thread.

        The lease on the adapter is held until the batch has run, in whichever thread
        finishes it, so a caller that stops waiting cannot end it early.
        """
        serving, release = self._hold(adapter)
        if self.batcher is None:
            try:
                outputs = self.engine.run(tensors, serving.prepared)
            except Exception as e:
                deliver(None, e)
                return
            finally:
                release()
            deliver(serving.result(outputs), None)
            return

        def answer(outputs: dict[str, np.ndarray] | None, error: BaseException | None) -> None:
            release()
            deliver(serving.result(outputs) if outputs is not None else None, error)

        try:
            (window or self.batcher).post(tensors, serving.prepared, answer,
                                          expected=arrival.take() if arrival else False)
        except BaseException:
            release()
            raise

    def _hold(self, adapter: Target) -> tuple[Serving, Callable[[], None]]:
        """:meth:`serving` for a request that ends in another thread: what it runs with and
        the function that ends its leases (the common cases without a context manager)."""
        if adapter is None:
            return Serving(None, None, None), _nothing
        if isinstance(adapter, str):
            prepared, release = self.cache.hold(adapter)
            return Serving(prepared, prepared.name, prepared.version), release
        held = ExitStack()
        try:
            return held.enter_context(self.serving(adapter)), held.close
        except BaseException:
            held.close()
            raise

    def candidate(self, adapter: LoraAdapter, *, name: str) -> PreparedAdapter:
        """An unstored adapter ready to :meth:`run` (the validation gate's candidate)."""
        return self.engine.prepare(adapter, name=name, version=0)

    @contextmanager
    def serving(self, adapter: Target) -> Iterator[Serving]:
        """Lease what a request runs with for as long as the block lasts.

        ``None`` is the base model; a name is that adapter's current version; a sequence
        of :class:`AdapterWeight` is their exact weighted sum (:mod:`lorad.adapters.composition`),
        each part leased at its current version, so a hot swap never tears a composition;
        a :class:`PreparedAdapter` is an unstored candidate, served as it is.
        """
        if adapter is None:
            yield Serving(None, None, None)
            return
        if isinstance(adapter, PreparedAdapter):
            yield Serving(adapter, adapter.name, None)
            return
        if isinstance(adapter, str):
            with self.cache.lease(adapter) as prepared:
                yield Serving(prepared, prepared.name, prepared.version)
            return
        names = [t.name for t in adapter]
        if len(set(names)) != len(names):
            raise ValueError(f"a composition names each adapter once, got {names}")
        with ExitStack() as stack:
            parts = [stack.enter_context(self.cache.lease(t.name)) for t in adapter]
            composite = compose([(p.adapter, t.weight) for p, t in zip(parts, adapter, strict=True)], slot_rank=self.engine.rank)
            prepared = self.engine.prepare(composite, name="+".join(names), version=0)
            uses = tuple(AdapterUse(p.name, p.version, t.weight) for p, t in zip(parts, adapter, strict=True))
            yield Serving(prepared, None, None, uses)

    def _load_current(self, name: str) -> PreparedAdapter:
        version = self.registry.current_version(name)
        if version is None:
            raise AdapterNotFoundError(name)
        if self._load_hook is not None:
            self._load_hook(name, version)
        return self._load_version(name, version)

    def _load_version(self, name: str, version: int) -> PreparedAdapter:
        files = {f: self.registry.read_file(name, version, f) for f in _ADAPTER_FILES}
        adapter = self.parse(files)
        return self.engine.prepare(adapter, name=name, version=version)

    # -- changes -------------------------------------------------------------------------

    def parse(self, files: Mapping[str, bytes]) -> LoraAdapter:
        """Parse PEFT files and check them against the served base model.

        PEFT module names are matched to ONNX weights by the module paths the engine
        recovered from the graph (and ``model.weight_names``).
        """
        adapter = load_peft(files, weight_of=self.engine.module_paths.weight_of)
        self.engine.check(adapter)
        return adapter

    def dump(self, adapter: LoraAdapter) -> dict[str, bytes]:
        """PEFT files of an adapter, named by the served model's PEFT module names."""
        return dump_peft(adapter, module_of=self.engine.module_paths.module_of)

    def upload(self, name: str, files: Mapping[str, bytes], *, meta: Mapping[str, object] | None = None) -> AdapterInfo:
        """Store PEFT files as a new version of ``name`` and swap it in if cached.

        An adapter without a recorded fingerprint (plain PEFT output) is accepted when its
        shapes fit, and the fingerprint of the model it was checked against is recorded.
        """
        unknown = sorted(set(files) - set(_ADAPTER_FILES))
        if unknown:
            raise InvalidAdapterError(f"unexpected adapter files {unknown}; allowed: {', '.join(_ADAPTER_FILES)}")
        adapter = self.parse(files)
        record = {"fingerprint_in_file": bool(adapter.base_fingerprint), "source": "upload", **(meta or {})}
        return self._store(name, {f: files[f] for f in _ADAPTER_FILES}, adapter, record)

    def install(self, name: str, adapter: LoraAdapter, *, meta: Mapping[str, object] | None = None,
                files: Mapping[str, bytes] | None = None) -> AdapterInfo:
        """Store an adapter made in-process (trainer, OTA) and swap it in if cached;
        ``files`` are stored beside its PEFT files (the trainer's privacy record)."""
        self.engine.check(adapter)
        if not adapter.base_fingerprint:
            raise InvalidAdapterError("an installed adapter must record the fingerprint of its base model")
        return self._store(name, {**self.dump(adapter), **(files or {})}, adapter, {"source": "install", **(meta or {})})

    def _store(self, name: str, files: Mapping[str, bytes], adapter: LoraAdapter, meta: Mapping[str, object]) -> AdapterInfo:
        # What listing and inspecting report is recorded now, so they never re-read the files.
        record = {
            "rank": adapter.rank,
            "bytes": adapter.nbytes,
            "alpha": adapter.alpha,
            "use_rslora": adapter.use_rslora,
            "targets": sorted(adapter.weights),
            "base_fingerprint": self.engine.fingerprint,
            **meta,
        }
        with self._changes:
            version = self.registry.put(name, files, meta=record)
            # Cached or not: a cache miss may be loading the previous version right now.
            self.cache.swap_if_cached(self.engine.prepare(adapter, name=name, version=version))
        return self.info(name)

    def rollback(self, name: str, version: int) -> AdapterInfo:
        """Serve an earlier stored version of ``name`` again."""
        with self._changes:
            prepared = self._load_version(name, version)
            self.registry.set_current(name, version)
            self.cache.swap_if_cached(prepared)
        return self.info(name)

    def export(self, name: str, version: int | None = None) -> tuple[int, dict[str, bytes]]:
        """PEFT files of a stored version (default: the current one), and its number.

        An upload is given back exactly as it was stored (bit-identical tensors). What
        lorad wrote itself (trainer, OTA) is written again with the PEFT module names of
        the served model, which also renames files stored by an older lorad that named
        tensors by ONNX weight.
        """
        stored = self.registry.get(name, version)
        files = {f: self.registry.read_file(name, stored.version, f) for f in _ADAPTER_FILES}
        adapter = self.parse(files)
        if stored.meta.get("source") != "upload":
            # Stored beside the PEFT files: the trainer's privacy record (ota/privacy.py).
            extra = {f: self.registry.read_file(name, stored.version, f) for f in stored.files if f not in _ADAPTER_FILES}
            files = {**self.dump(adapter), **extra}
        return stored.version, files

    def delete(self, name: str) -> None:
        with self._changes:
            self.registry.delete(name)
            self.cache.discard(name)

    # -- cache control -------------------------------------------------------------------

    def load(self, name: str) -> AdapterInfo:
        with self.cache.lease(name):
            pass
        return self.info(name)

    def pin(self, name: str) -> AdapterInfo:
        self.cache.pin(name)
        return self.info(name)

    def unpin(self, name: str) -> AdapterInfo:
        self._require(name)
        self.cache.unpin(name)
        return self.info(name)

    def evict(self, name: str) -> AdapterInfo:
        self._require(name)
        self.cache.evict(name)
        return self.info(name)

    # -- listing -------------------------------------------------------------------------

    def _require(self, name: str) -> int:
        version = self.registry.current_version(name)
        if version is None:
            raise AdapterNotFoundError(name)
        return version

    def info(self, name: str) -> AdapterInfo:
        """One adapter as listed (from the registry's index and this one cache entry)."""
        return self._info(self.registry.indexed(name), self.cache.entry(name))

    def _cache_entries(self) -> dict[str, CacheEntryInfo]:
        return {e.name: e for e in self.cache.entries()}

    @staticmethod
    def _info(stored: StoredAdapter | IndexedAdapter, cached: CacheEntryInfo | None) -> AdapterInfo:
        return AdapterInfo(
            name=stored.name,
            version=stored.version,
            rank=_meta_int(stored.meta, "rank"),
            bytes=_meta_int(stored.meta, "bytes"),
            cached=cached is not None and cached.version == stored.version,
            pinned=cached is not None and cached.pinned,
        )

    def list_adapters(self) -> list[AdapterInfo | DamagedAdapterInfo]:
        """Every stored adapter; one that fails its check on disk is listed as damaged.

        Reads the registry's index (a few stats per adapter, no file read unless an adapter
        changed) and the cache's entries once."""
        entries = self._cache_entries()
        infos: list[AdapterInfo | DamagedAdapterInfo] = []
        for name, found in self.registry.listing().items():
            if isinstance(found, AdapterStorageError):  # this adapter only: the others list as they are
                infos.append(self._damaged(name, found))
            else:
                infos.append(self._info(found, entries.get(name)))
        return infos

    def _damaged(self, name: str, e: AdapterStorageError) -> DamagedAdapterInfo:
        if isinstance(e, AdapterDamagedError):
            self.cache.discard(name)  # a copy cached before the damage is not served either
            return DamagedAdapterInfo(name, e.version, e.reason, e.sound_versions)
        return DamagedAdapterInfo(name, None, str(e), ())

    def inspect(self, name: str) -> dict[str, object]:
        try:
            stored = self.registry.get(name)
        except AdapterDamagedError as e:
            return asdict(self._damaged(name, e))
        meta = stored.meta
        alpha, use_rslora = meta.get("alpha"), bool(meta.get("use_rslora"))
        info = self._info(stored, self.cache.entry(name))
        return {
            **info.__dict__,
            "versions": self.registry.versions(name),
            "alpha": alpha,
            "use_rslora": use_rslora,
            "scale": lora_scale(float(alpha), info.rank, use_rslora=use_rslora) if isinstance(alpha, (int, float)) else None,
            "targets": meta.get("targets"),
            "base_fingerprint": self.engine.fingerprint,
            "created": stored.created,
            "meta": dict(meta),
            "merge": self._merge_state(name, info.version),
        }

    def _merge_state(self, name: str, version: int) -> dict[str, object]:
        """Whether the merged fast path (adapters/merged.py) serves this version now; when
        the path is off for this model, why."""
        merged = self.engine.merged
        if merged is None:
            return {"enabled": False, "merged": False, "reason": self.engine.merge_off}
        return {"enabled": True, "merged": merged.merged == (name, version)}
