"""The Whisper audio front end: 16 kHz samples -> log-mel features, and every audio-length formula.

This module is the one home of the arithmetic that turns a number of samples into a number of mel
frames, encoder frames and audio tokens. Everything else (the encoder's masks, the chat template's
placeholder expansion, the data collator) imports it from here.

    30 s window = 480000 samples (16 kHz)
                -> 3000 mel frames       (hop 160 samples = 10 ms)
                -> 1500 encoder frames   (conv stride 2 = 20 ms)
                ->  750 audio tokens     (avg-pool stride 2 = 40 ms, i.e. 25 tokens per second)

Long audio: the model sees at most one 30 s window per clip. The reference implementation silently
drops everything past 30 s; here `log_mel_spectrogram` refuses a clip longer than `N_SAMPLES`, and
`split_into_windows` is the policy for long audio: a clip of n > 30 s samples is cut, without overlap
and without dropping a single sample, into k = ceil(n / N_SAMPLES) consecutive windows of near-equal
length (their lengths differ by at most one sample, each is at most 30 s). Splitting evenly instead of
into full 30 s windows plus a remainder means there is never a tiny tail window: every window of a
split clip is longer than half a window (> 15 s), so each one yields hundreds of audio tokens (a
10 ms tail would have yielded 0). Each window is then an ordinary clip with its own features and
its own audio tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple, TypeVar, Union

import numpy as np
import torch


def exact_div(x: int, y: int) -> int:
    """x / y for a y that must divide x: a rounding error in a derived constant fails at import."""
    assert x % y == 0, f"{x} is not a multiple of {y}"
    return x // y


# --- Sampling and the short-time Fourier transform -------------------------------------------------
SAMPLE_RATE = 16000  # Hz
N_FFT = 400  # samples per STFT window: 25 ms (Hann window of the same length)
HOP_LENGTH = 160  # samples between consecutive frames: 10 ms
N_FREQ_BINS = N_FFT // 2 + 1  # 201 one-sided FFT bins, 0 .. 8000 Hz in 40 Hz steps
MEL_MIN_HZ = 0.0  # lowest mel filter edge
MEL_MAX_HZ = SAMPLE_RATE / 2  # 8000.0 Hz: highest mel filter edge (Nyquist)

# --- The 30 s window the model was trained on ------------------------------------------------------
WINDOW_SECONDS = 30  # seconds of audio per window
N_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000 samples in a window
N_FRAMES = exact_div(N_SAMPLES, HOP_LENGTH)  # 3000 mel frames in a window (10 ms each)
FRAMES_PER_SECOND = exact_div(SAMPLE_RATE, HOP_LENGTH)  # 100 mel frames per second

# --- Log-mel compression ----------------------------------------------------------------------------
LOG_MEL_FLOOR = 1e-10  # mel power floor before log10: -10 on the log10 scale
DYNAMIC_RANGE = 8.0  # log10 units kept below each clip's loudest value (80 dB)
LOG_MEL_OFFSET = 4.0  # (log10 + 4) / 4 maps the usual range to about [-1, 1]
LOG_MEL_SCALE = 4.0

# --- Encoder strides: mel frames -> encoder frames -> audio tokens -------------------------------
CONV_KERNEL = 3  # the encoder's second conv: kernel 3, padding 1, stride 2
CONV_PADDING = 1
CONV_STRIDE = 2
POOL_KERNEL = 2  # average pooling after the encoder: kernel 2, stride 2
POOL_STRIDE = 2

IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)


def _check_lengths(n: Union[int, torch.Tensor], what: str) -> None:
    if isinstance(n, torch.Tensor):
        if n.dtype.is_floating_point or n.dtype.is_complex or n.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor, got dtype {n.dtype}")
        if n.numel() and int(n.min()) < 0:
            raise ValueError(f"{what} must be >= 0, got a minimum of {int(n.min())}")
    elif isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        if n < 0:
            raise ValueError(f"{what} must be >= 0, got {n}")
    else:
        raise TypeError(f"{what} must be an int or an integer tensor, got {type(n).__name__}")


def num_valid_frames(n_samples: IntOrTensor) -> IntOrTensor:
    """Mel frames that hold real audio for a clip of `n_samples` samples at 16 kHz.

    ceil(n_samples / HOP_LENGTH), capped at N_FRAMES: a frame counts when its first sample (frame i
    starts at sample i * HOP_LENGTH) lies inside the clip. This is what the reference feature
    extractor's attention mask sums to. 1 s -> 100 frames, 30 s -> 3000. Works on ints and
    elementwise on integer tensors.
    """
    _check_lengths(n_samples, "n_samples")
    n_frames = (n_samples + HOP_LENGTH - 1) // HOP_LENGTH  # ceil
    return n_frames.clamp(max=N_FRAMES) if isinstance(n_samples, torch.Tensor) else min(int(n_frames), N_FRAMES)


def encoder_frame_count(n_frames: IntOrTensor) -> IntOrTensor:
    """Encoder frames (20 ms each) for `n_frames` mel frames: the stride-2 conv, (n - 1) // 2 + 1.

    Works on ints and elementwise on integer tensors. 3000 mel frames -> 1500 encoder frames.
    """
    _check_lengths(n_frames, "n_frames")
    return (n_frames + 2 * CONV_PADDING - CONV_KERNEL) // CONV_STRIDE + 1  # (n - 1) // 2 + 1


def audio_token_count(n_frames: IntOrTensor) -> IntOrTensor:
    """Audio tokens (40 ms each) for `n_frames` valid mel frames: the one audio-token formula.

    encoder frames e = (n - 1) // 2 + 1, then the stride-2 average pool: (e - 2) // 2 + 1.
    That is 25 tokens per second of audio and 750 for a full 30 s window (3000 frames); a clip of
    at most 2 frames (<= 20 ms) gets 0 tokens. Works on ints and elementwise on integer tensors
    (e.g. `frame_mask.sum(-1)`).
    """
    n_encoder_frames = encoder_frame_count(n_frames)
    return (n_encoder_frames - POOL_KERNEL) // POOL_STRIDE + 1  # (e - 2) // 2 + 1


N_ENCODER_FRAMES = encoder_frame_count(N_FRAMES)  # 1500 encoder frames per window (20 ms each)
# The shortest clip that gives an audio token: 3 mel frames (2 encoder frames, one pooled token).
MIN_SAMPLES = 2 * HOP_LENGTH + 1  # 321 samples, 20.06 ms
assert audio_token_count(num_valid_frames(MIN_SAMPLES)) == 1 and audio_token_count(num_valid_frames(MIN_SAMPLES - 1)) == 0
N_AUDIO_TOKENS_PER_WINDOW = audio_token_count(N_FRAMES)  # 750 audio tokens per window (40 ms each)
AUDIO_TOKENS_PER_SECOND = exact_div(N_AUDIO_TOKENS_PER_WINDOW, WINDOW_SECONDS)  # 25 tokens per second
assert (N_ENCODER_FRAMES, N_AUDIO_TOKENS_PER_WINDOW) == (1500, 750)


# --- Mel filters ------------------------------------------------------------------------------------
SLANEY_LINEAR_HZ_PER_MEL = 200.0 / 3  # below 1 kHz the slaney scale is linear: 66.7 Hz per mel
SLANEY_LOG_START_HZ = 1000.0  # above 1 kHz it is logarithmic ...
SLANEY_LOG_START_MEL = SLANEY_LOG_START_HZ / SLANEY_LINEAR_HZ_PER_MEL  # 15 mels at 1 kHz
SLANEY_MELS_PER_LOG_HZ = 27.0 / np.log(6.4)  # ... at 27 mels per factor of 6.4 in frequency


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney (Auditory Toolbox / librosa default) mel scale; float64 in and out."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / SLANEY_LINEAR_HZ_PER_MEL
    log_ratio = np.log(np.maximum(hz, SLANEY_LOG_START_HZ) / SLANEY_LOG_START_HZ)  # 0 below 1 kHz
    return np.where(hz >= SLANEY_LOG_START_HZ, SLANEY_LOG_START_MEL + log_ratio * SLANEY_MELS_PER_LOG_HZ, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * SLANEY_LINEAR_HZ_PER_MEL
    log_mels = np.maximum(mel, SLANEY_LOG_START_MEL) - SLANEY_LOG_START_MEL  # 0 below 15 mels
    log = SLANEY_LOG_START_HZ * np.exp(log_mels / SLANEY_MELS_PER_LOG_HZ)
    return np.where(mel >= SLANEY_LOG_START_MEL, log, linear)


@lru_cache(maxsize=None)
def _mel_filters_numpy(n_mels: int) -> np.ndarray:
    """(n_mels, N_FREQ_BINS) float64 slaney-normalised triangular filters (computed once per size).

    Written out here rather than taken from librosa (a heavy dependency for 15 lines); it matches
    `librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)` and transformers' `mel_filter_bank`.
    """
    fft_hz = np.linspace(0, SAMPLE_RATE // 2, N_FREQ_BINS)  # (201,) bin centre frequencies
    # n_mels + 2 edges equally spaced in mel: filter m rises from edge m, peaks at m + 1, falls at m + 2
    edge_hz = _mel_to_hz(np.linspace(_hz_to_mel(MEL_MIN_HZ), _hz_to_mel(MEL_MAX_HZ), n_mels + 2))
    edge_gap = np.diff(edge_hz)  # (n_mels + 1,)
    slopes = edge_hz[None, :] - fft_hz[:, None]  # (201, n_mels + 2)
    rising = -slopes[:, :-2] / edge_gap[:-1]  # (201, n_mels)
    falling = slopes[:, 2:] / edge_gap[1:]  # (201, n_mels)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (201, n_mels)
    weights *= 2.0 / (edge_hz[2:] - edge_hz[:-2])  # slaney norm: each filter has unit area in Hz
    return weights.T  # (n_mels, 201)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The (n_mels, N_FFT // 2 + 1) float32 mel filter bank: slaney scale and norm, 0 .. 8000 Hz.

    Cached per (n_mels, device); treat the result as read-only. 128 bins for Qwen2-Audio, 80 for the
    smaller Whisper models.
    """
    if not isinstance(n_mels, int) or isinstance(n_mels, bool) or n_mels < 1:
        raise ValueError(f"n_mels must be a positive int (128 for Qwen2-Audio, 80 for Whisper), got {n_mels!r}")
    filters = torch.from_numpy(_mel_filters_numpy(n_mels).astype(np.float32))  # (n_mels, 201)
    return filters.to(device) if device is not None else filters


# --- Log-mel spectrogram ----------------------------------------------------------------------------
def _as_clip(audio, index: int) -> torch.Tensor:
    """One clip as a 1-D float32 CPU-or-device tensor, with the checks `log_mel_spectrogram` promises."""
    where = f"audio clip {index}"
    if isinstance(audio, np.ndarray):
        if not (np.issubdtype(audio.dtype, np.floating)):
            raise ValueError(
                f"{where}: expected float samples in [-1, 1], got dtype {audio.dtype}; "
                "decode files and integer PCM with qwen2audio.audio.load_audio"
            )
        audio = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    elif isinstance(audio, torch.Tensor):
        if not audio.dtype.is_floating_point:
            raise ValueError(
                f"{where}: expected float samples in [-1, 1], got dtype {audio.dtype}; "
                "decode files and integer PCM with qwen2audio.audio.load_audio"
            )
        audio = audio.detach().to(torch.float32)
    else:
        raise TypeError(f"{where}: expected a 1-D numpy array or torch tensor, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"{where}: expected 1-D mono samples, got shape {tuple(audio.shape)}")
    n = audio.shape[0]
    if n == 0:
        raise ValueError(f"{where} is empty (0 samples); every clip needs at least one sample")
    if n > N_SAMPLES:
        raise ValueError(
            f"{where} has {n} samples ({n / SAMPLE_RATE:.2f} s), more than one {WINDOW_SECONDS} s window "
            f"({N_SAMPLES} samples); split it first with qwen2audio.audio.split_into_windows"
        )
    # min and max are NaN if any sample is, and infinite if any is: one pass, ten times faster than isfinite
    if not bool(torch.isfinite(torch.stack(torch.aminmax(audio))).all()):
        raise ValueError(f"{where} contains NaN or infinite samples")
    return audio


def log_mel_spectrogram(
    audios: Sequence, n_mels: int = 128, device: Union[str, torch.device, None] = None, dither: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features for a batch of mono 16 kHz clips, each at most 30 s long.

    audios: a sequence (list, tuple, or a 2-D array/tensor of rows) of 1-D float clips at 16 kHz.
    Returns
        features   (B, n_mels, N_FRAMES) float32, about [-1, 1]
        frame_mask (B, N_FRAMES) int64: 1 for the first num_valid_frames(len(clip)) frames, else 0
    Each clip is zero-padded to 30 s, then: centred STFT (periodic Hann, reflect padding) -> drop the
    last frame -> power -> mel -> log10 -> floor at the clip's own max - 8 -> (x + 4) / 4.
    Matches transformers' WhisperFeatureExtractor (padding="max_length") to float32 rounding.

    Only the frames whose window reaches into a clip are transformed (`_stft_frame_count`): every
    later frame of the 30 s window sees only zero padding, so its mel power is exactly 0 and its
    feature is the log floor, written without computing it. A 5 s clip costs about a sixth of a 30 s one.

    dither: above 0, Gaussian noise of this scale is added to the zero-padded 30 s batch before the STFT,
    drawn as transformers' WhisperFeatureExtractor(dither=...) draws it (``torch.randn`` of the (B, 480000)
    batch, so the same torch seed gives the same features); every frame is then transformed.
    """
    if isinstance(audios, (np.ndarray, torch.Tensor)) and audios.ndim == 1:
        raise TypeError("log_mel_spectrogram takes a batch: pass a list of clips, e.g. log_mel_spectrogram([audio])")
    clips = [_as_clip(audio, i) for i, audio in enumerate(audios)]
    if not clips:
        raise ValueError("log_mel_spectrogram got an empty batch; pass at least one clip")
    mel_filters(n_mels)  # checks n_mels before any work
    lengths = [clip.shape[0] for clip in clips]
    if not (isinstance(dither, (int, float)) and math.isfinite(dither) and dither >= 0):
        raise ValueError(f"dither must be a number >= 0 (0: none), got {dither!r}")
    if dither > 0:  # the noise covers the padding too: no frame is all zeros any more
        padded = torch.zeros(len(clips), N_SAMPLES)  # (B, 480000)
        for row, clip in zip(padded, clips):
            row[: clip.shape[0]] = clip
        padded += dither * torch.randn(padded.shape)
        clips = list(padded)

    frame_counts = [_stft_frame_count(clip.shape[0]) for clip in clips]
    power = _power_spectra(clips, frame_counts, torch.device(device) if device is not None else None)
    log_mel = _mel(power, n_mels).clamp_(min=LOG_MEL_FLOOR).log10_()  # (n_mels, total frames)

    # Frames past each clip's last transformed one hold zero power: the floor, log10(LOG_MEL_FLOOR).
    floor = torch.zeros((), device=power.device).clamp(min=LOG_MEL_FLOOR).log10()
    features = power.new_empty(len(clips), n_mels, N_FRAMES)  # (B, n_mels, 3000)
    start = 0
    for row, count in zip(features, frame_counts):
        row[:, :count] = log_mel[:, start : start + count]
        row[:, count:] = floor
        start += count
    clip_max = features.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1): per clip, over the padded 30 s
    features = torch.maximum(features, clip_max - DYNAMIC_RANGE, out=features)
    features.add_(LOG_MEL_OFFSET).div_(LOG_MEL_SCALE)  # (B, n_mels, 3000)

    n_valid = torch.tensor([num_valid_frames(n) for n in lengths], device=features.device)  # (B,)
    frame_index = torch.arange(N_FRAMES, device=features.device)  # (3000,)
    frame_mask = (frame_index[None, :] < n_valid[:, None]).long()  # (B, 3000)
    return features, frame_mask


def _stft_frame_count(n_samples: int) -> int:
    """Frames of a 30 s window's STFT that read any of a clip's `n_samples` samples.

    Frame t is centred on sample t * HOP_LENGTH and reads the N_FFT samples around it, so it reads the
    clip while t * HOP_LENGTH - N_FFT // 2 < n_samples; every later frame reads only zero padding.
    """
    return min(N_FRAMES, -(-(n_samples + N_FFT // 2) // HOP_LENGTH))  # ceil, at most the 3000 kept


def _reflect_padded(clip: torch.Tensor, n_frames: int) -> torch.Tensor:
    """The first `n_frames` STFT frames' worth of the signal a centred STFT reads: the clip, zero-padded
    to 30 s and then reflect-padded by N_FFT // 2 at both ends, cut at (n_frames - 1) * HOP + N_FFT."""
    half = N_FFT // 2
    length = (n_frames - 1) * HOP_LENGTH + N_FFT
    padded = clip.new_empty(length)
    n = min(clip.shape[0], length - half)
    padded[half : half + n] = clip[:n]
    padded[half + n :].zero_()  # the zero padding up to 30 s
    padded[:half] = padded[half + 1 : 2 * half + 1].flip(0)  # x[200], ..., x[1]
    end = half + N_SAMPLES  # where the reflection past the end of the 30 s window starts
    if length > end:  # only the last frames of a 30 s window read it
        padded[end:] = padded[2 * end - length - 1 : end - 1].flip(0)  # x[N - 2], x[N - 3], ...
    return padded


@lru_cache(maxsize=None)
def _hann_window(device: Union[torch.device, None]) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)  # periodic, as Whisper's STFT uses


def _power_spectra(clips: list[torch.Tensor], frame_counts: list[int], device) -> torch.Tensor:
    """(sum(frame_counts), 2 * N_FREQ_BINS) float32: each clip's first frames, one row per frame, clip
    after clip; per frequency bin the squared real and imaginary parts, side by side.

    All clips' frames go through one rfft. The two squares of a bin are summed by the mel product
    (`_mel`): measured, that is faster than any way of forming |X|^2 first (abs() ** 2 takes a square
    root; adding the strided halves is a slow extra pass).
    """
    window = _hann_window(device)
    frames = torch.empty(sum(frame_counts), N_FFT, device=window.device)  # windowed frames, clip after clip
    start = 0
    for clip, count in zip(clips, frame_counts):
        framed = _reflect_padded(clip.to(window.device), count).unfold(0, N_FFT, HOP_LENGTH)  # (count, 400) view
        torch.mul(framed, window, out=frames[start : start + count])
        start += count
    spectrum = torch.fft.rfft(frames)  # (frames, 201) complex
    return torch.view_as_real(spectrum).square_().flatten(1)  # (frames, 402): re^2, im^2 of each bin


# Each FFT bin feeds at most two neighbouring triangular filters, so the (n_mels, 201) filter bank is
# about 98 % zeros (394 non-zero weights of 25,728 for 128 mels). Applied as this many blocks of
# consecutive filters, each over just the bins its filters cover, the mel product does about 1/15 of
# the multiply-adds of one dense product; more blocks save little more and cost a call each.
MEL_BLOCKS = 16


@lru_cache(maxsize=None)
def _mel_blocks(n_mels: int, device: Union[torch.device, None]) -> tuple[tuple[slice, slice, torch.Tensor], ...]:
    """(filter rows, power columns, weights) per block of consecutive filters, for `_power_spectra`'s
    layout: bin k's weight for filter m applies to both columns 2k (re^2) and 2k + 1 (im^2)."""
    weights = mel_filters(n_mels, device).repeat_interleave(2, dim=1)  # (n_mels, 402)
    blocks = []
    for rows in np.array_split(np.arange(n_mels), min(MEL_BLOCKS, n_mels)):
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        used = np.flatnonzero(_mel_filters_numpy(n_mels)[r0:r1].any(axis=0))  # bins these filters cover
        c0, c1 = (2 * int(used[0]), 2 * int(used[-1]) + 2) if used.size else (0, 0)
        blocks.append((slice(r0, r1), slice(c0, c1), weights[r0:r1, c0:c1].contiguous()))
    return tuple(blocks)


def _mel(power: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(n_mels, frames) mel power of `_power_spectra`'s (frames, 402) squared spectra."""
    mel = power.new_empty(n_mels, power.shape[0])
    for rows, cols, weights in _mel_blocks(n_mels, power.device):
        torch.mm(weights, power[:, cols].t(), out=mel[rows])
    return mel


# --- Long audio ------------------------------------------------------------------------------------
def window_lengths(n_samples: int, window_samples: int = N_SAMPLES) -> list[int]:
    """Samples in each window of a clip of ``n_samples``: ceil(n / window_samples) near-equal lengths
    (the first n % k one sample longer), summing to n. The one home of the long-audio split rule."""
    k = -(-n_samples // window_samples)  # ceil
    return [n_samples // k + (1 if i < n_samples % k else 0) for i in range(k)]


def clip_token_count(n_samples: int) -> int:
    """Audio tokens of a clip of ``n_samples``: the sum over its windows (one <|AUDIO|> run per clip)."""
    return sum(audio_token_count(num_valid_frames(n)) for n in window_lengths(n_samples))


def split_into_windows(audio, window_samples: int = N_SAMPLES) -> list[np.ndarray]:
    """Split a 1-D clip into ceil(n / window_samples) consecutive windows of near-equal length.

    No overlap and nothing dropped: the windows concatenate back to `audio` exactly. Lengths differ
    by at most one sample and each is <= window_samples, so a clip of up to 30 s stays whole, 30.01 s
    becomes two windows of 15.005 s, and 75 s becomes three of 25 s. Returns numpy views of the input
    (a torch tensor is moved to the CPU first).
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"split_into_windows expects 1-D mono samples, got shape {audio.shape}")
    if audio.shape[0] == 0:
        raise ValueError("split_into_windows got an empty clip (0 samples)")
    if not isinstance(window_samples, int) or window_samples < 1:
        raise ValueError(f"window_samples must be a positive int, got {window_samples!r}")
    ends = np.cumsum(window_lengths(audio.shape[0], window_samples))
    return np.split(audio, ends[:-1])


CHUNK_SECONDS = 30.0  # a transcription's longest chunk, by default: the encoder's window
MIN_CHUNK_SECONDS = 1.0


def chunk_samples(seconds: float) -> int:
    """Samples in a transcription chunk of ``seconds``, checked: 1 to 30 (the encoder's window)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            MIN_CHUNK_SECONDS <= seconds <= CHUNK_SECONDS):
        raise ValueError(f"chunk_seconds must be between {MIN_CHUNK_SECONDS:g} and {CHUNK_SECONDS:g} (the encoder's "
                         f"window), got {seconds!r}")
    return int(round(seconds * SAMPLE_RATE))


MIN_PAUSE_SECONDS, MAX_PAUSE_SECONDS = 0.05, 5.0


def pause_samples(seconds: float | None) -> int | None:
    """Samples in the shortest pause a transcription is cut at (``cut_at_pauses``), checked: 0.05 to 5 s;
    None or 0 (cut only where a chunk must end) give None."""
    if seconds is None or (seconds == 0 and not isinstance(seconds, bool)):
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            MIN_PAUSE_SECONDS <= seconds <= MAX_PAUSE_SECONDS):
        raise ValueError(f"cut_at_pauses must be between {MIN_PAUSE_SECONDS:g} and {MAX_PAUSE_SECONDS:g} seconds "
                         f"(the shortest pause to cut at; 0.3 suits speech), or 0 for no such cuts, got {seconds!r}")
    return int(round(seconds * SAMPLE_RATE))


PAUSE_FRAME = 400  # 25 ms: the span whose energy places a cut
MIN_WINDOW_SHARE = 0.5  # a cut falls in the last half of the longest window allowed


CUT_PAUSE_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: the shortest pause between speech a window may end in
CUT_CONTEXT_SAMPLES = SAMPLE_RATE  # 1 s: of the audio around where a cut may go, what the VAD hears too


def _window_cuts(audio: np.ndarray, window_samples: int, listen: bool = True) -> list[int]:
    """Where cut_windows cuts a clip into windows of at most ``window_samples`` (none if it fits);
    ``listen=False``: by the quietest 25 ms alone, without the voice-activity detector (demo.cuts compares)."""
    n = audio.shape[0]
    if n <= window_samples:
        return []
    squares = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    energy = squares[PAUSE_FRAME:] - squares[:-PAUSE_FRAME]  # energy[i]: of samples i .. i + PAUSE_FRAME - 1
    cuts, start = [], 0
    while n - start > window_samples:
        lo = start + int(window_samples * MIN_WINDOW_SHARE)
        # the span must end inside the window, and leave the last window at least a quarter of one
        hi = min(start + window_samples - PAUSE_FRAME, n - window_samples // 4 - PAUSE_FRAME // 2)
        pause = _vad_pause(audio, lo, hi + PAUSE_FRAME) if listen else None
        if pause is not None:  # the middle half of the pause: not where speech may fade in or out
            quarter = (pause[1] - pause[0]) // 4
            lo, hi = pause[0] + quarter, pause[1] - quarter - PAUSE_FRAME
        region = energy[lo:hi + 1]
        quietest = lo + (len(region) - 1 - int(np.argmin(region[::-1])))  # the latest of the quietest
        start = quietest + PAUSE_FRAME // 2
        cuts.append(start)
    return cuts


def _vad_pause(audio: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
    """The latest pause between speech in ``audio[lo:hi]`` that is at least half as long as the longest there
    (and at least CUT_PAUSE_SAMPLES), as Silero VAD hears it (``qwen2audio.audio.vad``), what lies before
    its first speech and after its last included, as (start, end) within ``lo:hi``; None where it hears no
    speech there, or no such pause. (The longest pause is most often between sentences; of those near as
    long, the latest keeps the windows long.)"""
    from .vad import speech_spans

    # a second on each side too: speech that begins or ends at the edge of the range is heard as speech
    first, last = max(0, lo - CUT_CONTEXT_SAMPLES), min(audio.shape[0], hi + CUT_CONTEXT_SAMPLES)
    spans = speech_spans(audio[first:last], CUT_PAUSE_SAMPLES)
    if not spans:
        return None
    edges = [first, *(first + t for span in spans for t in span), last]
    pauses = [(max(a, lo), min(b, hi)) for a, b in zip(edges[::2], edges[1::2])]
    pauses = [(a, b) for a, b in pauses if b - a >= CUT_PAUSE_SAMPLES]
    if not pauses:
        return None
    longest = max(b - a for a, b in pauses)
    return [(a, b) for a, b in pauses if 2 * (b - a) >= longest][-1]


SPEECH_MARGIN = SAMPLE_RATE // 2  # 0.5 s: of what is not speech, the most a window keeps on each side of speech


class Window(NamedTuple):
    """A piece of a clip cut for transcription: where it starts (in samples), its samples (a view of the clip),
    and whether it holds speech (False only with pause cuts, where the voice-activity detector heard none:
    such a window is not transcribed)."""

    start: int
    audio: np.ndarray
    speech: bool = True


def cut_windows(audio, window_samples: int = N_SAMPLES, min_pause_samples: int | None = None) -> list[Window]:
    """Cut a 1-D clip into consecutive windows of at most ``window_samples`` that end in a pause.

    A clip that fits stays whole. Otherwise each cut is placed in the last half of the longest window
    allowed from where the previous one ended, in a long pause between speech there (the latest of those
    at least half as long as the longest, and at least 0.1 s), as a voice-activity detector hears it
    (``qwen2audio.audio.vad``: noise or music under the pause is still a pause), so that a window ends
    between sentences or phrases rather than inside a word, whatever the model's window: in the middle of
    the 25 ms span of least energy in the middle half of that pause, or, where it hears no such pause
    there, in the whole last half (the latest such span, where several are equally quiet: digital
    silence). No cut leaves the last window shorter than a quarter of the longest (a sliver too short to
    hear).

    ``min_pause_samples``: first cut at every pause between speech at least this long (found by a
    voice-activity detector: ``qwen2audio.audio.vad``), so that each window holds one stretch of speech, for
    a model trained on short utterances: in the middle of the pause, or, where the pause is at least three
    times ``SPEECH_MARGIN`` (0.5 s), that far after the speech and before the next, and likewise before the
    first speech and after the last where the end is at least twice as long; what lies between is a window
    (or several) marked ``speech=False``, so that minutes of music, noise or silence are not given to the
    model to transcribe (where it might invent words); a clip with no speech at all is all such windows. A
    stretch of speech longer than ``window_samples`` is then cut as above.

    No overlap and nothing dropped: the windows concatenate back to ``audio`` exactly.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"cut_windows expects 1-D mono samples, got shape {audio.shape}")
    n = audio.shape[0]
    if n == 0:
        raise ValueError("cut_windows got an empty clip (0 samples)")
    if not isinstance(window_samples, int) or window_samples < 2 * PAUSE_FRAME:
        raise ValueError(f"window_samples must be an int of at least {2 * PAUSE_FRAME}, got {window_samples!r}")
    if min_pause_samples is None:
        regions = [(0, n, True)]
    else:
        if isinstance(min_pause_samples, bool) or not isinstance(min_pause_samples, int) or min_pause_samples < 1:
            raise ValueError(f"min_pause_samples must be a positive int, got {min_pause_samples!r}")
        from .vad import speech_spans

        regions = _speech_regions(n, speech_spans(audio, min_pause_samples))
    windows = []
    for start, end, speech in regions:
        bounds = [start, *(start + cut for cut in _window_cuts(audio[start:end], window_samples)), end]
        windows += [Window(a, audio[a:b], speech) for a, b in zip(bounds[:-1], bounds[1:])]
    return windows


def _speech_regions(n: int, spans: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """``(start, end, speech)`` regions covering ``n`` samples, from the speech ``spans`` found in them: each
    stretch of speech with SPEECH_MARGIN of what is around it on each side, the rest of a pause or an end
    marked as no speech where it is at least SPEECH_MARGIN long too; a shorter pause is cut in its middle,
    a shorter end left with the speech."""
    if not spans:
        return [(0, n, False)]
    regions, start = [], 0
    if spans[0][0] >= 2 * SPEECH_MARGIN:
        start = spans[0][0] - SPEECH_MARGIN
        regions.append((0, start, False))
    for (_, end), (following, _) in zip(spans, spans[1:]):
        if following - end >= 3 * SPEECH_MARGIN:
            regions += [(start, end + SPEECH_MARGIN, True), (end + SPEECH_MARGIN, following - SPEECH_MARGIN, False)]
            start = following - SPEECH_MARGIN
        else:
            regions.append((start, (end + following) // 2, True))
            start = (end + following) // 2
    last = spans[-1][1]
    if n - last >= 2 * SPEECH_MARGIN:
        regions += [(start, last + SPEECH_MARGIN, True), (last + SPEECH_MARGIN, n, False)]
    else:
        regions.append((start, n, True))
    return regions


def speech_windows(audio, window_samples: int = N_SAMPLES, min_pause_samples: int | None = None) -> list[Window]:
    """``cut_windows``' windows that hold speech: those to transcribe (all of them without pause cuts)."""
    return [window for window in cut_windows(audio, window_samples, min_pause_samples) if window.speech]


def split_at_pauses(audio, window_samples: int = N_SAMPLES, min_pause_samples: int | None = None) -> list[np.ndarray]:
    """``cut_windows``' windows' samples (numpy views of the input), those without speech included: they
    concatenate back to ``audio`` exactly."""
    return [window.audio for window in cut_windows(audio, window_samples, min_pause_samples)]
