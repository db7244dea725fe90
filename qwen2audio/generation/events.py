"""One reader's events from a producer on another thread: a queue whose last item is the end, and a
one-shot wake-up so that a reader on an event loop needs no thread of its own.

    events.post(item)                  # the producer (any thread), then events.finish(error=None) once
    item, is_end = events.get()        # the reader, blocking (timeout=...: queue.Empty); the End is the
                                       #   last item, answered again once taken
    items, end = events.poll()         # or without blocking: the items so far unread, and the End (None
                                       #   until it has come); events.read(): whether it came, its error raised
    events.on_event(callback)          # callback() once, from the producer's thread, after its next post
"""

from __future__ import annotations

import queue
from typing import Any, Callable


class End:
    """The last item: how the producer ended (``error`` None: it finished)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Events:
    """See the module's docstring."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, bool]] = queue.SimpleQueue()
        self._listener: Callable[[], None] | None = None
        self._end_only = False
        self._end_posted = False
        self.end: End | None = None  # once the reader has taken it

    # -- the producer's side -----------------------------------------------------------------------
    def post(self, item: Any) -> None:
        """Queue ``item`` and wake the listener (unless it waits for the end only)."""
        self._post(item, False)

    def finish(self, error: BaseException | None = None) -> None:
        """Queue the End (``error``: the producer failed) and wake the listener."""
        self._post(End(error), True)

    def _post(self, item: Any, end: bool) -> None:
        # The item is queued before the flag is set and the listener read, so that an ``on_event``
        # racing with this either sees the item or leaves a listener that this call wakes.
        self._queue.put((item, end))
        if end:
            self._end_posted = True
        listener = self._listener
        if listener is not None and (end or not self._end_only):
            self._listener = None
            listener()

    @property
    def ended(self) -> bool:
        """The End has been posted (it may be unread)."""
        return self._end_posted

    # -- the reader's side -------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> tuple[Any, bool]:
        """The next item and whether it is the End; raises queue.Empty when none comes in time. Once the
        End is taken, every call answers it again (a second reading ends the same way)."""
        if self.end is not None:
            return self.end, True
        item, end = self._queue.get(block, timeout)
        if end:
            self.end = item
        return item, end

    def poll(self) -> tuple[list[Any], End | None]:
        """Without blocking: the items that have come since the last read, and the End (None until it
        has come)."""
        items = []
        while self.end is None:
            try:
                item, end = self._queue.get_nowait()
            except queue.Empty:
                break
            if end:
                self.end = item
            else:
                items.append(item)
        return items, self.end

    def read(self) -> tuple[list[Any], bool]:
        """``poll`` for a reader that wants the producer's failure raised: the items that have come since
        the last read, and whether the End has come (its error, if any, is raised instead, once the items
        that came before it have been read: a stream's last text reaches its client before the error)."""
        items, end = self.poll()
        if end is not None and end.error is not None:
            if items:
                return items, False  # the next read raises
            raise end.error
        return items, end is not None

    def empty(self) -> bool:
        """Nothing is waiting to be read (an End already taken does not count)."""
        return self._queue.empty()

    def on_event(self, callback: Callable[[], None], end_only: bool = False) -> None:
        """Call ``callback()`` once, from the producer's thread, after its next post (with ``end_only``:
        after the End); at once, here, if one is already waiting (or the End has been posted). It may
        be called twice when the event lands as this is set: it must be idempotent."""
        self._end_only, self._listener = end_only, callback
        if self._end_posted or (not end_only and not self._queue.empty()):
            self._listener = None
            callback()
