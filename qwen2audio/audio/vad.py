"""Where speech is and where it pauses: Silero VAD (the ``silero-vad`` package, MIT; its model ships inside
the wheel, so nothing is downloaded).

A neural voice-activity detector tells speech from silence, noise, music and other sounds, so a pause is
found in a recording with steady background noise too, where an energy threshold finds none (the demo
model's long-recording figures in docs/demo-model.md compare the two). One model serves the process,
loaded on first use (about 50 ms); a lock lets one caller run it at a time (it keeps state between its
31 ms steps). It reads about two minutes of audio per second on one core.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from .features import SAMPLE_RATE

_lock = threading.Lock()
_model = None


def _vad():
    global _model
    if _model is None:
        from silero_vad import load_silero_vad

        with warnings.catch_warnings():  # its loader's importlib.resources.path and torch.jit.load
            warnings.simplefilter("ignore", DeprecationWarning)
            _model = load_silero_vad()
    return _model


def speech_spans(audio, min_pause_samples: int) -> list[tuple[int, int]]:
    """``(start, end)`` sample spans of speech in 16 kHz mono ``audio``: Silero VAD's speech timestamps with
    its default speech threshold (0.5) and no padding; a pause shorter than ``min_pause_samples`` does not
    end a span."""
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    from silero_vad import get_speech_timestamps

    with _lock, torch.inference_mode():
        spans = get_speech_timestamps(samples, _vad(), sampling_rate=SAMPLE_RATE, speech_pad_ms=0,
                                      min_silence_duration_ms=1000.0 * min_pause_samples / SAMPLE_RATE)
    return [(int(s["start"]), int(s["end"])) for s in spans]


FRAME = 512  # samples: the 32 ms step Silero VAD reads at 16 kHz


def no_speech_probability(audio) -> float:
    """1 minus the highest probability of speech Silero VAD gives any 32 ms frame of 16 kHz mono ``audio``
    (a last partial frame padded with zeros): what Whisper's ``no_speech_prob`` says of a segment, from a
    detector rather than from the model's own first token (which this model has no counterpart of). Empty
    audio: 1."""
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if samples.numel() == 0:
        return 1.0
    samples = torch.nn.functional.pad(samples, (0, max(0, FRAME - samples.numel())))  # it refuses less than a frame
    with _lock, torch.inference_mode():
        # every frame's probability, from a clean state, the last frame padded: the detector's own loop
        return 1.0 - float(_vad().audio_forward(samples, SAMPLE_RATE).max())


def find_pauses(audio, min_samples: int) -> list[tuple[int, int]]:
    """The pauses between speech in ``audio`` of at least about ``min_samples``: ``(start, end)`` sample
    spans from the end of one stretch of speech to the start of the next. Anything that is not speech is
    part of a pause (silence, noise, a doorbell); what comes before the first speech or after the last is
    not a pause (nothing to separate there), and audio with no speech has none."""
    spans = speech_spans(audio, min_samples)
    return [(end, start) for (_, end), (start, _) in zip(spans, spans[1:])]
