"""demo.cuts: where long audio is cut into windows, counted against the sentences of held-out clips."""

from __future__ import annotations

import json

import numpy as np

from demo import cuts, longform
from qwen2audio.audio import SAMPLE_RATE, load_audio


def test_sentences_are_the_loud_part_of_each_clip(tiny_demo_data):
    audio, _, ends = longform.recording(tiny_demo_data, 3, 0.5)
    spans = cuts.sentences(audio, ends, 0.5)
    starts = [0, *ends[:-1]]
    items = [json.loads(line) for line in (tiny_demo_data / "eval" / "asr.jsonl").read_text().splitlines()][:3]
    for (first, last), start, item in zip(spans, starts, items):
        clip = load_audio(str(tiny_demo_data / "eval" / item["audio"]))
        assert start <= first < last < start + len(clip)  # inside its clip, not in the silence after it
        peak = np.abs(clip).max()
        assert abs(audio[first]) > cuts.LOUD_SHARE * peak and abs(audio[last]) > cuts.LOUD_SHARE * peak
        assert np.abs(audio[start:first]).max(initial=0) <= cuts.LOUD_SHARE * peak


def test_each_rule_gets_a_row(tiny_demo_data, tmp_path, capsys):
    out = tmp_path / "cuts.json"
    assert cuts.main(["--data", str(tiny_demo_data), "--clips", "4", "--gap", "0.5", "--noise-snr", "none", "10",
                      "--chunk-seconds", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(row["gap"], row["noise_snr_db"]) for row in result["rows"]] == [(0.5, None), (0.5, 10.0)]
    audio, _, _ = longform.recording(tiny_demo_data, 4, 0.5)
    for row in result["rows"]:
        assert row["seconds"] == round(len(audio) / SAMPLE_RATE, 1)
        for rule in ("vad", "quietest"):  # windows of at most 3 s: at least this many cuts
            assert row[rule]["cuts"] >= len(audio) / (3 * SAMPLE_RATE) - 1
            assert 0 <= row[rule]["inside_a_sentence"] <= row[rule]["cuts"]
    assert "of them inside a sentence" in capsys.readouterr().out
