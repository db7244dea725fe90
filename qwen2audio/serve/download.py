"""Fetching an audio URL the operator allowed, and nothing else (no server-side request forgery).

- The URL's host must be on the allow-list (``--allow-audio-url-host``): a name (``media.example.com``;
  ``*.example.com`` for its subdomains) or an address or network (``10.0.0.5``, ``10.0.0.0/8``).
- Every address the name resolves to must be public, unless it lies in an allowed address or network:
  loopback, private, link-local (169.254.169.254, the cloud metadata service), shared, multicast and
  reserved addresses are refused even for an allowed name, whose DNS an attacker may control.
- The connection goes to the address that was checked, not to a second lookup of the name (which
  could answer differently: DNS rebinding); TLS still verifies the certificate against the name.
- Redirects are followed by hand, at most ``MAX_REDIRECTS``, each target checked as above.
- The body is read up to the byte limit and no further; a Content-Length above it is refused unread.
Error messages name the URL's host, never the addresses behind it (they may be internal).
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
TIMEOUT_SECONDS = 10.0  # each connect / read
DEADLINE_SECONDS = 60.0  # the whole download, redirects included
CHUNK_BYTES = 64 * 1024
REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "qwen2audio-serve"
HOST_NAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DownloadRefused(ValueError):
    """The URL may not be fetched, or fetching it failed: the message says which and why."""


@dataclass(frozen=True)
class UrlPolicy:
    """Which hosts audio URLs may name, and which non-public addresses they may reach."""

    names: frozenset[str] = frozenset()  # lower case; "*.example.com" matches every subdomain
    networks: tuple[IPNetwork, ...] = ()  # allowed IP literals and the non-public addresses they may reach

    @classmethod
    def parse(cls, entries: Sequence[str]) -> "UrlPolicy":
        """``--allow-audio-url-host`` values -> a policy; ValueError for an entry that is neither a host
        name nor an IP address or network."""
        names, networks = set(), []
        for entry in entries:
            value = entry.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(value.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not HOST_NAME.match(value):
                raise ValueError(f"--allow-audio-url-host {entry!r}: not a host name (media.example.com, "
                                 "*.example.com) nor an IP address or network (10.0.0.5, 10.0.0.0/8)")
            names.add(value)
        return cls(frozenset(names), tuple(networks))

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.networks)

    def allows_host(self, host: str) -> bool:
        address = _address(host)
        if address is not None:
            return self._in_networks(address)
        host = host.lower().rstrip(".")
        return host in self.names or any(n.startswith("*.") and host.endswith(n[1:]) for n in self.names)

    def allows_address(self, address: IPAddress) -> bool:
        return is_public(address) or self._in_networks(address)

    def _in_networks(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address (not loopback, private, link-local, shared, multicast, ...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified
                                      or address.is_loopback or address.is_link_local)


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def fetch(url: str, policy: UrlPolicy, max_bytes: int) -> bytes:
    """The body of ``url`` (http or https), at most ``max_bytes``; DownloadRefused otherwise."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host = _check_url(parts, policy)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _resolve(host, port, policy)
        status, location, body = _get(parts, host, port, address, max_bytes, deadline)
        if status in REDIRECTS and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise DownloadRefused(f"audio URL on {host}: the server answered HTTP {status}")
        return body
    raise DownloadRefused(f"audio URL: more than {MAX_REDIRECTS} redirects")


def _check_url(parts, policy: UrlPolicy) -> str:
    if parts.scheme not in ("http", "https"):
        raise DownloadRefused(f"audio URL scheme {parts.scheme!r} is not fetched; use http(s) or a data: URL")
    if parts.username is not None or parts.password is not None:
        raise DownloadRefused("audio URLs with credentials (user:password@) are not fetched")
    host = parts.hostname
    if not host:
        raise DownloadRefused("audio URL has no host")
    if not policy.allows_host(host):
        raise DownloadRefused(f"audio URLs on {host} are not fetched by this server (it fetches only the hosts "
                              "its operator allowed); send the audio as input_audio or a data: URL")
    return host


def _resolve(host: str, port: int, policy: UrlPolicy) -> str:
    """The address to connect to: every address of ``host`` must be allowed (a name that points at
    both a public and a private address is refused)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DownloadRefused(f"audio URL host {host} cannot be resolved") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(policy.allows_address(a) for a in addresses):
        raise DownloadRefused(f"audio URL host {host} resolves to a non-public address, which this server does "
                              "not reach")
    return str(addresses[0])


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address, whatever the name resolves to now."""

    def __init__(self, host: str, port: int, address: str):
        super().__init__(host, port, timeout=TIMEOUT_SECONDS)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is verified against the host name."""

    def __init__(self, host: str, port: int, address: str):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=TIMEOUT_SECONDS, context=self.tls)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def _get(parts, host: str, port: int, address: str, max_bytes: int, deadline: float) -> tuple[int, str | None, bytes]:
    """GET one URL at a pinned address -> (status, Location header, body up to max_bytes)."""
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = kind(host, port, address)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "audio/*, */*"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise DownloadRefused(f"audio URL on {host}: the file is {int(declared)} bytes, more than the "
                                  f"{max_bytes} this server takes")
        chunks, size = [], 0
        while True:
            # what has come (read1), each wait bounded by the time left: read() waited for a whole chunk, and
            # a sender dripping a byte at a time restarted the socket's timeout with each, past the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise DownloadRefused(f"audio URL on {host}: the download took more than {DEADLINE_SECONDS:.0f} s")
            if conn.sock is not None:
                conn.sock.settimeout(min(TIMEOUT_SECONDS, left))
            chunk = response.read1(CHUNK_BYTES)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise DownloadRefused(f"audio URL on {host}: the file is more than the {max_bytes} bytes this "
                                      "server takes")
            if time.monotonic() > deadline:
                raise DownloadRefused(f"audio URL on {host}: the download took more than {DEADLINE_SECONDS:.0f} s")
            chunks.append(chunk)
        return 200, None, b"".join(chunks)
    except (OSError, http.client.HTTPException) as err:
        raise DownloadRefused(f"audio URL on {host}: the download failed ({type(err).__name__})") from None
    finally:
        conn.close()
