"""The embedded model (SmolLM2-135M-Instruct on llama.cpp's server core), for real: no mocks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from polychat.errors import ModelNotFoundError, PolychatError, RateLimitError
from polychat.generation import Finish, GenerationRequest, Item, Token
from polychat.providers.local import (
    DEFAULT_ALIAS,
    EngineStats,
    Local,
    LocalBackend,
    LocalModel,
    LocalModelError,
    LocalModelNotFoundError,
)
from tests.support import wait_until, wait_until_async

pytestmark = pytest.mark.local_model

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# An answer far longer than 400 tokens: a generation that holds the model for a few seconds.
ESSAY = [{"role": "user", "content": "Write a long, detailed essay about the history of the Roman Empire."}]


@pytest.fixture(scope="module")
def engine() -> LocalModel:
    model = LocalModel()
    model.load()
    return model


@pytest.fixture(scope="module")
def single() -> LocalModel:
    """An engine with one slot and room for three waiting requests."""
    model = LocalModel(parallel=1, queue=3)
    model.load()
    return model


def settled(engine: LocalModel) -> EngineStats:
    """The engine's counters once no slot is processing any more and the token count no longer moves."""
    wait_until(lambda: not engine.stats().processing, 10)
    stats = engine.stats()
    time.sleep(0.1)
    again = engine.stats()
    assert again.processing == 0 and again.tokens_predicted == stats.tokens_predicted
    return again


def make_request(messages: list[dict[str, Any]] = POEM, **settings: Any) -> GenerationRequest:
    chosen: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, **settings}
    return GenerationRequest(model=DEFAULT_ALIAS, messages=messages, **chosen)


def split(items: Iterable[Item]) -> tuple[str, list[Token], Finish]:
    collected = list(items)
    finish = collected[-1]
    assert isinstance(finish, Finish)
    tokens = [item for item in collected[:-1] if isinstance(item, Token)]
    assert len(tokens) == len(collected) - 1
    return "".join(token.text for token in tokens), tokens, finish


def run(engine: LocalModel, request: GenerationRequest) -> tuple[str, Finish]:
    text, _, finish = split(engine.generate(request))
    return text, finish


async def arun(engine: LocalModel, request: GenerationRequest) -> tuple[str, Finish]:
    text, _, finish = split([item async for item in engine.agenerate(request)])
    return text, finish


def test_answers_with_exact_usage(engine: LocalModel) -> None:
    text, tokens, finish = split(engine.generate(make_request(max_tokens=12)))
    assert engine.name == DEFAULT_ALIAS
    assert text.strip()
    assert finish.usage_estimated is False
    assert finish.usage.prompt_tokens == engine.count_prompt_tokens(POEM)
    assert finish.usage.completion_tokens == len(tokens)
    assert all(token.logprob <= 0.0 and token.id > 0 for token in tokens)


def test_same_seed_same_text(engine: LocalModel) -> None:
    sampled = make_request(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20)
    first, first_finish = run(engine, sampled)
    second, second_finish = run(engine, sampled)
    assert first == second
    assert first_finish.seed == second_finish.seed == 1234
    greedy = make_request(max_tokens=20)
    assert run(engine, greedy)[0] == run(engine, greedy)[0]
    # through the provider too
    again = Local.create_completion(None, POEM, temperature=0.9, top_p=0.95, seed=1234, max_tokens=20).text()
    assert again == first


def test_stop_sequence_is_respected_and_not_leaked(engine: LocalModel) -> None:
    full, _ = run(engine, make_request(max_tokens=24))
    words = full.split()
    assert len(words) >= 6
    stop = f" {words[3]} {words[4]}"  # spans several tokens
    assert stop in full
    expected = full[: full.index(stop)]

    text, tokens, finish = split(engine.generate(make_request(max_tokens=24, stop=[stop, "never appears"])))
    assert finish.reason == "stop_sequence"
    assert text == expected
    assert stop not in text
    assert finish.usage.completion_tokens >= len(tokens)

    pieces = list(Local.create_completion(None, POEM, max_tokens=24, temperature=0, stop=stop))
    assert "".join(pieces) == expected


def test_max_tokens_is_respected(engine: LocalModel) -> None:
    text, tokens, finish = split(engine.generate(make_request(max_tokens=7)))
    assert finish.reason == "length"
    assert finish.usage.completion_tokens == 7 == len(tokens)
    assert engine.count_tokens(text) == 7
    # the synonym, and stream=False giving one piece
    pieces = list(Local.create_completion(None, POEM, stream=False, max_new_tokens=7, temperature=0))
    assert pieces == [text]
    assert Local.count_tokens(pieces[0]) == 7


def test_multibyte_utf8_is_decoded_across_tokens(engine: LocalModel) -> None:
    emojis = [{"role": "user", "content": "Reply with five emojis about the sea."}]
    text, tokens, _ = split(engine.generate(make_request(emojis, max_tokens=12)))
    assert "\ufffd" not in text
    assert any(ord(char) > 0x3000 for char in text)
    assert any(token.text == "" for token in tokens)  # a character's bytes spread over several tokens


def test_closing_the_sync_stream_stops_and_frees_its_slot(engine: LocalModel) -> None:
    before = settled(engine).tokens_predicted
    long_run = engine.generate(make_request(ESSAY, max_tokens=400))
    taken = [next(long_run), next(long_run)]
    assert all(isinstance(item, Token) for item in taken)
    assert engine.busy
    long_run.close()
    assert not engine.busy  # close returns once the slot is free
    count = settled(engine).tokens_predicted  # the engine's own count: it stopped for good
    assert 2 <= count - before < 20

    _, finish = run(engine, make_request(max_tokens=5))
    assert finish.usage.completion_tokens == 5
    assert settled(engine).tokens_predicted == count + 5  # the first generation did not go on


def test_a_reader_that_stops_reading_does_not_hold_up_the_others(engine: LocalModel) -> None:
    stalled = engine.generate(make_request(max_tokens=30))
    first = next(stalled)
    assert isinstance(first, Token)
    # another request is answered while the stalled reader reads nothing; the stalled one still gets every item
    _, finish = run(engine, make_request(CAPITAL, max_tokens=5))
    assert finish.usage.completion_tokens == 5
    rest, _, stalled_finish = split(stalled)
    assert stalled_finish.usage.completion_tokens == 30
    assert first.text + rest == run(engine, make_request(max_tokens=30))[0]
    assert not engine.busy


async def stopped_for_good(engine: LocalModel) -> int:
    """The engine's token count, once it no longer moves (the generation really stopped)."""
    return (await asyncio.to_thread(settled, engine)).tokens_predicted


async def test_aclose_and_task_cancellation_stop_and_free_the_slot(engine: LocalModel) -> None:
    before = await stopped_for_good(engine)
    stream = engine.agenerate(make_request(max_tokens=400))
    assert isinstance(await anext(stream), Token)
    assert isinstance(await anext(stream), Token)
    await stream.aclose()
    assert not engine.busy  # aclose returns once the slot is free
    assert (await stopped_for_good(engine)) - before < 20

    received = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in engine.agenerate(make_request(max_tokens=400)):
            count += 1
            if count == 2:
                received.set()

    before = await stopped_for_good(engine)
    task = asyncio.create_task(consume())
    await asyncio.wait_for(received.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not engine.busy
    assert (await stopped_for_good(engine)) - before < 20

    _, finish = await arun(engine, make_request(max_tokens=5))
    assert finish.usage.completion_tokens == 5


def test_waiting_requests_are_served_in_arrival_order(single: LocalModel) -> None:
    engine = single
    holder = engine.generate(make_request(ESSAY, max_tokens=400))
    next(holder)  # holds the only slot
    order: list[int] = []
    threads = []

    def request_and_record(index: int) -> None:
        run(engine, make_request(max_tokens=2))
        order.append(index)

    try:
        for index in range(3):
            thread = threading.Thread(target=request_and_record, args=(index,))
            thread.start()
            threads.append(thread)
            wait_until(lambda: engine.waiting >= index + 1, 10)  # noqa: B023 (called at once)
            assert engine.waiting == index + 1
    finally:
        holder.close()
    for thread in threads:
        thread.join(30)
    assert order == [0, 1, 2]
    assert not engine.busy


async def test_a_waiting_request_can_leave_the_queue(single: LocalModel) -> None:
    engine = single
    holder = engine.generate(make_request(ESSAY, max_tokens=400))
    next(holder)  # holds the only slot
    try:
        waiter = asyncio.create_task(arun(engine, make_request(max_tokens=5)))
        await wait_until_async(lambda: engine.waiting, 2)
        assert engine.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert engine.waiting == 0
    finally:
        holder.close()
    assert not engine.busy


def test_a_full_queue_is_refused_at_once_with_a_retry_after(single: LocalModel) -> None:
    engine = single
    holder = engine.generate(make_request(ESSAY, max_tokens=400))
    next(holder)
    waiting = [engine.generate(make_request(max_tokens=2)) for _ in range(3)]
    threads = [threading.Thread(target=list, args=(items,)) for items in waiting]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: engine.waiting >= 3, 10)
        assert engine.waiting == 3
        with pytest.raises(RateLimitError) as refused:
            next(engine.generate(make_request(max_tokens=2)))
        assert refused.value.retry_after is not None and refused.value.retry_after >= 1
        assert engine.waiting == 3  # the refused request took no place
    finally:
        holder.close()
        for thread in threads:
            thread.join(30)
    assert not engine.busy and engine.waiting == 0


def test_two_threads_share_the_model(engine: LocalModel) -> None:
    requests = [make_request(temperature=0.8, seed=7, max_tokens=16), make_request(CAPITAL, max_tokens=16)]
    alone = [run(engine, request)[0] for request in requests]
    assert alone[0] != alone[1]
    barrier = threading.Barrier(2)

    def worker(request: GenerationRequest) -> str:
        barrier.wait()
        return run(engine, request)[0]

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(worker, requests))
    assert together == alone


async def test_two_tasks_share_the_model_without_blocking_the_loop(engine: LocalModel) -> None:
    requests = [make_request(temperature=0.8, seed=11, max_tokens=16), make_request(CAPITAL, max_tokens=16)]
    alone = [(await arun(engine, request))[0] for request in requests]
    ticks = 0
    finished = False

    async def ticker() -> None:
        nonlocal ticks
        while not finished:
            ticks += 1
            await asyncio.sleep(0.005)

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    together = await asyncio.gather(*(arun(engine, request) for request in requests))
    elapsed = time.perf_counter() - started
    finished = True
    await ticking
    assert [text for text, _ in together] == alone
    assert ticks > 10, (ticks, elapsed)  # the loop kept running while the model worked (a blocked loop ticks once)


def test_sync_async_and_other_threads_all_get_the_same_answer(engine: LocalModel) -> None:
    request = make_request(max_tokens=3)
    expected = run(engine, request)[0]
    answers: list[str] = []

    def generate_here() -> None:
        answers.append(run(engine, request)[0])

    generate_here()  # sync, on this thread
    thread = threading.Thread(target=generate_here)
    thread.start()
    thread.join(60)

    async def from_a_loop() -> None:
        answers.append((await arun(engine, request))[0])
        generate_here()  # the sync API inside the running loop
        await asyncio.to_thread(generate_here)

    asyncio.run(from_a_loop())
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: generate_here(), range(4)))
    assert answers == [expected] * 9
    assert engine.count_tokens("hello") == 1 and engine.count_prompt_tokens(POEM) > 0


# Run in a fresh process, so that no earlier test's threads count: the threads Python did not start are the engine's
# (its loop, its listener, llama.cpp's OpenMP workers).
OPENMP_TEAMS = r"""
import asyncio, json, os, sys, threading
from concurrent.futures import ThreadPoolExecutor
from polychat.generation import GenerationRequest
from polychat.providers.local import LocalModel

def foreign():
    python = {thread.native_id for thread in threading.enumerate()}
    return [int(task) for task in os.listdir("/proc/self/task") if int(task) not in python]

engine = LocalModel(n_threads=int(sys.argv[1]))
engine.load()
before = foreign()
request = GenerationRequest(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)

def generate():
    return [item for item in engine.generate(request)]

generate()  # sync, on the main thread
ran, leave = threading.Event(), threading.Event()

def long_lived():
    generate()
    ran.set()
    leave.wait()

thread = threading.Thread(target=long_lived)
thread.start()
ran.wait()

async def main():
    [item async for item in engine.agenerate(request)]
    await asyncio.to_thread(generate)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: generate(), range(4)))
        return foreign()  # while every thread that asked for a generation is alive

after = asyncio.run(main())
leave.set()
thread.join()
print(json.dumps({"before": before, "after": after}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc/self/task (Linux)")
def test_one_openmp_team_however_many_threads_use_the_model() -> None:
    # OpenMP keeps a team of worker threads per thread that ran a computation; with more OpenMP threads than cores
    # every token gets about 3 times slower. All computation runs on the engine's own loop thread, so this mix of
    # callers (main thread, a long-lived thread, an event loop, asyncio.to_thread, a thread pool) adds no team.
    n_threads = 2
    done = subprocess.run(
        [sys.executable, "-c", OPENMP_TEAMS, str(n_threads)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    new_threads = set(report["after"]) - set(report["before"])
    assert len(new_threads) <= n_threads - 1, report  # at most the one team's workers, started on first use


async def test_sync_api_inside_a_running_event_loop(engine: LocalModel) -> None:
    expected, _ = run(engine, make_request(max_tokens=8))
    assert Local.create_completion(DEFAULT_ALIAS, POEM, max_tokens=8, temperature=0).text() == expected
    stream = await Local.create_async_generator(DEFAULT_ALIAS, POEM, max_tokens=8, temperature=0)
    assert await stream.text() == expected


async def test_backend_serves_generation_requests(engine: LocalModel) -> None:
    backend = LocalBackend()
    assert list(backend.models()) == [DEFAULT_ALIAS]
    expected, _ = run(engine, make_request(max_tokens=8))
    text, _, finish = split([item async for item in backend.generate(make_request(max_tokens=8))])
    assert text == expected
    assert finish.reason == "length"
    assert finish.usage.completion_tokens == 8


def test_unknown_model_path_is_a_typed_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(LocalModelNotFoundError) as caught:
        LocalModel(missing)
    assert isinstance(caught.value, ModelNotFoundError)
    assert isinstance(caught.value, PolychatError)
    assert "missing.gguf" in str(caught.value)
    with pytest.raises(ModelNotFoundError):
        Local(model_path=missing).create_completion(None, POEM, max_tokens=2).text()
    with pytest.raises(ModelNotFoundError):
        Local.create_completion(str(missing), POEM, max_tokens=2).text()
    with pytest.raises(ModelNotFoundError):
        Local.create_completion("no-such-model", POEM)

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(LocalModelError):
        list(LocalModel(broken).generate(make_request(max_tokens=2)))
