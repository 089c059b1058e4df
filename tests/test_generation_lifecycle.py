"""A generation as the gateway serves it: tokens, then exactly one Finish, whatever the backend sends; and its end
told once to whoever watches it (the upstream's health, the slot, the metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from polychat.generation import Finish, Item, Token, Usage
from polychat.server.gateway.generation import Outcome, Watcher, start

DONE = Finish("length", Usage(3, 2))


class Recorder(Watcher):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ends: list[tuple[Outcome, BaseException | None]] = []

    def token(self, token: Token) -> None:
        self.tokens.append(token.text)

    def ended(self, outcome: Outcome, error: BaseException | None) -> None:
        self.ends.append((outcome, error))


class Backend:
    """A backend's stream of ``items`` (an exception among them is raised there); knows whether it was closed."""

    def __init__(self, items: Sequence[Item | Exception]) -> None:
        self.items = list(items)
        self.closed = False

    async def stream(self) -> AsyncIterator[Item]:
        try:
            for item in self.items:
                await asyncio.sleep(0)
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


async def run(items: Sequence[Item | Exception]) -> tuple[list[Item], Recorder, Backend, BaseException | None]:
    backend = Backend(items)
    generation = await start(backend.stream())
    recorder = Recorder()
    generation.watch(recorder)
    seen: list[Item] = []
    error = None
    try:
        async for item in generation.items():
            seen.append(item)
    except Exception as exc:
        error = exc
    return seen, recorder, backend, error


@pytest.mark.parametrize(
    ("items", "finish"),
    [
        ([Token("a"), Token("b"), DONE], DONE),
        ([Token("a"), Token("b", finish=DONE)], DONE),
        # The end said twice (on the last token and after it), or more than once: one Finish, the first.
        ([Token("a"), Token("b", finish=DONE), Finish("eos_token", Usage(3, 2))], DONE),
        ([Token("a"), Token("b"), DONE, Finish("eos_token", Usage(9, 9)), Token("late")], DONE),
        # Nothing said of the end: a normal end, its tokens counted.
        ([Token("a"), Token("b")], Finish("eos_token", Usage(0, 2), usage_estimated=True)),
    ],
    ids=["finish-after", "finish-on-last-token", "both", "twice-and-more", "none"],
)
def test_tokens_then_exactly_one_finish(items: list[Item], finish: Finish) -> None:
    seen, recorder, backend, error = asyncio.run(run(items))
    assert error is None
    assert seen == [Token("a"), Token("b"), finish]
    assert all(item.finish is None for item in seen if isinstance(item, Token))
    assert recorder.tokens == ["a", "b"]
    assert recorder.ends == [("done", None)]
    assert backend.closed


def test_an_empty_stream_still_finishes_once() -> None:
    seen, recorder, _, error = asyncio.run(run([]))
    assert (seen, error) == ([Finish("eos_token", Usage(0, 0), usage_estimated=True)], None)
    assert recorder.ends == [("done", None)]


def test_a_failure_in_the_middle_is_raised_and_ends_it_as_failed() -> None:
    broken = RuntimeError("backend broke")
    seen, recorder, backend, error = asyncio.run(run([Token("a"), broken, Token("never")]))
    assert seen == [Token("a")]
    assert error is broken
    assert recorder.ends == [("failed", broken)]
    assert backend.closed


def test_closing_it_early_cancels_it_once_and_closes_the_backend() -> None:
    async def scenario() -> tuple[Recorder, Backend, list[Item]]:
        backend = Backend([Token("a"), Token("b"), Token("c"), DONE])
        generation = await start(backend.stream())
        recorder = Recorder()
        generation.watch(recorder)
        items = generation.items()
        taken = [await anext(items)]
        await items.aclose()
        generation.cancel()  # the request's end cancels again: nobody hears of it twice
        await generation.close_backend()
        return recorder, backend, taken

    recorder, backend, taken = asyncio.run(scenario())
    assert taken == [Token("a")]
    assert recorder.ends == [("cancelled", None)]
    assert backend.closed


async def test_an_interrupt_ends_a_waiting_generation_with_its_error_as_cancelled() -> None:
    release = asyncio.Event()
    closed = []

    async def slow() -> AsyncIterator[Item]:
        try:
            yield Token("first")
            await release.wait()  # a backend that takes its time over the next token
            yield Token("never")
        finally:
            closed.append(True)

    generation = await start(slow())
    recorder = Recorder()
    generation.watch(recorder)
    cut = RuntimeError("shutting down")
    seen: list[str] = []

    async def read() -> None:
        async for item in generation.items():
            if isinstance(item, Token):
                seen.append(item.text)

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.01)
    generation.interrupt(cut)
    with pytest.raises(RuntimeError, match="shutting down"):
        await asyncio.wait_for(reading, 1)
    assert not reading.cancelled()  # the reader hears the error, not a cancellation of its own
    assert seen == ["first"]
    assert recorder.ends == [("cancelled", None)]  # not the upstream's failure
    assert closed == [True]
