"""The web page of `qwen2audio serve`, in a real browser: Debian's Chromium driven by Playwright.

The page uploads a file and streams the answer, records from Chromium's fake microphone (fed from a wav
file with --use-file-for-fake-audio-capture), stops an answer, and says what went wrong (server busy,
file too long, microphone refused). With the tiny random model, its greedy answer equals the API's.

Without Chromium (or the playwright package) the browser tests skip, unless QWEN2AUDIO_REQUIRE_BROWSER
is set (CI sets it: there a missing browser is a failure, not a skip).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tomllib
import warnings
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import soundfile

from qwen2audio.serve import page
from serve_helpers import FakeBackend, b64, fake_app, running, serving, wait_until, wav_bytes

ROOT = Path(__file__).resolve().parents[1]
TONE_HZ = 440.0
ANSWER = ["The ", "sound ", "is ", "a ", "steady ", "tone."]
WAIT_MS = 30_000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = bool(os.environ.get("QWEN2AUDIO_REQUIRE_BROWSER"))
# What a sandboxed machine without a network needs: no sandbox (root), no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


# -- without a browser --------------------------------------------------------------------------------------
def test_page_and_its_files_are_served_with_a_strict_policy():
    app, _ = fake_app(FakeBackend())
    with running(app) as url:
        index = httpx.get(url + "/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in index.headers["content-security-policy"]
        assert index.headers["x-content-type-options"] == "nosniff"
        for name in ("app.js", "style.css", "recorder-worklet.js", "icon.svg"):
            assert httpx.get(f"{url}/web/{name}").status_code == 200, name
        assert "javascript" in httpx.get(url + "/web/app.js").headers["content-type"]
        for path in ("/web/nothing.js", "/web/..%2fapp.py", "/web/%2e%2e/page.py"):
            missing = httpx.get(url + path)
            assert missing.status_code == 404 and "error" in missing.json(), path


def test_page_loads_nothing_from_another_site():
    """No CDN: no script, style sheet, font or request that leaves the server."""
    external = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|"""
                          r"""fetch\(\s*["'`](?:https?:)?//|import\s[^;]*from\s*["'](?:https?:)?//""")
    for path in page.WEB_DIR.iterdir():
        assert not external.search(path.read_text()), path.name


def test_every_page_file_ships_in_the_package():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["qwen2audio.serve"]
    for path in page.WEB_DIR.iterdir():
        assert any(path.match(pattern) for pattern in shipped), f"{path.name} is not in the package data"


def test_web_config_gives_the_limits_and_the_checkpoint_defaults():
    backend = FakeBackend(model_id="m")
    backend.chat_defaults = {"temperature": 0.7, "top_p": 0.5, "top_k": 20, "max_new_tokens": 64}
    app, _ = fake_app(backend, max_tokens=100, max_seconds=30.0, api_key="k", max_body_bytes=4 << 20)
    with running(app) as url:
        config = httpx.get(url + "/web/config").json()  # no key needed: the page itself asks for it
    assert config == {"model": "m", "max_audio_seconds": 30.0, "max_body_bytes": 4 << 20, "max_tokens": 100,
                      "api_key_required": True,
                      "defaults": {"temperature": 0.7, "top_p": 0.5, "top_k": 20, "repetition_penalty": None,
                                   "num_beams": None, "max_tokens": 64}}


def test_no_web_serves_the_api_only():
    app, _ = fake_app(FakeBackend(), web=False)
    with running(app) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/web/app.js").status_code == 404
        assert httpx.get(url + "/health").status_code == 200


def test_no_web_flag_reaches_the_settings():
    from qwen2audio.cli import build_parser
    from qwen2audio.serve.cli import settings_from

    assert settings_from(build_parser().parse_args(["serve"])).web is True
    assert settings_from(build_parser().parse_args(["serve", "--no-web"])).web is False


# -- in Chromium ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tone_wav(tmp_path_factory) -> Path:
    """What the fake microphone hears: a 440 Hz tone."""
    path = tmp_path_factory.mktemp("mic") / "tone.wav"
    t = np.arange(48000) / 48000
    soundfile.write(path, (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32), 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def playwright():
    if CHROMIUM is None and not REQUIRE_BROWSER:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    if REQUIRE_BROWSER:
        assert CHROMIUM is not None, "QWEN2AUDIO_REQUIRE_BROWSER is set but chromium is not installed"
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, tone_wav):
    """Chromium whose microphone is the tone file, granted without asking."""
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + [
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={tone_wav}"])
    yield b
    b.close()


@contextlib.contextmanager
def served_page(browser, backend, **settings) -> Iterator:
    """The page, open in ``browser``, of a server over ``backend`` with these settings (``fake_app``)."""
    app, _ = fake_app(backend, **settings)
    with running(app) as url:
        yield open_page(browser, url)


def open_page(browser, url: str, **context):
    # bypass_csp: Playwright's own waiting code evaluates strings, which the page's policy forbids
    page_ = browser.new_context(bypass_csp=True, **context).new_page()
    errors: list[str] = []
    page_.on("pageerror", lambda err: errors.append(str(err)))
    page_.goto(url + "/")
    page_.wait_for_selector("#status.ok", timeout=WAIT_MS)
    page_.errors = errors
    return page_


def answers(page_) -> list[str]:
    return page_.locator(".turn.assistant .bubble").all_inner_texts()


def wait_answers(page_, n: int) -> None:
    page_.wait_for_function(f"document.querySelectorAll('.turn.assistant .meta').length >= {n}", timeout=WAIT_MS)


def sent_audio(request) -> list[np.ndarray]:
    return [part["audio"] for message in request[1] if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "audio"]


def sent_text(request) -> list[str]:
    return [part["text"] for message in request[1] if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "text"]


def test_upload_a_file_ask_about_it_and_the_answer_streams_in(browser, tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(2.0, seed=3))
    backend = FakeBackend(words=ANSWER, delay=0.25)
    with served_page(browser, backend) as page_:
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#attachment:not([hidden])")
        page_.fill("#text", "What is this sound?")
        page_.click("#send")
        # streamed: the first words are on the page while the answer is still coming (Stop shown)
        page_.wait_for_function("document.querySelector('.turn.assistant .bubble').textContent.startsWith('The ')",
                                timeout=WAIT_MS)
        partial = answers(page_)[0]
        assert page_.is_visible("#stop") and partial != "".join(ANSWER)
        wait_answers(page_, 1)
        assert answers(page_) == ["".join(ANSWER)]
        assert page_.is_visible("#send") and not page_.is_visible("#stop")
        assert "6 tokens" in page_.inner_text(".turn.assistant .meta")
        assert page_.locator(".turn.user audio").count() == 1  # the clip can be played back
        assert page_.input_value("#text") == "" and page_.is_hidden("#attachment")
        # a second turn carries the whole conversation
        page_.fill("#text", "And how long is it?")
        page_.keyboard.press("Enter")
        wait_answers(page_, 2)
        assert page_.errors == []
    first, second = backend.requests
    expected, _ = soundfile.read(clip, dtype="float32")
    (heard,) = sent_audio(first)
    np.testing.assert_array_equal(heard, expected)  # the file's own bytes: nothing re-encoded
    assert sent_text(first) == ["What is this sound?"]
    assert [m["role"] for m in second[1]] == ["user", "assistant", "user"]
    assert second[1][1]["content"] == "".join(ANSWER)
    assert sent_text(second) == ["What is this sound?", "And how long is it?"]


def test_a_file_dropped_on_the_page_is_attached(browser):
    backend = FakeBackend(words=ANSWER)
    app, _ = fake_app(backend)
    data = wav_bytes(1.0, seed=4)
    with running(app) as url:
        page_ = open_page(browser, url)
        page_.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.wav", {type: "audio/wav"}));
            for (const type of ["dragenter", "dragover", "drop"]) {
              document.body.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }
        }""", b64(data))
        page_.wait_for_selector("#attachment:not([hidden])", timeout=WAIT_MS)
        assert "dropped.wav" in page_.inner_text("#attachment-name") and page_.is_hidden("#drop")
        page_.click("#send")  # audio alone: the question may be in the audio
        wait_answers(page_, 1)
    (request,) = backend.requests
    (heard,) = sent_audio(request)
    np.testing.assert_array_equal(heard, soundfile.read(io.BytesIO(data), dtype="float32")[0])
    assert sent_text(request) == []


def dominant_hz(wave: np.ndarray, sr: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spectrum.argmax()])


def record_a_second(page_) -> None:
    page_.click("#mic")
    page_.wait_for_selector("#recording:not([hidden])")
    page_.wait_for_function("document.querySelector('#recording-time').textContent === '0:01'", timeout=WAIT_MS)


def record_a_second_and_keep_it(page_) -> None:
    """Record, then Keep: the recording stops and stays attached, sent nowhere."""
    record_a_second(page_)
    page_.click("#recording-keep")
    page_.wait_for_selector("#attachment:not([hidden])")


def test_microphone_recording_is_the_turn(browser):
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        record_a_second(page_)
        page_.click("#mic")  # stop: the recording is sent at once, with no typed text
        wait_answers(page_, 1)
        assert page_.locator(".turn.user audio").count() == 1
        assert page_.errors == []
    (request,) = backend.requests
    (heard,) = sent_audio(request)
    assert sent_text(request) == []
    assert 0.5 <= len(heard) / 16000 <= 5.0
    assert np.abs(heard).max() > 0.2  # the tone, not silence
    assert abs(dominant_hz(heard) - TONE_HZ) < 10


def test_a_question_spoken_about_an_attached_file_sends_both(browser, tmp_path):
    """Upload a file, then ask about it aloud: the turn is the file, then the recording (the recording replaced
    the file, which was never sent), and the next turn carries both again."""
    clip = tmp_path / "sound.wav"
    clip.write_bytes(wav_bytes(2.0, seed=3))
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#attachment:not([hidden])")
        record_a_second(page_)
        page_.click("#mic")
        wait_answers(page_, 1)
        assert page_.locator(".turn.user audio").count() == 2 and page_.is_hidden("#attachment")
        page_.fill("#text", "Are you sure?")
        page_.click("#send")
        wait_answers(page_, 2)
        assert page_.errors == []
    first, second = backend.requests
    sound, question = sent_audio(first)
    np.testing.assert_array_equal(sound, soundfile.read(clip, dtype="float32")[0])
    assert abs(dominant_hz(question) - TONE_HZ) < 10 and sent_text(first) == []
    assert [len(a) for a in sent_audio(second)] == [len(sound), len(question)]


def test_keep_attaches_the_recording_to_ask_about_it(browser):
    """Keep stops the recording without sending it: it is attached, like an uploaded file, and goes with the
    question typed next."""
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        record_a_second_and_keep_it(page_)
        assert page_.is_hidden("#recording") and page_.text_content("#attachment-name").startswith("recording")
        assert page_.locator(".turn").count() == 0 and backend.requests == []
        page_.fill("#text", "What is this tone?")
        page_.click("#send")
        wait_answers(page_, 1)
        assert page_.errors == []
    (request,) = backend.requests
    assert sent_text(request) == ["What is this tone?"]
    (heard,) = sent_audio(request)
    assert 0.5 <= len(heard) / 16000 <= 5.0 and abs(dominant_hz(heard) - TONE_HZ) < 10


def test_a_recording_that_reaches_the_limit_is_sent_not_thrown_away(browser):
    """The recorder's last block runs a few samples past the limit: the recording ends at the limit and goes."""
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend, max_seconds=1.0) as page_:
        page_.click("#mic")  # not pressed again: the limit stops it
        wait_answers(page_, 1)
        assert page_.is_hidden("#error") and page_.errors == []
    (heard,) = sent_audio(backend.requests[0])
    assert 0.9 <= len(heard) / 16000 <= 1.0


# Every stream the page opens, to see that each is closed in the end (the browser's recording light goes off).
COUNT_MICROPHONES = """(() => {
  window.microphones = [];
  const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const stream = await open(constraints);
    window.microphones.push(stream);
    return stream;
  };
})()"""
LIVE_MICROPHONES = "window.microphones.flatMap((s) => s.getTracks()).filter((t) => t.readyState === 'live').length"


def test_a_double_click_on_the_microphone_is_one_press(browser):
    """A double click opens the microphone once (the second stream it opened was never stopped: the microphone
    stayed on after the recording was sent or cancelled), and a double click to stop sends the recording once
    (the second press opened the microphone again)."""
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        page_.add_init_script(COUNT_MICROPHONES)
        page_.reload()
        page_.wait_for_selector("#status.ok", timeout=WAIT_MS)
        page_.dblclick("#mic")
        page_.wait_for_function("document.querySelector('#recording-time').textContent === '0:01'", timeout=WAIT_MS)
        page_.dblclick("#mic")
        wait_answers(page_, 1)
        page_.wait_for_timeout(1000)  # time for a second press to open the microphone again, as it did
        assert page_.evaluate("window.microphones.length") == 1
        assert page_.evaluate(LIVE_MICROPHONES) == 0
        assert page_.is_hidden("#recording") and page_.get_attribute("#mic", "aria-pressed") == "false"
        assert page_.is_hidden("#error") and page_.errors == []
    assert len(backend.requests) == 1


def slow_backend() -> FakeBackend:
    """One that streams a 40-word answer, a word every 0.2 s: long enough to act in the middle of it."""
    return FakeBackend(words=["word "] * 40, delay=0.2)


def start_long_answer(page_) -> None:
    """Send a question to ``slow_backend()`` and wait until its answer has begun to show."""
    page_.fill("#text", "Count for me.")
    page_.click("#send")
    page_.wait_for_function("document.querySelector('.turn.assistant .bubble').textContent.length >= 10",
                            timeout=WAIT_MS)


def test_new_chat_during_an_answer_starts_clean(browser):
    """The answer streaming when New chat is pressed is not carried into the next conversation."""
    backend = slow_backend()
    with served_page(browser, backend) as page_:
        start_long_answer(page_)
        page_.click("#new-chat")
        page_.wait_for_selector("#send:not([hidden])")
        assert page_.is_visible("#intro") and page_.input_value("#text") == ""
        page_.fill("#text", "Fresh start.")
        page_.click("#send")
        wait_answers(page_, 1)
    assert [m["role"] for m in backend.requests[-1][1]] == ["user"]  # no answer of the old chat in it


def test_the_upload_control_is_reached_from_the_keyboard(browser, tmp_path):
    clip = tmp_path / "keys.wav"
    clip.write_bytes(wav_bytes(1.0))
    with served_page(browser, FakeBackend()) as page_:
        # Playwright turns on catching file choosers without waiting for the browser to confirm it, so a key
        # pressed at once can open a chooser nobody catches: catch them from here on, before the key round trips
        page_.on("filechooser", lambda _: None)
        page_.focus("#mic")
        page_.keyboard.press("Tab")
        assert page_.evaluate("document.activeElement.classList.contains('upload')")
        with page_.expect_file_chooser(timeout=WAIT_MS) as chooser:
            page_.keyboard.press("Enter")
        chooser.value.set_files(str(clip))
        page_.wait_for_selector("#attachment:not([hidden])", timeout=WAIT_MS)


def test_stop_keeps_what_was_said_and_cancels_the_generation(browser):
    backend = slow_backend()
    with served_page(browser, backend) as page_:
        start_long_answer(page_)
        page_.click("#stop")
        page_.wait_for_selector(".turn.assistant .bubble.stopped", timeout=WAIT_MS)
        assert page_.is_visible("#send")
        wait_until(lambda: backend.cancelled, "the server's generation to be cancelled", seconds=10)
        kept = answers(page_)[0]
        assert kept.startswith("word word") and kept.count("word") < 40


def test_stop_before_any_answer_gives_the_turn_back(browser):
    backend = FakeBackend(hold=True)
    with served_page(browser, backend) as page_:
        page_.fill("#text", "Are you there?")
        page_.click("#send")
        page_.wait_for_selector("#stop:not([hidden])")
        page_.click("#stop")
        page_.wait_for_selector("#send:not([hidden])")
        assert page_.locator(".turn").count() == 0
        assert page_.input_value("#text") == "Are you there?"  # nothing typed is lost
        wait_until(lambda: backend.cancelled, "the server's generation to be cancelled", seconds=10)
        backend.gate.set()


def test_a_busy_server_is_said_and_the_turn_kept(browser, tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(1.0))
    with served_page(browser, FakeBackend(max_queue=0)) as page_:
        page_.set_input_files("#file", str(clip))
        page_.fill("#text", "Hello?")
        page_.click("#send")
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        message = page_.inner_text("#error-text")
        assert "busy" in message and re.search(r"Try again in \d+ s", message), message
        assert page_.locator(".turn").count() == 0
        assert page_.input_value("#text") == "Hello?" and page_.is_visible("#attachment")


def test_a_spoken_question_about_a_file_that_gets_no_answer_is_said_lost(browser, tmp_path):
    """The composer holds one audio: the file goes back, the question recorded about it cannot, and the error
    says so (it was dropped without a word; the note giveBack showed was overwritten by the error at once)."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(1.0))
    with served_page(browser, FakeBackend(max_queue=0)) as page_:
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#attachment:not([hidden])")
        record_a_second(page_)
        page_.click("#mic")
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        message = page_.inner_text("#error-text")
        assert "busy" in message and "spoken about the file could not go back" in message, message
        assert page_.locator(".turn").count() == 0 and page_.text_content("#attachment-name").startswith("clip.wav")


@pytest.mark.parametrize("seconds, shown", [(2.46, "0:02.5"), (2.02, "0:02.1"), (59.96, "1:00.0")])
def test_a_file_longer_than_the_server_takes_is_refused_before_sending(browser, tmp_path, seconds, shown):
    clip = tmp_path / "long.wav"
    clip.write_bytes(wav_bytes(seconds))  # its length in tenths, rounded up: in whole seconds 2.46 read as the limit
    backend = FakeBackend()
    with served_page(browser, backend, max_seconds=2.0) as page_:
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        message = page_.inner_text("#error-text")
        assert f'"long.wav" is {shown} long' in message and "at most 0:02" in message, message
        assert page_.is_hidden("#attachment") and backend.requests == []


def test_errors_the_server_finds_in_the_audio_are_shown(browser, tmp_path):
    junk = tmp_path / "notes.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with served_page(browser, FakeBackend()) as page_:
        page_.set_input_files("#file", str(junk))  # the browser cannot decode it either: the server judges
        page_.click("#send")
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert "audio" in page_.inner_text("#error-text").lower()
        assert page_.locator(".turn").count() == 0


def test_a_file_cut_short_is_answered_and_the_page_says_so(browser, tmp_path):
    clip = tmp_path / "short.wav"
    whole = wav_bytes(2.0, seed=4)
    clip.write_bytes(whole[: len(whole) // 2])  # its header still promises 2 s
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        page_.set_input_files("#file", str(clip))
        page_.click("#send")
        wait_answers(page_, 1)
        assert answers(page_) == ["".join(ANSWER)]
        message = page_.inner_text("#error-text")
        assert page_.is_visible("#error") and "Answered from the part of the audio that arrived" in message
        assert "the file is cut short: its header promises 32000 frames" in message, message
    (heard,) = sent_audio(backend.requests[0])
    assert 0 < len(heard) < 16000


def test_a_file_cut_short_is_transcribed_and_the_page_says_so(browser, tmp_path):
    """Transcribe shows the server's X-Audio-Warning as the answer does (it was left unread)."""
    clip = tmp_path / "short.wav"
    whole = wav_bytes(2.0, seed=4)
    clip.write_bytes(whole[: len(whole) // 2])
    with served_page(browser, FakeBackend(words=ANSWER)) as page_:
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#attachment:not([hidden])")
        page_.click("#transcribe")
        page_.wait_for_selector(".transcript .meta a.srt", timeout=WAIT_MS)
        message = page_.inner_text("#error-text")
        assert page_.is_visible("#error") and "Transcribed from the part of the audio that arrived" in message
        assert "the file is cut short: its header promises 32000 frames" in message, message


def test_an_answer_whose_stream_is_cut_short_is_marked_and_said(browser):
    """A stream that ends with no finish_reason and no [DONE] (a proxy or the network cut it) is not shown as
    a whole answer: what came is kept, marked failed, and the error says it broke off."""
    def chunk(text: str) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}) + "\n\n"

    with served_page(browser, FakeBackend()) as page_:
        page_.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=chunk("The ") + chunk("answer")))
        page_.fill("#text", "Hello?")
        page_.click("#send")
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert "broke off before its end" in page_.inner_text("#error-text")
        assert answers(page_) == ["The answer"] and page_.locator(".turn.assistant .bubble.failed").count() == 1
        assert page_.is_visible("#send") and page_.errors == []


def test_a_refused_microphone_is_explained(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + [
        "--use-fake-device-for-media-stream", "--deny-permission-prompts"])
    try:
        app, _ = fake_app(FakeBackend())
        with running(app) as url:
            page_ = open_page(b, url)
            page_.click("#mic")
            page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
            assert "Microphone access was refused" in page_.inner_text("#error-text")
            assert page_.is_hidden("#recording")
    finally:
        b.close()


def test_the_page_fits_a_phone(browser):
    app, _ = fake_app(FakeBackend(words=["A long answer that has to wrap on a narrow screen. "] * 6))
    with running(app) as url:
        page_ = open_page(browser, url, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
        page_.fill("#text", "Tell me something long.")
        page_.click("#send")
        wait_answers(page_, 1)
        assert page_.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the screen
        for selector in ("#mic", "#send", "#text", ".upload", "#open-settings"):
            box = page_.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 740, selector
        page_.click("#open-settings")
        assert page_.is_visible("#settings")


def test_an_attached_clip_s_player_is_usable_on_a_phone(browser, tmp_path):
    clip = tmp_path / "a recording with a long name.wav"
    clip.write_bytes(wav_bytes(1.0))
    app, _ = fake_app(FakeBackend())
    with running(app) as url:
        page_ = open_page(browser, url, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#attachment:not([hidden])", timeout=WAIT_MS)
        player = page_.locator("#attachment-audio").bounding_box()
        assert player and player["width"] >= 250  # it was squeezed to ~70 px beside the name and buttons
        for selector in ("#transcribe", "#attachment-remove"):
            box = page_.locator(selector).bounding_box()
            assert box and box["x"] + box["width"] <= 360, selector


def test_a_clip_over_the_conversation_s_audio_budget_is_attached_for_a_transcript_and_refused_at_send(
        browser, tmp_path):
    first, second = tmp_path / "first.wav", tmp_path / "second.wav"
    first.write_bytes(wav_bytes(2.0))
    second.write_bytes(wav_bytes(2.0, seed=1))
    backend = FakeBackend()
    with served_page(browser, backend, max_seconds=3.0) as page_:
        page_.set_input_files("#file", str(first))
        page_.wait_for_selector("#attachment:not([hidden])", timeout=WAIT_MS)
        page_.click("#send")
        wait_answers(page_, 1)
        page_.set_input_files("#file", str(second))  # 2 s alone is within the 3 s a transcript may take
        page_.wait_for_selector("#attachment:not([hidden])", timeout=WAIT_MS)
        assert page_.is_hidden("#error") and page_.is_enabled("#transcribe")
        page_.fill("#text", "And this?")
        page_.click("#send")  # with the conversation's 2 s it is over: said, and nothing is lost
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert "start a new chat" in page_.inner_text("#error-text")
        assert page_.is_visible("#attachment") and page_.input_value("#text") == "And this?"
        assert len(backend.requests) == 1


def test_settings_reach_the_request(browser):
    backend = FakeBackend()
    with served_page(browser, backend) as page_:
        page_.click("#open-settings")
        page_.fill("input[name=temperature]", "0.6")
        page_.fill("input[name=max_tokens]", "5")
        page_.fill("input[name=seed]", "7")
        page_.fill("textarea[name=system]", "Be brief.")
        page_.click("#close-settings")
        page_.fill("#text", "Hi")
        page_.click("#send")
        wait_answers(page_, 1)
        page_.reload()  # the settings are kept
        page_.wait_for_selector("#status.ok")
        assert page_.input_value("input[name=temperature]") == "0.6"
        page_.click("#open-settings")  # beam search instead: greedy, the temperature left to the server
        page_.fill("input[name=temperature]", "")
        page_.fill("input[name=num_beams]", "3")
        page_.click("#close-settings")
        page_.fill("#text", "Again")
        page_.click("#send")
        wait_answers(page_, 1)  # (the reload began a new conversation)
    (_, messages, params) = backend.requests[0]
    assert (params.temperature, params.max_new_tokens, params.seed) == (0.6, 5, 7)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    beams = backend.requests[1][2]
    assert (beams.num_beams, beams.temperature) == (3, 0.0)


def test_the_keyboard_stays_in_the_composer_through_a_turn(browser):
    backend = FakeBackend(hold=True)
    with served_page(browser, backend) as page_:
        page_.fill("#text", "Hi")
        page_.focus("#send")
        page_.keyboard.press("Enter")
        page_.wait_for_selector("#stop:not([hidden])", timeout=WAIT_MS)
        assert page_.evaluate("document.activeElement.id") == "stop"  # in Send's place, not the page's start
        backend.gate.set()
        wait_answers(page_, 1)
        assert page_.evaluate("document.activeElement.id") == "text"


def test_a_setting_that_is_not_a_number_is_named_and_nothing_is_sent(browser):
    backend = FakeBackend()
    with served_page(browser, backend) as page_:
        page_.click("#open-settings")
        page_.focus("input[name=temperature]")
        page_.keyboard.type("0.5e")  # a number field takes the keys, but its value reads as empty
        page_.click("#close-settings")
        page_.fill("#text", "Hi")
        page_.click("#send")
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert "temperature is not a number" in page_.inner_text("#error-text")
        assert page_.input_value("#text") == "Hi" and backend.requests == []


# -- with the model --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_server(default_home):
    from qwen2audio import Qwen2Audio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2Audio.load()
    with serving(model, "tiny-test", max_tokens=8) as (url, _):
        yield url


@pytest.mark.usefixtures("one_thread")
def test_the_page_answers_what_the_api_answers(browser, model_server, tmp_path):
    openai = pytest.importorskip("openai")
    data = wav_bytes(1.5, seed=5)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(data)
    question = "What is this sound?"
    client = openai.OpenAI(base_url=model_server + "/v1", api_key="unused", max_retries=0)
    expected = client.chat.completions.create(model="default", temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}},
                                     {"type": "text", "text": question}]}]).choices[0].message.content
    assert expected
    page_ = open_page(browser, model_server)
    page_.click("#open-settings")
    page_.fill("input[name=temperature]", "0")
    page_.click("#close-settings")
    page_.set_input_files("#file", str(clip))
    page_.fill("#text", question)
    page_.click("#send")
    wait_answers(page_, 1)
    assert page_.evaluate("document.querySelector('.turn.assistant .bubble').textContent") == expected


@pytest.mark.usefixtures("one_thread")
def test_the_page_shades_each_token_by_the_apis_logprobs(browser, model_server):
    """"Show how sure": the request asks for logprobs, and the answer is one span per token (the stop token
    left out), each with the probability the API gives that token."""
    body = {"model": "default", "temperature": 0, "max_tokens": 8, "logprobs": True,
            "messages": [{"role": "user", "content": "Hello there."}]}
    api = httpx.post(model_server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    entries = api["logprobs"]["content"]
    if api["finish_reason"] == "stop":
        entries = entries[:-1]
    page_ = open_page(browser, model_server)
    page_.click("#open-settings")
    page_.fill("input[name=temperature]", "0")
    page_.check("input[name=confidence]")
    page_.click("#close-settings")
    page_.fill("#text", "Hello there.")
    page_.click("#send")
    wait_answers(page_, 1)
    spans = page_.evaluate("[...document.querySelectorAll('.turn.assistant .bubble .tok')].map(s => s.title)")
    assert spans == [f"p = {math.exp(e['logprob']):.3f}" for e in entries]
    shown = page_.evaluate("document.querySelector('.turn.assistant .bubble').textContent")
    assert shown == api["message"]["content"]
    page_.reload()  # the setting is kept
    page_.wait_for_selector("#status.ok")
    assert page_.is_checked("input[name=confidence]")


@pytest.mark.usefixtures("one_thread")
def test_transcribe_shows_the_apis_segments_and_offers_its_subtitles(browser, model_server, tmp_path):
    """Transcribe: the attached file's transcript from /v1/audio/transcriptions, streamed, a line per segment
    with its times, and .srt / .vtt downloads equal to what the server returns in those formats; the audio stays
    attached, and the transcript is no turn of the conversation."""
    data = wav_bytes(35.7, seed=2)  # two windows; the title counts whole seconds as the audio player does
    clip = tmp_path / "long.wav"
    clip.write_bytes(data)

    def api(response_format: str):
        res = httpx.post(model_server + "/v1/audio/transcriptions", timeout=120, files={"file": ("long.wav", data)},
                         data={"model": "default", "response_format": response_format})
        assert res.status_code == 200, res.text
        return res

    verbose = api("verbose_json").json()
    assert len(verbose["segments"]) == 2
    page_ = open_page(browser, model_server)
    page_.set_input_files("#file", str(clip))
    page_.wait_for_selector("#attachment:not([hidden])")
    with page_.expect_response("**/v1/audio/transcriptions") as response:
        page_.click("#transcribe")
    assert response.value.headers["content-type"].startswith("text/event-stream")  # segments as they are done
    page_.wait_for_selector(".transcript .meta a.srt", timeout=WAIT_MS)
    assert page_.locator(".transcript .segment.live").count() == 0  # each window's line got its times
    assert page_.text_content(".transcript .title") == "Transcript of long.wav (0:35)"
    shown = page_.evaluate("[...document.querySelectorAll('.transcript .segment')].map("
                           "l => [l.querySelector('.time').textContent, l.lastChild.textContent])")
    assert shown == [[f"0:{s['start']:04.1f}–0:{s['end']:04.1f}", s["text"]] for s in verbose["segments"] if s["text"]]
    for kind in ("srt", "vtt"):
        with page_.expect_download() as download:
            page_.click(f".transcript a.{kind}")
        assert download.value.suggested_filename == f"long.{kind}"
        assert Path(download.value.path()).read_text() == api(kind).text
    assert page_.is_visible("#attachment") and page_.is_visible("#send")
    assert page_.locator(".turn.user").count() == 0 and page_.errors == []


def test_a_kept_recording_can_be_transcribed(browser, model_server):
    """Record, Keep, Transcribe: the server takes the recording (a WAV file) at /v1/audio/transcriptions, and
    its transcript comes back with its downloads; the recording stays attached."""
    page_ = open_page(browser, model_server)
    record_a_second_and_keep_it(page_)
    with page_.expect_response("**/v1/audio/transcriptions") as response:
        page_.click("#transcribe")
    assert response.value.status == 200
    page_.wait_for_selector(".transcript .meta a.srt", timeout=WAIT_MS)
    assert page_.text_content(".transcript .title").startswith("Transcript of recording")
    assert page_.is_visible("#attachment") and page_.locator(".turn.user").count() == 0 and page_.errors == []


@pytest.mark.usefixtures("one_thread")
def test_a_transcript_cut_short_keeps_what_was_done(browser, model_server, tmp_path):
    """A stream that ends before its done event (the server went away after the first window): the first
    window's line stays, with its times, marked failed, and the error says so; no downloads of a part."""
    data = wav_bytes(35.7, seed=2)  # two windows; the title counts whole seconds as the audio player does
    clip = tmp_path / "long.wav"
    clip.write_bytes(data)
    res = httpx.post(model_server + "/v1/audio/transcriptions", timeout=120, files={"file": ("long.wav", data)},
                     data={"model": "default", "response_format": "verbose_json", "stream": "true"})
    assert res.status_code == 200, res.text
    blocks = res.text.split("\n\n")
    first = next(i for i, b in enumerate(blocks) if '"transcript.text.segment"' in b)
    cut = "\n\n".join(blocks[:first + 1]) + "\n\n"  # up to the first window's segment event
    segment = json.loads(blocks[first][len("data: "):])
    page_ = open_page(browser, model_server)
    page_.route("**/v1/audio/transcriptions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=cut))
    page_.set_input_files("#file", str(clip))
    page_.wait_for_selector("#attachment:not([hidden])")
    page_.click("#transcribe")
    page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
    assert "broke off before its end" in page_.text_content("#error-text")
    shown = page_.evaluate("[...document.querySelectorAll('.transcript .segment')].map("
                           "l => [l.querySelector('.time').textContent, l.lastChild.textContent])")
    assert shown == [[f"0:{segment['start']:04.1f}–0:{segment['end']:04.1f}", segment["text"]]]
    assert page_.locator(".transcript .bubble.failed").count() == 1 and page_.locator(".transcript a.srt").count() == 0
    assert page_.text_content(".transcript .title") == "Part of the transcript of long.wav"


def test_send_while_recording_sends_the_recording_and_the_mic_says_what_it_does(browser):
    """Send (or Enter) during a recording ends it and sends it, as the microphone button does (it did
    nothing); the button's accessible name follows what pressing it does."""
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        assert page_.get_attribute("#mic", "aria-label") == "Record"
        record_a_second(page_)
        assert page_.get_attribute("#mic", "aria-label") == "Stop and send the recording"
        page_.fill("#text", "What is this?")
        page_.click("#send")
        wait_answers(page_, 1)
        assert page_.get_attribute("#mic", "aria-label") == "Record" and page_.errors == []
    (request,) = backend.requests
    (heard,) = sent_audio(request)
    assert sent_text(request) == ["What is this?"] and abs(dominant_hz(heard) - TONE_HZ) < 10


def test_settings_take_the_keyboard_and_escape_closes_them(browser):
    with served_page(browser, FakeBackend()) as page_:
        page_.focus("#open-settings")
        page_.keyboard.press("Enter")
        assert page_.is_visible("#settings")
        assert page_.evaluate("document.activeElement.name") == "system"
        page_.keyboard.press("Escape")
        assert page_.is_hidden("#settings") and page_.evaluate("document.activeElement.id") == "open-settings"
        assert page_.get_attribute("#open-settings", "aria-expanded") == "false"


def test_a_file_that_is_not_audio_is_refused_when_attached(browser, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n" * 20)
    with served_page(browser, FakeBackend()) as page_:
        page_.set_input_files("#file", str(notes))
        page_.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert '"notes.txt" does not look like an audio file' in page_.inner_text("#error-text")
        assert page_.is_hidden("#attachment")


def test_transcribe_sends_the_language_set_and_counts_its_segments(browser, tmp_path):
    """The Settings' language reaches the transcription's prompt tag; one segment is "1 segment"."""
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(2.0, seed=3))
    backend = FakeBackend(words=ANSWER)
    with served_page(browser, backend) as page_:
        page_.click("#open-settings")
        page_.fill("input[name=language]", "fr")
        page_.keyboard.press("Escape")
        page_.set_input_files("#file", str(clip))
        page_.wait_for_selector("#attachment:not([hidden])")
        page_.click("#transcribe")
        page_.wait_for_selector(".transcript .meta a.srt", timeout=WAIT_MS)
        assert page_.inner_text(".transcript .meta").startswith("1 segment · ")
        assert page_.text_content("#announce") == f"Transcript of clip.wav: {''.join(ANSWER)}"
        assert page_.errors == []
    (request,) = backend.requests
    assert request[0] == "complete" and request[1].endswith("<|fr|>")
