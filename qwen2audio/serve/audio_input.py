"""Audio in a request -> checked 16 kHz mono samples, or a 400 that says what was wrong.

Where audio may come from:
- base64 (an ``input_audio`` part, or a ``data:audio/...;base64,...`` URL): always;
- an http(s) URL: only on the hosts the operator allowed (download.py keeps it from reaching others);
- a local file (an absolute path, a ``file://`` URL, or a path relative to an allowed folder): only
  inside the folders given with ``--allow-local-audio``, after resolving symbolic links and ``..``.

Limits: the bytes (``max_bytes``, the body limit) and the duration (``max_seconds``, per request). The
duration is read from the file's header before decoding (libsndfile, else FFmpeg's container), or,
where the header does not say, counted while decoding without keeping the samples and stopped at the
limit, so that a two-hour clip is refused without decoding two hours of audio. Decoding itself is
qwen2audio.audio.io's ``load_audio`` (one home for formats, mono mixing and resampling). A file cut short is
answered from what arrived; the server's log and the response's ``X-Audio-Warning`` header say so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import numpy as np

from ..audio.features import SAMPLE_RATE
from ..errors import AudioError
from ..text.chat import AudioDataError, base64_bytes, is_data_url
from . import defaults
from .download import DownloadRefused, UrlPolicy, fetch
from .errors import APIError, bad_request

log = logging.getLogger("qwen2audio.serve")
WARNING_HEADER = "X-Audio-Warning"
_request_warnings: ContextVar[list[str] | None] = ContextVar("audio_warnings", default=None)


@contextlib.contextmanager
def collect_warnings():
    """The audio warnings of one request (decode appends to the list; worker threads share it)."""
    caught: list[str] = []
    token = _request_warnings.set(caught)
    try:
        yield caught
    finally:
        _request_warnings.reset(token)


def with_warnings(response, caught: list[str]):
    """``response`` with the request's audio warnings in its ``X-Audio-Warning`` header (printable ASCII: a
    file name may be anything)."""
    if caught:
        response.headers[WARNING_HEADER] = re.sub(r"[^\x20-\x7e]", "?", " | ".join(caught))
    return response


async def answer_with_warnings(answer: Awaitable):
    """Await an endpoint's answer with the audio warnings its decoding raises collected into its header."""
    with collect_warnings() as caught:
        return with_warnings(await answer, caught)


@dataclass(frozen=True)
class AudioPolicy:
    """What a request's audio may be and where it may come from."""

    max_bytes: int
    max_seconds: float = defaults.MAX_AUDIO_SECONDS
    urls: UrlPolicy = field(default_factory=UrlPolicy)
    local_dirs: tuple[Path, ...] = ()  # resolved folders whose files may be read


def allowed_folders(folders) -> tuple[Path, ...]:
    """``--allow-local-audio`` values -> resolved folders; ValueError for one that is not a folder."""
    out = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"--allow-local-audio {folder}: not a directory")
        out.append(path.resolve())
    return tuple(out)


# -- sources -> bytes ---------------------------------------------------------------------------------------
def b64_bytes(data: str, param: str) -> bytes:
    """The bytes of a request's base64 audio (text.chat.base64_bytes: either alphabet, padded or not, or a
    whole data: URL); a 400 naming what is wrong otherwise."""
    try:
        return base64_bytes(data, param)
    except AudioDataError as err:
        raise bad_request(str(err), param, err.code) from None


def url_bytes(url: str, policy: AudioPolicy, param: str) -> bytes:
    """The bytes an audio URL names: a data: URL, an allowed http(s) URL or an allowed local file."""
    if is_data_url(url):
        return b64_bytes(url, param)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.urls.enabled:
            raise bad_request(f"{param}: this server does not fetch audio URLs; send the audio as input_audio "
                              "(base64) or a data: URL", param, "url_not_allowed")
        try:
            return fetch(url, policy.urls, policy.max_bytes)
        except DownloadRefused as err:
            raise bad_request(f"{param}: {err}", param, "url_not_allowed") from None
    if scheme == "file" or (not scheme or len(scheme) == 1):  # a path ("C:" is a drive, not a scheme)
        return _local_bytes(url, policy, param)
    raise bad_request(f"{param}: audio URLs with scheme {scheme!r} are not read; send the audio as input_audio "
                      "(base64) or a data: URL", param, "url_not_allowed")


def _local_bytes(url: str, policy: AudioPolicy, param: str) -> bytes:
    if not policy.local_dirs:
        raise bad_request(f"{param}: this server does not read local files; send the audio as input_audio "
                          "(base64) or a data: URL", param, "local_file_not_allowed")
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"{param}: file URLs must name a local file (file:///path)", param)
        url = url2pathname(unquote(parts.path))
    path = _inside_allowed(Path(url), policy.local_dirs)
    if path is None:
        raise bad_request(f"{param}: the file is not inside a folder this server reads audio from, or does not "
                          "exist", param, "local_file_not_allowed")
    if path.stat().st_size > policy.max_bytes:
        raise APIError(413, f"{param}: the file is more than the {policy.max_bytes} bytes this server takes",
                       param=param, code="audio_too_large")
    return path.read_bytes()


def _inside_allowed(path: Path, folders: tuple[Path, ...]) -> Path | None:
    """The resolved regular file ``path`` names inside one of ``folders`` (a relative path is tried in
    each folder in turn), or None: after symbolic links and ``..`` are resolved it must still be inside."""
    candidates = [path] if path.is_absolute() else [folder / path for folder in folders]
    for candidate in candidates:
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symbolic link loop
            continue
        if resolved.is_file() and any(resolved.is_relative_to(folder) for folder in folders):
            return resolved
    return None


# -- bytes -> samples ---------------------------------------------------------------------------------------
def decode(data: bytes, param: str, seconds_left: float, max_seconds: float) -> np.ndarray:
    """Encoded audio -> (n,) float32 at 16 kHz, at most ``seconds_left`` long (what the request's
    earlier clips left of ``max_seconds``); a 400 otherwise."""
    seconds = probe_seconds(data, seconds_left)
    if seconds is not None and seconds > seconds_left:
        raise _too_long(param, seconds, seconds_left, max_seconds)
    from ..audio.io import collect_audio_warnings, load_audio  # soundfile, soxr and PyAV: once audio arrives

    try:
        with collect_audio_warnings() as caught:  # a file cut short is used as far as it goes: said in the log
            # and to this request alone (threads decode side by side); no hint may tell a client which files
            # exist on this machine
            wave = load_audio(data, name=param, local_hints=False)
        sink = _request_warnings.get()
        for message in caught:
            log.warning("%s", message)
            if sink is not None:
                sink.append(message)
    except AudioError as err:
        raise bad_request(str(err), param, "invalid_audio") from None
    if wave.shape[0] / SAMPLE_RATE > seconds_left:  # a header that said less than there was
        raise _too_long(param, wave.shape[0] / SAMPLE_RATE, seconds_left, max_seconds)
    return wave


def _too_long(param: str, seconds: float, seconds_left: float, max_seconds: float) -> APIError:
    earlier = f" ({seconds_left:.1f} s after the request's other audio)" if seconds_left < max_seconds else ""
    return bad_request(f"{param}: the audio is {seconds:.1f} s long; this server takes at most {max_seconds:g} s of "
                       f"audio per request{earlier}", param, "audio_too_long")


def probe_seconds(data: bytes, limit: float) -> float | None:
    """The duration of encoded audio without decoding it all: from the header (libsndfile, else FFmpeg's
    container), else counted while decoding and stopped once past ``limit``; None if unreadable."""
    import soundfile

    from ..audio.io import MIN_SAMPLE_RATE

    try:
        info = soundfile.info(io.BytesIO(data))
        if 0 < info.samplerate < MIN_SAMPLE_RATE:  # a damaged header (1 Hz): load_audio says so, not a length
            return None
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - not a format libsndfile reads: ask FFmpeg
        pass
    return _container_seconds(data, limit)


def _container_seconds(data: bytes, limit: float) -> float | None:
    import av

    from ..audio.io import MIN_SAMPLE_RATE

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if 0 < (stream.sample_rate or 0) < MIN_SAMPLE_RATE:  # a damaged header: load_audio says so
                return None
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / av.time_base
            seconds = 0.0
            for frame in container.decode(stream):  # no length in the header (a browser's webm): count
                seconds += frame.samples / frame.sample_rate
                if seconds > limit:
                    break
            return seconds
    except Exception:  # noqa: BLE001 - load_audio will say what is wrong with it
        return None
