"""load_audio: every format a user may have decodes to float32 mono 16 kHz, and bad input fails clearly.

All fixtures are generated here: a 1.5 s, 440 Hz stereo sine is written in each format (libsndfile for
wav/flac/ogg/mp3, PyAV for m4a/aac and webm/opus) and must come back with the right length, pitch and
level from a path, from bytes and from a file object.
"""

import base64
import io
import re
import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile
import torch

from qwen2audio import AudioWarning
from qwen2audio.audio import SAMPLE_RATE, AudioError, load_audio
from qwen2audio.audio.features import MIN_SAMPLES
from qwen2audio.audio.io import SUPPORTED_FORMATS

TONE_HZ = 440.0
TONE_SECONDS = 1.5
TONE_AMPLITUDE = 0.5
TONE_RMS = TONE_AMPLITUDE / np.sqrt(2)  # 0.354
EXPECTED_SAMPLES = int(TONE_SECONDS * SAMPLE_RATE)  # 24000 samples at 16 kHz


def sine(freq_hz: float, seconds: float, rate: int, channels: int = 2, amplitude: float = TONE_AMPLITUDE) -> np.ndarray:
    """(n, channels) float32 sine, the same in every channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def dominant_hz(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def rms(samples: np.ndarray) -> float:
    middle = samples[len(samples) // 10 : -len(samples) // 10]  # skip codec onsets and tails
    return float(np.sqrt(np.mean(middle.astype(np.float64) ** 2)))


def encode_with_pyav(samples: np.ndarray, rate: int, container: str, codec: str, codec_rate: int) -> bytes:
    """(n, 2) float32 -> the bytes of a file encoded by FFmpeg (PyAV resamples to the codec's rate)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=codec_rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = 0  # with timestamps the muxer records the encoder delay (mp4 edit list) for trimming
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


# name -> (how to write it, the rate it is written at)
SOUNDFILE_FORMATS = {
    "int16.wav": (dict(format="WAV", subtype="PCM_16"), 44100),
    "float32.wav": (dict(format="WAV", subtype="FLOAT"), 44100),
    "clip.flac": (dict(format="FLAC", subtype="PCM_16"), 44100),
    "vorbis.ogg": (dict(format="OGG", subtype="VORBIS"), 44100),
    "opus.ogg": (dict(format="OGG", subtype="OPUS"), 48000),  # Opus only runs at 8/12/16/24/48 kHz
    "clip.mp3": (dict(format="MP3", subtype="MPEG_LAYER_III"), 44100),
}
PYAV_FORMATS = {
    "clip.m4a": ("ipod", "aac", 44100),
    "browser.webm": ("webm", "libopus", 48000),  # what a browser's MediaRecorder produces
}


@pytest.fixture(scope="module")
def encoded_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("encoded")
    paths = {}
    for name, (options, rate) in SOUNDFILE_FORMATS.items():
        paths[name] = folder / name
        soundfile.write(paths[name], sine(TONE_HZ, TONE_SECONDS, rate), rate, **options)
    for name, (container, codec, codec_rate) in PYAV_FORMATS.items():
        paths[name] = folder / name
        samples = sine(TONE_HZ, TONE_SECONDS, 44100)
        paths[name].write_bytes(encode_with_pyav(samples, 44100, container, codec, codec_rate))
    return paths


def assert_is_the_tone(samples: np.ndarray) -> None:
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - EXPECTED_SAMPLES) <= 0.01 * EXPECTED_SAMPLES, len(samples)
    assert abs(dominant_hz(samples) - TONE_HZ) < 2.0
    assert rms(samples) == pytest.approx(TONE_RMS, rel=0.05)


@pytest.mark.parametrize("name", [*SOUNDFILE_FORMATS, *PYAV_FORMATS])
def test_every_format_decodes_from_path_bytes_and_file_object(encoded_files, name):
    path = encoded_files[name]
    from_path = load_audio(path)
    assert_is_the_tone(from_path)
    assert_is_the_tone(load_audio(str(path)))
    assert_is_the_tone(load_audio(path.read_bytes()))
    assert_is_the_tone(load_audio(bytearray(path.read_bytes())))
    with open(path, "rb") as file:
        assert_is_the_tone(load_audio(file))
    assert_is_the_tone(load_audio(io.BytesIO(path.read_bytes())))


def test_lossless_formats_are_exact_up_to_resampling(encoded_files):
    wav = load_audio(encoded_files["float32.wav"])
    flac = load_audio(encoded_files["clip.flac"])
    expected = load_audio(sine(TONE_HZ, TONE_SECONDS, 44100), sample_rate=44100)
    np.testing.assert_allclose(wav, expected, atol=1e-6)
    np.testing.assert_allclose(flac, expected, atol=1e-4)  # 16-bit quantisation


# --- The resampler --------------------------------------------------------------------------------------
def test_resampler_keeps_a_tone_below_8khz():
    tone = sine(7000.0, 1.0, 44100, channels=1)[:, 0]
    out = load_audio(tone, sample_rate=44100)
    assert len(out) == SAMPLE_RATE
    assert abs(dominant_hz(out) - 7000.0) < 2.0
    assert rms(out) == pytest.approx(rms(tone), rel=0.02)


def test_resampler_removes_a_tone_above_8khz_instead_of_aliasing_it():
    tone = sine(10000.0, 1.0, 44100, channels=1)[:, 0]  # would alias to 6 kHz without a low-pass filter
    out = load_audio(tone, sample_rate=44100)
    attenuation_db = 20 * np.log10(rms(out) / rms(tone))
    assert attenuation_db < -40.0


@pytest.mark.parametrize("rate, n, channels", [(44100, 44101, 2), (44100, 66150, 1), (22050, 33077, 2),
                                                (48000, 48013, 1), (8000, 12345, 1), (11025, 999, 2)])
def test_resampled_files_equal_the_official_examples_loader(tmp_path, rate, n, channels):
    """The official Qwen2-Audio examples read audio with librosa.load(path, sr=16000): the same samples
    (channels averaged, soxr's high-quality resampler) and the same length (librosa fixes it at
    ceil(n * 16000 / rate); soxr alone is one short for some lengths, 44,101 at 44.1 kHz among them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its audioread fallback imports aifc and sunau
        import librosa

    samples = np.random.default_rng(n).uniform(-0.5, 0.5, (n, channels)).astype(np.float32)
    path = tmp_path / "clip.wav"
    soundfile.write(path, samples, rate, subtype="FLOAT")
    reference, sr = librosa.load(path, sr=SAMPLE_RATE)
    ours = load_audio(path)
    assert sr == SAMPLE_RATE and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_16khz_input_is_passed_through_unchanged():
    samples = np.random.default_rng(0).uniform(-1, 1, 16000).astype(np.float32)
    np.testing.assert_array_equal(load_audio(samples, sample_rate=SAMPLE_RATE), samples)


# --- Arrays -------------------------------------------------------------------------------------------
def test_array_layouts_are_mixed_to_the_same_mono_signal():
    stereo = sine(TONE_HZ, TONE_SECONDS, 44100)  # (n, 2)
    stereo[:, 1] *= 0.5  # different channels, so averaging is visible
    expected = load_audio(stereo.mean(axis=1), sample_rate=44100)
    assert_is_the_tone(load_audio(stereo.mean(axis=1) * 4 / 3, sample_rate=44100))
    np.testing.assert_allclose(load_audio(stereo, sample_rate=44100), expected, atol=1e-6)  # (n, channels)
    np.testing.assert_allclose(load_audio(stereo.T.copy(), sample_rate=44100), expected, atol=1e-6)  # (channels, n)
    np.testing.assert_allclose(load_audio(torch.from_numpy(stereo), sample_rate=44100), expected, atol=1e-6)
    np.testing.assert_allclose(load_audio(torch.from_numpy(stereo.T.copy()), sample_rate=44100.0), expected, atol=1e-6)


def test_integer_pcm_arrays_are_scaled_to_unit_range():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(load_audio(pcm, sample_rate=SAMPLE_RATE, min_samples=1), [0.0, 0.5, -1.0, 32767 / 32768])
    assert load_audio(np.array([128, 255, 0], dtype=np.uint8), sample_rate=SAMPLE_RATE, min_samples=1)[0] == 0.0


def test_integer_pcm_stored_as_floats_is_warned_about_and_used(tmp_path, recwarn):
    from qwen2audio import AudioWarning

    pcm = (np.sin(np.linspace(0, 200 * np.pi, SAMPLE_RATE)) * 12000).astype(np.int16)
    with pytest.warns(AudioWarning, match=r"<array>: float samples reach 1\.2e\+04, far past full scale .*integer array"):
        loud = load_audio(pcm.astype(np.float32), sample_rate=SAMPLE_RATE)
    np.testing.assert_array_equal(loud, pcm.astype(np.float32))  # nothing changed: the model hears what was given
    path = tmp_path / "loud.wav"
    soundfile.write(path, pcm.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")  # a float wav holds them too
    with pytest.warns(AudioWarning, match=r"loud\.wav: float samples reach .* divide the file's samples by 32768"):
        load_audio(path)
    recwarn.clear()
    load_audio(pcm, sample_rate=SAMPLE_RATE)  # integer PCM is scaled: no warning
    load_audio(pcm.astype(np.float32) / 32768 * 3, sample_rate=SAMPLE_RATE)  # hot, +10 dB past full scale
    assert not [w for w in recwarn if issubclass(w.category, AudioWarning)]


def test_array_without_sample_rate_is_refused():
    with pytest.raises(AudioError, match=r"<array>.*sample_rate"):
        load_audio(np.zeros(16000, dtype=np.float32))


@pytest.mark.parametrize("rate", [0, -16000, float("nan")])
def test_bad_sample_rate_is_refused(rate):
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(np.zeros(16000, dtype=np.float32), sample_rate=rate)


def test_sample_rate_with_an_encoded_file_is_refused(encoded_files):
    with pytest.raises(AudioError, match=r"int16\.wav.*own rate"):
        load_audio(encoded_files["int16.wav"], sample_rate=44100)


@pytest.mark.parametrize(
    "samples, problem",
    [
        (np.full(1000, np.nan, dtype=np.float32), "NaN or infinite"),
        (np.array([0.0, np.inf, 0.1], dtype=np.float32), "NaN or infinite"),
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros((2, 0), dtype=np.float32), "empty"),
        (np.zeros(0, dtype=np.int32), "empty"),  # before any check of its loudness
        (np.zeros(100, dtype=np.complex64), "dtype complex64"),
        (np.zeros(100, dtype=bool), "dtype bool"),
        (np.zeros((2, 2, 100), dtype=np.float32), r"shape \(2, 2, 100\)"),
        (np.zeros((20, 16000), dtype=np.float32), "at most 8 channels"),
    ],
)
def test_bad_arrays_raise_audio_error(samples, problem):
    with pytest.raises(AudioError, match=rf"<array>.*{problem}"):
        load_audio(samples, sample_rate=SAMPLE_RATE)
    with pytest.raises(AudioError, match=rf"my_clip.*{problem}"):
        load_audio(samples, sample_rate=SAMPLE_RATE, name="my_clip")


# --- Bad files ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError, match=r"nowhere\.wav.*does not exist"):
        load_audio(path)


def test_a_path_passed_as_bytes_is_told_apart_from_a_corrupt_recording(tmp_path):
    path = tmp_path / "clip.wav"
    soundfile.write(path, np.zeros(1600, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"the name of a file .*clip\.wav.*pass the path as a str"):
        load_audio(str(path).encode())
    assert load_audio(str(path)).shape == (1600,)


def test_channels_that_cancel_out_in_the_mono_mix_are_warned_of():
    left = sine(TONE_HZ, 1.0, SAMPLE_RATE, channels=1)
    with pytest.warns(AudioWarning, match=r"<array>: its channels cancel out when averaged to mono"):
        mono = load_audio(np.concatenate([left, -left], axis=1), sample_rate=SAMPLE_RATE)
    assert np.abs(mono).max() < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary stereo clip, or silence, says nothing
        load_audio(np.concatenate([left, 0.5 * left], axis=1), sample_rate=SAMPLE_RATE)
        load_audio(np.zeros((16000, 2), np.float32), sample_rate=SAMPLE_RATE)


def test_bytes_from_someone_else_are_not_looked_up_as_a_path(tmp_path):
    """A server decodes a client's bytes with local_hints=False: the bytes of an existing path and of a missing
    one fail alike, so no answer tells the client which files exist on the server."""
    path = tmp_path / "clip.wav"
    soundfile.write(path, np.zeros(1600, np.float32), SAMPLE_RATE)
    messages = []
    for data in (str(path).encode(), str(tmp_path / "missing.wav").encode()):
        with pytest.raises(AudioError, match="cannot decode the audio") as error:
            load_audio(data, name="upload", local_hints=False)
        messages.append(re.sub(r"'[^']*'", "", str(error.value)))
    assert messages[0] == messages[1] and "name of a file" not in messages[0]


def test_a_files_own_sample_rate_below_any_audio_rate_is_refused():
    """A damaged or forged header (1 Hz) is refused, not resampled up sixteen-thousandfold."""
    out = io.BytesIO()
    soundfile.write(out, np.zeros(10, np.float32), 1, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioError, match=r"sampled at 1 Hz, which is no audio rate.*header is damaged"):
        load_audio(out.getvalue())


def test_a_wav_whose_data_is_all_missing_is_cut_short_not_empty():
    out = io.BytesIO()
    soundfile.write(out, np.zeros(88200, np.float32), 44100, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioError, match=r"cut short: its header promises 88200 frames but holds none"):
        load_audio(out.getvalue()[:44])


def test_base64_text_or_a_long_string_passed_as_a_path_is_an_audio_error():
    """A str is a path: base64 text or a data: URL given as one is named as such (it raised OSError, "File
    name too long"), and the message quotes only its start."""
    out = io.BytesIO()
    soundfile.write(out, np.zeros(16000, np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    encoded = base64.b64encode(out.getvalue()).decode()
    for text in (encoded, "data:audio/wav;base64," + encoded, "data:audio/wav;base64,UklGRg=="):
        with pytest.raises(AudioError, match=r"base64 text \(or a data: URL\), not a path.*b64decode") as error:
            load_audio(text)
        assert len(str(error.value)) < 400
    with pytest.raises(AudioError, match=r"cannot be read as a path \(File name too long\)"):
        load_audio("x" * 5000 + ".wav")
    with pytest.raises(AudioError, match="the path is empty"):
        load_audio("")


@pytest.mark.parametrize("name", ["corrupt.wav", "corrupt.mp3"])
def test_corrupt_file_names_the_file_and_the_supported_formats(tmp_path, name):
    path = tmp_path / name
    data = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    with pytest.raises(AudioError, match=re.escape(name) + ": cannot decode") as error:
        load_audio(path)
    assert SUPPORTED_FORMATS in str(error.value)
    with pytest.raises(AudioError, match=r"<bytes: 20000 bytes>: cannot decode"):
        load_audio(data)
    with pytest.raises(AudioError, match=r"upload\.bin: cannot decode"):
        load_audio(data, name="upload.bin")


def test_zero_length_wav(tmp_path):
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.zeros((0, 2), dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"silence\.wav.*empty \(0 samples\)"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"bytes.*empty \(0 samples\)"):
        load_audio(path.read_bytes())


def test_zero_byte_file(tmp_path):
    path = tmp_path / "nothing.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"nothing\.flac.*empty \(0 bytes\)"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"<bytes: 0 bytes>.*empty"):
        load_audio(b"")


def test_float_wav_with_nan_samples(tmp_path):
    path = tmp_path / "broken.wav"
    samples = sine(TONE_HZ, 0.1, 16000, channels=1)
    samples[100] = np.nan
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"broken\.wav.*NaN"):
        load_audio(path)


def test_text_mode_file_and_unknown_source_types(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with open(path) as text_file, pytest.raises(AudioError, match="mode 'rb'"):
        load_audio(text_file)
    with pytest.raises(AudioError, match="cannot read audio from 'int' objects"):
        load_audio(42)


@pytest.mark.parametrize("rate", [16, 44.1, 48, 999])
def test_a_sample_rate_in_khz_is_refused_not_resampled_a_thousandfold(rate):
    # sample_rate=16 meant 16 kHz: resampled to 16000 Hz, 30 s of samples would have become 2 GB
    with pytest.raises(AudioError, match=rf"sample_rate is in Hz.*pass sample_rate={rate * 1000:g}\b"):
        load_audio(np.zeros(30 * 16000, dtype=np.float32), sample_rate=rate)
    assert load_audio(np.zeros(1000, dtype=np.float32), sample_rate=1000).shape == (16000,)


def test_a_list_of_samples_is_read_as_an_array():
    samples = np.random.default_rng(0).uniform(-1, 1, 16000).astype(np.float32)
    np.testing.assert_array_equal(load_audio(samples.tolist(), sample_rate=SAMPLE_RATE), samples)
    stereo = np.stack([samples, samples], axis=1).tolist()  # (n, 2) rows
    np.testing.assert_allclose(load_audio(stereo, sample_rate=SAMPLE_RATE), samples, atol=1e-7)
    with pytest.raises(AudioError, match=r"<list>: an array of samples needs its sample rate"):
        load_audio(samples.tolist())  # not "sample_rate is only for arrays", as before
    with pytest.raises(AudioError, match=r"<list>: a list of samples must hold numbers"):
        load_audio([[0.1, 0.2], [0.3]], sample_rate=SAMPLE_RATE)


@pytest.mark.parametrize("pair", [
    lambda x: (x, SAMPLE_RATE),  # librosa.load
    lambda x: (SAMPLE_RATE, (x * 32767).astype(np.int16)),  # scipy.io.wavfile.read, gradio's numpy audio
    lambda x: ["speech.wav", SAMPLE_RATE],
])
def test_a_pair_of_samples_and_rate_is_refused_saying_how_to_pass_them(pair):
    samples = np.zeros(16000, dtype=np.float32)
    with pytest.raises(AudioError, match=r"pair of audio and a sample rate.*load_audio\(samples, sample_rate=rate\)"):
        load_audio(pair(samples))


def test_swapped_rate_and_samples_are_named_as_swapped():
    rate, samples = SAMPLE_RATE, np.zeros(16000, dtype=np.int16)  # as scipy.io.wavfile.read returns them
    with pytest.raises(AudioError, match=r"<int>: .*swapped.*load_audio\(samples, sample_rate=rate\)"):
        load_audio(rate, samples)  # was: "sample_rate is only for arrays ... an encoded file carries its own rate"
    with pytest.raises(AudioError, match=r"datasets Audio item.*sample_rate=item\['sampling_rate'\]"):
        load_audio({"array": samples, "sampling_rate": rate, "path": None})


def test_64_bit_integers_are_refused_not_scaled_to_silence():
    # np.array of Python ints and torch.tensor of ints are int64: scaled by 2**63, 16-bit PCM became ~1e-15
    pcm = (np.sin(np.linspace(0, 200 * np.pi, SAMPLE_RATE)) * 12000).astype(np.int16)
    for samples in (pcm.astype(np.int64), torch.tensor(pcm.tolist()), pcm.tolist(), pcm.astype(np.uint64)):
        with pytest.raises(AudioError, match=r"int64, which is no PCM format.*values reach \d+.*dtype=np.int16"):
            load_audio(samples, sample_rate=SAMPLE_RATE)
    np.testing.assert_allclose(load_audio(pcm.astype(np.int32) << 16, sample_rate=SAMPLE_RATE), pcm / 32768)


def test_a_url_or_an_unexpanded_home_gets_more_than_file_not_found():
    with pytest.raises(AudioError, match=r"https://example\.com/a\.wav: is a URL; .*download it first"):
        load_audio("https://example.com/a.wav")
    with pytest.raises(AudioError, match=r"~/nowhere/a\.wav: .*~ is not expanded.*expanduser"):
        load_audio("~/nowhere/a.wav")


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


def test_video_without_an_audio_stream():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    with pytest.raises(AudioError, match=r"video\.mp4: the file holds no audio stream"):
        load_audio(buffer.getvalue(), name="video.mp4")


FLAC_FRAME_SYNC = re.compile(rb"\xff[\xf8\xf9]")  # the first bytes of every FLAC frame


@pytest.mark.parametrize("keep", [0.3, 0.75, 0.999, "frame boundary"])
def test_a_flac_file_cut_short_decodes_as_far_as_it_goes_with_a_warning(tmp_path, keep):
    """An interrupted download or recording: the header (STREAMINFO) promises 10 s; the decoded start
    is used, and a warning names the file and the frames promised and read. Cut inside a frame, both
    decoders used to fail on the last, broken frame; cut between frames, FFmpeg decoded the rest
    without a word."""
    import warnings

    from qwen2audio import AudioWarning

    full = tmp_path / "full.flac"
    noise = np.random.default_rng(0).standard_normal(10 * SAMPLE_RATE).astype(np.float32)
    soundfile.write(full, 0.1 * noise + sine(TONE_HZ, 10.0, SAMPLE_RATE, channels=1)[:, 0], SAMPLE_RATE,
                    subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.flac"
    if keep == "frame boundary":
        end = next(m.start() for m in FLAC_FRAME_SYNC.finditer(data) if m.start() > len(data) // 2)
    else:
        end = int(len(data) * keep)
    cut.write_bytes(data[:end])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole file: no warning
        whole = load_audio(full)

    with pytest.warns(AudioWarning) as caught:
        samples = load_audio(cut)
    assert 0 < len(samples) < len(whole)
    assert np.array_equal(samples, whole[: len(samples)])  # the start of the recording, exactly
    message = str(caught[0].message)
    assert message.startswith(f"{cut}: the file is cut short")
    assert f"promises {len(whole)} frames (10.00 s)" in message and f"only {len(samples)} frames could be decoded" in message

    with pytest.warns(AudioWarning, match=r"<bytes: \d+ bytes>: the file is cut short"):
        assert np.array_equal(load_audio(cut.read_bytes()), samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)  # where partial audio must not pass
        with pytest.raises(AudioWarning):
            load_audio(cut)


def test_a_wav_file_cut_short_is_used_with_a_warning(tmp_path):
    """libsndfile reads what a truncated WAV holds without a word; its data chunk says how much was promised."""
    from qwen2audio import AudioWarning

    full = tmp_path / "full.wav"
    soundfile.write(full, sine(TONE_HZ, 2.0, SAMPLE_RATE, channels=1)[:, 0], SAMPLE_RATE, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:30000])
    with pytest.warns(AudioWarning, match=r"cut\.wav: the file is cut short: its header promises 32000 frames"):
        samples = load_audio(cut)
    assert len(samples) == (30000 - 44) // 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_audio(full)) == 32000


@pytest.mark.parametrize("open_length", [0, 0x7FFFFFFF, 0x7FFFF000, 0xFFFFFFFF])
def test_a_wav_streamed_to_a_pipe_is_not_called_cut_short(tmp_path, open_length):
    """A WAV written to a pipe (arecord > rec.wav, ffmpeg ... -f wav -) leaves its data length open: a
    placeholder, not a promise. It used to be warned about as cut short, promising e.g. 1073741823 frames."""
    import warnings

    buffer = io.BytesIO()
    soundfile.write(buffer, sine(TONE_HZ, 1.0, SAMPLE_RATE, channels=1)[:, 0], SAMPLE_RATE, format="WAV",
                    subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    assert data[36:40] == b"data"
    data[40:44] = open_length.to_bytes(4, "little")
    path = tmp_path / "streamed.wav"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_audio(path)) == SAMPLE_RATE


@pytest.mark.parametrize("n", [1, 100, MIN_SAMPLES - 1])
def test_a_clip_too_short_for_one_audio_token_is_refused(n):
    """Up to 20 ms of audio makes no audio token; the encoder's pooling used to fail on it with a bare RuntimeError."""
    with pytest.raises(AudioError, match=rf"too short: {n} samples .* at least {MIN_SAMPLES} \(20\.1 ms\)"):
        load_audio(np.zeros(n, dtype=np.float32), sample_rate=SAMPLE_RATE)
    assert len(load_audio(np.zeros(MIN_SAMPLES, dtype=np.float32), sample_rate=SAMPLE_RATE)) == MIN_SAMPLES
    assert len(load_audio(np.zeros(n, dtype=np.float32), sample_rate=SAMPLE_RATE, min_samples=1)) == n
    with pytest.raises(AudioError, match=r"too short: 8000 samples .*min_samples asks for at least 16000 \(1000\.0 ms\)"):
        load_audio(np.zeros(8000, dtype=np.float32), sample_rate=SAMPLE_RATE, min_samples=16000)  # said "321"


def test_audio_warnings_are_collected_per_thread():
    """A server decodes several requests' audio at once: each thread's collected warnings are its own (with
    warnings.catch_warnings, process-wide, one request's warning reached another's response)."""
    import threading

    from qwen2audio.audio.io import collect_audio_warnings

    loud, quiet = np.full(1600, 8.0, np.float32), np.full(1600, 0.1, np.float32)
    wrong, done = [], []

    def decode(samples, expect_warning):
        for _ in range(200):
            with collect_audio_warnings() as caught:
                load_audio(samples, sample_rate=16_000)
            if bool(caught) != expect_warning or (caught and "float samples reach 8" not in caught[0]):
                wrong.append(caught)
        done.append(expect_warning)  # a thread that raised never gets here

    threads = [threading.Thread(target=decode, args=(loud, True)), threading.Thread(target=decode, args=(quiet, False))]
    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert sorted(done) == [False, True]
    assert wrong == [] and [w for w in issued if issubclass(w.category, AudioWarning)] == []  # none issued


def test_16_bit_samples_in_an_int32_array_are_warned_about():
    """int32 is 32-bit PCM: 16-bit values in it are scaled by 2**31 and heard 96 dB too quietly."""
    tone = (np.sin(np.arange(16_000) / 10) * 20_000).astype(np.int16)
    with pytest.warns(AudioWarning, match="16-bit samples stored as int32"):
        quiet = load_audio(tone.astype(np.int32), sample_rate=16_000)
    assert np.abs(quiet).max() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)
        load_audio(tone.astype(np.int32) << 16, sample_rate=16_000)  # real 32-bit PCM
        load_audio(np.zeros(16_000, np.int32), sample_rate=16_000)  # silence
        load_audio(tone, sample_rate=16_000)


def _compressed(kind: str, seconds: float = 4.0) -> bytes:
    """A tone as Ogg/Opus or MP3 (libsndfile, Xing header) or WebM/Opus (FFmpeg, Duration in its Info)."""
    tone = sine(TONE_HZ, seconds, SAMPLE_RATE, channels=2)
    if kind == "webm":
        return encode_with_pyav(tone, SAMPLE_RATE, "webm", "libopus", 48000)
    buffer = io.BytesIO()
    soundfile.write(buffer, tone, SAMPLE_RATE, format="OGG" if kind == "opus" else "MP3",
                    subtype="OPUS" if kind == "opus" else "MPEG_LAYER_III")
    if kind == "mp3 after cover art":  # an ID3v2 tag larger than the first read (a picture), 0 bytes of padding
        size = 200_000
        tag = b"ID3\x04\x00\x00" + bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0)) + bytes(size)
        return tag + buffer.getvalue()
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["opus", "mp3", "mp3 after cover art", "webm"])
def test_a_compressed_file_cut_short_is_used_with_a_warning(tmp_path, kind):
    """An interrupted download of an Ogg, MP3 or WebM file decoded silently to the part that arrived (half a
    clip transcribed as if whole): an Ogg stream's missing last page, MP3's Xing frame count and WebM's
    Duration say that audio is missing."""
    data = _compressed(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)  # the whole file: no warning
        assert len(load_audio(data)) >= 3.9 * SAMPLE_RATE
    cut = tmp_path / f"cut.{kind[:4]}"
    cut.write_bytes(data[:(len(data) + (200_010 if "cover" in kind else 0)) // 2])
    with pytest.warns(AudioWarning, match=rf"cut\.{kind[:4]}: the file is cut short: .* but only \d+ frames could be "
                                          r"decoded \([\d.]+ s\); using those"):
        samples = load_audio(cut)
    assert 0.5 * SAMPLE_RATE < len(samples) < 3.0 * SAMPLE_RATE
    assert abs(dominant_hz(samples) - TONE_HZ) < 5


def test_an_ogg_file_cut_before_its_first_audio_says_so(tmp_path):
    """Cut inside its headers, the file was called corrupt or unsupported; what happened is that it is cut short."""
    with pytest.raises(AudioError, match=r"the file is cut short: it ends before the last page of its Ogg stream "
                                         r"but no audio could be decoded"):
        load_audio(_compressed("opus")[:200])


def test_streams_whose_length_is_open_are_not_called_cut_short():
    """A live WebM recording (a browser's MediaRecorder) has no Duration; an Ogg file with bytes after its last
    page, or an MP3 without a Xing header, promise nothing either. Such an MP3 (VBR) was decoded by libsndfile
    only as far as its first frame's bitrate made it last (0.6 of 4 s, silently): it goes to FFmpeg first."""
    webm = bytearray(_compressed("webm"))
    duration = webm.find(b"\x44\x89\x88")  # Duration, an 8-byte float: turned into a Void element of 11 bytes
    assert duration > 0
    webm[duration:duration + 3] = b"\xec\x89\x00"
    ogg = _compressed("opus") + b"ID3 trailing bytes"
    mp3 = _compressed("mp3")
    assert mp3.find(b"Xing") < 64
    mp3 = mp3[mp3.find(mp3[:2], 4):]  # from its second frame: without the Xing/Info frame
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)
        for data in (bytes(webm), ogg, bytes(mp3)):
            assert len(load_audio(data)) >= 3.9 * SAMPLE_RATE


def test_a_file_in_no_audio_format_is_not_said_to_be_missing(tmp_path):
    """libsndfile says "File does not exist or is not a regular file" of any file it cannot open: of a text file
    named .mp3 that exists, the message says it is no format it reads, not that it is missing."""
    path = tmp_path / "notes.mp3"
    path.write_text("these are notes, not audio\n" * 40)
    with pytest.raises(AudioError, match="cannot decode the audio") as error:
        load_audio(path)
    assert "does not exist" not in str(error.value) and "libsndfile: " in str(error.value)
    assert "not a format it reads" in str(error.value)
