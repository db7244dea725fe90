"""Load test of `qwen2audio serve` over loopback: the real server in a subprocess, many clients at once.

    python benchmarks/serve_load.py [--model DIR | --size small|medium] [--max-tokens 32] [--quick]
                                    [--clips 4] [--no-prefix-reuse]

The script starts `python -m qwen2audio.cli serve MODEL --port 0` (waits for GET /health), drives it
with concurrent asyncio + httpx clients, and stops it at the end, whatever happened (SIGTERM, then
SIGKILL). Default model: the tiny random one (qwen2audio.default_model); --model takes a checkpoint
directory; --size writes a random checkpoint of benchmarks/bench_inference.py's sizes to a temporary
directory (removed after).

Every request is a chat completion with a 2 s wav clip (input_audio, base64; one of --clips different
clips, default 4, so that several questions are about the same clip) and a question, greedy,
--max-tokens new tokens at most; every second one is streamed (SSE, usage included). The server has no
way to ignore stop tokens, so tokens are what the server reports in `usage.completion_tokens`.
Phases, in one run:
- warm-up: a few requests one at a time (not counted in the ratio);
- one at a time: sequential requests, the baseline;
- 8 concurrent clients;
- 64 concurrent clients, with --max-queue small enough that some requests are answered 429: a client
  waits (Retry-After, or longer: exponential backoff) and tries again, at most --retries times, then
  gives up.
Every answer other than 200 and 429 is an error, and so is a request without an answer within
--request-timeout or still open at the overall --deadline.

Per phase: requests ok / 429 answers / given up / errors, completion tokens/s of the phase (all ok
requests' tokens over its wall time), latency p50/p95 (a request's first attempt to its last byte, retries
included), time to first token p50/p95 (streamed requests: first attempt to the first content chunk),
the server's resident memory (RSS) at the phase's start, its peak and its end, and the CPU seconds
the server and the clients spent (tokens per server CPU second is the measure to compare when other
processes hold the cores: it counts work, not waiting). Printed as a markdown table, with the ratio
of 8 concurrent clients' tokens/s to one at a time's, and the share of prompt tokens the server's cache
held already (`usage.prompt_tokens_details.cached_tokens`: prefix reuse, which --no-prefix-reuse turns off
in the server). Exit status 1 when anything went wrong other than the intended 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
N_CLIPS = 4  # different clips, so that requests differ in audio as well as in question
QUESTIONS = ["What is it?", "Describe the sound.", "Is anyone speaking?", "Where could this be recorded?",
             "What happens first?", "How loud is it?", "Is it music or speech, and why do you think so?", "Mood?"]
STREAM_EVERY = 2  # request i is streamed when i % STREAM_EVERY == 1: half of them

OK, GAVE_UP, ERROR = "ok", "gave up", "error"
RETRIES = 5  # retries after a 429 before a client gives up
# After its k-th 429 a client waits the larger of Retry-After and RETRY_BACKOFF * 2**(k-1) seconds (at most
# RETRY_WAIT_CAP), as OpenAI's client backs off: with Retry-After alone (1 s), clients beyond the queue's
# room would spend their retries within seconds and give up almost every request of the phase.
RETRY_BACKOFF = 1.0
RETRY_WAIT_CAP = 16.0
# Below uvicorn's keep-alive timeout (5 s): a connection idle for longer may be closed by the server just
# as the client sends on it (a ReadError that says nothing about the server); the client opens a new one.
KEEPALIVE_EXPIRY = 1.0
REQUEST_TIMEOUT = 300.0  # seconds from a request's first attempt to its last byte, retries included
DEADLINE = 3600.0  # seconds for the whole run, the server's start and model load included
START_TIMEOUT = 600.0  # seconds for the server to answer GET /health with 200 (a large model loads slowly)
SERVER_SHUTDOWN = 2  # the server's --shutdown-timeout: requests still open at the end need not finish
STOP_TIMEOUT = 30.0  # seconds after SIGTERM before SIGKILL
POLL_SECONDS = 0.2  # the server's log and /health while starting; its RSS while the load runs
LISTENING = re.compile(r"serving \S+ on (http://\S+)/v1")  # the server's first line (cli.py)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Phase:
    name: str
    clients: int
    requests: int


def phases(requests: tuple[int, int, int], warmup: int = 2) -> tuple[Phase, ...]:
    """Warm-up, one at a time, 8 concurrent clients, 64 concurrent clients; ``requests`` per measured phase."""
    return (Phase("warm-up", 1, warmup), Phase("one at a time", 1, requests[0]),
            Phase("8 concurrent", 8, requests[1]), Phase("64 concurrent", 64, requests[2]))


DEFAULT_REQUESTS = (16, 64, 192)
QUICK_REQUESTS = (2, 8, 16)


@dataclass(frozen=True)
class LoadSpec:
    """What to run: the model, the phases, the server's limits and the clients' patience."""

    model: Path
    phases: tuple[Phase, ...] = phases(DEFAULT_REQUESTS)
    max_tokens: int = 32
    max_batch: int = 8
    max_queue: int = 16
    threads: int | None = None  # the server's torch threads (OMP_NUM_THREADS); None: torch's default
    dtype: str = "auto"  # the server's --dtype
    retries: int = RETRIES
    request_timeout: float = REQUEST_TIMEOUT
    deadline: float = DEADLINE
    clips: int = N_CLIPS  # different clips the requests take in turn
    prefix_reuse: bool = True  # the server's default; False passes --no-prefix-reuse


@dataclass
class Outcome:
    """One request: ok, gave up (429 after the retries) or error."""

    status: str
    refusals: int = 0  # 429 answers it got
    latency: float | None = None
    first_token: float | None = None  # streamed requests only
    tokens: int = 0
    error: str = ""
    prompt: int = 0  # prompt tokens, and of them those the server's cache held already
    cached: int = 0


@dataclass
class PhaseResult:
    phase: Phase
    outcomes: list[Outcome]
    seconds: float
    rss: tuple[int, int, int]  # bytes: at the start, the peak, at the end
    cpu: tuple[float, float] = (0.0, 0.0)  # CPU seconds (user + system) of the server and of the clients

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def refusals(self) -> int:
        return sum(o.refusals for o in self.outcomes)

    @property
    def tokens_per_s(self) -> float:
        return sum(o.tokens for o in self.outcomes if o.status == OK) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_server_cpu_s(self) -> float:
        """Tokens per CPU second the server spent: less at the mercy of other processes than tokens/s."""
        return sum(o.tokens for o in self.outcomes if o.status == OK) / self.cpu[0] if self.cpu[0] else 0.0

    @property
    def cached_share(self) -> float:
        """Of the ok requests' prompt tokens, the share the server did not run (its cache held them)."""
        prompt = sum(o.prompt for o in self.outcomes if o.status == OK)
        return sum(o.cached for o in self.outcomes if o.status == OK) / prompt if prompt else 0.0

    def latencies(self) -> list[float]:
        return [o.latency for o in self.outcomes if o.status == OK]

    def first_tokens(self) -> list[float]:
        return [o.first_token for o in self.outcomes if o.status == OK and o.first_token is not None]


@dataclass
class Report:
    spec: LoadSpec
    results: list[PhaseResult] = field(default_factory=list)  # the warm-up first
    rss_loaded: int = 0  # bytes, once /health answered, before any request
    server_pid: int | None = None

    @property
    def errors(self) -> list[str]:
        return [o.error for r in self.results for o in r.outcomes if o.status == ERROR]

    def measured(self, clients: int) -> PhaseResult | None:
        return next((r for r in self.results[1:] if r.phase.clients == clients), None)

    def concurrency_gain(self, measure: str = "tokens_per_s") -> float | None:
        """8 concurrent clients' tokens/s (or another PhaseResult measure) over one at a time's."""
        one, eight = self.measured(1), self.measured(8)
        if one is None or eight is None or not getattr(one, measure):
            return None
        return getattr(eight, measure) / getattr(one, measure)


# -- requests -----------------------------------------------------------------------------------------------
def clip_wav(seed: int, seconds: float = CLIP_SECONDS) -> bytes:
    """A 16 kHz mono 16-bit wav: a modulated tone with a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave_ = (0.3 * np.sin(2 * np.pi * (220 + 55 * seed) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
             + 0.02 * rng.standard_normal(t.size))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(wave_, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def request_body(i: int, clips: list[str], max_tokens: int) -> dict:
    """Request i: clip i % N_CLIPS, question i % len(QUESTIONS), streamed when i % STREAM_EVERY == 1."""
    stream = i % STREAM_EVERY == 1
    body = {"model": "default", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": clips[i % len(clips)], "format": "wav"}},
                {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Answer:
    """One attempt's answer."""

    status: int
    tokens: int = 0
    prompt: int = 0
    cached: int = 0
    first_token_at: float | None = None  # time.perf_counter() of the first content chunk
    retry_after: float = 0.0
    error: str = ""


async def send(client: httpx.AsyncClient, body: dict) -> Answer:
    if body["stream"]:
        return await _send_streamed(client, body)
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        return _refused(r.status_code, r.headers, r.text)
    return Answer(200, **_usage(r.json()["usage"]))


def _usage(usage: dict) -> dict:
    return {"tokens": usage["completion_tokens"], "prompt": usage.get("prompt_tokens", 0),
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


async def _send_streamed(client: httpx.AsyncClient, body: dict) -> Answer:
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return _refused(r.status_code, r.headers, (await r.aread()).decode(errors="replace"))
        first, usage = None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: "):])
            if "error" in event:  # an error after the stream began
                return Answer(200, error=f"error event in the stream: {event['error'].get('message')}")
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter()
            if event.get("usage"):
                usage = _usage(event["usage"])
    if usage is None:
        return Answer(200, error="the stream ended without its usage chunk")
    return Answer(200, first_token_at=first, **usage)


def _refused(status: int, headers: httpx.Headers, text: str) -> Answer:
    try:
        retry_after = float(headers.get("retry-after", 0))
    except ValueError:
        retry_after = 0.0
    return Answer(status, retry_after=retry_after, error=f"HTTP {status}: {text[:200]}")


async def one_request(client: httpx.AsyncClient, body: dict, spec: LoadSpec) -> Outcome:
    """Send until an answer other than 429 (at most spec.retries retries, each after retry_wait)."""
    started, refusals = time.perf_counter(), 0
    try:
        async with asyncio.timeout(spec.request_timeout):
            while True:
                answer = await send(client, body)
                if answer.status != 429:
                    break
                refusals += 1
                if refusals > spec.retries:
                    return Outcome(GAVE_UP, refusals)
                await asyncio.sleep(retry_wait(refusals, answer.retry_after))
    except TimeoutError:
        return Outcome(ERROR, refusals, error=f"no answer within {spec.request_timeout:g} s")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
        return Outcome(ERROR, refusals, error=f"{type(err).__name__}: {err or 'no message'}")
    if answer.status != 200 or answer.error:
        return Outcome(ERROR, refusals, error=answer.error)
    first = None if answer.first_token_at is None else answer.first_token_at - started
    return Outcome(OK, refusals, time.perf_counter() - started, first, answer.tokens, prompt=answer.prompt,
                   cached=answer.cached)


def retry_wait(refusals: int, retry_after: float) -> float:
    """Seconds to wait after the ``refusals``-th 429 in a row."""
    return min(max(retry_after, RETRY_BACKOFF * 2 ** (refusals - 1)), RETRY_WAIT_CAP)


# -- the server ---------------------------------------------------------------------------------------------
class ServerFailed(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when this script dies, even by SIGKILL, so that no server
    outlives its load test."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def server(spec: LoadSpec, log_path: Path, started: float) -> Iterator[tuple[str, int]]:
    """`qwen2audio serve` on a free loopback port, its output in ``log_path``; yields (base URL, pid)
    once GET /health answers 200; stopped on the way out, whatever happened."""
    cmd = [sys.executable, "-m", "qwen2audio.cli", "serve", str(spec.model), "--port", "0",
           "--max-tokens", str(spec.max_tokens), "--max-batch", str(spec.max_batch),
           "--max-queue", str(spec.max_queue), "--shutdown-timeout", str(SERVER_SHUTDOWN), "--dtype", spec.dtype]
    if not spec.prefix_reuse:
        cmd.append("--no-prefix-reuse")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        url = _wait_ready(proc, log_path, min(START_TIMEOUT, spec.deadline - (time.perf_counter() - started)))
        yield url, proc.pid
    finally:
        stop(proc)


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    end, url = time.perf_counter() + timeout, None
    while time.perf_counter() < end:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with status {proc.returncode}:\n{_tail(log_path)}")
        if url is None:
            found = LISTENING.search(log_path.read_text(errors="replace"))
            url = found.group(1) if found else None
        if url is not None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
        time.sleep(POLL_SECONDS)
    raise ServerFailed(f"the server was not ready within {timeout:.0f} s:\n{_tail(log_path)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat; 0 without /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5), counted after the name
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """The process's resident memory (psutil where installed, else /proc/PID/status); 0 once it is gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    try:
        if psutil is not None:
            return psutil.Process(pid).memory_info().rss
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except Exception:  # noqa: BLE001 - a process that ended, or a system without /proc
        pass
    return 0


class RssWatch:
    """The server's RSS, sampled every POLL_SECONDS; ``peak`` since the last ``restart``."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0

    def restart(self) -> int:
        self.peak = rss_bytes(self.pid)
        return self.peak

    def now(self) -> int:
        value = rss_bytes(self.pid)
        self.peak = max(self.peak, value)
        return value

    async def run(self) -> None:
        while True:
            self.now()
            await asyncio.sleep(POLL_SECONDS)


# -- the load -----------------------------------------------------------------------------------------------
async def run_phase(client: httpx.AsyncClient, phase: Phase, bodies: list[dict], spec: LoadSpec, rss: RssWatch,
                    time_left: float) -> PhaseResult:
    """``phase.requests`` requests by ``phase.clients`` clients, each sending its next one when its last
    is answered; requests still open after ``time_left`` seconds are errors."""
    outcomes: list[Outcome | None] = [None] * phase.requests
    todo = iter(range(phase.requests))

    async def client_loop() -> None:
        for i in todo:  # shared by the clients: each takes the next request
            outcomes[i] = await one_request(client, bodies[i % len(bodies)], spec)

    start_rss, t0 = rss.restart(), time.perf_counter()
    cpu0 = cpu_seconds(rss.pid), time.process_time()
    tasks = [asyncio.create_task(client_loop()) for _ in range(min(phase.clients, phase.requests))]
    _, late = await asyncio.wait(tasks, timeout=max(time_left, 0.0)) if tasks else (None, set())
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(rss.pid) - cpu0[0], time.process_time() - cpu0[1]
    done = [o or Outcome(ERROR, error=f"still open at the overall deadline ({spec.deadline:g} s)") for o in outcomes]
    end_rss = rss.now()  # before reading the peak, which it may raise
    return PhaseResult(phase, done, seconds, (start_rss, rss.peak, end_rss), cpu)


async def drive(url: str, pid: int, spec: LoadSpec, report: Report, started: float) -> None:
    clips = [base64.b64encode(clip_wav(seed)).decode() for seed in range(spec.clips)]
    most = max(p.requests for p in spec.phases)
    bodies = [request_body(i, clips, spec.max_tokens) for i in range(min(most, spec.clips * len(QUESTIONS)))]
    rss = RssWatch(pid)
    report.rss_loaded = rss.restart()
    watcher = asyncio.create_task(rss.run())
    biggest = max(p.clients for p in spec.phases)
    limits = httpx.Limits(max_connections=biggest, max_keepalive_connections=biggest, keepalive_expiry=KEEPALIVE_EXPIRY)
    try:
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=spec.request_timeout) as client:
            for phase in spec.phases:
                time_left = spec.deadline - (time.perf_counter() - started)
                report.results.append(await run_phase(client, phase, bodies, spec, rss, time_left))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def run_load(spec: LoadSpec, log_path: Path | None = None) -> Report:
    """Start the server, run the phases, stop the server: the report (its errors included; a server that
    does not start raises ServerFailed)."""
    started = time.perf_counter()
    report = Report(spec)
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-"))) / "server.log"
        url, pid = stack.enter_context(server(spec, log_path, started))
        report.server_pid = pid
        asyncio.run(drive(url, pid, spec, report, started))
    return report


# -- the table ----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _pair(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f}"


def table(report: Report, model_label: str) -> str:
    spec = report.spec
    threads = spec.threads or _default_threads()
    lines = [f"**serve load | {model_label} | --dtype {spec.dtype} | torch {_torch_version()} | {threads} threads | "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | max_tokens {spec.max_tokens}, "
             f"greedy, half streamed | {spec.clips} clips | --max-batch {spec.max_batch} --max-queue {spec.max_queue}"
             f"{'' if spec.prefix_reuse else ' --no-prefix-reuse'} | "
             f"RSS after load {report.rss_loaded / MIB:.0f} MiB**", "",
             "| phase | clients | requests | ok | 429 answers | gave up | errors | wall (s) | tokens/s "
             "| latency p50 / p95 (s) | TTFT p50 / p95 (s) | RSS start / peak / end (MiB) "
             "| CPU s server / clients | tokens per server CPU s | prompt tokens cached |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        lines.append(f"| {r.phase.name} | {r.phase.clients} | {r.phase.requests} | {r.count(OK)} | {r.refusals} | "
                     f"{r.count(GAVE_UP)} | {r.count(ERROR)} | {r.seconds:.1f} | {r.tokens_per_s:.1f} | "
                     f"{_pair(r.latencies())} | {_pair(r.first_tokens())} | "
                     + " / ".join(f"{b / MIB:.0f}" for b in r.rss)
                     + f" | {r.cpu[0]:.1f} / {r.cpu[1]:.1f} | {r.tokens_per_server_cpu_s:.1f} | {r.cached_share:.0%} |")
    lines.append("")
    gain, work = report.concurrency_gain(), report.concurrency_gain("tokens_per_server_cpu_s")
    if gain is not None:
        lines.append(f"8 concurrent clients vs one at a time, aggregate tokens/s: {gain:.2f}x (target >= 3x); "
                     f"tokens per server CPU second: " + (f"{work:.2f}x" if work is not None else "-"))
    warm, crowd = (report.results[0] if report.results else None), report.measured(64)
    if warm is not None and crowd is not None and warm.rss[2]:
        change = (crowd.rss[2] - warm.rss[2]) / warm.rss[2]
        lines.append(f"RSS after the 64-client phase vs after warm-up: {crowd.rss[2] / MIB:.0f} MiB vs "
                     f"{warm.rss[2] / MIB:.0f} MiB ({change:+.1%})")
    return "\n".join(lines)


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "?"


def _default_threads() -> int:
    import torch  # what the server's torch starts with when OMP_NUM_THREADS is not set

    return torch.get_num_threads()


# -- the model ----------------------------------------------------------------------------------------------
def write_sized_model(size: str, directory: Path) -> None:
    """A random checkpoint of bench_inference.py's --size (transformers writes it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_inference import build_reference

    from qwen2audio.text import build_byte_level_tokenizer

    tokenizer = build_byte_level_tokenizer()
    build_reference(size, tokenizer).save_pretrained(directory)
    tokenizer.save(directory)


def _weights_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the tiny random model)")
    which.add_argument("--size", choices=["small", "medium"], default=None,
                       help="a random checkpoint of bench_inference.py's size, written to a temporary directory")
    ap.add_argument("--quick", action="store_true", help=f"few requests per phase ({QUICK_REQUESTS}): a smoke test")
    ap.add_argument("--requests", default=None, metavar="A,B,C",
                    help="requests of the phases one at a time, 8 and 64 concurrent (default "
                         f"{','.join(map(str, DEFAULT_REQUESTS))})")
    ap.add_argument("--max-tokens", type=int, default=LoadSpec.max_tokens, help="new tokens per request, at most")
    ap.add_argument("--max-batch", type=int, default=LoadSpec.max_batch, help="the server's --max-batch")
    ap.add_argument("--clips", type=int, default=N_CLIPS,
                    help="different clips the requests take in turn (default %(default)s; as many as the requests: "
                         "no two requests about one clip)")
    ap.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                    help="start the server with --no-prefix-reuse (every prompt run whole)")
    ap.add_argument("--max-queue", type=int, default=LoadSpec.max_queue,
                    help="the server's --max-queue (below 64 - max-batch, some of 64 clients are answered 429)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    ap.add_argument("--dtype", default=LoadSpec.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                    help="the server's --dtype (default %(default)s: as the checkpoint stores its weights)")
    ap.add_argument("--retries", type=int, default=RETRIES, help="retries after a 429, per request")
    ap.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT, metavar="S")
    ap.add_argument("--deadline", type=float, default=DEADLINE, metavar="S", help="for the whole run")
    ap.add_argument("--server-log", type=Path, default=None, help="keep the server's output in this file")
    args = ap.parse_args(argv)
    try:
        counts = QUICK_REQUESTS if args.quick else _counts(args.requests) if args.requests else DEFAULT_REQUESTS
    except ValueError as err:
        ap.error(str(err))
    if args.clips < 1:
        ap.error(f"--clips must be at least 1, got {args.clips}")

    with contextlib.ExitStack() as stack:
        if args.size:
            model = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"serve-load-{args.size}-")))
            print(f"writing a random {args.size} checkpoint to {model}", file=sys.stderr, flush=True)
            write_sized_model(args.size, model)
            label = f"random size {args.size} ({_weights_mb(model):.0f} MB of weights)"
        elif args.model:
            model, label = args.model, str(args.model)
        else:
            from qwen2audio.default_model import tiny_model_dir

            model = tiny_model_dir()
            label = f"tiny random model ({_weights_mb(model):.1f} MB of weights)"
        spec = LoadSpec(model=model, phases=phases(counts), max_tokens=args.max_tokens, max_batch=args.max_batch,
                        max_queue=args.max_queue, threads=args.threads, dtype=args.dtype, retries=args.retries,
                        request_timeout=args.request_timeout, deadline=args.deadline, clips=args.clips,
                        prefix_reuse=args.prefix_reuse)
        try:
            report = run_load(spec, args.server_log)
        except ServerFailed as err:
            print(f"serve_load: error: {err}", file=sys.stderr)
            return 1
    print("\n" + table(report, label))
    errors = report.errors
    if errors:
        print(f"\nserve_load: {len(errors)} error(s); first ones:", file=sys.stderr)
        for message in sorted(set(errors))[:5]:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


def _counts(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--requests takes three positive counts, A,B,C; got {text!r}")
    return tuple(int(p) for p in parts)


if __name__ == "__main__":
    sys.exit(main())
