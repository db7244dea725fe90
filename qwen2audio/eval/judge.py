"""A judge LLM behind any OpenAI-compatible endpoint, with retries and an on-disk answer cache.

    judge = Judge(url="https://api.openai.com/v1", model="gpt-4-0125-preview", key=..., cache=out / "judge_cache.jsonl")
    text = judge.ask("...")   # cached by a hash of the request: asking again costs nothing

URL, model and key come from the options or the environment: QWEN2AUDIO_JUDGE_URL, QWEN2AUDIO_JUDGE_MODEL,
QWEN2AUDIO_JUDGE_API_KEY (or OPENAI_API_KEY). Only an explicit judge URL turns judging on: an OPENAI_BASE_URL
set for other tools does not (every verdict is a paid request). Plain urllib: one POST per call.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_MODEL = "gpt-4-0125-preview"  # AIR-Bench's judge
DEFAULT_MAX_TOKENS = 1024  # AIR-Bench's setting
RETRIES = 3  # AIR-Bench's MAX_API_RETRY
RETRY_SLEEP_S = 2.0  # doubled after each failed try
TIMEOUT_S = 120
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge could not be reached or answered with something that is not a chat completion."""


def judge_settings(url: str | None, model: str | None, key: str | None) -> tuple[str | None, str, str | None]:
    url = url or os.environ.get("QWEN2AUDIO_JUDGE_URL")
    model = model or os.environ.get("QWEN2AUDIO_JUDGE_MODEL") or DEFAULT_MODEL
    key = key or os.environ.get("QWEN2AUDIO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return url, model, key


def completions_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class Judge:
    def __init__(self, url: str, model: str = DEFAULT_MODEL, key: str | None = None, cache: Path | None = None,
                 temperature: float = 0.0, max_tokens: int = DEFAULT_MAX_TOKENS, retries: int = RETRIES,
                 retry_sleep_s: float = RETRY_SLEEP_S, timeout_s: float = TIMEOUT_S):
        self.url = completions_url(url)
        self.model, self.key = model, key
        self.temperature, self.max_tokens = temperature, max_tokens
        self.retries, self.retry_sleep_s, self.timeout_s = retries, retry_sleep_s, timeout_s
        self.cache_path = cache
        self._lock = threading.Lock()
        self._cache: dict[str, str] = _read_cache(cache) if cache else {}
        self.calls = 0  # requests actually sent (cache misses)

    def request(self, content: str) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def ask(self, content: str) -> str:
        body = self.request(content)
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        answer = self._post(body)
        with self._lock:
            self._cache[key] = answer
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
        return answer

    def _post(self, body: dict) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        error = "no attempt"
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.retry_sleep_s * 2 ** (attempt - 1))
            with self._lock:
                self.calls += 1
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers), timeout=self.timeout_s) as r:
                    reply = json.loads(r.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code}: {err.read()[:200]!r}"
                if err.code not in RETRYABLE_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                error = f"cannot reach it: {err!r}"  # HTTPException: a reply cut short (IncompleteRead), ...
            except (ValueError, KeyError, IndexError, TypeError) as err:
                error = f"not a chat completion: {err!r}"
        raise JudgeError(f"the judge at {self.url} failed after {attempt + 1} tries: {error}")


def _read_cache(path: Path) -> dict[str, str]:
    cache = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cache[row["key"]] = row["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
    return cache
