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

Requests are decoded together, their beams the rows of one decoding step (up to MAX_ROWS rows); on a CPU a
row's logits are bit for bit those it gets alone. Their clips are encoded in one batch, as the scheduler encodes
the clips of requests admitted together, and a clip's vectors can round differently in another batch
(padding changes the encoder's shapes): beam search, which compares sums of log-probabilities across
beams, turns such a difference into another reply now and then, where greedy decoding rarely does. A
reply comes whole at the end: ``BeamStream`` gives a stream's interface to code that reads replies as
streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .reply import Generation, ReplyText
from .sampling import SamplingParams, apply_repetition_penalty, hold_back_stop_tokens
from .scheduler import PREFILL_CHUNK, RequestTooLarge, new_token_room

if TYPE_CHECKING:
    from .engine import Engine, Prepared

FINISHED_OFF = -1.0e9  # transformers' score of "not a candidate"
MAX_ROWS = 16  # beams decoded together: requests join a group while their beams fit


class _Search:
    """One request's beam search: its running beams, in slots ``slot`` .. ``slot + num_beams - 1`` of the
    group's cache, and its finished replies."""

    def __init__(self, engine: "Engine", request: "Prepared", params: SamplingParams, slot: int):
        self.request, self.params, self.slot = request, params, slot
        self.n = params.num_beams
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(engine.tokenizer.stop_ids)
        self.keep = max(2, 1 + len(self.stop_ids)) * self.n  # candidates per step (transformers' beams_to_keep)
        self.prompt_len = len(request.token_ids)
        if self.prompt_len == 0:
            raise ValueError("the request has no prompt tokens")
        if self.prompt_len >= engine.max_positions:
            raise RequestTooLarge(f"the prompt is {self.prompt_len} tokens but the model's context holds "
                                  f"{engine.max_positions}; shorten the prompt or audio")
        self.max_new = new_token_room(params.max_new_tokens, self.prompt_len, engine.max_positions, "the model's",
                                      stacklevel=6)
        self.scores: torch.Tensor | None = None  # running beams' summed log-probabilities (after the first step)
        self.beams: list[list[int]] = [[]]  # running beams' tokens
        self.finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens), best first, at most n
        self.generated = 0  # tokens each running beam has
        self.seen: torch.Tensor | None = None  # (beams, vocab): tokens each has seen (repetition penalty)
        self.done = False
        self.origins: list[int] = []  # after a step: the beam each next beam continues

    @property
    def tokens(self) -> list[int]:
        """The token each running beam feeds next: its last."""
        return [b[-1] for b in self.beams]

    @property
    def cached(self) -> int:
        """Positions each running beam holds in the cache (the prompt and all but its last token)."""
        return self.prompt_len + self.generated - 1

    def advance(self, logits: torch.Tensor) -> None:
        """One step from the running beams' logits (beams, vocab): the candidates that end join the finished
        replies, the best that go on become the beams (``origins``, ``tokens``), or the search is done."""
        params, n = self.params, self.n
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs = hold_back_stop_tokens(log_probs, self.stop_ids, self.generated, params.min_new_tokens)
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=logits.device)
                self.seen[0, self.request.token_ids] = True
            log_probs = apply_repetition_penalty(log_probs, self.seen, params.repetition_penalty)
        if self.scores is not None:
            log_probs = log_probs + self.scores[:, None]
        total = log_probs.reshape(-1)
        top_scores, top_index = torch.topk(total, k=min(self.keep, total.numel()))
        origin, token, top = (top_index // vocab).tolist(), (top_index % vocab).tolist(), top_scores.tolist()
        ends = [t in self.stop_ids or self.generated + 1 >= self.max_new for t in token]
        going = [s + (FINISHED_OFF if e else 0.0) for s, e in zip(top, ends)]  # an ending candidate cannot go on

        # the first n candidates that end become finished replies (where they beat the worst kept)
        for rank in range(min(n, len(token))):
            if ends[rank]:
                score = top[rank] / ((self.generated + 1) ** params.length_penalty)
                self.finished.append((score, self.beams[origin[rank]] + [token[rank]]))
        self.finished.sort(key=lambda f: -f[0])
        del self.finished[n:]

        # the best n that go on are the next beams
        order = sorted(range(len(token)), key=lambda i: -going[i])[:n]
        self.generated += 1
        best_running = going[order[0]] / (self.generated ** params.length_penalty)
        if all(ends) or (len(self.finished) == n and best_running <= self.finished[-1][0]):
            self.done = True
            return
        self.origins = [origin[i] for i in order]
        self.beams = [self.beams[origin[i]] + [token[i]] for i in order]
        self.scores = torch.tensor([going[i] for i in order], device=logits.device)
        if self.seen is not None:
            self.seen = self.seen[self.origins].clone()
            device = self.seen.device
            self.seen[torch.arange(len(order), device=device), torch.tensor(self.tokens, device=device)] = True

    def result(self, tokenizer) -> Generation:
        reply = ReplyText(tokenizer, self.params, self.prompt_len)
        for t in self.finished[0][1]:
            reply.push(t)
            if reply.out.finish_reason is not None:
                break
        if reply.out.finish_reason is None:
            reply.finish("length")
        return reply.out


def beam_search(engine: "Engine", requests: Sequence["Prepared"], params: Sequence[SamplingParams]) -> list[Generation]:
    """The best reply to each prepared request by beam search over its ``num_beams`` beams. Requests are
    decoded in groups of at most MAX_ROWS beams (each alone when it has more), every beam a row of one
    decoding step (what that changes: see the module's note)."""
    if len(requests) != len(params):
        raise ValueError(f"{len(requests)} requests but {len(params)} SamplingParams")
    groups: list[list[int]] = []
    rows = 0  # beams in the last group
    for i, p in enumerate(params):
        if not groups or rows + p.num_beams > MAX_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += p.num_beams
    results: list[Generation | None] = [None] * len(requests)
    for group in groups:
        for i, out in zip(group, _search_group(engine, [requests[i] for i in group], [params[i] for i in group])):
            results[i] = out
    return results


def _search_group(engine: "Engine", requests: Sequence["Prepared"],
                  params: Sequence[SamplingParams]) -> list[Generation]:
    model = engine.model
    searches, slot = [], 0
    for request, p in zip(requests, params):
        searches.append(_Search(engine, request, p, slot))
        slot += p.num_beams
    with torch.inference_mode():
        engine.encode(list(requests))  # every clip of the group in one batch
        device = model.device
        length = max(s.prompt_len + s.max_new for s in searches)
        cache = model.language_model.new_cache(slot, length)
        cache.reserve(slot, length)
        for s in searches:  # each prompt into its first slot, chunk by chunk as the scheduler runs it
            embeds = model.embed(torch.tensor([s.request.token_ids], device=device), s.request.audio_embeds)
            for start in range(0, s.prompt_len, PREFILL_CHUNK):
                last = start + PREFILL_CHUNK >= s.prompt_len
                logits = engine.prefill(cache, s.slot, embeds[:, start:start + PREFILL_CHUNK], start, logits=last)
            s.advance(logits[None])  # only beam 0 exists before the first step
        while True:
            running = [s for s in searches if not s.done]
            if not running:
                break
            rows = max(s.slot + s.n for s in running)
            tokens = torch.full((rows,), engine.tokenizer.pad_id, dtype=torch.long, device=device)
            lengths = torch.zeros(rows, dtype=torch.long, device=device)  # a finished request's rows: harmless
            for s in running:
                _reorder(cache, s.slot, s.origins, s.cached)
                tokens[s.slot:s.slot + s.n] = torch.tensor(s.tokens, device=device)
                lengths[s.slot:s.slot + s.n] = s.cached
            logits = engine.step(cache, tokens, lengths, max(s.cached for s in running) + 1)
            for s in running:
                s.advance(logits[s.slot:s.slot + s.n])
    return [s.result(engine.tokenizer) for s in searches]


def _reorder(cache, slot: int, origins: list[int], length: int) -> None:
    """Slots slot .. slot + n - 1 take the first ``length`` cached positions of slots slot + origins."""
    if origins == list(range(len(origins))):
        return
    rows = torch.tensor([slot + o for o in origins], device=cache.device)
    for store in (cache.k, cache.v):
        for layer in store:
            layer[slot:slot + len(origins), :, :length] = layer[rows, :, :length]


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
        self.result = beam_search(self.engine, [self.request], [self.params])[0]
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
