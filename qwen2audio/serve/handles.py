"""Waiting on a backend's handles from async code, and cancelling them when the client leaves.

A Reader waits on the event loop itself: the handle's producer wakes it (``Handle.on_event``), so no
worker thread is held per request (anyio's pool is left for decoding audio and preparing prompts).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Sequence, TypeVar

import anyio
from starlette.requests import Request

from .backend import ABORTED, Handle
from .errors import CLIENT_CLOSED, APIError

T = TypeVar("T")


class ClientGone(APIError):
    """The client closed the connection before its answer was ready; its generations were cancelled."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "the client closed the connection", code="client_closed")


class Reader:
    """A handle's text deltas for async code; ``first_at`` is when the first one came (monotonic).

    Reads never block the event loop and take no worker thread: the handle's producer wakes the loop
    (``on_event``, a thread-safe call) and the reader takes what has come. A stream's chunk carries all
    the text that came since the last one (several tokens when the loop falls behind); a whole answer
    wakes the loop twice (its first text, its end), not once per token."""

    def __init__(self, handle: Handle):
        self.handle = handle
        self.first_at: float | None = None

    @property
    def stopped_early(self) -> bool:
        """Cancelled before it ended (the client left, the server stopped), or ended as aborted."""
        return self.handle.cancelled or self.handle.result.finish_reason == ABORTED

    async def next(self) -> str | None:
        """The text that came since the last read (waiting for some), None at the end; raises the
        request's error."""
        while True:
            text, ended = self.handle.poll()
            if text:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                return text
            if ended:
                return None
            await self._event(end_only=False)

    async def rest(self) -> str:
        """All the text still to come, joined."""
        parts = []
        while True:
            text, ended = self.handle.poll()
            if text:
                parts.append(text)
                if self.first_at is None:
                    self.first_at = time.monotonic()
            if ended:
                return "".join(parts)
            await self._event(end_only=self.first_at is not None)

    async def _event(self, end_only: bool) -> None:
        """Until the handle's producer posts the next event (or its end)."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:  # the producer's thread; possibly twice, possibly after the loop has closed
            try:
                loop.call_soon_threadsafe(_settle, woken)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self.handle.on_event(wake, end_only)
        await woken


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def until_disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the request's body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def watching(request: Request, handles: Sequence[Handle], work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``; if the client disconnects first, cancel ``handles`` and raise ClientGone."""
    gone = False
    result, error = None, None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal gone
            await until_disconnected(request)
            gone = True
            for handle in handles:
                handle.cancel()
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            result = await work()
        except Exception as err:  # noqa: BLE001 - raised below, outside the task group (no ExceptionGroup)
            error = err
        group.cancel_scope.cancel()
    if gone:
        raise ClientGone()
    if error is not None:
        raise error
    return result
