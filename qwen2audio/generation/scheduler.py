"""The request scheduler: many requests share one model, joining and leaving a running batch between
decode steps (continuous batching).

    scheduler = Scheduler(engine, max_slots=8)            # its loop runs in a background thread
    stream = scheduler.submit(engine.prepare(prompt, audios), SamplingParams(max_new_tokens=64))
    for delta in stream:                                    # blocks on this request's own queue
        print(delta, end="")
    stream.result                                           # the Generation, complete at the end
    scheduler.close()

A request's life:
- waiting: in a bounded queue (``QueueFull`` past ``max_waiting``) until a slot of the KV cache is
  free. The cache is a pool of ``max_slots`` slots of ``max_len`` positions, budgeted at construction
  (from ``kv_bytes`` or explicit numbers, checked against the model's context); a prompt that can
  never fit a slot is refused at ``submit`` (``RequestTooLarge``), one that cannot fit now waits.
- admitted: the clips it brings that are not encoded yet are encoded in one batch with those of
  every request admitted at the same time; then its prompt is prefilled into its slot in chunks of at
  most ``prefill_chunk`` tokens, one chunk per request and at most about ``prefill_chunk`` tokens in
  all between two decode steps, so that running streams keep flowing.
- decoding: each step runs one token for every decoding request, each at its own length in its own
  slot (``Engine.step``), and picks each row's token with that request's own settings and random
  generator. A request's greedy tokens do not depend on what else runs (its prefill is cut the same
  way, and the other rows of a step are masked out of its attention).
- finished: "stop" (stop token or string), "length" (max_new_tokens), "timeout" (its deadline passed,
  waiting or running) or "cancelled" (``RequestStream.cancel()``, ``close()``). Its slot is free at
  once; a waiting request takes it at the next step.

Beam search (``num_beams`` > 1, generation/beam.py): a request takes num_beams slots at once (it waits
until that many are free, evicting idle sessions as needed; more beams than the scheduler has slots is
refused at ``submit``). Its prompt is prefilled into the first; at each step every beam is a row of the
decoding step beside the other requests' rows, and the slots are reordered to follow the beams that go
on. Its reader gets the tokens every beam agrees on as they settle, the rest at the end. It cannot
continue a session.

Sessions (conversations): a request submitted with ``session=KEY`` leaves its tokens in its slot when
it ends, and the session's next request reuses exactly the shared prefix: the same token ids and the
same clips (compared by audio key), never more, so an edited history is recomputed from the first
difference. Idle sessions hold their slots until the slots are needed (the least recently used goes
first) or until idle for ``session_idle_s``.

Prefix reuse (``reuse_prefixes``, on by default): a slot that a request leaves keeps what it cached until
another request takes it, and a new request takes the free slot whose content shares the longest prefix
with its own prompt (the same rule: equal token ids and equal clips), so it runs only the rest: the chat
template's system turn that every request starts with, or a clip that several questions are about. The
cache memory is still given back whenever no slot is in use, and what the slots held goes with it.

Threading: with ``background=True`` one thread owns the model and runs the loop; ``submit`` and
``cancel`` are thread-safe and return at once, and a stream's iteration blocks on that request's
queue. With ``background=False`` (the Python API's engine) there is no thread: iterating any stream
runs the loop inline until that stream has something, so one caller can read several streams in
turn. Both run the same ``_iterate``.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, Sequence

import torch

from ..model import KVCache
from ..model.llm import kv_cache_dtype
from ..text.chat import clip_spans
from .beam import BeamSearch
from .events import Events
from .reply import Generation, ReplyText, TokenLogprob
from .sampling import SamplingParams, hold_back_stop_tokens, next_tokens

if TYPE_CHECKING:
    from .engine import Engine, Prepared

DEFAULT_MAX_SLOTS = 8  # requests (and idle conversations) held in the KV cache at once
DEFAULT_MAX_WAITING = 128  # requests waiting for a slot before submit refuses more
PREFILL_CHUNK = 256  # prompt tokens run between two decode steps (a long prompt takes several steps)
POLL_S = 0.5  # how often a blocked reader checks that the background thread is still alive


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full: try again later (an HTTP server answers 429)."""


class RequestTooLarge(ValueError):
    """A request that can never fit a KV cache slot, however long it waits."""


class TooManyBeams(RequestTooLarge):
    """A beam search over more beams than the scheduler has KV cache slots."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed: it takes no more requests."""


def shared_prefix(cached_ids: Sequence[int], cached_audio: Sequence[str], request: "Prepared", audio_id: int) -> int:
    """Positions of a cache holding ``cached_ids`` (with clips ``cached_audio``) that hold exactly the
    start of ``request``: the same tokens, and clip for clip the same audio. Always leaves at least
    one prompt token to run (its logits give the first new token)."""
    n = 0
    for a, b in zip(cached_ids, request.token_ids):
        if a != b:
            break
        n += 1
    # Equal <|AUDIO|> runs can hold different audio: stop before the first clip that differs.
    ids, clip = request.token_ids, 0
    for i in range(n):
        if ids[i] == audio_id and (i == 0 or ids[i - 1] != audio_id):
            if clip >= min(len(cached_audio), len(request.audio_keys)) or cached_audio[clip] != request.audio_keys[clip]:
                return i
            clip += 1
    return min(n, len(ids) - 1)


def new_token_room(max_new_tokens: int, prompt_tokens: int, max_len: int, whose: str, stacklevel: int) -> int:
    """max_new_tokens, capped by what ``max_len`` positions leave after the prompt, with a warning when
    capped (``whose``: whose limit max_len is, in words; ``stacklevel``: the warning's, from here)."""
    room = max_len - prompt_tokens
    if max_new_tokens > room:
        warnings.warn(f"max_new_tokens {max_new_tokens} does not fit: the prompt takes {prompt_tokens} of "
                      f"{whose} {max_len} positions, so at most {room} new tokens", stacklevel=stacklevel)
    return min(max_new_tokens, room)


def token_logprobs(logits: torch.Tensor, wanted: Sequence[int | None],
                   tokens: Sequence[int]) -> list[TokenLogprob | None]:
    """Each row's chosen token's log-probability under the model's own distribution (the raw logits (m,
    vocab), before temperature, top-k/top-p and penalties) and its ``wanted`` most likely tokens; None for
    the rows that did not ask (``wanted`` None). Nothing is computed when no row asks."""
    asking = [i for i, k in enumerate(wanted) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if not asking:
        return out
    logp = torch.log_softmax(logits[asking].float(), dim=-1)  # (a, vocab)
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in asking], device=logp.device)[:, None])[:, 0].tolist()
    k = max(wanted[i] for i in asking)
    top_values, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))  # (a, k), most likely first
    for j, i in enumerate(asking):
        top = tuple(zip(top_ids[j][: wanted[i]], top_values[j][: wanted[i]]))
        out[i] = TokenLogprob(tokens[i], chosen[j], top)
    return out


@dataclass(frozen=True)
class SchedulerStatus:
    """A snapshot of the scheduler's load (for a server's health check and for tests)."""

    waiting: int  # requests waiting for a slot
    prefilling: int  # requests whose prompt is being run
    decoding: int  # requests generating
    idle_sessions: int  # conversations holding a slot between turns
    free_slots: int
    kv_bytes_allocated: int  # KV cache storage taken now (it grows on demand up to kv_bytes)


@dataclass(eq=False)
class _Session:
    key: Hashable
    slot: int | None = None
    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values the slot holds
    audio_keys: list[str] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False  # one of its requests holds the slot now
    ended: bool = False  # end_session was called while it was busy


class _Request:
    """A submitted request and its decoding state (owned by the loop once admitted)."""

    def __init__(self, prepared: "Prepared", params: SamplingParams, max_new: int, reply: ReplyText,
                 deadline: float | None, session: Hashable | None):
        self.prepared, self.params, self.max_new, self.reply = prepared, params, max_new, reply
        self.deadline, self.session_key = deadline, session
        self.events = Events()  # (token, delta) pairs, then the End; a reader's wake-up (on_event)
        self.cancelled = False
        self.done = False
        self.slot: int | None = None
        self.session: _Session | None = None
        self.embeds: torch.Tensor | None = None  # (1, T, hidden): the prompt tokens still to prefill
        self.fed = 0  # of those, how many are prefilled
        self.last = 0  # the token to feed at the next step
        self.seen: torch.Tensor | None = None  # (vocab,) bool, for the repetition penalty
        self.generator: torch.Generator | None = None
        self.search: BeamSearch | None = None  # a beam search: its beams, one per slot of ``slots``
        self.slots: list[int] = []  # every slot it holds: [slot], or a beam search's num_beams slots
        self.prompt_slots: set[int] = set()  # a beam search's slots that hold its prompt (beam 0's at first)

    @property
    def slots_needed(self) -> int:
        """One, or one per beam."""
        return self.params.num_beams

    @property
    def generated(self) -> int:
        return len(self.reply.out.token_ids)

    def post(self, item: Any) -> None:
        """Give the reader an event (a (token, delta) pair) and wake its listener."""
        self.events.post(item)


def _abandon(r: _Request) -> None:
    """A request whose stream nobody can read any more: cancelled, unless it has ended. (Called by the
    garbage collector, in any thread and perhaps inside the loop: no lock, and setting a flag is atomic.)"""
    if not r.done:
        r.cancelled = True


class RequestStream:
    """One request's output as it is decoded. Iterate for its text deltas (each read blocks until the
    next is ready); ``result`` is its Generation, complete once the iteration has ended; ``cancel()``
    ends it ("cancelled") and frees its slot at the next step. A failure of the model raises here.
    A stream dropped before its end (a ``break`` out of its loop, then no reference left) is cancelled
    too: it would otherwise go on decoding beside later requests, holding its slot and cache."""

    def __init__(self, scheduler: "Scheduler", request: _Request):
        self._scheduler, self._request = scheduler, request
        self.result: Generation = request.reply.out
        self.tokens_read = 0  # generated tokens whose events ``poll`` has returned (their text, if any)
        weakref.finalize(self, _abandon, request).atexit = False

    def __iter__(self) -> Iterator[str]:
        for _, delta in self.events():
            if delta:
                yield delta

    def events(self) -> Iterator[tuple[int | None, str]]:
        """(token id, text delta) per generated token as it comes (the delta may be empty), and a last
        (None, text) when the request ends between tokens (timeout, cancel) with text held back."""
        while True:
            item, end = self._scheduler._next_event(self._request)
            if end:
                break
            yield item
        if item.error is not None:
            raise item.error

    def poll(self) -> tuple[str, bool]:
        """Without blocking: the text of the events that have come since the last read, and whether the
        request has ended (then its failure, if it failed, is raised). ``tokens_read`` counts the tokens
        read so far: their logprobs (when asked for) are in ``result.logprobs`` by then."""
        items, ended = self._request.events.read()
        self.tokens_read += sum(token is not None for token, _ in items)
        return "".join(delta for _, delta in items), ended

    def on_event(self, callback: Callable[[], None], end_only: bool = False) -> None:
        """Call ``callback()`` once, from the scheduler's thread, when the next event is posted (with
        ``end_only``: when the request ends); at once, here, if one is already waiting to be read. It may
        be called twice (when the event lands as it is set): it must be idempotent. Needs the scheduler's
        background thread (nothing else would post the event)."""
        self._request.events.on_event(callback, end_only)

    def wait(self) -> Generation:
        """Read to the end; the whole Generation."""
        for _ in self.events():
            pass
        return self.result

    def cancel(self) -> None:
        self._scheduler._cancel(self._request)

    @property
    def done(self) -> bool:
        """The request has finished (its last event may still be unread)."""
        return self._request.done


class Scheduler:
    """Runs requests on one Engine with continuous batching; see the module's docstring.

    ``max_slots`` x ``max_len`` is the KV cache's size: given, or ``max_slots`` derived from a
    ``kv_bytes`` budget (default ``max_len``: the model's context). ``max_waiting``: the waiting
    queue's length (None: unbounded). ``preallocate``: take the whole cache now (a server fails at
    start rather than later); otherwise its storage grows as requests need it and is freed when no
    slot is in use. ``reuse_prefixes``: free slots keep what they cached for a request that starts the
    same way. ``clock``: the time deadlines and idle sessions are measured in.
    """

    def __init__(self, engine: "Engine", *, max_slots: int | None = None, max_len: int | None = None,
                 kv_bytes: int | None = None, max_waiting: int | None = DEFAULT_MAX_WAITING,
                 prefill_chunk: int = PREFILL_CHUNK, session_idle_s: float | None = None,
                 background: bool = True, preallocate: bool = False, reuse_prefixes: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        lm = engine.model.language_model
        self.max_slots, self.max_len = self._cache_size(max_slots, max_len, kv_bytes)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 (None: unbounded), got {max_waiting}")
        self.max_waiting, self.prefill_chunk, self.session_idle_s = max_waiting, prefill_chunk, session_idle_s
        self.reuse_prefixes = reuse_prefixes
        if getattr(engine, "compiled", False):  # graphs for up to max_slots rows now, not mid-stream
            engine.warm_up(max_rows=self.max_slots)
        self.cache = lm.new_cache(self.max_slots, self.max_len)
        self.preallocated = preallocate
        if preallocate:
            self.cache.preallocate()
        self._clock = clock

        # Shared with submitting threads, under _lock.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._closed = False
        self._cancel_all = False  # close() without wait: every request in flight ends "cancelled"
        self._ending: queue.SimpleQueue = queue.SimpleQueue()  # session keys to drop (safe from finalizers)
        # The loop's own state.
        self._lengths = [0] * self.max_slots  # positions cached per slot
        self._owner: list[_Request | _Session | None] = [None] * self.max_slots
        # What a free slot still holds (token ids, audio keys) for prefix reuse; its _lengths entry stays at
        # their count, so that the harmless rows of decode steps write past them.
        self._held: list[tuple[list[int], list[str]] | None] = [None] * self.max_slots
        self._prefilling: list[_Request] = []  # admission order
        self._decoding: list[_Request] = []
        self._sessions: dict[Hashable, _Session] = {}
        self._moves = 0  # admissions, prefill chunks, steps and endings so far (a stalled loop shows)
        self._step_lock = threading.Lock()  # one runner of _iterate at a time (inline readers)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="qwen2audio-scheduler", daemon=True)
            self._thread.start()

    # -- configuration ---------------------------------------------------------------------------
    def _cache_size(self, max_slots: int | None, max_len: int | None, kv_bytes: int | None) -> tuple[int, int]:
        """(slots, positions per slot) from what was given, checked against the model's context."""
        context = self.engine.max_positions
        max_len = context if max_len is None else max_len
        if not 2 <= max_len <= context:
            raise ValueError(f"max_len must be between 2 and the model's context of {context} positions, got {max_len}")
        if kv_bytes is None:
            max_slots = DEFAULT_MAX_SLOTS if max_slots is None else max_slots
        else:
            per_slot = max_len * self.bytes_per_position(self.engine)
            fit = kv_bytes // per_slot
            if fit < 1:
                raise ValueError(f"a KV cache budget of {kv_bytes} bytes holds less than one slot of {max_len} "
                                 f"positions ({per_slot} bytes): raise the budget or lower max_len")
            if max_slots is not None and max_slots > fit:
                raise ValueError(f"{max_slots} slots of {max_len} positions take {max_slots * per_slot} bytes, "
                                 f"more than the budget of {kv_bytes}: at most {fit} fit")
            max_slots = fit if max_slots is None else max_slots
        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        return max_slots, max_len

    @staticmethod
    def bytes_per_position(engine: "Engine") -> int:
        """KV cache bytes of one position of one slot, for the engine's model."""
        c = engine.model.config.text
        dtype = kv_cache_dtype(engine.model.dtype, engine.model.device)
        return KVCache.bytes_per_position(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype)

    @property
    def kv_bytes(self) -> int:
        """The KV cache's size when full."""
        return self.max_slots * self.max_len * self.bytes_per_position(self.engine)

    # -- the public side (any thread) ------------------------------------------------------------
    def status(self) -> SchedulerStatus:
        with self._lock:
            waiting = len(self._waiting)
        owners = list(self._owner)
        return SchedulerStatus(waiting, len(self._prefilling), len(self._decoding),
                               sum(isinstance(o, _Session) for o in owners), owners.count(None), self.cache.nbytes)

    def queue_full(self) -> bool:
        """Whether a request submitted now would be refused (QueueFull)."""
        with self._lock:
            return self._queue_full()

    def _queue_full(self) -> bool:
        """(Under the lock.) ``max_waiting`` requests wait beyond the places the next round gives: a request
        that came while a step ran counts as waiting until the round after it, though a slot is free for it,
        and is not counted against the queue."""
        if self.max_waiting is None:
            return False
        places = sum(o is None or (isinstance(o, _Session) and not o.busy) for o in list(self._owner))
        return len(self._waiting) - places >= self.max_waiting

    def submit(self, request: "Prepared", params: SamplingParams, *, deadline: float | None = None,
               session: Hashable | None = None) -> RequestStream:
        """Queue a request; returns its stream at once. ``deadline``: a time of ``clock`` (by default
        ``time.monotonic()``) after which it finishes with "timeout". ``session``: a key whose cached
        prefix it may reuse and leaves its own tokens in (a conversation's turns)."""
        n = len(request.token_ids)
        if n == 0:
            raise ValueError("the request has no prompt tokens")
        if params.beams:
            if params.num_beams > self.max_slots:
                raise TooManyBeams(f"beam search over {params.num_beams} beams takes {params.num_beams} KV "
                                      f"cache slots, but this scheduler has {self.max_slots}; use fewer beams")
            if session is not None:
                raise ValueError("a beam search does not continue a session (its beams leave no one reply in "
                                 "the cache); submit it without session, or use num_beams 1")
        if n >= self.max_len:
            raise RequestTooLarge(f"the prompt is {n} tokens but a request may hold at most {self.max_len} "
                                  f"positions (prompt and reply); shorten the prompt or audio")
        reply = ReplyText(self.engine.tokenizer, params, n)
        r = _Request(request, params, self.room(params.max_new_tokens, n), reply, deadline, session)
        if params.beams:
            r.search = BeamSearch(request, params, reply.stop_ids, r.max_new)
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed; it takes no more requests")
            if self._queue_full():
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (the most this scheduler "
                                f"queues); try again later")
            self._waiting.append(r)
            self._wakeup.notify()
        return RequestStream(self, r)

    def room(self, max_new_tokens: int, prompt_tokens: int, stacklevel: int = 4) -> int:
        """max_new_tokens, capped by what a prompt of ``prompt_tokens`` leaves of a request's positions, with a
        warning when capped (``stacklevel``: the warning's, from here + 1)."""
        whose = "the model's" if self.max_len == self.engine.max_positions else "the scheduler's max_len of"
        return new_token_room(max_new_tokens, prompt_tokens, self.max_len, whose, stacklevel=stacklevel)

    def end_session(self, key: Hashable) -> None:
        """Forget a session: its slot is freed once its running request (if any) ends."""
        self._ending.put(key)
        with self._lock:
            self._wakeup.notify()  # an idle loop frees it now, not at the next request

    def close(self, wait: bool = False) -> None:
        """Stop taking requests; cancel those in flight ("cancelled"), or with ``wait`` let them finish;
        then stop the thread and free the cache. Returns once nothing is left."""
        with self._lock:
            self._closed = True
            self._cancel_all = self._cancel_all or not wait
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            with self._step_lock:
                while self._iterate():
                    pass
        for key in list(self._sessions):
            self._drop_session(self._sessions[key])
        self._release_cache()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _cancel(self, r: _Request) -> None:
        with self._lock:
            r.cancelled = True
            self._wakeup.notify()

    def _next_event(self, r: _Request) -> Any:
        """The request's next queue item and whether it is the end, running the loop inline when there
        is no thread."""
        while True:
            try:
                return r.events.get(timeout=POLL_S) if self._thread is not None else r.events.get(block=False)
            except queue.Empty:
                pass
            if self._thread is not None:
                if not self._thread.is_alive() and r.events.empty():
                    raise RuntimeError("the scheduler's thread has stopped; the request cannot finish")
                continue
            with self._step_lock:
                if r.events.empty() and not self._iterate():
                    raise RuntimeError("the scheduler has nothing left to run but the request is not finished")

    # -- the loop (one thread at a time) ---------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._waiting or self._prefilling or self._decoding or self._closed):
                        wait = self._idle_wait()  # sessions to end or to drop once idle too long
                        if wait == 0.0:
                            break
                        self._wakeup.wait(wait)
                with self._step_lock:
                    if not self._iterate() and self._closed:
                        return  # closed, and nothing left
        except BaseException as err:  # a bug in the loop: no reader may hang on it
            self._fail(list(self._waiting) + self._prefilling + self._decoding, err)
            raise

    def _iterate(self) -> bool:
        """One round: end what was cancelled or timed out, admit waiting requests, prefill up to
        ``prefill_chunk`` prompt tokens, one decode step. Returns False if there was nothing to do.
        (Every round with requests moves one of them on; one that cannot fails them all.)"""
        with self._lock:
            busy = bool(self._waiting or self._prefilling or self._decoding)
        if not busy:
            self._drop_ended_sessions()
            if not any(self._owner) and not self.preallocated:
                self._release_cache()  # the last session gone: its memory too
            return False
        moves = self._moves
        with torch.inference_mode():
            now = self._clock()
            self._drop_ended_sessions()
            self._expire(now)
            self._admit(now)
            self._prefill()
            self._decode()
        if self._moves == moves:  # nothing could move: a bug, not a wait, and no reader may hang on it
            with self._lock:
                stuck = list(self._waiting)
            self._fail(stuck + self._prefilling + self._decoding,
                       RuntimeError("the scheduler could not run any of its requests"))
        if not any(self._owner) and not self.preallocated:
            self._release_cache()  # idle: give the memory back (the next request allocates again)
        return True

    def _idle_wait(self) -> float | None:
        """Seconds until an idle loop has sessions to drop (0: now, a session was ended or has been idle
        for ``session_idle_s``), None when it has none to wait for."""
        if not self._ending.empty():
            return 0.0
        if self.session_idle_s is None:
            return None
        idle = [s.last_used for s in list(self._sessions.values()) if not s.busy]
        if not idle:
            return None
        left = min(idle) + self.session_idle_s - self._clock()
        return 0.0 if left < 0 else left + 0.001  # dropped once idle for longer than session_idle_s

    def _release_cache(self) -> None:
        """Give the KV cache's memory back; what free slots held for prefix reuse goes with it."""
        self.cache.release()
        for slot in range(self.max_slots):
            if self._owner[slot] is None:
                self._forget(slot)

    def _expire(self, now: float) -> None:
        """Finish the requests cancelled or past their deadline, waiting or running."""
        def reason(r: _Request) -> str | None:
            if r.cancelled or self._cancel_all:
                return "cancelled"
            return "timeout" if r.deadline is not None and now >= r.deadline else None
        with self._lock:
            gone = [r for r in self._waiting if reason(r)]
            for r in gone:
                self._waiting.remove(r)
        for r in gone + [r for r in self._prefilling + self._decoding if reason(r)]:
            self._finish(r, reason(r))

    def _admit(self, now: float) -> None:
        """Give waiting requests slots (in order, while slots last), encode their new clips together,
        and embed the part of each prompt that its slot does not hold yet."""
        admitted: list[_Request] = []
        with self._lock:
            for r in list(self._waiting):
                session = self._sessions.get(r.session_key) if r.session_key is not None else None
                if session is not None and session.busy:
                    continue  # the session's previous request is still running
                if r.search is not None:
                    slots = self._beam_slots(r)
                else:
                    slot = session.slot if session is not None and session.slot is not None else self._free_slot(r)
                    slots = None if slot is None else [slot]
                if slots is None:
                    break  # no room for it: later requests wait behind it
                self._waiting.remove(r)
                self._take_slot(r, session, slots[0], now)
                for extra in slots[1:]:  # a beam search's other beams: filled from its first at its first step
                    self._held[extra], self._owner[extra], self._lengths[extra] = None, r, 0
                r.slots = slots
                admitted.append(r)
        if not admitted:
            return
        try:
            self._start(admitted)
        except BaseException as err:  # an interrupt (Ctrl-C in a notebook) while the audio was encoded: the
            # requests admitted but not yet prefilling would hold their slots (and sessions) for ever
            stranded = [r for r in admitted if not r.done and r not in self._prefilling]
            self._fail(stranded, RuntimeError(f"interrupted ({type(err).__name__}) while its audio was "
                                              "encoded; submit it again"))
            if not any(self._owner) and not self.preallocated:
                self._release_cache()  # as at the end of a round (which the interrupt skips)
            raise

    def _start(self, admitted: list[_Request]) -> None:
        """Reserve the cache for requests just admitted, encode their new clips and embed their prompts: each
        one then prefills, or has failed with its error."""
        try:
            self.cache.reserve(max(max(r.slots) for r in admitted) + 1,
                               max(len(r.prepared.token_ids) + r.max_new for r in admitted))
        except Exception as err:
            self._fail(admitted, err)
            return
        try:
            # every new clip in one batch, but those wholly inside a reused prefix
            self.engine.encode([r.prepared for r in admitted], [self._lengths[r.slot] for r in admitted])
        except Exception as err:
            if len(admitted) == 1:
                self._fail(admitted, err)
                return
            admitted = self._encode_one_by_one(admitted)  # fail only the requests whose clips fail
        for r in admitted:
            try:
                r.embeds = self._new_embeddings(r)
            except Exception as err:
                self._fail([r], err)
                continue
            self._prefilling.append(r)

    def _encode_one_by_one(self, requests: list[_Request]) -> list[_Request]:
        """After a batch encode failed: encode each request's clips alone, fail those that fail, keep the rest."""
        encoded = []
        for r in requests:
            try:
                self.engine.encode([r.prepared], [self._lengths[r.slot]])
            except Exception as err:
                self._fail([r], err)
            else:
                encoded.append(r)
        return encoded

    def _free_slot(self, r: _Request) -> int | None:
        """The free slot whose held content shares the longest prefix with ``r``'s prompt, else the lowest
        (steps run slots 0 .. highest in use); evicting the least recently used idle session if none is free."""
        free = [slot for slot, owner in enumerate(self._owner) if owner is None]
        if free:
            return max(free, key=lambda slot: (self._reusable(slot, r.prepared), -slot))
        idle = [o for o in self._owner if isinstance(o, _Session)]
        if not idle:
            return None
        oldest = min(idle, key=lambda s: s.last_used)
        slot = oldest.slot
        self._drop_session(oldest)
        return slot

    def _beam_slots(self, r: _Request) -> list[int] | None:
        """num_beams slots for a beam search (the first the best for prefix reuse, the others the lowest
        free), evicting least recently used idle sessions as needed; None while too few can be had."""
        free = [slot for slot, owner in enumerate(self._owner) if owner is None]
        idle = sorted((o for o in self._owner if isinstance(o, _Session)), key=lambda s: s.last_used)
        if len(free) + len(idle) < r.slots_needed:
            return None
        for session in idle[: max(0, r.slots_needed - len(free))]:
            free.append(session.slot)
            self._drop_session(session)
        first = max(free, key=lambda slot: (self._reusable(slot, r.prepared), -slot))
        return [first] + sorted(slot for slot in free if slot != first)[: r.slots_needed - 1]

    def _reusable(self, slot: int, prepared: "Prepared") -> int:
        """Positions of a free slot's held content that ``prepared`` may reuse."""
        held = self._held[slot]
        if held is None or not self.reuse_prefixes:
            return 0
        return shared_prefix(held[0], held[1], prepared, self.engine.tokenizer.audio_id)

    def _take_slot(self, r: _Request, session: _Session | None, slot: int, now: float) -> None:
        if r.session_key is not None:
            if session is None:
                session = self._sessions[r.session_key] = _Session(r.session_key)
            session.busy, session.last_used, r.session = True, now, session
        if session is not None and session.slot == slot:
            reuse = shared_prefix(session.ids, session.audio_keys, r.prepared, self.engine.tokenizer.audio_id)
        else:
            reuse = self._reusable(slot, r.prepared)
            if session is not None:
                session.slot = slot
        self._held[slot] = None
        r.slot, self._owner[slot], self._lengths[slot] = slot, r, reuse
        self._moves += 1
        r.reply.out.cached_tokens = reuse
        if r.params.seed is not None:
            r.generator = torch.Generator(device=self.engine.model.device).manual_seed(r.params.seed)
        if r.params.repetition_penalty != 1.0:
            r.seen = torch.zeros(self.engine.model.config.text.vocab_size, dtype=torch.bool,
                                 device=self.engine.model.device)
            r.seen[r.prepared.token_ids] = True

    def _new_embeddings(self, r: _Request) -> torch.Tensor:
        """(1, T, hidden) embeddings of the prompt tokens past what the slot already holds."""
        reuse, p = self._lengths[r.slot], r.prepared
        ids = torch.tensor([p.token_ids[reuse:]], device=self.engine.model.device)
        # the audio vectors past the reused prefix (a clip wholly inside it was not even encoded)
        audio = [vectors[max(0, reuse - start):] for vectors, (start, n)
                 in zip(p.audio_embeds, clip_spans(p.token_ids, self.engine.tokenizer.audio_id)) if start + n > reuse]
        return self.engine.model.embed(ids, audio)

    def _prefill(self) -> None:
        """Run the next chunk of each prefilling request, oldest first, while the budget lasts."""
        budget = self.prefill_chunk
        for r in list(self._prefilling):
            if budget <= 0:
                break
            chunk = r.embeds[:, r.fed:r.fed + self.prefill_chunk]
            last = r.fed + chunk.shape[1] == r.embeds.shape[1]
            try:
                logits = self.engine.prefill(self.cache, r.slot, chunk, self._lengths[r.slot], logits=last)
            except Exception as err:
                self._fail([r], err)
                continue
            self._lengths[r.slot] += chunk.shape[1]
            r.fed += chunk.shape[1]
            self._moves += 1
            budget -= chunk.shape[1]
            if last:
                self._prefilling.remove(r)
                r.embeds = None
                self._decoding.append(r)
                if r.search is not None:
                    self._advance(r, logits[None])  # only beam 0 exists before the first step
                    continue
                token = self._choose(logits[None], [r])[0]
                if token is not None:  # (None: its sampling failed, and the request with it)
                    self._emit(r, token, token_logprobs(logits[None], [r.params.logprobs], [token])[0])

    def _decode(self) -> None:
        """One step of every decoding request (a beam search: of each of its beams): slots 0 .. n - 1 run,
        those not decoding as harmless rows (each writes only at its own length, past what it holds)."""
        decoding = list(self._decoding)
        if not decoding:
            return
        rows = [r for r in decoding if r.search is None]
        searches = [r for r in decoding if r.search is not None]
        n = max(max(r.slots) for r in decoding) + 1
        tokens = [self.engine.tokenizer.pad_id] * n
        for r in rows:
            tokens[r.slot] = r.last
        device = self.engine.model.device
        try:
            for r in searches:  # each beam's slot takes the cache of the beam it continues, and its next token
                search = r.search
                sources = [r.slots[o] for o in search.origins]
                holding = r.prompt_slots or {r.slots[0]}
                # where every slot written holds the prompt already, only the generated positions differ
                start = search.prompt_len if all(d in holding for d, s in zip(r.slots, sources) if d != s) else 0
                self.cache.copy_slots(r.slots, sources, search.cached, start)
                r.prompt_slots = holding | set(r.slots[:len(sources)])
                for slot, token in zip(r.slots, search.tokens):
                    tokens[slot], self._lengths[slot] = token, search.cached
            width = max(self._lengths[slot] for r in decoding for slot in r.slots) + 1
            logits = self.engine.step(self.cache, torch.tensor(tokens, device=device),
                                      torch.tensor(self._lengths[:n], device=device), width)
            # a beam sampling's filters may leave fewer candidates than beams: its running beams are the first
            # slots, the others idle (their rows are computed and not read)
            beam_logits = [logits[r.slots[:len(r.search.beams)]] for r in searches]
            logits = logits[[r.slot for r in rows]]
            picked = self._choose(logits, rows)
            logprobs = token_logprobs(logits, [r.params.logprobs if token is not None else None
                                               for r, token in zip(rows, picked)], picked)
        except Exception as err:
            self._fail(decoding, err)
            return
        self._moves += 1
        for r, token, logprob in zip(rows, picked, logprobs):
            if token is not None:  # (None: its sampling failed, and the request with it, its slot freed)
                self._lengths[r.slot] += 1  # the token fed in this step is cached now
                self._emit(r, token, logprob)
        for r, row_logits in zip(searches, beam_logits):
            for slot in r.slots:
                self._lengths[slot] += 1
            self._advance(r, row_logits)

    def _advance(self, r: _Request, logits: torch.Tensor) -> None:
        """A beam search's step from its beams' logits (beams, vocab). Its reader gets the tokens that every
        beam and every finished reply now starts with (``BeamSearch.settled``: no later step can change
        them), and at the end the rest of the reply."""
        try:
            r.search.advance(logits, r.generator)
        except Exception as err:
            self._fail([r], err)
            return
        if r.search.done:
            self._ranked(r)  # before the last tokens: the reader may see the end with them
        tokens, logprobs = r.search.settled()
        for token, logprob in zip(tokens[r.generated:], logprobs[r.generated:]):
            self._emit(r, token, logprob)
            if r.done:
                return
        if r.search.done:
            self._finish(r, "length")  # (the best reply ends with a stop token or at max_new: not reached)

    def _ranked(self, r: _Request) -> None:
        """A finished beam search's score and other finished replies, on its Generation."""
        ranked = r.search.ranked
        r.reply.out.score = ranked[0][0]
        for score, tokens, logprobs in ranked[1:]:
            reply = ReplyText(self.engine.tokenizer, r.params, len(r.prepared.token_ids))
            for token, logprob in zip(tokens, logprobs):
                reply.push(token, logprob)
            if reply.out.finish_reason is None:
                reply.finish("length")
            reply.out.score = score
            reply.out.cached_tokens = r.reply.out.cached_tokens
            r.reply.out.alternatives.append(reply.out)

    def _choose(self, logits: torch.Tensor, rows: list[_Request]) -> list[int | None]:
        """The next token of each request from its row of logits (m, vocab), by its own settings; None for
        a request whose settings cannot sample its row (a temperature so small that logits / T overflow,
        or logits not finite: torch.multinomial refuses them), which fails alone, with that error: the
        other requests of the step go on, each as if it were alone."""
        logits = logits.float()
        tokens: list[int | None] = logits.argmax(-1).tolist()  # every plain greedy row at once
        for i, r in enumerate(rows):
            p = r.params
            if p.greedy and r.seen is None and r.generated >= p.min_new_tokens:
                continue
            try:
                row = hold_back_stop_tokens(logits[i:i + 1], r.reply.stop_ids, r.generated, p.min_new_tokens)
                seen = r.seen[None] if r.seen is not None else None
                tokens[i] = int(next_tokens(row, p, seen, r.generator)[0])
            except Exception as err:
                self._fail([r], err)
                tokens[i] = None
        return tokens

    def _emit(self, r: _Request, token: int, logprob: TokenLogprob | None = None) -> None:
        """Give a request its new token: text to its reader; the end if it is done."""
        if r.reply.out.first_token_at is None:
            r.reply.out.first_token_at = time.monotonic()
        delta = r.reply.push(token, logprob)
        if r.reply.out.finish_reason is None and r.generated >= r.max_new:
            delta += r.reply.finish("length")
        if r.seen is not None:
            r.seen[token] = True
        r.last = token
        r.post((token, delta))
        if r.reply.out.finish_reason is not None:
            self._finish(r)

    def _finish(self, r: _Request, reason: str | None = None, error: BaseException | None = None) -> None:
        """End a request (``reason`` when it ends between tokens) and free or hand back its slot."""
        r.reply.out.ended_at = time.monotonic()
        if reason is not None and r.reply.out.finish_reason is None:
            tail = r.reply.finish(reason)
            if tail:
                r.post((None, tail))
        for group in (self._prefilling, self._decoding):
            if r in group:
                group.remove(r)
        r.embeds = None
        if r.slot is not None:
            self._release_slot(r, keep=error is None)
        r.done = True
        r.events.finish(error)
        self._moves += 1

    def _release_slot(self, r: _Request, keep: bool) -> None:
        """A finished request's slot: the session's again (holding what was cached), or free. A beam
        search's slots are freed, each that a beam has run in holding the prompt (which every beam's slot
        starts with); a slot no beam ran in yet (beam sampling whose first steps kept fewer beams than
        slots) holds only the idle rows' writes, and is forgotten."""
        if r.search is not None:
            holding = r.prompt_slots or {r.slots[0]}
            for slot in r.slots:
                self._owner[slot] = None
                held = min(self._lengths[slot], len(r.prepared.token_ids))
                if keep and slot in holding:  # (filled by the prefill, or by a copy of a beam that holds it)
                    self._hold(slot, r.prepared.token_ids[:held], r.prepared.audio_keys)
                else:
                    self._forget(slot)
            return
        slot, session = r.slot, r.session
        tokens = r.prepared.token_ids + r.reply.out.token_ids
        if session is None or not keep or session.ended:
            if session is not None:
                self._sessions.pop(session.key, None)
            self._owner[slot] = None
            if keep:
                self._hold(slot, tokens[: self._lengths[slot]], r.prepared.audio_keys)
            else:
                self._forget(slot)
            return
        session.ids, session.audio_keys = tokens[: self._lengths[slot]], list(r.prepared.audio_keys)
        session.busy, session.last_used = False, self._clock()
        self._owner[slot] = session

    def _fail(self, requests: list[_Request], err: BaseException) -> None:
        for r in requests:
            if not r.done:
                with self._lock:
                    if r in self._waiting:
                        self._waiting.remove(r)
                self._finish(r, error=err)

    def _drop_session(self, session: _Session) -> None:
        """Forget an idle session and free its slot (what it cached stays there for prefix reuse)."""
        self._sessions.pop(session.key, None)
        if session.slot is not None and self._owner[session.slot] is session:
            self._owner[session.slot] = None
            self._hold(session.slot, session.ids, session.audio_keys)
        session.slot = None

    def _hold(self, slot: int, ids: list[int], audio_keys: Sequence[str]) -> None:
        """A free slot keeps ``ids`` (cached at its first len(ids) positions) for a later request."""
        if not self.reuse_prefixes or not ids:
            self._forget(slot)
            return
        self._held[slot], self._lengths[slot] = (list(ids), list(audio_keys)), len(ids)

    def _forget(self, slot: int) -> None:
        self._held[slot], self._lengths[slot] = None, 0

    def _drop_ended_sessions(self) -> None:
        while True:
            try:
                key = self._ending.get_nowait()
            except queue.Empty:
                break
            session = self._sessions.get(key)
            if session is None:
                continue
            if session.busy:
                session.ended = True
            else:
                self._drop_session(session)
        if self.session_idle_s is not None:
            now = self._clock()
            for session in [s for s in self._sessions.values() if not s.busy]:
                if now - session.last_used > self.session_idle_s:
                    self._drop_session(session)
