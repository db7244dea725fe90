"""A reply as its tokens arrive: the text safe to show so far, stop strings, and what it came to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .params import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens in its place
    (``SamplingParams.logprobs`` of them, most likely first; the token itself may be among them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)


@dataclass
class Generation:
    """What one request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids, including a final stop token
    finish_reason: str | None = None  # "stop", "length", "timeout" or "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the cache (a session's or an earlier request's), not run again
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked for them
    # Beam search only: the reply's score (its summed log-probability over its length to the length_penalty,
    # transformers' sequences_scores) and the other finished replies, best first (up to num_beams - 1),
    # each a Generation with its own score.
    score: float | None = None
    alternatives: list["Generation"] = field(default_factory=list)
    # when its first token was decoded and when it ended (time.monotonic()): its decoding speed, whenever
    # its reader reads it (a long recording's later windows decode beside the first, read after it)
    # (not compared: two runs of one request are equal Generations)
    first_token_at: float | None = field(default=None, compare=False, repr=False)
    ended_at: float | None = field(default=None, compare=False, repr=False)


def logprob_entries(logprobs: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """Generated tokens' log-probabilities in OpenAI's shape (a chat completion's ``logprobs.content``):
    per token its text, log-probability, UTF-8 bytes (a token may hold part of a character: its text
    then shows U+FFFD) and ``top_logprobs``, the likeliest tokens in its place, each in the same shape."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        data = token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]


class ReplyText:
    """The text of one reply as its tokens arrive: detokenising, stop strings, text held back while
    it could still be the start of a stop string."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_tokens: int):
        self.out = Generation(prompt_tokens=prompt_tokens, logprobs=None if params.logprobs is None else [])
        self.decoder = tokenizer.stream()
        self.stop_ids = frozenset() if params.ignore_eos else tokenizer.stop_ids
        self.stops = params.stop
        self.pending = ""  # decoded text held back while it could still start a stop string

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Add a token (and its log-probability, when the request asked for them); return the text delta
        that is now safe to show."""
        self.out.token_ids.append(token)
        if self.out.logprobs is not None:
            if logprob is None or logprob.token != token:
                raise ValueError(f"token {token} came without its log-probability, which this request asked for")
            self.out.logprobs.append(logprob)
        if token in self.stop_ids:
            self.out.finish_reason = "stop"
            return self._release(self.pending + self.decoder.flush(), final=True)
        return self._release(self.pending + self.decoder.push(token), final=False)

    def finish(self, reason: str) -> str:
        """End the reply for ``reason`` (not a stop); return the text still held back."""
        self.out.finish_reason = reason
        return self._release(self.pending + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        whole = self.out.text + text
        cuts = [cut for stop in self.stops if (cut := whole.find(stop, max(0, len(self.out.text) - len(stop)))) >= 0]
        if cuts:  # the reply ends before the first stop string in it, whichever of them that is
            delta = whole[len(self.out.text):min(cuts)]
            self.out.text += delta
            self.out.finish_reason = "stop"
            self.pending = ""
            return delta
        hold = 0 if final else _longest_stop_prefix(text, self.stops)
        delta, self.pending = text[: len(text) - hold], text[len(text) - hold:]
        self.out.text += delta
        return delta


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
