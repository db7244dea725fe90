"""The inference engine: audio -> vectors, prompt -> prefill, then one decode step per new token.

- Prefill runs the whole prompt once; each decode step runs only the new token against the KV cache,
  which is allocated once for prompt + max_new_tokens.
- Batches are left-padded so that every row's next token sits in the same column; each row keeps its
  own positions (0 at its first real token) and padded keys are masked, so a row's greedy output is
  the same as running it alone. Finished rows leave the batch.
- Long audio is split into windows of at most 30 s (``qwen2audio.audio.features.split_into_windows``);
  each window is encoded on its own and their vectors are fed, in order, at the clip's one
  <|AUDIO|> placeholder. Nothing is dropped; audio that does not fit the model's context is an error
  that says how much fits.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from ..audio.features import AUDIO_TOKENS_PER_SECOND, log_mel_spectrogram, split_into_windows
from ..model import KVCache, Qwen2AudioModel
from ..model.llm import padded_causal_mask
from ..text.chat import expand_audio_placeholders
from ..text.tokenizer import Tokenizer
from .sampling import SamplingParams, hold_back_stop_tokens, next_tokens
from .weights import prepare_for_inference

ENCODE_BATCH = 8  # 30 s windows encoded together


@dataclass
class Prepared:
    """One request ready for the model: expanded token ids and the audio vectors for its <|AUDIO|> runs."""

    token_ids: list[int]
    audio_embeds: list[torch.Tensor]  # one (n_tokens, hidden) per clip, in reading order
    audio_keys: list[str] = field(default_factory=list)  # identity of each clip, for conversation reuse


@dataclass
class Generation:
    """What one request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids, including a final stop token
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    prompt_tokens: int = 0


class TextStream:
    """The text deltas of one request, as an iterator; ``result`` is its Generation, complete once
    the iterator is exhausted."""

    def __init__(self, result: Generation, events: Iterator[tuple[int, str]]):
        self.result = result
        self._events = events

    def __iter__(self) -> Iterator[str]:
        for _, delta in self._events:
            if delta:
                yield delta


class _Row:
    """Per-request decoding state: detokeniser, stop-string handling, the text not yet released."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_tokens: int):
        self.out = Generation(prompt_tokens=prompt_tokens)
        self.decoder = tokenizer.stream()
        self.stop_ids = frozenset() if params.ignore_eos else tokenizer.stop_ids
        self.stops = params.stop
        self.pending = ""  # decoded text held back while it could still start a stop string
        self.released = 0

    def push(self, token: int) -> str:
        """Add a token; return the text delta that is now safe to show."""
        self.out.token_ids.append(token)
        if token in self.stop_ids:
            self.out.finish_reason = "stop"
            return self._release(self.pending + self.decoder.flush(), final=True)
        return self._release(self.pending + self.decoder.push(token), final=False)

    def finish_length(self) -> str:
        self.out.finish_reason = "length"
        return self._release(self.pending + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        for stop in self.stops:
            cut = (self.out.text + text).find(stop, max(0, len(self.out.text) - len(stop)))
            if cut >= 0:
                delta = (self.out.text + text)[len(self.out.text):cut]
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


def audio_key(audio: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(audio).tobytes()).hexdigest()


class Engine:
    """Runs one model for inference. It takes the model over: at construction its weights get the
    layout that decodes fastest on their device (``generation.weights``; same values), unless
    ``transform_weights`` is false (a model still being trained, decoded for validation)."""

    def __init__(self, model: Qwen2AudioModel, tokenizer: Tokenizer, encode_batch: int = ENCODE_BATCH,
                 transform_weights: bool = True):
        self.model = prepare_for_inference(model) if transform_weights else model
        self.tokenizer = tokenizer
        self.encode_batch = encode_batch
        if tokenizer.audio_id != model.config.audio_token_index:
            raise ValueError(f"the tokenizer's <|AUDIO|> id {tokenizer.audio_id} differs from the config's "
                             f"audio_token_index {model.config.audio_token_index}: they come from different checkpoints")

    @property
    def max_positions(self) -> int:
        return self.model.config.text.max_position_embeddings

    # -- audio ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_audios(self, waveforms: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz waveforms -> one (n_tokens, hidden) tensor each; long clips window by window."""
        windows, owner = [], []
        for i, wave in enumerate(waveforms):
            for chunk in split_into_windows(wave):
                windows.append(chunk)
                owner.append(i)
        order = sorted(range(len(windows)), key=lambda j: len(windows[j]))  # similar lengths batch together
        vectors: list[torch.Tensor | None] = [None] * len(windows)
        n_mels = self.model.config.audio.num_mel_bins
        for start in range(0, len(order), self.encode_batch):
            chunk = order[start:start + self.encode_batch]
            feats, frame_mask = log_mel_spectrogram([windows[j] for j in chunk], n_mels=n_mels)
            for j, v in zip(chunk, self.model.encode_audio(feats, frame_mask.sum(-1))):
                vectors[j] = v
        per_clip: list[list[torch.Tensor]] = [[] for _ in waveforms]
        for j, i in enumerate(owner):
            per_clip[i].append(vectors[j])
        return [torch.cat(parts) for parts in per_clip]

    def prepare(self, prompt: str, audios: Sequence[np.ndarray], cached: dict[str, torch.Tensor] | None = None) -> Prepared:
        """A prompt with one <|AUDIO|> per clip and the decoded clips -> a Prepared request.

        ``cached`` maps audio keys to vectors already computed (earlier turns of a conversation).
        """
        keys = [audio_key(a) for a in audios]
        cached = cached if cached is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in cached]
        for i, v in zip(todo, self.encode_audios([audios[i] for i in todo])):
            cached[keys[i]] = v
        embeds = [cached[k] for k in keys]
        ids = expand_audio_placeholders(self.tokenizer.encode(prompt), self.tokenizer.audio_id,
                                        [int(e.shape[0]) for e in embeds])
        if len(ids) >= self.max_positions:
            audio_tokens = sum(int(e.shape[0]) for e in embeds)
            raise ValueError(
                f"the prompt is {len(ids)} tokens ({audio_tokens} of them audio, {AUDIO_TOKENS_PER_SECOND} per second) "
                f"but the model's context holds {self.max_positions}; shorten the audio to about "
                f"{max(0, self.max_positions - 256 - (len(ids) - audio_tokens)) // AUDIO_TOKENS_PER_SECOND} s in all")
        return Prepared(ids, embeds, keys)

    # -- generation ----------------------------------------------------------------------------------
    def _room_to_generate(self, max_new_tokens: int, prompt_tokens: int) -> int:
        """max_new_tokens, capped by what the context leaves after the prompt, with a warning when capped."""
        room = self.max_positions - prompt_tokens
        if max_new_tokens > room:
            warnings.warn(f"max_new_tokens {max_new_tokens} does not fit: the prompt takes {prompt_tokens} of the "
                          f"model's {self.max_positions} positions, so at most {room} new tokens", stacklevel=2)
        return min(max_new_tokens, room)

    def generate(self, batch: Sequence[Prepared], params: SamplingParams) -> list[Generation]:
        results, events = self.stream_batch(batch, params)
        for _ in events:
            pass
        return results

    def stream_batch(self, batch: Sequence[Prepared], params: SamplingParams
                     ) -> tuple[list[Generation], Iterator[tuple[int, str]]]:
        """Decode a batch step by step: the iterator yields (row, text delta) for every row at every
        step (deltas may be empty); the Generations fill in as it runs and are final at its end."""
        rows = [_Row(self.tokenizer, params, len(p.token_ids)) for p in batch]
        return [r.out for r in rows], self._decode(batch, params, rows)

    def stream(self, request: Prepared, params: SamplingParams, cache: KVCache | None = None,
               reuse: int = 0) -> "TextStream":
        """Text deltas of one request as they are decoded. ``cache``/``reuse``: see ``_decode``."""
        row = _Row(self.tokenizer, params, len(request.token_ids))
        return TextStream(row.out, self._decode([request], params, [row], cache, reuse))

    @torch.inference_mode()
    def _decode(self, batch: Sequence[Prepared], params: SamplingParams, rows: list[_Row],
                cache: KVCache | None = None, reuse: int = 0) -> Iterator[tuple[int, str]]:
        """Prefill and decode; yields (row index, text delta). A single request may pass a ``cache``
        whose first ``reuse`` positions already hold its prompt's first ``reuse`` tokens."""
        model, lm = self.model, self.model.language_model
        device = model.device
        lengths = [len(p.token_ids) for p in batch]
        width = max(lengths)
        max_new = self._room_to_generate(params.max_new_tokens, width)
        pad = self.tokenizer.pad_id
        ids = torch.tensor([[pad] * (width - n) + p.token_ids for n, p in zip(lengths, batch)], device=device)
        key_valid = torch.zeros(len(batch), width + max_new, dtype=torch.bool, device=device)
        for i, n in enumerate(lengths):
            key_valid[i, width - n:] = True
        padded = len(set(lengths)) > 1
        positions = (key_valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)  # (B, width)

        if cache is None:
            cache = lm.new_cache(len(batch), width + max_new)
            reuse = 0
        else:
            cache.truncate(reuse)
            cache.grow(width + max_new)
        audio = [a for p in batch for a in p.audio_embeds]
        if reuse:  # only the tail of the prompt is new; skip the audio vectors of the reused prefix
            n_prefix_audio = int((ids[:, :reuse] == self.tokenizer.audio_id).sum())
            flat = torch.cat(audio) if audio else None
            audio = [flat[n_prefix_audio:]] if flat is not None else []
        embeds = model.embed(ids[:, reuse:], audio)
        mask = padded_causal_mask(key_valid[:, :width], width) if padded else None
        hidden = lm.hidden_states(embeds, positions[:, reuse:], mask, cache)
        logits = lm.logits(hidden[:, -1])  # (B, vocab)

        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(batch), logits.shape[-1], dtype=torch.bool, device=device)
            for i, p in enumerate(batch):  # the row's own tokens, not its padding
                seen[i, p.token_ids] = True
        gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        active = list(range(len(batch)))
        next_pos = positions[:, -1:] + 1  # (B, 1)
        stop_ids = frozenset() if params.ignore_eos else self.tokenizer.stop_ids
        for step in range(max_new):
            logits = hold_back_stop_tokens(logits, stop_ids, step, params.min_new_tokens)
            tokens = next_tokens(logits, params, seen, gen)  # (B,)
            keep = []
            for j, (r, t) in enumerate(zip(active, tokens.tolist())):
                delta = rows[r].push(t)
                if rows[r].out.finish_reason is None and step == max_new - 1:
                    delta += rows[r].finish_length()
                yield r, delta
                if rows[r].out.finish_reason is None:
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=device)
                cache.select(sel)
                tokens, next_pos, key_valid = tokens[sel], next_pos[sel], key_valid[sel]
                seen = seen[sel] if seen is not None else None
                active = [active[j] for j in keep]
                padded = padded and bool((~key_valid[:, :width]).any())
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            S = cache.length + 1
            mask = key_valid[:, None, None, :S] if padded else None  # (B, 1, 1, S)
            embeds = lm.model.embed_tokens(tokens[:, None])  # (B, 1, hidden)
            logits = lm.logits(lm.hidden_states(embeds, next_pos, mask, cache)[:, -1])
            next_pos = next_pos + 1
