"""Audio effects on float32 mono 16 kHz arrays: speed, noise, reverberation, mixing, band limits,
equalisation, level.

Each takes its randomness from the numpy Generator it is given, so a clip is a pure function of its
recipe and seed.
"""

from __future__ import annotations

import numpy as np
import soxr

SAMPLE_RATE = 16_000
PHONE_RATE = 8_000  # a telephone line passes up to 4 kHz
EPS = 1e-9
TRIM_DB = -45.0  # silence at the ends, relative to the peak


def seconds(x: np.ndarray) -> float:
    return len(x) / SAMPLE_RATE


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + EPS))


def trim(x: np.ndarray, threshold_db: float = TRIM_DB) -> np.ndarray:
    """Cut leading and trailing near-silence (frames of 10 ms below the threshold relative to the peak)."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    if n == 0:
        return x
    level = np.abs(x[: n * frame]).reshape(n, frame).max(axis=1)
    loud = np.flatnonzero(level > np.abs(x).max() * 10 ** (threshold_db / 20))
    if loud.size == 0:
        return x
    return x[loud[0] * frame: (loud[-1] + 1) * frame]


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Play faster (factor > 1) or slower: tempo and pitch change together, as a tape would."""
    if abs(factor - 1.0) < 1e-3:
        return x
    return soxr.resample(x, SAMPLE_RATE * factor, SAMPLE_RATE).astype(np.float32)


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """White, pink (1/f) or brown (1/f^2) noise with unit RMS, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    f[0] = f[1] if n > 1 else 1.0
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[color]
    noise = np.fft.irfft(spectrum / f ** exponent, n)
    return (noise / rms(noise)).astype(np.float32)


def hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: 50 or 60 Hz and its odd harmonics, unit RMS."""
    base = 50.0 if rng.random() < 0.5 else 60.0
    t = np.arange(n) / SAMPLE_RATE
    x = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 3, 5, 7))
    return (x / rms(x)).astype(np.float32)


def mix(signal: np.ndarray, other: np.ndarray, snr_db: float, offset: int = 0) -> np.ndarray:
    """signal + other scaled to snr_db below it; other is placed at offset and cut or looped to fit."""
    if len(other) == 0:
        return signal
    reps = int(np.ceil((len(signal) + offset) / len(other)))
    other = np.tile(other, reps)[offset: offset + len(signal)]
    scale = rms(signal) / (rms(other) * 10 ** (snr_db / 20))
    return (signal + scale * other).astype(np.float32)


def reverb(x: np.ndarray, rt60: float, wet: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: exponentially decaying noise (decaying 60 dB in rt60 s) after the direct sound."""
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * 10 ** (-3 * t / rt60)
    ir = np.concatenate([[1.0], np.zeros(int(0.005 * SAMPLE_RATE)), wet * tail / np.sqrt(np.sum(tail ** 2) + EPS)])
    size = len(x) + len(ir) - 1
    fft = 1 << (size - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, fft) * np.fft.rfft(ir, fft), fft)[: len(x)]
    return (y * rms(x) / rms(y)).astype(np.float32)


def eq_recipe(rng: np.random.Generator) -> dict:
    """A random equaliser: a spectral tilt, one or two bell bands and sometimes a roll-off above a cutoff.
    Another instrument sample set, microphone or room colours a sound this way; training on it teaches the
    timbre of a class, not the colour of its one source."""
    bands = [[round(float(np.exp(rng.uniform(np.log(150), np.log(6000)))), 1), round(float(rng.uniform(-10, 10)), 2),
              round(float(rng.uniform(0.3, 1.5)), 3)] for _ in range(int(rng.integers(1, 3)))]
    recipe = {"tilt": round(float(rng.uniform(-2.5, 2.5)), 2), "bands": bands}
    if rng.random() < 0.3:
        recipe["cutoff"] = round(float(rng.uniform(2500, 7000)), 1)
    return recipe


def equalize(x: np.ndarray, tilt: float, bands: list, cutoff: float | None = None) -> np.ndarray:
    """Apply an equaliser (see eq_recipe) in the frequency domain, keeping the RMS level.

    tilt: dB per octave around 1 kHz; bands: [centre Hz, gain dB, width in octaves] (Gaussian bells on a
    log-frequency axis); cutoff: 12 dB per octave of roll-off above it."""
    if len(x) < 2:
        return x
    spectrum = np.fft.rfft(x)
    f = np.maximum(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE), 20.0)
    octaves = np.log2(f / 1000.0)
    gain_db = np.clip(tilt * octaves, -18, 18)
    for centre, gain, width in bands:
        gain_db += gain * np.exp(-0.5 * (np.log2(f / centre) / width) ** 2)
    if cutoff is not None:
        gain_db -= 12.0 * np.maximum(np.log2(f / cutoff), 0.0)
    y = np.fft.irfft(spectrum * 10 ** (gain_db / 20), len(x))
    return (y * rms(x) / rms(y)).astype(np.float32)


def phone(x: np.ndarray) -> np.ndarray:
    """A telephone's band: down to 8 kHz and back (nothing above 4 kHz), low end thinned."""
    y = soxr.resample(soxr.resample(x, SAMPLE_RATE, PHONE_RATE), PHONE_RATE, SAMPLE_RATE)[: len(x)]
    y = y - np.convolve(y, np.ones(40) / 40, mode="same")  # a crude high-pass around 400 Hz
    return y.astype(np.float32)


def pad(x: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    return np.concatenate([np.zeros(int(before_s * SAMPLE_RATE), np.float32), x,
                           np.zeros(int(after_s * SAMPLE_RATE), np.float32)])


def crop(x: np.ndarray, length_s: float, start_frac: float) -> np.ndarray:
    n = int(length_s * SAMPLE_RATE)
    if len(x) <= n:
        return x
    start = int(start_frac * (len(x) - n))
    return x[start: start + n]


def fit(x: np.ndarray, min_s: float, max_s: float, lead_frac: float) -> np.ndarray:
    """Speed up audio longer than max_s until it fits; pad audio shorter than min_s with silence
    (lead_frac of the padding before it)."""
    if seconds(x) > max_s:
        x = speed(x, seconds(x) / max_s * 1.001)[: int(max_s * SAMPLE_RATE)]
    if seconds(x) < min_s:
        missing = min_s - seconds(x) + 0.01
        x = pad(x, missing * lead_frac, missing * (1 - lead_frac))
    return x


def level(x: np.ndarray, peak_db: float) -> np.ndarray:
    """Scale to the given peak level in dB below full scale (never clipping)."""
    peak = float(np.abs(x).max())
    if peak < EPS:
        return x
    return (x * (10 ** (peak_db / 20) / peak)).astype(np.float32)
