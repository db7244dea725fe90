"""DPO pairs of the demo model (python -m demo.dpo_pairs): the judges of a wrong answer, and the command on
the tiny data set with a tiny random model (which gets everything wrong: that tests the mechanics)."""

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest

from demo.mistakes import is_mistake, word_error_rate
from qwen2audio import Qwen2Audio
from qwen2audio.data.manifest import read_manifest
from qwen2audio.default_model import write_tiny_model

HAVE_DEPS = all(find_spec(m) is not None for m in ("num2words", "mido"))
if HAVE_DEPS:
    from demo import dpo_pairs, make_data

SOUND = "I hear a dog barking."


# ---- the judges ----

@pytest.mark.parametrize("task, answer, right, wrong", [
    # every task: blank answers are wrong, the right words in another form are not
    ("asr", "   ", "The cat sat on the mat.", True),
    ("voice_chat", "", "The capital of France is Paris.", True),
    ("no_speech", "\n", "There is no speech in this audio.", True),
    ("sound", "  ", "It is that.", True),                    # even where nothing else could be compared
    ("sound", "i HEAR a dog, barking", SOUND, False),
    ("no_speech", "silence", "Silence.", False),             # even where the judge alone would say wrong
    # asr: a word error rate of 0.2 or more
    ("asr", "the cat sat on the mat", "The cat sat on the mat.", False),
    ("asr", "The cat sat on a mat.", "The cat sat on the mat.", False),      # 1 error in 6 words: 0.17
    ("asr", "The cat sat on a mat.", "The cat sat on the mat now.", True),   # 2 in 7: 0.29
    ("asr", "A cat sat on a mat.", "The cat sat on the mat.", True),        # 2 in 6: 0.33
    ("asr", "Birds sing in the.", "Birds sing in the morning.", True),      # a word left out: 1 in 5 = 0.2
    ("asr", "He paid 5 dollars in 1987.", "He paid five dollars in nineteen eighty-seven.", False),
    # no speech: saying so, in the words the evaluation accepts
    ("no_speech", "There is no speech here, just rain.", "There is no speech in this audio, only rain.", False),
    ("no_speech", "Nobody is speaking.", "There is no speech in this audio.", False),
    ("no_speech", "The rain falls softly on the roof.", "There is no speech in this audio, only rain.", True),
    ("no_speech", "Yes, someone is speaking.", "No, nobody is speaking. I only hear rain.", True),
    ("no_speech", "No.", "No, nobody is speaking. I only hear rain.", False),   # "Is anyone speaking?" "No."
    ("no_speech", "No.", "There is no speech in this audio.", True),            # a transcript "No."
    # sounds, backgrounds, questions about a sound: a content word in common, the same yes or no
    ("sound", "It sounds like a dog.", SOUND, False),
    ("sound", "A cat meowing.", SOUND, True),
    ("sound", "I hear something.", SOUND, True),                # phrasing words only
    ("sound", "Noise.", "Noise, not a sound source.", False),
    ("speech_and_sound", "Behind the voice there is rain.", "Behind the voice I can hear rain falling.", False),
    ("speech_and_sound", "Behind the voice I can hear a car.", "Behind the voice I can hear rain falling.", True),
    ("sound_question", "Yes, a cow mooing.", "Yes, that was a cow mooing.", False),
    ("sound_question", "Yes, that was a cow mooing.", "No, that was a cow mooing.", True),
    ("sound_question", "That was a horse.", "It was an animal: a cow mooing.", True),
    ("sound", "Anything at all.", "It is that.", False),        # nothing to compare with: never wrong
    # voice chat: enough content words in common
    ("voice_chat", "Paris.", "The capital of France is Paris.", False),
    ("voice_chat", "It is Paris, the capital of France.", "The capital of France is Paris.", False),
    ("voice_chat", "Seven plus three is ten.", "The capital of France is Paris.", True),
    ("voice_chat", "Cats are small furry animals that people keep as pets at home, and France has many of them.",
     "The capital of France is Paris.", True),                 # France only: 2 x 1 / (12 + 3)
])
def test_judges_find_mistakes(task, answer, right, wrong):
    assert is_mistake(task, answer, right) is wrong


def test_word_error_rate_counts_edits_per_reference_word():
    assert word_error_rate("birds sing every morning", "Birds sang every.") == pytest.approx(0.5)
    assert word_error_rate("", "") == 0.0


# ---- the command ----

needs_deps = pytest.mark.skipif(not HAVE_DEPS, reason="num2words or mido is not installed: pip install num2words mido")
UNANSWERED = 0  # the voice-chat question whose answer is unusable (null): its rows are never asked


@pytest.fixture(scope="module")
def workspace(tiny_demo_data, tmp_path_factory):
    """The tiny data with answers to its voice-chat questions (one unusable), and a tiny random model."""
    root = tmp_path_factory.mktemp("dpo")
    data = root / "data"
    shutil.copytree(tiny_demo_data, data)
    questions = [json.loads(line)["question"] for line in (data / make_data.QUESTIONS).read_text().splitlines()]
    answers = [{"question": q, "answer": None if i == UNANSWERED else f"The answer to {q}"}
               for i, q in enumerate(questions)]
    (data / make_data.ANSWERS).write_text("".join(json.dumps(a) + "\n" for a in answers))
    write_tiny_model(root / "model")
    return data, root / "model"


def _copy(workspace, tmp_path) -> tuple[Path, Path]:
    data, model = workspace
    shutil.copytree(data, tmp_path / "data")
    return tmp_path / "data", model


def _args(data: Path, model: Path, *more: str) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--batch-size", "4", "--max-new-tokens", "8", *more]


def _records(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / dpo_pairs.GENERATED).read_text().splitlines()]


class _Counting:
    """Qwen2Audio.chat_batch, counting the conversations asked; raises KeyboardInterrupt at call ``stop``."""

    def __init__(self, monkeypatch, stop: int | None = None):
        self.asked, self.calls, self.stop = 0, 0, stop
        real = Qwen2Audio.chat_batch

        def chat_batch(model, conversations, **sampling):
            self.calls += 1
            if self.calls == self.stop:
                raise KeyboardInterrupt
            self.asked += len(conversations)
            return real(model, conversations, **sampling)

        monkeypatch.setattr(Qwen2Audio, "chat_batch", chat_batch)


@needs_deps
def test_pairs_load_as_dpo_rows_and_a_rerun_asks_nothing(workspace, tmp_path, monkeypatch, one_thread):
    data, model = _copy(workspace, tmp_path)
    assert dpo_pairs.main(_args(data, model, "--per-task", "3")) == 0
    pairs = []
    for name in (dpo_pairs.TRAIN_FILE, dpo_pairs.VAL_FILE):
        examples, report = read_manifest(data / name, "dpo")
        assert report.bad == [] and examples, name
        pairs += examples
    for pair in pairs:
        assert pair.chosen != pair.rejected
        assert [m["role"] for m in pair.messages] == ["user"]
        assert all(Path(a).is_file() for a in pair.audios)
    summary = json.loads((data / dpo_pairs.SUMMARY_FILE).read_text())
    assert {t: c["prompts"] for t, c in summary["tasks"].items()} == {t: 3 for t in make_data.ALL_TASKS}
    assert summary["pairs"]["train"] + summary["pairs"]["val"] == len(pairs)
    assert sum(c["pairs"] for c in summary["tasks"].values()) == len(pairs) > 0
    unanswered = json.loads((data / make_data.QUESTIONS).read_text().splitlines()[UNANSWERED])["question"]
    assert not any(r["right"] is None or unanswered in r["right"] for r in _records(data))

    generated, written = (data / dpo_pairs.GENERATED).read_bytes(), (data / dpo_pairs.TRAIN_FILE).read_bytes()
    monkeypatch.setattr(Qwen2Audio, "load", lambda *a, **k: pytest.fail("a finished run loaded the model again"))
    assert dpo_pairs.main(_args(data, model, "--per-task", "3")) == 0
    assert (data / dpo_pairs.GENERATED).read_bytes() == generated
    assert (data / dpo_pairs.TRAIN_FILE).read_bytes() == written


@needs_deps
def test_an_interrupted_run_keeps_its_answers_and_goes_on(workspace, tmp_path, monkeypatch, one_thread, capsys):
    data, model = _copy(workspace, tmp_path)
    args = _args(data, model, "--per-task", "2", "--samples", "1")  # one call per batch of 4
    _Counting(monkeypatch, stop=2)
    assert dpo_pairs.main(args) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert len(_records(data)) == 4  # the first batch
    with open(data / dpo_pairs.GENERATED, "a") as f:
        f.write('{"key": "audio/sft/tr')  # a line cut short by a crash
    counting = _Counting(monkeypatch)
    assert dpo_pairs.main(args) == 0
    total = 2 * len(make_data.ALL_TASKS)
    assert counting.asked == total - 4
    assert len({r["key"] for r in _records(data)}) == len(_records(data)) == total
    counting = _Counting(monkeypatch)
    assert dpo_pairs.main(_args(data, model, "--per-task", "3", "--samples", "1")) == 0  # the first two kept
    assert counting.asked == len(make_data.ALL_TASKS)
    counting = _Counting(monkeypatch)
    assert dpo_pairs.main(_args(data, model, "--per-task", "2", "--samples", "1", "--seed", "1")) == 0
    assert counting.asked == total  # other settings: asked anew


@needs_deps
@pytest.mark.parametrize("case, more, message", [
    ("no data", [], "config.json not found: run python -m demo.make_data"),
    ("no model", [], "is not a checkpoint folder"),
    ("unfinished data", [], "the data is unfinished"),
    ("numbers", ["--per-task", "0"], "--per-task must be at least 1, got 0"),
    ("numbers", ["--samples", "0"], "--samples must be at least 1"),
    ("numbers", ["--batch-size", "-2"], "--batch-size must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, case, more, message):
    data, model = tmp_path / "data", tmp_path / "model"
    model.mkdir()
    if case != "no data":
        data.mkdir()
        (data / "config.json").write_text('{"seed": 0}')
    if case != "no model":
        (model / "config.json").write_text("{}")
    assert dpo_pairs.main(["--data", str(data), "--model", str(model), *more]) == 2
    err = capsys.readouterr().err
    assert err.startswith("demo.dpo_pairs: error: ") and message in err and err.count("\n") == 1
    assert not (data / dpo_pairs.GENERATED).exists()


@needs_deps
def test_a_folder_that_is_no_model_is_refused_before_anything_is_asked(workspace, tmp_path, capsys):
    data, _ = _copy(workspace, tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert dpo_pairs.main(_args(data, model)) == 2
    assert capsys.readouterr().err.startswith("demo.dpo_pairs: error: ")
    assert not (data / dpo_pairs.GENERATED).exists()


def test_an_answer_to_another_prompt_under_the_same_clip_is_asked_again():
    """A stored answer was kept when the row's prompt changed but its clip and right answer did not, and
    paired with the new prompt."""
    from demo.dpo_pairs import Prompt, pending

    before = Prompt("sound", "audio/sft/train/sound/000001.flac", [{"role": "user", "content": "What is this sound?"}],
                    "A dog barking.")
    done = {before.key: {"key": before.key, "messages": before.messages, "right": before.right, "answers": []}}
    assert pending([before], done) == []
    now = Prompt(before.task, before.key, [{"role": "user", "content": "Which animal was that?"}], before.right)
    assert pending([now], done) == [now]
    assert pending([before], {before.key: {"key": before.key, "right": before.right}}) == [before]  # unrecorded
