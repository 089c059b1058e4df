"""The embedded model's embeddings: the mean of its last hidden states over a text's tokens, normalised.

llama.cpp computes embeddings only in an engine started for them, so the model is loaded a second time, in
embedding mode, on the first request for one (about as much memory again as the model file); generation never waits
for it. Texts are embedded one request at a time, each on the engine's thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polychat.generation import Embeddings
from polychat.providers.local.files import LocalModelError
from polychat.providers.local.wire import engine_error

__all__ = ["Embedder"]

log = logging.getLogger("polychat.providers.local")

# Tokens of one text at most (llama.cpp refuses a longer input with a clear error).
EMBEDDING_CONTEXT = 2048


class Embedder:
    """The embedding engine of one model file, loaded on first use."""

    def __init__(self, path: Path, n_threads: int, n_ctx: int = EMBEDDING_CONTEXT) -> None:
        self.path = path
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self._server: Any = None
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """The embeddings of ``texts``, in order; blocks (call it from a worker thread in async code)."""
        if not texts:
            return Embeddings([], 0)
        with self._lock:
            server = self._load()
            answer = server.handle_embeddings({"input": list(texts), "encoding_format": "float"})
        if isinstance(answer, list):  # an error comes as a list of one error object
            answer = answer[0] if answer else {}
        if not isinstance(answer, dict) or "error" in answer:
            raise engine_error(answer.get("error") if isinstance(answer, dict) else answer)
        data = sorted(answer.get("data") or (), key=lambda item: int(item.get("index", 0)))
        vectors = [[float(value) for value in item["embedding"]] for item in data]
        if len(vectors) != len(texts):
            raise LocalModelError(f"the embedded model gave {len(vectors)} embeddings for {len(texts)} texts")
        return Embeddings(vectors, int((answer.get("usage") or {}).get("prompt_tokens") or 0))

    def _load(self) -> Any:
        if self._server is not None:
            return self._server
        import xllamacpp  # present: the generating engine of the same file is loaded already, or loads now

        started = time.perf_counter()
        params = xllamacpp.CommonParams()
        params.model.path = str(self.path)
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_ctx  # a whole text in one batch, as embedding needs
        params.n_parallel = 1
        params.cpuparams.n_threads = self.n_threads
        params.cpuparams_batch.n_threads = self.n_threads
        params.warmup = False
        params.verbosity = -1
        params.hostnames = ["127.0.0.1"]
        params.port = 0
        params.api_keys = [os.urandom(16).hex()]  # its listener is nobody's business
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:
            raise LocalModelError(f"cannot load {str(self.path)!r} for embeddings: {exc}") from exc
        log.info("loaded %s for embeddings in %.2f s", self.path.name, time.perf_counter() - started)
        return self._server
