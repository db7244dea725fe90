"""Atomic writes: complete or absent, with the umask's permissions (not safetensors' owner-only 0600)."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from qwen2audio.atomic import atomic_path, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safetensors_file_gets_umask_mode(tmp_path, umask_022):
    target = tmp_path / "model.safetensors"
    with atomic_path(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
        assert mode(tmp) == 0o600  # what safetensors itself gives, fixed on the way into place
    assert mode(target) == 0o644
    assert not (tmp_path / "model.safetensors.tmp").exists()


def test_directory_replaces_old_one_and_gets_umask_modes(tmp_path, umask_022):
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        tmp.chmod(0o700)  # as tempfile.mkdtemp makes it
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert mode(target) == 0o755 and mode(target / "model.safetensors") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_failed_write_leaves_target_untouched(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_leftover_tmp_of_an_interrupted_run_is_replaced(tmp_path):
    (tmp_path / "out.tmp").mkdir()
    (tmp_path / "out.tmp" / "junk").write_text("x")
    with atomic_path(tmp_path / "out", directory=True) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "a").write_text("a")
    assert (tmp_path / "out" / "a").read_text() == "a"


def test_checkpoint_and_default_model_are_readable_by_others(tmp_path, umask_022):
    from qwen2audio.default_model import write_tiny_model

    write_tiny_model(tmp_path / "ckpt")  # save_model + the processor files, as every checkpoint writer
    files = list((tmp_path / "ckpt").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert mode(f) == 0o644, f


def _record_syncs(monkeypatch):
    """Every fsync and rename, in order, by path."""
    events, fds = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def fake_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        fds[fd] = os.fspath(path)
        return fd

    def fake_fsync(fd):
        events.append(("fsync", fds.get(fd)))
        real_fsync(fd)

    def fake_replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", fake_fsync)
    monkeypatch.setattr(os, "replace", fake_replace)
    return events


def test_file_reaches_the_disk_before_its_rename_and_the_rename_is_synced(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    target = tmp_path / "model.safetensors"
    with atomic_path(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert events == [("fsync", str(tmp)), ("replace", str(tmp), str(target)), ("fsync", str(tmp_path))]


def test_every_file_of_a_folder_is_synced_before_the_folder_takes_its_name(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    target = tmp_path / "step-10"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.json").write_text("{}")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    synced_before = {e[1] for e in events[: events.index(("replace", str(tmp), str(target)))] if e[0] == "fsync"}
    assert {str(tmp), str(tmp / "a.json"), str(tmp / "sub"), str(tmp / "sub" / "b.bin")} <= synced_before
    assert events[-1] == ("fsync", str(tmp_path))
