"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))                # any writer that takes a path
    atomic_write_text(directory / "config.json", text)
    with atomic_path(out / "final", directory=True) as tmp:
        ...                                         # fill the folder tmp; it replaces out/final at the end

What is written gets the permissions the process umask gives any new file (0644 / 0755 under the usual
022), not the owner-only 0600 / 0700 of the temporary-file functions some writers use (safetensors,
`tempfile`): checkpoints on a shared file system must be readable by the people they are shared with.
An interrupted write leaves at most a ``NAME.tmp`` beside the target, removed by the next attempt.
What is written reaches the disk (fsync) before it takes its final name, and the rename is synced with
its folder: after a power cut or a crash of the machine the name holds the old version or the whole new
one, never a file whose blocks were not yet written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
FILE_MODE = 0o666  # before the umask, as open() creates files
DIR_MODE = 0o777  # before the umask, as mkdir() creates folders


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the umask's default permissions."""
    mask = current_umask()
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((DIR_MODE if p.is_dir() else FILE_MODE) & ~mask)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and every file in it) to the disk."""
    for p in ([path] + sorted(path.rglob("*"))) if path.is_dir() else [path]:
        if not p.is_symlink():
            _fsync_one(p)


def _fsync_one(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows cannot be opened: its files still are synced
        return
    try:
        os.fsync(fd)
    except OSError:  # a folder on some file systems
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield ``PATH.tmp`` to write to; on success it replaces ``path``, on error it is removed.

    ``directory=True`` creates ``PATH.tmp`` as an empty folder to fill. A folder that already exists at
    ``path`` is moved aside and deleted only once the new one is in place.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    _remove(tmp)  # what an interrupted earlier attempt left
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        _fsync(tmp)
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(path.name + OLD_SUFFIX)
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_one(path.parent)  # the rename itself
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (flock: released by the kernel if the process dies, however it
    dies), saying ``waiting`` on stderr first when another process holds it. Where there is no fcntl
    (Windows), no lock: the atomic rename still keeps readers from half-written results."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"qwen2audio: {waiting}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
