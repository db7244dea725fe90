"""Audio in: decode any file or bytes to float32 mono 16 kHz (io), and the Whisper front end (features)."""

from qwen2audio.audio.features import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    Window,
    audio_token_count,
    cut_windows,
    log_mel_spectrogram,
    num_valid_frames,
    speech_windows,
    split_at_pauses,
    split_into_windows,
)
from qwen2audio.audio.io import AudioError, load_audio

__all__ = [
    "load_audio",
    "AudioError",
    "log_mel_spectrogram",
    "audio_token_count",
    "num_valid_frames",
    "split_into_windows",
    "split_at_pauses",
    "cut_windows",
    "speech_windows",
    "Window",
    "SAMPLE_RATE",
    "N_SAMPLES",
    "N_FRAMES",
]
