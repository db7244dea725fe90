"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's multipart audio uploads.

Form fields: ``file`` and ``model`` (required), ``language``, ``prompt``, ``response_format`` (json, text,
srt, vtt, verbose_json), ``temperature`` (default 0: greedy, as the official evaluation decodes),
``timestamp_granularities[]`` (segment only: word and other values are refused; it and ``include[]`` may
also come without the brackets), ``stream`` (true: OpenAI's server-sent events,
``transcript.text.delta`` as the text is decoded, with verbose_json a ``transcript.text.segment`` with its
times as each window is done, then ``transcript.text.done``; json, text and verbose_json),
``include[]`` (``logprobs``, with json: each generated
token's text, log-probability and bytes, every window's in order) and ``num_beams`` (an extension: beam
search over that many beams, beam sampling with a temperature above 0; at temperature 0 the server's
``--num-beams`` is the default, else the checkpoint's (its generation_config.json's "transcription"
object), else 1) and ``chunking_strategy`` (as OpenAI's: ``auto``, the server's own cuts, or a JSON
object ``{"type": "server_vad", "silence_duration_ms": 200}``: a cut in every pause at least that long;
its ``prefix_padding_ms`` and ``threshold`` are accepted and not used). ``prompt`` is accepted and not used:
the model's task prompt is fixed. Other fields are ignored.

- Transcription asks with the base model's official ASR prompt (``Qwen2Audio.transcribe``'s), and
  translation with the official speech-translation prompt of the evaluation (CoVoST 2), into English.
  Both read ``language`` as the language spoken (ISO 639-1, default en; an extension on /translations,
  where OpenAI's API has no such field): the prompts name it.
- The audio is cut into windows of at most 30 s (the server's ``--chunk-seconds``, else the checkpoint's
  ``transcription_defaults``) in a pause between speech (``cut_windows``: a long pause the VAD hears in
  each window's last half, else where it is quietest), and with ``--cut-at-pauses S`` (or
  the checkpoint's setting, or a request's ``server_vad`` chunking) also in every pause between speech of
  at least S seconds (found by Silero VAD), so that each window holds
  one stretch of speech, and what it hears no speech in (beyond 0.5 s on each side of speech) is not
  transcribed: no segment covers it, and a file with no speech gives an empty text; each window is answered on its own as one segment with its start and end times; the model's
  <|...|> tags are removed from the text, as ``Qwen2Audio.transcribe`` removes them.
- With the server's ``--fallback`` (by default where the checkpoint's "transcription" object says
  ``"fallback": true``, as the demo model's does), a window decoded at temperature 0 (greedy or by beam search) whose text is repetitive (a zlib compression ratio past
  2.4: a decoding loop) is decoded again with seeded sampling at temperature 0.2, 0.4, ... 1.0 until one is
  not, as Whisper does (qwen2audio.generation.fallback); verbose_json gives each segment the temperature
  its text came from, and its compression ratio.
- verbose_json's segments also carry a ``no_speech_prob``: 1 minus the highest probability of speech Silero
  VAD gives any 32 ms of the segment's audio (``text.transcripts.with_no_speech``), for clients that drop
  segments by it as they do Whisper's; the streamed segment events do not.
- Up to four windows at a time go to the backend (they decode together in one batch; more would crowd
  out other clients). Only the first can be refused for a full queue (429); each later one waits for
  room, joining the back of the line (another client's request may run between two windows).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..api import speech_prompt
from ..audio.features import SAMPLE_RATE, chunk_samples, pause_samples, speech_windows
from ..generation import fallback as F
from ..generation.params import SamplingParams, transcription_cuts, transcription_decoding
from ..generation.reply import logprob_entries
from ..text.languages import check_language, language_name
from ..text.tags import TAG
from .audio_input import AudioPolicy, decode
from .backend import Backend, Handle, QueueFull, Unavailable
from .chat import check_model, refusal, refuse_if_full, request_error
from .errors import bad_request, error_body
from ..text.transcripts import FORMATS, Segment, full_text, render, seconds, separator, with_no_speech
from .handles import ClientGone, Reader, watching
from .metrics import Metrics

TRANSCRIBE, TRANSLATE = "transcribe", "translate"
TARGET_LANGUAGE = "en"  # /v1/audio/translations translates into English, as OpenAI's does
DEFAULT_LANGUAGE = "en"
MAX_FORM_FIELDS = 16
RESUBMIT_SECONDS = 0.05  # how often a later window asks again for room in a full queue
WINDOW_MAX_TOKENS = SamplingParams().max_new_tokens  # per window: the official evaluation's 256
STREAMED_FORMATS = ("json", "text", "verbose_json")  # srt and vtt are documents: no events
WINDOWS_AT_ONCE = 4  # of one file, in the backend together: they share a batch and leave room for others


async def audio_endpoint(request: Request, task: str, backend: Backend, policy: AudioPolicy, max_tokens: int,
                         metrics: Metrics, arrived: float, endpoint: str, fallback: bool | None = None,
                         num_beams: int | None = None, chunk_seconds: float | None = None,
                         cut_at_pauses: float | None = None) -> Response:
    """A transcription or translation. The server's settings (``fallback``, ``num_beams``, the cuts), where
    None, are the checkpoint's (``backend.transcription_defaults``: greedy, no fallback, unless its
    generation_config.json says); the request's fields override them."""
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    try:  # the upload's bytes, and its spooled file closed (the other fields are strings, kept in the form)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("send the audio as a multipart/form-data file field named 'file'", "file")
        data = await upload.read()
    finally:
        await form.close()
    check_model(_field(form, "model", required=True), backend.model_id)
    language = _field(form, "language") or DEFAULT_LANGUAGE
    try:
        check_language(language)
    except ValueError as err:
        raise bad_request(str(err), "language") from None
    response_format = _field(form, "response_format") or "json"
    if response_format not in FORMATS:
        raise bad_request(f"response_format {response_format!r} is not one of {', '.join(FORMATS)}",
                          "response_format")
    _check_granularities(form, response_format)
    with_logprobs = _include_logprobs(form, response_format)
    stream = _stream(form, response_format)
    temperature = _temperature(form)
    # the request's num_beams, else the server's flags, else the checkpoint's, as the Python API decides
    server = {"num_beams": num_beams, "fallback": fallback}
    defaults = {"num_beams": 1, "fallback": False, **backend.transcription_defaults,
                **{k: v for k, v in server.items() if v is not None}}
    beams = _num_beams(form)
    sampling, fallback = transcription_decoding(
        defaults, {"temperature": temperature, **({"num_beams": beams} if beams is not None else {})})
    params = SamplingParams(**sampling, max_new_tokens=min(WINDOW_MAX_TOKENS, max_tokens),
                            logprobs=0 if with_logprobs or response_format == "verbose_json" else None)
    # the server's flags, else the checkpoint's settings; a request's chunking_strategy over both
    chunk_seconds, cut_at_pauses = transcription_cuts(backend.transcription_defaults, chunk_seconds, cut_at_pauses)
    pause = _chunking(form, cut_at_pauses)

    refuse_if_full(backend)  # before the audio is decoded
    wave = await run_in_threadpool(decode, data, "file", policy.max_seconds, policy.max_seconds)
    prompt = speech_prompt(language, None if task == TRANSCRIBE else TARGET_LANGUAGE)
    windows = await run_in_threadpool(speech_windows, wave, chunk_samples(chunk_seconds), pause_samples(pause))
    events = _window_events(request, backend, prompt, windows, params, metrics, arrived, endpoint,
                            fallback=fallback, live=stream)
    if stream:
        return await _streamed(events, backend, with_logprobs,
                               wave.shape[0] / SAMPLE_RATE if response_format == "verbose_json" else None)
    segments = [event async for event in events if isinstance(event, Segment)]
    if response_format == "verbose_json":
        segments = await run_in_threadpool(with_no_speech, segments, wave)
    duration = wave.shape[0] / SAMPLE_RATE
    # OpenAI's usage: tokens for json, the audio's seconds for verbose_json; a translation has none
    usage = None if task == TRANSLATE else (
        {"type": "duration", "seconds": seconds(duration)} if response_format == "verbose_json"
        else _token_usage(segments) if response_format == "json" else None)
    # verbose_json's language names the text's: a translation's is English, as OpenAI's is
    body, media_type = render(response_format, segments, task=task,
                              language=language_name(language if task == TRANSCRIBE else TARGET_LANGUAGE),
                              duration=duration, temperature=params.temperature,
                              logprobs=_entries(segments, backend) if with_logprobs else None, usage=usage)
    return Response(body, media_type=media_type)


def _token_usage(segments: list[Segment]) -> dict:
    """OpenAI's token usage of a transcription: every window's prompt (its audio included) and generated
    tokens (stop tokens too)."""
    output = sum(len(s.tokens) for s in segments)
    prompt = sum(s.prompt_tokens for s in segments)
    return {"type": "tokens", "input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}


def _entries(segments: list[Segment], backend: Backend) -> list[dict]:
    """Every window's tokens' logprob entries, in order (OpenAI's transcription entries have no top_logprobs)."""
    return [e for s in segments for e in _plain_entries(s.logprobs, backend)]


def _plain_entries(logprobs: list, backend: Backend) -> list[dict]:
    return [{k: e[k] for k in ("token", "logprob", "bytes")} for e in logprob_entries(logprobs, backend.token_bytes)]


@dataclasses.dataclass(frozen=True)
class _Delta:
    """A window's text as it is decoded, and the logprobs of the tokens it was read with (None when the
    request asked for none)."""

    text: str
    logprobs: list | None


async def _streamed(events: AsyncIterator, backend: Backend, with_logprobs: bool,
                    duration: float | None = None) -> Response:
    """``stream=true``: server-sent events as OpenAI's streamed transcriptions send them, a
    ``transcript.text.delta`` per piece of text as it is decoded, then ``transcript.text.done`` with the
    whole text (and the logprobs, when asked for) and the usage. With logprobs asked for, each delta carries
    those of the tokens decoded since the delta before (tokens whose text is held back, a window's stop
    token, go with the next delta; the done event has them all). With ``duration`` (the audio's seconds:
    verbose_json) also a ``transcript.text.segment`` as each window is done (``id``, ``start``, ``end``,
    ``text``: OpenAI's event without its diarizing ``speaker``; the segments of the whole answer, empty
    ones too), and ``duration`` in the done event (an extension). The first window's first text (or the
    request's error) comes before the response starts, so errors get their status."""
    first = await anext(events, None)

    async def body() -> AsyncIterator[str]:
        segments, text = [], _LiveText()
        pending: list = []  # logprobs of tokens read whose text no delta has carried yet
        window_read = 0  # of this window's tokens, those read as deltas
        try:
            event = first
            while event is not None:
                if isinstance(event, Segment):
                    segments.append(event)
                    delta = text.window_done(event.text)
                    pending += (event.logprobs or [])[window_read:]
                    window_read = 0
                else:
                    delta = text.push(event.text)
                    pending += event.logprobs or []
                    window_read += len(event.logprobs or ())
                if delta:
                    data = {"type": "transcript.text.delta", "delta": delta}
                    if with_logprobs:
                        data["logprobs"], pending = _plain_entries(pending, backend), []
                    yield _sse(data)
                if isinstance(event, Segment) and duration is not None:
                    yield _sse({"type": "transcript.text.segment", "id": f"seg_{len(segments) - 1}",
                                "start": seconds(event.start), "end": seconds(event.end), "text": event.text})
                event = await anext(events, None)
            done = {"type": "transcript.text.done", "text": full_text(segments)}
            if duration is not None:
                done["duration"] = seconds(duration)
            if with_logprobs:
                done["logprobs"] = _entries(segments, backend)
            done["usage"] = _token_usage(segments)
            yield _sse(done)
        except Exception as err:  # noqa: BLE001 - a window that failed after the stream began
            error = request_error(err)
            yield _sse(error_body(error.message, error.type, error.param, error.code))
        finally:  # the client left, or an error: the windows still decoding stop
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _LiveText:
    """A streamed transcript's text as the windows' raw deltas come: the model's <|...|> tags removed, each
    window's text stripped, windows joined by ``separator``, as the whole transcript is (``full_text``). Text
    that could still change is held back: trailing whitespace (stripped if the window ends there) and an
    unfinished tag."""

    def __init__(self) -> None:
        self.raw = ""  # this window's decoded text so far
        self.sent = 0  # of its cleaned text, the characters sent
        self.before = ""  # the last text sent (what the next window's text is joined to: ``separator``)

    def push(self, delta: str) -> str:
        self.raw += delta
        clean = TAG.sub("", self.raw).lstrip()
        ready = len(clean.rstrip())
        tag = clean.rfind("<|")
        if tag >= 0 and "|>" not in clean[tag:]:
            ready = min(ready, len(clean[:tag].rstrip()))  # the whitespace before it too: it may end the window
        return self._send(clean, ready)

    def window_done(self, text: str) -> str:
        """The window's final text (after the fallback, perhaps another than what was streamed): the rest of
        it. Streamed text is never taken back: with the fallback on, windows are not streamed live."""
        delta = self._send(text, len(text))
        self.raw, self.sent = "", 0
        return delta

    def _send(self, clean: str, ready: int) -> str:
        if ready <= self.sent:
            return ""
        piece = clean[self.sent:ready]
        if self.sent == 0:
            piece = separator(self.before, piece) + piece
        self.before = piece
        self.sent = ready
        return piece


async def _window_events(request: Request, backend: Backend, prompt: str, windows, params: SamplingParams,
                         metrics: Metrics, arrived: float, endpoint: str, fallback: bool = False,
                         live: bool = False) -> AsyncIterator[_Delta | Segment]:
    """Each window's (``Window``'s) answer as a Segment, in order; with ``live`` (a streamed response) also its text deltas
    as they are decoded, before its Segment (not with the fallback, which may replace a window's text). Up
    to WINDOWS_AT_ONCE windows are in the backend at a time, so a long file's windows decode together in
    one batch; a window's answer is read while the next ones are already decoding. Until the first text,
    a client that leaves is noticed here; once a streamed response has begun, its server notices."""
    handles: list[Handle] = []
    readers: dict[int, Reader] = {}
    recorded: set[int] = set()
    started = False
    try:
        for k, window in enumerate(windows):
            while len(handles) < min(k + WINDOWS_AT_ONCE, len(windows)):
                handles.append(await _submit(request, backend, prompt, windows[len(handles)].audio, params,
                                             first=not handles))
            reader = readers[k] = Reader(handles[k])
            try:
                if live and not fallback:
                    parts, read = [], 0
                    while (delta := await _read(request, handles[k], reader.next, watch=not started)) is not None:
                        parts.append(delta)
                        started = True
                        logprobs, upto = handles[k].result.logprobs, handles[k].tokens_read
                        yield _Delta(delta, None if logprobs is None else logprobs[read:upto])
                        read = upto
                    text = "".join(parts)
                else:
                    text = await _read(request, handles[k], reader.rest, watch=not (live and started))
            except Exception as err:  # noqa: BLE001
                raise request_error(err) from None
            _record(metrics, reader, arrived if k == 0 else None, endpoint)
            recorded.add(k)
            result, temperature = handles[k].result, None
            if fallback and F.repetitive(text):
                text, result, temperature = await _again(request, backend, prompt, window.audio, params, metrics,
                                                         endpoint, text, result)
            started = True
            yield Segment.decoded(window, text, result, temperature)
    finally:  # an error, a client gone or a consumer that stopped: the windows still decoding stop
        for handle in handles:
            handle.cancel()
        for k, handle in enumerate(handles):  # and are counted, as stopped early where they were
            if k not in recorded:
                _record(metrics, readers.get(k) or Reader(handle), arrived if k == 0 else None, endpoint)


async def _read(request: Request, handle: Handle, work, watch: bool):
    """``await work()``, watching for the client to leave (``watching``) unless a streamed response has
    begun: its server then receives the disconnect itself."""
    return await watching(request, [handle], work) if watch else await work()


async def _again(request: Request, backend: Backend, prompt: str, window, params: SamplingParams, metrics: Metrics,
                 endpoint: str, text: str, result):
    """A repetitive window decoded again at each fallback temperature until its text is not repetitive
    (generate_with_fallback's rule, one window at a time): (text, result, temperature used)."""
    pick = F.Pick(text, (result, params.temperature))
    for again in F.retries(params):
        handle = await _submit(request, backend, prompt, window, again, first=False)
        reader = Reader(handle)
        try:
            text = await watching(request, [handle], reader.rest)
        except Exception as err:  # noqa: BLE001
            raise request_error(err) from None
        finally:
            handle.cancel()  # a finished one is not changed
            _record(metrics, reader, None, endpoint)
        if pick.offer(text, (handle.result, again.temperature)):
            break
    return pick.text, *pick.value


def _field(form, name: str, required: bool = False) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        if required:
            raise bad_request(f"the form field {name!r} is missing", name)
        return None
    if not isinstance(value, str):
        raise bad_request(f"the form field {name!r} must be text, not a file", name)
    return value.strip()


def _listed(form, name: str) -> list:
    """A list field's values: ``name[]`` as the openai client sends it, or ``name`` (curl's -F name=value)."""
    return [v.strip() if isinstance(v, str) else v for v in form.getlist(f"{name}[]") + form.getlist(name)]


GRANULARITIES = ("segment", "word")  # OpenAI's timestamp_granularities


def _check_granularities(form, response_format: str) -> None:
    """``timestamp_granularities[]``: segment (verbose_json's segments, always given); word is refused, as
    is anything else, and any with a format other than verbose_json (as OpenAI refuses it)."""
    values = _listed(form, "timestamp_granularities")
    unknown = [v for v in values if v not in GRANULARITIES]
    if unknown:
        raise bad_request(f"timestamp_granularities[] may name segment or word, got {unknown[0]!r}",
                          "timestamp_granularities")
    if "word" in values:
        raise bad_request("word timestamps are not supported; segment timestamps come with verbose_json",
                          "timestamp_granularities")
    if values and response_format != "verbose_json":
        raise bad_request(f"timestamp_granularities needs response_format verbose_json (the only format with "
                          f"times), got {response_format}", "timestamp_granularities")


def _include_logprobs(form, response_format: str) -> bool:
    """Whether ``include[]`` asks for the tokens' logprobs (the one thing it can ask for), which only the
    json format carries."""
    include = _listed(form, "include")
    unknown = [v for v in include if v != "logprobs"]
    if unknown:
        raise bad_request(f"include[] may only name logprobs, got {unknown[0]!r}", "include")
    if include and response_format != "json":
        raise bad_request(f"include[]=logprobs comes with response_format json, not {response_format!r}", "include")
    return bool(include)


def _stream(form, response_format: str) -> bool:
    value = (_field(form, "stream") or "false").lower()
    if value not in ("true", "false"):
        raise bad_request(f"stream must be true or false, got {value!r}", "stream")
    if value == "true" and response_format not in STREAMED_FORMATS:
        raise bad_request(f"stream=true sends the text as it is decoded (with verbose_json, each segment's times as "
                          f"it is done); use response_format json, text or verbose_json, not {response_format!r}",
                          "stream")
    return value == "true"


def _temperature(form) -> float:
    value = _field(form, "temperature")
    try:
        temperature = 0.0 if value is None else float(value)
    except ValueError:
        raise bad_request(f"temperature {value!r} is not a number", "temperature") from None
    if not 0 <= temperature < float("inf"):
        raise bad_request(f"temperature must be >= 0 (0 = greedy), got {value}", "temperature")
    return temperature


def _num_beams(form) -> int | None:
    value = _field(form, "num_beams")
    if value is None:
        return None
    try:
        beams = int(value)
    except ValueError:
        raise bad_request(f"num_beams {value!r} is not a whole number", "num_beams") from None
    if beams < 1:
        raise bad_request(f"num_beams must be at least 1 (1 = greedy decoding), got {beams}", "num_beams")
    return beams


SERVER_VAD_SILENCE_MS = 200  # OpenAI's default silence_duration_ms


def _chunking(form, default: float) -> float:
    """``chunking_strategy`` -> the shortest pause to cut at, in seconds (0: only where a window must end).
    Absent or ``auto``: ``default`` (the server's ``--cut-at-pauses``, else the checkpoint's); a
    ``server_vad`` object: its silence_duration_ms."""
    hint = 'give "auto" or a JSON object such as {"type": "server_vad", "silence_duration_ms": 300}'
    value = _field(form, "chunking_strategy")
    nested = {key[len("chunking_strategy["):-1]: _number(_field(form, key)) for key in form.keys()
              if key.startswith("chunking_strategy[") and key.endswith("]")}  # the openai client's encoding
    if nested and value is not None:
        raise bad_request("give chunking_strategy once: as one field or as chunking_strategy[...] fields",
                          "chunking_strategy")
    if nested:
        strategy = nested
    elif value is None or value == "auto":
        return default
    else:
        try:
            strategy = json.loads(value)
        except ValueError:
            raise bad_request(f"chunking_strategy {value[:80]!r} is neither \"auto\" nor JSON: {hint}",
                              "chunking_strategy") from None
    if not isinstance(strategy, dict) or strategy.get("type") != "server_vad":
        raise bad_request(f"chunking_strategy must be \"auto\" or an object of type \"server_vad\": {hint}",
                          "chunking_strategy")
    unknown = set(strategy) - {"type", "silence_duration_ms", "prefix_padding_ms", "threshold"}
    if unknown:
        raise bad_request(f"chunking_strategy has unknown fields {sorted(unknown)}: {hint}", "chunking_strategy")
    for name in ("prefix_padding_ms", "threshold"):  # accepted, as OpenAI's; cuts go in the middle of pauses
        if name in strategy and (isinstance(strategy[name], bool) or not isinstance(strategy[name], (int, float))):
            raise bad_request(f"chunking_strategy.{name} must be a number, got {strategy[name]!r}", "chunking_strategy")
    silence = strategy.get("silence_duration_ms", SERVER_VAD_SILENCE_MS)
    if isinstance(silence, bool) or not isinstance(silence, (int, float)):
        raise bad_request(f"chunking_strategy.silence_duration_ms must be a number of milliseconds, got {silence!r}",
                          "chunking_strategy")
    try:
        pause_samples(silence / 1000)
    except ValueError:
        raise bad_request(f"chunking_strategy.silence_duration_ms must be between 50 and 5000, got {silence!r}",
                          "chunking_strategy") from None
    return silence / 1000


def _number(text: str | None):
    """A form field's text as the int or float it spells, else the text itself (for the error to quote)."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


async def _submit(request: Request, backend: Backend, prompt: str, window, params: SamplingParams,
                  first: bool) -> Handle:
    while True:
        try:
            return backend.complete(prompt, [window], params)
        except QueueFull as err:
            if first:
                raise refusal(err) from None
        except Unavailable as err:
            raise refusal(err) from None
        if await request.is_disconnected():
            raise ClientGone()
        await anyio.sleep(RESUBMIT_SECONDS)


def _record(metrics: Metrics, reader: Reader, arrived: float | None, endpoint: str) -> None:
    """A window's generation in the metrics: its speed from when its tokens were decoded (a later window
    decodes beside the first and is read after it), its time to first token from when the reader had it."""
    result = reader.handle.result
    if arrived is not None and reader.first_at is not None:
        metrics.first_token.observe(reader.first_at - arrived, endpoint)
    first = result.first_token_at if result.first_token_at is not None else reader.first_at
    metrics.generation_done(result.prompt_tokens, len(result.token_ids), first, result.ended_at or time.monotonic(),
                            reader.stopped_early)
