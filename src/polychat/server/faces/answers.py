"""An answer as the H2O chat face and the web chat store it while it is written.

Its row is stored when the answer begins (``writing``, by this process), its text saved as it grows (at most every
:data:`SAVE_EVERY` seconds) and at its end (``complete``): a process that dies mid-answer leaves what it had written,
which the next sweep marks ``interrupted`` (see :mod:`polychat.server.store.base`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from polychat.server.gateway.state import ServerState
from polychat.server.store import StorageFailure

__all__ = ["SAVE_EVERY", "AnswerWriter"]

# Seconds between two saves of an answer's text while it is written.
SAVE_EVERY = 1.0


class AnswerWriter:
    """One answer's row in the store (``message_id``; None: the conversation was deleted, nothing is stored)."""

    def __init__(self, state: ServerState, message_id: int | None) -> None:
        self._state = state
        self._id = message_id
        self._saved_at = time.monotonic()
        self._ended = message_id is None

    async def grow(self, pieces: Sequence[str]) -> None:
        """The answer so far (its pieces): saved if the last save is old enough. Best effort: a failure is logged
        by the store, and the end saves it all."""
        if self._ended or self._id is None or time.monotonic() - self._saved_at < SAVE_EVERY:
            return
        self._saved_at = time.monotonic()
        with contextlib.suppress(StorageFailure):
            await self._state.store.write_answer(self._id, "".join(pieces))

    async def end(self, pieces: Sequence[str]) -> None:
        """The whole answer: stored complete (once; a failure is raised, and reported, that once)."""
        if self._ended or self._id is None:
            return
        self._ended = True
        try:
            await self._state.store.end_answer(self._id, "".join(pieces))
        except StorageFailure:
            # Not left "writing" while this process lives on: interrupted now, or by the next heartbeat that
            # reaches the store (the store logs a failure).
            try:
                await self._state.store.abandon_answer(self._id)
            except StorageFailure:
                self._state.unsettled_answers.add(self._id)
            raise
