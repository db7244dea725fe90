"""Whether a model's weights fit in the memory of the device they load onto, asked before loading.

Loading Qwen2-Audio-7B in float32 on a CPU takes 34 GB: on a 16 GB machine the kernel's out-of-memory killer
ended the process part-way, with no word but "Killed", or the machine swapped for minutes. We compare the
weights' size with what the device has free (a CPU: the kernel's MemAvailable, a container's memory limit,
swap apart; a GPU: what CUDA says is free) and say what to do instead: a half-precision dtype, another
device. ``QWEN2AUDIO_NO_MEMORY_CHECK=1`` skips the check (an estimate that is wrong for a machine).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NotEnoughMemory, SpeedWarning

SKIP_ENV = "QWEN2AUDIO_NO_MEMORY_CHECK"
GB = 1e9


@dataclass(frozen=True)
class Room:
    """Bytes a device has free for new weights: ``free`` without paging, ``swap`` more by paging out."""

    free: int
    swap: int = 0


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo's fields in bytes (Linux; empty elsewhere)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields


def _stat(path: Path) -> dict[str, int]:
    """A cgroup's memory.stat (name value per line), empty where it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {name: int(value) for name, _, value in (line.partition(" ") for line in lines) if value.strip().isdigit()}


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What a container's memory limit leaves (cgroup v2, else v1), or None without a limit. The cgroup's
    usage counts the page cache its files filled (a checkpoint downloaded or loaded before), which the
    kernel reclaims before it kills anything, so the cached files' pages count as room, as MemAvailable
    counts them."""
    for limit_file, usage_file, stat_file, cache_keys in (
            ("memory.max", "memory.current", "memory.stat", ("active_file", "inactive_file")),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             ("total_active_file", "total_inactive_file"))):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 says "no limit" with a huge number, v2 with "max"
            stat = _stat(root / stat_file)
            cached = sum(stat.get(key, 0) for key in cache_keys)
            return max(0, int(limit) - max(0, usage - cached))
    return None


def device_room(device: torch.device | str) -> Room | None:
    """What ``device`` has free, or None where that cannot be known (macOS, MPS, other devices)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # what this process's caching allocator holds but no tensor uses (a model loaded and deleted before)
        # is not free to CUDA but is to the allocator, which reuses it (and releases it when short)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return Room(int(free) + max(0, int(cached)))
    if device.type != "cpu":
        return None
    info = _meminfo()
    if "MemAvailable" not in info:
        return None
    free = info["MemAvailable"]
    limit = _cgroup_room()
    if limit is not None:
        free = min(free, limit)
    return Room(free, info.get("SwapFree", 0))


def check_room(need: int, device: torch.device | str, what: str, advice: str) -> None:
    """Raise NotEnoughMemory where ``need`` bytes cannot fit on ``device`` even with its swap, warn where
    they fit only by swapping. ``what``: the thing loaded, in words; ``advice``: what to do instead."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    room = device_room(device)
    if room is None or need <= room.free:
        return
    where = "this GPU has" if torch.device(device).type == "cuda" else "this machine has"
    said = f"{what} takes {need / GB:.1f} GB but {where} {room.free / GB:.1f} GB of memory free"
    if need > room.free + room.swap:
        swap = f" (and {room.swap / GB:.1f} GB of swap)" if room.swap else ""
        raise NotEnoughMemory(f"{said}{swap}: {advice}; or free memory and try again ({SKIP_ENV}=1 skips this "
                              "check)")
    warnings.warn(f"{said}: the rest goes to swap, which is slow; {advice}", SpeedWarning, stacklevel=3)
