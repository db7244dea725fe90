"""The inference engine: the model's arithmetic for serving requests.

- ``prepare``: a prompt with one <|AUDIO|> per clip -> a Prepared request, its placeholders expanded
  to each clip's audio-token count (known from the clip's length, before it is encoded).
- ``encode``: the clips that requests still lack -> vectors, in one batch across requests. Long audio
  is split into windows of at most 30 s (``qwen2audio.audio.features.split_into_windows``); each
  window is encoded on its own and their vectors are fed, in order, at the clip's one <|AUDIO|>
  placeholder. Nothing is dropped; audio that does not fit the model's context is an error that says
  how much fits.
- ``prefill``: a chunk of one prompt into its slot of the KV cache; ``step``: one new token for each
  of the slots 0 .. n - 1, each at its own length, its attention masked to its own cached positions.
  These two are all the decoding arithmetic there is. ``Engine(compile=True)`` runs the step through
  ``torch.compile`` (inductor; shapes dynamic, so a growing width or batch does not compile again).

What runs when is the scheduler's (``generation.scheduler``): continuous batching, sessions,
cancellation. ``generate`` and ``stream`` are conveniences over the engine's own scheduler, which
runs inline in the caller's thread.
"""

from __future__ import annotations

import hashlib
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..audio.features import (AUDIO_TOKENS_PER_SECOND, MIN_SAMPLES, clip_token_count, log_mel_spectrogram,
                              split_into_windows)
from ..model import KVCache, Qwen2AudioModel
from ..model.llm import causal_mask
from ..text.chat import clip_spans, expand_audio_placeholders
from ..text.tokenizer import Tokenizer
from . import kernels
from .sampling import SamplingParams
from .scheduler import Generation, RequestStream, RequestTooLarge, Scheduler
from .weights import prepare_for_inference

ENCODE_BATCH = 8  # 30 s windows encoded together
ENGINE_MAX_SLOTS = 16  # requests the engine's own scheduler decodes together (its storage grows as needed)

__all__ = ["Engine", "Generation", "Prepared", "RequestStream", "audio_key"]


@dataclass
class Prepared:
    """One request ready for the model: expanded token ids and, per clip in reading order, its audio
    vectors (n_tokens, hidden) or, until it is encoded, None and its 16 kHz waveform."""

    token_ids: list[int]
    audio_embeds: list[torch.Tensor | None]
    audio_keys: list[str] = field(default_factory=list)  # identity of each clip (conversation reuse)
    waveforms: list[np.ndarray | None] = field(default_factory=list)  # the clips still to encode

    @property
    def pending(self) -> list[int]:
        """Indices of the clips not encoded yet."""
        return [i for i, v in enumerate(self.audio_embeds) if v is None]


def audio_key(audio: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(audio).tobytes()).hexdigest()


class Engine:
    """Runs one model for inference. It takes the model over: at construction its weights get the
    layout that decodes fastest on their device (``generation.weights``; same values), unless
    ``transform_weights`` is false (a model still being trained, decoded for validation).
    ``quantize="int8"``: the LLM's products use weight-only int8 (CPU; not the same values: its cost
    is measured in benchmarks/README.md). ``compile=True``: decoding steps run through torch.compile
    (the same arithmetic, fewer and fused calls between the products; the first step waits for the
    compile, which inductor caches on disk; where it fails the steps run uncompiled, with a warning)."""

    def __init__(self, model: Qwen2AudioModel, tokenizer: Tokenizer, encode_batch: int = ENCODE_BATCH,
                 transform_weights: bool = True, quantize: str | None = None, compile: bool = False,
                 dither: float = 0.0):
        if quantize not in (None, "none") and not transform_weights:
            raise ValueError("quantize needs transform_weights=True (a model being trained is not quantised)")
        if tokenizer.audio_id != model.config.audio_token_index:  # before the model is changed for good
            raise ValueError(f"the tokenizer's <|AUDIO|> id {tokenizer.audio_id} differs from the config's "
                             f"audio_token_index {model.config.audio_token_index}: they come from different checkpoints")
        self.model = prepare_for_inference(model, quantize) if transform_weights else model
        self.quantize = quantize or "none"
        self.tokenizer = tokenizer
        self.encode_batch = encode_batch
        self.dither = dither  # the checkpoint's preprocessor_config.json: noise added before the features
        self._scheduler: Scheduler | None = None
        self.compiled = compile  # decoding steps through torch.compile (False again if compiling fails)
        self.compile_error: str | None = None  # why compiling failed, where it did
        self._step = self._compiled_step() if compile else self._step_eager
        self._warmed: set[tuple[bool, int]] = set()  # (several slots, rows) of the steps warm_up compiled

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
            feats, frame_mask = log_mel_spectrogram([windows[j] for j in chunk], n_mels=n_mels, dither=self.dither)
            for j, v in zip(chunk, self.model.encode_audio(feats, frame_mask.sum(-1))):
                vectors[j] = v
        per_clip: list[list[torch.Tensor]] = [[] for _ in waveforms]
        for j, i in enumerate(owner):
            per_clip[i].append(vectors[j])
        return [torch.cat(parts) for parts in per_clip]

    def encode(self, requests: Sequence[Prepared], cached: Sequence[int] | None = None) -> None:
        """Encode the clips the requests still lack, all in one batch (a clip shared by several
        requests once), and put the vectors in place. ``cached``: per request, how many leading prompt
        positions a KV cache holds already; the clips wholly inside them are not needed, so not encoded."""
        needed = [self._needed(r, n) for r, n in zip(requests, cached or [0] * len(requests))]
        todo: dict[str, np.ndarray] = {}
        for r, clips in zip(requests, needed):
            for i in clips:
                todo.setdefault(r.audio_keys[i], r.waveforms[i])
        if not todo:
            return
        vectors = dict(zip(todo, self.encode_audios(list(todo.values()))))
        for r, clips in zip(requests, needed):
            for i in clips:
                r.audio_embeds[i], r.waveforms[i] = vectors[r.audio_keys[i]], None

    def _needed(self, r: Prepared, cached: int) -> list[int]:
        """The clips of ``r`` still to encode when its first ``cached`` positions need no vectors."""
        if not cached:
            return r.pending
        spans = clip_spans(r.token_ids, self.tokenizer.audio_id)
        return [i for i in r.pending if spans[i][0] + spans[i][1] > cached]

    def prepare(self, prompt: str, audios: Sequence[np.ndarray], cached: dict[str, torch.Tensor] | None = None) -> Prepared:
        """A prompt with one <|AUDIO|> per clip and the decoded clips -> a Prepared request. Its clips
        are encoded later, together with other requests' (``encode``; the scheduler calls it).

        ``cached`` maps audio keys to vectors already computed (earlier turns of a conversation).
        """
        keys = [audio_key(a) for a in audios]
        cached = cached if cached is not None else {}
        embeds = [cached.get(k) for k in keys]
        counts = [clip_token_count(len(a)) if e is None else int(e.shape[0]) for a, e in zip(audios, embeds)]
        short = [i for i, n in enumerate(counts) if n == 0]
        if short:  # no token to hold it: refused here, before it could go unnoticed in a reused prefix
            raise ValueError(f"clip(s) {short} have fewer than {MIN_SAMPLES} samples ({1000 * MIN_SAMPLES / 16000:.1f} "
                             "ms at 16 kHz), too short to make one audio token; load audio with "
                             "qwen2audio.audio.load_audio, which refuses shorter clips")
        ids = expand_audio_placeholders(self.tokenizer.encode(prompt), self.tokenizer.audio_id, counts)
        if len(ids) >= self.max_positions:
            audio_tokens = sum(counts)
            text_tokens = len(ids) - audio_tokens
            said = f"the prompt is {len(ids)} tokens ({audio_tokens} of them audio, {AUDIO_TOKENS_PER_SECOND} per second)"
            if text_tokens >= self.max_positions - 256:  # the text alone leaves no room
                raise RequestTooLarge(f"{said} but the model's context holds {self.max_positions}; its text alone "
                                      f"is {text_tokens} tokens: shorten the messages")
            raise RequestTooLarge(
                f"{said} but the model's context holds {self.max_positions}; shorten the audio to about "
                f"{(self.max_positions - 256 - text_tokens) // AUDIO_TOKENS_PER_SECOND} s in all")
        waveforms = [a if e is None else None for a, e in zip(audios, embeds)]
        return Prepared(ids, embeds, keys, waveforms)

    # -- the decoding arithmetic ---------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, cache: KVCache, slot: int, embeds: torch.Tensor, start: int,
                logits: bool = True) -> torch.Tensor | None:
        """Run a chunk of one prompt, embeds (1, T, hidden), at positions [start, start + T) of ``slot``,
        whose first ``start`` positions hold the prompt's beginning. Returns the logits (vocab,) that
        follow the chunk's last token, or None without ``logits`` (a chunk that is not the last)."""
        lm = self.model.language_model
        T = embeds.shape[1]
        positions = torch.arange(start, start + T, device=embeds.device)[None]  # (1, T)
        mask = causal_mask(start, T, embeds.device) if start else None  # (1, 1, T, start + T)
        # the cache and the last position's state are all a prefill needs of the last layer
        hidden = lm.hidden_states(embeds, positions, mask, cache.chunk(slice(slot, slot + 1), start), keep_last=1)
        return lm.logits(hidden[0, -1]) if logits else None

    @torch.inference_mode()
    def step(self, cache: KVCache, tokens: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """One decode step over slots 0 .. n - 1: slot r feeds tokens[r] at position lengths[r] (the
        positions it holds) and attends to its first lengths[r] + 1 positions, read from the first
        ``width`` of each slot. tokens, lengths (n,) -> logits (n, vocab).

        A slot with nothing to decode may run along (its row is ignored): it writes only at its own
        length, past what it holds, which the next write there replaces.
        """
        if self.compiled:
            try:
                # the compile caches on disk also key on our kernels' build (kernels.compile_cache_tag)
                with torch.compiler.config.patch(cache_key_tag=self._cache_tag):
                    return self._step(cache, tokens, lengths, width)
            except Exception as err:  # no C++ compiler for inductor, an op it cannot trace: run uncompiled
                from torch._dynamo.exc import TorchDynamoException
                from torch._inductor.exc import CppCompileError

                if not isinstance(err, (TorchDynamoException, CppCompileError)):
                    raise
                needs = ("on a GPU, triton (part of the CUDA builds of torch on Linux)" if tokens.device.type == "cuda"
                         else "a C++ compiler, e.g. apt-get install g++")
                self.compile_error = (f"torch.compile of the decoding step failed ({type(err).__name__}: "
                                      f"{(str(err).strip().splitlines() or [''])[0][:200]}); decoding runs "
                                      f"uncompiled (inductor needs {needs})")
                warnings.warn(self.compile_error, stacklevel=2)
                self.compiled, self._step = False, self._step_eager
        return self._step_eager(cache, tokens, lengths, width)

    def _compiled_step(self):
        """torch.compile of this engine's own copy of ``_step_eager``: dynamo keeps its compiled graphs
        per code object, so engines sharing one (several models in a process, one after another) would
        pile their graphs, guarded on each model's weights, into one list, and past its limit of 8 run
        uncompiled without a word."""
        fn = Engine._step_eager
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
        # a graph cached on disk by an older build of our kernels must not be taken for this build's: torch
        # keys its caches on the traced graph, which names our ops but not what they return
        ours = kernels.compile_cache_tag()
        self._cache_tag = " ".join(t for t in (torch.compiler.config.cache_key_tag, ours) if t)
        # emulate_precision_casts: a fused bfloat16 / float16 kernel rounds each intermediate to the dtype
        # where eager torch does (without it inductor keeps them in float32, and a bfloat16 step's logits
        # moved by 2 bf16 steps, enough to change a greedy token); float32 steps are unaffected
        return torch.compile(types.MethodType(own, self), dynamic=True, options={"emulate_precision_casts": True})

    @torch.inference_mode()
    def warm_up(self, max_rows: int = ENGINE_MAX_SLOTS) -> None:
        """With ``compile``: compile the decoding step now, so that the first request does not wait for
        it. torch.compile specialises sizes of 1, so three graphs: one row in a one-slot cache, one row in
        a wider one and several rows; any later width or slot count reuses them, and so does any row count
        up to the first of the products' row limits (``row_limits``: past 16 rows a float32 product leaves
        the kernel for oneDNN, and the graph is guarded there). Up to ``max_rows`` rows (a scheduler's
        slots), each further stretch between limits gets its graph too: otherwise the first step past a
        limit would compile, for minutes, while every stream waited. Graphs already made are kept. Run in
        inference mode, as the scheduler runs the steps (a guard tells the two kinds of tensor apart).
        The sizes differ from each other and from the model's KV heads and head size: torch.compile
        ties sizes that are equal when it traces ("duck sizing"), and would compile again when they
        are not (tracing with that turned off took many times as long: a symbol for every size of
        every layer's cache)."""
        if not self.compiled:
            return
        lm = self.model.language_model
        taken = {1, lm.config.num_key_value_heads, lm.config.head_dim}

        def fresh(size: int) -> int:
            while size in taken:
                size += 1
            taken.add(size)
            return size

        rows, wide, width = fresh(2), fresh(3), fresh(9)
        length = fresh(width + 8)
        plans = [(1, 1), (wide, 1), (wide, rows)]
        for limit in sorted(self.row_limits()):
            if rows <= limit < max_rows:  # rows up to the limit share a graph; one past it starts the next
                n = fresh(limit + 1)
                plans.append((fresh(n + 1), n))
        for slots, n in plans:
            if (slots > 1, n) in self._warmed:  # (a slot count above 1 is a symbol: any of them will do)
                continue
            self._warmed.add((slots > 1, n))
            cache = lm.new_cache(slots, length)
            cache.reserve(slots, length)
            self.step(cache, torch.zeros(n, dtype=torch.long, device=cache.device),
                      torch.full((n,), width - 2, dtype=torch.long, device=cache.device), width)

    def row_limits(self) -> set[int]:
        """The row counts past which some product of the LLM takes another path (weights.*.row_limits)."""
        return {limit for module in self.model.language_model.modules() if hasattr(module, "row_limits")
                for limit in module.row_limits()}

    def _step_eager(self, cache: KVCache, tokens: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        lm = self.model.language_model
        key_valid = torch.arange(width, device=lengths.device)[None, :] <= lengths[:, None]  # (n, width)
        embeds = lm.model.embed_tokens(tokens[:, None])  # (n, 1, hidden)
        hidden = lm.hidden_states(embeds, lengths[:, None], key_valid[:, None, None, :], cache.step(lengths, width))
        return lm.logits(hidden[:, -1])  # (n, vocab)

    # -- conveniences over the engine's own scheduler --------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        """The engine's own scheduler (created on first use): no thread, it runs in the reader's."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self, max_slots=ENGINE_MAX_SLOTS, max_waiting=None, background=False)
        return self._scheduler

    def generate(self, batch: Sequence[Prepared], params: SamplingParams | Sequence[SamplingParams],
                 on_result: Callable[[Generation], object] | None = None) -> list[Generation]:
        """Run requests together (each with its own settings, or all with the same); their Generations.
        A request's greedy output is the same as running it alone. A beam search (``num_beams`` > 1)
        decodes its beams in as many slots, beside the other requests (``generation.beam``).
        ``on_result`` is called with each result as it is collected, in order (a progress bar's update, a
        transcript written as it comes)."""
        per_request = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(per_request) != len(batch):
            raise ValueError(f"{len(batch)} requests but {len(per_request)} SamplingParams")
        streams = []
        try:
            for prepared, settings in zip(batch, per_request):  # one refused: those submitted before it stop
                streams.append(self.scheduler.submit(prepared, settings))
            results = []
            for stream in streams:
                results.append(stream.wait())
                if on_result is not None:
                    on_result(results[-1])
            return results
        finally:
            for stream in streams:  # an error or an interrupt: the others stop too
                if not stream.done:
                    stream.cancel()

    def stream(self, request: Prepared, params: SamplingParams) -> RequestStream:
        """Text deltas of one request as they are decoded; ``result`` is complete at the end. A beam
        search (``params.num_beams`` > 1) gives the tokens every beam agrees on as they settle, and the
        rest at its end."""
        return self.scheduler.submit(request, params)
