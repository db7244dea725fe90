"""`qwen2audio serve [MODEL_DIR]`: an OpenAI-compatible HTTP server (docs/serving.md).

The port opens at once; the model loads in the background (GET /health answers 503 until it is
ready). SIGINT or SIGTERM stops it gracefully: no new requests, those in flight may finish for
--shutdown-timeout seconds, then what still runs ends with finish_reason "abort" and every stream
is closed. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import socket
import sys
import threading
from pathlib import Path

from . import defaults
from ..errors import install_hint

API_KEY_ENV = "QWEN2AUDIO_API_KEY"
INSTALL_HINT = install_hint("serve")
SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}  # import: package
DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 serves the network (set an API key)
DEFAULT_PORT = 8000
CLOSE_MARGIN_SECONDS = 5.0  # after --shutdown-timeout, for the cancelled requests to send their last chunks
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def register(subparsers) -> None:
    """Adds `qwen2audio serve` (the registry hook of qwen2audio.cli)."""
    from ..cli import _model_args, add_cut_args

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; none: no check). "
                        "The environment variable keeps the key out of the process list")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's id in the API (default: the checkpoint directory's name)")
    p.add_argument("--max-body-mb", type=float, default=defaults.MAX_BODY_MB, metavar="MB",
                   help=f"largest request body, audio included (default {defaults.MAX_BODY_MB})")
    p.add_argument("--max-audio-seconds", type=float, default=defaults.MAX_AUDIO_SECONDS, metavar="S",
                   help=f"most seconds of audio in one request (default {defaults.MAX_AUDIO_SECONDS:g})")
    p.add_argument("--max-tokens", type=int, default=defaults.MAX_TOKENS, metavar="N",
                   help="most new tokens a request may ask for, and what it gets when it does not say (default "
                        f"{defaults.MAX_TOKENS}, or the checkpoint's max_new_tokens when smaller)")
    p.add_argument("--max-batch", type=int, default=defaults.MAX_BATCH, metavar="N",
                   help="requests decoded together in one batch; more wait in the queue (default "
                        f"{defaults.MAX_BATCH})")
    p.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE, metavar="N",
                   help=f"requests that may wait for the model; more are answered 429 (default {defaults.MAX_QUEUE})")
    p.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                   help="run every prompt whole: by default a request reuses the cached keys and values of the "
                        "prefix it shares with one that finished while others ran (the chat template's system "
                        "turn, a clip several questions are about); usage.prompt_tokens_details.cached_tokens "
                        "says how many")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; default: none)")
    p.add_argument("--allow-audio-url-host", action="append", default=[], metavar="HOST",
                   help="fetch audio_url http(s) URLs on HOST (a name, *.domain, an IP or a network such as "
                        "10.0.0.0/8; repeatable). Non-public addresses are reached only when listed")
    p.add_argument("--allow-local-audio", action="append", default=[], metavar="DIR",
                   help="read audio_url paths and file:// URLs inside DIR (repeatable)")
    p.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="transcriptions and translations: decode a repetitive window decoded at temperature 0 "
                        "again at rising temperatures (Whisper's guard against loops); default: the checkpoint's "
                        "(the demo model: on), else off")
    p.add_argument("--num-beams", type=int, default=None, metavar="N",
                   help="transcriptions and translations at temperature 0: decode each window by beam search over "
                        "N beams (default: the checkpoint's, at most --max-batch (the demo model: 4), else 1: "
                        "greedy; a request's num_beams field overrides it). The beams take N of the --max-batch "
                        "slots")
    add_cut_args(p, "transcriptions and translations: ", "windows of at most S, each answered on its own as one "
                 "segment", note="; a request's chunking_strategy overrides it")
    p.add_argument("--no-web", dest="web", action="store_false",
                   help="serve the API only, not the web page at / (voice chat and audio analysis in a browser)")
    p.add_argument("--shutdown-timeout", type=float, default=defaults.SHUTDOWN_SECONDS, metavar="S",
                   help="on SIGINT/SIGTERM, how long requests in flight may go on (default "
                        f"{defaults.SHUTDOWN_SECONDS:g})")
    p.set_defaults(handler=run)


def require_serve_extra() -> None:
    missing = [package for module, package in SERVE_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"qwen2audio serve needs {', '.join(missing)}, which is not installed; install the serve "
                         f"extra: {INSTALL_HINT}")


def check_limits(args: argparse.Namespace) -> None:
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--max-audio-seconds", args.max_audio_seconds),
                        ("--max-tokens", args.max_tokens), ("--max-batch", args.max_batch),
                        ("--max-queue", args.max_queue)):
        if not value > 0:
            raise ValueError(f"{flag} must be more than 0, got {value:g}")
    if args.num_beams is not None and not 1 <= args.num_beams <= args.max_batch:
        raise ValueError(f"--num-beams must be between 1 and --max-batch ({args.max_batch}: each beam takes one of "
                         f"its slots), got {args.num_beams}")
    from ..cli import check_cut_args

    check_cut_args(args)
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout:g}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use is one clear line, not a log after start-up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: {err.strerror}: not an address or a name this machine resolves; use "
                         "127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its own addresses") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        fix = ("--host must be an address of this machine (127.0.0.1, 0.0.0.0 for every interface, or one of "
               "its own)" if err.errno == errno.EADDRNOTAVAIL else "choose another --port")
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; {fix}") from None
    sock.listen(socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock


def model_id(args: argparse.Namespace) -> str:
    """--served-model-name, else the adapter folder's name (the adapted model is not its base), else the
    checkpoint folder's, else the default model's."""
    if args.served_model_name:
        return args.served_model_name
    if args.adapter:
        return Path(args.adapter).resolve().name
    if args.model_dir:
        return Path(args.model_dir).resolve().name
    from ..default_model import default_model_name

    return Path(default_model_name()).name


def settings_from(args: argparse.Namespace):
    from .app import MIB, Settings
    from .audio_input import AudioPolicy, allowed_folders
    from .download import UrlPolicy

    audio = AudioPolicy(max_bytes=int(args.max_body_mb * MIB), max_seconds=args.max_audio_seconds,
                        urls=UrlPolicy.parse(args.allow_audio_url_host),
                        local_dirs=allowed_folders(args.allow_local_audio))
    return Settings(audio=audio, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                    max_body_bytes=audio.max_bytes, max_tokens=args.max_tokens,
                    cors_origins=tuple(args.cors_origin), web=args.web, fallback=args.fallback,
                    num_beams=args.num_beams, chunk_seconds=args.chunk_seconds,
                    cut_at_pauses=args.cut_at_pauses)


def run(args: argparse.Namespace) -> int:
    from ..cli import EXIT_USAGE, _check_device, _check_model_dir

    require_serve_extra()
    check_limits(args)
    _check_model_dir(args)
    _check_device(args.device, args.quantize)
    settings = settings_from(args)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]

    from .app import ServerState, create_app

    state = ServerState()
    server = graceful_server(create_app(state, settings), state, args.shutdown_timeout)
    name = model_id(args)
    failed: list[BaseException] = []
    loader = threading.Thread(target=load_backend, args=(args, name, state, server, failed), daemon=True)
    if settings.api_key is None and args.host not in LOOPBACK_HOSTS:
        print(f"qwen2audio: warning: serving {args.host} without an API key: anyone who can reach it may use it "
              f"(set ${API_KEY_ENV})", file=sys.stderr)
    base = f"http://{_url_host(host)}:{port}"
    print(f"qwen2audio: serving {name} on {base}/v1 (loading the model; GET /health answers 200 once it is ready)",
          file=sys.stderr, flush=True)
    if settings.web:
        print(f"qwen2audio: web page on {base}/", file=sys.stderr, flush=True)
    loader.start()
    server.run(sockets=[sock])
    if failed:
        print(f"qwen2audio: error: {failed[0]}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def load_backend(args: argparse.Namespace, name: str, state, server, failed: list) -> None:
    """Load the model (in a thread, while the port already answers 503), then open the API; a model
    that cannot be loaded stops the server."""
    from ..api import Qwen2Audio
    from .backend import SchedulerBackend

    try:
        directory = args.model_dir
        if directory is None:  # said here, not as Qwen2Audio.load's warning
            from ..default_model import default_model_dir, default_notice

            print(f"qwen2audio: {default_notice()}", file=sys.stderr)
            directory = default_model_dir()
        model = Qwen2Audio.load(directory, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                compile=args.compile, adapter=args.adapter)
        state.ready(SchedulerBackend(model, name, max_batch=args.max_batch, max_queue=args.max_queue,
                                     reuse_prefixes=args.prefix_reuse))
        print(f"qwen2audio: {name} is ready", file=sys.stderr, flush=True)
    except Exception as err:  # noqa: BLE001 - reported by run() as one line, after the server stopped
        failed.append(err)
        server.should_exit = True


def graceful_server(app, state, shutdown_timeout: float):
    """A uvicorn server whose first SIGINT/SIGTERM closes the API to new requests and, after
    ``shutdown_timeout`` seconds, ends the requests still in flight."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                begin_shutdown(state, shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=shutdown_timeout + CLOSE_MARGIN_SECONDS,
                            lifespan="on")
    return GracefulServer(config)


def begin_shutdown(state, shutdown_timeout: float) -> threading.Timer:
    state.stop()
    timer = threading.Timer(shutdown_timeout, state.close_backend)
    timer.daemon = True
    timer.start()
    return timer
