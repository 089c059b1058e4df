"""The embedded engine: llama.cpp's server core, in-process, with continuous batching and a prompt cache.

The runtime is the prebuilt ``xllamacpp`` wheel (no compiler needed at install; see the README's "The embedded
model" for why it was chosen). One loaded model file is shared by every :class:`LocalModel`, ``Local`` provider and
``LocalBackend`` in the process with the same settings; it is loaded lazily, once.

How a generation runs:

* **Slots.** The engine holds ``parallel`` sequences in one llama.cpp context and decodes them together, a token
  of each per step (continuous batching: a request joins at the next step). polychat hands out the slots in
  arrival order; at most ``queue`` requests wait for one, and a request beyond that is refused at once with a
  :class:`~polychat.errors.RateLimitError` (429 with ``Retry-After`` on the server's faces).
* **Prompt cache.** Each slot keeps the KV cache of its last prompt and answer while it is idle; a new request goes
  to the slot whose cache shares the longest prefix with it, so the next turn of a conversation evaluates only its
  new messages (``EngineStats.prompt_tokens_cached`` counts the reused tokens).
* **One thread per generation** calls into the engine (the call blocks in C++ without the GIL) and hands each item
  to the caller: :meth:`LocalModel.generate` (sync) and :meth:`LocalModel.agenerate` (async) share that one relay.
  Closing either iterator, cancelling the task or a client going away tells the engine to stop at its next token;
  the slot is free when ``close``/``aclose`` returns. All model computation happens on the engine's own loop
  thread (one OpenMP team per loaded model, however many threads and event loops use it).
* **Limits.** ``max_tokens`` caps every answer (a request asking for more is cut there, with finish reason
  ``length``); a prompt longer than the context is a :class:`~polychat.errors.ContextLengthExceededError` before
  anything is generated; a full KV cache makes the engine retry with a smaller batch, then fail that request
  with a clear error.

Sharing the cores: the wheel's llama.cpp uses OpenMP, whose threads spin at every barrier for a while before they
sleep. Two processes doing that on the same cores each wait for threads the other process has descheduled, and
both slow to a crawl. polychat shortens the spin (``GOMP_SPINCOUNT``, unless set) before the runtime is loaded;
``bench/local_model.py`` measures the effect.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from polychat.errors import PolychatError
from polychat.generation import Embeddings, GenerationRequest, Item
from polychat.providers.base import Messages
from polychat.providers.local.embeddings import Embedder
from polychat.providers.local.files import LocalModelError, model_name, resolve_model_path
from polychat.providers.local.slots import Slots, Waiter
from polychat.providers.local.wire import ChunkReader, engine_error, message_text, request_body

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_N_CTX",
    "DEFAULT_PARALLEL",
    "DEFAULT_QUEUE",
    "EngineStats",
    "LocalModel",
]

log = logging.getLogger("polychat.local")

DEFAULT_N_CTX = 4096
DEFAULT_PARALLEL = 4
DEFAULT_MAX_TOKENS = 1024
DEFAULT_QUEUE = 64
# OpenMP's spin before a waiting thread sleeps (libgomp's default is 300,000 iterations). Measured with two threads on
# two cores (bench/local_model.py): alone, 300 keeps the default's speed (below ~200 it drops); two processes at
# once keep about 45% of it each at 300, 2-10% at 20,000 or more.
DEFAULT_SPINCOUNT = "300"
# Contexts are whole multiples of this many tokens (llama.cpp pads them).
CONTEXT_STEP = 256
# Host memory for prompt caches of idle slots (MiB).
CACHE_RAM_MIB = 512
# At exit, how long to wait for running generations to stop (each stops at its next token).
_EXIT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's own counters (since it was loaded) and polychat's view of its slots right now."""

    slots: int
    busy_slots: int
    waiting: int
    processing: int
    deferred: int
    prompt_tokens_evaluated: int
    prompt_tokens_cached: int
    # counted by the engine as each slot finishes (LocalModel.tokens_generated counts as tokens come out)
    tokens_predicted: int


@dataclass(eq=False)
class _Run:
    """One generation on the engine: its stop flag, the thread that runs it, and whether it is over."""

    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    over: bool = False

    def cancel_unless_over(self) -> bool:
        """Tells the engine to stop, unless the generation has ended; whether it had not."""
        if self.over:
            return False
        self.cancel.set()
        return True


def _item(message: tuple[str, Any]) -> Item | None:
    """A message from a generation's thread: its next item, or ``None`` once it is over (an error is raised)."""
    kind, value = message
    if kind == "error":
        raise value
    return value if kind == "item" else None


@dataclass(eq=False)
class _Loaded:
    """One model file loaded with one set of settings, shared by every handle on it in this process."""

    path: Path
    n_ctx: int
    n_threads: int
    parallel: int
    max_tokens: int
    queue: int
    extra_buffers: bool
    server: Any = None
    url: str = ""
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    slots: Slots = field(init=False)
    runs: set[_Run] = field(default_factory=set, init=False)
    seconds_per_answer: float = 2.0
    tokens_generated: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _http: httpx.Client | None = field(default=None, init=False, repr=False)
    embedder: Embedder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.slots = Slots(self.parallel, self.queue)
        self.embedder = Embedder(self.path, self.n_threads)

    def load(self) -> Any:
        if self.server is not None:
            return self.server
        with self._lock:
            if self.server is None:
                self.server = self._load()
                _close_at_exit()
        return self.server

    def _load(self) -> Any:
        os.environ.setdefault("GOMP_SPINCOUNT", DEFAULT_SPINCOUNT)
        try:
            import xllamacpp
        except ImportError as exc:
            raise LocalModelError(
                "the embedded model needs xllamacpp, which is not installed: pip install 'polychat[local]'"
            ) from exc
        started = time.perf_counter()
        params = xllamacpp.CommonParams()
        params.model.path = str(self.path)
        # Each slot has a context of its own: an answer is then computed the same way whatever else runs beside it
        # (in one shared cache, where a sequence's cells fall changes the order of sums, and so greedy answers).
        params.n_ctx = self.n_ctx * self.parallel
        params.n_parallel = self.parallel
        params.kv_unified = False
        params.cpuparams.n_threads = self.n_threads
        params.cpuparams_batch.n_threads = self.n_threads
        params.no_extra_bufts = not self.extra_buffers
        params.cache_ram_mib = CACHE_RAM_MIB
        params.endpoint_metrics = True
        params.warmup = False
        params.verbosity = -1
        # The engine's own listener (token counting only): loopback, a free port, a key nobody else knows.
        params.hostnames = ["127.0.0.1"]
        params.port = 0
        params.n_threads_http = 2
        params.api_keys = [self.api_key]
        try:
            server = xllamacpp.Server(params)
        except Exception as exc:
            raise LocalModelError(f"cannot load the model file {str(self.path)!r}: {exc}") from exc
        self.url = str(server.listening_address)
        log.info(
            "loaded %s in %.2f s (context %d tokens, %d slots, %d threads)",
            self.path.name,
            time.perf_counter() - started,
            self.n_ctx,
            self.parallel,
            self.n_threads,
        )
        return server

    def call(self, path: str, body: dict[str, Any]) -> Any:
        """A request to the engine's own listener (``/tokenize``, ``/apply-template``): its JSON answer."""
        self.load()
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60, trust_env=False
            )
        reply = self._http.post(path, json=body)
        if reply.status_code != 200:
            raise engine_error(reply.json().get("error", reply.text))
        return reply.json()

    def metrics(self) -> dict[str, float]:
        if self.server is None:
            return {}
        text = self.server.handle_metrics()
        return {name: float(value) for name, value in re.findall(r"^llamacpp:(\w+) (\S+)$", text, re.M)}

    def start(self, request: GenerationRequest, post: Callable[[str, Any], None]) -> _Run:
        """Runs ``request`` on a thread of its own (a slot is already held); posts ``("item", item)`` for each
        item, ``("error", exc)`` on failure, and ``("done", None)`` last, once the slot is free again."""
        try:
            server = self.load()
            limit = self.max_tokens if request.max_tokens is None else min(request.max_tokens, self.max_tokens)
            body = request_body(request, max_tokens=limit)
        except BaseException:
            self.slots.leave()
            raise
        reader = ChunkReader.for_request(request, body)
        data = orjson.dumps(body)
        run = _Run()

        failed: list[BaseException] = []

        def on_chunk(chunk: bytes) -> bool:
            if run.cancel.is_set():
                return True
            sampled = reader.completion_tokens
            try:
                tokens = reader.feed(orjson.loads(chunk))
            except Exception as exc:
                failed.append(exc)
                return True
            with self._lock:
                self.tokens_generated += reader.completion_tokens - sampled
            for token in tokens:
                post("item", token)
            return reader.stopped  # a stop sequence ended the answer: the engine stops here

        def work() -> None:
            started = time.monotonic()
            try:
                if request.prompt is not None:
                    server.handle_completions(data, on_chunk)
                else:
                    server.handle_chat_completions(data, on_chunk)
                if failed:
                    raise failed[0]
                if not run.cancel.is_set():
                    for item in reader.finish_items():
                        post("item", item)
            except PolychatError as exc:
                post("error", exc)
            except Exception as exc:  # the engine's call itself failed
                post("error", LocalModelError(f"the embedded model failed: {exc}"))
            finally:
                self.seconds_per_answer = 0.8 * self.seconds_per_answer + 0.2 * (time.monotonic() - started)
                with self._lock:
                    self.runs.discard(run)
                self.slots.leave()
                run.over = True
                post("done", None)

        run.thread = threading.Thread(target=work, name=f"polychat-local-{self.path.stem}", daemon=True)
        with self._lock:
            self.runs.add(run)
        run.thread.start()
        return run

    def retry_after(self) -> float:
        """A guess at when a place frees up: the time an answer takes, spread over the slots."""
        return max(1.0, self.seconds_per_answer * (self.slots.waiting + 1) / self.slots.size)

    def close(self) -> None:
        """At exit: stop every generation, wait for them (bounded), then free the model."""
        with self._lock:
            runs = list(self.runs)
        for run in runs:
            run.cancel.set()
        deadline = time.monotonic() + _EXIT_TIMEOUT
        for run in runs:
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
        if any(run.thread is not None and run.thread.is_alive() for run in runs):
            log.debug("%s: a generation is still running at exit; the model stays loaded", self.path.name)
            return
        if self._http is not None:
            self._http.close()
        self.server = None  # the engine's loop stops and the model is freed here


_LOADED: dict[tuple[Any, ...], _Loaded] = {}
_LOADED_LOCK = threading.Lock()
_atexit_registered = False


def _close_at_exit() -> None:
    global _atexit_registered
    with _LOADED_LOCK:
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_close_all)


def _close_all() -> None:
    with _LOADED_LOCK:
        loaded = list(_LOADED.values())
    for model in loaded:
        model.close()


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalModel:
    """A GGUF chat model run in-process; handles with the same file and settings share one loaded engine.

    ``model_path`` is a GGUF file, or ``None`` for ``$POLYCHAT_LOCAL_MODEL`` or the default SmolLM2-135M-Instruct.
    ``n_ctx``: the context of each slot in tokens (prompt and answer; rounded up to a multiple of 256; the engine
    holds ``n_ctx * parallel``);
    ``n_threads``: the cores to compute on (default: all usable ones); ``parallel``: answers written at once;
    ``max_tokens``: the longest answer; ``queue``: requests that may wait for a slot; ``extra_buffers=True``
    lets llama.cpp repack weights for faster kernels where the CPU has them.

    Token counts: each generation ends with a :class:`~polychat.generation.Finish` whose ``usage`` holds the prompt
    and completion token counts from the engine; :meth:`count_tokens` and :meth:`count_prompt_tokens` count any
    text or conversation; :meth:`stats` gives the engine's own counters.

    Raises :class:`~polychat.providers.local.LocalModelNotFoundError` at once when the file does not exist;
    :class:`~polychat.providers.local.LocalModelError` on first use when the runtime is missing or the file does
    not load.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        parallel: int = DEFAULT_PARALLEL,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        queue: int = DEFAULT_QUEUE,
        extra_buffers: bool = False,
    ) -> None:
        for name, value, low in (("n_ctx", n_ctx, 16), ("parallel", parallel, 1), ("max_tokens", max_tokens, 1)):
            if int(value) < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if int(queue) < 0:
            raise ValueError(f"queue must not be negative, got {queue}")
        path = resolve_model_path(model_path)
        threads = int(n_threads or _default_threads())
        n_ctx = -(-int(n_ctx) // CONTEXT_STEP) * CONTEXT_STEP  # llama.cpp sizes contexts in steps of 256 tokens
        settings = (n_ctx, threads, int(parallel), int(max_tokens), int(queue), bool(extra_buffers))
        with _LOADED_LOCK:
            loaded = _LOADED.get((str(path), *settings))
            if loaded is None:
                loaded = _LOADED[(str(path), *settings)] = _Loaded(path, *settings)
        self._loaded = loaded
        self.path = path
        self.name = model_name(path)

    def __repr__(self) -> str:
        return f"LocalModel({str(self.path)!r}, n_ctx={self.n_ctx}, parallel={self.parallel})"

    @property
    def n_ctx(self) -> int:
        return self._loaded.n_ctx

    @property
    def parallel(self) -> int:
        return self._loaded.parallel

    @property
    def max_tokens(self) -> int:
        return self._loaded.max_tokens

    @property
    def loaded(self) -> bool:
        return self._loaded.server is not None

    @property
    def busy(self) -> bool:
        """Whether any slot is writing an answer now."""
        return self._loaded.slots.busy > 0

    @property
    def waiting(self) -> int:
        """How many requests wait for a slot."""
        return self._loaded.slots.waiting

    @property
    def tokens_generated(self) -> int:
        """Tokens the engine sampled for answers of this model in this process, counted as they come out."""
        return self._loaded.tokens_generated

    def stats(self) -> EngineStats:
        """The engine's own counters and the slots' state."""
        metrics = self._loaded.metrics()
        slots = self._loaded.slots
        return EngineStats(
            slots=slots.size,
            busy_slots=slots.busy,
            waiting=slots.waiting,
            processing=int(metrics.get("requests_processing", 0)),
            deferred=int(metrics.get("requests_deferred", 0)),
            prompt_tokens_evaluated=int(metrics.get("prompt_tokens_total", 0)),
            prompt_tokens_cached=int(metrics.get("prompt_tokens_cached_total", 0)),
            tokens_predicted=int(metrics.get("tokens_predicted_total", 0)),
        )

    def load(self) -> None:
        """Load the model now rather than on first use."""
        self._loaded.load()

    # ---- tokens ---------------------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` makes with the model's tokenizer (no BOS, special tokens as plain text)."""
        answer = self._loaded.call("/tokenize", {"content": text, "add_special": False, "parse_special": False})
        return len(answer["tokens"])

    def count_prompt_tokens(self, messages: Messages) -> int:
        """The number of tokens of the prompt the chat template makes of ``messages`` (the ``prompt_tokens``)."""
        chat = [{"role": m.get("role", "user"), "content": message_text(m.get("content"))} for m in messages]
        prompt = self._loaded.call("/apply-template", {"messages": chat})["prompt"]
        answer = self._loaded.call("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
        return len(answer["tokens"])

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """The model's embeddings of ``texts`` (mean-pooled, normalised; see
        :mod:`~polychat.providers.local.embeddings`); blocks, so async code calls it in a worker thread."""
        return self._loaded.embedder.embed(texts)

    # ---- generation -----------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> Generator[Item, None, None]:
        """The answer's tokens, then a ``Finish``: a sync generator (usable inside a running event loop too).

        On the first ``next()`` the request waits for a slot (in arrival order), then the engine writes the answer
        at its own speed, never waiting for the reader. ``close()`` (or garbage collection) stops it at the next
        token and returns once the slot is free.
        """
        loaded = self._loaded
        loaded.load()
        loaded.slots.take(Waiter(), loaded.retry_after())
        out: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        run = loaded.start(request, lambda kind, value: out.put((kind, value)))
        try:
            while (item := _item(out.get())) is not None:
                yield item
        finally:
            if run.cancel_unless_over() and threading.current_thread() is not run.thread:
                while out.get()[0] != "done":  # until the slot is free
                    pass

    async def agenerate(self, request: GenerationRequest) -> AsyncGenerator[Item, None]:
        """The answer's tokens, then a ``Finish``, without blocking the event loop.

        The request waits for a slot (in arrival order) on the first ``__anext__``; ``aclose()``, leaving the
        ``async for`` or cancelling the task gives up its place in the queue at once, or stops the generation at
        its next token, and ``aclose`` returns once the slot is free.
        """
        loaded = self._loaded
        if loaded.server is None:
            await asyncio.to_thread(loaded.load)
        loop = asyncio.get_running_loop()
        await loaded.slots.take_async(Waiter(loop), loaded.retry_after())
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is closed: nobody listens any more
                run.cancel.set()

        run = loaded.start(request, post)
        try:
            while (item := _item(await items.get())) is not None:
                yield item
        finally:
            if run.cancel_unless_over():
                while (await items.get())[0] != "done":  # until the slot is free
                    pass
