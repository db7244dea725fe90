"""Waiting on a backend's handles from async code, and cancelling them when the client leaves.

A handle's iteration blocks (backend.py), so each wait runs in a worker thread of anyio's pool; a
wait that is cancelled (the client left, the stream was closed) abandons its thread, which ends
as soon as the handle is cancelled. ``WAIT_THREADS`` sizes the pool: every waiting request holds one
thread, which costs little while it sleeps on the handle's queue.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable, Sequence, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request

from .backend import ABORTED, Handle
from .errors import CLIENT_CLOSED, APIError

WAIT_THREADS = 256
T = TypeVar("T")


class ClientGone(APIError):
    """The client closed the connection before its answer was ready; its generations were cancelled."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "the client closed the connection", code="client_closed")


def widen_thread_pool() -> None:
    """Called once in the server's event loop, at startup."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = WAIT_THREADS


class Reader:
    """A handle's text deltas for async code; ``first_at`` is when the first one came (monotonic)."""

    def __init__(self, handle: Handle):
        self.handle = handle
        self._deltas = iter(handle)
        self.first_at: float | None = None

    @property
    def stopped_early(self) -> bool:
        """Cancelled before it ended (the client left, the server stopped), or ended as aborted."""
        return self.handle.cancelled or self.handle.result.finish_reason == ABORTED

    async def next(self) -> str | None:
        """The next delta, None at the end; raises the request's error."""
        delta = await anyio.to_thread.run_sync(next, self._deltas, None, abandon_on_cancel=True)
        if delta is not None and self.first_at is None:
            self.first_at = time.monotonic()
        return delta

    async def rest(self) -> str:
        """All the deltas still to come, joined."""
        return await anyio.to_thread.run_sync(self._join, abandon_on_cancel=True)

    def _join(self) -> str:
        parts = []
        for delta in self._deltas:
            if self.first_at is None:
                self.first_at = time.monotonic()
            parts.append(delta)
        return "".join(parts)


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
