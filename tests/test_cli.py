"""`qwen2audio chat` and `qwen2audio transcribe` end to end, on the embedded default model and on a
saved checkpoint directory: what they print equals what the Python API returns, and bad input exits
with status 2 and one clear line on stderr, never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import soundfile
import torch

from qwen2audio import Qwen2Audio
from qwen2audio.cli import main
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
    assert got == {"text": expected.text, "token_ids": expected.token_ids}
    assert len(expected.token_ids) >= 8


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


def test_not_interactive_when_stdin_is_not_a_terminal(api, model_dir, capsys, monkeypatch):
    """Without --interactive, piped stdin is not read as further turns: one answer, then exit."""
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(model_dir), "--prompt", "Hi.", "--max-new-tokens", NEW],
                       stdin="this line is not a turn\n")
    assert rc == 0, err
    assert out == api["saved"].chat(user_turn([], "Hi."), max_new_tokens=int(NEW)).text + "\n"


# -- transcribe ---------------------------------------------------------------------------------------
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
    ("--top-p", "0", "top_p"),
    ("--max-new-tokens", "0", "max_new_tokens"),
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


def test_escape_sequences_are_made_visible_on_a_terminal(monkeypatch):
    """A random or misbehaving model must not be able to send terminal control sequences."""
    import io

    from qwen2audio import cli as cli_module

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    cli_module._print_stream(["ok \x1b[2J", "\tline\r\n", "\x07end"])
    assert screen.getvalue() == "ok \\x1b[2J\tline\\x0d\n\\x07end\n"
