"""python -m demo.compare: two demo.report results side by side, with a verdict per target."""

from __future__ import annotations

import copy
import json

from demo import compare

TARGETS = [
    {"key": "asr_wer", "what": "WER", "target": "≤ 10 %", "op": "<=", "value": 19.1, "ci": [17.1, 21.4], "met": False},
    {"key": "sounds_accuracy", "what": "sounds", "target": "≥ 80 %", "op": ">=", "value": 45.8, "ci": [41.8, 49.5],
     "met": False},
    {"key": "no_speech_share", "what": "no speech", "target": "≥ 95 %", "op": ">=", "value": 99.0, "ci": [97.7, 100.0],
     "met": True},
    {"key": "invented_transcripts", "what": "invented", "target": "≤ 0", "op": "<=", "value": 3, "met": False},
]


def report(**values) -> dict:
    out = {"model": {"dir": "/cache/demo-v1-abc"}, "date": "2026-12-05T02:33:03+00:00",
           "targets": copy.deepcopy(TARGETS)}
    for t in out["targets"]:
        if t["key"] in values:
            t.update(values[t["key"]])
    return out


def test_verdicts_follow_the_intervals_and_the_targets_direction(tmp_path, capsys):
    old = report()
    new = report(asr_wer={"value": 12.0, "ci": [10.5, 13.6]},  # lower WER, intervals apart: better
                 sounds_accuracy={"value": 47.0, "ci": [43.0, 51.0]},  # overlapping: ≈
                 no_speech_share={"value": 90.0, "ci": [86.0, 93.0], "met": False},  # apart, lower: worse
                 invented_transcripts={"value": 0, "met": True})  # no interval: by the figure
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["WER (≤ 10 %)"].endswith("| -7.1 | better |")
    assert rows["sounds (≥ 80 %)"].endswith("| ≈ |")
    assert rows["no speech (≥ 95 %)"].endswith("| worse |") and "99.0 [97.7, 100.0] ✓" in rows["no speech (≥ 95 %)"]
    assert rows["invented (≤ 0)"].endswith("| -3 | better* |")
    assert "2 better, 1 worse, 1 within the intervals" in out
    assert "newly met: invented_transcripts; no longer met: no_speech_share." in out
    assert (tmp_path / "t.md").read_text() == out
    assert "old: demo-v1-abc, 2026-12-05" in out


def test_a_file_that_is_not_a_report_is_refused(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2]")
    assert compare.main([str(tmp_path / "x.json"), str(tmp_path / "missing.json")]) == 2
    assert "is not a demo.report result" in capsys.readouterr().err
