"""jemalloc, where it is the process's allocator (``LD_PRELOAD``), kept fast and bounded for training on a CPU.

With jemalloc's default decay, a training step that frees and allocates gigabytes hands the freed pages back
to the kernel within a fraction of a second (its decay follows the growth of unused memory, which churn at a
steady level never shows) and the next step faults every page in again: about 100,000 page faults a second
and a quarter of the CPU time in the kernel, measured in the demo model's pre-training on two cores. With
``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:0`` jemalloc keeps what is freed for reuse (18 % more tokens a
second there), but never returns the blocks that the next shapes do not fit: resident memory grew 1.5 GB a
minute until the kernel ended the run. ``Purger`` returns them between steps, once every ``every_s``
seconds, which costs one step's page faults a minute. Without jemalloc it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL
PURGE_EVERY_S = 60.0
FAST_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:0"  # the MALLOC_CONF that Purger keeps bounded
# where Debian/Ubuntu (apt-get install libjemalloc2) and other distributions put it
JEMALLOC_PATHS = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                                     "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                                     "/usr/lib/libjemalloc.so.2")]
LONG_RUN_STEPS = 200  # a CPU run of more steps than this is told about jemalloc where it runs without


def find_jemalloc(paths: list[Path] = JEMALLOC_PATHS) -> Path | None:
    """The jemalloc library to preload, where one is installed."""
    return next((p for p in paths if p.is_file()), None)


def jemalloc_mallctl():
    """jemalloc's ``mallctl`` when jemalloc is this process's allocator, else None."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def purge(mallctl=None) -> bool:
    """Hand every arena's unused pages back to the kernel; False where jemalloc is not the allocator."""
    mallctl = mallctl or jemalloc_mallctl()
    if mallctl is None:
        return False
    return mallctl(f"arena.{ALL_ARENAS}.purge".encode(), None, None, None, 0) == 0


class Purger:
    """Call between training steps: purges at most once every ``every_s`` seconds."""

    def __init__(self, every_s: float = PURGE_EVERY_S, clock=time.monotonic):
        self.mallctl = jemalloc_mallctl()
        self.every_s, self.clock = every_s, clock
        self.last = clock()

    def __call__(self) -> bool:
        now = self.clock()
        if self.mallctl is None or now - self.last < self.every_s:
            return False
        self.last = now
        return purge(self.mallctl)


def advice(device_type: str, steps: int, platform: str = sys.platform) -> str | None:
    """A note for a long CPU run on Linux without jemalloc: glibc's heap grows under varying batch shapes."""
    if device_type != "cpu" or steps <= LONG_RUN_STEPS or not platform.startswith("linux") or jemalloc_mallctl():
        return None
    return (f"note: {steps} steps on the CPU with glibc's allocator, whose memory can grow step after step under "
            "varying batch shapes; for runs of hours preload jemalloc with MALLOC_CONF="
            f"{FAST_CONF} (apt-get install libjemalloc2; docs/training.md, 'Long runs on a CPU')")
