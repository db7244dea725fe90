"""The server's metrics in Prometheus' text exposition format (version 0.0.4), for GET /metrics.

Written here rather than with prometheus_client: five metric families do not justify a dependency,
and the format is small (https://prometheus.io/docs/instrumenting/exposition_formats/):

    # HELP name what it measures
    # TYPE name counter|gauge|histogram
    name{label="value"} 1.0
    name_bucket{le="0.5"} 3        (histograms: cumulative counts per upper bound, then +Inf)
    name_sum 1.25
    name_count 3
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "qwen2audio_"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # seconds
TOKEN_RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)  # tokens per second


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = PREFIX + name, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        for labels, value in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Gauge:
    """A value read when /metrics is scraped (the backend's queue depth, its running requests)."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = PREFIX + name, help, read

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_number(self.read())}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = PREFIX + name, help, labels
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list[float]] = {}  # per bucket counts, then sum
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0.0] * (len(self.bounds) + 1))
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    series[i] += 1
            series[-1] += value

    def count(self, *labels: str) -> int:
        series = self._series.get(labels)
        return int(series[-2]) if series else 0

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            for bound, n in zip(self.bounds, series):
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {_number(n)}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(series[-1])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {_number(series[-2])}"


class Metrics:
    """Everything /metrics shows. ``queue_depth`` and ``running`` read the backend when scraped."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]):
        self.requests = Counter("requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.latency = Histogram("request_duration_seconds", "Time from a request's arrival to the end of its "
                                 "answer (the whole stream for streamed answers).", LATENCY_BUCKETS, ("endpoint",))
        self.first_token = Histogram("time_to_first_token_seconds", "Time from a generation request's arrival to "
                                     "its first text.", LATENCY_BUCKETS, ("endpoint",))
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens (audio included) of finished generations.")
        self.generated_tokens = Counter("generated_tokens_total", "Tokens generated, stop tokens included.")
        self.token_rate = Histogram("generation_tokens_per_second", "Decoding speed of each generation after its "
                                    "first token.", TOKEN_RATE_BUCKETS)
        self.cancelled = Counter("cancelled_generations_total", "Generations stopped early: the client left, or "
                                 "the server shut down.")
        self.queue_depth = Gauge("queue_depth", "Requests waiting for a place in the running batch.", queue_depth)
        self.running = Gauge("running_requests", "Requests in the running batch (prefilling or decoding together).",
                             running)
        self._families = (self.requests, self.latency, self.first_token, self.prompt_tokens, self.generated_tokens,
                          self.token_rate, self.cancelled, self.queue_depth, self.running)

    def generation_done(self, prompt_tokens: int, generated: int, first_token_at: float | None, ended_at: float,
                        cancelled: bool) -> None:
        self.prompt_tokens.inc(amount=prompt_tokens)
        self.generated_tokens.inc(amount=generated)
        if cancelled:
            self.cancelled.inc()
        if first_token_at is not None and generated > 1 and ended_at > first_token_at:
            self.token_rate.observe((generated - 1) / (ended_at - first_token_at))

    def render(self) -> str:
        return "\n".join(line for family in self._families for line in family.lines()) + "\n"
