"""Weights that cannot fit in the device's memory are refused before loading, with the dtype that would fit;
weights that fit only by swapping are warned of (qwen2audio.checkpoint.memory)."""

from __future__ import annotations

import warnings

import pytest
import torch

from qwen2audio.checkpoint import load_model, memory
from qwen2audio.errors import NotEnoughMemory, SpeedWarning
from reference import TOKENIZER, hf_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same small model saved in float32 and in bfloat16, and its parameter count."""
    ref = hf_model("mha_untied_80")
    params = sum(p.numel() for p in ref.parameters())
    paths = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        path = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        ref.to(dtype).save_pretrained(path)
        TOKENIZER.save(path)
        paths[dtype] = path
    return paths, params


def room(monkeypatch, free: int, swap: int = 0) -> None:
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(memory, "device_room", lambda device: memory.Room(free, swap))


def test_weights_that_cannot_fit_are_refused_before_loading_with_the_dtype_that_fits(checkpoints, monkeypatch):
    paths, params = checkpoints
    room(monkeypatch, free=params * 3, swap=0)  # float32 (4 bytes each) does not fit, bfloat16 (2) does
    with pytest.raises(NotEnoughMemory, match=r"in float32 \(0\.00 B parameters\) takes .* GB but this machine has "
                                              r".* GB of memory free: load it in bfloat16 with --dtype bfloat16"):
        load_model(paths[torch.float32], dtype="float32")
    # stored in bfloat16, asked for in float32: "as it is stored"
    with pytest.raises(NotEnoughMemory, match=r"load it in bfloat16 \(as it is stored\) with --dtype bfloat16"):
        load_model(paths[torch.bfloat16], dtype="float32")
    model = load_model(paths[torch.bfloat16], dtype="bfloat16")  # what the message says fits
    assert next(model.parameters()).dtype == torch.bfloat16
    # half precision that does not fit either: no dtype to suggest
    room(monkeypatch, free=params, swap=0)
    with pytest.raises(NotEnoughMemory, match=r"run it on a machine with more memory"):
        load_model(paths[torch.bfloat16], dtype="bfloat16")


def test_weights_that_fit_only_with_swap_are_warned_of_and_load(checkpoints, monkeypatch):
    paths, params = checkpoints
    room(monkeypatch, free=params * 3, swap=params * 4)
    with pytest.warns(SpeedWarning, match=r"the rest goes to swap, which is slow; load it in bfloat16"):
        model = load_model(paths[torch.float32], dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    room(monkeypatch, free=params * 4)  # room enough: nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpeedWarning)
        load_model(paths[torch.float32], dtype="float32")


def test_the_check_can_be_skipped(checkpoints, monkeypatch):
    paths, _ = checkpoints
    room(monkeypatch, free=1)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert load_model(paths[torch.float32]) is not None


def test_the_command_line_says_it_in_one_line(checkpoints, monkeypatch, capsys):
    from qwen2audio.cli import main

    paths, params = checkpoints
    room(monkeypatch, free=params * 3)
    rc = main(["chat", str(paths[torch.float32]), "--prompt", "hi", "--dtype", "float32", "--no-interactive"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qwen2audio: error: ") and "--dtype bfloat16" in err and err.count("\n") == 1


def test_machine_memory_is_read_from_meminfo_and_a_containers_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   19886940 kB\nSwapFree:        1000 kB\n")
    assert memory._meminfo(meminfo) == {"MemTotal": 24000000 * 1024, "MemAvailable": 19886940 * 1024,
                                        "SwapFree": 1000 * 1024}
    assert memory._meminfo(tmp_path / "absent") == {}
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text("100\n")
    assert memory._cgroup_room(v2) is None  # no limit
    (v2 / "memory.max").write_text("8000000000\n")
    assert memory._cgroup_room(v2) == 8000000000 - 100
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("5")
    assert memory._cgroup_room(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("1000")
    assert memory._cgroup_room(v1) == 995
    # this machine: a CPU's room is known on Linux, a device whose memory cannot be asked is not checked
    if memory._meminfo():
        assert memory.device_room("cpu").free > 0
    assert memory.device_room("meta") is None


def test_a_containers_page_cache_counts_as_room(tmp_path):
    """A container's usage counts the page cache of the files it read (a checkpoint loaded before, 16 GB
    of it still cached): the kernel reclaims it before killing anything, so it is room, not use."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("24000000000\n")
    (v2 / "memory.current").write_text("17000000000\n")
    (v2 / "memory.stat").write_text("anon 900000000\nfile 16100000000\nactive_file 15000000000\n"
                                    "inactive_file 1000000000\nshmem 100000000\n")
    assert memory._cgroup_room(v2) == 24000000000 - (17000000000 - 16000000000)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("24000000000")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("17000000000")
    (v1 / "memory" / "memory.stat").write_text("cache 5\nactive_file 3\ntotal_cache 16000000000\n"
                                               "total_active_file 12000000000\ntotal_inactive_file 4000000000\n")
    assert memory._cgroup_room(v1) == 24000000000 - 1000000000


def test_a_gpus_room_counts_what_the_allocator_holds_unused(monkeypatch):
    """A model loaded on the GPU and deleted leaves its memory in torch's caching allocator: not free to
    CUDA, but the next load reuses it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * 10**9, 24 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 17 * 10**9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10**9)
    assert memory.device_room("cuda") == memory.Room(7 * 10**9 + 16 * 10**9)


def test_weights_stored_in_float16_are_advised_float16(checkpoints, monkeypatch):
    """A float16 checkpoint asked for in float32 is not "bfloat16 (as it is stored)": its own dtype is advised,
    which rounds nothing."""
    paths, params = checkpoints
    room(monkeypatch, free=params * 3, swap=0)
    with pytest.raises(NotEnoughMemory, match=r"load it in float16 \(as it is stored\) with --dtype float16"):
        load_model(paths[torch.float16], dtype="float32")
