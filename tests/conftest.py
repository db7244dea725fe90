import atexit
import os
import shutil
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# The embedded default model is generated on first use; keep the tests' copy out of the user's cache, in a
# folder of this run's own that goes with it.
if not os.environ.get("QWEN2AUDIO_HOME"):
    os.environ["QWEN2AUDIO_HOME"] = tempfile.mkdtemp(prefix="qwen2audio-test-home-")
    atexit.register(shutil.rmtree, os.environ["QWEN2AUDIO_HOME"], ignore_errors=True)
# The decoding kernels are built once per machine (~30 s) where a user's are, not in each test home (every
# command-line test's subprocess has a home of its own): the default under the user's own cache.
os.environ.setdefault("QWEN2AUDIO_KERNEL_CACHE", str(Path.home() / ".cache" / "qwen2audio" / "kernels"))
# Tests that use "the default model" get the tiny random one, whatever ships: they never need the demo
# model's pretrained parts (tests/test_default_model.py covers the demo model with tiny parts).
os.environ["QWEN2AUDIO_DEFAULT_MODEL"] = "tiny-random"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine every op pays
    many times its cost in thread wake-ups (8 ms against 10 us for one small attention call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_home(tmp_path_factory):
    """QWEN2AUDIO_HOME in a temporary directory, so the default model is generated there."""
    home = tmp_path_factory.mktemp("qwen2audio_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN2AUDIO_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def default_model(default_home):
    """The default model the tests get (the tiny random one), loaded for each module that asks."""
    import warnings

    from qwen2audio import Qwen2Audio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using the default model ..."
        return Qwen2Audio.load()


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory):
    """The demo data generator's output at its tiny scale (python -m demo.make_data --scale tiny), made
    once; a test that changes it works on a copy."""
    if shutil.which("espeak-ng") is None or any(find_spec(m) is None for m in ("num2words", "mido")):
        why = "espeak-ng, num2words or mido is not installed (apt-get install espeak-ng; pip install num2words mido)"
        if os.environ.get("QWEN2AUDIO_REQUIRE_DEMO_DATA"):  # CI: the demo data's tests must run, not skip
            pytest.fail(why)
        pytest.skip(why)
    from demo import make_data

    out = tmp_path_factory.mktemp("demo") / "data"
    assert make_data.main(["--out", str(out), "--seed", "0", "--scale", "tiny", "--jobs", "2"]) == 0
    return out


@pytest.fixture(scope="module", params=["mha_untied_80", "gqa_tied_128"])
def reference_checkpoint(request, tmp_path_factory):
    """Each of the two reference model shapes (tests/reference.py) saved as a checkpoint directory."""
    from reference import TOKENIZER, hf_model

    path = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(path)
    TOKENIZER.save(path)
    return path



@pytest.fixture(scope="session", autouse=True)
def packed_kernel():
    """Build the packed-weight kernel (or find it cached) once, before any test: otherwise the first
    bfloat16 or int8 model would build it inside whatever test loads it, a server's start-up timeout
    included."""
    from qwen2audio.generation.kernels import packed_linear_op

    return packed_linear_op()
