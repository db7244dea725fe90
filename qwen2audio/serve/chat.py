"""POST /v1/chat/completions: an OpenAI chat request -> the backend's chat, answered whole or streamed.

Sampling: the checkpoint's generation_config.json decides what the request leaves out (as
``Qwen2Audio.chat`` does), the request overrides it. ``num_beams`` > 1 (an extension, with
``length_penalty``) decodes by beam search (greedy: temperature 0 unless the request gives another, which
makes it beam sampling); streamed, its text comes as every beam agrees on it. ``n`` > 1 with greedy
decoding gives n copies of one completion (greedy decoding has one answer), generated once; with beam
search or beam sampling, the n best finished replies of one search (n at most num_beams), best first; sampled, n independent
completions (seeds seed, seed+1, ... when a seed is given). Streamed, the choices come one after another, each
whole before the next (every chunk names its choice's index, as OpenAI's do).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, AsyncIterator, Sequence

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..audio.features import SAMPLE_RATE
from ..generation.params import SamplingParams, chat_settings
from ..generation.reply import Generation, logprob_entries
from ..generation.scheduler import RequestTooLarge, TooManyBeams
from . import openai_format as fmt
from .audio_input import AudioPolicy, b64_bytes, decode, url_bytes
from .backend import Backend, Handle, MaxTokensTooLarge, QueueFull, Unavailable
from .errors import SERVER_ERROR, APIError, bad_request, error_body, retry_later
from .handles import Reader, watching
from .metrics import Metrics

ENDPOINT = "/v1/chat/completions"
SHUTTING_DOWN_RETRY_SECONDS = 5
log = logging.getLogger("qwen2audio.serve")


async def chat_completions(request: Request, backend: Backend, policy: AudioPolicy, max_tokens: int,
                           metrics: Metrics, arrived: float) -> Response:
    body = await request.body()
    try:
        req = fmt.ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        raise fmt.validation_error(err) from None
    check_model(req.model, backend.model_id)
    _refuse_unsupported(req)
    params, copies = sampling(req, backend.chat_defaults, max_tokens)
    queue = getattr(backend, "max_queue", None)
    if queue is not None and 1 < len(params) > queue:  # each sampled choice waits on its own: never all at once
        raise bad_request(f"n is {len(params)}: this server queues at most {queue} sampled replies at once "
                          "(serve --max-queue); ask for fewer choices", "n")
    refuse_if_full(backend)  # before the audio is decoded: a refused request should cost little
    messages = await run_in_threadpool(to_messages, req.messages, policy)
    # In a worker thread: preparing tokenizes the prompt and fingerprints its audio.
    capped = req.max_completion_tokens is None and req.max_tokens is None  # a number asked for must fit
    handles = await run_in_threadpool(submit, lambda p: backend.chat(messages, p, capped), params)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    done = _Done(metrics, arrived)
    answer = _Answer(backend, copies, done, ranked=params[0].beams,
                     tokens_field="max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    if req.stream:
        return await _streamed(request, answer, handles, include_usage)
    return await _whole(request, answer, handles)


# -- checking ---------------------------------------------------------------------------------------------
def check_model(name: str, model_id: str) -> None:
    if name not in (model_id, "default"):
        raise APIError(404, f"The model `{name}` does not exist: this server serves `{model_id}` (also called "
                       "`default`)", param="model", code="model_not_found")


def _refuse_unsupported(req: fmt.ChatCompletionRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (only 0); repetition_penalty (> 1) discourages "
                              "repeating instead", name, "unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise bad_request(f"{name} are not supported by this server", name, "unsupported_parameter")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice: there are no tools to call (only \"none\" or \"auto\")", "tool_choice",
                          "unsupported_parameter")
    if req.audio:
        raise bad_request("this model answers in text only: spoken replies (audio) are not supported", "audio",
                          "unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format",
                          "unsupported_parameter")
    if req.modalities and set(req.modalities) != {"text"}:
        raise bad_request("this model answers in text only: modalities must be [\"text\"]", "modalities",
                          "unsupported_parameter")


def sampling(req: fmt.ChatCompletionRequest, checkpoint: dict[str, Any], cap: int) -> tuple[list[SamplingParams], int]:
    """The SamplingParams of each generation to run, and how many choices each stands for."""
    asked = req.max_completion_tokens or req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > cap:
        raise bad_request(f"{name} is {asked}, more than this server's limit of {cap} tokens", name)
    seed = None if req.seed is None else req.seed % (fmt.MAX_SEED + 1)  # OpenAI's seeds are signed
    given = {"temperature": req.temperature, "top_p": req.top_p, "seed": seed,
             "repetition_penalty": req.repetition_penalty,
             "top_k": None if req.top_k is None else max(req.top_k, 0),
             "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
             "stop": (req.stop,) if isinstance(req.stop, str) else tuple(req.stop) if req.stop else None,
             "max_new_tokens": asked or min(checkpoint.get("max_new_tokens", cap), cap),
             "num_beams": req.num_beams, "length_penalty": req.length_penalty}
    try:
        base = SamplingParams(**chat_settings(checkpoint, {k: v for k, v in given.items() if v is not None}))
    except ValueError as err:
        raise bad_request(str(err)) from None
    n = req.n or 1
    if base.beams and n > base.num_beams:
        raise bad_request(f"n is {n}, but beam search over {base.num_beams} beams finds at most {base.num_beams} "
                          "replies; ask for fewer choices or more beams", "n")
    if n == 1 or base.greedy or base.beams:
        return [base], n
    seeds = [None] * n if base.seed is None else [(base.seed + i) % (fmt.MAX_SEED + 1) for i in range(n)]
    return [dataclasses.replace(base, seed=s) for s in seeds], 1


def to_messages(messages: Sequence[fmt.ChatMessage], policy: AudioPolicy) -> list[dict[str, Any]]:
    """OpenAI messages -> the model's messages, audio decoded and checked (total duration included)."""
    out, seconds_left = [], policy.max_seconds
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if part.type == "input_audio":
                data = b64_bytes(part.input_audio.data, f"{where}.input_audio.data")
            else:
                url = part.audio_url if isinstance(part.audio_url, str) else part.audio_url.url
                data = url_bytes(url, policy, f"{where}.audio_url")
            wave = decode(data, where, seconds_left, policy.max_seconds)
            seconds_left -= wave.shape[0] / SAMPLE_RATE
            parts.append({"type": "audio", "audio": wave})
        out.append({"role": role, "content": parts})
    return out


def refusal(err: QueueFull | Unavailable) -> APIError:
    """A backend's refusal -> its answer: 429 for a full queue, 503 while shutting down (both Retry-After)."""
    if isinstance(err, QueueFull):
        return retry_later(429, str(err), "queue_full", err.retry_after)
    return retry_later(503, str(err), "shutting_down", SHUTTING_DOWN_RETRY_SECONDS)


def refuse_if_full(backend: Backend) -> None:
    """429 at once when the queue has no room (``submit`` checks again: the queue may fill meanwhile)."""
    if backend.full:
        raise refusal(QueueFull(backend.queue_depth))


def submit(start, params: Sequence[SamplingParams]) -> list[Handle]:
    """Submit one generation per params; all or none (a full queue cancels those already in)."""
    handles: list[Handle] = []
    try:
        for p in params:
            handles.append(start(p))
    except (QueueFull, Unavailable) as err:
        for handle in handles:
            handle.cancel()
        raise refusal(err) from None
    return handles


def request_error(err: Exception, tokens_field: str = "max_tokens") -> APIError:
    """An error a generation raised -> its answer: ValueError is the request's fault (a prompt longer
    than the context), anything else the server's; ``tokens_field``: the request's name for the reply's
    length (max_tokens or max_completion_tokens), which a reply too long for the context is blamed on."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, TooManyBeams):
        return bad_request(str(err), "num_beams")
    if isinstance(err, MaxTokensTooLarge):
        return bad_request(str(err), tokens_field, "context_length_exceeded")
    if isinstance(err, ValueError):
        return bad_request(str(err), code="context_length_exceeded" if isinstance(err, RequestTooLarge) else None)
    log.exception("generation failed", exc_info=err)
    return APIError(500, f"the generation failed ({type(err).__name__}); see the server's log", SERVER_ERROR)


# -- answering ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Answer:
    """What shapes a request's answer: the backend (its model's name, its tokens' bytes), how many choices
    each generation stands for (``ranked``: a beam search's best replies, else copies of one), and what
    records it when it has ended."""

    backend: Backend
    copies: int
    done: "_Done"
    ranked: bool = False
    tokens_field: str = "max_tokens"  # the request's name for the reply's length (an error names it)

    def choices(self, result: Generation) -> list[Generation]:
        """The choices one generation stands for: ``copies`` of it, or (ranked) it and its alternatives,
        best first, as many as there are up to ``copies``."""
        if self.ranked:
            return [result, *result.alternatives][: self.copies]
        return [result] * self.copies

    def entries(self, result: Generation, start: int = 0, stop: int | None = None) -> list[dict[str, Any]] | None:
        """The logprob entries of ``result``'s tokens ``start:stop`` (to the last that has come when
        ``stop`` is None); None when the request did not ask for them."""
        if result.logprobs is None:
            return None
        return logprob_entries(result.logprobs[start:stop], self.backend.token_bytes)


class _Done:
    """Records a request's generations (tokens, timings) in the metrics, when its answer has ended."""

    def __init__(self, metrics: Metrics, arrived: float):
        self.metrics, self.arrived = metrics, arrived

    def __call__(self, readers: Sequence[Reader]) -> None:
        ended = time.monotonic()
        firsts = [r.first_at for r in readers if r.first_at is not None]
        if firsts:
            self.metrics.first_token.observe(min(firsts) - self.arrived, ENDPOINT)
        for reader in readers:  # the speed from the generation's own times where it has them (the scheduler's)
            result = reader.handle.result
            first = result.first_token_at if result.first_token_at is not None else reader.first_at
            self.metrics.generation_done(result.prompt_tokens, len(result.token_ids), first,
                                         result.ended_at or ended, reader.stopped_early)


async def _whole(request: Request, answer: _Answer, handles: list[Handle]) -> Response:
    readers = [Reader(h) for h in handles]

    async def read_all() -> list[str]:
        return [await reader.rest() for reader in readers]

    try:
        texts = await watching(request, handles, read_all)
    except Exception as err:  # noqa: BLE001 - mapped to its answer
        for handle in handles:  # the request's other choices: their slots go now, not at max_tokens
            handle.cancel()
        raise request_error(err, answer.tokens_field) from None
    finally:
        answer.done(readers)
    results = [h.result for h in handles]
    choices = [(text if g is r else g.text, g.finish_reason, answer.entries(g))
               for text, r in zip(texts, results) for g in answer.choices(r)]
    completion_tokens = sum(len(g.token_ids) for r in results for g in answer.choices(r))
    body = fmt.chat_completion(fmt.completion_id(), fmt.now(), answer.backend.model_id, choices,
                               results[0].prompt_tokens, completion_tokens, results[0].cached_tokens)
    return JSONResponse(body)


async def _streamed(request: Request, answer: _Answer, handles: list[Handle], include_usage: bool) -> Response:
    readers = [Reader(h) for h in handles]
    try:  # the first text (or the request's error) before the response starts: errors get their status
        first = await watching(request, handles, readers[0].next)
    except Exception as err:  # noqa: BLE001
        for handle in handles:
            handle.cancel()
        answer.done(readers)
        raise request_error(err, answer.tokens_field) from None
    events = _events(answer, readers, first, include_usage)
    return _CancellingStream(handles, events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _CancellingStream(StreamingResponse):
    """A stream whose generations are cancelled however it ends, even before its first chunk."""

    def __init__(self, handles: Sequence[Handle], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self.handles:
                handle.cancel()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(answer: _Answer, readers: list[Reader], first: str | None, include_usage: bool
                  ) -> AsyncIterator[str]:
    """The SSE stream: per choice a role chunk, content chunks and a finish chunk; then the usage chunk
    (when asked for) and [DONE]. With logprobs, each content chunk carries those of the tokens whose text
    it brings (a token whose text was held back, as part of a character or a possible stop string, goes
    with the chunk that brings that text; the finish chunk carries the rest, a stop token's, say)."""
    id, created, copies, model_id = fmt.completion_id(), fmt.now(), answer.copies, answer.backend.model_id

    def chunk(index: int, delta: dict[str, str], finish: str | None = None, entries: list | None = None) -> str:
        return _sse(fmt.chunk(id, created, model_id, index, delta, finish, include_usage, entries))

    try:
        for k, reader in enumerate(readers):
            indices = range(1) if answer.ranked else range(k * copies, (k + 1) * copies)
            for i in indices:
                yield chunk(i, {"role": "assistant", "content": ""})
            delta = first if k == 0 else await reader.next()
            sent = 0  # tokens whose logprobs went out
            while delta is not None:
                # the tokens this delta was read with, not those decoded since (their text comes later)
                entries = answer.entries(reader.handle.result, sent, reader.handle.tokens_read)
                sent += len(entries or ())
                for i in indices:
                    yield chunk(i, {"content": delta}, entries=entries)
                delta = await reader.next()
            entries = answer.entries(reader.handle.result, sent)  # a stop token's, say
            for i in indices:
                yield chunk(i, {}, reader.handle.result.finish_reason, entries)
        results = [r.handle.result for r in readers]
        if answer.ranked:  # the other best replies, known at the end: each in one chunk
            for i, other in enumerate(answer.choices(results[0])[1:], start=1):
                yield chunk(i, {"role": "assistant", "content": other.text}, entries=answer.entries(other))
                yield chunk(i, {}, other.finish_reason)
        if include_usage:
            yield _sse(fmt.usage_chunk(id, created, model_id, results[0].prompt_tokens,
                                       sum(len(g.token_ids) for r in results for g in answer.choices(r)),
                                       results[0].cached_tokens))
        yield "data: [DONE]\n\n"
    except Exception as err:  # noqa: BLE001 - a generation that failed after the stream began
        error = request_error(err, answer.tokens_field)
        yield _sse(error_body(error.message, error.type, error.param, error.code))
    finally:  # also when the client left: the task is cancelled at its await
        for reader in readers:
            reader.handle.cancel()  # changes nothing for a generation that ended
        answer.done(readers)
