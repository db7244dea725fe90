"""Beam search: of all replies, the most likely one as a whole, not token by token.

``num_beams`` partial replies (beams) run together, each in a slot of the scheduler's KV cache. At each
step every beam's next-token log-probabilities are added to its score; of all beam x token continuations
the best ``beams_to_keep`` are looked at in order: one that ends (a stop token, or the max_new_tokens-th
token) and ranks among the first ``num_beams`` becomes a finished reply, scored by its log-probability over
its length to the ``length_penalty``; the best ``num_beams`` that go on are the next beams, and the cache
slots are reordered to follow them (``KVCache.copy_slots``). The search ends when ``num_beams`` replies
have finished and the best running beam, over its current length, cannot beat the worst of them, or when
every continuation ends.

This is transformers' ``generate(num_beams=N, do_sample=False)`` with its defaults (early_stopping
False, length_penalty 1.0): the same candidates, the same stopping rule, so the same reply
(tests/test_beam_search.py compares the two). Processors act on the log-probabilities, as there:
stop tokens held back until min_new_tokens, then the repetition penalty.

With a temperature above 0 it is transformers' beam sampling (``do_sample=True, num_beams=N``): the
temperature, top-k and top-p act on those log-probabilities too (each beam keeps at least one token more
than there are stop tokens), and the ``beams_to_keep`` candidates are drawn without replacement from
the softmax of all beams' summed scores instead of taken best first; the first ``num_beams`` drawn
may finish, and the best-scored of the rest go on, as above. Where fewer candidates than that have any
probability left (the filters keep few tokens and only one beam runs yet), only those are drawn; the
same draw in transformers stops with an error.

``BeamSearch`` is one request's bookkeeping; the scheduler runs it (generation/scheduler.py): the prompt
is prefilled into the request's first slot, and from then on its beams are rows of the same decoding
steps as every other request's, in slots of their own. On a CPU a row's logits are bit for bit those it
gets alone in steps the decoding kernel takes whole (up to 16 rows in float32), to about 1e-6 past them
or after a reused prefix (README: the scheduler). Its clips are encoded with those of the requests admitted with it, and a clip's vectors can
round differently in another batch (padding changes the encoder's shapes): beam search, which compares
sums of log-probabilities across beams, turns such a difference into another reply now and then, where
greedy decoding rarely does. The reader gets the reply's tokens as they settle: those every running
beam and every finished reply start with (``settled``), which no later step can change; the rest at the
end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection

import torch

from .reply import TokenLogprob
from .sampling import SamplingParams, apply_repetition_penalty, hold_back_stop_tokens, warp

if TYPE_CHECKING:
    from .engine import Prepared

FINISHED_OFF = -1.0e9  # transformers' score of "not a candidate"


class BeamSearch:
    """One request's beam search: its running beams (row i of a step is beam i) and its finished
    replies. ``max_new``: the most tokens a reply may have (max_new_tokens, capped by the room left)."""

    def __init__(self, request: "Prepared", params: SamplingParams, stop_ids: Collection[int], max_new: int):
        self.request, self.params, self.max_new = request, params, max_new
        self.n = params.num_beams
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(stop_ids)
        self.keep = max(2, 1 + len(self.stop_ids)) * self.n  # candidates per step (transformers' beams_to_keep)
        self.prompt_len = len(request.token_ids)
        self.scores: torch.Tensor | None = None  # running beams' summed log-probabilities (after the first step)
        self.beams: list[list[int]] = [[]]  # running beams' tokens
        self.finished: list[tuple[float, list[int], list]] = []  # (normalised score, tokens, logprobs), best
        # first, at most n
        self.logprobs: list[list[TokenLogprob]] = [[]]  # running beams' TokenLogprobs (when params.logprobs asks)
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

    def advance(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """One step from the running beams' logits (beams, vocab): the candidates that end join the finished
        replies, the best that go on become the beams (``origins``, ``tokens``), or the search is done.
        ``generator``: the random numbers of beam sampling (None: torch's global ones)."""
        params, n = self.params, self.n
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        raw = log_probs  # the model's own distribution, before the processors: what logprobs report
        log_probs = hold_back_stop_tokens(log_probs, self.stop_ids, self.generated, params.min_new_tokens)
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=logits.device)
                self.seen[0, self.request.token_ids] = True
            log_probs = apply_repetition_penalty(log_probs, self.seen, params.repetition_penalty)
        if not params.greedy:  # beam sampling: the warpers act on the processed log-probabilities
            log_probs = warp(log_probs, params, keep=self.keep // n)
        if self.scores is not None:
            log_probs = log_probs + self.scores[:, None]
        total = log_probs.reshape(-1)
        if params.greedy:
            top_scores, top_index = torch.topk(total, k=min(self.keep, total.numel()))
        else:  # drawn without replacement in proportion to their probabilities, in the order drawn
            probs = torch.softmax(total, dim=-1)
            top_index = torch.multinomial(probs, min(self.keep, int((probs > 0).sum())), generator=generator)
            top_scores = total[top_index]
        origin, token, top = (top_index // vocab).tolist(), (top_index % vocab).tolist(), top_scores.tolist()
        chosen = self._logprobs(raw, origin, token)
        ends = [t in self.stop_ids or self.generated + 1 >= self.max_new for t in token]
        going = [s + (FINISHED_OFF if e else 0.0) for s, e in zip(top, ends)]  # an ending candidate cannot go on

        # the first n candidates that end become finished replies (where they beat the worst kept)
        for rank in range(min(n, len(token))):
            if ends[rank]:
                score = top[rank] / ((self.generated + 1) ** params.length_penalty)
                self.finished.append((score, self.beams[origin[rank]] + [token[rank]],
                                      self.logprobs[origin[rank]] + chosen[rank]))
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
        self.logprobs = [self.logprobs[origin[i]] + chosen[i] for i in order]
        self.scores = torch.tensor([going[i] for i in order], device=logits.device)
        if self.seen is not None:
            self.seen = self.seen[self.origins].clone()
            device = self.seen.device
            self.seen[torch.arange(len(order), device=device), torch.tensor(self.tokens, device=device)] = True

    def settled(self) -> tuple[list[int], list[TokenLogprob] | list[None]]:
        """The tokens every running beam and every finished reply starts with, and their TokenLogprobs (Nones
        when the request did not ask): the start of the reply whatever the search still finds, since every
        later reply continues a running beam. Once ``done``: the whole reply (``best``)."""
        if self.done:
            return self.best
        replies = self.beams + [tokens for _, tokens, _ in self.finished]
        n = 0
        for column in zip(*replies):
            if any(t != column[0] for t in column):
                break
            n += 1
        tokens, logprobs = self.beams[0][:n], self.logprobs[0][:n]
        return tokens, logprobs or [None] * n

    def _logprobs(self, raw: torch.Tensor, origin: list[int], token: list[int]) -> list[list[TokenLogprob]]:
        """Each candidate's TokenLogprob as a one-item list (empty lists when the request did not ask):
        its token's log-probability in its beam's row of ``raw`` and that row's ``params.logprobs`` likeliest."""
        k = self.params.logprobs
        if k is None:
            return [[] for _ in token]
        values = raw[origin, token].tolist()
        top_values, top_ids = (t.tolist() for t in raw.topk(k, dim=-1)) if k else ([[]] * raw.shape[0],) * 2
        return [[TokenLogprob(t, v, tuple(zip(top_ids[o], top_values[o])))] for o, t, v in zip(origin, token, values)]

    @property
    def ranked(self) -> list[tuple[float, list[int], list[TokenLogprob] | list[None]]]:
        """The finished replies, best first (once ``done``): score, tokens, TokenLogprobs (Nones when the
        request did not ask)."""
        return [(score, tokens, logprobs or [None] * len(tokens)) for score, tokens, logprobs in self.finished]

    @property
    def best(self) -> tuple[list[int], list[TokenLogprob] | list[None]]:
        """The reply (once ``done``): the best finished beam's tokens and their TokenLogprobs (Nones when the
        request did not ask)."""
        _, tokens, logprobs = self.finished[0]
        return tokens, logprobs or [None] * len(tokens)
