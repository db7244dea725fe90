"""What the HTTP layer needs from a model, and ThreadBackend: a loaded Qwen2Audio in one worker thread.

The HTTP layer (app.py, chat.py, transcription.py) sees only the ``Backend`` protocol below, so a
scheduler that batches requests can take ThreadBackend's place without touching it:

    handle = backend.chat(messages, params)           # or backend.complete(prompt, audios, params)
    for delta in handle: ...                          # text deltas, blocking; raises the request's error
    handle.result                                     # Generation: text, token_ids, finish_reason,
                                                      #   prompt_tokens; complete once iteration ends
    handle.cancel()                                   # any thread, any time: a queued request is dropped,
                                                      #   a running one stops at its next token
    backend.queue_depth, backend.running              # for /metrics
    backend.close()                                   # refuse new requests, cancel the rest

``chat`` and ``complete`` raise ``QueueFull`` at once when no more requests can wait, and
``Unavailable`` once the backend is closing. Errors of the request itself (a prompt longer than the
context) come out of the handle's iteration as ValueError. Audio arrives decoded: 16 kHz mono float32
arrays (audio_input.py checks it first), in the messages as {"type": "audio", "audio": array}.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..generation.engine import Generation
from ..generation.params import SamplingParams
from . import defaults

if TYPE_CHECKING:
    from ..api import Qwen2Audio
    from ..generation.engine import Prepared

ABORTED = "abort"  # finish_reason of a request cancelled before it finished (as vLLM reports it)
RETRY_AFTER_SECONDS = 1  # what a refused client is told to wait before trying again


class QueueFull(Exception):
    """No more requests can wait; the client should retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(f"the server is busy: {depth} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The backend is shutting down and takes no more requests."""


class Handle:
    """One submitted request. The consumer iterates over its text deltas (blocking) and reads ``result``
    once iteration has ended; the producer (a backend's worker) calls ``put``, ``finish`` or ``fail``."""

    _DELTA, _END, _ERROR = "delta", "end", "error"

    def __init__(self) -> None:
        self.result = Generation()
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._ended = threading.Event()  # finished or failed: cancelling it changes nothing
        self._on_cancel: Callable[["Handle"], None] | None = None  # set by the backend that owns it

    # -- the consumer's side -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        while True:
            kind, value = self._events.get()
            if kind == self._DELTA:
                yield value
                continue
            self._events.put((kind, value))  # a second iteration ends (or raises) the same way
            if kind == self._ERROR:
                raise value
            return

    def cancel(self) -> None:
        """Stop this request (idempotent; nothing happens once it has ended): the iteration then ends
        with finish_reason "abort"."""
        if self._cancelled.is_set() or self._ended.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- the producer's side -----------------------------------------------------------------------
    def put(self, delta: str) -> None:
        self._events.put((self._DELTA, delta))

    def finish(self, result: Generation | None = None) -> None:
        if result is not None:
            self.result = result
        if self.result.finish_reason is None:  # stopped before a stop token or the length limit
            self.result.finish_reason = ABORTED
        self._ended.set()
        self._events.put((self._END, None))

    def fail(self, error: BaseException) -> None:
        self._ended.set()
        self._events.put((self._ERROR, error))


class Backend(Protocol):
    """The model as the HTTP layer sees it (see the module's docstring)."""

    model_id: str
    chat_defaults: Mapping[str, Any]  # SamplingParams keywords of chat replies (generation_config.json)

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams) -> Handle: ...

    def complete(self, prompt: str, audios: Sequence[np.ndarray], params: SamplingParams) -> Handle: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    def close(self, timeout: float | None = None) -> None: ...


class ThreadBackend:
    """A loaded Qwen2Audio answering one request at a time, in submission order, in a worker thread.

    A thin adapter kept so that a batching scheduler can replace it: the waiting line is a bounded
    deque, and cancelling is checked at every decoded token.
    """

    def __init__(self, model: "Qwen2Audio", model_id: str, max_queue: int = defaults.MAX_QUEUE):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model = model
        self.model_id = model_id
        self.chat_defaults = dict(model.generation_defaults)
        self.max_queue = max_queue
        self._waiting: deque[tuple[Handle, Callable[[], "Prepared"], SamplingParams]] = deque()
        self._running: Handle | None = None
        self._closed = False
        self._lock = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="qwen2audio-serve-worker", daemon=True)
        self._worker.start()

    # -- Backend -------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams) -> Handle:
        return self._submit(lambda: self.model.prepare_chat(messages), params)

    def complete(self, prompt: str, audios: Sequence[np.ndarray], params: SamplingParams) -> Handle:
        return self._submit(lambda: self.model.prepare_raw(prompt, audios), params)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._running is not None)

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests, end the waiting ones and stop the running one; wait for the worker."""
        with self._lock:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            running = self._running
            self._lock.notify_all()
        for handle, _, _ in dropped:
            handle.finish()
        if running is not None:
            running.cancel()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # -- the waiting line ------------------------------------------------------------------------------
    def _submit(self, prepare: Callable[[], "Prepared"], params: SamplingParams) -> Handle:
        handle = Handle()
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting))
            handle._on_cancel = self._drop
            self._waiting.append((handle, prepare, params))
            self._lock.notify()
        return handle

    def _drop(self, handle: Handle) -> None:
        """A cancelled request that has not started leaves the line now (a running one stops itself)."""
        with self._lock:
            for job in self._waiting:
                if job[0] is handle:
                    self._waiting.remove(job)
                    break
            else:
                return
        handle.finish()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                handle, prepare, params = self._waiting.popleft()
                self._running = handle
            try:
                self._run(handle, prepare, params)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, handle: Handle, prepare: Callable[[], "Prepared"], params: SamplingParams) -> None:
        try:
            request = prepare()  # decodes nothing (audio arrives as arrays); encodes the audio
            if handle.cancelled:
                handle.finish()
                return
            results, events = self.model.engine.stream_batch([request], params)
            handle.result = results[0]
            for _, delta in events:  # every decoded token, with an empty delta where no text is ready
                if handle.cancelled:
                    events.close()
                    break
                if delta:
                    handle.put(delta)
        except Exception as err:  # noqa: BLE001 - the request's error, raised to its consumer
            handle.fail(err)
            return
        handle.finish()
