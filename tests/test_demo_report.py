"""python -m demo.report: the demo model's figures against its targets (the tiny demo data, the tiny random model)."""

import json
import shutil
from pathlib import Path

import pytest

from demo import report
from demo import targets as T
from demo.prompts import NO_SPEECH_ANSWERS
from qwen2audio.eval.runner import score_records

SETS = ("asr", "sounds", "sound_question", "voice_chat", "no_speech", "question_asr")
NO_SPEECH_REFERENCE = "|".join(NO_SPEECH_ANSWERS)


# ---- the figures, from hand-made records ----

def _record(id_: str, right: bool | None) -> dict:
    """A scored contains record; right None: its audio failed."""
    if right is None:
        return {"id": id_, "metric": "contains", "error": "unreadable audio"}
    return {"id": id_, "metric": "contains", "reference": "x", "hypothesis": "x" if right else "y",
            "stats": [float(right), 1.0], "score": float(right)}


def test_voice_chat_share_counts_only_questions_the_llm_answers_right_typed():
    typed = [_record("a", True), _record("b", True), _record("c", False), _record("d", True), _record("e", True)]
    spoken = [_record("a", True), _record("b", False), _record("c", True), _record("d", None), _record("f", True)]
    kept = T.voice_chat_kept(typed, spoken)
    # c (wrong typed) is not asked about; d (spoken audio failed) and e, f (one side only) are not compared
    assert kept == {"compared": 3, "typed_right": 2, "spoken_right_of_those": 1, "share": 50.0}


def test_voice_chat_share_is_reported_as_none_when_the_llm_gets_nothing_right_typed():
    typed = [_record("a", False), _record("b", False)]
    spoken = [_record("a", True), _record("b", True)]
    kept = T.voice_chat_kept(typed, spoken)
    assert kept["share"] is None and kept["typed_right"] == 0 and kept["compared"] == 2
    row = {r["key"]: r for r in report.target_rows(report.measured(
        {name: {"overall": {"score": 1.0, "n": 1, "ci": None}} for name in SETS}, kept,
        {"all": {"score": 100.0, "n": 1, "ci": None, "invented": 0}}, {}))}["voice_chat_kept"]
    assert row["value"] is None and row["met"] is None and "no share" in row["note"]


def test_invented_transcripts_are_no_speech_answers_that_match_no_pattern_per_prompt_kind():
    answers = {"c1": (True, "There is no speech in this audio."), "c2": (True, "A dog is barking loudly."),
               "c3": (True, "Nobody is speaking, just rain."), "b1": (False, "Hello, how are you today?"),
               "b2": (False, "<|en|>no speech"), "b3": (False, None)}
    records = [{"id": i, "metric": "contains", "reference": NO_SPEECH_REFERENCE, "hypothesis": text, "source": "noise"}
               if text is not None else {"id": i, "metric": "contains", "error": "unreadable audio"}
               for i, (_, text) in answers.items()]
    figures = T.no_speech(score_records(records), {i: chat for i, (chat, _) in answers.items()})
    assert figures["all"]["invented"] == 2 and figures["all"]["n"] == 5
    assert figures["all"]["score"] == pytest.approx(60.0)
    assert figures[T.CHAT]["invented"] == 1 and figures[T.CHAT]["score"] == pytest.approx(200 / 3)
    assert figures[T.BASE]["invented"] == 1 and figures[T.BASE]["skipped"] == 1
    assert figures[T.BASE]["score"] == pytest.approx(50.0)


# ---- bad input: one line, exit status 2, nothing written ----

def _data(folder: Path, sets=SETS) -> Path:
    (folder / "eval").mkdir(parents=True)
    for name in sets:
        (folder / "eval" / f"{name}.jsonl").write_text("")
    return folder


def _checkpoint(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def _refused(args: list[str], out: Path, capsys) -> str:
    assert report.main([*args, "--out", str(out / "r"), "--answers", str(out / "answers")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("demo.report: error: ") and err.count("\n") == 1, err
    assert not list(out.glob("r.*")) and not (out / "answers").exists()
    return err


def test_no_data_folder_is_refused(tmp_path, capsys):
    err = _refused(["--data", str(tmp_path / "nowhere"), "--model", str(_checkpoint(tmp_path / "m"))], tmp_path, capsys)
    assert "nowhere is not a folder" in err


def test_model_default_is_the_default_model_users_get(tmp_path, monkeypatch):
    from qwen2audio.default_model import default_model_dir

    seen = []
    monkeypatch.setattr(report, "run", lambda args, argv: seen.append(args.model) or (_ for _ in ()).throw(
        report.UsageError("stop here")))
    assert report.main(["--data", str(tmp_path), "--model", "default", "--out", str(tmp_path / "r")]) == 2
    assert seen == [default_model_dir()]  # the tests' default: the tiny random model (conftest.py)


def test_the_default_models_answers_are_recorded_as_qwen2audio_eval_records_them():
    """`--model default` recorded the cache folder, `qwen2audio eval` without a MODEL_DIR the default model's
    name: the same model's stored answers were made again, each by the other's run."""
    from qwen2audio.default_model import default_model_dir
    from qwen2audio.eval.runner import model_identity

    assert report.harness_settings(default_model_dir(), default=True).model == model_identity(None)
    assert report.harness_settings(default_model_dir()).model == model_identity(default_model_dir())


def test_a_model_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    err = _refused(["--data", str(_data(tmp_path / "d")), "--model", str(tmp_path / "m")], tmp_path, capsys)
    assert "--model" in err and "is not a checkpoint folder" in err
    err = _refused(["--data", str(_data(tmp_path / "d2")), "--model", str(_checkpoint(tmp_path / "ok")),
                    "--llm", str(tmp_path / "m")], tmp_path, capsys)
    assert "--llm" in err and "is not a checkpoint folder" in err


def test_a_missing_eval_file_is_refused(tmp_path, capsys):
    data = _data(tmp_path / "d", [s for s in SETS if s != "sound_question"])
    err = _refused(["--data", str(data), "--model", str(_checkpoint(tmp_path / "m"))], tmp_path, capsys)
    assert "sound_question.jsonl not found" in err and "demo.make_data" in err


# ---- end to end, on the tiny demo data with the tiny random model ----

@pytest.fixture(scope="module")
def tiny_model():
    from qwen2audio.default_model import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="module")
def first_report(tiny_demo_data, tiny_model, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("report")
    args = ["--data", str(tiny_demo_data), "--model", str(tiny_model), "--answers", str(out / "answers")]
    assert report.main([*args, "--out", str(out / "r")]) == 0
    return out, args


def _targets(path: Path) -> dict:
    return {row["key"]: row for row in json.loads(path.read_text())["targets"]}


def test_the_report_writes_every_target_to_both_files(first_report):
    out, _ = first_report
    rows = _targets(out / "r.json")
    assert list(rows) == [t.key for t in T.TARGETS]
    for key, row in rows.items():
        assert "value" in row and row["met"] in (True, False, None), key
    # the tiny random model answers nothing right: every quality target is measured, and missed
    assert rows["asr_wer"]["value"] > 10 and rows["asr_wer"]["met"] is False
    assert rows["invented_transcripts"]["value"] == 6 and rows["invented_transcripts"]["met"] is False
    assert rows["voice_chat_kept"]["value"] is None and rows["voice_chat_kept"]["met"] is None
    assert rows["load_seconds"]["value"] > 0 and rows["first_token_seconds"]["value"] > 0
    saved = json.loads((out / "r.json").read_text())
    assert saved["partial"] is False and saved["speed"]["machine"]["torch"]
    assert set(saved["sets"]["sounds"]["by_source"]) and saved["sets"]["asr"]["examples"]["wrong"]
    # what each set's figures are of (demo.compare compares a set only where this matches)
    assert len({saved["sets"][name]["basis"] for name in report.SETS}) == len(report.SETS)
    # the transcription set again with --fallback: its own answers, made that way, and a line in the report
    again = saved["sets"][report.FALLBACK]
    assert again["items"] == saved["sets"]["asr"]["items"] and again["overall"]["score"] is not None
    made = [json.loads(line)["answered_with"] for line in Path(again["answers"]).read_text().splitlines()]
    assert made and all(m["fallback"] is True for m in made)
    markdown = (out / "r.md").read_text()
    assert "Decoded with `--fallback`" in markdown and again["answers"] in markdown
    for target in T.TARGETS:
        assert f"| {target.what} | {target.text()} |" in markdown


def _answer(folder: Path, right: set[int]) -> None:
    """Rewrite the stored answers: those at the indices in ``right`` give the first accepted answer, the others
    one that is surely wrong (the random model's bytes could hold a digit that a reference accepts)."""
    path = folder / "items.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, rec in enumerate(records):
        rec["hypothesis"] = f"It is {rec['reference'].split('|')[0]}." if i in right else "Zzz."
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))


def test_the_figures_are_what_qwen2audio_eval_reports(first_report, tiny_demo_data, tiny_model, tmp_path,
                                                      monkeypatch):
    from qwen2audio.cli import main as cli

    out, _ = first_report
    answers = tmp_path / "answers"
    shutil.copytree(out / "answers", answers)
    _answer(answers / "sounds", {0, 2, 4, 6})
    _answer(answers / report.TYPED, {0, 1, 2, 3})
    _answer(answers / "voice_chat", {0, 1, 4})  # 2 of the 4 questions right typed; 4: right spoken only
    monkeypatch.setattr(report.speed, "measure", lambda *_, **__: {"error": "not measured here"})
    assert report.main(["--data", str(tiny_demo_data), "--model", str(tiny_model), "--answers", str(answers),
                        "--out", str(tmp_path / "r")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    rows = _targets(tmp_path / "r.json")
    assert rows["voice_chat_kept"]["value"] == 50.0 and rows["voice_chat_kept"]["n"] == 4
    assert saved["voice_chat"]["typed_accuracy"]["score"] == pytest.approx(400 / 6)
    assert saved["voice_chat"]["spoken_accuracy"]["score"] == 50.0
    for name, key, percent in (("asr", "asr_wer", 1), ("sounds", "sounds_accuracy", 100)):
        folder = answers / name
        data = tiny_demo_data / "eval" / f"{name}.jsonl"
        assert cli(["eval", str(tiny_model), "--task", "jsonl", "--data", str(data), "--out", str(folder),
                    "--no-progress", "--bootstrap", "0"]) == 0
        overall = json.loads((folder / "results.json").read_text())["overall"]
        assert rows[key]["value"] == pytest.approx(overall["score"] * percent) and rows[key]["n"] == overall["n"]
    folder = answers / report.FALLBACK  # the same answers, reused by `qwen2audio eval --fallback`
    assert cli(["eval", str(tiny_model), "--task", "jsonl", "--data", str(tiny_demo_data / "eval" / "asr.jsonl"),
                "--out", str(folder), "--fallback", "--no-progress", "--bootstrap", "0"]) == 0
    overall = json.loads((folder / "results.json").read_text())["overall"]
    assert saved["sets"][report.FALLBACK]["overall"]["score"] == pytest.approx(overall["score"])
    assert rows["sounds_accuracy"]["value"] == 50.0


def test_a_rerun_reuses_the_answers_and_a_limit_is_reported_as_partial(first_report, monkeypatch, capsys):
    from qwen2audio import Qwen2Audio

    out, args = first_report

    def no_load(*_, **__):
        raise AssertionError("a rerun loaded the model: the answers were not reused")

    monkeypatch.setattr(Qwen2Audio, "load", no_load)
    monkeypatch.setattr(report.speed, "measure", lambda *_, **__: {"error": "the speed probe failed (exit 1): boom"})
    assert report.main([*args, "--out", str(out / "again"), "--limit", "2"]) == 0
    saved = json.loads((out / "again.json").read_text())
    assert saved["partial"] is True and saved["limit"] == 2
    assert all(figures["items"] == 2 for figures in saved["sets"].values())
    rows = _targets(out / "again.json")
    assert rows["load_seconds"]["met"] is None and rows["first_token_seconds"]["value"] is None
    assert "**Partial**" in (out / "again.md").read_text() and "boom" in capsys.readouterr().out


def test_whisper_bases_own_wer_stands_beside_the_models_when_it_was_measured(first_report, tmp_path, monkeypatch):
    out, args = first_report
    monkeypatch.setattr(report.speed, "measure", lambda *_, **__: {"error": "not measured here"})
    sources = list(json.loads((out / "r.json").read_text())["sets"]["asr"]["by_source"])
    summary = tmp_path / "asr.summary.json"  # as python -m demo.whisper_baseline writes it
    asr = Path(args[1]) / "eval" / "asr.jsonl"
    items = sum(1 for line in asr.read_text().splitlines() if line.strip())

    def write(**changed):
        summary.write_text(json.dumps({"data": str(asr), "limit": None, "overall": {"score": 37.25, "n": items},
                                       "subsets": {name: {"score": 10.0 + i} for i, name in enumerate(sources)},
                                       **changed}))

    # Whisper's figures of other items are not shown "on the same items": its own --limit, another file
    for changed in ({"limit": 50}, {"data": str(tmp_path / "other.jsonl")},
                    {"overall": {"score": 37.25, "n": items - 1}}):
        write(**changed)
        assert report.main([*args, "--out", str(tmp_path / "other"), "--whisper-base", str(summary)]) == 0
        assert json.loads((tmp_path / "other.json").read_text())["whisper_base"] is None, changed
    write()
    assert report.main([*args, "--out", str(tmp_path / "with"), "--whisper-base", str(summary)]) == 0
    saved = json.loads((tmp_path / "with.json").read_text())["whisper_base"]
    assert saved["all"] == 37.25 and saved["by_source"] == {name: 10.0 + i for i, name in enumerate(sources)}
    markdown = (tmp_path / "with.md").read_text()
    assert "| source | n | WER | Whisper base's own WER |" in markdown
    assert f"| {sources[0]} |" in markdown and "| 10.0 % |" in markdown and "| all | | | 37.2 % |" in markdown

    assert report.main([*args, "--out", str(tmp_path / "without"), "--whisper-base", str(tmp_path / "none")]) == 0
    assert json.loads((tmp_path / "without.json").read_text())["whisper_base"] is None
    assert "Whisper base" not in (tmp_path / "without.md").read_text()


def test_the_typed_questions_are_decoded_as_their_records_say(first_report, tmp_path, monkeypatch):
    """They were decoded without the checkpoint's repetition penalty and beams, though their records (and
    the docs: "the same greedy decoding") said they were, as the spoken answers are."""
    from dataclasses import replace as replaced

    import qwen2audio.eval.runner as runner

    out, args = first_report
    asked = []
    real_settings, real_params = report.harness_settings, runner.decoding_params
    monkeypatch.setattr(report, "harness_settings",
                        lambda *a, **k: replaced(real_settings(*a, **k), repetition_penalty=1.1))
    monkeypatch.setattr(runner, "decoding_params", lambda settings: asked.append(settings) or real_params(settings))
    monkeypatch.setattr(report.speed, "measure", lambda *_, **__: {"error": "not measured here"})
    answers = tmp_path / "answers"
    assert report.main(["--data", args[1], "--model", args[3], "--answers", str(answers), "--out",
                        str(tmp_path / "r"), "--limit", "1"]) == 0
    typed = [json.loads(line) for line in (answers / report.TYPED / "items.jsonl").read_text().splitlines()]
    assert typed and asked and all(s.repetition_penalty == 1.1 for s in asked)
    assert real_params(asked[-1]).repetition_penalty == 1.1


def test_examples_sum_up_ruled_out_answers_and_leave_other_references_whole():
    shown = {"right": [{"id": "a", "answer": "A bell.", "reference": "bell|ringing!phone|alarm"}], "wrong": []}
    assert report.md_examples(shown, contains=True) == [
        '- right: `a` answer "A bell."; reference `bell\\|ringing` (and no other class named)']
    speech = {"right": [{"id": "b", "answer": "I'd like a beer now.", "reference": "I'd like a beer now!"}], "wrong": []}
    assert report.md_examples(speech) == ['- right: `b` answer "I\'d like a beer now."; reference `I\'d like a beer now!`']
