"""Redis commands asked for in one turn of the event loop, sent together: one pipeline (one write, one read) for all
the requests that took a decision in that turn, instead of a round trip each.

Under load many requests reach their rate decision or take their lease in the same turn; each round trip costs
the gateway far more CPU (the connection taken from the pool, a write, a wake-up, a read) than the command in it,
so a batch makes the shared state's cost per request fall as the load grows. A single request waits no longer
than it would alone: its batch is sent at the start of the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

__all__ = ["Batcher"]


@dataclass(slots=True)
class _Command:
    args: tuple[Any, ...]
    answer: asyncio.Future[Any]
    # The script's name when the command runs one (by its SHA; loaded again if Redis lost it).
    script: str | None = None
    # Called with the reply when it comes for a caller that stopped waiting (to undo what the command did).
    orphaned: Callable[[Any], None] | None = field(default=None)


class Batcher:
    """Sends the commands asked for in one event-loop turn as one pipeline on ``client()``; each within
    ``deadline`` seconds (its reply, or the error that stopped the pipeline, goes to its own caller)."""

    def __init__(self, client: Callable[[], Redis], scripts: Mapping[str, str], deadline: float) -> None:
        self._client = client
        self._sources = dict(scripts)
        self._shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in scripts.items()}
        self._deadline = deadline
        self._pending: list[_Command] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        orphaned: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Runs script ``name`` (one of ``scripts``) in the next batch; the future has its reply."""
        command = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        return self._add(_Command(command, self._future(), name, orphaned))

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """Runs one Redis command (``"ZREM", key, member``) in the next batch; the future has its reply."""
        return self._add(_Command(args, self._future()))

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _add(self, command: _Command) -> asyncio.Future[Any]:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(command)
        return command.answer

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Command]) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                replies = await self._execute(batch)
                lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if lost:  # Redis restarted, or its scripts were flushed: loaded again, then run again
                    await self._load({name for i in lost if (name := batch[i].script) is not None})
                    again = await self._execute([batch[i] for i in lost])
                    for i, reply in zip(lost, again, strict=True):
                        replies[i] = reply
        except Exception as exc:  # every caller is told what stopped the batch
            for command in batch:
                if not command.answer.done():
                    command.answer.set_exception(exc)
            return
        except BaseException:
            for command in batch:
                command.answer.cancel()
            raise
        for command, reply in zip(batch, replies, strict=True):
            if command.answer.done():  # its caller stopped waiting (its own deadline, or it was cancelled)
                if command.orphaned is not None and not isinstance(reply, Exception):
                    command.orphaned(reply)
            elif isinstance(reply, Exception):
                command.answer.set_exception(reply)
            else:
                command.answer.set_result(reply)

    async def _execute(self, batch: list[_Command]) -> list[Any]:
        async with self._client().pipeline(transaction=False) as pipe:
            for command in batch:
                pipe.execute_command(*command.args)
            return list(await pipe.execute(raise_on_error=False))

    async def _load(self, names: set[str]) -> None:
        client = self._client()
        for name in names:
            self._shas[name] = await client.script_load(self._sources[name])

    async def aclose(self) -> None:
        """Stops the batches in flight (their callers are told)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):  # (cancelled, as asked)
                await task
