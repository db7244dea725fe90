"""Audio by URL or path: only the hosts and folders the operator allowed, never a private address they
did not name (SSRF), never outside an allowed folder (path traversal), never more than the byte limit.
A local HTTP server on 127.0.0.1 plays the remote host; nothing leaves the machine."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from qwen2audio.audio import load_audio
from qwen2audio.serve.audio_input import AudioPolicy, allowed_folders, url_bytes
from qwen2audio.serve.download import DownloadRefused, UrlPolicy, fetch, is_public
from qwen2audio.serve.errors import APIError
from serve_helpers import FakeBackend, fake_app, running, wav_bytes

WAV = wav_bytes(1.0, seed=4)
CAP = 200_000  # bytes


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/clip.wav":
            self._send(200, WAV, {"Content-Length": str(len(WAV))})
        elif self.path == "/to-same-host":
            self._send(302, b"", {"Location": "/clip.wav"})
        elif self.path == "/to-localhost":
            self._send(302, b"", {"Location": f"http://localhost:{port}/clip.wav"})
        elif self.path == "/to-metadata":
            self._send(307, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif self.path == "/declared-big":
            self._send(200, b"", {"Content-Length": str(CAP + 1)})
        elif self.path == "/undeclared-big":
            self._send(200, b"\0" * (CAP + 1), {})
        elif self.path == "/drip":  # a byte every 0.2 s of a promised 100 kB: each byte restarts a socket timeout
            self._send(200, b"", {"Content-Length": "100000"})
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up
                pass
        else:
            self._send(404, b"", {})

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOOPBACK = UrlPolicy.parse(["127.0.0.1"])


def test_an_allowed_address_is_fetched_and_same_host_redirects_followed(origin):
    assert fetch(origin + "/clip.wav", LOOPBACK, CAP) == WAV
    assert fetch(origin + "/to-same-host", LOOPBACK, CAP) == WAV


@pytest.mark.parametrize("path, policy, why", [
    ("/clip.wav", UrlPolicy(), "not fetched by this server"),
    ("/clip.wav", UrlPolicy.parse(["example.com"]), "not fetched by this server"),
    ("/to-localhost", LOOPBACK, "localhost are not fetched"),
    ("/to-metadata", LOOPBACK, "169.254.169.254 are not fetched"),
    ("/loop", LOOPBACK, "redirects"),
    ("/declared-big", LOOPBACK, f"{CAP + 1} bytes"),
    ("/undeclared-big", LOOPBACK, f"more than the {CAP} bytes"),
    ("/missing", LOOPBACK, "HTTP 404"),
])
def test_refused(origin, path, policy, why):
    with pytest.raises(DownloadRefused, match=why):
        fetch(origin + path, policy, CAP)


def test_an_allowed_name_that_resolves_to_loopback_is_refused_unless_the_address_is_allowed(origin):
    port = origin.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/clip.wav"
    with pytest.raises(DownloadRefused, match="non-public address"):
        fetch(url, UrlPolicy.parse(["localhost"]), CAP)
    assert fetch(url, UrlPolicy.parse(["localhost", "127.0.0.0/8", "::1"]), CAP) == WAV


def test_urls_with_credentials_or_other_schemes_are_refused():
    with pytest.raises(DownloadRefused, match="credentials"):
        fetch("http://user:pw@127.0.0.1/clip.wav", LOOPBACK, CAP)
    with pytest.raises(DownloadRefused, match="scheme"):
        fetch("gopher://127.0.0.1/", LOOPBACK, CAP)


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("8.8.8.8", True), ("2606:4700::1111", True),
])
def test_which_addresses_are_public(address, public):
    import ipaddress

    assert is_public(ipaddress.ip_address(address)) is public


def test_host_patterns():
    policy = UrlPolicy.parse(["Media.Example.com", "*.cdn.example", "10.0.0.0/8", "[::1]"])
    assert policy.allows_host("media.example.com") and policy.allows_host("MEDIA.EXAMPLE.COM.")
    assert policy.allows_host("a.cdn.example") and policy.allows_host("a.b.cdn.example")
    assert not policy.allows_host("cdn.example") and not policy.allows_host("evilcdn.example")
    assert not policy.allows_host("example.com") and not policy.allows_host("media.example.com.evil.net")
    assert policy.allows_host("10.9.8.7") and not policy.allows_host("11.0.0.1") and policy.allows_host("::1")
    for junk in ("http://example.com", "exa mple.com", "", "a/b"):
        with pytest.raises(ValueError, match="--allow-audio-url-host"):
            UrlPolicy.parse([junk])


# -- local files ----------------------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "clip.wav").write_bytes(WAV)
    (allowed / "sub").mkdir()
    (allowed / "sub" / "nested.wav").write_bytes(WAV)
    (outside / "secret.wav").write_bytes(WAV)
    (allowed / "link.wav").symlink_to(outside / "secret.wav")
    (allowed / "linkdir").symlink_to(outside)
    return allowed, outside


def policy_for(allowed: Path, max_bytes: int = CAP) -> AudioPolicy:
    return AudioPolicy(max_bytes=max_bytes, local_dirs=allowed_folders([allowed]))


@pytest.mark.parametrize("name", ["clip.wav", "sub/nested.wav", "sub/../clip.wav"])
def test_files_inside_an_allowed_folder_are_read(folders, name):
    allowed, _ = folders
    policy = policy_for(allowed)
    assert url_bytes(name, policy, "p") == WAV
    assert url_bytes(str(allowed / name), policy, "p") == WAV
    assert url_bytes((allowed / name).as_uri() if ".." not in name else "file://" + str(allowed / name), policy,
                     "p") == WAV


@pytest.mark.parametrize("name", ["../outside/secret.wav", "link.wav", "linkdir/secret.wav", "sub", "nothing.wav",
                                  "/etc/passwd", "file:///etc/passwd", "file://otherhost/etc/passwd"])
def test_files_outside_or_missing_are_refused(folders, name):
    allowed, _ = folders
    with pytest.raises(APIError) as refused:
        url_bytes(name, policy_for(allowed), "messages[0].content[0].audio_url")
    assert refused.value.status == 400 and refused.value.param == "messages[0].content[0].audio_url"


def test_a_file_over_the_byte_limit_is_413(folders):
    allowed, _ = folders
    with pytest.raises(APIError) as refused:
        url_bytes("clip.wav", policy_for(allowed, max_bytes=len(WAV) - 1), "p")
    assert refused.value.status == 413


def test_allowed_folders_must_exist(tmp_path):
    with pytest.raises(ValueError, match="--allow-local-audio"):
        allowed_folders([tmp_path / "missing"])


def test_the_server_reads_allowed_urls_and_files(origin, folders):
    allowed, _ = folders
    backend = FakeBackend()
    policy = AudioPolicy(max_bytes=CAP, max_seconds=60, urls=LOOPBACK, local_dirs=allowed_folders([allowed]))
    app, _ = fake_app(backend, audio=policy)
    sources = [origin + "/clip.wav", (allowed / "clip.wav").as_uri(), "sub/nested.wav"]
    with running(app) as url:
        for source in sources:
            body = {"model": "fake", "messages": [{"role": "user", "content": [
                {"type": "audio_url", "audio_url": {"url": source}}]}]}
            assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        refused = httpx.post(url + "/v1/chat/completions", timeout=30, json={"model": "fake", "messages": [
            {"role": "user", "content": [{"type": "audio_url", "audio_url": origin + "/to-localhost"}]}]})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "url_not_allowed"
    expected = load_audio(WAV)
    for request in backend.requests:
        np.testing.assert_array_equal(request[1][0]["content"][0]["audio"], expected)
    assert len(backend.requests) == len(sources)


def test_a_sender_that_drips_is_cut_off_at_the_deadline(origin, monkeypatch):
    """The whole download has DEADLINE_SECONDS: a byte at a time kept it going for as long as the sender
    liked (each read waited for a whole chunk; each byte restarted the socket's timeout)."""
    import qwen2audio.serve.download as download

    monkeypatch.setattr(download, "DEADLINE_SECONDS", 1.0)
    start = time.monotonic()
    with pytest.raises(DownloadRefused, match="the download took more than 1 s"):
        fetch(origin + "/drip", LOOPBACK, CAP)
    assert time.monotonic() - start < 3.0
