"""The request being answered, as the gateway sees it (its status, key, generations), for the faces and the router."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from starlette.types import Message, Receive, Send

from polychat.server.gateway.generation import Generation

__all__ = ["RequestContext", "current_request"]


class RequestContext:
    """One request as the gateway sees it; the current one is :func:`current_request`."""

    __slots__ = (
        "_receive",
        "_replay",
        "_send",
        "_watch",
        "error_kind",
        "generations",
        "key_id",
        "prompt",
        "start",
        "status",
    )

    def __init__(self, start: float, receive: Receive, send: Send) -> None:
        self.start = start
        self.status = 0
        self.key_id = "-"
        self.error_kind: str | None = None
        self.prompt: str | None = None
        self.generations: list[Generation] = []
        self._receive = receive
        self._send = send
        self._replay: Message | None = None
        self._watch: asyncio.Future[Message] | None = None

    async def receive(self) -> Message:
        if self._replay is not None:
            message, self._replay = self._replay, None
            return message
        if self._watch is not None:
            watch, self._watch = self._watch, None
            return await watch
        return await self._receive()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    def replay(self, message: Message) -> None:
        self._replay = message

    def disconnected(self) -> asyncio.Future[Message]:
        """Ends when the client goes away; its disconnect message is then what :meth:`receive` gives next.

        Only for after the body was read (the messages in between, if any, are dropped).
        """
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._until_disconnect())
        return self._watch

    async def _until_disconnect(self) -> Message:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return message

    def end(self) -> list[Generation]:
        """Cancels what the request still holds; returns its generations, whose backend streams are then closed."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for generation in self.generations:
            generation.cancel()
        return self.generations


current: ContextVar[RequestContext | None] = ContextVar("polychat_request", default=None)


def current_request() -> RequestContext | None:
    return current.get()
