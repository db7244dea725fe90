"""The FastAPI application: routes, limits, the API key, errors in OpenAI's shape, health and metrics.

    POST /v1/chat/completions       chat.py
    POST /v1/audio/transcriptions   transcription.py
    POST /v1/audio/translations     transcription.py
    GET  /v1/models, /v1/models/ID  the one model served
    GET  /health                    200 once the model is loaded; 503 (Retry-After) while loading or stopping
    GET  /metrics                   Prometheus text format (metrics.py)
    GET  /, /web/*                  the web page for voice chat and audio analysis (page.py; off with --no-web)

Every request first passes ``Guard``: outside /v1/ nothing is checked; under it, the API key (when one
is set), the server's phase (503 while loading or shutting down) and the body size (413: a declared
Content-Length at once, otherwise counted while the body is read). Every error, whoever raises it
(a route, validation, routing's 404 / 405), is answered in OpenAI's shape.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import chat, defaults, page, transcription
from .audio_input import WARNING_HEADER, AudioPolicy, answer_with_warnings
from .backend import Backend
from .errors import (AUTHENTICATION, CLIENT_CLOSED, INVALID_REQUEST, NOT_FOUND, SERVER_ERROR, APIError, error_body,
                     retry_later)
from .metrics import CONTENT_TYPE, Metrics
from .openai_format import model_list

MIB = 1024 * 1024
LOADING_RETRY_SECONDS = 10
CLOSE_WAIT_SECONDS = 5  # at exit, for the worker to stop (a prefill cannot be interrupted; it is a daemon)
STOPPING_RETRY_SECONDS = 5
API_PREFIX = "/v1/"
TRANSCRIPTIONS, TRANSLATIONS = "/v1/audio/transcriptions", "/v1/audio/translations"
ENDPOINTS = frozenset({chat.ENDPOINT, TRANSCRIPTIONS, TRANSLATIONS, "/v1/models", "/health", "/metrics"})
log = logging.getLogger("qwen2audio.serve")


@dataclass(frozen=True)
class Settings:
    """The server's limits and switches (the `serve` command's flags)."""

    audio: AudioPolicy
    api_key: str | None = None
    max_body_bytes: int = defaults.MAX_BODY_MB * MIB
    max_tokens: int = defaults.MAX_TOKENS  # the most new tokens a request may ask for, and the default
    cors_origins: tuple[str, ...] = ()
    web: bool = True  # the page at /
    # transcriptions: a repetitive window decoded at temperature 0 decoded again at rising temperatures; and
    # beam search over this many beams at temperature 0 unless the request says. None: the checkpoint's
    fallback: bool | None = None
    num_beams: int | None = None
    # transcriptions: the longest window, cut in a pause between speech; and also cut at every pause between
    # speech at least this long (seconds; 0: never). None: the checkpoint's (Qwen2Audio.transcription_defaults)
    chunk_seconds: float | None = None
    cut_at_pauses: float | None = None


@dataclass
class ServerState:
    """Which phase the server is in, and its backend once loaded."""

    LOADING, READY, STOPPING = "loading", "ready", "stopping"
    backend: Backend | None = None
    phase: str = LOADING
    created: int = field(default_factory=lambda: int(time.time()))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ready(self, backend: Backend) -> None:
        with self._lock:
            self.backend = backend
            if self.phase == self.LOADING:
                self.phase = self.READY

    def stop(self) -> None:
        """No new requests from now on; those in flight go on."""
        self.phase = self.STOPPING

    def close_backend(self, timeout: float | None = None) -> None:
        """End what is still waiting or running (it ends with finish_reason "abort")."""
        with self._lock:
            backend = self.backend
        if backend is not None:
            backend.close(timeout)


def create_app(state: ServerState, settings: Settings) -> FastAPI:
    metrics = Metrics(lambda: state.backend.queue_depth if state.backend else 0,
                      lambda: state.backend.running if state.backend else 0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.stop()
        state.close_backend(CLOSE_WAIT_SECONDS)

    app = FastAPI(title="qwen2audio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    _add_error_handlers(app)
    _add_routes(app, state, settings, metrics)
    if settings.web:
        page.add_routes(app, lambda: web_config(state, settings))
    app.add_middleware(Guard, state=state, settings=settings, metrics=metrics)
    if settings.cors_origins:  # outside Guard: preflight requests carry no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           # any request header: OpenAI's browser SDK sends X-Stainless-* and OpenAI-* ones
                           allow_headers=["*"], expose_headers=[WARNING_HEADER])
    return app


WEB_SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "num_beams")


def web_config(state: ServerState, settings: Settings) -> dict:
    """What the web page needs: the model's id, the limits, and the checkpoint's sampling defaults (top_k and
    top_p also where it decodes greedily: a temperature set on the page samples with them; None where the
    checkpoint has no such setting, e.g. no beams)."""
    backend = state.backend
    defaults = dict(backend.chat_defaults) if backend is not None else {}
    sampling = {name: defaults.get(name) for name in WEB_SAMPLING}
    sampling["max_tokens"] = min(defaults.get("max_new_tokens", settings.max_tokens), settings.max_tokens)
    return {"model": backend.model_id if backend is not None else "default",
            "max_audio_seconds": settings.audio.max_seconds, "max_body_bytes": settings.max_body_bytes,
            "max_tokens": settings.max_tokens, "api_key_required": settings.api_key is not None,
            "defaults": sampling}


def _arrived(request: Request) -> float:
    return request.scope.get("state", {}).get("arrived", time.monotonic())


def _add_routes(app: FastAPI, state: ServerState, settings: Settings, metrics: Metrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.phase == ServerState.READY:
            return JSONResponse({"status": "ok", "model": state.backend.model_id})
        retry = LOADING_RETRY_SECONDS if state.phase == ServerState.LOADING else STOPPING_RETRY_SECONDS
        return JSONResponse({"status": state.phase}, status_code=503, headers={"Retry-After": str(retry)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(model_list(state.backend.model_id, state.created))

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        chat.check_model(name, state.backend.model_id)
        return JSONResponse(model_list(state.backend.model_id, state.created)["data"][0])

    @app.post(chat.ENDPOINT)
    async def chat_completions(request: Request) -> Response:
        return await answer_with_warnings(chat.chat_completions(request, state.backend, settings.audio,
                                                                settings.max_tokens, metrics, _arrived(request)))

    @app.post(TRANSCRIPTIONS)
    async def transcriptions(request: Request) -> Response:
        return await answer_with_warnings(transcription.audio_endpoint(
            request, transcription.TRANSCRIBE, state.backend, settings.audio, settings.max_tokens, metrics,
            _arrived(request), TRANSCRIPTIONS, fallback=settings.fallback, num_beams=settings.num_beams,
            chunk_seconds=settings.chunk_seconds, cut_at_pauses=settings.cut_at_pauses))

    @app.post(TRANSLATIONS)
    async def translations(request: Request) -> Response:
        return await answer_with_warnings(transcription.audio_endpoint(
            request, transcription.TRANSLATE, state.backend, settings.audio, settings.max_tokens, metrics,
            _arrived(request), TRANSLATIONS, fallback=settings.fallback, num_beams=settings.num_beams,
            chunk_seconds=settings.chunk_seconds, cut_at_pauses=settings.cut_at_pauses))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        """Routing's 404 and 405, and Starlette's 400 for a malformed multipart body."""
        if err.status_code == 404:
            message, kind = f"there is nothing at {request.url.path} (see GET /v1/models)", NOT_FOUND
        elif err.status_code == 405:
            message, kind = f"{request.method} is not allowed on {request.url.path}", INVALID_REQUEST
        else:
            message, kind = str(err.detail), SERVER_ERROR if err.status_code >= 500 else INVALID_REQUEST
        return JSONResponse(error_body(message, kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> Response:
        return internal_error(err, request.method, request.url.path)


def internal_error(err: Exception, method: str | None, path: str) -> Response:
    """An error no handler expected: logged with its traceback, answered 500 without its details."""
    log.exception("unexpected error answering %s %s", method, path, exc_info=err)
    return JSONResponse(error_body(f"internal error ({type(err).__name__}); see the server's log", SERVER_ERROR),
                        status_code=500)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit / MIB:g} MB",
                         code="request_too_large")


class Guard:
    """ASGI middleware: API key, phase and body size for /v1/, and the request counters for all."""

    def __init__(self, app, state: ServerState, settings: Settings, metrics: Metrics):
        self.app, self.state, self.settings, self.metrics = app, state, settings, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        scope.setdefault("state", {})["arrived"] = arrived
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = CLIENT_CLOSED  # unless a response starts
        started = False

        async def send_status(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope) if path.startswith(API_PREFIX) else None
            if refusal is not None:
                await JSONResponse(refusal.body(), refusal.status, refusal.headers)(scope, receive, send_status)
            else:
                await self.app(scope, self._limited(receive) if path.startswith(API_PREFIX) else receive, send_status)
        except Exception as err:
            status = 500
            if started:
                raise
            # answered here, inside the CORS middleware (the app's own handler runs outside it): a browser
            # reads this body rather than an opaque network error
            await internal_error(err, scope.get("method"), path)(scope, receive, send)
        finally:
            self.metrics.requests.inc(endpoint, str(status))
            self.metrics.latency.observe(time.monotonic() - arrived, endpoint)

    def _refusal(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())):  # the
                # scheme's case does not matter (RFC 7235)
                what = "Incorrect API key provided" if given else "No API key provided"
                return APIError(401, f"{what}: send it as the header 'Authorization: Bearer KEY'", AUTHENTICATION,
                                code="invalid_api_key")
        if self.state.phase == ServerState.LOADING:
            return retry_later(503, "the model is still loading; retry shortly", "model_loading", LOADING_RETRY_SECONDS)
        if self.state.phase == ServerState.STOPPING:
            return retry_later(503, "the server is shutting down", "shutting_down", STOPPING_RETRY_SECONDS)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return BodyTooLarge(self.settings.max_body_bytes)
        return None

    def _limited(self, receive):
        """``receive`` that raises BodyTooLarge once the body passes the limit (bodies sent in chunks)."""
        limit, size = self.settings.max_body_bytes, 0

        async def limited():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited
