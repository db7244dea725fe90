"""The Whisper front end against transformers' WhisperFeatureExtractor, and the audio-length arithmetic.

Fixtures are synthesised: speech-like (a gliding voiced harmonic series shaped by three formants,
amplitude-modulated at a syllable rate, with breath noise), white noise and pure tones.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2audio.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    audio_token_count,
    load_audio,
    log_mel_spectrogram,
    num_valid_frames,
    split_at_pauses,
    split_into_windows,
)
from qwen2audio.audio.features import (
    AUDIO_TOKENS_PER_SECOND,
    N_AUDIO_TOKENS_PER_WINDOW,
    N_ENCODER_FRAMES,
    SPEECH_MARGIN,
    cut_windows,
    encoder_frame_count,
    mel_filters,
    pause_samples,
    speech_windows,
)
from qwen2audio.audio import features
from qwen2audio.audio.vad import find_pauses, no_speech_probability

transformers = pytest.importorskip("transformers")

PARITY_TOLERANCE = 1e-4
CLIP_SECONDS = [0.1, 0.5, 1.7, 12, 29.99, 30]
FORMANTS_HZ = [(700, 130), (1220, 70), (2600, 160)]  # (centre, bandwidth) of an /a/-like vowel


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    return _speech_like(seconds, seed).copy()


@lru_cache(maxsize=None)
def _speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))  # Hz, a gliding pitch
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = np.zeros(n)
    for k in range(1, 40):
        harmonic_hz = k * f0
        gain = sum(np.exp(-0.5 * ((harmonic_hz - centre) / width) ** 2) for centre, width in FORMANTS_HZ)
        voiced += (gain + 0.02) / k**0.5 * np.sin(k * phase) * (harmonic_hz < SAMPLE_RATE / 2)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 2  # 4 syllables a second
    audio = 0.1 * voiced * syllables + 0.003 * rng.standard_normal(n)
    return audio.astype(np.float32)


def white_noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(round(seconds * SAMPLE_RATE)))).astype(np.float32)


def tone(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * (220 + 100 * seed) * t)).astype(np.float32)


SIGNALS = {"speech": speech_like, "noise": white_noise, "tone": tone}


def reference_features(clips, n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    out = extractor(
        list(clips), sampling_rate=SAMPLE_RATE, return_attention_mask=True, padding="max_length", return_tensors="pt"
    )
    return out["input_features"], out["attention_mask"]


def assert_matches_reference(clips, n_mels: int) -> None:
    features, frame_mask = log_mel_spectrogram(clips, n_mels=n_mels)
    expected_features, expected_mask = reference_features(clips, n_mels)
    assert features.shape == (len(clips), n_mels, N_FRAMES) and features.dtype == torch.float32
    assert frame_mask.shape == (len(clips), N_FRAMES) and frame_mask.dtype == torch.int64
    assert (features - expected_features).abs().max().item() < PARITY_TOLERANCE
    assert torch.equal(frame_mask, expected_mask.long())
    assert frame_mask.sum(-1).tolist() == [num_valid_frames(len(clip)) for clip in clips]


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("kind", list(SIGNALS))
def test_log_mel_matches_transformers_for_every_length(n_mels, kind):
    clips = [SIGNALS[kind](seconds, seed=i) for i, seconds in enumerate(CLIP_SECONDS)]
    assert_matches_reference(clips, n_mels)  # one batch of mixed lengths


def test_log_mel_matches_transformers_for_single_clips_and_mixed_levels():
    # Loud and quiet clips of different kinds in one batch: the -8 floor is taken per clip.
    clips = [0.01 * speech_like(0.5), white_noise(30.0), 0.9 * tone(1.7), speech_like(12.0, seed=3) * 0.001]
    assert_matches_reference(clips, n_mels=128)
    assert_matches_reference(clips[:1], n_mels=128)
    batch, _ = log_mel_spectrogram(clips, n_mels=128)
    for i, clip in enumerate(clips):
        alone, _ = log_mel_spectrogram([torch.from_numpy(clip)], n_mels=128)
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dither", [1e-4, 0.01])
def test_dither_matches_transformers_with_the_same_seed(dither):
    """A checkpoint's preprocessor_config.json may ask for dither: noise over the padded 30 s batch, drawn
    as transformers draws it, so the same torch seed gives its features; another seed other ones."""
    clips = [speech_like(3.0), white_noise(0.5, seed=2), tone(30.0)]
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, dither=dither)
    torch.manual_seed(7)
    expected = extractor(clips, sampling_rate=SAMPLE_RATE, return_attention_mask=True, padding="max_length",
                         return_tensors="pt")
    torch.manual_seed(7)
    features, frame_mask = log_mel_spectrogram(clips, n_mels=80, dither=dither)
    assert (features - expected["input_features"]).abs().max().item() < PARITY_TOLERANCE
    assert torch.equal(frame_mask, expected["attention_mask"].long())  # the clips' own frames, not the noise's
    again, _ = log_mel_spectrogram(clips, n_mels=80, dither=dither)
    plain, _ = log_mel_spectrogram(clips, n_mels=80)
    assert not torch.equal(again, features) and not torch.equal(plain, features)
    # the noise fills the padding: past a clip's end the features are no longer the floor
    assert torch.all(plain[1, :, 100:] == plain[1, 0, 100]) and features[1, :, 100:].std() > 0.01


def test_silence_is_the_floor():
    features, frame_mask = log_mel_spectrogram([np.zeros(16000, dtype=np.float32)], n_mels=80)
    assert torch.all(features == (-10 + 4) / 4)
    assert frame_mask.sum().item() == 100


# Lengths at the edges of the frames the front end transforms: a frame is centred every 160 samples
# and reads 200 on each side, and the first and last frames read reflected samples.
EDGE_LENGTHS = [1, 2, 3, 159, 160, 161, 199, 200, 201, 202, 399, 400, 401, 16001,
                N_SAMPLES - 241, N_SAMPLES - 240, N_SAMPLES - 201, N_SAMPLES - 200, N_SAMPLES - 199, N_SAMPLES - 1]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers_when_only_the_last_samples_sound(n_mels):
    # All the energy in a clip's last samples: the frames that read past its end must still be computed.
    rng = np.random.default_rng(0)
    clips = []
    for n in EDGE_LENGTHS:
        clip = np.zeros(n, dtype=np.float32)
        clip[-3:] = rng.uniform(-1, 1, size=min(3, n))
        clips.append(clip)
    assert_matches_reference(clips, n_mels)


def test_a_batch_gives_each_clip_what_it_gets_alone():
    rng = np.random.default_rng(1)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (N_SAMPLES, 1, 7777, 201, 16000 * 5 + 3)]
    batch, batch_mask = log_mel_spectrogram(clips, n_mels=80)
    for i, clip in enumerate(clips):
        alone, alone_mask = log_mel_spectrogram([clip], n_mels=80)
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-6)
        assert torch.equal(alone_mask[0], batch_mask[i])
    on_device, _ = log_mel_spectrogram(clips, n_mels=80, device="cpu")
    torch.testing.assert_close(on_device, batch, rtol=0, atol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    ).T
    filters = mel_filters(n_mels)
    assert filters.shape == (n_mels, 201) and filters.dtype == torch.float32
    assert np.abs(filters.numpy().astype(np.float64) - expected).max() < 1e-7


# --- Lengths --------------------------------------------------------------------------------------------
def test_window_constants():
    assert (N_SAMPLES, N_FRAMES, N_ENCODER_FRAMES, N_AUDIO_TOKENS_PER_WINDOW) == (480000, 3000, 1500, 750)
    assert AUDIO_TOKENS_PER_SECOND == 25


def test_audio_token_count_values():
    assert audio_token_count(N_FRAMES) == 750
    assert audio_token_count(num_valid_frames(SAMPLE_RATE)) == 25  # 1 s
    assert audio_token_count(num_valid_frames(10 * SAMPLE_RATE)) == 250
    assert encoder_frame_count(3000) == 1500
    assert audio_token_count(1) == 0 and audio_token_count(0) == 0


def test_audio_token_count_matches_the_reference_formula_for_every_length():
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    lengths = torch.arange(1, N_FRAMES + 1)  # (3000,)
    expected_encoder, expected_tokens = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, lengths)
    assert torch.equal(encoder_frame_count(lengths), expected_encoder)
    assert torch.equal(audio_token_count(lengths), expected_tokens)
    assert [audio_token_count(n) for n in range(1, N_FRAMES + 1)] == expected_tokens.tolist()


def test_num_valid_frames():
    assert [num_valid_frames(n) for n in (1, 160, 161, 16000, N_SAMPLES, N_SAMPLES + 1)] == [1, 1, 2, 100, 3000, 3000]


def test_length_functions_reject_nonsense():
    with pytest.raises(ValueError):
        audio_token_count(-1)
    with pytest.raises(TypeError):
        audio_token_count(torch.tensor([1.5]))


# --- Long audio -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds, n_windows", [(75, 3), (30, 1), (30.01, 2), (0.5, 1), (60, 2), (90.01, 4)])
def test_split_into_windows_keeps_every_sample(seconds, n_windows):
    audio = np.random.default_rng(0).standard_normal(int(round(seconds * SAMPLE_RATE))).astype(np.float32)
    windows = split_into_windows(audio)
    assert len(windows) == n_windows
    assert all(len(w) <= N_SAMPLES for w in windows)
    np.testing.assert_array_equal(np.concatenate(windows), audio)
    if n_windows > 1:
        assert min(len(w) for w in windows) > N_SAMPLES // 2  # never a tiny tail
        assert max(len(w) for w in windows) - min(len(w) for w in windows) <= 1
    features, frame_mask = log_mel_spectrogram(windows[:1], n_mels=80)  # every window is a valid clip
    assert features.shape == (1, 80, N_FRAMES)


def test_split_into_windows_accepts_tensors_and_rejects_empty():
    windows = split_into_windows(torch.zeros(75 * SAMPLE_RATE))
    assert [len(w) for w in windows] == [25 * SAMPLE_RATE] * 3
    with pytest.raises(ValueError, match="empty"):
        split_into_windows(np.zeros(0, dtype=np.float32))


def with_pauses(pauses_at: list[float], seconds: float, seed: int = 0) -> np.ndarray:
    """Noise bursts ("words") with 0.3 s near-silent pauses centred at ``pauses_at`` (seconds)."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 0.3
    for t in pauses_at:
        a, b = int((t - 0.15) * SAMPLE_RATE), int((t + 0.15) * SAMPLE_RATE)
        audio[a:b] *= 0.001
    return audio


def test_split_at_pauses_cuts_in_the_pauses_and_keeps_every_sample():
    pauses = [4.0, 12.0, 21.0, 26.0, 38.0, 51.0]
    audio = with_pauses(pauses, 60.0)
    windows = split_at_pauses(audio, 20 * SAMPLE_RATE)
    np.testing.assert_array_equal(np.concatenate(windows), audio)
    cuts = np.cumsum([len(w) for w in windows])[:-1] / SAMPLE_RATE
    # from 0 the pause in [10, 20) s is at 12; from 12, in [22, 32): 26 (not 21); from 26, in [36, 46): 38;
    # from 38, in [48, 58): 51; then 9 s are left
    assert list(cuts) == pytest.approx([12.0, 26.0, 38.0, 51.0], abs=0.15)
    assert all(len(w) <= 20 * SAMPLE_RATE for w in windows)


def test_split_at_pauses_leaves_short_clips_whole_and_no_sliver_at_the_end():
    audio = with_pauses([], 30.0)
    assert len(split_at_pauses(audio)) == 1  # 30 s: one window
    longer = with_pauses([], 30.2)  # no pause: the quietest span anywhere, but never a 0.2 s tail
    windows = split_at_pauses(longer)
    assert len(windows) == 2 and min(len(w) for w in windows) >= N_SAMPLES // 4
    np.testing.assert_array_equal(np.concatenate(windows), longer)
    silence = np.zeros(70 * SAMPLE_RATE, dtype=np.float32)  # all equally quiet: the latest cut, fewest windows
    assert [len(w) for w in split_at_pauses(silence)] == [N_SAMPLES - 200, N_SAMPLES - 200, 10 * SAMPLE_RATE + 400]
    with pytest.raises(ValueError, match="empty"):
        split_at_pauses(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="at least 800"):
        split_at_pauses(audio, 100)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def two_questions(gap: float = 0.5, noise_snr_db: float | None = None, seed: int = 0,
                  with_doorbell: bool = True) -> tuple[np.ndarray, list[int]]:
    """The bundled spoken question (2.06 s, speech from 0.26 s to its end), ``gap`` s of silence, the bundled
    doorbell (1.6 s; or nothing), the same silence, the question again, 0.5 s of silence; with
    ``noise_snr_db``, white noise over all of it at that level below the speech. Returns it and where each
    piece starts."""
    question, doorbell = load_audio(str(EXAMPLES / "question.flac")), load_audio(str(EXAMPLES / "doorbell.flac"))
    silence = np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32)
    doorbell = doorbell if with_doorbell else doorbell[:0]
    pieces = [question, silence, doorbell, silence, question, np.zeros(SAMPLE_RATE // 2, dtype=np.float32)]
    starts = list(np.cumsum([0] + [len(x) for x in pieces[:-1]]))
    audio = np.concatenate(pieces)
    if noise_snr_db is not None:
        level = np.sqrt(np.mean(question ** 2)) * 10 ** (-noise_snr_db / 20)
        audio = audio + level * np.random.default_rng(seed).standard_normal(len(audio)).astype(np.float32)
    return audio.astype(np.float32), starts


@pytest.mark.parametrize("noise_snr_db", [None, 10.0])
def test_a_pause_is_all_that_is_not_speech_between_speech(noise_snr_db):
    """Silero VAD: between the two questions, the silence, the doorbell and the silence are one pause (the
    doorbell is not speech); the silence before the first word and after the last are not pauses. In white
    noise 10 dB under the speech too (an energy threshold finds no pause there)."""
    audio, starts = two_questions(noise_snr_db=noise_snr_db)
    [(start, end)] = find_pauses(audio, int(0.3 * SAMPLE_RATE))
    assert starts[1] - 0.3 * SAMPLE_RATE <= start <= starts[1] + 0.1 * SAMPLE_RATE  # the first question ends
    assert starts[4] + 0.1 * SAMPLE_RATE <= end <= starts[4] + 0.4 * SAMPLE_RATE  # the second starts to speak
    # the pause (2.6 s) is longer than twice the margin: speech keeps 0.5 s of it on each side, the rest (the
    # doorbell) is a window of no speech; after the last word, what lies beyond 0.5 s is one too
    windows = cut_windows(audio, N_SAMPLES, int(0.3 * SAMPLE_RATE))
    np.testing.assert_array_equal(np.concatenate([w.audio for w in windows]), audio)
    assert [w.start for w in windows] == list(np.cumsum([0] + [len(w.audio) for w in windows[:-1]]))
    assert [w.start for w in windows[1:3]] == [start + SPEECH_MARGIN, end - SPEECH_MARGIN]
    assert [w.speech for w in windows[:3]] == [True, False, True]
    assert windows[1].start < starts[2] and starts[3] < windows[2].start  # the doorbell: in no window of speech
    assert all(not w.speech for w in windows[3:])
    assert [w.start for w in speech_windows(audio, N_SAMPLES, int(0.3 * SAMPLE_RATE))] == [
        windows[0].start, windows[2].start]  # those transcribed
    assert [len(w) for w in split_at_pauses(audio, N_SAMPLES, int(0.3 * SAMPLE_RATE))] == [len(w.audio) for w in windows]
    # a pause longer than asked for is not cut at, and one up to twice the margin is cut in its middle
    assert [w.speech for w in cut_windows(audio, N_SAMPLES, int(4.0 * SAMPLE_RATE))][:1] == [True]
    assert len(speech_windows(audio, N_SAMPLES, int(4.0 * SAMPLE_RATE))) == 1
    close, starts = two_questions(gap=0.0, with_doorbell=False)  # the question's own silences: 0.5 s
    [(start, end)] = find_pauses(close, int(0.2 * SAMPLE_RATE))
    windows = cut_windows(close, N_SAMPLES, int(0.2 * SAMPLE_RATE))
    assert windows[1].start == (start + end) // 2 and [w.speech for w in windows[:2]] == [True, True]


def test_cut_at_pauses_still_cuts_a_stretch_longer_than_the_window():
    audio, _ = two_questions(gap=0.5)
    whole = split_at_pauses(audio, 4 * SAMPLE_RATE)  # no pause cuts: 8.7 s in windows of at most 4 s
    assert len(whole) == 3
    audio = np.concatenate([audio[:2 * SAMPLE_RATE]] * 3)  # speech, no pause of 0.3 s: 6 s, cut where quietest
    windows = split_at_pauses(audio, 4 * SAMPLE_RATE, int(0.3 * SAMPLE_RATE))
    assert len(windows) >= 2 and all(len(w) <= 4 * SAMPLE_RATE for w in windows)
    np.testing.assert_array_equal(np.concatenate(windows), audio)


def test_a_window_ends_in_a_pause_the_vad_hears_not_where_it_is_quietest(monkeypatch):
    """Without pause cuts a long clip is still cut in a pause between speech: a question, a doorbell, the
    question again, in white noise 10 dB below the speech, in windows of at most 5 s. The quietest 25 ms of
    the window's last half lie inside the second question (a quiet moment of a word); the VAD hears the
    doorbell as part of the pause between the questions, and the cut goes in its middle."""
    audio, _ = two_questions(gap=0.0, noise_snr_db=10.0)
    [(pause_start, pause_end)] = find_pauses(audio, int(0.3 * SAMPLE_RATE))
    windows = cut_windows(audio, 5 * SAMPLE_RATE)
    assert len(windows) == 2 and all(w.speech for w in windows)
    cut = windows[1].start
    margin = int(0.3 * SAMPLE_RATE)
    assert pause_start + margin < cut < pause_end - margin
    np.testing.assert_array_equal(np.concatenate([w.audio for w in windows]), audio)
    monkeypatch.setattr(features, "_vad_pause", lambda *args: None)  # the quietest 25 ms alone
    [quietest] = [w.start for w in cut_windows(audio, 5 * SAMPLE_RATE)[1:]]
    assert quietest > pause_end  # inside the second question
    # no speech heard where a cut may go (the doorbell alone): the quietest 25 ms, as before
    monkeypatch.undo()
    rings = np.tile(load_audio(str(EXAMPLES / "doorbell.flac")), 4)
    assert features._vad_pause(rings, 2 * SAMPLE_RATE, 4 * SAMPLE_RATE) is None
    assert [w.start for w in cut_windows(rings, 4 * SAMPLE_RATE)] == [0, *features._window_cuts(
        rings, 4 * SAMPLE_RATE, listen=False)]


def test_noise_music_and_silence_have_no_pauses():
    rng = np.random.default_rng(1)
    assert find_pauses(0.1 * rng.standard_normal(5 * SAMPLE_RATE).astype(np.float32), SAMPLE_RATE // 10) == []
    assert find_pauses(np.zeros(5 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE // 10) == []
    bells = load_audio(str(EXAMPLES / "doorbell.flac"))
    rings = np.concatenate([bells, np.zeros(SAMPLE_RATE, dtype=np.float32), bells])
    assert find_pauses(rings, SAMPLE_RATE // 10) == []  # no speech: nothing to separate
    assert [(w.start, len(w.audio), w.speech) for w in cut_windows(rings, N_SAMPLES, SAMPLE_RATE // 10)] == [
        (0, len(rings), False)]
    # without pause cuts, every window is transcribed
    assert [(w.start, len(w.audio), w.speech) for w in cut_windows(rings, N_SAMPLES)] == [(0, len(rings), True)]
    long_silence = np.zeros(70 * SAMPLE_RATE, dtype=np.float32)  # no speech, still in windows of at most 30 s
    assert [(len(w.audio), w.speech) for w in cut_windows(long_silence, N_SAMPLES, SAMPLE_RATE // 10)] == [
        (N_SAMPLES - 200, False), (N_SAMPLES - 200, False), (10 * SAMPLE_RATE + 400, False)]


def test_no_speech_probability_is_low_for_speech_and_high_for_everything_else():
    """Whisper's no_speech_prob for a stretch of audio, from the VAD: a spoken question (alone, or amid 4 s
    of noise) scores near 0; silence, noise and a doorbell near 1; no audio at all 1."""
    question = load_audio(str(EXAMPLES / "question.flac"))
    rng = np.random.default_rng(2)
    noise = 0.05 * rng.standard_normal(4 * SAMPLE_RATE).astype(np.float32)
    first = no_speech_probability(question)
    assert first < 0.05
    some_speech = noise.copy()
    some_speech[SAMPLE_RATE: SAMPLE_RATE + len(question)] += question
    assert no_speech_probability(some_speech) < 0.2
    for other in (np.zeros(3 * SAMPLE_RATE, np.float32), noise, load_audio(str(EXAMPLES / "doorbell.flac"))):
        assert no_speech_probability(other) > 0.8
    assert no_speech_probability(np.zeros(0, np.float32)) == 1.0
    assert no_speech_probability(question) == first  # no state carried over from the clips in between


def test_pause_seconds_are_checked():
    assert pause_samples(None) is None and pause_samples(0) is None and pause_samples(0.3) == 4800  # 0: no cuts
    for bad in (-1.0, 0.01, 6.0, True, False, "0.3"):
        with pytest.raises(ValueError, match="cut_at_pauses must be between 0.05 and 5"):
            pause_samples(bad)
    with pytest.raises(ValueError, match="min_pause_samples must be a positive int"):
        split_at_pauses(with_pauses([], 2.0), N_SAMPLES, 0)


# --- Errors ---------------------------------------------------------------------------------------------
def test_log_mel_errors():
    with pytest.raises(ValueError, match="clip 1 is empty"):
        log_mel_spectrogram([tone(1.0), np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match="split_into_windows"):
        log_mel_spectrogram([np.zeros(N_SAMPLES + 1, dtype=np.float32)])
    for bad in (np.nan, np.inf, -np.inf):  # one bad sample among good ones
        with pytest.raises(ValueError, match="clip 0 contains NaN or infinite samples"):
            log_mel_spectrogram([np.concatenate([tone(1.0), np.array([bad], dtype=np.float32), tone(1.0)])])
    with pytest.raises(ValueError, match="load_audio"):
        log_mel_spectrogram([np.zeros(100, dtype=np.int16)])
    with pytest.raises(ValueError, match="1-D"):
        log_mel_spectrogram([np.zeros((2, 100), dtype=np.float32)])
    with pytest.raises(TypeError, match=r"\[audio\]"):
        log_mel_spectrogram(tone(1.0))
    with pytest.raises(ValueError, match="empty batch"):
        log_mel_spectrogram([])
    with pytest.raises(ValueError, match="n_mels"):
        log_mel_spectrogram([tone(1.0)], n_mels=0)
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="dither must be a number >= 0"):
            log_mel_spectrogram([tone(1.0)], dither=bad)
