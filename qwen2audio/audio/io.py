"""Decode whatever audio a user has into the one form the model reads: float32 mono 16 kHz samples.

    load_audio("speech.mp3")                      # a path (str or pathlib.Path)
    load_audio(request_body, name="upload.webm")  # the raw bytes of a file
    load_audio(open("speech.flac", "rb"))         # a binary file object
    load_audio(samples, sample_rate=44100)        # samples already in memory (numpy, torch or a list)

Files are decoded by libsndfile (soundfile: wav, flac, ogg/vorbis, ogg/opus, mp3 and the other
formats it lists) and, when it cannot read them, by FFmpeg through PyAV (m4a/aac, mp4, webm/opus as
recorded by a browser's MediaRecorder, ...). Integer PCM is scaled to [-1, 1), channels are averaged
to mono, and the rate is converted to 16 kHz with soxr's high-quality polyphase resampler (a real
anti-aliasing filter; linear interpolation would fold everything above 8 kHz back into the speech
band). Every failure raises `AudioError`, naming the source, the problem and what to do about it.

A file cut short (an interrupted download or recording) whose structure says so (FLAC's and WAV's
stated length, MP3's Xing frame count, WebM/Matroska's Duration, an Ogg stream that ends before its last
page) is decoded as far as it goes, with an `AudioWarning` naming the file and what was promised and read:
what is there is the start of the recording, which is usually what the user wants (the transcript of
the first 55 of 60 seconds); `warnings.simplefilter("error", AudioWarning)` makes it an error instead.

This module depends on numpy, soundfile, soxr and av only (torch just to accept tensors): the
dependency direction is audio -> model, never back.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Union

import av
import numpy as np
import soundfile
import soxr
import torch

from qwen2audio.audio.features import MIN_SAMPLES, SAMPLE_RATE
from qwen2audio.errors import AudioError, AudioWarning

SUPPORTED_FORMATS = (
    "wav, flac, ogg (vorbis or opus) and mp3 through libsndfile, and m4a/aac, mp4, webm/opus and "
    "other FFmpeg-readable audio through PyAV"
)
# File name endings of audio (to tell a user who passed one where a directory belongs)
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".mp4", ".webm",
                            ".aif", ".aiff", ".wma", ".mka", ".caf", ".amr"})
# Containers whose header states the exact number of frames (FLAC's STREAMINFO; 0 there means unknown).
# libsndfile clamps a WAV's count to the bytes present, and MP3 counts may be estimates: not checked.
EXACT_LENGTH_FORMATS = frozenset({"FLAC"})
# A WAV written to a pipe cannot go back to fill in its data length: its writer leaves a placeholder there, 0,
# 0xFFFFFFFF, or the largest length a signed 32-bit field holds (0x7FFFFFFF) or near it. Lengths from here up
# (about 2 GiB) promise nothing; a shorter one does, and a file holding less than it is cut short.
WAV_OPEN_LENGTH = 0x7FFF0000
MAX_CHANNELS = 8  # a 2-D array with more "channels" than this is almost surely a batch of clips
# No recording is sampled this slowly (telephone audio is 8000 Hz): a smaller sample_rate is a rate in kHz
# (16, 44.1), which would be resampled up a thousandfold (30 s of audio -> 2 GB) instead of refused
MIN_SAMPLE_RATE = 1000
RESAMPLE_QUALITY = "HQ"  # soxr high quality: 20-bit precision, passband flat to 91 % of Nyquist
# A float sample past this is no recording at full scale (+-1.0) turned up a little: most likely integer PCM
# stored as floats (16-bit: up to 32767), which the model would hear about 90 dB too loud
LOUD_FLOAT_PEAK = 4.0
SILENT_RMS = 1e-3  # -60 dBFS: channels quieter than this are silence, whatever their mix
CONVERT_HINT = "convert it to 16-bit wav, e.g. `ffmpeg -i INPUT -ac 1 -ar 16000 OUTPUT.wav`"

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, torch.Tensor, list]
ENCODED_SOURCES = (str, os.PathLike, bytes, bytearray, memoryview)  # and objects with .read()
_collected: ContextVar[list[str] | None] = ContextVar("audio_warnings", default=None)


@contextmanager
def collect_audio_warnings() -> Iterator[list[str]]:
    """Within the block, this thread's (this context's) AudioWarnings are appended to the list it gives
    instead of being issued: a server decoding several requests' audio at once hands each its own (Python's
    warnings filters are process-wide and ``catch_warnings`` is not thread-safe)."""
    caught: list[str] = []
    token = _collected.set(caught)
    try:
        yield caught
    finally:
        _collected.reset(token)


def _audio_warning(message: str, stacklevel: int) -> None:
    caught = _collected.get()
    if caught is not None:
        caught.append(message)
    else:
        warnings.warn(message, AudioWarning, stacklevel=stacklevel + 1)


def load_audio(source: AudioSource, sample_rate: int | None = None, *, name: str | None = None,
               min_samples: int = MIN_SAMPLES, local_hints: bool = True) -> np.ndarray:
    """Decode `source` into a (n,) float32 numpy array of mono samples at 16 kHz, roughly in [-1, 1].

    source: a path, the bytes of an encoded file, a binary file object with .read(), or samples in a
        numpy array / torch tensor / list of numbers. Arrays may be (n,), (n, channels) or (channels, n): a 2-D array
        whose first dimension is <= 8 and smaller than its second is read as channels-first, any other
        2-D array as (n, channels). Integer arrays are PCM and scaled to [-1, 1); float arrays are used
        as they are. 64-bit integers are no PCM format and are refused (their scale is unknown).
    sample_rate: the rate of an array of samples in Hz (required for arrays; at least 1000). Encoded files carry
        their own rate, so passing one with a file is an error.
    name: what to call the source in error messages (e.g. the uploaded file's name), instead of the
        path, "<bytes: N bytes>" or "<array>".
    min_samples: refuse audio shorter than this at 16 kHz (default: the 321 samples, ~20 ms, that give the
        model one audio token; 1 to decode any non-empty clip, e.g. to cut and mix recordings).
    local_hints: bytes that spell the path of a file on this machine are refused with a hint to pass the
        path; False where the bytes come from someone else (a server's request), whom no error may tell
        which files exist here.
    """
    if isinstance(source, (list, tuple)):
        name = name or f"<{type(source).__name__}>"
        source = _sequence_to_array(source, name)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        label = name or "<array>"
        if sample_rate is None:
            raise AudioError(
                f"{label}: an array of samples needs its sample rate; call load_audio(samples, sample_rate=...)"
            )
        rate = _check_sample_rate(sample_rate, label)
        samples = _array_to_frames(source, label)  # (n, channels)
    else:
        label = name or _describe(source)
        if isinstance(sample_rate, (np.ndarray, torch.Tensor, list, tuple)):
            raise AudioError(
                f"{label}: got {type(source).__name__!r} as the audio and an array as sample_rate: the two are "
                "swapped (scipy.io.wavfile.read and gradio give (rate, samples)); call "
                "load_audio(samples, sample_rate=rate)"
            )
        if isinstance(source, dict) and {"array", "sampling_rate"} <= source.keys():
            raise AudioError(
                f"{label}: a dict of samples and their rate (a datasets Audio item); call "
                "load_audio(item['array'], sample_rate=item['sampling_rate'])"
            )
        if not (isinstance(source, ENCODED_SOURCES) or hasattr(source, "read")):
            raise AudioError(
                f"{label}: cannot read audio from {type(source).__name__!r} objects; pass a path, bytes, a binary "
                "file object, or a numpy array / torch tensor of samples with its sample_rate"
            )
        if sample_rate is not None:
            raise AudioError(
                f"{label}: sample_rate is only for arrays of samples; an encoded file carries its own rate, "
                "so call load_audio without it"
            )
        samples, rate = _decode(source, label, local_hints)  # (n, channels)
        if rate < MIN_SAMPLE_RATE:  # a damaged or forged header: resampled up it would fill the memory
            raise AudioError(f"{label}: the file says it is sampled at {rate} Hz, which is no audio rate (the "
                             f"lowest in use is 8000); its header is damaged: {CONVERT_HINT}")

    if samples.size == 0:  # no samples, or no channels
        raise AudioError(f"{label}: the audio is empty (0 samples); pass a recording with some sound in it")
    if not np.isfinite(samples).all():
        raise AudioError(f"{label}: the audio contains NaN or infinite samples; check how it was produced")
    peak = float(max(samples.max(), -samples.min()))
    if peak > LOUD_FLOAT_PEAK:
        fix = ("divide 16-bit samples by 32768, or pass the integer array (it is scaled)"
               if isinstance(source, (np.ndarray, torch.Tensor)) else "divide the file's samples by 32768")
        _audio_warning(f"{label}: float samples reach {peak:.4g}, far past full scale (1.0): integer PCM stored as "
                       f"floats? If so, {fix}. The model hears the audio as it is", stacklevel=2)
    if isinstance(source, (np.ndarray, torch.Tensor)) and str(source.dtype).endswith("int32") \
            and 0 < peak * 2**31 < 2**15:
        _audio_warning(f"{label}: int32 samples peak at {peak * 2**31:.0f}, 96 dB below the full scale of 32-bit "
                       "PCM: 16-bit samples stored as int32? If so, pass them as int16 (samples.astype(np.int16)). "
                       "The model hears the audio as it is", stacklevel=2)

    mono = np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32))  # (n,) average of the channels
    if samples.shape[1] > 1:
        def rms(channel: np.ndarray) -> float:  # a dot product: no squared copy of an hour of audio
            channel = np.ascontiguousarray(channel)
            return float(np.sqrt(np.dot(channel, channel) / channel.shape[0]))

        loudest = max(rms(samples[:, c]) for c in range(samples.shape[1]))
        if loudest > SILENT_RMS and rms(mono) < 0.01 * loudest:
            _audio_warning(f"{label}: its channels cancel out when averaged to mono (one is the other inverted, "
                           "a wiring or phase error): the model hears near silence. Pass one channel, e.g. "
                           "load_audio(samples[:, 0], sample_rate=...) or `ffmpeg -i IN -af pan=mono|c0=c0 OUT`",
                           stacklevel=2)
    if rate != SAMPLE_RATE:
        mono = resample_as_librosa(mono, rate)
    if mono.shape[0] == 0:
        raise AudioError(f"{label}: the audio is too short to hold a single sample at {SAMPLE_RATE} Hz")
    if mono.shape[0] < min_samples:
        who = "the model needs" if min_samples == MIN_SAMPLES else "min_samples asks for"
        why = " to hear anything" if min_samples == MIN_SAMPLES else ""
        raise AudioError(
            f"{label}: the audio is too short: {mono.shape[0]} samples at {SAMPLE_RATE} Hz "
            f"({1000 * mono.shape[0] / SAMPLE_RATE:.1f} ms); {who} at least {min_samples} "
            f"({1000 * min_samples / SAMPLE_RATE:.1f} ms){why}. Pass a longer recording"
        )
    return np.ascontiguousarray(mono, dtype=np.float32)


def resample_as_librosa(mono: np.ndarray, rate: float) -> np.ndarray:
    """To 16 kHz as the official Qwen2-Audio examples' loader does, librosa.load(path, sr=16000): soxr's
    high-quality resampler, then the length fixed at ceil(n * 16000 / rate), zeros after the end (soxr alone
    gives one sample fewer for some lengths, e.g. 44,101 samples at 44.1 kHz: 16,000, not 16,001), so that the
    features' frame count and the audio token count are those of the official pipeline."""
    out = soxr.resample(mono, rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)  # (about n * 16000 / rate,)
    want = int(np.ceil(mono.shape[0] * (float(SAMPLE_RATE) / rate)))  # librosa's own expression, float for float
    if out.shape[0] < want:
        out = np.concatenate([out, np.zeros(want - out.shape[0], dtype=out.dtype)])
    return out[:want]


# --- Arrays -------------------------------------------------------------------------------------------
def _check_sample_rate(sample_rate, label: str) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioError(f"{label}: sample_rate must be a number of Hz, got {type(sample_rate).__name__}")
    if not np.isfinite(sample_rate) or sample_rate <= 0:
        raise AudioError(f"{label}: sample_rate must be a positive number of Hz, got {sample_rate}")
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(
            f"{label}: sample_rate is in Hz, and {sample_rate:g} Hz is no audio rate (the lowest in use is 8000); "
            f"for {sample_rate:g} kHz pass sample_rate={sample_rate * 1000:g}"
        )
    return int(sample_rate) if float(sample_rate).is_integer() else float(sample_rate)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _sequence_to_array(sequence: list | tuple, label: str) -> np.ndarray:
    """Samples in a list (or tuple) of numbers, or of equal-length rows of numbers -> a numpy array.
    A (samples, rate) or (rate, samples) pair, as librosa.load, scipy and gradio return them, is refused."""
    if len(sequence) == 2 and sum(_is_number(item) for item in sequence) == 1 and any(
            isinstance(item, (np.ndarray, torch.Tensor, list, tuple, *ENCODED_SOURCES)) for item in sequence):
        raise AudioError(
            f"{label}: got a pair of audio and a sample rate (as librosa.load, scipy.io.wavfile.read and gradio give "
            "them); pass samples and their rate apart, load_audio(samples, sample_rate=rate), or a file's path alone"
        )
    try:
        return np.asarray(sequence)
    except (ValueError, TypeError):  # ragged rows, or items numpy cannot hold in one array
        raise AudioError(
            f"{label}: a list of samples must hold numbers, or rows of numbers of equal length; "
            "pass a 1-D list or a numpy array of samples"
        ) from None


def _array_to_frames(array, label: str) -> np.ndarray:
    """Samples in memory -> (n, channels) float32, integer PCM scaled to [-1, 1)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype.is_floating_point and array.dtype != torch.float64:
            array = array.float()  # numpy has no bfloat16
        array = array.numpy()
    if array.ndim not in (1, 2):
        raise AudioError(
            f"{label}: expected samples shaped (n,), (n, channels) or (channels, n), got shape {array.shape}"
        )
    samples = _to_float32(array, label)
    if samples.ndim == 1:
        return samples[:, None]  # (n, 1)
    rows, cols = samples.shape
    if rows <= MAX_CHANNELS and rows < cols:
        samples = samples.T  # (channels, n) -> (n, channels)
    if samples.shape[1] > MAX_CHANNELS:
        raise AudioError(
            f"{label}: a 2-D array of shape {array.shape} does not look like (n, channels) or (channels, n) "
            f"with at most {MAX_CHANNELS} channels; pass one clip at a time"
        )
    return samples


def _to_float32(array: np.ndarray, label: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.bits > 32:  # a list of Python ints or torch.tensor(ints) is int64: scaled by 2**63, it is silence
            peak = int(np.abs(array).max()) if array.size else 0
            raise AudioError(
                f"{label}: samples are {array.dtype}, which is no PCM format (16-bit PCM is int16, 24- and 32-bit "
                f"int32), so their full scale is unknown (their values reach {peak}); convert them to the type they "
                "were recorded as, e.g. np.asarray(samples, dtype=np.int16) for 16-bit audio, or to floats in [-1, 1]"
            )
        full_scale = 2.0 ** (info.bits - 1)  # 32768 for int16
        offset = 0.0 if info.min < 0 else full_scale  # unsigned PCM (uint8 wav) is centred on 128
        return ((array.astype(np.float64) - offset) / full_scale).astype(np.float32)
    raise AudioError(
        f"{label}: samples must be real floats or integer PCM, got dtype {array.dtype}; "
        "pass real-valued audio samples"
    )


# --- Encoded files --------------------------------------------------------------------------------------
LABEL_CHARS = 120  # a longer path (or a string of base64 passed as one) is cut in messages


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return text if len(text) <= LABEL_CHARS else f"{text[:LABEL_CHARS]}... ({len(text)} characters)"

    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes: {memoryview(source).nbytes} bytes>"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, str):
        return file_name
    return f"<{type(source).__name__}>"


_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=_-]{200,}")  # a long run of base64 characters, no path separator


def _decode(source, label: str, local_hints: bool = True) -> tuple[np.ndarray, int]:
    """Encoded audio -> ((n, channels) float32, sample rate in Hz)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):  # a bytes path (os.PathLike may give one)
            text = os.fsdecode(text)
        if not text:
            raise AudioError("the path is empty; pass the path of an audio file")
        path = Path(source)
        unstatable = None  # why the path cannot even be looked up (a name too long for the file system)
        try:
            exists = path.exists()
        except OSError as err:
            exists, unstatable = False, err.strerror
        if not exists and (text.lower().startswith("data:") or _BASE64_TEXT.fullmatch(text.strip())):
            raise AudioError(f"{label}: is base64 text (or a data: URL), not a path; decode it first and pass "
                             "the bytes: load_audio(base64.b64decode(text)) (for a data: URL, the part after the "
                             "comma)")
        if unstatable is not None:
            raise AudioError(f"{label}: cannot be read as a path ({unstatable}); pass the path of an audio file")
        if not exists:
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(source)):
                raise AudioError(f"{label}: is a URL; load_audio reads local files only: download it first, "
                                 "or pass the downloaded bytes")
            if os.fspath(source).startswith("~"):
                raise AudioError(f"{label}: the file does not exist (a leading ~ is not expanded); pass "
                                 "os.path.expanduser(path)")
            raise AudioError(f"{label}: the file does not exist; check the path")
        if not path.is_file():
            raise AudioError(f"{label}: is not a regular file (a directory?); pass the path of an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: the file is empty (0 bytes); pass a recording with some sound in it")
        return _decode_with_fallback(lambda: str(path), label)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise AudioError(f"{label}: the file object is open in text mode; open it with mode 'rb'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AudioError(f"{label}: .read() returned {type(data).__name__}, not bytes")
        data = bytes(data)
    else:
        raise AudioError(
            f"{label}: cannot read audio from {type(source).__name__!r} objects; pass a path, bytes, a binary "
            "file object, or a numpy array / torch tensor of samples with its sample_rate"
        )
    if not data:
        raise AudioError(f"{label}: the data is empty (0 bytes); pass a recording with some sound in it")
    if local_hints and _names_a_file(data):
        raise AudioError(f"{label}: these bytes are the name of a file ({data.decode()!r}), not audio: bytes are "
                         "read as the recording itself; pass the path as a str or pathlib.Path")
    return _decode_with_fallback(lambda: io.BytesIO(data), label)


def _names_a_file(data: bytes) -> bool:
    """Short bytes that spell the path of an existing file (a path passed as bytes)."""
    if len(data) > 4096 or b"\0" in data:
        return False
    try:
        return Path(data.decode()).is_file()
    except (UnicodeDecodeError, OSError, ValueError):
        return False


_IN_MEMORY = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # what decoders call bytes in memory
# libsndfile's words for any file it cannot open, a readable one in a format it does not know included
_SNDFILE_NOT_OPENED = re.compile(r"File does not exist or is not a regular file \(possibly a pipe\?\)\.?")


class _NoAudioStream(Exception):
    """A container that FFmpeg opened but that holds no audio (e.g. a silent video)."""


class _CutShort(Exception):
    """Decoding stopped at damaged data after some audio; carries the audio decoded before it."""

    def __init__(self, samples: np.ndarray, rate: int, reason: str):
        super().__init__(reason)
        self.samples, self.rate = samples, rate


def _read_with_soundfile(file) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(file, dtype="float32", always_2d=True)  # (n, channels), PCM scaled
    return samples, rate


def _read_with_pyav(file) -> tuple[np.ndarray, int]:
    with av.open(file, mode="r") as container:
        if not container.streams.audio:
            raise _NoAudioStream()
        stream = container.streams.audio[0]
        to_planar_float = av.AudioResampler(format="fltp")  # keeps the layout and the rate
        chunks, rate, damage = [], None, None
        try:
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                chunks += [out.to_ndarray() for out in to_planar_float.resample(frame)]  # (channels, n) each
        except av.error.FFmpegError as err:
            if not chunks:
                raise
            damage = str(err)  # a cut-off or damaged end: what came before it is still audio
        if rate is not None:
            chunks += [out.to_ndarray() for out in to_planar_float.resample(None)]  # flush
    if not chunks:
        return np.zeros((0, 1), dtype=np.float32), rate or SAMPLE_RATE
    samples = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)  # (n, channels)
    if damage:
        raise _CutShort(samples, rate, damage)
    return samples, rate


class _Promise:
    """What a compressed file's own structure says of its length: `seconds` promised (MP3's Xing/Info frame
    count, WebM/Matroska's Duration) or, where only its end is marked (an Ogg stream's last page), None."""

    def __init__(self, seconds: float | None, what: str, slack: float = 0.0):
        self.seconds, self.what, self.slack = seconds, what, slack

    def broken(self, read_seconds: float) -> bool:
        return self.seconds is None or read_seconds < self.seconds - self.slack


def _inspect_container(open_file: Callable[[], Any]) -> tuple[_Promise | None, tuple]:
    """(The promise of an Ogg, MP3 or WebM/Matroska file, which its data does not keep when the file was cut
    short, e.g. by an interrupted download: None for other formats or where the file promises nothing;
    the decoders to try, in order)."""
    try:
        file = open_file()
        with open(file, "rb") if isinstance(file, str) else file as handle:
            data = _read_head(handle)
    except OSError:
        return None, DECODERS
    if data[:4] == b"OggS":
        return _ogg_promise(data), DECODERS
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        return _matroska_promise(data), DECODERS
    promise = _mp3_promise(data)
    if promise is _UNCOUNTED:  # libsndfile stops such a file where the first frame's bitrate says it ends
        return None, DECODERS[::-1]
    return promise, DECODERS


def _read_head(handle) -> bytes:
    """What the promises are read from: a file's first 64 KiB, all of an Ogg file (its pages are walked to the
    end), and an MP3's first frame past its ID3 tag (cover art: often > 64 KiB)."""
    data = handle.read(1 << 16)
    if data[:4] == b"OggS":
        data += handle.read()
    elif data[:3] == b"ID3" and len(data) >= 10:
        data += handle.read(max(0, _id3_size(data) + 4096 - len(data)))
    return data


def _ogg_promise(data: bytes) -> _Promise | None:
    """An Ogg file is whole when its pages run to the end of the data and the last one ends its stream."""
    pos, last_flags = 0, 0
    while pos + 27 <= len(data) and data[pos:pos + 4] == b"OggS":
        segments = data[pos + 26]
        if pos + 27 + segments > len(data):
            break
        end = pos + 27 + segments + sum(data[pos + 27:pos + 27 + segments])
        if end > len(data):
            break
        pos, last_flags = end, data[pos + 5]
    if pos == len(data) and last_flags & 0x04:  # the end-of-stream flag
        return None
    if not b"OggS".startswith(data[pos:pos + 4]):
        return None  # not Ogg pages all the way (something appended): nothing we can judge
    return _Promise(None, "it ends before the last page of its Ogg stream")


_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


_UNCOUNTED = _Promise(None, "an MP3 without a frame count")  # promises nothing; see _inspect_container


def _id3_size(data: bytes) -> int:
    """The bytes of an ID3v2 tag at the start of data: its header, a synchsafe size, a footer if flagged."""
    return 10 + sum((data[6 + i] & 0x7F) << (7 * (3 - i)) for i in range(4)) + (10 if data[5] & 0x10 else 0)


def _mp3_promise(data: bytes) -> _Promise | None:
    """MP3 with a Xing/Info header (LAME and most encoders write one): its count of frames; _UNCOUNTED for
    MP3 without one; None for data that does not start as MP3."""
    pos = _id3_size(data) if data[:3] == b"ID3" and len(data) >= 10 else 0
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    version, layer, rate_index = (data[pos + 1] >> 3) & 3, (data[pos + 1] >> 1) & 3, (data[pos + 2] >> 2) & 3
    if layer != 1 or version not in _MP3_RATES or rate_index == 3:  # Layer III only
        return None
    mono = data[pos + 3] >> 6 == 3
    side_info = (17 if mono else 32) if version == 3 else (9 if mono else 17)
    tag = pos + 4 + side_info
    if data[tag:tag + 4] not in (b"Xing", b"Info") or len(data) < tag + 12:
        return _UNCOUNTED
    if not int.from_bytes(data[tag + 4:tag + 8], "big") & 1:  # the frame count is optional
        return _UNCOUNTED
    frames = int.from_bytes(data[tag + 8:tag + 12], "big")
    per_frame = 1152 if version == 3 else 576
    rate = _MP3_RATES[version][rate_index]
    # decoders drop the encoder's delay and padding (under 3 frames' worth) and count the tag frame or not
    return _Promise(frames * per_frame / rate, f"its Xing header promises {frames * per_frame / rate:.2f} s",
                    slack=4 * per_frame / rate) if frames else _UNCOUNTED


def _ebml_number(data: bytes, pos: int, is_size: bool) -> tuple[int, int]:
    """An EBML variable-length integer at pos: (value, next position); an element id keeps its marker bit."""
    first = data[pos]
    length = 8 - first.bit_length() + 1
    if first == 0 or pos + length > len(data):
        raise ValueError("not EBML")
    value = int.from_bytes(data[pos:pos + length], "big")
    return (value & ((1 << (7 * length)) - 1) if is_size else value), pos + length


def _matroska_promise(data: bytes) -> _Promise | None:
    """WebM/Matroska whose segment Info states its Duration (a browser's live recording leaves it out)."""
    try:
        _, pos = _ebml_number(data, 0, is_size=False)  # the EBML header: skipped
        size, pos = _ebml_number(data, pos, is_size=True)
        segment, pos = _ebml_number(data, pos + size, is_size=False)
        if segment != 0x18538067:
            return None
        _, pos = _ebml_number(data, pos, is_size=True)  # the Segment's size: often left open
        while True:  # its first children: SeekHead, Info, Tracks, ... up to the first Cluster
            element, pos = _ebml_number(data, pos, is_size=False)
            size, pos = _ebml_number(data, pos, is_size=True)
            if element == 0x1549A966:  # Info
                break
            if element == 0x1F43B675:  # a Cluster: the audio began and no Info came before it
                return None
            pos += size
        end, scale, duration = min(pos + size, len(data)), 1_000_000, None
        while pos < end:
            element, pos = _ebml_number(data, pos, is_size=False)
            size, pos = _ebml_number(data, pos, is_size=True)
            payload = data[pos:pos + size]
            if element == 0x2AD7B1:  # TimestampScale, nanoseconds per tick
                scale = int.from_bytes(payload, "big") or scale
            elif element == 0x4489 and size in (4, 8):  # Duration, in ticks
                duration = float(np.frombuffer(payload, dtype=">f4" if size == 4 else ">f8")[0])
            pos += size
    except (ValueError, IndexError):
        return None
    if not duration or not np.isfinite(duration) or duration <= 0:
        return None
    seconds = duration * scale / 1e9
    return _Promise(seconds, f"its header promises {seconds:.2f} s", slack=0.1)  # Opus frames: 20 ms, rounding


def stated_length(path: str) -> int | None:
    """The samples at 16 kHz a file's header states, for a length check that does not decode (a training
    manifest's thousands of clips); None where only decoding can tell: a format libsndfile cannot read from
    its header, or an MP3 without a Xing/Info frame count (libsndfile's figure is then a guess from the first
    frame's bitrate: 2.7 s for a 20 s clip)."""
    try:
        info = soundfile.info(path)
        if info.format == "MP3":
            with open(path, "rb") as handle:
                promise = _mp3_promise(_read_head(handle))
            if promise is None or promise.seconds is None:
                return None
    except Exception:  # noqa: BLE001 - unreadable here: decoding will say what is wrong
        return None
    return int(round(info.frames * SAMPLE_RATE / info.samplerate))


def _declared_frames(open_file: Callable[[], Any]) -> int | None:
    """The number of frames the file's header promises, where that number is exact; else None."""
    try:
        info = soundfile.info(open_file())
    except Exception:  # noqa: BLE001 - a header libsndfile cannot read promises nothing we can check
        return None
    if info.format == "WAV":
        return _wav_declared_frames(open_file())
    return info.frames if info.format in EXACT_LENGTH_FORMATS and info.frames > 0 else None


def _wav_declared_frames(file) -> int | None:
    """Frames a RIFF/WAVE header's data chunk promises (libsndfile reports what the file holds instead);
    None where the header leaves the length open (0, or about 2 or 4 GiB: WAV_OPEN_LENGTH)."""
    if isinstance(file, str):
        with open(file, "rb") as handle:
            head = handle.read(1 << 16)
    else:
        head = file.read(1 << 16)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = int.from_bytes(head[pos + 20:pos + 22], "little")  # bytes per frame, all channels
        elif chunk == b"data":
            return size // block_align if block_align and 0 < size < WAV_OPEN_LENGTH else None
        pos += 8 + size + (size & 1)
    return None


# libsndfile first (exact, light, the common formats), FFmpeg for everything it cannot read.
DECODERS = (("libsndfile", _read_with_soundfile), ("ffmpeg", _read_with_pyav))


def _decode_with_fallback(open_file: Callable[[], Any], label: str) -> tuple[np.ndarray, int]:
    """Try each decoder on a fresh handle; one that decodes zero samples counts as failing too."""
    failures = []
    declared = _declared_frames(open_file)
    promise, decoders = (None, DECODERS) if declared is not None else _inspect_container(open_file)
    for decoder_name, read in decoders:
        try:
            samples, rate = read(open_file())
        except _NoAudioStream:
            raise AudioError(f"{label}: the file holds no audio stream; pass a file with sound in it") from None
        except _CutShort as cut:
            if declared is None and promise is None:  # nothing says audio is missing: unreadable, as before
                failures.append(f"{decoder_name}: {cut}")
                continue
            samples, rate = cut.samples, cut.rate
        except Exception as exc:  # any failure inside a decoder means "not readable by this one"
            said = _SNDFILE_NOT_OPENED.sub("not a format it reads", _IN_MEMORY.sub("the data", str(exc)))
            failures.append(f"{decoder_name}: {said}")
            continue
        if samples.size > 0:
            if declared is not None and samples.shape[0] < declared:
                _warn_cut_short(label, f"its header promises {declared} frames ({declared / rate:.2f} s)",
                                samples.shape[0], rate)
            elif promise is not None and promise.broken(samples.shape[0] / rate):
                _warn_cut_short(label, promise.what, samples.shape[0], rate)
            return samples, rate
        failures.append(f"{decoder_name}: no samples")
    if promise is not None and promise.broken(0.0):  # a damaged start would fail to decode the same way
        raise AudioError(f"{label}: the file is cut short: {promise.what} but no audio could be decoded before "
                         "its end; copy or download it again")
    if all(failure.endswith(": no samples") for failure in failures):
        if declared:  # the header promised frames and none follow: the data was lost, not an empty recording
            raise AudioError(f"{label}: the file is cut short: its header promises {declared} frames but holds "
                             "none; copy or download it again")
        raise AudioError(f"{label}: the audio is empty (0 samples); pass a recording with some sound in it")
    raise AudioError(
        f"{label}: cannot decode the audio; it is corrupt or in an unsupported format. "
        f"Supported formats: {SUPPORTED_FORMATS}. Otherwise {CONVERT_HINT}. "
        f"(Decoder errors: {'; '.join(failures)})"
    )


def _warn_cut_short(label: str, promise: str, read: int, rate: int) -> None:
    _audio_warning(
        f"{label}: the file is cut short: {promise} but only {read} frames could be decoded ({read / rate:.2f} s); "
        "using those. Copy or download the file again for the rest", stacklevel=5)  # the caller of load_audio
