"""The errors a user can cause, importable without torch (the command line catches them before it
has loaded anything heavy). Each message names the input, the problem and what to do."""

from __future__ import annotations

import errno

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a write failed for want of room: a full disk, a quota
FULL_DISK_ERRNOS = (*NO_SPACE_ERRNOS, errno.EFBIG)  # ... or a file larger than its file system takes


def install_hint(extra: str) -> str:
    """The command that installs an optional part (an extra of pyproject.toml), as the README installs the
    project: from its checkout, with the constraints file that pins torch's CPU build."""
    return f"pip install -c constraints.txt -e '.[{extra}]' (in the qwen2audio checkout)"


class AudioError(ValueError):
    """Audio that cannot be used: the message names the source, the problem and what to do."""


class CheckpointError(ValueError):
    """The checkpoint directory does not hold what a Qwen2-Audio model needs."""


class NotEnoughMemory(ValueError):
    """A model that would not fit in the memory of the device it is loaded onto (said before loading)."""


class AudioWarning(UserWarning):
    """Audio that was used but is not what its file promised (e.g. a file cut short). Turn it into an
    error with ``warnings.simplefilter("error", AudioWarning)`` where partial audio must not pass."""


class SpeedWarning(UserWarning):
    """A slower path than the one asked for: the decoding kernels could not be built, int8 products
    without them. The command line shows these even while it hides the libraries' own warnings."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but asks for something qwen2audio does not do (a generation setting it does
    not implement): its replies may differ from transformers'. The command line shows
    these even while it hides the libraries' own warnings at load."""
