"""The Python API: load a checkpoint directory, then chat, stream, batch and transcribe.

    from qwen2audio import Qwen2Audio
    model = Qwen2Audio.load("Qwen2-Audio-7B-Instruct", dtype="bfloat16")
    reply = model.chat([{"role": "user", "content": [
        {"type": "audio", "audio": "glass.wav"}, {"type": "text", "text": "What's that sound?"}]}])
    print(reply.text)
    for delta in model.stream(messages): print(delta, end="")
    conv = model.conversation(); conv.say(audio="question.wav").text; conv.stream("And in French?")

Chat replies (chat, stream, chat_batch, conversations) decode with the checkpoint's own defaults from
its generation_config.json, as transformers does (the official Instruct model samples); keyword
arguments override them, and temperature=0 is greedy (so is beam search, num_beams=N, unless a
temperature above 0 is given: then it is beam sampling). ``complete`` and ``transcribe`` (``transcript``: the same with segments and
their times) are greedy unless told otherwise, as the official evaluation decodes.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .audio import SAMPLE_RATE, load_audio
from .audio.features import chunk_samples, pause_samples, speech_windows
from .checkpoint import load_model
from .checkpoint.adapter import merge_adapter
from .checkpoint.adapter import resolve as resolve_adapter
from .checkpoint.files import GENERATION_FILE, check_preprocessor_config
from .errors import CheckpointError
from .generation.engine import Engine, Generation, Prepared, RequestStream
from .generation.scheduler import RequestTooLarge, Scheduler
from .generation.params import (
    QUANTIZE_CHOICES,
    SamplingParams,
    chat_settings,
    check_setting_names,
    generation_settings,
    sampling_params,
    transcription_cuts,
    transcription_decoding,
    transcription_defaults,
)
from .text import Tokenizer, raw_prompt, render_chat
from .text.transcripts import Segment, Transcript, with_no_speech

Messages = Sequence[Mapping[str, Any]]
ASR_PROMPT = "Detect the language and recognize the speech: <|{language}|>"


def speech_prompt(language: str = "en", translate_to: str | None = None) -> str:
    """The base model's official prompt for speech in ``language``: recognition (the ASR prompt), or with
    ``translate_to`` translation into that language (the evaluation's CoVoST 2 prompt, which names it:
    en -> English, zh -> Mandarin, ...). The language tag is the code's language part in lower case, as the
    official prompts write it: en-US and EN give <|en|>; a code not among Whisper's languages (the tags
    Qwen2-Audio was trained with) raises ValueError."""
    from .eval.translation import LANGUAGE_NAMES, TRANSLATION_PROMPT
    from .text.languages import check_language, language_code

    language = check_language(language)
    if translate_to is None:
        return ASR_PROMPT.format(language=language)

    target = LANGUAGE_NAMES.get(language_code(translate_to)) if isinstance(translate_to, str) else None
    if target is None:
        raise ValueError(f"translate_to={translate_to!r}: no name for that language in the translation prompt; "
                         f"give one of {', '.join(sorted(LANGUAGE_NAMES))}")
    return TRANSLATION_PROMPT.format(target=target, source=language)


def decode_audio(source: Any) -> np.ndarray:
    """A chat audio source (path, bytes, array at 16 kHz, or (array, sample_rate)) -> 16 kHz mono float32."""
    if isinstance(source, tuple) and len(source) == 2:
        return load_audio(source[0], sample_rate=source[1])
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return load_audio(source, sample_rate=SAMPLE_RATE)
    return load_audio(source)


DEVICE_CHOICES = "cpu, cuda, cuda:N or mps"


def quantize_off_cpu(quantize: str | None, device: str | torch.device) -> bool:
    """Whether ``quantize`` asks for int8 on a device other than the CPU (its kernel is a CPU one); ``device``
    one that ``device_problem`` passed."""
    return quantize == "int8" and torch.device(device).type != "cpu"


def device_problem(device: str | torch.device) -> str | None:
    """What keeps ``device`` from running a model here (one sentence), or None when it can."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"not a torch device; use {DEVICE_CHOICES}"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return (f"this PyTorch build has no CUDA support (torch {torch.__version__}); "
                    "install a CUDA build of PyTorch, see README")
        count = torch.cuda.device_count()
        if count == 0:
            return "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        if dev.index is not None and dev.index >= count:
            return f"there {'is' if count == 1 else 'are'} only {count} CUDA GPU(s), numbered from 0"
        return None
    if dev.type == "mps":
        return None if torch.backends.mps.is_available() else "MPS (Apple GPU) is not available in this PyTorch"
    return f"not supported for running a model; use {DEVICE_CHOICES}"


class Qwen2Audio:
    def __init__(self, engine: Engine, directory: Path, generation_defaults: Mapping[str, Any] | None = None,
                 transcription: Mapping[str, Any] | None = None):
        self.engine = engine
        self.directory = directory
        # SamplingParams keyword arguments from the checkpoint's generation_config.json, for chat replies
        self.generation_defaults: dict[str, Any] = dict(generation_defaults or {})
        # how transcribe cuts long audio unless told: that file's "transcription" object, or 30 s windows
        self.transcription_defaults: dict[str, Any] = dict(
            transcription if transcription is not None else transcription_defaults(directory / GENERATION_FILE))

    @classmethod
    def load(cls, directory: str | Path | None = None, dtype: str | torch.dtype | None = "auto",
             device: str | torch.device = "cpu", quantize: str | None = None,
             compile: bool = False, adapter: str | Path | None = None) -> "Qwen2Audio":
        """Load a Qwen2-Audio checkpoint directory; None loads the default model (qwen2audio.default_model).
        ``adapter``: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as the
        official fine-tuning script saves with --lora) merged into the weights; ``directory`` may also be
        such a folder itself, whose base_model_name_or_path is a local checkpoint folder.
        ``quantize="int8"``: weight-only int8 for the LLM's products (CPU; faster decoding, slightly
        different numbers). ``compile=True``: decoding steps through torch.compile (faster steps; the
        first reply waits for the compile)."""
        if quantize not in (None, *QUANTIZE_CHOICES):
            raise ValueError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        problem = device_problem(device)
        if problem:
            raise ValueError(f"device {str(device)!r}: {problem}")
        if quantize_off_cpu(quantize, device):
            raise ValueError(f"quantize='int8' runs on CPU only (its kernel is a CPU one); got device "
                             f"{str(device)!r}: drop quantize or use device='cpu'")
        directory, adapter = resolve_adapter(directory, adapter)  # a bad adapter is told before the weights
        if directory is None:
            from .default_model import default_model_dir, default_notice

            warnings.warn(default_notice(), stacklevel=2)
            directory = default_model_dir()
        directory = Path(directory)
        # the small file first: a mistake in it is told before the weights take seconds to load
        defaults, transcription, stops = generation_settings(directory / GENERATION_FILE)
        model = load_model(directory, dtype=dtype, device=device)
        if adapter is not None:
            merge_adapter(model, adapter)
        tokenizer = Tokenizer.from_dir(directory)
        try:
            tokenizer.set_stop_ids(stops)  # the file's eos_token_id, as transformers' generate() stops
        except ValueError as err:
            raise CheckpointError(f"{directory / GENERATION_FILE}: eos_token_id: {err}") from None
        dither = check_preprocessor_config(directory, model.config.audio.num_mel_bins)  # read (and checked) again
        engine = Engine(model, tokenizer, quantize=quantize, compile=compile, dither=dither)
        engine.warm_up()
        return cls(engine, directory, defaults, transcription)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler every call here goes through (the engine's own, run in the caller's thread).
        A server builds its own instead: ``Scheduler(model.engine, max_slots=..., max_waiting=...)``."""
        return self.engine.scheduler

    # -- requests --------------------------------------------------------------------------------
    def prepare_chat(self, messages: Messages) -> Prepared:
        rendered = render_chat(messages)
        return self.engine.prepare(rendered.text, [decode_audio(a) for a in rendered.audios])

    def prepare_raw(self, prompt: str, audios: Sequence[Any] = ()) -> Prepared:
        """A base-model prompt: <|audio_bos|><|AUDIO|><|audio_eos|> per clip, then ``prompt``. ``audios``: a
        list of clips (one path, bytes or array alone is one clip)."""
        pair = (isinstance(audios, tuple) and len(audios) == 2 and isinstance(audios[1], numbers.Real)
                and not isinstance(audios[1], bool))  # (samples, rate): 16000, 16000.0 or np.int64(16000)
        if pair or isinstance(audios, (str, os.PathLike, bytes, bytearray, np.ndarray, torch.Tensor)):
            audios = [audios]
        return self.engine.prepare(raw_prompt(prompt, len(audios)), [decode_audio(a) for a in audios])

    # -- generation ------------------------------------------------------------------------------
    def chat_sampling(self, **sampling) -> SamplingParams:
        """The settings of a chat reply: the checkpoint's defaults, overridden by ``sampling``
        (``generation.params.chat_settings``: num_beams alone is greedy beam search, with a temperature beam
        sampling; a temperature or stop strings alone decode one beam)."""
        check_setting_names("chat", sampling)  # the caller's own names (max_tokens: no such setting)
        return SamplingParams(**chat_settings(self.generation_defaults, sampling))

    def chat(self, messages: Messages, **sampling) -> Generation:
        return self.engine.generate([self.prepare_chat(messages)], self.chat_sampling(**sampling))[0]

    def stream(self, messages: Messages, **sampling) -> RequestStream:
        """Iterate over the reply's text deltas; the stream's ``result`` is the whole Generation."""
        return self.engine.stream(self.prepare_chat(messages), self.chat_sampling(**sampling))

    def chat_batch(self, conversations: Sequence[Messages], **sampling) -> list[Generation]:
        """Several conversations decoded together; greedy results equal running each alone."""
        if isinstance(conversations, Mapping) or (
                isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], Mapping)):
            raise ValueError("chat_batch takes a list of conversations, each a list of messages; this is one "
                             "conversation: wrap it in a list ([messages]), or use chat(messages)")
        prepared = []
        for i, messages in enumerate(conversations):
            try:
                prepared.append(self.prepare_chat(messages))
            except ValueError as err:  # which conversation of the batch: their messages are all "messages[0]"
                try:
                    told = type(err)(f"conversations[{i}]: {err}")  # an AudioError stays one
                except Exception:  # noqa: BLE001 - a subclass with other arguments
                    told = ValueError(f"conversations[{i}]: {err}")
                raise told from None
        return self.engine.generate(prepared, self.chat_sampling(**sampling))

    def complete(self, prompt: str, audios: Sequence[Any] = (), **sampling) -> Generation:
        return self.engine.generate([self.prepare_raw(prompt, audios)], sampling_params("complete", **sampling))[0]

    def transcribe(self, audio: Any, language: str = "en", fallback: bool | None = None,
                   chunk_seconds: float | None = None, cut_at_pauses: float | None = None,
                   progress: bool | None = None, translate_to: str | None = None, **sampling) -> str:
        """Plain transcript with the official ASR prompt of the base model; tags like <|en|> removed:
        ``transcript(...).text``, where the arguments are described."""
        return self.transcript(audio, language, fallback, chunk_seconds, cut_at_pauses, progress, translate_to,
                               **sampling).text

    def translate(self, audio: Any, to: str = "en", language: str = "en", **options) -> str:
        """The speech (in ``language``) translated into ``to`` with the official speech-translation prompt:
        ``transcript(audio, language, translate_to=to, ...).text``."""
        return self.transcript(audio, language, translate_to=to, **options).text

    def transcript(self, audio: Any, language: str = "en", fallback: bool | None = None,
                   chunk_seconds: float | None = None, cut_at_pauses: float | None = None,
                   progress: bool | None = None, translate_to: str | None = None,
                   on_segment: Callable[[Segment], object] | None = None, no_speech: bool = False,
                   **sampling) -> Transcript:
        """A transcript with the official ASR prompt of the base model, as segments with their times: a
        ``Transcript`` (``.text``, ``.segments``: start and end in seconds, text with tags like <|en|>
        removed, token ids, the temperature it was decoded at; ``.duration``), which
        ``qwen2audio.text.transcripts.render`` writes as srt, vtt or OpenAI's verbose_json.

        Audio longer than ``chunk_seconds`` (at most 30, the encoder's window; by default 30) is cut in
        pauses between speech (or, where none is heard, where it is quietest) into chunks of at most that
        length (``cut_windows``), transcribed together in one batch, each with its own prompt, one segment
        each, their texts joined by a space (none in Chinese, Japanese or Thai), as the server's are: the
        model answers one window at a time, as it was trained (one prompt holding minutes of audio gets
        a sentence or two back). ``cut_at_pauses``: also cut in every pause between speech of at least this
        many seconds (0.3 suits speech; 0: no such cuts), so that each chunk holds one stretch of speech: for a
        model trained on short utterances, such as the demo model; then what the voice-activity detector
        hears no speech in (0.5 s of it is kept on each side of speech: ``cut_windows``) is not transcribed, and audio
        with no speech at all gives no segment and "". Either left at None takes the checkpoint's
        own setting (``transcription_defaults``: the "transcription" object of its generation_config.json;
        the demo model cuts at pauses of 0.3 s), else 30 s windows and no pause cuts. ``fallback``: a
        repetitive answer is decoded again at rising temperatures (Whisper's guard against loops;
        qwen2audio.generation.fallback). Decoding is greedy, as the official evaluation decodes, unless
        ``sampling`` says otherwise or the checkpoint's "transcription" object asks for beams
        (``num_beams``, used where ``sampling`` gives neither num_beams nor a temperature above 0) or the
        fallback (``fallback=None``: the checkpoint's, else off): the demo model transcribes with 4 beams
        and the fallback, which write 15 % fewer wrong words on its held-out speech than greedy
        decoding (docs/demo-model.md); ``num_beams=1, fallback=False`` is greedy. ``progress``: a bar on
        stderr counting the chunks transcribed (None: on a terminal, when there are several). ``logprobs=0``
        (or N): each segment's tokens' log-probabilities.
        ``translate_to``: a translation into that language instead, with the official speech-translation
        prompt (``speech_prompt``), ``language`` naming the language spoken. ``on_segment``: called with each
        segment in order as soon as it and those before it are decoded, to write a long transcript as it
        comes (with ``fallback``, once the retries are done). ``no_speech``: each segment of the transcript
        also gets a ``no_speech_prob`` (OpenAI's verbose_json field), from the voice-activity detector
        (``qwen2audio.text.transcripts.with_no_speech``; not passed to ``on_segment``)."""
        if fallback is not None and not isinstance(fallback, bool):  # transcribe(audio, "en", 2): 2 was fallback
            raise TypeError(f"fallback must be True, False or None (the checkpoint's), got {fallback!r}; "
                            "give decoding settings by name (max_new_tokens=...)")
        if on_segment is not None and not callable(on_segment):
            raise TypeError(f"on_segment must be a function called with each segment, got {on_segment!r}")
        if isinstance(audio, (list, tuple)) and len(audio) > 1 and all(isinstance(a, (str, os.PathLike))
                                                                          for a in audio):
            raise ValueError(f"one clip at a time: got {len(audio)} paths in a {type(audio).__name__}; call it once "
                             "per file (`qwen2audio transcribe` takes several files)")
        check_setting_names("transcript", sampling)
        chunk_seconds, cut_at_pauses = transcription_cuts(self.transcription_defaults, chunk_seconds, cut_at_pauses)
        sampling, fallback = transcription_decoding(self.transcription_defaults, sampling, fallback)
        prompt = speech_prompt(language, translate_to)
        wave = decode_audio(audio)
        windows = speech_windows(wave, chunk_samples(chunk_seconds), pause_samples(cut_at_pauses))
        params = SamplingParams(**sampling)
        prepared = [self.engine.prepare(raw_prompt(prompt, 1), [window.audio]) for window in windows]  # decoded
        if prepared:  # capped once for every chunk, with one warning (each chunk's would name its own length)
            longest = max(len(p.token_ids) for p in prepared)
            params = dataclasses.replace(params, max_new_tokens=self.scheduler.room(params.max_new_tokens, longest))
        if progress is None:  # tqdm's None: shown on a terminal only
            hidden = True if len(windows) < 2 else None
        else:
            hidden = not progress
        segments: list[Segment] = []

        def segment(g: Generation, temperature: float) -> Segment:
            segments.append(Segment.decoded(windows[len(segments)], g.text, g, temperature))
            if on_segment is not None:
                on_segment(segments[-1])
            return segments[-1]

        with tqdm(total=len(windows), unit="chunk", desc="transcribing", file=sys.stderr, leave=False,
                  disable=hidden) as bar:
            if fallback and prepared:
                from .generation.fallback import fallback_with_temperatures

                outs = fallback_with_temperatures(self.engine, prepared, params, on_result=lambda _: bar.update())
                for g, temperature in outs:
                    segment(g, temperature)
            elif prepared:
                self.engine.generate(prepared, params,
                                     on_result=lambda g: (segment(g, params.temperature), bar.update()))
        return Transcript(with_no_speech(segments, wave) if no_speech else segments, wave.shape[0] / SAMPLE_RATE)

    def conversation(self, system: str | None = None) -> "Conversation":
        return Conversation(self, system)


class Conversation:
    """A multi-turn chat whose history stays in the scheduler's KV cache between turns (a session).

    Each turn renders the whole conversation with the official template (so the model sees exactly
    what a stateless call would give it); the scheduler runs only the tokens past the longest prefix
    its cache holds for this conversation, and audio already heard is not encoded again.
    """

    _ids = itertools.count()

    def __init__(self, model: Qwen2Audio, system: str | None = None):
        self.model = model
        # "" is a system message too: the official template's only way to leave out its default one
        self.messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        self._audio_vectors: dict[str, torch.Tensor] = {}
        self.last: Generation | None = None  # the latest reply, complete once its stream is consumed
        # the reply still being streamed, held weakly: a stream its reader drops is withdrawn at once
        self._pending: weakref.ref[Iterator[str]] | None = None
        self.session = ("conversation", next(self._ids))  # the scheduler's key for this history
        weakref.finalize(self, model.scheduler.end_session, self.session)  # its cache goes with it

    def say(self, text: str | None = None, audio: Any = None, **sampling) -> Generation:
        """Add a user turn (text, one audio or a list of audios, or both); return the whole reply."""
        stream = self.stream(text, audio, **sampling)
        for _ in stream:
            pass
        return self.last

    def stream(self, text: str | None = None, audio: Any = None, **sampling) -> Iterator[str]:
        """Add a user turn and stream the reply's text deltas.

        The user turn joins the history when the stream is first read, and the reply once it is read to
        the end. A stream left unfinished (closed, dropped, or followed by a new turn) takes its user
        turn back out of the history, as if it had not been asked, and stops decoding.
        """
        pending = self._pending() if self._pending is not None else None
        if pending is not None:  # an unfinished earlier reply: withdraw that turn (one never read has none)
            pending.close()
        self._pending = None
        if audio is None:
            audios = []
        elif isinstance(audio, list):
            audios = audio
        else:
            audios = [audio]
        # Decoded once, here: later turns re-render the history without reading the files again.
        parts: list[dict[str, Any]] = [{"type": "audio", "audio": decode_audio(a)} for a in audios]
        if text:
            parts.append({"type": "text", "text": text})
        if not parts:
            raise ValueError("a turn needs text, audio or both")
        params = self.model.chat_sampling(**sampling)
        reply = self._reply({"role": "user", "content": parts}, params)
        self._pending = weakref.ref(reply)
        return reply

    def _reply(self, turn: dict[str, Any], params: SamplingParams) -> Iterator[str]:
        stream, answered = None, False
        self.messages.append(turn)
        try:
            rendered = render_chat(self.messages)
            try:
                request = self.model.engine.prepare(rendered.text, rendered.audios,  # decoded by their turns
                                                    self._audio_vectors)
            except RequestTooLarge as err:
                if sum(m["role"] == "user" for m in self.messages) < 2:
                    raise
                raise RequestTooLarge(f"{err}. The prompt is this conversation's whole history, which every turn "
                                      "lengthens: start a new conversation (model.conversation())") from None
            if params.beams:  # a beam search does not continue the session (its history is prefilled again)
                stream = self.model.engine.stream(request, params)
            else:
                stream = self.model.scheduler.submit(request, params, session=self.session)
            yield from stream
            answered = stream.result.finish_reason in ("stop", "length")
        finally:
            if not answered:
                if stream is not None:
                    stream.cancel()  # a reader gone: free the slot at the next step
                if self.messages and self.messages[-1] is turn:
                    self.messages.pop()  # the turn was not answered
        if not answered:
            return
        reply = self.last = stream.result
        self.messages.append({"role": "assistant", "content": reply.text})
        for key, vectors in zip(request.audio_keys, request.audio_embeds):
            if vectors is not None:  # None: a clip the cache held already, so never encoded
                self._audio_vectors[key] = vectors
