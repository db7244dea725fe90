"""Every benchmark end to end through `qwen2audio eval`, on fixtures written in each dataset's native layout.

The tiny random model's answers are garbage, so these tests check the pipeline: items found, references
read from the native layout, the official prompts, metrics recomputed independently from the JSONL,
resume, bad audio skipped; and a stub model that echoes the reference scores perfectly.
"""

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import av
import jiwer
import numpy as np
import pytest
import sacrebleu
import soundfile as sf

from qwen2audio.cli import main
from qwen2audio.eval import runner
from qwen2audio.eval.metrics import choice_letter
from qwen2audio.eval.normalizers import wer_units

SR = 16000
FAST = ["--max-new-tokens", "3", "--no-progress", "--bootstrap", "50"]
RAW = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def tone(seconds=0.6, freq=220.0, seed=0):
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.2 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write(path: Path, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp3":  # Common Voice clips are mp3
        sf.write(path, tone(seed=seed), SR, format="MP3")
    elif path.suffix == ".mp4":  # MELD clips are video files with an AAC track
        x = tone(seed=seed)
        with av.open(str(path), "w", format="mp4") as c:
            stream = c.add_stream("aac", rate=SR)
            stream.layout = "mono"
            for i in range(0, len(x), 1024):
                frame = av.AudioFrame.from_ndarray(x[None, i:i + 1024].copy(), format="fltp", layout="mono")
                frame.sample_rate = SR
                for packet in stream.encode(frame):
                    c.mux(packet)
            for packet in stream.encode(None):
                c.mux(packet)
    else:
        sf.write(path, tone(seed=seed), SR)


# ---- fixtures in native layouts ------------------------------------------------------------------------
def librispeech(root: Path) -> tuple[Path, dict]:
    split = root / "LibriSpeech" / "test-clean"
    refs = {"1089-134686-0000": "HE HOPED THERE WOULD BE STEW FOR DINNER", "1089-134686-0001": "TURNIPS AND CARROTS",
            "121-121726-0000": "ALSO A POPULAR CONTRIVANCE"}
    for utt, text in refs.items():
        spk, chap, _ = utt.split("-")
        write(split / spk / chap / f"{utt}.flac", seed=len(text))
        with open(split / spk / chap / f"{spk}-{chap}.trans.txt", "a") as f:
            f.write(f"{utt} {text}\n")
    return split, refs


def commonvoice(root: Path, locale="zh-CN") -> tuple[Path, dict]:
    folder = root / "cv-corpus-15.0-2023-09-08" / locale
    refs = {"common_voice_zh-CN_1.mp3": '他说"今天天气很好"。', "common_voice_zh-CN_2.mp3": "我有123个苹果\\"}
    folder.mkdir(parents=True)
    # Common Voice writes its TSVs plainly: no quoting, no escapes (a sentence's quotes are just characters).
    lines = ["\t".join(["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents",
                        "variant", "locale", "segment"])]
    for i, (path, text) in enumerate(refs.items()):
        lines.append("\t".join([f"c{i}", path, text, "2", "0", "", "", "", "", locale, ""]))
        write(folder / "clips" / path, seed=i)
    (folder / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, refs


def fleurs(root: Path) -> tuple[Path, dict]:
    folder = root / "fleurs" / "data" / "cmn_hans_cn"
    refs = {"1001.wav": "这是一个测试", "1002.wav": "北京是中国的首都"}
    folder.mkdir(parents=True)
    with open(folder / "test.tsv", "w") as f:
        for i, (name, text) in enumerate(refs.items()):
            f.write(f"{i}\t{name}\t{text}\t{text}\t{' '.join(text)}\t{SR}\tMALE\n")
            write(folder / "audio" / "test" / name, seed=i)
    return folder, refs


def aishell2(root: Path) -> tuple[Path, dict]:
    folder = root / "AISHELL-DEV-TEST-SET" / "iOS" / "test"
    refs = {"IT0011W0001": "换一首歌", "IT0011W0002": "把音量调大一点"}
    folder.mkdir(parents=True)
    with open(folder / "wav.scp", "w") as scp, open(folder / "trans.txt", "w") as trans:
        for i, (utt, text) in enumerate(refs.items()):
            scp.write(f"{utt}\twav/T0011/{utt}.wav\n")
            trans.write(f"{utt}\t{text}\n")
            write(folder / "wav" / "T0011" / f"{utt}.wav", seed=i)
    return folder, refs


def release_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A TSV as CoVoST's get_covost_splits.py writes it: pandas to_csv(sep="\\t", quoting=QUOTE_NONE,
    escapechar="\\\\"), which is Python's csv writer with these settings and "\\n" line ends (a quote,
    backslash, tab or newline in a field gets a backslash before it; checked byte for byte against pandas)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def covost2(root: Path) -> tuple[Path, dict]:
    folder = root / "cv-corpus-4" / "en"
    refs = {"en-de:a.mp3": 'Er sagte "ja".', "en-de:b.mp3": "Der Pfad ist C:\\Daten\\neu, sagte sie.",
            "en-zh:a.mp3": "这是一个测试。"}
    folder.mkdir(parents=True)
    for pair, tgt in (("en_de", "de"), ("en_zh-CN", "zh")):
        rows = [[key.split(":")[1], 'a "source" sentence', text, "c"] for key, text in refs.items()
                if key.startswith(f"en-{tgt}:")]
        release_tsv(folder / f"covost_v2.{pair}.test.tsv", ["path", "sentence", "translation", "client_id"], rows)
    write(folder / "clips" / "a.mp3", seed=1)
    write(folder / "clips" / "b.mp3", seed=2)
    return folder, refs


def meld(root: Path) -> tuple[Path, dict]:
    folder = root / "MELD.Raw"
    refs = {"dia0_utt0": "neutral", "dia0_utt1": "joy", "dia1_utt0": "anger"}
    folder.mkdir(parents=True)
    with open(folder / "test_sent_emo.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
                    "Season", "Episode", "StartTime", "EndTime"])
        for i, (name, emotion) in enumerate(refs.items()):
            d, u = name[3:].split("_utt")
            w.writerow([i + 1, "Oh my God!", "Joey", emotion, "neutral", d, u, 1, 1, "00:00:01,000", "00:00:02,000"])
            write(folder / "output_repeated_splits_test" / f"{name}.mp4", seed=i)
    return folder, refs


def vocalsound(root: Path) -> tuple[Path, dict]:
    folder = root / "vocalsound_16k"
    names = {"f0003_0_cough.wav": ("/m/01b_21", "Cough"), "m0010_1_laughter.wav": ("/m/01j3sz", "Laughter"),
             "f0100_0_throatclearing.wav": ("/m/0dl9sf8", "Throat clearing")}
    for i, name in enumerate(names):
        write(folder / "audio_16k" / name, seed=i)
    (folder / "datafiles").mkdir()
    (folder / "datafiles" / "te.json").write_text(json.dumps({"data": [
        {"wav": f"/data/sls/vocalsound/audio_16k/{n}", "labels": mid} for n, (mid, _) in names.items()]}))
    (folder / "class_labels_indices_vs.csv").write_text(
        "index,mid,display_name\n0,/m/01j3sz,Laughter\n1,/m/07plz5l,Sigh\n2,/m/01b_21,Cough\n"
        "3,/m/0dl9sf8,Throat clearing\n4,/m/01hsr_,Sneeze\n5,/m/07ppn3j,Sniff\n")
    return folder, {n: label for n, (_, label) in names.items()}


def airbench_foundation(root: Path) -> tuple[Path, dict]:
    folder = root / "Foundation"
    rows = [
        {"path": "x1.wav", "question": "What is the speaker's emotion?", "choice_a": "happy", "choice_b": "sad",
         "choice_c": "angry", "choice_d": "neutral", "answer_gt": "sad", "task_name": "Speech_Emotion_Recognition",
         "dataset_name": "iemocap", "uniq_id": 1},
        {"path": "g1.wav", "question": "When does the dog bark?", "choice_a": "[0.0, 1.0]", "choice_b": "[2.0, 3.0]",
         "answer_gt": "[0.0, 1.0]", "task_name": "Audio_Grounding", "dataset_name": "AudioGrounding", "uniq_id": 2},
    ]
    folder.mkdir(parents=True)
    (folder / "Foundation_meta.json").write_text(json.dumps(rows))
    write(folder / "Speech_Emotion_Recognition_iemocap" / "x1.wav")
    write(folder / "Audio_Grounding_AudioGrounding" / "g1.flac")
    return folder, {"1": "B", "2": "A"}


def airbench_chat(root: Path) -> tuple[Path, dict]:
    folder = root / "Chat"
    rows = []
    for i, task in enumerate(["speech_QA", "sound_QA", "music_QA", "speech_and_sound_QA", "speech_and_music_QA"]):
        rows.append({"path": f"{i}.wav", "question": f"Question {i}?", "answer_gt": f"Answer {i}.",
                     "meta_info": f"A clip with sound {i}.", "task_name": task, "dataset_name": "d", "uniq_id": i})
        write(folder / f"{task}_d" / f"{i}.wav", seed=i)
    (folder / "Chat_meta.json").write_text(json.dumps(rows))
    return folder, {str(r["uniq_id"]): r["answer_gt"] for r in rows}


# ---- helpers ---------------------------------------------------------------------------------------------
def run_eval(task, data, out, *extra):
    code = main(["eval", "--task", task, "--data", str(data), "--out", str(out), *FAST, *extra])
    assert code == 0
    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return records, results


@pytest.fixture(autouse=True)
def _fast(one_thread, default_home):
    yield


@pytest.fixture
def echo(monkeypatch):
    """A stub model whose answer is the reference; records the generation settings it was given."""
    calls = []

    def fake(model, batch, settings):
        calls.append({"n": len(batch), "max_new_tokens": settings.max_new_tokens,
                      "min_new_tokens": settings.min_new_tokens})
        return [item.reference for item, _ in batch]

    monkeypatch.setattr(runner, "generate_batch", fake)
    monkeypatch.setattr("qwen2audio.eval.cli._load", lambda args: object())
    return calls


# ---- tests ----------------------------------------------------------------------------------------------
def test_librispeech_end_to_end_on_the_tiny_model(tmp_path):
    data, refs = librispeech(tmp_path)
    records, results = run_eval("librispeech", data, tmp_path / "out", "--batch-size", "2")
    assert {r["id"]: r["reference"] for r in records} == refs
    assert all(r["prompt"] == RAW + "Detect the language and recognize the speech: <|en|>" for r in records)
    # independent: jiwer's corpus WER over the normalised texts
    refs_n = [" ".join(wer_units(r["reference"], "en")) for r in records]
    hyps_n = [" ".join(wer_units(r["hypothesis"], "en")) for r in records]
    expected = 100 * jiwer.wer(refs_n, hyps_n)
    assert results["subsets"]["test-clean"]["score"] == pytest.approx(expected)
    assert results["overall"]["score"] == pytest.approx(expected)
    low, high = results["subsets"]["test-clean"]["ci"]
    assert low <= results["subsets"]["test-clean"]["score"] <= high
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| test-clean | 3 | WER % |" in report and "| 1.60 | 1.70 |" in report
    assert (tmp_path / "out" / "report.png").stat().st_size > 0


def test_resume_skips_done_items_and_bad_audio_is_reported_and_skipped(tmp_path, echo):
    data, refs = librispeech(tmp_path)
    bad = data / "1089" / "134686" / "1089-134686-0001.flac"
    bad.write_bytes(b"not audio at all")
    out = tmp_path / "out"
    records, results = run_eval("librispeech", data, out, "--limit", "2")
    assert [c["n"] for c in echo] == [1]
    assert results["skipped"] == 1 and results["skipped_items"][0]["id"] == "1089-134686-0001"
    assert "error" in records[1] and results["scored"] == 1
    echo.clear()
    write(bad)  # fixed: the rerun generates the failed item and the one past the old limit, nothing else
    records, results = run_eval("librispeech", data, out)
    assert sum(c["n"] for c in echo) == 2
    assert len(records) == 3 and results["skipped"] == 0
    assert results["subsets"]["test-clean"]["score"] == 0.0
    echo.clear()
    run_eval("librispeech", data, out)
    assert echo == []  # all done: nothing generated, the model is not even loaded
    records, results = run_eval("librispeech", data, out, "--limit", "1")
    assert results["items"] == 1 and len(records) == 3  # a smaller --limit reports less but keeps the work


def test_resume_reuses_only_answers_made_the_same_way(tmp_path, echo, capsys):
    data, _ = librispeech(tmp_path)
    out = tmp_path / "out"
    run_eval("librispeech", data, out)
    capsys.readouterr()
    echo.clear()
    run_eval("librispeech", data, out, "--prompt-style", "chat")  # another prompt: every answer is stale
    assert sum(c["n"] for c in echo) == 3
    assert "reusing 0 answers, generating 3; stored answers generated again: 3 were for a different prompt" in capsys.readouterr().err
    echo.clear()
    run_eval("librispeech", data, out, "--prompt-style", "chat", "--max-new-tokens", "5")
    assert sum(c["n"] for c in echo) == 3 and "3 were made with another --max-new-tokens" in capsys.readouterr().err
    echo.clear()
    clip = data / "121" / "121726" / "121-121726-0000.flac"
    write(clip, seed=99)  # the audio changed
    run_eval("librispeech", data, out, "--prompt-style", "chat", "--max-new-tokens", "5")
    assert [c["n"] for c in echo] == [1]
    assert "reusing 2 answers, generating 1; stored answers generated again: 1 were for other audio" in capsys.readouterr().err
    echo.clear()
    run_eval("librispeech", data, out, "--prompt-style", "chat", "--max-new-tokens", "5", "--dtype", "float32")
    assert echo == []  # --dtype auto was float32 for this model here: the same answers
    run_eval("librispeech", data, out, "--prompt-style", "chat", "--max-new-tokens", "5", "--dtype", "bfloat16")
    assert sum(c["n"] for c in echo) == 3 and "3 were made with another --dtype" in capsys.readouterr().err
    same = ("--prompt-style", "chat", "--max-new-tokens", "5", "--dtype", "float32")
    run_eval("librispeech", data, out, *same)
    echo.clear()
    run_eval("librispeech", data, out, *same, "--quantize", "int8")
    assert sum(c["n"] for c in echo) == 3 and "3 were made with another --quantize" in capsys.readouterr().err
    echo.clear()
    run_eval("librispeech", data, out, *same)  # back to float weights: generated again
    assert sum(c["n"] for c in echo) == 3
    items = out / runner.ITEMS_FILE  # answers recorded before --quantize existed count as made without it
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    for row in rows:
        del row[runner.ANSWER_KEY]["quantize"]
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    echo.clear()
    run_eval("librispeech", data, out, *same)
    assert echo == []
    _, results = run_eval("librispeech", data, out, *same, "--num-beams", "2")
    assert sum(c["n"] for c in echo) == 3 and "3 were made with another --num-beams" in capsys.readouterr().err
    assert results["settings"]["decoding"] == "beam search (2 beams)"


def test_beam_search_end_to_end_on_the_tiny_model(tmp_path, capsys):
    """--num-beams decodes each item as the API's beam search does (the raw base prompt, min_new_tokens 1)."""
    from qwen2audio import Qwen2Audio

    data, _ = librispeech(tmp_path)
    records, results = run_eval("librispeech", data, tmp_path / "out", "--num-beams", "3", "--max-new-tokens", "8")
    assert results["settings"]["decoding"] == "beam search (3 beams)"
    model = Qwen2Audio.load()
    for r in records:
        expected = model.complete(r["prompt"].removeprefix(RAW), [r["audio"]], max_new_tokens=8, min_new_tokens=1,
                                  num_beams=3)
        assert r["hypothesis"] == expected.text
    capsys.readouterr()
    code = main(["eval", "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "o"), *FAST,
                 "--num-beams", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "--num-beams must be at least 1" in err and "Traceback" not in err


def test_the_same_audio_through_a_linked_folder_reuses_the_answers(tmp_path, echo):
    data, _ = librispeech(tmp_path)
    out = tmp_path / "out"
    run_eval("librispeech", data, out)
    linked = tmp_path / "linked"
    linked.symlink_to(data, target_is_directory=True)
    echo.clear()
    run_eval("librispeech", linked, out)
    assert echo == []  # nothing generated again
    clip = data / "121" / "121726" / "121-121726-0000.flac"
    write(clip, seed=99)  # but changed audio still is
    run_eval("librispeech", linked, out)
    assert [c["n"] for c in echo] == [1]


def test_resume_rescores_stored_answers_with_the_current_references(tmp_path, echo, capsys):
    data, refs = librispeech(tmp_path)
    out = tmp_path / "out"
    run_eval("librispeech", data, out)
    # a corrected reference, and statistics tampered with on disk: neither the old score nor the stored
    # statistics may survive; the stored answer (the old reference, echoed) is scored against the new one
    trans = data / "1089" / "134686" / "1089-134686.trans.txt"
    trans.write_text(trans.read_text().replace("TURNIPS AND CARROTS", "TURNIPS AND BEANS"))
    lines = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["stats"], rec["score"] = [0.0, 99.0], 0.0
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    echo.clear()
    records, results = run_eval("librispeech", data, out)
    assert echo == []  # the prompt, audio, model and decoding are unchanged: every answer is reused
    assert "reusing 3 answers, generating 0" in capsys.readouterr().err
    changed = next(r for r in records if r["id"] == "1089-134686-0001")
    assert changed["reference"] == "TURNIPS AND BEANS" and changed["hypothesis"] == "TURNIPS AND CARROTS"
    words = sum(len(wer_units(r["reference"], "en")) for r in records)
    assert results["subsets"]["test-clean"]["score"] == pytest.approx(100 / words)


def test_answers_are_on_disk_before_scoring_can_fail(tmp_path, echo, monkeypatch):
    data, _ = librispeech(tmp_path)
    out = tmp_path / "out"

    def broken(self, reference, hypothesis):
        raise RuntimeError("scorer bug")

    with monkeypatch.context() as m:
        m.setattr("qwen2audio.eval.metrics.ErrorRate.stats", broken)
        with pytest.raises(RuntimeError, match="scorer bug"):
            main(["eval", "--task", "librispeech", "--data", str(data), "--out", str(out), *FAST])
    stored = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(stored) == 3 and all(isinstance(r["hypothesis"], str) for r in stored)
    echo.clear()
    records, results = run_eval("librispeech", data, out)
    assert echo == [] and results["subsets"]["test-clean"]["score"] == 0.0


def test_progress_bar_shows_items_speed_and_running_metric(tmp_path, echo, capsys):
    data, _ = librispeech(tmp_path)
    assert main(["eval", "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "3/3" in err and ("item/s" in err or "s/item" in err)
    assert "WER %=0" in err


def test_an_item_the_model_cannot_take_is_skipped_alone(tmp_path, monkeypatch):
    data, _ = librispeech(tmp_path)
    monkeypatch.setattr("qwen2audio.eval.cli._load", lambda args: object())

    def fussy(model, batch, settings):
        if any(item.id == "1089-134686-0001" for item, _ in batch):
            raise ValueError("the audio is too long for the context")
        return [item.reference for item, _ in batch]

    monkeypatch.setattr(runner, "generate_batch", fussy)
    records, results = run_eval("librispeech", data, tmp_path / "out", "--batch-size", "3")
    assert results["scored"] == 2 and results["skipped_items"][0]["error"] == "the audio is too long for the context"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "1 skipped (audio unreadable or too long" in report and "the audio is too long for the context" in report


def test_official_decoding_settings_are_the_defaults(tmp_path, echo):
    data, _ = librispeech(tmp_path)
    assert main(["eval", "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert echo[0]["max_new_tokens"] == 256 and echo[0]["min_new_tokens"] == 1 and echo[0]["n"] == 3


def independent_score(records, source):
    """The subset's score recomputed from the JSONL with jiwer / sacrebleu / plain Python."""
    recs = [r for r in records if r["source"] == source and "error" not in r]
    refs, hyps = [r["reference"] for r in recs], [r["hypothesis"] for r in recs]
    kind, _, language = recs[0]["metric"].partition(":")
    if kind == "wer":
        return 100 * jiwer.wer([" ".join(wer_units(x, language)) for x in refs],
                               [" ".join(wer_units(x, language)) for x in hyps])
    if kind == "bleu":
        return sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh" if language == "zh" else "13a").score
    if kind == "acc":
        return sum(h.lstrip() == r for r, h in zip(refs, hyps)) / len(recs)
    letters = [choice_letter(h) for h in hyps]
    counted = [(r, letter) for r, letter in zip(refs, letters) if letter]
    return sum(r == letter for r, letter in counted) / len(counted) if counted else None


NATIVE = [  # task, fixture, metric of the first subset, score of a perfect model, a subset name
    ("commonvoice", commonvoice, "wer:zh", 0.0, "zh"),
    ("fleurs", fleurs, "wer:zh", 0.0, "zh"),
    ("aishell2", aishell2, "wer:zh", 0.0, "iOS"),
    ("covost2", covost2, "bleu:de", 100.0, "en-de"),
    ("meld", meld, "acc", 1.0, "test"),
    ("vocalsound", vocalsound, "acc", 1.0, "test"),
    ("airbench-foundation", airbench_foundation, "choice", 1.0, "Audio_Grounding_AudioGrounding"),
]


@pytest.mark.parametrize("task, build, metric, perfect, subset", NATIVE + [
    ("librispeech", librispeech, "wer:en", 0.0, "test-clean"),
    ("airbench-chat", airbench_chat, "judge", None, "speech")])
def test_native_layouts_end_to_end_on_the_tiny_model(tmp_path, task, build, metric, perfect, subset):
    data, refs = build(tmp_path)
    records, results = run_eval(task, data, tmp_path / "out", "--batch-size", "2")
    assert {r["id"]: r["reference"] for r in records} == refs
    assert results["skipped"] == 0 and all(isinstance(r["hypothesis"], str) for r in records)
    assert {r["metric"] for r in records} >= {metric}
    if metric == "judge":  # no judge configured: answered, not scored
        assert results["scored"] == 0
        return
    for source, block in results["subsets"].items():
        expected = independent_score(records, source)
        assert (block["score"] is None and expected is None) or block["score"] == pytest.approx(expected)


@pytest.mark.parametrize("task, build, metric, perfect, subset", NATIVE)
def test_native_layouts_read_and_echo_scores_perfectly(tmp_path, echo, task, build, metric, perfect, subset):
    data, refs = build(tmp_path)
    records, results = run_eval(task, data, tmp_path / "out")
    assert {r["id"]: r["reference"] for r in records} == refs
    assert results["skipped"] == 0 and results["scored"] == len(refs)
    assert results["subsets"][subset]["score"] == pytest.approx(perfect)
    assert any(r["metric"] == metric for r in records)


def test_prompts_are_the_official_ones(tmp_path):
    cases = [("commonvoice", commonvoice, RAW + "Detect the language and recognize the speech: <|zh|>"),
             ("meld", meld, RAW + "Recognize the emotion with keywords in English:"),
             ("vocalsound", vocalsound, RAW + "Classify the human vocal sound to VocalSound in English:")]
    for task, build, prompt in cases:
        data, _ = build(tmp_path / task)
        records, _ = run_eval(task, data, tmp_path / task / "out", "--limit", "1")
        assert records[0]["prompt"] == prompt
    data, _ = covost2(tmp_path / "covost")
    records, results = run_eval("covost2", data, tmp_path / "covost" / "out")
    prompts = {r["source"]: r["prompt"] for r in records}
    assert prompts["en-de"] == RAW + "Detect the language and translate the speech into German: <|en|>"
    assert prompts["en-zh"] == RAW + "Detect the language and translate the speech into Mandarin: <|en|>"
    de = [r for r in records if r["source"] == "en-de"]
    expected = sacrebleu.corpus_bleu([r["hypothesis"] for r in de], [[r["reference"] for r in de]], tokenize="13a").score
    assert results["subsets"]["en-de"]["score"] == pytest.approx(expected)
    zh = [r for r in records if r["source"] == "en-zh"]
    expected = sacrebleu.corpus_bleu([r["hypothesis"] for r in zh], [[r["reference"] for r in zh]], tokenize="zh").score
    assert results["subsets"]["en-zh"]["score"] == pytest.approx(expected)


def test_covost2_split_files_are_read_as_the_release_tool_writes_them(tmp_path, echo):
    data, refs = covost2(tmp_path)
    records, results = run_eval("covost2", data, tmp_path / "out")
    assert {r["id"]: r["reference"] for r in records} == refs  # no escape backslashes left in
    assert {r["transcript"] for r in records} == {'a "source" sentence'}
    assert results["subsets"]["en-de"]["score"] == pytest.approx(100.0)
    # --data may name the split file itself; the clips folder is beside it
    records, results = run_eval("covost2", data / "covost_v2.en_de.test.tsv", tmp_path / "one")
    assert {r["id"]: r["reference"] for r in records} == {k: v for k, v in refs.items() if k.startswith("en-de:")}
    assert list(results["subsets"]) == ["en-de"] and results["skipped"] == 0


def test_common_voice_sentences_are_read_verbatim(tmp_path, echo):
    data, refs = commonvoice(tmp_path)
    records, _ = run_eval("commonvoice", data, tmp_path / "out")
    assert {r["id"]: r["reference"] for r in records} == refs


def test_airbench_foundation_prompt_uses_the_chat_template(tmp_path, echo):
    data, _ = airbench_foundation(tmp_path)
    records, _ = run_eval("airbench-foundation", data, tmp_path / "out")
    prompt = records[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ")
    assert ("Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
            "you may only choose A or B or C or D.\nWhat is the speaker's emotion?\nA. happy\nB. sad\nC. angry\n"
            "D. neutral<|im_end|>\n<|im_start|>assistant\n") in prompt
    assert records[1]["audio"].endswith("g1.flac")  # Audio_Grounding's .wav names stand for .flac files


def test_official_jsonl_lists_and_generic_jsonl(tmp_path, echo):
    write(tmp_path / "clips" / "a.flac")
    write(tmp_path / "clips" / "b.flac", seed=3)
    rows = [{"audio": "clips/a.flac", "prompt": "Detect the language and recognize the speech: <|yue|>",
             "source": "cv15_asr_yue", "gt": "我們去飲茶"},
            {"audio": "clips/b.flac", "prompt": "Detect the language and recognize the speech: <|yue|>",
             "source": "cv15_asr_yue", "gt": "點樣"}]
    (tmp_path / "cv15_asr_yue_eval.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    records, results = run_eval("commonvoice", tmp_path / "cv15_asr_yue_eval.jsonl", tmp_path / "o1")
    assert records[0]["metric"] == "wer:yue" and results["subsets"]["cv15_asr_yue"]["score"] == 0.0
    assert "| cv15_asr_yue | 2 | CER % | 0.00 | 0.00 – 0.00 | 5.90 | 5.90 |" in (tmp_path / "o1" / "report.md").read_text()
    generic = [{"audio": "clips/a.flac", "prompt": "Translate:", "reference": "hallo welt, wie geht es dir heute?", "metric": "bleu:de"},
               {"audio": "clips/b.flac", "prompt": "What?", "reference": "cough", "metric": "acc", "source": "vs"}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in generic))
    records, results = run_eval("jsonl", tmp_path / "mine.jsonl", tmp_path / "o2")
    assert results["subsets"]["vs"]["score"] == 1.0 and results["subsets"]["all"]["score"] == pytest.approx(100.0)


def test_a_missing_dataset_layout_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--task", "librispeech", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "trans.txt" in capsys.readouterr().err


def test_a_foundation_run_with_no_readable_answer_says_so(tmp_path, monkeypatch):
    data, _ = airbench_foundation(tmp_path)
    monkeypatch.setattr("qwen2audio.eval.cli._load", lambda args: object())
    monkeypatch.setattr(runner, "generate_batch", lambda model, batch, settings: ["I cannot tell." for _ in batch])
    records, results = run_eval("airbench-foundation", data, tmp_path / "out")
    assert results["scored"] == 0 and results["unreadable"] == 2 and results["skipped"] == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "2 items: 0 scored, 2 with an unreadable answer (left out of the score), 0 skipped" in report
    assert "of 2 items scored" not in report


def test_a_missing_eval_module_is_one_clear_line_before_any_work(tmp_path, monkeypatch, capsys):
    from qwen2audio.eval.cli import EVAL_MODULES

    data, _ = librispeech(tmp_path)
    loaded = []
    monkeypatch.setattr("qwen2audio.eval.cli._load", lambda args: loaded.append(1))
    monkeypatch.setitem(sys.modules, EVAL_MODULES[0], None)  # `import NAME` now fails as if not installed
    assert main(["eval", "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{EVAL_MODULES[0]}'" in err and "pip install -c constraints.txt -e '.[eval]'" in err
    assert loaded == [] and not (tmp_path / "o").exists()


def covost2_en_ja(root: Path) -> Path:
    folder = root / "cv-corpus-4" / "en"
    folder.mkdir(parents=True)
    release_tsv(folder / "covost_v2.en_ja.test.tsv", ["path", "sentence", "translation", "client_id"],
                [["a.mp3", "The weather is nice today.", "今日は良い天気です。", "c"]])
    write(folder / "clips" / "a.mp3", seed=1)
    return folder


def test_japanese_bleu_without_its_modules_is_a_clear_error_before_any_work(tmp_path, echo, monkeypatch, capsys):
    data = covost2_en_ja(tmp_path)
    monkeypatch.setitem(sys.modules, "MeCab", None)
    assert main(["eval", "--task", "covost2", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "scoring bleu:ja needs the Python module 'MeCab'" in err and "pip install -c constraints.txt -e '.[eval]'" in err
    assert echo == []


def test_japanese_bleu_is_scored_with_mecab(tmp_path, echo):
    pytest.importorskip("MeCab")
    pytest.importorskip("ipadic")
    data = covost2_en_ja(tmp_path)
    records, results = run_eval("covost2", data, tmp_path / "out")
    assert records[0]["prompt"] == RAW + "Detect the language and translate the speech into Japanese: <|en|>"
    assert results["subsets"]["en-ja"]["score"] == pytest.approx(100.0)
    hyps, refs = ["今日はいい天気です。"], ["今日は良い天気です。"]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="ja-mecab").score
    from qwen2audio.eval.metrics import corpus_score, get_metric
    metric = get_metric("bleu:ja")
    assert corpus_score(metric, np.array([metric.stats(refs[0], hyps[0])])) == pytest.approx(expected)


def test_vocalsound_without_its_split_file_is_an_error_unless_every_clip_is_asked_for(tmp_path, echo, capsys):
    data, refs = vocalsound(tmp_path)
    (data / "datafiles" / "te.json").unlink()
    assert main(["eval", "--task", "vocalsound", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "te.json not found" in err and "--split all" in err and echo == []
    records, results = run_eval("vocalsound", data, tmp_path / "all", "--split", "all")
    assert {r["id"]: r["reference"] for r in records} == refs and results["subsets"]["all"]["score"] == 1.0


def test_aishell2_still_packed_gets_an_unpack_hint(tmp_path, capsys):
    channel = tmp_path / "AISHELL-DEV-TEST-SET" / "iOS"
    channel.mkdir(parents=True)
    (channel / "test.tar.gz").write_bytes(b"\x1f\x8b")
    assert main(["eval", "--task", "aishell2", "--data", str(channel / "test")]) == 2
    assert f"unpack test.tar.gz first: tar xzf {channel / 'test.tar.gz'} -C {channel}" in capsys.readouterr().err
    assert main(["eval", "--task", "aishell2", "--data", str(channel / "test.tar.gz")]) == 2
    assert "is an archive; unpack it first" in capsys.readouterr().err


def test_each_aishell2_channel_has_its_own_default_output_folder(tmp_path, echo, monkeypatch):
    data, _ = aishell2(tmp_path)
    mic = tmp_path / "AISHELL-DEV-TEST-SET" / "Mic"
    shutil.copytree(data.parent, mic)
    monkeypatch.chdir(tmp_path)
    for folder in (data, mic / "test"):
        assert main(["eval", "--task", "aishell2", "--data", str(folder), *FAST]) == 0
    results = {p.name: json.loads((p / "results.json").read_text()) for p in (tmp_path / "eval-results").iterdir()}
    assert sorted(results) == ["aishell2-Mic-test", "aishell2-iOS-test"]
    assert list(results["aishell2-Mic-test"]["subsets"]) == ["Mic"]


def test_a_clip_longer_than_30_s_is_heard_as_the_official_scripts_hear_it(tmp_path, capsys):
    """The official scripts' processor keeps the first 30 s of a longer clip; so does `qwen2audio eval`
    unless told --long-audio windows (all of it, in 30 s windows: the package's own way); the answers made
    one way are not reused for the other."""
    from qwen2audio import Qwen2Audio
    from qwen2audio.audio import load_audio

    sine = 0.2 * np.sin(2 * np.pi * 220.0 * np.arange(30 * SR) / SR)
    noise = np.random.default_rng(0).normal(0, 0.3, 10 * SR)
    long_clip = np.concatenate([sine, noise]).astype(np.float32)  # 40 s: a pure tone, then loud noise
    sf.write(tmp_path / "long.flac", long_clip, SR)
    rows = [{"audio": "long.flac", "prompt": "What is it?", "reference": "a tone", "metric": "acc"}]
    (tmp_path / "long.jsonl").write_text(json.dumps(rows[0]))
    new = ["--max-new-tokens", "8"]
    records, results = run_eval("jsonl", tmp_path / "long.jsonl", tmp_path / "o", *new)
    assert results["settings"]["long_audio"] == "first-30s"
    model = Qwen2Audio.load()
    audio = load_audio(str(tmp_path / "long.flac"))
    first, whole = (model.complete("What is it?", [clip], max_new_tokens=8, min_new_tokens=1).text
                    for clip in (audio[: 30 * SR], audio))
    assert first != whole, "the last 10 s change nothing: the test shows nothing"
    assert records[0]["hypothesis"] == first
    capsys.readouterr()
    records, results = run_eval("jsonl", tmp_path / "long.jsonl", tmp_path / "o", *new, "--long-audio", "windows")
    assert records[0]["hypothesis"] == whole and results["settings"]["long_audio"] == "windows"
    assert "1 were made with another --long-audio" in capsys.readouterr().err


@pytest.mark.parametrize("folder,language", [("cmn_hans_cn", "zh"), ("en_us", "en"), ("fil_ph", "fil"),
                                             ("ast_es", "ast")])
def test_a_fleurs_folder_names_its_language(tmp_path, folder, language):
    """Fleurs folders start with the language: a three-letter code with no two-letter one stays whole (fil_ph
    was cut to fi, Finnish, in the prompt and the scoring)."""
    from qwen2audio.eval.asr import read_fleurs
    from qwen2audio.eval.tasks import Options

    path = tmp_path / folder
    (path / "audio" / "test").mkdir(parents=True)
    (path / "test.tsv").write_text(f"1\ta.wav\thello\thello\th e l l o\t{SR}\tMALE\n", encoding="utf-8")
    write(path / "audio" / "test" / "a.wav", seed=0)
    (item,) = read_fleurs(path, Options())
    assert item.prompt.endswith(f"<|{language}|>") and item.metric == f"wer:{language}"


def test_a_default_model_named_by_the_environment_is_known_by_its_files(tmp_path, echo, monkeypatch, capsys):
    """QWEN2AUDIO_DEFAULT_MODEL=DIR: weights rewritten in place make another model, as for a MODEL_DIR (the
    answers were reused)."""
    from qwen2audio.default_model import tiny_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    monkeypatch.setenv("QWEN2AUDIO_DEFAULT_MODEL", str(model))
    data, _ = librispeech(tmp_path)
    run_eval("librispeech", data, tmp_path / "out")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: another time stamp (and, in life, other values)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    echo.clear()
    run_eval("librispeech", data, tmp_path / "out")
    assert sum(c["n"] for c in echo) == 3 and "3 were made by another model" in capsys.readouterr().err


def test_dtype_auto_is_recorded_as_what_it_computes_in(tmp_path, echo, monkeypatch, capsys):
    """--dtype auto means the stored dtype, or float32 on a CPU without native half precision: answers are kept
    under the precision it came to, so that another machine's "auto" does not reuse them."""
    import torch

    from qwen2audio.checkpoint import hf, load_model, save_model
    from qwen2audio.default_model import tiny_model_dir

    half = tmp_path / "half"
    shutil.copytree(tiny_model_dir(), half)
    save_model(load_model(half).to(torch.bfloat16), half)
    data, _ = librispeech(tmp_path)
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: dtype == torch.float32)
    code = main(["eval", str(half), "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "out"), *FAST])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["dtype"] == "auto (float32)"
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: True)
    capsys.readouterr()
    echo.clear()
    assert main(["eval", str(half), "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "out"),
                 *FAST]) == 0
    assert sum(c["n"] for c in echo) == 3 and "3 were made with another --dtype" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["dtype"] == "auto (bfloat16)"


def test_rows_without_their_columns_and_files_with_a_bom_are_read_or_named(tmp_path, echo, capsys):
    data, refs = librispeech(tmp_path)
    trans = data / "121" / "121726" / "121-121726.trans.txt"
    trans.write_text("\ufeff" + trans.read_text())  # a BOM: the first id was read with it, its audio "missing"
    records, _ = run_eval("librispeech", data, tmp_path / "out")
    assert {r["id"] for r in records} == set(refs) and not any("error" in r for r in records)
    folder, _ = commonvoice(tmp_path / "cv")
    with open(folder / "test.tsv", "a", encoding="utf-8") as f:
        f.write("c9\tcommon_voice_zh-CN_9.mp3\n")  # no sentence: a None reference, a crash after generating
    assert main(["eval", "--task", "commonvoice", "--data", str(folder), "--out", str(tmp_path / "o2"), *FAST]) == 2
    assert f"{folder / 'test.tsv'}:4: the row has no sentence" in capsys.readouterr().err
    air = tmp_path / "air"
    air.mkdir()
    (air / "Chat_meta.json").write_text('[{"path": "a.wav",')
    assert main(["eval", "--task", "airbench-chat", "--data", str(air), "--out", str(tmp_path / "o3"), *FAST]) == 2
    assert f"{air / 'Chat_meta.json'}: not valid JSON" in capsys.readouterr().err


def test_bad_numbers_are_refused_before_any_work_and_splits_keep_their_own_folders(tmp_path, echo, capsys):
    from qwen2audio.eval.cli import default_out

    data, _ = librispeech(tmp_path)
    for flag, value in (("--max-new-tokens", "0"), ("--bootstrap", "-5"), ("--judge-workers", "0"), ("--limit", "0"),
                        ("--limit", "-1")):
        assert main(["eval", "--task", "librispeech", "--data", str(data), "--out", str(tmp_path / "o"), flag, value]) == 2
        assert f"{flag} must be at least" in capsys.readouterr().err
    assert echo == [] and not (tmp_path / "o").exists()
    meld_raw = Path("MELD.Raw")
    assert default_out("meld", meld_raw) == Path("eval-results/meld-MELD")  # as before: earlier runs resume
    assert default_out("meld", meld_raw, "dev") == Path("eval-results/meld-MELD-dev")


def test_a_language_given_another_way_is_the_code_the_prompts_and_metrics_know(tmp_path, capsys):
    """--language zh-CN made the tag <|zh-CN|> (never trained) and scored Chinese per word without cn_tn;
    wer:EN skipped the English normaliser and bleu:zh-CN tokenised Chinese with 13a."""
    from qwen2audio.eval.metrics import get_metric

    data, _ = commonvoice(tmp_path / "cv")
    records, _ = run_eval("commonvoice", data, tmp_path / "cv" / "out", "--limit", "1", "--language", "ZH-cn")
    assert records[0]["prompt"].endswith("<|zh|>") and records[0]["metric"] == "wer:zh"
    assert (get_metric("wer:EN").name, get_metric("wer:zh-CN").label) == ("wer:en", "CER %")
    assert get_metric("bleu:zh-CN").tokenize == "zh"
    with pytest.raises(ValueError, match="is not a language code of this model's prompts"):
        get_metric("wer:klingon")
    assert main(["eval", "--task", "commonvoice", "--data", str(data), "--out", str(tmp_path / "o2"),
                 "--language", "Chinese"]) == 2
    assert "--language 'Chinese' is a language's name; give its code, 'zh'" in capsys.readouterr().err


def test_an_airbench_chat_item_without_its_audio_description_is_refused(tmp_path, capsys):
    """The official scoring stops at a chat item without meta_info (the judge reads it); it was judged with
    an empty description."""
    folder, _ = airbench_chat(tmp_path)
    rows = json.loads((folder / "Chat_meta.json").read_text())
    del rows[2]["meta_info"]
    rows[3]["question"] = 7
    (folder / "Chat_meta.json").write_text(json.dumps(rows))
    assert main(["eval", "--task", "airbench-chat", "--data", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "Chat_meta.json: item 2 lacks meta_info" in capsys.readouterr().err
    rows[2]["meta_info"] = "A clip."
    (folder / "Chat_meta.json").write_text(json.dumps(rows))
    assert main(["eval", "--task", "airbench-chat", "--data", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "item 3's question must be text, got int" in capsys.readouterr().err


def test_a_dataset_file_that_is_not_utf8_is_named(tmp_path, capsys):
    split, _ = librispeech(tmp_path)
    trans = next(split.rglob("*.trans.txt"))
    trans.write_bytes(trans.read_bytes() + b"1089-134686-0009 CAF\xc9\n")  # Latin-1, not UTF-8
    assert main(["eval", "--task", "librispeech", "--data", str(split), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{trans}: holds bytes that are not UTF-8 text" in err and "save it as UTF-8" in err
    (tmp_path / "items.jsonl").write_bytes(b'{"audio": "a.wav", "prompt": "p", "reference": "r\xff"}\n')
    assert main(["eval", "--task", "jsonl", "--data", str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "items.jsonl: holds bytes that are not UTF-8 text" in capsys.readouterr().err


def test_an_unknown_metric_in_a_jsonl_file_is_named_with_its_line(tmp_path, capsys):
    """A file may hold thousands of items: the unknown metric is named where it is, as other bad fields are."""
    rows = [{"audio": "a.wav", "prompt": "p", "reference": "r", "metric": "wer:en"},
            {"audio": "a.wav", "prompt": "p", "reference": "r", "metric": "foo"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--task", "jsonl", "--data", str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'items.jsonl'}:2: unknown metric 'foo'; use wer:LANG" in err and "Traceback" not in err
