"""`qwen2audio serve` as a command: its help stays light, bad flags and a busy port are one line and
exit status 2, and the real process serves the default model and stops cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from qwen2audio.cli import main
from qwen2audio.serve import cli as serve_cli

REPO = Path(__file__).resolve().parents[1]
START_SECONDS = 180  # importing torch and loading the model, on a busy machine
STOP_SECONDS = 60
LONG = 4000  # tokens: a reply still running when the server is told to stop
LISTENING = re.compile(r"serving (\S+) on (http://\S+)/v1")


def test_help_lists_the_flags_and_imports_no_server_or_model_code():
    code = ("import sys; from qwen2audio.cli import build_parser; p = build_parser(); "
            "p.parse_args(['serve', '--port', '1']); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-body-mb", "--max-audio-seconds", "--max-tokens",
                 "--max-batch", "--max-queue", "--cors-origin", "--allow-audio-url-host", "--allow-local-audio",
                 "--shutdown-timeout", "--num-beams", "--fallback", "--chunk-seconds", "--cut-at-pauses",
                 "QWEN2AUDIO_API_KEY", "127.0.0.1"):
        assert flag in help_text


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(serve_cli.SERVE_MODULES, "a_module_that_is_not_installed", "fastapi")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("qwen2audio: error: qwen2audio serve needs fastapi, which is not installed; install the serve "
                   "extra: pip install -c constraints.txt -e '.[serve]' (in the qwen2audio checkout)")


@pytest.mark.parametrize("args, message", [
    (["--max-queue", "0"], "--max-queue must be more than 0"),
    (["--max-batch", "0"], "--max-batch must be more than 0"),
    (["--max-body-mb", "-1"], "--max-body-mb must be more than 0"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--max-batch", "4", "--num-beams", "5"], "--num-beams must be between 1 and --max-batch (4"),
    (["--num-beams", "0"], "--num-beams must be between 1"),
    (["--chunk-seconds", "45"], "--chunk-seconds: chunk_seconds must be between 1 and 30"),
    (["--cut-at-pauses", "9"], "--cut-at-pauses: cut_at_pauses must be between 0.05 and 5 seconds"),
    (["--allow-audio-url-host", "http://example.com"], "--allow-audio-url-host 'http://example.com'"),
    (["--allow-local-audio", "/no/such/folder"], "--allow-local-audio /no/such/folder: not a directory"),
    (["/no/such/checkpoint"], "checkpoint directory /no/such/checkpoint does not exist"),
])
def test_bad_flags_are_one_line(args, message, capsys):
    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2audio: error: ") and message in err and err.count("\n") == 1


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2audio: error: cannot listen on 127.0.0.1:{port}") and "--port" in err


@pytest.mark.parametrize("host", ["999.1.1.1", "not.a.host.invalid"])
def test_a_host_that_does_not_resolve_says_what_to_give(capsys, host):
    assert main(["serve", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"--host {host}: " in err and "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface)" in err


def test_an_address_not_of_this_machine_is_blamed_on_host_not_port(capsys):
    assert main(["serve", "--host", "192.0.2.1", "--port", "0"]) == 2  # TEST-NET-1: no machine's own address
    err = capsys.readouterr().err
    assert err.startswith("qwen2audio: error: cannot listen on 192.0.2.1:0: ") and err.count("\n") == 1
    assert "--host must be an address of this machine" in err and "--port" not in err


def read_until(process: subprocess.Popen, pattern: re.Pattern, seconds: float) -> tuple[re.Match, str]:
    seen = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            seen += line
            if match := pattern.search(line):
                return match, seen
    raise AssertionError(f"the server did not print {pattern.pattern!r}; it printed:\n{seen}")


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []

    def read() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                          timeout=STOP_SECONDS) as response:
            lines.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines


def test_the_command_serves_the_default_model_and_stops_on_sigterm(default_home):
    """SIGTERM with a stream in flight: the port closes, the stream goes on for --shutdown-timeout, then
    ends with finish_reason "abort" and [DONE]; the process exits without a traceback. (Served with
    weight-only int8, so that the server's --quantize path runs end to end too.)"""
    openai = pytest.importorskip("openai")
    command = [sys.executable, "-m", "qwen2audio.cli", "serve", "--port", "0", "--max-tokens", str(LONG),
               "--served-model-name", "tiny", "--shutdown-timeout", "0.5", "--quantize", "int8"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "QWEN2AUDIO_API_KEY": "k"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    try:
        match, _ = read_until(process, LISTENING, START_SECONDS)
        assert match.group(1) == "tiny"
        url = match.group(2)
        deadline = time.monotonic() + START_SECONDS
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline and process.poll() is None, "the model did not load"
            time.sleep(0.2)
        assert httpx.get(url + "/").headers["content-type"].startswith("text/html")  # the web page
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.usage.completion_tokens <= 4
        thread, lines = stream_in_background(url, {"model": "tiny", "max_tokens": LONG, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
        deadline = time.monotonic() + START_SECONDS
        while len(lines) < 3:
            assert time.monotonic() < deadline and thread.is_alive(), lines
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        thread.join(STOP_SECONDS)
        process.wait(STOP_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert process.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises the signal once it is done
    assert "Traceback" not in stderr and "Shutting down" in stderr
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"


def test_transcription_flags_reach_the_settings():
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--chunk-seconds", "8", "--cut-at-pauses", "0.3", "--num-beams", "2",
                              "--fallback"])
    settings = serve_cli.settings_from(args)
    assert (settings.chunk_seconds, settings.cut_at_pauses, settings.num_beams, settings.fallback) == (8.0, 0.3, 2, True)
    assert serve_cli.settings_from(parser.parse_args(["serve"])).cut_at_pauses is None


def test_the_served_name_is_the_adapters_where_there_is_one(tmp_path):
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    base, adapter = tmp_path / "Qwen2-Audio-7B-Instruct", tmp_path / "my-lora"
    assert serve_cli.model_id(parser.parse_args(["serve", str(base)])) == "Qwen2-Audio-7B-Instruct"
    assert serve_cli.model_id(parser.parse_args(["serve", str(base), "--adapter", str(adapter)])) == "my-lora"
    assert serve_cli.model_id(parser.parse_args(["serve", str(adapter)])) == "my-lora"  # the adapter folder alone
    named = parser.parse_args(["serve", str(base), "--adapter", str(adapter), "--served-model-name", "x"])
    assert serve_cli.model_id(named) == "x"
