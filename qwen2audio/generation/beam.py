"""Beam search: of all replies, the most likely one as a whole, not token by token.

``num_beams`` partial replies (beams) run together, each in its own slot of a KV cache of its own. At
each step every beam's next-token log-probabilities are added to its score; of all beam x token
continuations the best ``beams_to_keep`` are looked at in order: one that ends (a stop token, or the
max_new_tokens-th token) and ranks among the first ``num_beams`` becomes a finished reply, scored by its
log-probability over its length to the ``length_penalty``; the best ``num_beams`` that go on are the next
beams, and the cache slots are reordered to follow them. The search ends when ``num_beams`` replies have
finished and the best running beam, over its current length, cannot beat the worst of them, or when
every continuation ends.

This is transformers' ``generate(num_beams=N, do_sample=False)`` with its defaults (early_stopping
False, length_penalty 1.0): the same candidates, the same stopping rule, so the same reply
(tests/test_beam_search.py compares the two). Processors act on the log-probabilities, as there:
stop tokens held back until min_new_tokens, then the repetition penalty.

A request runs alone (its beams are its batch) and its reply comes whole at the end: ``BeamStream``
gives a stream's interface to code that reads replies as streams.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Iterator

import torch

from .reply import Generation, ReplyText
from .sampling import SamplingParams, apply_repetition_penalty, hold_back_stop_tokens
from .scheduler import PREFILL_CHUNK, RequestTooLarge

if TYPE_CHECKING:
    from .engine import Engine, Prepared

FINISHED_OFF = -1.0e9  # transformers' score of "not a candidate"


def beam_search(engine: "Engine", request: "Prepared", params: SamplingParams) -> Generation:
    """The best reply to one prepared request by beam search over ``params.num_beams`` beams."""
    if not params.greedy:
        raise ValueError("beam search does not sample: temperature must be 0")
    model, tokenizer = engine.model, engine.tokenizer
    n = params.num_beams
    stop_ids = frozenset() if params.ignore_eos else frozenset(tokenizer.stop_ids)
    keep = max(2, 1 + len(stop_ids)) * n  # candidates looked at per step (transformers' beams_to_keep)
    prompt_len = len(request.token_ids)
    if prompt_len == 0:
        raise ValueError("the request has no prompt tokens")
    room = engine.max_positions - prompt_len
    if room < 1:
        raise RequestTooLarge(f"the prompt is {prompt_len} tokens but the model's context holds "
                              f"{engine.max_positions}; shorten the prompt or audio")
    if params.max_new_tokens > room:
        warnings.warn(f"max_new_tokens {params.max_new_tokens} does not fit: the prompt takes {prompt_len} of the "
                      f"model's {engine.max_positions} positions, so at most {room} new tokens", stacklevel=2)
    max_new = min(params.max_new_tokens, room)

    with torch.inference_mode():
        engine.encode([request])
        device = model.device
        embeds = model.embed(torch.tensor([request.token_ids], device=device), request.audio_embeds)
        cache = model.language_model.new_cache(n, prompt_len + max_new)
        cache.reserve(n, prompt_len + max_new)
        for start in range(0, prompt_len, PREFILL_CHUNK):
            last = start + PREFILL_CHUNK >= prompt_len
            logits = engine.prefill(cache, 0, embeds[:, start:start + PREFILL_CHUNK], start, logits=last)
        logits = logits[None]  # (1, vocab): only beam 0 exists before the first step
        vocab = logits.shape[-1]

        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            seen[0, request.token_ids] = True
        scores = torch.zeros(1, device=device)  # running beams' summed log-probabilities
        beams: list[list[int]] = [[]]  # running beams' tokens
        finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens), best first, at most n
        generated = 0
        while True:
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            log_probs = hold_back_stop_tokens(log_probs, stop_ids, generated, params.min_new_tokens)
            if seen is not None:
                log_probs = apply_repetition_penalty(log_probs, seen, params.repetition_penalty)
            total = (log_probs + scores[:, None]).reshape(-1)
            top_scores, top_index = torch.topk(total, k=min(keep, total.numel()))
            origin = (top_index // vocab).tolist()
            token = (top_index % vocab).tolist()
            top = top_scores.tolist()
            ends = [t in stop_ids or generated + 1 >= max_new for t in token]

            # the first n candidates that end become finished replies (if they beat the worst kept)
            for rank in range(min(n, len(token))):
                if ends[rank]:
                    score = top[rank] / ((generated + 1) ** params.length_penalty)
                    finished.append((score, beams[origin[rank]] + [token[rank]]))
            finished.sort(key=lambda f: -f[0])
            del finished[n:]

            # the best n that go on are the next beams
            going = sorted(range(len(token)), key=lambda i: -(top[i] + (FINISHED_OFF if ends[i] else 0.0)))[:n]
            generated += 1
            if all(ends):
                break
            best_running = top[going[0]] + (FINISHED_OFF if ends[going[0]] else 0.0)
            if len(finished) == n and best_running / (generated ** params.length_penalty) <= finished[-1][0]:
                break
            rows = torch.tensor([origin[i] for i in going], device=device)
            _reorder(cache, rows, prompt_len + generated - 1)
            beams = [beams[origin[i]] + [token[i]] for i in going]
            scores = torch.tensor([top[i] + (FINISHED_OFF if ends[i] else 0.0) for i in going], device=device)
            fed = torch.tensor([token[i] for i in going], device=device)
            if seen is not None:
                seen = seen[rows].clone()
                seen[torch.arange(len(going), device=device), fed] = True
            lengths = torch.full((len(going),), prompt_len + generated - 1, dtype=torch.long, device=device)
            logits = engine.step(cache, fed, lengths, prompt_len + generated)

    reply = ReplyText(tokenizer, params, prompt_len)
    best = finished[0][1]
    for t in best:
        reply.push(t)
        if reply.out.finish_reason is not None:
            break
    if reply.out.finish_reason is None:
        reply.finish("length")
    return reply.out


def _reorder(cache, rows: torch.Tensor, length: int) -> None:
    """Slots 0 .. len(rows) - 1 take the first ``length`` cached positions of slots ``rows``."""
    if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
        return
    for layer in range(len(cache.k)):
        for store in (cache.k, cache.v):
            store[layer][: len(rows), :, :length] = store[layer][rows, :, :length]


class BeamStream:
    """A beam search read as a stream: iterating runs it and yields its whole text once; ``result`` is the
    Generation after that. ``cancel()`` before the iteration starts skips the search."""

    def __init__(self, engine: "Engine", request: "Prepared", params: SamplingParams):
        self.engine, self.request, self.params = engine, request, params
        self.result = Generation(prompt_tokens=len(request.token_ids))
        self.done = False

    def __iter__(self) -> Iterator[str]:
        if self.done:
            return
        self.result = beam_search(self.engine, self.request, self.params)
        self.done = True
        if self.result.text:
            yield self.result.text

    def wait(self) -> Generation:
        for _ in self:
            pass
        return self.result

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.result.finish_reason = "cancelled"
