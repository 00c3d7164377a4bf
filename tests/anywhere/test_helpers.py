"""async_context, async_iter and sync_or_async."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from tokioloop._anywhere import (
    async_context,
    async_iter,
    await_,
    run_anywhere,
    sync_or_async,
)

Run = Callable[[Coroutine[Any, Any, Any]], Any]


class Resource:
    def __init__(self, log: list[str], suppress: bool = False) -> None:
        self.log = log
        self.suppress = suppress

    async def __aenter__(self) -> str:
        await asyncio.sleep(0)
        self.log.append("enter")
        return "resource"

    async def __aexit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        await asyncio.sleep(0)
        self.log.append(f"exit:{typ.__name__ if typ else None}")
        return self.suppress


async def agen(log: list[str]) -> AsyncIterator[int]:
    try:
        for i in range(5):
            await asyncio.sleep(0)
            yield i
    finally:
        await asyncio.sleep(0)
        log.append("agen closed")


def in_thread(fn: Callable[[], Any]) -> Any:
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn).result(timeout=30)


def test_async_context_in_a_fiber(run: Run) -> None:
    log: list[str] = []

    def sync() -> Any:
        with async_context(Resource(log)) as r:
            log.append(f"body:{r}")
        with pytest.raises(KeyError):
            with async_context(Resource(log)):
                raise KeyError("x")
        with async_context(Resource(log, suppress=True)):
            raise KeyError("suppressed")
        lock = asyncio.Lock()
        with async_context(lock):
            held = lock.locked()
        return held, lock.locked()

    async def main() -> Any:
        return await run_anywhere(sync)

    assert run(main()) == (True, False)
    assert log == [
        "enter",
        "body:resource",
        "exit:None",
        "enter",
        "exit:KeyError",
        "enter",
        "exit:KeyError",
    ]


def test_async_context_without_a_loop() -> None:
    log: list[str] = []

    def sync() -> None:
        with async_context(Resource(log)):
            log.append("body")

    in_thread(sync)
    assert log == ["enter", "body", "exit:None"]


def test_async_context_rejects_plain_objects() -> None:
    with pytest.raises(TypeError, match="asynchronous context manager"):
        with async_context(object()):
            pass


def test_async_iter_in_a_fiber(run: Run) -> None:
    log: list[str] = []

    def sync() -> Any:
        full = [x * 10 for x in async_iter(agen(log))]
        with async_iter(agen(log)) as it:
            partial = []
            for x in it:
                partial.append(x)
                if x == 1:
                    break
        return full, partial

    async def main() -> Any:
        return await run_anywhere(sync)

    assert run(main()) == ([0, 10, 20, 30, 40], [0, 1])
    assert log == ["agen closed", "agen closed"]


def test_async_iter_of_async_iterable_without_a_loop() -> None:
    class Numbers:
        def __aiter__(self) -> AsyncIterator[int]:
            return agen([])

    assert in_thread(lambda: list(async_iter(Numbers()))) == [0, 1, 2, 3, 4]


def test_async_iter_rejects_plain_iterables() -> None:
    with pytest.raises(TypeError, match="__aiter__"):
        async_iter([1, 2])  # type: ignore[arg-type]


@sync_or_async
async def fetch(x: int) -> int:
    """Async body."""
    await asyncio.sleep(0)
    return x * 2


@sync_or_async
def compute(x: int) -> int:
    """Sync body that awaits."""
    return int(await_(asyncio.sleep(0, result=x))) + 1


def test_sync_or_async_async_body(run: Run) -> None:
    async def async_caller() -> Any:
        aw = fetch(1)
        assert asyncio.iscoroutine(aw)
        return await aw

    def sync_caller() -> int:
        return fetch(2)  # type: ignore[return-value]

    async def main() -> Any:
        return await async_caller(), await run_anywhere(sync_caller)

    assert run(main()) == (2, 4)
    assert in_thread(sync_caller) == 4
    assert fetch.__name__ == "fetch" and fetch.__doc__ == "Async body."


def test_sync_or_async_sync_body(run: Run) -> None:
    async def async_caller() -> Any:
        return await compute(1)  # type: ignore[misc]

    def sync_caller() -> int:
        return compute(2)

    async def main() -> Any:
        return await async_caller(), await run_anywhere(sync_caller)

    assert run(main()) == (2, 3)
    assert in_thread(sync_caller) == 3
    assert compute.__name__ == "compute"


def test_sync_or_async_from_async_generator(run: Run) -> None:
    async def gen() -> AsyncIterator[int]:
        yield await fetch(5)

    async def main() -> Any:
        return [x async for x in gen()]

    assert run(main()) == [10]
