"""The demo data generator (demo/, run as python -m demo.make_data) at its tiny scale, and its parts."""

import hashlib
import json
import os
import re
import shutil
import struct
import zlib
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest

from demo.rcc import RccBundle, RccError
from qwen2audio.audio import load_audio
from qwen2audio.data.manifest import read_manifest
from qwen2audio.eval.jsonl import read_generic
from qwen2audio.eval.metrics import get_metric
from qwen2audio.eval.tasks import Options

# the generator's own dependencies (docs/demo-model.md, "Data"); the rcc reader needs none
HAVE_DEPS = all(find_spec(m) is not None for m in ("num2words", "mido"))
if HAVE_DEPS:
    from demo import llm_answers, make_data
    from demo.textclean import is_speakable, phrases, spell_numbers
needs_deps = pytest.mark.skipif(not HAVE_DEPS, reason="num2words or mido is not installed: pip install num2words mido")
# QWEN2AUDIO_REQUIRE_DEMO_DATA (set by .ci/run): these tests run and fail where espeak-ng is missing
needs_espeak = pytest.mark.skipif((shutil.which("espeak-ng") is None or not HAVE_DEPS)
                                  and not os.environ.get("QWEN2AUDIO_REQUIRE_DEMO_DATA"),
                                  reason="espeak-ng, num2words or mido is not installed "
                                         "(apt-get install espeak-ng; pip install num2words mido)")
SAMPLE_RATE = 16_000


# ---- the Qt resource reader, on a bundle written here ----

def _rcc(files: dict[str, bytes], compress: set[str], version: int = 2) -> bytes:
    """A bundle with the files in one folder "res" under the root, as Qt's rcc lays it out."""
    names, name_offsets = b"", {}
    for name in ["res", *files]:
        name_offsets[name] = len(names)
        encoded = name.encode("utf-16-be")
        names += struct.pack(">HI", len(name), 0) + encoded
    data, data_offsets, flags = b"", {}, {}
    for name, blob in files.items():
        data_offsets[name] = len(data)
        if name in compress:
            blob, flags[name] = struct.pack(">I", len(blob)) + zlib.compress(blob), 1
        data += struct.pack(">I", len(blob)) + blob
    tail = b"\0" * 8 if version >= 2 else b""
    tree = struct.pack(">IHII", 0, 2, 1, 1) + tail  # root: one child, node 1
    tree += struct.pack(">IHII", name_offsets["res"], 2, len(files), 2) + tail  # "res": its files from node 2
    for name in files:
        tree += struct.pack(">IHHHI", name_offsets[name], flags.get(name, 0), 0, 0, data_offsets[name]) + tail
    header_size = 20 + (4 if version >= 3 else 0)
    tree_at = header_size
    data_at = tree_at + len(tree)
    names_at = data_at + len(data)
    header = struct.pack(">4sIIII", b"qres", version, tree_at, data_at, names_at) + (b"\0" * 4 if version >= 3 else b"")
    return header + tree + data + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reader_lists_and_extracts_plain_and_zlib_files(version):
    files = {"bark.ogg": b"OggS" + bytes(range(200)), "notes.txt": b"hello " * 50}
    bundle = RccBundle(_rcc(files, compress={"notes.txt"}, version=version))
    assert bundle.names() == ["res/bark.ogg", "res/notes.txt"]
    assert bundle.read("res/bark.ogg") == files["bark.ogg"]
    assert bundle.read("res/notes.txt") == files["notes.txt"]


def test_rcc_reader_refuses_other_files():
    with pytest.raises(RccError, match="not a Qt resource bundle"):
        RccBundle(b"RIFF....WAVEfmt ")


# ---- texts ----

@needs_deps
def test_numbers_are_written_as_they_are_spoken():
    assert spell_numbers("In 1987 he paid $5 for 3 apples, 12% more than the 2nd time.") == (
        "In nineteen eighty-seven he paid five dollars for three apples, twelve percent more than the second time.")


@needs_deps
@pytest.mark.parametrize("text, ok", [
    ("The cat sat on the mat.", True),
    ("Call the NASA office.", False),          # an acronym: spelled out or read as a word
    ("Use os.path to join names.", False),     # code
    ("Version 3.11 is out.", False),           # a number read in more than one way
    ("Mr. Smith went home.", True),
])
def test_only_texts_read_one_way_are_kept(text, ok):
    assert is_speakable(text) is ok


@needs_deps
def test_long_sentences_are_split_into_phrases_of_at_most_twenty_words():
    long = ", ".join(["the quick brown fox jumps over the lazy dog"] * 5) + "."
    pieces = phrases(long)
    assert pieces and all(len(p.split()) <= 20 for p in pieces)


# ---- the generator at its tiny scale ----

@pytest.fixture
def tiny(tiny_demo_data):
    return tiny_demo_data  # made once for every test file (conftest.py)


def _recipes(out: Path) -> list[tuple[str, dict]]:
    """(part name, clip recipe) for every clip written."""
    rows = []
    for path in sorted((out / "parts" / "meta").glob("*.json")):
        rows += [(path.stem.replace("__", "/"), c) for c in json.loads(path.read_text())["recipes"]]
    return rows


def _tree_digest(out: Path) -> dict[str, str]:
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "summary.json"]  # the summary has a wall time
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@needs_espeak
def test_same_seed_same_data_and_a_rerun_keeps_finished_work(tiny, tmp_path):
    again = tmp_path / "again"
    assert make_data.main(["--out", str(again), "--seed", "0", "--scale", "tiny", "--jobs", "1"]) == 0
    assert _tree_digest(again) == _tree_digest(tiny)  # every manifest and audio file, whatever the jobs
    clip = next((again / "audio").rglob("*.flac"))
    before = clip.stat().st_mtime_ns
    assert make_data.main(["--out", str(again), "--seed", "0", "--scale", "tiny"]) == 0
    assert clip.stat().st_mtime_ns == before  # resumed: nothing made again
    assert _tree_digest(again) == _tree_digest(tiny)


@needs_espeak
def test_another_seed_into_the_same_folder_is_refused(tiny, capsys):
    assert make_data.main(["--out", str(tiny), "--seed", "1", "--scale", "tiny"]) == 2
    assert "give another --out" in capsys.readouterr().err


@needs_espeak
def test_a_folder_whose_inputs_changed_is_not_resumed(tiny, monkeypatch, capsys):
    voices = [v for v in make_data.available_voices() if v.engine == "espeak"]  # as if flite and piper went away
    monkeypatch.setattr(make_data, "available_voices", lambda: voices)
    before = _tree_digest(tiny)
    assert make_data.main(["--out", str(tiny), "--seed", "0", "--scale", "tiny"]) == 2
    assert "the inputs changed" in capsys.readouterr().err
    assert _tree_digest(tiny) == before


@needs_espeak
def test_a_folder_made_before_a_task_was_added_only_gains_its_clips(tiny, tmp_path):
    """Late tasks (asr_question) are planned after every other part: a folder made before them (one plan
    digest over all its parts, no such parts) resumes, keeps every clip it had and makes only theirs, and
    ends as a new folder does."""
    old = tmp_path / "old"
    shutil.copytree(tiny, old)
    late = [f"{stage}/{split}/{task}" for (stage, split), counts in make_data.SCALES["tiny"].late.items()
            for task in counts]
    for name in late:
        (old / "parts" / f"{name}.jsonl").unlink()
        (old / "parts" / "meta" / f"{name.replace('/', '__')}.json").unlink()
        shutil.rmtree(old / "audio" / name)
    (old / "eval" / "question_asr.jsonl").unlink()
    (old / "parts" / "meta" / "eval__question_asr.json").unlink()
    plan = json.loads((old / make_data.PLAN_FILE).read_text())
    (old / make_data.PLAN_FILE).unlink()
    recipes = {path.stem.replace("__", "/"): json.loads(path.read_text())["recipes"]
               for path in (old / "parts" / "meta").glob("*.json")}
    earlier = [recipes[name] for name in plan if name in recipes]  # the plan's order
    digest = hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()
    (old / make_data.OLD_PLAN_FILE).write_text(digest + "\n")
    clip = next((old / "audio" / "pretrain" / "train" / "asr").rglob("*.flac"))
    before = clip.stat().st_mtime_ns
    assert make_data.main(["--out", str(old), "--seed", "0", "--scale", "tiny", "--jobs", "1"]) == 0
    assert clip.stat().st_mtime_ns == before
    resumed = _tree_digest(old)
    assert resumed.pop(make_data.OLD_PLAN_FILE) and resumed == _tree_digest(tiny)
    (old / make_data.OLD_PLAN_FILE).write_text("0" * 64 + "\n")  # an old folder of another plan
    (old / make_data.PLAN_FILE).unlink()
    with pytest.raises(make_data.UsageError, match="the inputs changed"):
        make_data.generate(old, 0, "tiny", 1, make_data.DEFAULT_ASSETS)


@needs_espeak
def test_spoken_questions_are_transcribed_as_well_as_answered(tiny):
    """asr_question: training questions asked with transcription prompts, the question's words the target;
    the evaluation asks the held-out voice-chat clips for a transcript."""
    pretrain = [r for r in _rows(tiny / "pretrain.jsonl") if r["task"] == "asr_question"]
    sft = _rows(tiny / "parts" / "sft" / "train" / "asr_question.jsonl")
    assert pretrain and sft
    spoken = {c["path"]: c["speech"]["text"] for part, c in _recipes(tiny) if part.endswith("/asr_question")}
    assert all(spoken[r["audio"]] == r["target"] for r in pretrain)
    for row in sft:
        user, answer = row["messages"][0], row["messages"][1]
        [audio] = [p["audio"] for p in user["content"] if p.get("type") == "audio"]
        assert answer["content"] == spoken[audio]
    chat = {i.audio: i for i in read_generic(tiny / "eval" / "voice_chat.jsonl", Options())}
    questions = {json.loads(line)["audio"]: json.loads(line)["question"]
                 for line in (tiny / "eval" / "voice_chat.jsonl").read_text().splitlines()}
    items = read_generic(tiny / "eval" / "question_asr.jsonl", Options())
    assert len(items) == len(chat) and {i.audio for i in items} == set(chat)
    assert {i.prompt for i in items} == {"Detect the language and recognize the speech: <|en|>"}
    rows = _rows(tiny / "eval" / "question_asr.jsonl")
    assert [r["reference"] for r in rows] == [questions[r["audio"]] for r in rows]


@needs_espeak
def test_training_manifests_pass_our_own_validation(tiny):
    for name, stage in (("pretrain.jsonl", "pretrain"), ("pretrain_val.jsonl", "pretrain"),
                        ("sft.jsonl", "sft"), ("sft_val.jsonl", "sft")):
        examples, report = read_manifest(tiny / name, stage)
        assert report.bad == [] and examples, name
    summary = json.loads((tiny / "summary.json").read_text())
    tasks = summary["rows"]["pretrain.jsonl"]
    assert {"asr", "sound", "speech_and_sound", "sound_question", "no_speech", "speech_detection",
            "asr_question"} <= set(tasks)


@needs_espeak
def test_evaluation_manifests_read_as_generic_jsonl_tasks(tiny):
    for folder, tasks in (("eval", ("asr", "sounds", "sound_question", "voice_chat", "no_speech", "question_asr")),
                          ("dev", ("asr", "sounds", "voice_chat", "no_speech"))):
        for task in tasks:
            items = read_generic(tiny / folder / f"{task}.jsonl", Options())
            assert items, (folder, task)
            for item in items:
                get_metric(item.metric)  # a metric the harness knows
                assert Path(item.audio).is_file()
    asr = read_generic(tiny / "dev" / "asr.jsonl", Options())
    assert {i.prompt for i in asr} == {"Detect the language and recognize the speech: <|en|>"}
    assert {i.metric for i in asr} == {"wer:en"}
    # pre-training's validation set: held-out (development) speech and sounds alternating, all with raw prompts
    watch = read_generic(tiny / make_data.WATCH, Options())
    sounds = read_generic(tiny / "dev" / "sounds.jsonl", Options())
    n = min(len(asr), len(sounds), make_data.WATCH_ROWS)
    assert [i.id for i in watch] == [x.id for pair in zip(asr[:n], sounds[:n]) for x in pair]
    assert not any(i.chat for i in watch) and {i.metric for i in watch[:2]} == {"wer:en", "contains"}


@needs_espeak
def test_no_spoken_text_twice_within_a_training_stage(tiny):
    for stage in ("pretrain", "sft"):
        texts = [c["speech"]["text"] for part, c in _recipes(tiny)
                 if part.startswith(stage) and c["kind"] == "speech"]
        assert texts and len(texts) == len(set(texts)), stage


@needs_espeak
def test_training_validates_on_development_sets_apart_from_the_evaluations_items(tiny):
    """The demo's runs validated on eval/ (the first 48 held-out items), and choices of schedule were made
    from those figures: the reported figures were then not of items no choice was fitted to."""
    import yaml

    recipes = _recipes(tiny)
    dev = {p for p, _ in recipes if p.startswith("dev/")}
    assert dev == {"dev/asr", "dev/sounds", "dev/voice_chat", "dev/no_speech"}
    texts = {p.split("/")[0]: set() for p in dev}
    texts["eval"] = set()
    for part, c in recipes:
        if part.split("/")[0] in texts and "speech" in c:
            texts[part.split("/")[0]].add(c["speech"]["text"])
    assert texts["dev"] and texts["eval"] and not texts["dev"] & texts["eval"]
    train = [c for part, c in recipes if not part.startswith(("eval", "dev"))]
    assert not texts["dev"] & {c["speech"]["text"] for c in train if "speech" in c}
    watch = _rows(tiny / make_data.WATCH)
    assert watch and all(r["audio"].startswith("../audio/dev/") for r in watch)
    for path in sorted((Path(__file__).parents[1] / "configs" / "demo").glob("*.yaml")):
        generate = yaml.safe_load(path.read_text()).get("val_generate") or []
        for name in [generate] if isinstance(generate, str) else generate:
            assert name.startswith("data/demo/dev/"), (path, name)


def test_held_out_texts_voices_and_recordings_are_never_trained_on(tiny):
    train = [c for part, c in _recipes(tiny) if not part.startswith(("eval", "dev"))]
    held = {part: [c for p, c in _recipes(tiny) if p == part] for part in ("eval/asr", "eval/sounds")}
    train_texts = {c["speech"]["text"] for c in train if "speech" in c}
    train_voices = {c["speech"]["voice"] for c in train if "speech" in c}
    train_recordings = {c["sound"]["entry"] for c in train if "sound" in c} | {
        c["fx"]["background"]["entry"] for c in train if "background" in c.get("fx", {})}
    assert not train_texts & {c["speech"]["text"] for c in held["eval/asr"]}
    unseen = {c["speech"]["voice"] for c in held["eval/asr"]} - {"piper:joe"}  # joe: reported as a seen voice
    assert unseen and not unseen & train_voices
    assert not train_recordings & {c["sound"]["entry"] for c in held["eval/sounds"]}
    bank = {e["path"]: e for e in json.loads((tiny / "bank.json").read_text())}
    assert {bank[p]["split"] for p in train_recordings} == {"train"}
    assert {bank[c["sound"]["entry"]]["split"] for c in held["eval/sounds"]} == {"heldout"}


@needs_espeak
def test_every_clip_decodes_and_lasts_one_to_eight_seconds(tiny):
    clips = sorted((tiny / "audio").rglob("*.flac"))
    assert clips
    for clip in clips:
        seconds = len(load_audio(str(clip))) / SAMPLE_RATE
        assert 1.0 <= seconds <= 8.0, (clip, seconds)


# ---- voice-chat answers from the LLM ----

@needs_deps
@pytest.mark.parametrize("reply, cut_off, target", [
    ("  Paris is the capital\nof France. ", False, "Paris is the capital of France."),
    ("It is seven. Seven is also a prime number and", True, "It is seven."),  # cut off: last full sentence
    ("A bloom is a flower that", True, None),                                 # no full sentence: unusable
    ("Fruits are sweet. Some are: 1. Apples 2.", True, "Fruits are sweet."),  # a list's "1." ends no sentence
    ("Some examples are such as: 1.", True, None),
    ("It is 42. And", True, "It is 42."),
])
def test_llm_replies_become_targets_of_whole_sentences(reply, cut_off, target):
    assert llm_answers.usable(reply, cut_off) == target


class _FakeLLM:
    """chat_batch as qwen2audio.Qwen2Audio has it: one reply per conversation, "length" when cut off. A
    question with a checkable answer gets its first reference (``right``) or "nothing" (not ``right``)."""

    def __init__(self, right: bool = True):
        from demo.questions import questions_by_text

        self.asked, self.right, self.by_text = [], right, questions_by_text()

    def reply(self, question: str) -> str:
        q = self.by_text.get(question)
        if q is None or not q.references:
            return f"The answer to {question!r}."
        return f"The answer to {question!r} is {q.references[0] if self.right else 'nothing'}."

    def chat_batch(self, conversations, **sampling):
        self.asked += [c[0]["content"] for c in conversations]
        return [SimpleNamespace(text=self.reply(c[0]["content"]), finish_reason="stop") for c in conversations]


@needs_espeak
def test_answers_fill_the_voice_chat_rows_and_a_rerun_asks_only_the_rest(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    questions = llm_answers.pending_questions(data)
    assert questions and not any(r.get("task") == "voice_chat" for r in _rows(data / "pretrain.jsonl"))
    first = _FakeLLM()
    llm_answers.answer_all(first, questions[:3], data / make_data.ANSWERS, batch_size=2, max_new_tokens=8)
    assert llm_answers.pending_questions(data) == questions[3:]  # resumes where it stopped
    second = _FakeLLM()
    llm_answers.answer_all(second, llm_answers.pending_questions(data), data / make_data.ANSWERS, 2, 8)
    assert sorted(first.asked + second.asked) == sorted(questions)
    make_data.assemble(data, seed=0)
    chat = [r for r in _rows(data / "pretrain.jsonl") if r.get("task") == "voice_chat"]
    assert chat and all(r["target"].startswith("The answer to") for r in chat)
    sft_chat = [r for r in _rows(data / "sft.jsonl") if r["messages"][-1]["role"] == "assistant"
                and r["messages"][-1]["content"].startswith("The answer to")]
    assert sft_chat
    for name, stage in (("pretrain.jsonl", "pretrain"), ("sft.jsonl", "sft")):
        assert read_manifest(data / name, stage)[1].bad == []


@needs_espeak
def test_answers_that_get_a_checkable_fact_wrong_are_left_out(tiny, tmp_path):
    """The LLM's wrong answers ("Phnom Penh is the capital of Egypt") would teach the audio model the mistake:
    rows whose answer misses a checkable fact are left out (scored as the evaluation scores); open ones stay."""
    from demo.questions import questions_by_text

    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    by_text = questions_by_text()
    questions = llm_answers.pending_questions(data)
    checkable = {q for q in questions if q in by_text and by_text[q].references}
    assert checkable and checkable != set(questions)
    llm_answers.answer_all(_FakeLLM(right=False), questions, data / make_data.ANSWERS, 8, 8)
    result = make_data.assemble(data, seed=0)
    answered = [m["content"] for name in ("pretrain.jsonl", "sft.jsonl", "pretrain_val.jsonl", "sft_val.jsonl")
                for r in _rows(data / name) for m in r.get("messages", [])[-1:]]
    answered += [r["target"] for name in ("pretrain.jsonl", "pretrain_val.jsonl") for r in _rows(data / name)
                 if r.get("task") == "voice_chat"]
    assert not any(a.endswith(" is nothing.") for a in answered)
    assert any(f"The answer to {q!r}." in answered for q in set(questions) - checkable)
    held = make_data.heldout_families(data)
    from demo.questions import fact_family

    assert result["voice_chat_wrong"] == sum(  # every row asking a checkable fact, but those left out as mirrors
        1 for stage in ("pretrain", "sft") for path in (data / "parts" / stage).glob("*/voice_chat.jsonl")
        for line in path.read_text().splitlines()
        if (q := json.loads(line)["question"]) in checkable and not fact_family(by_text[q]) & held) > 0
    # answered right, they are trained on
    (data / make_data.ANSWERS).unlink()
    llm_answers.answer_all(_FakeLLM(right=True), questions, data / make_data.ANSWERS, 8, 8)
    assert make_data.assemble(data, seed=0)["voice_chat_wrong"] == 0


def test_answers_stored_cut_inside_a_list_are_cut_back_before_it(tmp_path):
    """36 stored answers ended "...such as: 1." (or a list's "2."): read back, they end before the list."""
    stored = {"a": "It is used widely, such as: 1.", "b": "Sore skin hurts. It has causes, including: 1. Cuts. 2.",
              "c": "Such as 5, 3.14, or 100.", "d": None, "e": "It is 42."}
    (tmp_path / make_data.ANSWERS).parent.mkdir(parents=True)
    (tmp_path / make_data.ANSWERS).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                      for q, a in stored.items()))
    assert make_data.read_answers(tmp_path) == {"a": None,
                                                "b": "Sore skin hurts.", "c": "Such as 5, 3.14, or 100.",
                                                "d": None, "e": "It is 42."}


def test_one_fact_asked_another_way_is_one_family():
    """Held-out facts were asked in training with the operands swapped or from the antonym's end, with the
    LLM's answer as the target ("eight multiplied by five" trained, "five times eight" held out)."""
    from demo.questions import Question, fact_family

    def family(fact, refs=()):
        return fact_family(Question("?", "x", fact, tuple(refs)))

    assert family("arith:5times8") == family("arith:8times5") and family("arith:5plus12") == family("arith:12plus5")
    assert family("arith:8minus5") != family("arith:5minus8")
    assert family("opposite:quiet", ["active", "noisy"]) & family("opposite:noisy", ["quiet"])
    assert family("synonym:big", ["large"]) == family("synonym:large", ["big"])
    assert family("spell:house", ["h o u s e"]) == family("letters:house", ["5", "five"])
    assert family("day:Monday:1", ["Tuesday"]) == family("day:Tuesday:-1", ["Monday"])
    assert family("capital:France", ["Paris"]) == {"capital:France"}


@needs_espeak
def test_no_training_answer_teaches_a_held_out_fact_asked_another_way(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    from demo.questions import all_questions, fact_family

    held = make_data.heldout_families(data)
    assert held
    by_text = {q.text: q for q in all_questions()}
    asked_held = {json.loads(line)["question"] for folder in ("eval", "dev") if (data / folder / "voice_chat.jsonl").is_file()
                  for line in (data / folder / "voice_chat.jsonl").read_text().splitlines()}
    # a training row asking a held-out fact another way ("twelve plus five" where "five and twelve" is held out):
    # the tiny data has none of its own, so one of its rows is made to ask one
    mirror = next(q.text for q in all_questions() if fact_family(q) & held and q.text not in asked_held)
    part = data / "parts" / "sft" / "train" / "voice_chat.jsonl"
    rows = _rows(part)
    rows[0]["question"] = mirror
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(data / make_data.QUESTIONS, "a") as f:
        f.write(json.dumps({"question": mirror}) + "\n")
    questions = llm_answers.pending_questions(data)
    mirrors = [q for q in questions if fact_family(by_text[q]) & held]
    assert mirrors == [mirror]
    llm_answers.answer_all(_FakeLLM(), questions, data / make_data.ANSWERS, 8, 8)
    result = make_data.assemble(data, seed=0)
    answered = {m["content"] for name in ("pretrain.jsonl", "sft.jsonl", "pretrain_val.jsonl", "sft_val.jsonl")
                for r in _rows(data / name) for m in r.get("messages", [])[-1:]} | {
        r.get("target") for name in ("pretrain.jsonl", "pretrain_val.jsonl") for r in _rows(data / name)
        if r.get("target")}
    assert not any(a.startswith(f"The answer to {mirror!r}") for a in answered)  # answered right, and still out
    assert any(a.startswith(f"The answer to {q!r}") for q in questions if q != mirror for a in answered)
    assert result["voice_chat_heldout_mirrors"] == 1


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_espeak
def test_answering_one_stage_leaves_the_other_stages_manifest_as_it_was(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    pretrain_before = (data / "pretrain.jsonl").read_bytes()
    sft_questions = llm_answers.pending_questions(data, "sft")
    assert sft_questions and set(sft_questions) < set(llm_answers.pending_questions(data))
    llm_answers.answer_all(_FakeLLM(), sft_questions, data / make_data.ANSWERS, 2, 8)
    assert llm_answers.pending_questions(data, "sft") == []
    make_data.assemble(data, seed=0)
    assert (data / "pretrain.jsonl").read_bytes() == pretrain_before  # a run training on it is not disturbed
    assert any(r["messages"][-1]["content"].startswith("The answer to") for r in _rows(data / "sft.jsonl"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # nothing is left to ask: the model is not loaded
    assert llm_answers.main(["--data", str(data), "--model", str(tmp_path / "model"), "--stage", "sft"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"; [1-9]\d* voice-chat rows still wait for an answer \(--stage sft asks only that stage's", out)


# ---- timbre: equalised training sounds, more and varied training renders ----

@needs_deps
def test_the_equaliser_boosts_its_band_cuts_above_its_cutoff_and_keeps_the_level():
    import numpy as np

    from demo import augment

    rng = np.random.default_rng(0)
    x = augment.colored_noise(SAMPLE_RATE * 2, "white", rng)
    f = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)

    def band_db(y, low, high):
        power = np.abs(np.fft.rfft(y)) ** 2
        return 10 * np.log10(power[(f >= low) & (f < high)].mean())

    y = augment.equalize(x, tilt=0.0, bands=[[1000.0, 9.0, 0.3]])
    boost = (band_db(y, 900, 1100) - band_db(y, 200, 300)) - (band_db(x, 900, 1100) - band_db(x, 200, 300))
    assert 7.0 < boost < 10.0  # the bell's gain at its centre, against a band two octaves away
    assert augment.rms(y) == pytest.approx(augment.rms(x), rel=1e-3)
    z = augment.equalize(x, tilt=0.0, bands=[], cutoff=2000.0)
    drop = (band_db(z, 500, 1000) - band_db(z, 3800, 4200)) - (band_db(x, 500, 1000) - band_db(x, 3800, 4200))
    assert 10.0 < drop < 14.0  # around one octave above the cutoff: 12 dB down
    recipe = augment.eq_recipe(np.random.default_rng(1))
    assert recipe == augment.eq_recipe(np.random.default_rng(1)) and 1 <= len(recipe["bands"]) <= 2


@needs_deps
def test_training_renders_get_more_variants_than_held_out_ones(tmp_path, monkeypatch):
    from demo import bank
    from demo.sources import Sources

    # the plan, not the renders: every source counts as here (the sound fonts are Debian packages)
    monkeypatch.setattr(Sources, "available", lambda self, source: True)
    jobs = bank.bank_jobs(Sources(tmp_path), {"rendered": 2, "rendered_train": 5, "synthetic": 1}, True, None, 0)
    count = {}
    for job in jobs:
        if job.recording.source.startswith("fluidsynth"):
            count.setdefault((job.recording.id, job.recording.split), set()).add(job.variant)
    assert count and all(v == set(range(5 if split == "train" else 2)) for (_, split), v in count.items())
    assert {split for _, split in count} == {"train", "heldout"}
    old = bank.bank_jobs(Sources(tmp_path), {"rendered": 2, "synthetic": 1}, True, None, 0)
    assert {j.path for j in old} <= {j.path for j in jobs}  # the first variants keep their names and seeds
    assert all(j.variant < 2 for j in old if j.recording.source.startswith("fluidsynth"))


@needs_espeak
def test_only_training_sounds_to_be_named_are_equalised(tiny):
    recipes = _recipes(tiny)
    eq = [(part, c) for part, c in recipes if "eq" in c.get("fx", {})]
    named = [c for part, c in recipes if part.endswith("train/sound")]
    assert eq and {part for part, _ in eq} <= {"pretrain/train/sound", "sft/train/sound"}
    assert 0 < len(eq) < len(named)


def test_a_sound_is_named_by_its_own_names_and_not_by_another_trained_class():
    """292 of the 600 held-out sound items accepted the answer the model learnt for another class ("a phone
    ringing" for a bell, "taiko drums" for a tabla, "a bell ringing" for a cowbell)."""
    from demo.plan import contains_reference
    from demo.sounds import CLASSES, naming_accepted, naming_rejects

    metric = get_metric("contains")
    trained = list(CLASSES.values())

    def right(key: str, answer: str) -> bool:
        cls = CLASSES[key]
        return metric.stats(contains_reference(naming_accepted(cls, trained), naming_rejects(cls, trained)), answer)[0] == 1.0

    assert right("bell", "A bell ringing.") and not right("bell", "A phone ringing.")
    assert right("tabla", "Tabla drums.") and not right("tabla", "Taiko drums.") and not right("tabla", "Bongo drums.")
    assert right("cowbell", "A cowbell.") and not right("cowbell", "A bell ringing.")
    assert right("kick_drum", "A kick drum.") and not right("kick_drum", "A snare drum.")
    assert right("dog", "Hi! A dog barking.") and not right("dog", "A dog or a cat.")
    assert right("thud", "A thud.") and not right("thud", "Rain falling.")
    for cls in trained:  # every class's own label is right for it
        assert right(cls.key, f"That was {cls.label}."), cls.key


def test_a_category_question_takes_the_sounds_own_name_too():
    import numpy as np

    from demo.questions import sound_question
    from demo.sounds import CLASSES

    for seed in range(60):
        question, answer, accepted = sound_question(CLASSES["rain"], np.random.default_rng(seed), list(CLASSES.values()))
        if "kind of thing" in question or "something else" in question:
            assert "else" in accepted and "rain" in accepted
            break
    else:
        pytest.fail("no category question drawn")


@needs_espeak
def test_a_made_folder_takes_the_codes_evaluation_items_and_keeps_its_clips_and_training_manifests(tiny, tmp_path):
    """Evaluation items are rewritten from the plan when a folder resumes (references the code now gives,
    items it leaves out); only their rows: no clip is made again and no training manifest moves."""
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    sounds = data / "eval" / "sounds.jsonl"
    planned = sounds.read_text()
    rows = _rows(sounds)
    sounds.write_text("".join(json.dumps({**r, "reference": r["reference"].split("!")[0]}) + "\n" for r in rows))
    before = {p: p.read_bytes() for p in [data / "pretrain.jsonl", data / "sft.jsonl", *sorted((data / "audio").rglob("*.flac"))]}
    assert make_data.main(["--out", str(data), "--seed", "0", "--scale", "tiny", "--jobs", "1"]) == 0
    assert sounds.read_text() == planned and "!" in planned
    assert {p: p.read_bytes() for p in before} == before
