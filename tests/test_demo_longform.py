"""demo.longform: held-out clips joined into one recording, transcribed whole and chunk by chunk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen2audio.eval.metrics import corpus_score, get_metric

from demo import longform
from qwen2audio.audio import SAMPLE_RATE, load_audio
from qwen2audio.audio.vad import find_pauses


def test_the_recording_is_the_clips_with_silence_between(tiny_demo_data):
    audio, reference, ends = longform.recording(tiny_demo_data, 3, 0.5)
    items = [json.loads(line) for line in (tiny_demo_data / "eval" / "asr.jsonl").read_text().splitlines()][:3]
    clips = [load_audio(str(tiny_demo_data / "eval" / item["audio"])) for item in items]
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    np.testing.assert_array_equal(audio, np.concatenate([clips[0], gap, clips[1], gap, clips[2], gap]))
    assert reference == " ".join(item["reference"] for item in items)
    assert ends == list(np.cumsum([len(c) + len(gap) for c in clips]))
    # the silences between the clips are pauses (the last one ends the recording: not a pause)
    pauses = find_pauses(audio, int(0.45 * SAMPLE_RATE))
    ends = np.cumsum([len(c) + len(gap) for c in clips])[:2]
    assert all(any(start <= end - len(gap) + 160 and end - 160 <= stop for start, stop in pauses) for end in ends)


def test_every_setting_gets_a_row(tiny_demo_data, tmp_path, capsys, one_thread):
    from qwen2audio.default_model import tiny_model_dir

    out = tmp_path / "longform.json"
    assert longform.main(["--data", str(tiny_demo_data), "--model", str(tiny_model_dir()), "--clips", "3",
                          "--chunk-seconds", "30", "2", "--cut-at-pauses", "none", "0.4", "--max-new-tokens", "4",
                          "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    settings = [row["setting"] for row in result["rows"]]
    assert settings == ["whole recording in one prompt", "cut where each clip ends (known)", "chunks of <= 30 s",
                        "chunks of <= 2 s",
                        "chunks of <= 30 s, cut at pauses >= 0.4 s", "chunks of <= 2 s, cut at pauses >= 0.4 s"]
    rows = {row["setting"]: row for row in result["rows"]}
    assert rows["cut where each clip ends (known)"]["chunks"] == 3 and rows["chunks of <= 30 s"]["chunks"] == 1 and rows["chunks of <= 30 s, cut at pauses >= 0.4 s"]["chunks"] >= 3
    assert rows["chunks of <= 2 s"]["chunks"] >= result["seconds"] / 2
    metric = get_metric("wer:en")
    for row in result["rows"]:  # each row's WER is its own text's against the joined references
        assert row["words"] == len(row["text"].split()) and row["noise"] == "none"
        assert row["wer"] == pytest.approx(corpus_score(metric, [metric.stats(result["reference"], row["text"])]))
    printed = capsys.readouterr().out
    assert all(setting in printed for setting in settings)


def test_missing_data_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="asr.jsonl is missing"):
        longform.main(["--data", str(tmp_path), "--model", str(tmp_path)])


def test_noise_is_added_at_the_level_asked_for():
    speech = np.random.default_rng(3).uniform(-0.5, 0.5, 4 * SAMPLE_RATE).astype(np.float32)
    audio = np.concatenate([speech, np.zeros(SAMPLE_RATE, dtype=np.float32)])
    noisy = longform.with_noise(audio, 10.0)
    noise = noisy - audio
    ratio_db = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert ratio_db == pytest.approx(10.0, abs=0.1)
    assert np.abs(noisy[-SAMPLE_RATE:]).max() > 0  # the silence is noisy too
    assert longform.with_noise(audio, None) is audio
