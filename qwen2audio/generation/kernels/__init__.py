"""Small CPU kernels of our own, compiled on first use with the compiler torch's C++ extensions use.

    op = packed_linear_op()   # torch.ops.qwen2audio.packed_linear, or None (``build_problem()`` says why)
    y = op(x, w, scale, bias)   # x float32 (M, K); w int8 (with scale), bfloat16 or float32; (N, K) or packed;
                                # x bfloat16 with w bfloat16: y bfloat16 (summed in float32, rounded once)
    attend = decode_attention_op()   # attend(q, k, v, mask, scale): one query per row over the KV cache
    norm = rms_norm_op()   # norm(x, weight, eps): the model's RMSNorm in one pass (float32 or bfloat16)
    rope = rope_op()   # rope(q, k, cos, sin): rotate-half RoPE on q and k, in place
    tag = compile_cache_tag()   # what torch.compile's on-disk caches must also key on (see there)

The build (g++ and ninja, ~30 s, once) lands in ``$QWEN2AUDIO_KERNEL_CACHE`` (default
``~/.cache/qwen2audio/kernels``) in a folder named after the source, the torch version and this CPU's
instruction sets (the code is compiled for the machine it runs on), so a changed source, torch or CPU
builds anew. Concurrent first uses wait for one build (an flock on ``build.lock``, which the kernel
releases if the builder dies); a library is loaded only once a finished build has marked it
(``ready``), so a process never loads one still being linked, or one a killed build left half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from ...errors import SpeedWarning

SOURCE = Path(__file__).with_name("packed_linear.cpp")
NAME = "qwen2audio_packed_linear"  # the library's file name, without .so
CACHE_ENV = "QWEN2AUDIO_KERNEL_CACHE"
DISABLE_ENV = "QWEN2AUDIO_NO_KERNELS"  # set (to anything but 0): never build, use the plain torch paths

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    from ...default_model import cache_root  # $QWEN2AUDIO_HOME, where the models are kept too

    root = Path(os.environ.get(CACHE_ENV) or cache_root() / "kernels").expanduser()
    key = hashlib.sha256(SOURCE.read_bytes() + Path(__file__).read_bytes() + torch.__version__.encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    return root / f"packed_linear-{key}"


READY = "ready"  # written beside the library once it is built and loaded: the library's sha256
BUILD_LOCK = "build.lock"  # flock'd while a process builds; torch's own lock file is "lock"


def _stamp(library: Path) -> str:
    """What the mark holds: the library's content (~0.3 MB, hashed in about a millisecond), so that a copied
    cache (new mtimes) stays ready and a half-written library never is."""
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _ready(directory: Path, library: Path) -> bool:
    """A finished build is there: the library with the mark a completed build wrote for it."""
    try:
        return (directory / READY).read_text() == _stamp(library)
    except OSError:
        return False


def _load() -> None:
    """Load the library built for this source, torch and CPU; build it first where there is none. A
    finished build is loaded as it is: asking the builder again costs ~0.2 s of ninja at every start."""
    directory = build_dir()
    library = directory / f"{NAME}.so"
    refused = False
    if _ready(directory, library):
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:  # the loader refused it (a missing symbol, say): build it again
            refused = True
    from torch.utils import cpp_extension

    from ...atomic import atomic_write_text, exclusive_lock

    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / BUILD_LOCK, "waiting for another process building the decoding kernels "
                                                f"({directory / BUILD_LOCK})"):
        if not refused and _ready(directory, library):  # another process built it while this one waited
            torch.ops.load_library(str(library))
            return
        # No process of ours builds here now: torch's lock file and an unmarked library are what a build
        # that died left (loading a half-written library kills the process with SIGBUS); ninja would
        # take that library for up to date, so it goes, and the builder links it again.
        for leftover in (directory / READY, directory / "lock", library):
            leftover.unlink(missing_ok=True)
        with _tools_on_path():
            compiler = os.environ.get("CXX") or "c++"  # what torch's builder runs
            if shutil.which(compiler) is None:  # said here: torch's builder would say the compiler is the
                raise RuntimeError(f"{compiler}: not found (no C++ compiler)")  # wrong version, not missing
            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja: not found")
            cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(directory),
                               # -fopenmp: at::parallel_for is inline OpenMP code, serial without it;
                               # -ffp-contract=off: no product fused into a sum where torch rounds in between
                               extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        atomic_write_text(directory / READY, _stamp(library))


@contextlib.contextmanager
def _tools_on_path():
    """PATH with this Python's own scripts folder first while the kernels build: torch finds ninja by
    running ``ninja --version`` from PATH, and the ninja that pip installed beside qwen2audio is in the
    environment's bin/, which is not on PATH where the environment is not activated (a console script run
    by its full path, a service, cron, a container's entrypoint)."""
    before = os.environ.get("PATH")
    scripts = [str(Path(sys.executable).parent)]
    try:
        import ninja  # the pip package: its binary's folder, wherever it installs it

        scripts.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(scripts + ([before] if before else []))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _has_vector_code() -> bool:
    """Whether this CPU runs the kernels' vector code (AVX2 with FMA, or AVX-512): elsewhere (every ARM
    CPU, x86 before AVX2) they compile to plain loops, slower than torch's own products (measured on an
    x86 build without AVX2: a 896 -> 4864 float32 product 4.3 ms against torch's 2.4 ms)."""
    flags = _cpu_flags().split()
    return "avx512f" in flags or ("avx2" in flags and "fma" in flags)


def _summary(err: Exception) -> str:
    """The line of a build error that says what went wrong ("g++: not found", the compiler's "error:"),
    not the last one, which for any failed compile is "ninja: build stopped: subcommand failed."."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    telling = [line for line in lines[1:] if re.search(r"not found|error:|No such file|fatal", line, re.IGNORECASE)]
    return (telling or lines or [""])[0 if telling else -1]


def packed_linear_op() -> Callable | None:
    """The compiled linear on int8 / bfloat16 / float32 weights (built and loaded once per process), or
    None where it cannot be built:
    no C++ compiler or ninja, not a CPU torch can build for, or ``QWEN2AUDIO_NO_KERNELS`` set."""
    with _lock:
        if "op" not in _state:
            _state["op"], _state["problem"], _state["remedy"] = None, None, None
            if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
                _state["problem"], _state["remedy"] = f"{DISABLE_ENV} is set", "unset it"
            elif not _has_vector_code():  # not a failure: torch's own products are the faster ones here
                _state["problem"] = ("this CPU has neither AVX2 nor AVX-512, which the kernels' vector code "
                                     "is written for")
            else:
                try:
                    _load()
                    _register_fakes()
                    _state["op"] = torch.ops.qwen2audio.packed_linear
                except Exception as err:  # a missing compiler or ninja, a failed compile: the plain path works
                    _state["problem"] = f"{type(err).__name__}: {_summary(err)}"
                    _state["remedy"] = ("make the folder writable, or set " + CACHE_ENV + " to one that is"
                                        if isinstance(err, OSError) else "install g++ and ninja")
                    warnings.warn(f"the decoding kernels could not be built ({_state['problem']}); decoding "
                                  "products and attention run in plain torch, correct but slower (they need ninja, "
                                  "pip install ninja, a C++ compiler, apt-get install g++, and a writable "
                                  f"{CACHE_ENV} folder, now {build_dir().parent}; {DISABLE_ENV}=1 silences "
                                  "this)", SpeedWarning, stacklevel=3)
        return _state["op"]  # type: ignore[return-value]


def _register_fakes() -> None:
    """Shapes and dtypes of the ops' results without running them, which torch.compile needs to trace a
    decoding step through them (``Engine(compile=True)``); the C++ code is what runs."""
    @torch.library.register_fake("qwen2audio::packed_linear")
    def _packed_linear(x, w, scale, bias):
        out = w.shape[0] * w.shape[2] if w.dim() == 4 else w.shape[0]  # packed: (N/4, K/32, 4, 32)
        return x.new_empty((x.shape[0], out))  # in x's dtype: float32, or bfloat16 for bfloat16 activations

    @torch.library.register_fake("qwen2audio::decode_attention")
    def _decode_attention(q, k, v, mask, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("qwen2audio::rms_norm")
    def _rms_norm(x, weight, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake("qwen2audio::rope_")
    def _rope(q, k, cos, sin):
        return None


def decode_attention_op() -> Callable | None:
    """torch.ops.qwen2audio.decode_attention (one new token's attention over a float32 KV cache), built
    with the packed linear, or None where the kernels cannot be built."""
    return None if packed_linear_op() is None else torch.ops.qwen2audio.decode_attention


def rms_norm_op() -> Callable | None:
    """torch.ops.qwen2audio.rms_norm (x, weight, eps), or None where the kernels cannot be built."""
    return None if packed_linear_op() is None else torch.ops.qwen2audio.rms_norm


def rope_op() -> Callable | None:
    """torch.ops.qwen2audio.rope_ (q, k, cos, sin; in place), or None where the kernels cannot be built."""
    return None if packed_linear_op() is None else torch.ops.qwen2audio.rope_


def compile_cache_tag() -> str:
    """A tag for ``torch.compiler.config.cache_key_tag`` while graphs that call these ops compile: the
    kernels' build folder name (their source, the fake implementations in this file, torch and the CPU),
    or "" where this process has not loaded them (then no graph of its calls them). torch's compile
    caches (AOTAutograd's and inductor's FX graph cache, ``/tmp/torchinductor_$USER`` by default) key on
    the traced graph, which names our ops but says nothing of what they return: a compiled step cached
    by a build whose ``packed_linear`` gave float32 sums read a newer build's bfloat16 sums as float32,
    and its logits came out NaN."""
    return f"qwen2audio-kernels-{build_dir().name}" if _state.get("op") is not None else ""


def build_problem() -> str | None:
    """Why ``packed_linear_op()`` answered None (None when it was built or has not been asked for)."""
    return _state.get("problem")  # type: ignore[return-value]


def build_remedy() -> str | None:
    """What would let the kernels be used ("install g++ and ninja"), None where nothing would (a CPU
    without their vector code) or they are."""
    return _state.get("remedy")  # type: ignore[return-value]
