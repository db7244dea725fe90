"""The training loop's jemalloc purge: bounded memory with jemalloc's freed pages kept for reuse."""

import os
import subprocess
import sys

import pytest

from qwen2audio.training import allocator
from qwen2audio.training.allocator import FAST_CONF, Purger, find_jemalloc, purge

JEMALLOC = find_jemalloc()

# 256 MiB written, freed, then purged; resident MiB after each
PROBE = """
from qwen2audio.training.allocator import purge
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
base = rss()
block = bytearray(b"\\1") * (256 * 2**20)
held = rss()
del block
freed = rss()
print(purge(), round(held - base), round(freed - base), round(rss() - base))
"""


def _probe(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def test_the_purger_purges_at_most_once_per_interval():
    calls, now = [], [0.0]
    purger = Purger(every_s=60, clock=lambda: now[0])
    purger.mallctl = lambda *args: calls.append(args[0]) or 0
    for t in (10, 59, 61, 100, 122):
        now[0] = t
        purger()
    assert calls == [b"arena.4096.purge"] * 2  # at 61 and at 122


def test_without_jemalloc_nothing_is_purged(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_mallctl", lambda: None)
    assert purge() is False and Purger()() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_glibc_has_no_mallctl_and_the_probe_is_not_fooled():
    env = {"LD_PRELOAD": ""}
    ok, held, _, _ = _probe(env)
    assert ok == "False" and int(held) >= 250


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 is not installed")
def test_with_jemalloc_freed_memory_stays_until_the_purge_returns_it():
    ok, held, freed, purged = _probe({"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": FAST_CONF})
    assert ok == "True" and int(held) >= 250
    assert int(freed) >= 250  # kept for reuse: no page faults when the next step allocates it again
    assert int(purged) < 32  # and handed back by the purge


def test_a_long_cpu_run_without_jemalloc_is_told_how_to_keep_its_memory_flat(monkeypatch):
    from qwen2audio.training.allocator import advice

    monkeypatch.setattr(allocator, "jemalloc_mallctl", lambda: None)
    note = advice("cpu", 1500, platform="linux")
    assert note.startswith("note: 1500 steps on the CPU with glibc's allocator")
    assert "MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:0" in note and "apt-get install libjemalloc2" in note
    assert advice("cpu", 200, platform="linux") is None  # short runs, GPUs and other systems: nothing to say
    assert advice("cuda", 1500, platform="linux") is None and advice("cpu", 1500, platform="darwin") is None
    monkeypatch.setattr(allocator, "jemalloc_mallctl", lambda: object())
    assert advice("cpu", 1500, platform="linux") is None  # jemalloc is there already
