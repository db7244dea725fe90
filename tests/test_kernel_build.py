"""How the kernel library is found, built and loaded (generation/kernels/__init__.py), with torch's
builder and loader replaced by fakes: a build that died midway, two processes building at once, a
machine without a compiler. Nothing here compiles; test_packed_linear.py tests what the library computes."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from qwen2audio.generation import kernels

GOOD = b"\x7fELF a whole library"


@pytest.fixture
def fake_builder(tmp_path, monkeypatch):
    """A kernel cache in tmp_path; ``builds`` counts the builder's calls, ``loaded`` holds the bytes of
    each library loaded. The builder writes the library in two halves with a pause between them, as a
    linker writes its output; it refuses to run where torch's own lock file is (torch would wait on it
    forever)."""
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    record = {"builds": 0, "loaded": []}

    def build(name, sources, build_directory, **kwargs):
        from pathlib import Path

        directory = Path(build_directory)
        assert not (directory / "lock").exists(), "torch's builder would wait on this lock file forever"
        record["builds"] += 1
        library = directory / f"{name}.so"
        library.write_bytes(GOOD[:5])
        time.sleep(0.3)
        library.write_bytes(GOOD)
        load(str(library))  # as torch's builder does with is_python_module=False

    def load(path):
        with open(path, "rb") as f:
            record["loaded"].append(f.read())

    monkeypatch.setattr(cpp_extension, "load", build)
    monkeypatch.setattr(torch.ops, "load_library", load)
    return record


def test_a_build_killed_midway_is_built_again_not_waited_on_nor_loaded_half_written(fake_builder):
    directory = kernels.build_dir()
    directory.mkdir(parents=True)
    (directory / "lock").touch()  # torch's lock, left by a builder killed with SIGTERM or SIGKILL
    (directory / f"{kernels.NAME}.so").write_bytes(GOOD[:5])  # its half-written library: SIGBUS if loaded

    kernels._load()
    assert fake_builder["builds"] == 1
    assert fake_builder["loaded"] == [GOOD]

    kernels._load()  # the next start loads the finished build as it is
    assert fake_builder["builds"] == 1
    assert fake_builder["loaded"] == [GOOD, GOOD]

    os.utime(directory / f"{kernels.NAME}.so", (1, 1))  # the cache copied elsewhere: new times, same library
    kernels._load()
    assert fake_builder["builds"] == 1


def test_a_start_during_another_build_waits_for_it_and_loads_the_whole_library(fake_builder):
    errors = []

    def start():
        try:
            kernels._load()
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    first = threading.Thread(target=start)
    first.start()
    time.sleep(0.1)  # the first is writing the library now
    second = threading.Thread(target=start)
    second.start()
    first.join()
    second.join()
    assert not errors
    assert fake_builder["builds"] == 1
    assert fake_builder["loaded"] == [GOOD, GOOD]  # never the half written


def test_a_library_the_loader_refuses_is_built_again(fake_builder, monkeypatch):
    kernels._load()
    refusals = []

    def refuse_once(path):
        if not refusals:
            refusals.append(path)
            raise OSError("undefined symbol: _ZN2at6Tensor")
        fake_builder["loaded"].append(open(path, "rb").read())

    monkeypatch.setattr(torch.ops, "load_library", refuse_once)
    kernels._load()
    assert refusals and fake_builder["builds"] == 2


def test_without_a_compiler_the_warning_says_what_is_missing_and_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {})

    def no_compiler(name, sources, build_directory, **kwargs):  # what torch's builder raises, shortened
        raise RuntimeError(f"Error building extension '{name}': [1/2] /usr/bin/g++ -MMD -c packed_linear.cpp\n"
                           "FAILED: packed_linear.o \n/usr/bin/g++ -MMD -c packed_linear.cpp -o packed_linear.o \n"
                           "/bin/sh: 1: /usr/bin/g++: not found\nninja: build stopped: subcommand failed.\n")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.packed_linear_op() is None
    assert kernels.build_problem() == "RuntimeError: /bin/sh: 1: /usr/bin/g++: not found"
    (message,) = [str(w.message) for w in caught if "decoding kernels" in str(w.message)]
    assert "g++: not found" in message and kernels.CACHE_ENV in message and str(tmp_path) in message


def test_an_unwritable_cache_is_named_in_the_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(kernels.CACHE_ENV, str(blocker / "kernels"))  # a folder cannot be made under a file
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.packed_linear_op() is None
    assert "NotADirectoryError" in kernels.build_problem()
    assert kernels.build_remedy() == f"make the folder writable, or set {kernels.CACHE_ENV} to one that is"
    (message,) = [str(w.message) for w in caught if "decoding kernels" in str(w.message)]
    assert kernels.CACHE_ENV in message and str(blocker / "kernels") in message


def test_the_kernels_are_kept_under_qwen2audio_home_and_a_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.delenv(kernels.CACHE_ENV, raising=False)
    monkeypatch.setenv("QWEN2AUDIO_HOME", str(tmp_path / "home"))
    assert kernels.build_dir().parent == tmp_path / "home" / "kernels"
    monkeypatch.setenv(kernels.CACHE_ENV, "~/kc")
    assert kernels.build_dir().parent == Path.home() / "kc"


def test_with_no_compiler_on_path_the_build_is_not_tried(tmp_path, monkeypatch):
    """Torch's builder, run with no compiler at all, printed a banner about an incompatible compiler
    version before failing; the missing compiler is said in our one warning instead."""
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("the builder ran without a compiler"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.packed_linear_op() is None
    assert kernels.build_problem() == "RuntimeError: no-such-compiler-here: not found (no C++ compiler)"
    assert kernels.build_remedy() == "install g++ and ninja"
    assert any("no-such-compiler-here: not found" in str(w.message) for w in caught)


def test_int8_without_the_kernels_says_it_decodes_slower_than_float32(monkeypatch):
    from qwen2audio.config import EncoderConfig, Qwen2AudioConfig, TextConfig
    from qwen2audio.generation import weights
    from qwen2audio.model import Qwen2AudioModel

    monkeypatch.setattr(kernels, "packed_linear_op", lambda: None)  # a machine without g++
    monkeypatch.setattr(kernels, "_state", {"problem": "RuntimeError: /bin/sh: 1: g++: not found",
                                           "remedy": "install g++ and ninja"})
    cfg = Qwen2AudioConfig(
        audio=EncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                            encoder_ffn_dim=64),
        text=TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model = Qwen2AudioModel(cfg).eval()
    with pytest.warns(UserWarning, match=r"quantize='int8' without the decoding kernels \(RuntimeError: .*g\+\+: not "
                                         r"found\).*slower than in float32.*install g\+\+ and ninja, or drop --quantize int8"):
        weights.prepare_for_inference(model, "int8")
    head = model.language_model.lm_head
    assert isinstance(head, weights.Int8Linear) and head._op is None
    x = torch.randn(3, 64)
    torch.testing.assert_close(head(x), x @ head.dequantized().T)


def test_the_build_finds_the_ninja_installed_beside_qwen2audio_with_the_environment_not_activated(monkeypatch):
    """torch runs `ninja --version` from PATH: a console script run by its full path (a service, cron, a
    container) had the pip-installed ninja off PATH, and the kernels were not built ("Ninja is required")."""
    import shutil

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with kernels._tools_on_path():
        found = shutil.which("ninja")
        assert found is not None
        assert os.path.realpath(found) != os.path.realpath(shutil.which("ninja", path="/usr/bin:/bin") or "/")
    assert os.environ["PATH"] == "/usr/bin:/bin"


@pytest.mark.parametrize("flags,vector", [("flags : fpu sse2 avx2 fma", True), ("flags : fpu sse2 avx512f", True),
                                          ("flags : fpu sse2 sse4_2 avx", False), ("Features : fp asimd", False)])
def test_kernels_are_used_only_where_their_vector_code_runs(flags, vector, monkeypatch, tmp_path):
    """Without AVX2 (every ARM CPU) they compile to plain loops, slower than torch's own products: such a
    CPU takes the torch paths, without a warning (nothing failed), and the int8 warning says why."""
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: flags)
    assert kernels._has_vector_code() is vector
    if vector:
        return
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.packed_linear_op() is None
    assert "neither AVX2 nor AVX-512" in kernels.build_problem()


def test_the_command_line_says_when_the_kernels_could_not_be_built(monkeypatch, recwarn):
    """chat, transcribe and eval hide the libraries' warnings at load: they hid this one too, and a
    decode in plain torch (int8 slower than float32) went unexplained."""
    import argparse

    from qwen2audio import api, cli
    from qwen2audio.errors import SpeedWarning

    class Loaded:
        class engine:
            compile_error = None

    def load(*args, **kwargs):
        warnings.warn("some library's deprecation", DeprecationWarning)
        warnings.warn("the decoding kernels could not be built (RuntimeError: Ninja is required)", SpeedWarning)
        return Loaded()

    monkeypatch.setattr(api.Qwen2Audio, "load", staticmethod(load))
    args = argparse.Namespace(model_dir=None, dtype="auto", device="cpu", quantize=None, compile=False, adapter=None)
    cli.load_quietly(args)  # (pytest records what would be printed on stderr)
    shown = [str(w.message) for w in recwarn]
    assert any("decoding kernels could not be built" in m for m in shown) and not any("deprecation" in m for m in shown)
