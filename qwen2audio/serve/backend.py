"""What the HTTP layer needs from a model, and SchedulerBackend: a loaded Qwen2Audio behind a Scheduler
that decodes concurrent requests in one batch.

The HTTP layer (app.py, chat.py, transcription.py) sees only the ``Backend`` protocol below (the
tests' fake backend implements it too):

    handle = backend.chat(messages, params)           # or backend.complete(prompt, audios, params)
    for delta in handle: ...                          # text deltas, blocking; raises the request's error
    text, ended = handle.poll()                       # or without blocking: the text so far unread
    handle.tokens_read                                # generated tokens whose text poll has returned
    handle.on_event(callback, end_only=False)         # callback() once at the next event (any thread)
    handle.result                                     # Generation: text, token_ids, finish_reason,
                                                      #   prompt_tokens, logprobs (when asked for);
                                                      #   complete once iteration ends
    backend.token_bytes(token_id)                     # what a token of result.logprobs stands for
    handle.cancel()                                   # any thread, any time: a queued request is dropped,
                                                      #   a running one stops at its next token
    backend.queue_depth, backend.running              # for /metrics
    backend.close()                                   # refuse new requests, cancel the rest

``chat`` and ``complete`` raise ``QueueFull`` at once when no more requests can wait, and
``Unavailable`` once the backend is closing. Errors of the request itself come out of the handle's
iteration as ValueError (a prompt longer than the context: RequestTooLarge). Audio arrives decoded: 16 kHz
mono float32 arrays (audio_input.py checks it first), in the messages as {"type": "audio", "audio": array}.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from ..generation.engine import Generation
from ..generation.events import Events
from ..generation.params import SamplingParams
from ..generation import scheduler as sched
from . import defaults

if TYPE_CHECKING:
    from ..api import Qwen2Audio
    from ..generation.engine import Prepared

ABORTED = "abort"  # finish_reason of a request cancelled before it finished (as vLLM reports it)
STOPPED_EARLY = ("cancelled", "timeout")  # the scheduler's endings that the server reports as ABORTED
RETRY_AFTER_SECONDS = 1  # what a refused client is told to wait before trying again


class MaxTokensTooLarge(sched.RequestTooLarge):
    """A reply length asked for that the context cannot hold after the prompt."""


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

    def __init__(self) -> None:
        self.result = Generation()
        self._events = Events()  # text deltas, then the End (with the error if it failed)
        self._cancelled = threading.Event()
        self._ended = threading.Event()  # finished or failed: cancelling it changes nothing
        self._on_cancel: Callable[["Handle"], None] | None = None  # set by the backend that owns it
        self.tokens_read = 0  # deltas ``poll`` has returned: one per generated token (``put``)

    # -- the consumer's side -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        while True:
            item, end = self._events.get()
            if not end:
                yield item
                continue
            if item.error is not None:  # a second iteration ends (or raises) the same way
                raise item.error
            return

    def poll(self) -> tuple[str, bool]:
        """Without blocking: the text that has come since the last read, and whether the request has
        ended (then its error, if it failed, is raised). Not to be mixed with iteration."""
        deltas, ended = self._events.read()
        self.tokens_read += len(deltas)
        return "".join(deltas), ended

    def on_event(self, callback: Callable[[], None], end_only: bool = False) -> None:
        """Call ``callback()`` once, from the producer's thread, at the next event (with ``end_only``: at
        the end); at once if one is already waiting to be read. It may come twice: it must be idempotent."""
        self._events.on_event(callback, end_only)

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
        """One generated token's text (empty where it is held back); its logprob, if any, must already be
        in ``result.logprobs``."""
        self._events.post(delta)

    def finish(self, result: Generation | None = None) -> None:
        if result is not None:
            self.result = result
        if self.result.finish_reason is None:  # stopped before a stop token or the length limit
            self.result.finish_reason = ABORTED
        self._ended.set()
        self._events.finish()

    def fail(self, error: BaseException) -> None:
        self._ended.set()
        self._events.finish(error)


class Backend(Protocol):
    """The model as the HTTP layer sees it (see the module's docstring)."""

    model_id: str
    chat_defaults: Mapping[str, Any]  # SamplingParams keywords of chat replies (generation_config.json)
    transcription_defaults: Mapping[str, Any]  # cuts, num_beams, fallback (Qwen2Audio.transcription_defaults)

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams,
             cap_max_tokens: bool = True) -> Handle:
        """``cap_max_tokens`` false: a max_new_tokens the context cannot hold after the prompt is the
        request's error (RequestTooLarge), not a shorter reply."""

    def complete(self, prompt: str, audios: Sequence[np.ndarray], params: SamplingParams) -> Handle: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a generated token stands for (for the logprobs of a result that has them)."""
        ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def full(self) -> bool:
        """No room in the queue now: a request submitted now would be refused (checked again on submit)."""
        ...

    def close(self, timeout: float | None = None) -> None: ...


class StreamHandle:
    """A request submitted to the scheduler, seen as a Handle: its RequestStream, whose "cancelled" and
    "timeout" endings read as ABORTED (what the server reports for a request stopped early). A request
    refused before it could run (its prompt cannot fit, or cannot be rendered) ends with that error."""

    def __init__(self, stream: sched.RequestStream | None = None, error: BaseException | None = None):
        self._stream, self._error = stream, error
        self._cancelled = False
        self._result = stream.result if stream is not None else Generation()

    def __iter__(self) -> Iterator[str]:
        if self._error is not None:
            raise self._error
        yield from self._stream

    def poll(self) -> tuple[str, bool]:
        if self._error is not None:
            raise self._error
        return self._stream.poll()

    @property
    def tokens_read(self) -> int:
        return 0 if self._stream is None else self._stream.tokens_read

    def on_event(self, callback: Callable[[], None], end_only: bool = False) -> None:
        if self._stream is None:  # refused before it ran: poll raises at once
            callback()
        else:
            self._stream.on_event(callback, end_only)

    @property
    def result(self) -> Generation:
        if self._result.finish_reason in STOPPED_EARLY:
            self._result.finish_reason = ABORTED
        return self._result

    def cancel(self) -> None:
        """Stop this request (idempotent; nothing happens once it has ended)."""
        if self._stream is None or self._stream.done or self._cancelled:
            return
        self._cancelled = True
        self._stream.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class SchedulerBackend:
    """A loaded Qwen2Audio behind a background Scheduler: concurrent requests decode together in one
    batch of up to ``max_batch`` (continuous batching: each joins and leaves between decode steps), and
    up to ``max_queue`` more wait for a slot.

    Requests are prepared (tokenized) in the caller's thread, which is cheap: the scheduler encodes
    the audio, batched across the requests it admits together.
    """

    def __init__(self, model: "Qwen2Audio", model_id: str, max_batch: int = defaults.MAX_BATCH,
                 max_queue: int = defaults.MAX_QUEUE, reuse_prefixes: bool = True):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model = model
        self.model_id = model_id
        self.chat_defaults = dict(model.generation_defaults)
        self.transcription_defaults = dict(model.transcription_defaults)
        if "num_beams" in self.transcription_defaults:  # each beam takes a slot: no more beams than slots
            self.transcription_defaults["num_beams"] = min(self.transcription_defaults["num_beams"], max_batch)
        self.max_queue = max_queue
        self.scheduler = sched.Scheduler(model.engine, max_slots=max_batch, max_waiting=max_queue,
                                         reuse_prefixes=reuse_prefixes)

    # -- Backend -------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams,
             cap_max_tokens: bool = True) -> StreamHandle:
        return self._submit(lambda: self.model.prepare_chat(messages), params, cap_max_tokens)

    def complete(self, prompt: str, audios: Sequence[np.ndarray], params: SamplingParams) -> StreamHandle:
        return self._submit(lambda: self.model.prepare_raw(prompt, audios), params)

    def token_bytes(self, token_id: int) -> bytes:
        return self.model.tokenizer.token_bytes(token_id)

    @property
    def queue_depth(self) -> int:
        return self.scheduler.status().waiting

    @property
    def running(self) -> int:
        """Requests in the running batch: prefilling or decoding."""
        status = self.scheduler.status()
        return status.prefilling + status.decoding

    @property
    def full(self) -> bool:
        return self.scheduler.queue_full()

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests and end those waiting or running (ABORTED). Waits at most ``timeout``
        for the scheduler's thread: a prefill in progress cannot be interrupted, and the thread is a
        daemon."""
        closer = threading.Thread(target=self.scheduler.close, name="qwen2audio-serve-close", daemon=True)
        closer.start()
        closer.join(timeout)

    def _submit(self, prepare: Callable[[], "Prepared"], params: SamplingParams,
                cap_max_tokens: bool = True) -> StreamHandle:
        try:
            request = prepare()
            room = self.scheduler.max_len - len(request.token_ids)
            if not cap_max_tokens and params.max_new_tokens > room:  # OpenAI's answer: a 400, not a shorter reply
                raise MaxTokensTooLarge(
                    f"this model's context holds {self.scheduler.max_len} tokens; the messages take "
                    f"{len(request.token_ids)} (audio included), which leaves {room} for the reply, but "
                    f"{params.max_new_tokens} were asked for: ask for at most {room}, or shorten the messages")
            return StreamHandle(self.scheduler.submit(request, params))
        except sched.QueueFull:
            raise QueueFull(self.scheduler.status().waiting) from None
        except sched.SchedulerClosed:
            raise Unavailable("the server is shutting down") from None
        except ValueError as err:  # RequestTooLarge, or messages the chat template refuses: the request's fault
            return StreamHandle(error=err)
