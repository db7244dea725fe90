"""Transcripts in the response formats of OpenAI's audio endpoints: json, text, srt, vtt, verbose_json.

A transcript is a list of segments, one per window of the audio it transcribed (``Qwen2Audio.transcript``;
the server's serve/transcription.py), with start and end times in seconds. Subtitle cues get a line of text
each: line breaks inside a segment would end the cue early, and ``-->`` would read as a timing line, so
both are replaced; WebVTT also needs ``&`` and ``<`` escaped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..audio.features import SAMPLE_RATE
from ..generation.fallback import compression_ratio
from .tags import TAG

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}
HOP_SECONDS = 0.01  # Whisper's mel hop (10 ms): a segment's "seek" is its start in these frames


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)  # generated token ids
    temperature: float | None = None  # the one its text was decoded at, when not the request's (fallback)
    logprobs: list | None = None  # its tokens' TokenLogprob, when the request asked for them
    prompt_tokens: int = 0  # its prompt's tokens, audio included (a streamed transcript's usage)
    no_speech_prob: float | None = None  # verbose_json's: from the voice-activity detector (with_no_speech)

    @classmethod
    def decoded(cls, window, text: str, result, temperature: float | None = None) -> Segment:
        """The segment of a window (``qwen2audio.audio.Window``: start and samples at 16 kHz) that decoded
        to ``text`` (tags such as <|en|> removed here) as ``result`` (a ``Generation``: token ids, logprobs,
        prompt tokens); ``temperature``: the one it was decoded at, when not the request's (fallback)."""
        return cls(window.start / SAMPLE_RATE, (window.start + window.audio.shape[0]) / SAMPLE_RATE,
                   TAG.sub("", text).strip(), list(result.token_ids), temperature, result.logprobs,
                   result.prompt_tokens)


def with_no_speech(segments: list[Segment], audio) -> list[Segment]:
    """The segments, each with its ``no_speech_prob``: 1 minus the highest probability of speech Silero VAD
    finds in its stretch of ``audio`` (16 kHz mono, the whole recording the segments' times point into;
    ``qwen2audio.audio.vad``). About 0.3-0.6 s per 30 s of audio on one core (the detector runs its 32 ms
    steps one after another)."""
    from ..audio.vad import no_speech_probability  # torch and the detector: only where asked for

    return [replace(s, no_speech_prob=round(no_speech_probability(
        audio[round(s.start * SAMPLE_RATE):round(s.end * SAMPLE_RATE)]), 4)) for s in segments]


# scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, CJK punctuation, kana, CJK
# ideographs (and extension A, compatibility, extensions B-F), full- and half-width forms
UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                      "\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]")


def separator(before: str, after: str) -> str:
    """What joins two windows' texts: a space, unless the one's last or the other's first character is of
    a script written without spaces (Chinese, Japanese, Thai...: "很好" + "然后" stays "很好然后")."""
    if not before or not after:
        return ""
    return "" if UNSPACED.match(before[-1]) or UNSPACED.match(after[0]) else " "


def full_text(segments: list[Segment]) -> str:
    """The segments' texts, one after another, each pair joined by ``separator``."""
    text = ""
    for s in segments:
        if s.text:
            text += separator(text, s.text) + s.text
    return text


@dataclass(frozen=True)
class Transcript:
    """What ``Qwen2Audio.transcript`` gives: a segment per window transcribed, and the audio's length (a
    window the voice-activity detector heard no speech in has no segment, so the last may end earlier)."""

    segments: list[Segment]
    duration: float  # seconds of audio

    @property
    def text(self) -> str:
        """The segments' texts joined by a space, none in Chinese, Japanese or Thai (``separator``;
        ``Qwen2Audio.transcribe``'s answer)."""
        return full_text(self.segments)


def render(fmt: str, segments: list[Segment], *, task: str, language: str, duration: float,
           temperature: float, logprobs: list[dict[str, Any]] | None = None,
           usage: dict[str, Any] | None = None) -> tuple[str, str]:
    """(body, media type) of a transcript in format ``fmt`` (one of FORMATS); ``logprobs``: the generated
    tokens' entries (token, logprob, bytes) that the json format carries when the client asked for them;
    ``usage``: OpenAI's usage object, which json and verbose_json carry when given."""
    if logprobs is not None and fmt != "json":
        raise ValueError(f"logprobs come with the json response format only, not {fmt!r}")
    if usage is not None and fmt not in ("json", "verbose_json"):
        raise ValueError(f"usage comes with the json and verbose_json response formats only, not {fmt!r}")
    extra = {} if usage is None else {"usage": usage}
    if fmt == "json":
        body = json.dumps({"text": full_text(segments), **({} if logprobs is None else {"logprobs": logprobs}),
                           **extra}, ensure_ascii=False)
    elif fmt == "text":
        body = full_text(segments) + "\n"
    elif fmt == "srt":
        body = srt(segments)
    elif fmt == "vtt":
        body = vtt(segments)
    elif fmt == "verbose_json":
        body = json.dumps({**verbose_json(segments, task, language, duration, temperature), **extra},
                          ensure_ascii=False)
    else:
        raise ValueError(f"unknown response format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return body, MEDIA_TYPES[fmt]


def verbose_json(segments: list[Segment], task: str, language: str, duration: float,
                 temperature: float) -> dict[str, Any]:
    """OpenAI's verbose_json, without word timestamps (which this model does not compute). A segment's
    temperature is the one its text was decoded at (higher than the request's where the server's
    --fallback decoded a repetitive window again); its avg_logprob, as Whisper's, the mean log-probability
    of its generated tokens, the stop token included (when its logprobs were computed); its
    no_speech_prob, where ``with_no_speech`` gave it one, the voice-activity detector's."""
    return {"task": task, "language": language, "duration": seconds(duration), "text": full_text(segments),
            "segments": [{"id": i, "seek": round(s.start / HOP_SECONDS), "start": seconds(s.start),
                          "end": seconds(s.end), "text": s.text, "tokens": s.tokens,
                          "temperature": temperature if s.temperature is None else s.temperature,
                          "compression_ratio": round(compression_ratio(s.text), 3),
                          **({} if not s.logprobs else {"avg_logprob": avg_logprob(s.logprobs)}),
                          **({} if s.no_speech_prob is None else {"no_speech_prob": s.no_speech_prob})}
                         for i, s in enumerate(segments)]}


def seconds(value: float) -> float:
    """A time as the JSON formats give it (verbose_json and the streamed segments alike): to the millisecond."""
    return round(value, 3)


def avg_logprob(logprobs: list) -> float:
    """Whisper's avg_logprob of a segment: its tokens' summed log-probability over their number."""
    return round(sum(lp.logprob for lp in logprobs) / len(logprobs), 4)


def timestamp(seconds: float, decimal: str) -> str:
    """12.5 -> 00:00:12,500 (srt: decimal ",") or 00:00:12.500 (vtt: decimal ".")."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cue_text(text: str) -> str:
    """A cue's text on one line, with no "-->" left in it ("--->" made one again by a single replace)."""
    return re.sub(r"-{2,}>", "->", " ".join(text.split()))


def srt(segments: list[Segment], first: int = 1) -> str:
    """SubRip cues of the segments with text, numbered from ``first`` (a transcript written a piece at a
    time continues the numbering)."""
    cues = [s for s in segments if _cue_text(s.text)]
    return "".join(f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{_cue_text(s.text)}\n\n"
                   for i, s in enumerate(cues, first))


def vtt(segments: list[Segment], header: bool = True) -> str:
    """WebVTT: the header (unless ``header`` is False: more cues of a file already begun), then a cue per
    segment with text."""
    cues = [s for s in segments if _cue_text(s.text)]
    escaped = (_cue_text(s.text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for s in cues)
    return ("WEBVTT\n\n" if header else "") + "".join(f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{text}\n\n"
                                                      for s, text in zip(cues, escaped))


def has_cue(segment: Segment) -> bool:
    """Whether srt and vtt give the segment a cue (its text is not blank)."""
    return bool(_cue_text(segment.text))
