"""The faces of the server as the gateway knows them: each one's paths and the shape of its errors.

A face (OpenAI's API, the Gravityengine route, the H2O chat, freegpt-webui, the web chat) declares once, as a
:class:`Face`, the path prefixes it serves, the body of its error answers and the error event of its streams. The app
registers its faces in a :class:`FaceRegistry`; everything that answers with an error renders it through the face of
the request's path: the guard's refusals (401, 413, 421, 429), the hygiene checks (403, 415, 503), the exception
handler behind every handler's :class:`~polychat.server.gateway.errors.GatewayError`, and a face's own stream once it
has begun. A face added to the registry gets all of them without any change here or in the guard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Send

from polychat.server.gateway.errors import GatewayError

__all__ = ["Face", "FaceRegistry"]


@dataclass(frozen=True, slots=True)
class Face:
    name: str
    # Path prefixes ("/v1/"), each also matching itself without the last slash ("/v1").
    prefixes: tuple[str, ...]
    # The JSON body of an error answer.
    error_body: Callable[[GatewayError], bytes]
    # What a stream that has already begun sends to say it failed (None: the face has no streams).
    error_event: Callable[[GatewayError], bytes] | None = None
    # Content types a browser page may send to this face's state-changing routes; () : not a browser face (no
    # cross-site checks).
    browser_content_types: tuple[str, ...] = ()
    # How the face words a refused access code (given the code sent, b"" for none) when a server has access codes
    # but no API keys; None: the gateway's own wording.
    words_refused_code: Callable[[bytes], str] | None = None
    # The status the face's clients are answered with for one of the gateway's (None: the same), for a format whose
    # statuses are its own (Anthropic's 529 "overloaded" for a 503).
    status_of: Callable[[int], int] | None = None

    def status(self, error: GatewayError) -> int:
        return self.status_of(error.status) if self.status_of is not None else error.status

    def matches(self, path: str) -> int:
        """How long the prefix is that ``path`` matches (0: none)."""
        matched = (len(prefix) for prefix in self.prefixes if path.startswith(prefix) or path == prefix.rstrip("/"))
        return max(matched, default=0)

    def response(self, error: GatewayError) -> Response:
        return Response(
            self.error_body(error),
            status_code=self.status(error),
            media_type="application/json",
            headers=error.headers(),
        )

    async def send(self, send: Send, error: GatewayError) -> None:
        """The error answer, sent by an ASGI middleware."""
        body = self.error_body(error)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers().items()),
        ]
        await send({"type": "http.response.start", "status": self.status(error), "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class FaceRegistry:
    """The faces of one app, by path: the longest matching prefix wins; ``fallback`` takes every other path."""

    def __init__(self, fallback: Face, faces: tuple[Face, ...] = ()) -> None:
        self.fallback = fallback
        self._faces: dict[str, Face] = {}
        for face in (fallback, *faces):
            self.register(face)

    def register(self, face: Face) -> None:
        """Adds ``face`` (or replaces the one of the same name)."""
        self._faces[face.name] = face

    def __iter__(self) -> Iterator[Face]:
        return iter(self._faces.values())

    def __getitem__(self, name: str) -> Face:
        return self._faces[name]

    def of(self, path: str) -> Face:
        best, length = self.fallback, 0
        for face in self._faces.values():
            matched = face.matches(path)
            if matched > length:
                best, length = face, matched
        return best
