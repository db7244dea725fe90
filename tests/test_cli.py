"""`qwen2audio chat` and `qwen2audio transcribe` end to end, on the embedded default model and on a
saved checkpoint directory: what they print equals what the Python API returns, and bad input exits
with status 2 and one clear line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from qwen2audio import Qwen2Audio
from qwen2audio.audio import N_SAMPLES, cut_windows, load_audio, split_at_pauses
from qwen2audio.cli import main
from qwen2audio.generation.params import SamplingParams
from qwen2audio.text.tags import TAG
from reference import TOKENIZER, clip, hf_model

NEW = "16"  # --max-new-tokens everywhere: short answers keep the tests fast


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A checkpoint directory as a user has one: weights, config and tokenizer."""
    path = tmp_path_factory.mktemp("checkpoint")
    hf_model("mha_untied_80").save_pretrained(path)
    TOKENIZER.save(path)
    return path


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Audio files written for the tests: a 16 kHz wav, a 44.1 kHz stereo flac, and a corrupt file."""
    d = tmp_path_factory.mktemp("audio")
    soundfile.write(d / "speech.wav", clip(2.0, 1), 16000, subtype="PCM_16")
    stereo = clip(3.0, 2, sr=44100)
    soundfile.write(d / "tone.flac", [[s, 0.5 * s] for s in stereo], 44100)
    (d / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage, not audio" * 10)
    return {"wav": str(d / "speech.wav"), "flac": str(d / "tone.flac"), "corrupt": str(d / "corrupt.wav")}


@pytest.fixture(scope="module")
def api(default_home, model_dir):
    """The same models through the Python API, to compare the CLI's output with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = Qwen2Audio.load()
    return {"default": default, "saved": Qwen2Audio.load(model_dir)}


@pytest.fixture(params=["default", "saved"])
def which(request, api, model_dir):
    """(the CLI's model arguments, the API model they name)."""
    args = [] if request.param == "default" else [str(model_dir)]
    return args, api[request.param]


def cli(capsys, monkeypatch, argv, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        rc = main(argv)
    except SystemExit as exit:  # argparse's own errors
        rc = exit.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def user_turn(audios=(), text=None) -> list[dict]:
    parts = [{"type": "audio", "audio": a} for a in audios]
    if text:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def run_module(args, env_home, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, QWEN2AUDIO_HOME=str(env_home), OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "qwen2audio.cli", *args], capture_output=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)


# -- chat -----------------------------------------------------------------------------------------------
def test_voice_chat_as_a_command(default_home, api, audio):
    """`python -m qwen2audio.cli chat --audio F`, a real process on the default model: the reply, exit 0."""
    proc = run_module(["chat", "--audio", audio["wav"], "--max-new-tokens", NEW], default_home)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    expected = api["default"].chat(user_turn([audio["wav"]]), max_new_tokens=int(NEW)).text
    assert expected.strip()
    assert proc.stdout.decode("utf-8") == expected + "\n"
    assert "embedded default model" in stderr and "Traceback" not in stderr


def test_chat_json_equals_the_api(which, audio, capsys, monkeypatch):
    args, model = which
    rc, out, err = cli(capsys, monkeypatch, ["chat", *args, "--audio", audio["wav"], "--prompt", "What is this?",
                                             "--json", "--max-new-tokens", NEW])
    assert rc == 0, err
    got = json.loads(out)  # exactly one JSON object and nothing else
    expected = model.chat(user_turn([audio["wav"]], "What is this?"), max_new_tokens=int(NEW))
    assert got == {"text": expected.text, "token_ids": expected.token_ids, "finish_reason": expected.finish_reason,
                   "prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.token_ids)}
    assert len(expected.token_ids) >= 8 and got["finish_reason"] in ("stop", "length")


def test_chat_json_logprobs_equal_the_api(model_dir, api, audio, capsys, monkeypatch):
    """--logprobs N adds the API's log-probabilities in OpenAI's shape; without --json it is refused before
    the model loads; transcribe, whose output is text, has no such flag."""
    from qwen2audio.generation.reply import logprob_entries

    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--audio", audio["wav"], "--json",
                                             "--logprobs", "2", "--max-new-tokens", NEW])
    assert rc == 0, err
    expected = api["saved"].chat(user_turn([audio["wav"]]), max_new_tokens=int(NEW), logprobs=2)
    got = json.loads(out)
    assert got["token_ids"] == expected.token_ids and len(got["logprobs"]) == len(expected.token_ids)
    assert got["logprobs"] == logprob_entries(expected.logprobs, TOKENIZER.token_bytes)
    assert all(len(e["top_logprobs"]) == 2 for e in got["logprobs"])
    rc, out, err = cli(capsys, monkeypatch, ["chat", "/no/such/model", "--audio", audio["wav"], "--logprobs", "2"])
    assert rc == 2 and "add --json" in err and out == ""
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), audio["wav"], "--logprobs", "2"])
    assert rc == 2 and "--logprobs" in err


def test_chat_with_several_audios_and_a_resampled_file(which, audio, capsys, monkeypatch):
    args, model = which
    rc, out, err = cli(capsys, monkeypatch, ["chat", *args, "--audio", audio["wav"], "--audio", audio["flac"],
                                             "--prompt", "Compare them.", "--json", "--max-new-tokens", NEW])
    assert rc == 0, err
    expected = model.chat(user_turn([audio["wav"], audio["flac"]], "Compare them."), max_new_tokens=int(NEW))
    assert json.loads(out)["token_ids"] == expected.token_ids


def test_sampling_seed_decides_the_output(model_dir, audio, capsys, monkeypatch):
    def sample(seed):
        rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--audio", audio["wav"], "--json",
                                                 "--temperature", "0.8", "--seed", str(seed), "--max-new-tokens", NEW])
        assert rc == 0, err
        return json.loads(out)["token_ids"]

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first


def test_interactive_turns_from_stdin(which, audio, capsys, monkeypatch):
    args, model = which
    stdin = f"Tell me more.\n\n/audio {audio['flac']} And this one?\n"  # the blank line is no turn
    rc, out, err = cli(capsys, monkeypatch, ["chat", *args, "--audio", audio["wav"], "--prompt", "Hi.",
                                             "--interactive", "--max-new-tokens", NEW], stdin)
    assert rc == 0, err
    conv = model.conversation()
    replies = ["".join(conv.stream("Hi.", audio=[audio["wav"]], max_new_tokens=int(NEW))),
               "".join(conv.stream("Tell me more.", max_new_tokens=int(NEW))),
               "".join(conv.stream("And this one?", audio=[audio["flac"]], max_new_tokens=int(NEW)))]
    assert out == "".join(r + "\n" for r in replies)


def test_an_interactive_chat_may_start_with_the_users_first_line(api, model_dir, audio, capsys, monkeypatch):
    """No --audio or --prompt: in a terminal (--interactive) the first turn is typed; otherwise the chat is
    refused before any model loads (a 7B checkpoint takes minutes)."""
    stdin = f"/audio {audio['wav']} What is this?\nTell me more.\n"
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--interactive", "--max-new-tokens", NEW], stdin)
    assert rc == 0, err
    conv = api["saved"].conversation()
    replies = ["".join(conv.stream("What is this?", audio=[audio["wav"]], max_new_tokens=int(NEW))),
               "".join(conv.stream("Tell me more.", max_new_tokens=int(NEW)))]
    assert out == "".join(r + "\n" for r in replies)

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("qwen2audio.api.Qwen2Audio.load", no_load)
    for argv in (["--no-interactive"], ["--json", "--interactive"]):
        rc, _, err = cli(capsys, monkeypatch, ["chat", str(model_dir), *argv])
        assert rc == 2 and "give the first turn: --audio FILE (voice chat), --prompt TEXT, or both" in err, err


def test_not_interactive_when_stdin_is_not_a_terminal(api, model_dir, capsys, monkeypatch):
    """Without --interactive, piped stdin is not read as further turns: one answer, then exit."""
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--prompt", "Hi.", "--max-new-tokens", NEW],
                       stdin="this line is not a turn\n")
    assert rc == 0, err
    assert out == api["saved"].chat(user_turn([], "Hi."), max_new_tokens=int(NEW)).text + "\n"


def test_beam_search_from_the_command_line(model_dir, api, audio, capsys, monkeypatch):
    """--num-beams: the JSON reply and the printed one are the API's beam search, which is not greedy's."""
    model, turn = api["saved"], user_turn([audio["wav"]], "What is this?")
    expected = model.chat(turn, max_new_tokens=int(NEW), num_beams=3)
    assert expected.token_ids != model.chat(turn, max_new_tokens=int(NEW)).token_ids
    base = ["chat", str(model_dir), "--audio", audio["wav"], "--prompt", "What is this?", "--max-new-tokens", NEW,
            "--num-beams", "3"]
    rc, out, err = cli(capsys, monkeypatch, [*base, "--json"])
    assert rc == 0, err
    body = json.loads(out)
    assert body["token_ids"] == expected.token_ids and body["score"] == pytest.approx(expected.score)
    assert [a["token_ids"] for a in body["alternatives"]] == [a.token_ids for a in expected.alternatives]
    assert len(body["alternatives"]) == 2
    rc, out, err = cli(capsys, monkeypatch, base)
    assert rc == 0, err
    assert out == expected.text + "\n"
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), audio["wav"], "--max-new-tokens", NEW,
                                             "--num-beams", "2"])
    assert rc == 0, err
    assert out == model.transcribe(audio["wav"], max_new_tokens=int(NEW), num_beams=2) + "\n"  # one file: no name
    # with a temperature: beam sampling, the API's for the same seed
    rc, out, err = cli(capsys, monkeypatch, [*base, "--temperature", "1.2", "--seed", "7"])
    assert rc == 0, err
    assert out == model.chat(turn, max_new_tokens=int(NEW), num_beams=3, temperature=1.2, seed=7).text + "\n"


@pytest.mark.parametrize("flags,message", [
    (["--num-beams", "0"], "--num-beams must be at least 1"),
    (["--num-beams", "2", "--stop", "x"], "stop strings are not supported with beam search"),
])
def test_beam_search_settings_that_cannot_work(model_dir, flags, message, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--prompt", "x", *flags])
    assert rc == 2 and out == ""
    assert err.startswith("qwen2audio: error: ") and message in err


# -- transcribe ---------------------------------------------------------------------------------------
def test_long_audio_is_transcribed_chunk_by_chunk(api, model_dir, tmp_path, capsys, monkeypatch):
    """A file longer than --chunk-seconds: cut in a pause (split_at_pauses), each chunk transcribed
    with its own prompt in one batch, the texts joined by a space, the same as the API's."""
    model = api["saved"]
    wave = np.concatenate([clip(2.5, 3), np.zeros(8000, np.float32), clip(3.0, 4), np.zeros(8000, np.float32),
                           clip(2.0, 5)])
    path = tmp_path / "long.wav"
    soundfile.write(path, wave, 16000, subtype="FLOAT")
    chunks = split_at_pauses(wave, 4 * 16000)
    cuts = np.cumsum([len(c) for c in chunks])[:-1]
    assert len(chunks) == 3 and 40000 <= cuts[0] <= 48000 and 96000 <= cuts[1] <= 104000  # in the two pauses
    each = [model.transcribe(c, max_new_tokens=int(NEW)) for c in chunks]
    expected = " ".join(t for t in each if t)
    assert model.transcribe(str(path), max_new_tokens=int(NEW), chunk_seconds=4) == expected
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), str(path), "--max-new-tokens", NEW,
                                             "--chunk-seconds", "4"])
    assert rc == 0, err
    assert out == expected + "\n"
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), str(path), "--chunk-seconds", "0.5"])
    assert rc == 2 and "--chunk-seconds: chunk_seconds must be between 1 and 30" in err


def test_cut_at_pauses_transcribes_each_stretch_between_pauses(api, model_dir, tmp_path, capsys, monkeypatch):
    """--cut-at-pauses S: three spoken questions with 0.5 s of silence between fit in one chunk, but the
    pauses cut them in three, each transcribed on its own, the same as the API's; a pause length out of range
    is refused before the model loads."""
    model = api["saved"]
    question = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "question.flac"))
    gap = np.zeros(8000, np.float32)
    wave = np.concatenate([question, gap, question, gap, question])
    path = tmp_path / "three.wav"
    soundfile.write(path, wave, 16000, subtype="FLOAT")
    chunks = split_at_pauses(wave, 30 * 16000, 4800)
    cuts = np.cumsum([len(c) for c in chunks])[:-1]
    step = len(question) + len(gap)
    assert len(chunks) == 3 and all(len(question) <= c - k * step <= step for k, c in enumerate(cuts))  # in the gaps
    expected = " ".join(t for t in (model.transcribe(c, max_new_tokens=int(NEW)) for c in chunks) if t)
    assert model.transcribe(str(path), max_new_tokens=int(NEW), cut_at_pauses=0.3) == expected
    assert model.transcribe(str(path), max_new_tokens=int(NEW)) == model.transcribe(wave, max_new_tokens=int(NEW))
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), str(path), "--max-new-tokens", NEW,
                                             "--cut-at-pauses", "0.3"])
    assert rc == 0, err
    assert out == expected + "\n"
    from qwen2audio import cli as cli_module

    monkeypatch.setattr(cli_module, "_load", lambda args: pytest.fail("the model must not load"))
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), str(path), "--cut-at-pauses", "0.01"])
    assert rc == 2 and "--cut-at-pauses: cut_at_pauses must be between 0.05 and 5 seconds" in err


def test_what_has_no_speech_is_not_transcribed(api, model_dir, tmp_path, capsys, monkeypatch):
    """With pause cuts, a doorbell and the silence around it (3.6 s) between two questions is a window of no
    speech, not given to the model: the transcript is the two questions' windows' texts; doorbells alone
    give "" (without pause cuts, the tiny random model writes something for them), and the CLI says that it
    heard no speech in that file rather than printing a bare blank line."""
    model = api["saved"]
    examples = Path(__file__).resolve().parents[1] / "examples"
    question, doorbell = load_audio(str(examples / "question.flac")), load_audio(str(examples / "doorbell.flac"))
    silence = np.zeros(16000, np.float32)
    wave = np.concatenate([question, silence, doorbell, silence, question])
    windows = cut_windows(wave, N_SAMPLES, 4800)
    assert [w.speech for w in windows] == [True, False, True]
    expected = " ".join(t for t in (model.transcribe(w.audio, max_new_tokens=int(NEW)) for w in windows if w.speech) if t)
    assert model.transcribe(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3) == expected
    rings = np.concatenate([doorbell, silence, doorbell])
    assert model.transcribe(rings, max_new_tokens=int(NEW), cut_at_pauses=0.3) == ""
    assert model.transcribe(rings, max_new_tokens=int(NEW), cut_at_pauses=0) != ""
    soundfile.write(tmp_path / "rings.wav", rings, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "speech.wav", wave, 16000, subtype="FLOAT")
    for name, heard in (("rings.wav", False), ("speech.wav", True)):
        rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), str(tmp_path / name), "--max-new-tokens",
                                                 NEW, "--cut-at-pauses", "0.3"])
        assert rc == 0, err
        assert (f"{tmp_path / name}: no speech heard" in err) is not heard
        assert (out == "\n") is not heard


def three_questions(tmp_path: Path, name: str = "three.wav") -> tuple[np.ndarray, Path]:
    """The bundled spoken question three times, 0.5 s of silence between, written to a file."""
    question = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "question.flac"))
    gap = np.zeros(8000, np.float32)
    wave = np.concatenate([question, gap, question, gap, question])
    soundfile.write(tmp_path / name, wave, 16000, subtype="FLOAT")
    return wave, tmp_path / name


def test_transcript_gives_segments_with_times(api):
    """Qwen2Audio.transcript: a segment per chunk transcribed, at the chunk's times, with its text, tokens and
    temperature; its text is transcribe's; the duration is the audio's."""
    model = api["saved"]
    question = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "question.flac"))
    doorbell = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "doorbell.flac"))
    wave = np.concatenate([question, np.zeros(16000, np.float32), doorbell, np.zeros(16000, np.float32), question])
    transcript = model.transcript(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3)
    speech = [w for w in cut_windows(wave, N_SAMPLES, 4800) if w.speech]
    assert [(s.start, s.end) for s in transcript.segments] == [
        (w.start / 16000, (w.start + len(w.audio)) / 16000) for w in speech]
    alone = [model.complete("Detect the language and recognize the speech: <|en|>", [w.audio],
                            max_new_tokens=int(NEW)) for w in speech]
    assert [s.tokens for s in transcript.segments] == [g.token_ids for g in alone]
    assert [s.temperature for s in transcript.segments] == [0.0, 0.0]
    assert transcript.text == model.transcribe(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3)
    assert transcript.duration == len(wave) / 16000
    whole = model.transcript(wave, max_new_tokens=int(NEW))  # one 8.7 s window
    assert [(s.start, s.end) for s in whole.segments] == [(0.0, len(wave) / 16000)]


def test_transcribe_writes_subtitles_and_verbose_json(api, model_dir, tmp_path, capsys, monkeypatch):
    """--format srt / vtt / verbose_json: a cue (segment) per chunk transcribed, at its times, with the API's
    texts; printed for one file, written for each with --output-dir (the same documents)."""
    model = api["saved"]
    wave, path = three_questions(tmp_path)
    transcript = model.transcript(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3)
    assert len(transcript.segments) == 3
    base = ["transcribe", str(model_dir), str(path), "--max-new-tokens", NEW, "--cut-at-pauses", "0.3"]
    rc, srt, err = cli(capsys, monkeypatch, base + ["--format", "srt"])
    assert rc == 0, err
    cues = srt.strip().split("\n\n")
    assert [c.split("\n")[0] for c in cues] == ["1", "2", "3"]
    expected = [f"{s.start:.3f} {s.end:.3f}" for s in transcript.segments]

    def seconds(stamp: str) -> float:
        h, m, rest = stamp.replace(",", ".").split(":")
        return 3600 * int(h) + 60 * int(m) + float(rest)

    times = [c.split("\n")[1].split(" --> ") for c in cues]
    assert [f"{seconds(a):.3f} {seconds(b):.3f}" for a, b in times] == expected
    assert [c.split("\n")[2] for c in cues] == [" ".join(s.text.split()) for s in transcript.segments]
    rc, vtt, _ = cli(capsys, monkeypatch, base + ["--format", "vtt"])
    assert rc == 0 and vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == 3
    rc, verbose, _ = cli(capsys, monkeypatch, base + ["--format", "verbose_json"])
    doc = json.loads(verbose)
    assert doc["text"] == transcript.text and doc["language"] == "english"
    assert doc["duration"] == round(len(wave) / 16000, 3)
    assert [seg["tokens"] for seg in doc["segments"]] == [s.tokens for s in transcript.segments]
    assert all(seg["avg_logprob"] < 0 for seg in doc["segments"])
    # each segment one spoken question: the voice-activity detector's no_speech_prob, as the API gives it
    assert [seg["no_speech_prob"] for seg in doc["segments"]] == [
        s.no_speech_prob for s in model.transcript(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3,
                                                   no_speech=True).segments]
    assert all(seg["no_speech_prob"] < 0.1 for seg in doc["segments"])
    assert transcript.segments[0].no_speech_prob is None  # not asked for
    out = tmp_path / "out"
    other = tmp_path / "other.wav"
    other.write_bytes(path.read_bytes())
    both = ["transcribe", str(model_dir), str(path), str(other), "--max-new-tokens", NEW, "--cut-at-pauses", "0.3"]
    rc, printed, err = cli(capsys, monkeypatch, both + ["--format", "srt", "--output-dir", str(out)])
    assert rc == 0 and printed == "" and f"wrote {out / 'three.srt'}" in err
    assert (out / "three.srt").read_text() == (out / "other.srt").read_text() == srt
    rc, _, _ = cli(capsys, monkeypatch, base + ["--output-dir", str(out)])
    assert rc == 0 and (out / "three.txt").read_text() == transcript.text + "\n"


def test_translate_to_asks_with_the_official_translation_prompt(api, model_dir, tmp_path, capsys, monkeypatch):
    """--translate-to LANG (translate_to= in the API): the evaluation's speech-translation prompt, naming the
    target language and the spoken one; verbose_json says "translate"; an unknown language is refused."""
    from qwen2audio.eval.translation import TRANSLATION_PROMPT

    model = api["saved"]
    wave, path = three_questions(tmp_path)
    prompt = TRANSLATION_PROMPT.format(target="German", source="fr")
    expected = model.complete(prompt, [wave], max_new_tokens=int(NEW)).text
    translated = model.transcript(wave, language="fr", translate_to="de", max_new_tokens=int(NEW))
    assert translated.segments[0].tokens == model.complete(prompt, [wave], max_new_tokens=int(NEW)).token_ids
    assert translated.text == TAG.sub("", expected).strip() == model.translate(wave, to="de", language="fr",
                                                                                max_new_tokens=int(NEW))
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), str(path), "--max-new-tokens", NEW,
                                             "--language", "fr", "--translate-to", "de", "--format", "verbose_json"])
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["task"] == "translate" and doc["text"] == translated.text
    assert doc["language"] == "german"  # the text's language, as OpenAI's translations say "english"
    with pytest.raises(ValueError, match="translate_to='xx': no name for that language"):
        model.transcript(wave, translate_to="xx")


def test_printed_transcripts_are_written_as_their_chunks_are_decoded(api, tmp_path, monkeypatch):
    """text, srt and vtt on stdout come a segment at a time (Qwen2Audio.transcript's on_segment, in order),
    before the transcript is complete, and add up to the same bytes as the whole document."""
    from qwen2audio import cli as cli_module
    from qwen2audio.cli import build_parser

    model = api["saved"]
    wave, path = three_questions(tmp_path)
    whole = model.transcript(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3)
    events = []
    seen = []
    real = model.transcript

    def transcript(*a, **kw):
        result = real(*a, **{**kw, "on_segment": lambda seg: (seen.append(seg), kw["on_segment"](seg))})
        events.append("returned")
        return result

    monkeypatch.setattr(model, "transcript", transcript)

    class Out(io.StringIO):
        def write(self, text):
            events.append(text)
            return super().write(text)

    for fmt in ("text", "srt", "vtt"):
        args = build_parser().parse_args(["transcribe", str(path), "--format", fmt, "--cut-at-pauses", "0.3"])
        cli_module._check_transcript_output(args)
        events.clear()
        seen.clear()
        out = Out()
        monkeypatch.setattr(sys, "stdout", out)
        assert cli_module._transcribe(model, args, {"max_new_tokens": int(NEW)}) == 0
        assert seen == whole.segments
        written = [e for e in events[:events.index("returned")] if e]
        assert len(written) == len([s for s in whole.segments if s.text.strip()])  # one write per segment
        from qwen2audio.text.transcripts import render

        expected = (whole.text + "\n" if fmt == "text" else
                    render(fmt, whole.segments, task="transcribe", language="english", duration=whole.duration,
                           temperature=0.0)[0])
        assert out.getvalue() == expected, fmt  # the whole document's bytes, as the server renders it


def test_transcribe_output_options_are_checked_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    from qwen2audio import cli as cli_module

    monkeypatch.setattr(cli_module, "_load", lambda args: pytest.fail("the model must not load"))
    _, path = three_questions(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, twin = three_questions(elsewhere)
    base = ["transcribe", str(model_dir), str(path)]
    for argv, message in (
            ([str(path), "--format", "vtt"], "--format vtt prints one file's transcript: give one file, or --output-dir"),
            (["--json", "--format", "srt"], "--json is --format json; it cannot go with --format srt"),
            ([str(twin), "--format", "srt", "--output-dir", str(tmp_path / "o")],
             f"{path} and {twin} would both be written to {tmp_path / 'o' / 'three.srt'}"),
            (["--output-dir", str(path)], f"--output-dir {path}: not a directory"),
            (["--translate-to", "xx"], "--translate-to: 'xx': no name for that language in the translation prompt"),
            (["--language", "english"], "--language 'english' is a language's name; give its code, 'en'"),
            (["--output-dir", str(path / "sub")], f"--output-dir {path / 'sub'}: cannot create it (Not a directory)")):
        rc, out, err = cli(capsys, monkeypatch, base + argv)
        assert rc == 2 and message in err, err
    rc, _, err = cli(capsys, monkeypatch, base + ["--format", "pdf"])
    assert rc == 2 and "invalid choice: 'pdf'" in err


def test_a_long_transcription_shows_its_progress(api, capsys):
    """progress=True: a bar on stderr counting the chunks as their transcripts come; the text is the same."""
    model = api["saved"]
    question = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "question.flac"))
    gap = np.zeros(8000, np.float32)
    wave = np.concatenate([question, gap, question, gap, question])
    quiet = model.transcribe(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3, progress=False)
    assert capsys.readouterr().err == ""
    shown = model.transcribe(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3, progress=True)
    err = capsys.readouterr().err
    assert shown == quiet and "transcribing" in err and "/3 [" in err and "chunk/s" in err  # 3 chunks
    calls = []
    model.engine.generate([model.prepare_raw("x", [question])] * 2, SamplingParams(max_new_tokens=2),
                          on_result=calls.append)
    assert [g.token_ids for g in calls] == [g.token_ids for g in model.engine.generate(
        [model.prepare_raw("x", [question])] * 2, SamplingParams(max_new_tokens=2))]


def test_a_checkpoint_can_say_how_to_cut_long_audio(api, model_dir, tmp_path, capsys, monkeypatch):
    """generation_config.json's "transcription" object sets transcribe's defaults (the demo model's says
    cut_at_pauses 0.3); the caller's values win, 0 turning pause cuts off; a bad object fails the load."""
    import shutil

    from qwen2audio.checkpoint import CheckpointError

    question = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "question.flac"))
    wave = np.concatenate([question, np.zeros(8000, np.float32), question])
    path = tmp_path / "two.wav"
    soundfile.write(path, wave, 16000, subtype="FLOAT")
    cuts = tmp_path / "cuts"
    shutil.copytree(model_dir, cuts)
    config = json.loads((cuts / "generation_config.json").read_text())
    (cuts / "generation_config.json").write_text(json.dumps({**config, "transcription": {"cut_at_pauses": 0.3}}))
    model, plain = Qwen2Audio.load(cuts), api["saved"]
    assert model.transcription_defaults == {"chunk_seconds": 30.0, "cut_at_pauses": 0.3, "num_beams": 1,
                                            "fallback": False}
    assert plain.transcription_defaults == {"chunk_seconds": 30.0, "cut_at_pauses": 0, "num_beams": 1,
                                            "fallback": False}
    by_pauses = plain.transcribe(wave, max_new_tokens=int(NEW), cut_at_pauses=0.3)
    whole = plain.transcribe(wave, max_new_tokens=int(NEW))
    assert by_pauses != whole  # two chunks, two prompts
    assert model.transcribe(wave, max_new_tokens=int(NEW)) == by_pauses
    assert model.transcribe(wave, max_new_tokens=int(NEW), cut_at_pauses=0) == whole
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(cuts), str(path), "--max-new-tokens", NEW])
    assert rc == 0 and out == by_pauses + "\n", err
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(cuts), str(path), "--max-new-tokens", NEW,
                                             "--cut-at-pauses", "0"])
    assert rc == 0 and out == whole + "\n", err
    for bad in ({"cut_at_pauses": 9}, {"pauses": 0.3}, [0.3]):
        (cuts / "generation_config.json").write_text(json.dumps({**config, "transcription": bad}))
        with pytest.raises(CheckpointError, match="generation_config.json"):
            Qwen2Audio.load(cuts)


def test_a_checkpoint_can_say_how_to_decode_transcripts(api, model_dir, tmp_path, capsys, monkeypatch):
    """generation_config.json's "transcription" num_beams and fallback (the demo model's: 4 beams, the
    fallback on) are transcribe's defaults at temperature 0, in the Python API and the CLI; the caller's
    num_beams / --num-beams and fallback / --no-fallback win; a sampled transcript uses neither."""
    import shutil

    import qwen2audio.generation.fallback as fallback_module
    from qwen2audio.checkpoint import CheckpointError

    question = (np.random.default_rng(0).standard_normal(32000) * 0.1).astype(np.float32)  # beams differ on it
    path = tmp_path / "q.wav"
    soundfile.write(path, question, 16000, subtype="FLOAT")
    beams = tmp_path / "beams"
    shutil.copytree(model_dir, beams)
    config = json.loads((beams / "generation_config.json").read_text())
    (beams / "generation_config.json").write_text(
        json.dumps({**config, "transcription": {"num_beams": 3, "fallback": True}}))
    model, plain = Qwen2Audio.load(beams), api["saved"]
    kept = fallback_module.fallback_with_temperatures
    fell_back: list[int] = []  # the num_beams of each transcript decoded through the fallback
    monkeypatch.setattr(fallback_module, "fallback_with_temperatures",
                        lambda engine, batch, params, **k: fell_back.append(params.num_beams) or kept(
                            engine, batch, params, **k))
    by_beams = plain.transcribe(question, max_new_tokens=int(NEW), num_beams=3)
    greedy = plain.transcribe(question, max_new_tokens=int(NEW))
    assert by_beams != greedy, "3 beams changed nothing: the test shows nothing"
    assert fell_back == []
    assert model.transcribe(question, max_new_tokens=int(NEW)) == by_beams and fell_back == [3]
    assert model.transcribe(question, max_new_tokens=int(NEW), num_beams=1, fallback=False) == greedy
    assert fell_back == [3]
    sampled = {"temperature": 0.8, "seed": 3, "max_new_tokens": int(NEW)}
    assert model.transcribe(question, **sampled) == plain.transcribe(question, **sampled) and fell_back == [3]
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(beams), str(path), "--max-new-tokens", NEW])
    assert rc == 0 and out == by_beams + "\n" and fell_back == [3, 3], err
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(beams), str(path), "--max-new-tokens", NEW,
                                             "--num-beams", "1", "--no-fallback"])
    assert rc == 0 and out == greedy + "\n" and fell_back == [3, 3], err
    for bad, message in (({"num_beams": 0}, "num_beams"), ({"num_beams": True}, "num_beams"),
                         ({"fallback": "yes"}, "fallback")):
        (beams / "generation_config.json").write_text(json.dumps({**config, "transcription": bad}))
        with pytest.raises(CheckpointError, match=message):
            Qwen2Audio.load(beams)


def test_transcribe_prints_one_line_per_file(which, audio, capsys, monkeypatch):
    args, model = which
    files = [audio["wav"], audio["flac"]]
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", *args, *files, "--max-new-tokens", NEW])
    assert rc == 0, err
    expected = [model.transcribe(f, max_new_tokens=int(NEW)) for f in files]
    assert all("\n" not in t for t in expected)
    assert out == "".join(f"{f}\t{t}\n" for f, t in zip(files, expected))


def test_transcribe_json_lines(model_dir, api, audio, capsys, monkeypatch):
    files = [audio["wav"], audio["flac"]]
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(model_dir), *files, "--json", "--max-new-tokens", NEW])
    assert rc == 0, err
    expected = [{"file": f, "text": api["saved"].transcribe(f, max_new_tokens=int(NEW))} for f in files]
    assert [json.loads(line) for line in out.splitlines()] == expected


def test_transcribe_goes_on_past_a_missing_file_and_fails_at_the_end(which, audio, tmp_path, capsys, monkeypatch):
    args, model = which
    missing = str(tmp_path / "no_such_file.wav")
    files = [audio["wav"], missing, audio["flac"]]
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", *args, *files, "--max-new-tokens", NEW])
    assert rc != 0
    assert missing in err and "does not exist" in err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [audio["wav"], audio["flac"]]
    assert lines[0] == f"{audio['wav']}\t{model.transcribe(audio['wav'], max_new_tokens=int(NEW))}"


def test_transcribe_goes_on_when_the_first_file_is_the_missing_one(api, audio, tmp_path, capsys, monkeypatch):
    """Without a model folder the first argument could be either: a missing file named like audio is a file."""
    missing = str(tmp_path / "no_such_file.wav")
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", missing, audio["wav"], "--max-new-tokens", NEW])
    assert rc != 0 and missing in err and "does not exist" in err and "huggingface-cli" not in err
    assert out.split("\t")[0] == audio["wav"]


def test_bad_flags_and_missing_audio_are_told_before_the_model_loads(audio, tmp_path, capsys, monkeypatch):
    from qwen2audio import cli as cli_module

    monkeypatch.setattr(cli_module, "_load", lambda args: pytest.fail("the model must not load"))
    (tmp_path / "empty.wav").write_bytes(b"")
    for argv, message in ((["chat", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                          (["chat", "--prompt", "hi", "--num-beams", "2", "--stop", "x"], "--stop strings are not supported"),
                          (["chat", "--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
                          (["chat", "--prompt", "hi", "--seed", "99999999999999999999999"], "--seed must be between"),
                          (["chat", "--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
                          (["chat", "--audio", str(tmp_path / "gone.wav"), "--prompt", "hi"], "gone.wav: no such file"),
                          (["chat", "--audio", str(tmp_path), "--prompt", "hi"], "a folder, not an audio file"),
                          (["chat", "--audio", str(tmp_path / "empty.wav"), "--prompt", "hi"], "empty.wav"),
                          (["transcribe", audio["wav"], "--top-k", "-1"], "--top-k must be >= 0"),
                          (["transcribe", str(tmp_path / "gone.wav"), str(tmp_path / "gone.mp3")],
                           "nothing to transcribe: "),
                          (["transcribe", str(tmp_path / "empty.wav"), str(tmp_path / "gone.mp3")],
                           "empty.wav: the file is empty (0 bytes)")):
        rc, _, err = cli(capsys, monkeypatch, argv)
        assert rc == 2 and message in err, (argv, err)


def test_output_into_a_closed_pipe_ends_quietly(audio, tmp_path):
    """`qwen2audio ... | head`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess

    command = [sys.executable, "-m", "qwen2audio.cli", "chat", "--audio", audio["wav"], "--prompt", "hi",
               "--no-interactive", "--max-new-tokens", "300", "--ignore-eos"]
    env = {**os.environ, "QWEN2AUDIO_DEFAULT_MODEL": "tiny-random", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(3)
    proc.stdout.close()  # as head does after its bytes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err


# -- bad input ------------------------------------------------------------------------------------------
def test_missing_model_dir(tmp_path, audio, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(tmp_path / "nowhere"), "--audio", audio["wav"]])
    assert rc == 2 and out == ""
    assert err.startswith("qwen2audio: error: ") and "nowhere" in err and "does not exist" in err


def test_directory_that_is_not_a_checkpoint(tmp_path, audio, capsys, monkeypatch):
    rc, _, err = cli(capsys, monkeypatch, ["chat", str(tmp_path), "--audio", audio["wav"]])
    assert rc == 2 and "config.json" in err


def test_checkpoint_without_tokenizer(model_dir, tmp_path, audio, capsys, monkeypatch):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    rc, _, err = cli(capsys, monkeypatch, ["chat", str(tmp_path), "--audio", audio["wav"]])
    assert rc == 2 and "tokenizer.json" in err


def test_corrupt_audio_file(model_dir, audio, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--audio", audio["corrupt"]])
    assert rc == 2 and out == ""
    assert audio["corrupt"] in err and "cannot decode" in err


def test_corrupt_audio_in_a_real_process_has_no_traceback(default_home, model_dir, audio):
    proc = run_module(["chat", str(model_dir), "--audio", audio["corrupt"]], default_home)
    stderr = proc.stderr.decode()
    assert proc.returncode == 2
    assert "Traceback" not in stderr
    assert stderr.startswith("qwen2audio: error: ") and audio["corrupt"] in stderr


def test_no_audio_and_no_prompt(model_dir, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir)])
    assert rc == 2 and out == ""
    assert "--audio" in err and "--prompt" in err


@pytest.mark.parametrize("argv,message", [
    (["chat", "--dtype", "float8", "--prompt", "x"], "invalid choice: 'float8'"),
    (["chat", "--prompt", "x", "--max-new-tokens", "many"], "invalid int value"),
    (["transcribe"], "required: FILE"),
    (["speak"], "invalid choice: 'speak'"),
])
def test_usage_errors(argv, message, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, argv)
    assert rc == 2 and out == ""
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value,message", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
])
def test_invalid_sampling_values(model_dir, flag, value, message, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--prompt", "x", flag, value])
    assert rc == 2 and out == ""
    assert err.startswith("qwen2audio: error: ") and message in err


def test_transcribe_with_a_missing_model_dir_says_so(tmp_path, audio, capsys, monkeypatch):
    """A mistyped MODEL_DIR is reported as such, not taken for an audio file of the default model."""
    rc, out, err = cli(capsys, monkeypatch, ["transcribe", str(tmp_path / "Qwen2-Audio-7B"), audio["wav"]])
    assert rc == 2 and out == ""
    assert "checkpoint directory" in err and "Qwen2-Audio-7B" in err and "does not exist" in err
    rc, _, err = cli(capsys, monkeypatch, ["chat", "Qwen/Qwen2-Audio-7B-Instruct", "--prompt", "x"])
    assert rc == 2 and "qwen2audio never downloads" in err, err  # a repository id: fetch it first


def test_escape_sequences_are_made_visible_on_a_terminal(monkeypatch):
    """A random or misbehaving model must not be able to send terminal control sequences."""
    from qwen2audio import cli as cli_module

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    cli_module._print_stream(["ok \x1b[2J", "\tline\r\n", "\x07end", " \x9b2J \x9d8;;u\x9c é"])
    # C1 controls too: \x9b is a one-character CSI, \x9d an OSC (some terminals act on them)
    assert screen.getvalue() == "ok \\x1b[2J\tline\\x0d\n\\x07end \\x9b2J \\x9d8;;u\\x9c é\n"


def test_transcripts_on_a_terminal_make_control_characters_visible(monkeypatch):
    """`transcribe` prints model text too: the same escaping as `chat` (piped output stays raw)."""
    import argparse

    from qwen2audio import cli as cli_module

    from qwen2audio.text.transcripts import Segment, Transcript

    class Model:
        def transcript(self, path, language, translate_to, on_segment=None, **sampling):
            segments = [Segment(0.0, 1.0, "ok \x1b[2J\x07end"), Segment(1.0, 2.0, "很好"), Segment(2.0, 3.0, "然后"),
                        Segment(3.0, 4.0, "")]
            for segment in segments if on_segment else ():
                on_segment(segment)
            return Transcript(segments, 1.0)

    args = argparse.Namespace(files=["a.wav"], language="en", format="text", output_dir=None, temperature=None,
                              fallback=False, translate_to=None)
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    assert cli_module._transcribe(Model(), args, {}) == 0
    assert screen.getvalue() == "ok \\x1b[2J\\x07end很好然后\n"  # no space beside Chinese (as full_text)
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    cli_module._transcribe(Model(), args, {})
    assert piped.getvalue() == "ok \x1b[2J\x07end很好然后\n"
    args.format = "srt"  # subtitles too
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    cli_module._transcribe(Model(), args, {})
    assert screen.getvalue() == ("1\n00:00:00,000 --> 00:00:01,000\nok \\x1b[2J\\x07end\n\n"
                                 "2\n00:00:01,000 --> 00:00:02,000\n很好\n\n3\n00:00:02,000 --> 00:00:03,000\n然后\n\n")


class Terminal(io.StringIO):
    def isatty(self):
        return True


# -- interactive chat -------------------------------------------------------------------------------------
def converse(api, first: dict, turns: list[dict]) -> str:
    """What the CLI should print: the replies of an API conversation, one line each."""
    conv = api["default"].conversation()
    replies = ["".join(conv.stream(**first, max_new_tokens=int(NEW)))]
    replies += ["".join(conv.stream(**turn, max_new_tokens=int(NEW))) for turn in turns]
    return "".join(r + "\n" for r in replies)


def test_a_mistyped_audio_path_is_reported_and_the_conversation_goes_on(api, audio, tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "typo.wav")
    stdin = f"/audio {missing} What is it?\nTell me more.\n"
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", "Hi.", "--interactive", "--max-new-tokens", NEW], stdin)
    assert rc == 0, err
    assert missing in err and "does not exist" in err and "conversation goes on" in err
    assert "Traceback" not in err
    # the bad turn was never sent: the next turn follows the first reply directly
    assert out == converse(api, dict(text="Hi."), [dict(text="Tell me more.")])


def test_a_quoted_audio_path_with_spaces(api, audio, tmp_path, capsys, monkeypatch):
    spaced = tmp_path / "my recording.wav"
    spaced.write_bytes(open(audio["wav"], "rb").read())
    stdin = f'/audio "{spaced}" what\'s this?\n'
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", "Hi.", "--interactive", "--max-new-tokens", NEW], stdin)
    assert rc == 0, err
    assert out == converse(api, dict(text="Hi."), [dict(text="what's this?", audio=[str(spaced)])])


def test_help_lists_the_commands_and_an_unknown_command_is_not_sent(api, capsys, monkeypatch):
    stdin = "/help\n/adio clip.wav\n/audio\n/audio \"unclosed.wav\n"
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", "Hi.", "--interactive", "--max-new-tokens", NEW], stdin)
    assert rc == 0, err
    assert "/audio PATH [TEXT]" in err and "/help" in err and "Ctrl-D" in err
    assert "unknown command /adio" in err
    assert "/audio needs a file" in err and "no closing quotation" in err
    assert out == converse(api, dict(text="Hi."), [])  # nothing but the first reply


def test_new_starts_a_new_conversation_keeping_the_system_prompt(api, capsys, monkeypatch):
    stdin = "Tell me more.\n/new\nWhat did I say?\n"
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", "Hi.", "--system", "Be brief.", "--interactive",
                                             "--max-new-tokens", NEW], stdin)
    assert rc == 0, err
    conv = api["default"].conversation(system="Be brief.")
    first = ["".join(conv.stream(text, max_new_tokens=int(NEW))) for text in ("Hi.", "Tell me more.")]
    fresh = "".join(api["default"].conversation(system="Be brief.").stream("What did I say?",
                                                                          max_new_tokens=int(NEW)))
    assert out == "".join(r + "\n" for r in first + [fresh]) and "a new conversation" in err


def test_a_history_too_long_for_the_context_points_at_new(api, capsys, monkeypatch):
    long_turn = "word " * 900
    stdin = f"{long_turn}\n{long_turn}\n"
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", long_turn, "--interactive", "--max-new-tokens", NEW],
                       stdin)
    assert rc == 0, err
    assert "/new starts a new conversation" in err and "Traceback" not in err


def test_end_of_input_on_a_terminal_leaves_a_clean_line(api, capsys, monkeypatch):
    """Ctrl-D at the `you> ` prompt: a newline on stderr (the shell prompt starts on its own line), exit 0."""
    monkeypatch.setattr(sys, "stdin", Terminal("Tell me more.\n"))
    rc = main(["chat", "--prompt", "Hi.", "--max-new-tokens", NEW])  # a terminal: interactive by default
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err.endswith("you> you> \n")
    assert out == converse(api, dict(text="Hi."), [dict(text="Tell me more.")])


@pytest.mark.parametrize("line,turn", [
    ("plain text\n", ("plain text", [])),
    ('/audio "my file.wav" what\'s this?\n', ("what's this?", ["my file.wav"])),
    ("/audio 'a b.flac'\n", ("", ["a b.flac"])),
    ("/audio clip.wav  Describe it.  \n", ("Describe it.", ["clip.wav"])),
    ("/help\n", None),
])
def test_parse_turn(line, turn):
    from qwen2audio.cli import parse_turn

    assert parse_turn(line) == turn


# -- devices and misplaced arguments ------------------------------------------------------------------------
def test_a_device_that_is_not_one(capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", "x", "--device", "banana"])
    assert rc == 2 and out == ""
    assert err == "qwen2audio: error: --device banana: not a torch device; use cpu, cuda, cuda:N or mps\n"


def test_cuda_on_a_pytorch_without_cuda(capsys, monkeypatch):
    """Checked before loading: no default-model notice, one line, exit 2."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    rc, out, err = cli(capsys, monkeypatch, ["chat", "--prompt", "x", "--device", "cuda"])
    assert rc == 2 and out == ""
    assert err == (f"qwen2audio: error: --device cuda: this PyTorch build has no CUDA support (torch "
                   f"{torch.__version__}); install a CUDA build of PyTorch, see README\n")


def test_cuda_without_a_visible_gpu(audio, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    rc, _, err = cli(capsys, monkeypatch, ["transcribe", audio["wav"], "--device", "cuda:0"])
    assert rc == 2 and err.startswith("qwen2audio: error: --device cuda:0: no CUDA GPU is visible")


def test_the_api_checks_the_device_too():
    with pytest.raises(ValueError, match="device 'banana': not a torch device"):
        Qwen2Audio.load(device="banana")


def test_an_audio_file_where_the_model_directory_goes(audio, capsys, monkeypatch):
    rc, out, err = cli(capsys, monkeypatch, ["chat", audio["wav"]])
    assert rc == 2 and out == ""
    assert err == f"qwen2audio: error: {audio['wav']} is an audio file, not a model directory: use --audio {audio['wav']}\n"


# -- the context limit ------------------------------------------------------------------------------------
def test_max_new_tokens_beyond_the_context_warns_and_names_the_cap(model_dir, tmp_path, capsys, monkeypatch):
    """75 s of audio is 1875 of the test model's 2048 positions: fewer new tokens than asked fit."""
    long = tmp_path / "long.wav"
    soundfile.write(long, clip(75.0, 4), 16000, subtype="PCM_16")
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--audio", str(long), "--json",
                                             "--max-new-tokens", "5000"])
    assert rc == 0, err
    got = json.loads(out)
    room = 2048 - got["prompt_tokens"]
    assert err == (f"qwen2audio: warning: max_new_tokens 5000 does not fit: the prompt takes {got['prompt_tokens']} "
                   f"of the model's 2048 positions, so at most {room} new tokens\n")
    assert got["completion_tokens"] <= room


# -- startup ---------------------------------------------------------------------------------------------
def test_the_parser_is_built_without_torch():
    """`qwen2audio --help` must not pay for importing torch (about a second)."""
    code = ("import sys, qwen2audio, qwen2audio.cli; qwen2audio.cli.build_parser(); "
            "from qwen2audio import AudioError, CheckpointError; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# What printing help may not import: torch, numpy and the model libraries (about a second between them), the
# server, and the tokenizer and chat template with what they pull in (tokenizers, urllib.request's http/ssl).
NOT_FOR_HELP = ("torch", "numpy", "transformers", "tokenizers", "safetensors", "soundfile", "fastapi", "uvicorn",
                "urllib.request", "qwen2audio.api", "qwen2audio.text.chat", "qwen2audio.text.tokenizer")


def test_help_imports_only_what_it_prints():
    """`qwen2audio --help` and `qwen2audio COMMAND --help` import no model, server or tokenizer code."""
    code = ("import sys, contextlib, io; from qwen2audio.cli import main\n"
            "for argv in sys.argv[1:]:\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(argv.split())\n"
            "    print(argv, sorted(m for m in %r if m in sys.modules))\n" % (NOT_FOR_HELP,))
    commands = ["--help", "--version", "chat --help", "transcribe --help", "eval --help", "train --help",
                "train sft --help", "init --help", "serve --help"]
    proc = subprocess.run([sys.executable, "-c", code, *commands], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{argv} []" for argv in commands]


def test_version_and_eval_threads(capsys, monkeypatch):
    import qwen2audio
    import torch

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"qwen2audio {qwen2audio.__version__}\n"
    before = torch.get_num_threads()
    try:  # --threads is applied before the command runs (here: eval stops at its missing data)
        torch.set_num_threads(3)
        rc, _, err = cli(capsys, monkeypatch, ["eval", "--task", "librispeech", "--data", "/nonexistent", "--threads", "2"])
        assert rc == 2 and torch.get_num_threads() == 2, err
    finally:
        torch.set_num_threads(before)


def test_the_package_still_offers_the_model_classes():
    import qwen2audio
    from qwen2audio.api import Conversation
    from qwen2audio.generation.sampling import SamplingParams

    assert qwen2audio.Qwen2Audio is Qwen2Audio and qwen2audio.Conversation is Conversation
    assert qwen2audio.SamplingParams is SamplingParams
    assert {"Qwen2Audio", "Conversation", "SamplingParams", "AudioError"} <= set(dir(qwen2audio))
    with pytest.raises(AttributeError):
        qwen2audio.NoSuchThing  # noqa: B018


def test_the_top_level_help_describes_every_command():
    from qwen2audio.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"chat", "transcribe", "eval", "train", "init"}
    lines = parser.description.splitlines()
    for name in commands:
        described = [line for line in lines if line.strip().startswith(f"qwen2audio {name} ")]
        assert len(described) == 1, f"`qwen2audio {name}` is not described in one line of the top-level help"


def test_only_our_own_warnings_are_shortened(capsys):
    """One 'qwen2audio: warning:' line for ours; a library's warning keeps Python's form (it names its source)."""
    from qwen2audio import cli as cli_module

    shown = []
    ours = str(cli_module.PACKAGE_DIR / "generation" / "engine.py")
    cli_module._show_warning(lambda *a: shown.append(a), UserWarning("capped"), UserWarning, ours, 1)
    cli_module._show_warning(lambda *a: shown.append(a), UserWarning("deprecated"), UserWarning, "/lib/torch/x.py", 7)
    assert capsys.readouterr().err == "qwen2audio: warning: capped\n"
    assert [(str(a[0]), a[2], a[3]) for a in shown] == [("deprecated", "/lib/torch/x.py", 7)]


def test_threads_sets_torch_threads_and_refuses_zero(model_dir, capsys, monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        rc, out, _ = cli(capsys, monkeypatch, ["chat", str(model_dir), "--prompt", "x", "--max-new-tokens", "2",
                                               "--threads", "1"])
        assert rc == 0 and out and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--prompt", "x", "--threads", "0"])
    assert rc == 2 and out == "" and "--threads must be at least 1, got 0" in err


def test_a_loud_file_is_warned_about_once(tmp_path, capsys, monkeypatch):
    """The file's samples are decoded once: the warning names the file, and no second one names an array."""
    loud = tmp_path / "loud.wav"
    soundfile.write(loud, 20000.0 * clip(1.0, 1), 16000, subtype="FLOAT")
    for argv in (["chat", "--audio", str(loud), "--prompt", "hi", "--no-interactive"], ["transcribe", str(loud)]):
        rc, _, err = cli(capsys, monkeypatch, argv + ["--max-new-tokens", "2"])
        assert rc == 0 and err.count("float samples reach") == 1 and "<array>" not in err, err


def test_api_misuse_is_named(api, audio, tmp_path):
    model = api["default"]
    with pytest.raises(ValueError, match="language must be a language code such as 'en'"):
        model.transcribe(audio["wav"], language=None)
    with pytest.raises(FileNotFoundError, match="is a file; a checkpoint is a directory"):
        Qwen2Audio.load(audio["wav"])
    one = model.complete("Describe.", audio["wav"], max_new_tokens=3)  # one clip given alone is one clip
    assert one.token_ids == model.complete("Describe.", [audio["wav"]], max_new_tokens=3).token_ids
    messages = [{"role": "user", "content": "hi"}]
    # other libraries' names for a setting, and a mistyped one: named, with ours suggested
    with pytest.raises(TypeError, match=r"chat\(\) got an unknown setting 'max_tokens' \(did you mean max_new_tokens\?\)"):
        model.chat(messages, max_tokens=2)
    with pytest.raises(TypeError, match=r"complete\(\) got an unknown setting 'max_length' \(did you mean max_new"):
        model.complete("Describe.", audio["wav"], max_length=2)
    with pytest.raises(TypeError, match=r"transcript\(\) got an unknown setting 'temprature' \(did you mean temperature"):
        model.transcribe(audio["wav"], temprature=0.5)
    # transcribe(audio, "en", 2) meant 2 new tokens: the third argument is fallback, which is a yes or no
    with pytest.raises(TypeError, match="fallback must be True, False or None .* got 2"):
        model.transcribe(audio["wav"], "en", 2)
    with pytest.raises(ValueError, match="one clip at a time: got 2 paths in a list; call it once per file"):
        model.transcribe([audio["wav"], audio["wav"]])
    with pytest.raises(TypeError, match="on_segment must be a function"):
        model.transcript(audio["wav"], on_segment=5)
    # an array at another rate in a chat: as a (samples, rate) pair or with a sample_rate key, as transcribe takes
    # it (the key was ignored: 8 kHz heard as 16 kHz); beside a file it is refused (the file says its own rate)
    from qwen2audio.audio import load_audio

    slow = load_audio(audio["wav"])[::2].copy()  # 8 kHz samples
    heard = model.chat([{"role": "user", "content": [{"type": "audio", "audio": load_audio(slow, sample_rate=8000)}]}],
                       max_new_tokens=4).token_ids
    for part in ({"type": "audio", "audio": (slow, 8000)}, {"type": "audio", "audio": slow, "sample_rate": 8000}):
        assert model.chat([{"role": "user", "content": [part]}], max_new_tokens=4).token_ids == heard
    with pytest.raises(ValueError, match="'sample_rate' is only for an array of samples"):
        model.chat([{"role": "user", "content": [{"type": "audio", "audio": audio["wav"], "sample_rate": 8000}]}])
    with pytest.raises(ValueError, match=r"conversations\[1\]: messages\[0\]\['content'\] must be a str"):
        model.chat_batch([messages, [{"role": "user", "content": 5}]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"chat_batch takes a list of conversations.*wrap it in a list"):
        model.chat_batch(messages, max_new_tokens=2)
    for stop, said in ((5, "stop must be a string or a list of strings, got int"),
                       ({"a": 1}, "stop must be a string or a list of strings, got dict"),
                       (["a", None], "stop strings must be text, got None"), ([""], "stop strings must be non-empty")):
        with pytest.raises(ValueError, match=re.escape(said)):
            model.chat(messages, stop=stop, max_new_tokens=2)


def test_an_empty_system_prompt_is_one(api):
    """The official template renders an explicit empty system message (its only way to drop the default "You
    are a helpful assistant."); an empty --system / conversation(system="") gave the default instead."""
    from qwen2audio.text import render_chat

    model = api["default"]
    conv = model.conversation(system="")
    assert conv.messages == [{"role": "system", "content": ""}]
    reply = conv.say("Hi.", max_new_tokens=2)
    turn = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi."}]
    assert render_chat(turn).text.startswith("<|im_start|>system\n<|im_end|>\n")
    assert reply.token_ids == model.chat(turn, max_new_tokens=2).token_ids
    assert reply.prompt_tokens == model.chat(turn, max_new_tokens=2).prompt_tokens
    assert model.conversation().messages == []  # None: the template's default


def test_a_text_transcript_is_one_line_per_file_whatever_its_segments_hold():
    """A line break inside a segment's text broke "one line per file, after its name"."""
    from qwen2audio.cli import _LiveTranscript
    from qwen2audio.text.transcripts import Segment

    parts: list[str] = []
    writer = _LiveTranscript("text", parts.append, "f1.wav\t")
    for i, text in enumerate(("one", "two\nlines", "three")):
        writer.segment(Segment(float(i), i + 1.0, text, [1]))
    writer.finish()
    assert "".join(parts) == "f1.wav\tone two lines three\n"


@pytest.mark.parametrize("command", [["eval", "--task", "jsonl"], ["chat", "--prompt", "x"], ["transcribe"]])
def test_devices_are_checked_in_eval_too_and_int8_off_the_cpu_is_told_by_its_flags(command, audio, tmp_path, capsys,
                                                                                 monkeypatch):
    """eval never checked --device (a traceback, exit 1, after its items were read); int8 on a GPU was told
    in the Python API's words (quantize='int8', device='cpu')."""
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"audio": audio["wav"], "prompt": "Transcribe:", "reference": "hello",
                                "metric": "wer:en"}) + "\n")
    argv = command + (["--data", str(data), "--out", str(tmp_path / "out")] if command[0] == "eval" else
                      [audio["wav"]] if command[0] == "transcribe" else [])
    rc, out, err = cli(capsys, monkeypatch, argv + ["--device", "foo"])
    assert rc == 2 and err.endswith("--device foo: not a torch device; use cpu, cuda, cuda:N or mps\n"), err
    monkeypatch.setattr("qwen2audio.api.device_problem", lambda device: None)  # as if a GPU were here
    rc, out, err = cli(capsys, monkeypatch, argv + ["--device", "cuda", "--quantize", "int8"])
    assert rc == 2 and err.endswith("--quantize int8 runs on CPU only (its kernel is a CPU one), not --device cuda: "
                                    "drop --quantize or use --device cpu\n"), err


def test_the_api_tells_a_device_that_is_not_one_before_int8():
    with pytest.raises(ValueError, match="device 'gpu': not a torch device"):
        Qwen2Audio.load(device="gpu", quantize="int8")
