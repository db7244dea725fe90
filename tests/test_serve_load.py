"""benchmarks/serve_load.py: its core against the real server (tiny model, a few requests), and a client's
handling of 429 answers against a mock transport."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
MAX_TOKENS = 4


def load_script():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


serve_load = load_script()


def test_quick_run_against_the_tiny_model_counts_every_request_and_stops_the_server(tmp_path):
    from qwen2audio.default_model import tiny_model_dir

    spec = serve_load.LoadSpec(model=tiny_model_dir(), phases=serve_load.phases((2, 4, 6), warmup=1),
                               max_tokens=MAX_TOKENS, max_batch=2, max_queue=1, retries=1, threads=1,
                               request_timeout=60, deadline=240)
    report = serve_load.run_load(spec, tmp_path / "server.log")

    assert report.errors == [], (report.errors, (tmp_path / "server.log").read_text()[-2000:])
    assert [r.phase for r in report.results] == list(spec.phases)
    for r in report.results:
        assert len(r.outcomes) == r.phase.requests
        assert r.count(serve_load.OK) + r.count(serve_load.GAVE_UP) == r.phase.requests
        assert r.count(serve_load.OK) >= 1
        oks = [o for o in r.outcomes if o.status == serve_load.OK]
        assert all(1 <= o.tokens <= MAX_TOKENS and o.latency > 0 for o in oks)
        assert all(o.refusals == spec.retries + 1 for o in r.outcomes if o.status == serve_load.GAVE_UP)
        assert r.rss[0] > 0 and r.rss[1] >= max(r.rss[0], r.rss[2]) > 0
    one = report.measured(1)
    streamed = [o for o in one.outcomes if o.status == serve_load.OK and o.first_token is not None]
    assert len(streamed) == 1 and 0 < streamed[0].first_token <= streamed[0].latency  # request 1 of 2 streams
    with pytest.raises(ProcessLookupError):
        os.kill(report.server_pid, 0)  # stopped
    table = serve_load.table(report, "tiny")
    assert "| 64 concurrent | 64 | 6 |" in table and "8 concurrent clients vs one at a time" in table


def test_a_server_that_cannot_start_is_reported_not_waited_for(tmp_path):
    spec = serve_load.LoadSpec(model=tmp_path / "missing", phases=serve_load.phases((1, 1, 1)), deadline=120)
    with pytest.raises(serve_load.ServerFailed, match="exited with status 2"):
        serve_load.run_load(spec, tmp_path / "server.log")


def answers(*statuses: int):
    """A mock server answering the given statuses in turn (429s with Retry-After 0)."""
    queue = list(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        status = queue.pop(0)
        if status == 429:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "busy"}})
        if status == 200:
            return httpx.Response(200, json={"usage": {"completion_tokens": 3}})
        return httpx.Response(status, json={"error": {"message": "broken"}})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test")


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(serve_load, "RETRY_BACKOFF", 0.0)


def send_one(statuses: tuple[int, ...], retries: int = 2):
    spec = serve_load.LoadSpec(model=Path("unused"), retries=retries)
    body = serve_load.request_body(0, ["AAAA"], MAX_TOKENS)  # request 0: not streamed

    async def go():
        async with answers(*statuses) as client:
            return await serve_load.one_request(client, body, spec)

    return asyncio.run(go())


def test_a_client_retries_after_429_then_counts_its_answer(no_backoff):
    outcome = send_one((429, 429, 200))
    assert (outcome.status, outcome.refusals, outcome.tokens) == (serve_load.OK, 2, 3)


def test_a_client_gives_up_after_its_retries_and_that_is_not_an_error(no_backoff):
    outcome = send_one((429, 429, 429), retries=2)
    assert (outcome.status, outcome.refusals) == (serve_load.GAVE_UP, 3)


def test_any_other_status_is_an_error(no_backoff):
    outcome = send_one((429, 500))
    assert (outcome.status, outcome.refusals) == (serve_load.ERROR, 1)
    assert "HTTP 500" in outcome.error


def test_a_refused_client_backs_off_exponentially_but_never_less_than_retry_after():
    waits = [serve_load.retry_wait(k, retry_after=1.0) for k in range(1, 8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    assert serve_load.retry_wait(1, retry_after=5.0) == 5.0
