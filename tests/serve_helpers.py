"""Shared by the server's tests: a real uvicorn server on a free loopback port, in a thread, and a fake
backend whose speed and answers the test decides."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from typing import Iterator

import numpy as np
import soundfile

from qwen2audio.generation.engine import Generation
from qwen2audio.serve.app import ServerState, Settings, create_app
from qwen2audio.serve.audio_input import AudioPolicy
from qwen2audio.serve.backend import Handle, QueueFull, Unavailable
from reference import clip

START_TIMEOUT = 60.0


def wav_bytes(seconds: float, seed: int = 0, sr: int = 16000) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, clip(seconds, seed, sr=sr), sr, format="WAV", subtype="PCM_16")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def settings(**overrides) -> Settings:
    audio = overrides.pop("audio", None) or AudioPolicy(max_bytes=overrides.get("max_body_bytes", 8 << 20),
                                                        max_seconds=overrides.pop("max_seconds", 60.0))
    return Settings(audio=audio, **overrides)


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 at a free port in a thread; yields its base URL; stops it after."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def serving(model, model_id: str, backend_options: dict | None = None, **overrides):
    """A real server over ``model`` behind its own scheduler (SchedulerBackend), with ``settings(**overrides)``:
    yields its base URL and its ServerState; the backend closes after."""
    from qwen2audio.serve.backend import SchedulerBackend

    state = ServerState()
    state.ready(SchedulerBackend(model, model_id, **(backend_options or {})))
    try:
        with running(create_app(state, settings(**overrides))) as url:
            yield url, state
    finally:
        state.backend.close()


def wait_until(condition, what: str = "the condition", seconds: float = 30.0, poll: float = 0.005) -> None:
    """Poll ``condition()`` until it is true; fail the test after ``seconds`` naming ``what`` it waited for."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(poll)


class FakeBackend:
    """A Backend that answers every request with ``words``, one per ``delay`` seconds, one request at a
    time; it records what it was asked and which handles were cancelled. ``hold``: the words wait until
    ``gate`` is set (a request that runs until the test lets it go)."""

    def __init__(self, words=("hello", " world"), delay: float = 0.0, max_queue: int = 4, model_id: str = "fake",
                 hold: bool = False):
        self.words, self.delay, self.max_queue, self.model_id = list(words), delay, max_queue, model_id
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.chat_defaults: dict = {}
        self.transcription_defaults: dict = {"chunk_seconds": 30.0, "cut_at_pauses": 0}
        self.error: Exception | None = None  # raised by every request while set
        self.requests: list[tuple] = []
        self.cancelled: list[Handle] = []
        self._waiting: list[Handle] = []
        self._live: set[Handle] = set()  # submitted, not finished
        self._lock = threading.Lock()
        self._turn = threading.Lock()
        self._closed = False
        self._running = 0

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    @property
    def full(self) -> bool:
        return len(self._waiting) >= self.max_queue

    def chat(self, messages, params, cap_max_tokens=True) -> Handle:
        return self._submit(("chat", messages, params))

    def complete(self, prompt, audios, params) -> Handle:
        return self._submit(("complete", prompt, audios, params))

    def token_bytes(self, token_id) -> bytes:
        raise AssertionError("the fake backend's results carry no logprobs: nothing should ask for a token's bytes")

    def close(self, timeout=None) -> None:
        self._closed = True
        with self._lock:
            handles = list(self._live)
        for handle in handles:
            handle.cancel()

    def _submit(self, request) -> Handle:
        if self._closed:
            raise Unavailable("closed")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting))
            handle = Handle()
            handle._on_cancel = self.cancelled.append
            self._waiting.append(handle)
            self._live.add(handle)
            self.requests.append(request)
        threading.Thread(target=self._answer, args=(handle,), daemon=True).start()
        return handle

    def _answer(self, handle: Handle) -> None:
        result = Generation(prompt_tokens=3)
        with self._turn:  # one request at a time: the others wait in line
            with self._lock:
                self._waiting.remove(handle)
            if self.error is not None:
                self._live.discard(handle)
                handle.fail(self.error)
                return
            self._running += 1
            try:
                for i, word in enumerate(self.words):
                    self.gate.wait()
                    time.sleep(self.delay)
                    if handle.cancelled:
                        break
                    result.text += word
                    result.token_ids.append(i)
                    handle.put(word)
                else:
                    result.finish_reason = "stop"
            finally:
                self._running -= 1
        with self._lock:
            self._live.discard(handle)
        handle.finish(result)


def fake_app(backend, **overrides):
    state = ServerState()
    state.ready(backend)
    return create_app(state, settings(**overrides)), state


def silent_flac_claiming(seconds: float, sr: int = 16000) -> bytes:
    """A short FLAC file whose header (STREAMINFO) claims ``seconds`` of audio."""
    out = io.BytesIO()
    soundfile.write(out, np.zeros(sr, dtype=np.float32), sr, format="FLAC")
    data = bytearray(out.getvalue())
    # STREAMINFO starts at byte 8 (after "fLaC" and the block header); its total-samples field is the
    # low 36 bits of the 8 bytes at offset 10 of the block: 20 bits rate, 3 channels, 5 bits per sample.
    start = 8 + 10
    packed = int.from_bytes(data[start:start + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | int(seconds * sr)
    data[start:start + 8] = packed.to_bytes(8, "big")
    return bytes(data)
