"""The default model: the demo model, assembled on first use from pretrained parts in pinned packages and the
trained deltas that ship in qwen2audio/demo/ (the tiny random model where an installation has no deltas).

Everything runs on tiny stand-ins: a tiny Whisper as a CTranslate2 model.bin and a tiny Qwen2 as a GGUF
with its tokenizer (written as llama.cpp writes them), each cut into pieces and laid out as installed
distributions on sys.path, as the real part packages are. The checks compute what the assembly must
give independently: ``qwen2audio init`` of the same files, the projector replaced, and each LoRA
adapter merged here as W + (alpha / r) * B @ A in float32.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen2audio import default_model
from qwen2audio.checkpoint import load_model
from qwen2audio.checkpoint.init import init_checkpoint
from qwen2audio.cli import main as cli_main
from qwen2audio.demo import DEMO_NOTICE, __main__ as demo_cli, assemble, parts
from qwen2audio.demo.deltas import DeltasError, _cast, combine_stages, export_deltas, load_deltas
from qwen2audio.generation.params import transcription_defaults
from qwen2audio.demo.parts import PartsError, Piece, PretrainedFile
from qwen2audio.text import Tokenizer
from reference import VOCAB, clip, hf_features
from source_models import tiny_qwen2, tiny_whisper, tokenizer_without_audio_tokens, write_gguf, write_whisper_ct2
from training_helpers import train

pytestmark = pytest.mark.usefixtures("one_thread")

SPARE_ROWS = 5  # embedding rows without a token, as the real GGUF has 271
N_TOKENS = VOCAB - 3  # the test tokenizer without the audio tokens
VERSION = "1.0.0"
PROJECTOR = ("multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias")
LAYER = "language_model.model.layers.{}."
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
RANK, ALPHA = 4, 8.0


# ---- tiny parts, installed as the real ones are ----------------------------------------------------

def _install_pieces(site: Path, source: Path, package: str, n_pieces: int, what: str) -> PretrainedFile:
    """Cut ``source`` into ``n_pieces`` distributions ``package-part1..N`` under ``site`` (module dir with
    data/NAME.partK, dist-info with METADATA), as the real part packages are laid out."""
    data = source.read_bytes()
    bounds = [len(data) * k // n_pieces for k in range(n_pieces + 1)]
    pieces = []
    for k in range(1, n_pieces + 1):
        module = f"{package.replace('-', '_')}_part{k}"
        chunk = data[bounds[k - 1]:bounds[k]]
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
        (site / module / "data" / f"{source.name}.part{k}").write_bytes(chunk)
        info = site / f"{module}-{VERSION}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}-part{k}\nVersion: {VERSION}\n")
        pieces.append(Piece(f"{package}-part{k}", VERSION, f"{module}/data/{source.name}.part{k}", len(chunk),
                            hashlib.sha256(chunk).hexdigest()))
    return PretrainedFile(name=source.name, what=what, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                          pieces=tuple(pieces))


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """(site dir, the parts spec, the whole model.bin, the whole GGUF)."""
    root = tmp_path_factory.mktemp("parts")
    write_whisper_ct2(root / "model.bin", tiny_whisper())
    write_gguf(root / "llm.gguf", tiny_qwen2(tied=False, vocab=N_TOKENS + SPARE_ROWS, seed=2),
               tokenizer_json=tokenizer_without_audio_tokens().backend.to_str())
    site = root / "site"
    files = {"encoder": _install_pieces(site, root / "model.bin", "tiny-whisper", 2, "tiny Whisper"),
             "llm": _install_pieces(site, root / "llm.gguf", "tiny-qwen", 3, "tiny Qwen2")}
    return site, files, root / "model.bin", root / "llm.gguf"


@pytest.fixture
def installed(tiny_parts, monkeypatch):
    """The tiny parts installed and pinned as the demo model's parts."""
    site, files, _, _ = tiny_parts
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(parts, "DEMO_PARTS", files)
    return files


@pytest.fixture(scope="module")
def base(tiny_parts, tmp_path_factory):
    """What `qwen2audio init` makes of the tiny parts (float32): the model the deltas apply to."""
    _, _, model_bin, gguf = tiny_parts
    out = tmp_path_factory.mktemp("base") / "base"
    init_checkpoint(model_bin, gguf, out, dtype="float32")
    return out


def _state(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_model(directory).state_dict().items()}


def write_synthetic_deltas(path: Path, base_state: dict, files: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deltas file written by hand as its format is documented (qwen2audio/demo/deltas.py): a projector and
    LoRA adapters in float16, the metadata JSON. Returns the tensors it holds."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {key: (0.05 * torch.randn(base_state[key].shape, generator=gen)).half() for key in PROJECTOR}
    for layer in range(2):
        for target in LORA_TARGETS:
            out_dim, in_dim = base_state[LAYER.format(layer) + target + ".weight"].shape
            tensors[LAYER.format(layer) + target + ".lora_A"] = (0.1 * torch.randn(RANK, in_dim, generator=gen)).half()
            tensors[LAYER.format(layer) + target + ".lora_B"] = (0.1 * torch.randn(out_dim, RANK, generator=gen)).half()
    info = {"format_version": 1, "lora_scale": ALPHA / RANK,
            "base": {part: {"sha256": spec.sha256} for part, spec in files.items()}}
    save_file(tensors, str(path), metadata={"format": "pt", "qwen2audio.deltas": json.dumps(info)})
    return tensors


def expected_state(base_state: dict, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """init's model, the projector replaced, each adapter merged: computed here, not by the code under test."""
    out = dict(base_state)
    for key in PROJECTOR:
        out[key] = deltas[key].float()
    for key, a in deltas.items():
        if key.endswith(".lora_A"):
            stem = key.removesuffix(".lora_A")
            b = deltas[stem + ".lora_B"]
            out[stem + ".weight"] = base_state[stem + ".weight"] + (ALPHA / RANK) * (b.float() @ a.float())
    return out


# ---- the assembly ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assembled_is_init_plus_projector_plus_merged_lora(installed, base, tmp_path, dtype):
    base_state = _state(base)
    deltas = write_synthetic_deltas(tmp_path / "deltas.safetensors", base_state, installed)
    assemble.assemble_demo(tmp_path / "deltas.safetensors", tmp_path / "demo", dtype=dtype, progress=False)
    got, expected = _state(tmp_path / "demo"), expected_state(base_state, deltas)
    assert got.keys() == expected.keys()
    changed = [k for k in got if not torch.equal(got[k], expected[k].to(dtype))]
    assert changed == []
    assert not torch.equal(got[LAYER.format(1) + "mlp.down_proj.weight"],
                           base_state[LAYER.format(1) + "mlp.down_proj.weight"].to(dtype))  # the merge did something
    # config, tokenizer and processor files are init's; the scratch files are gone
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "demo" / name).read_text() == (base / name).read_text()
    # init's generation settings, and how the demo model cuts long audio for transcription
    generation = json.loads((tmp_path / "demo" / "generation_config.json").read_text())
    assert generation == {**json.loads((base / "generation_config.json").read_text()),
                          "transcription": assemble.DEMO_TRANSCRIPTION}
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(
        [p.name for p in base.iterdir()] + [assemble.INFO_FILE])


def test_base_command_writes_what_init_writes(installed, base, tmp_path, capsys):
    """The training base of the demo model, assembled from the installed parts, is `qwen2audio init`'s output."""
    assert demo_cli.main(["base", "--out", str(tmp_path / "base")]) == 0
    got, expected = _state(tmp_path / "base"), _state(base)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == sorted(p.name for p in base.iterdir())
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert (tmp_path / "base" / name).read_text() == (base / name).read_text()
    assert demo_cli.main(["base", "--out", str(tmp_path / "base")]) == 2  # not over a finished folder
    assert "exists and is not empty" in capsys.readouterr().err


def test_demo_commands_say_in_one_line_why_a_folder_cannot_be_written(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "base"  # under a file: the folder cannot be made
    assert demo_cli.main(["base", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qwen2audio: error: ") and str(tmp_path / "a-file") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    full = demo_cli._os_error(OSError(errno.ENOSPC, "No space left on device", "/mnt/d.safetensors"))
    assert full.startswith("No space left on device: /mnt/d.safetensors; free disk space there")
    denied = demo_cli._os_error(PermissionError(errno.EACCES, "Permission denied", "/opt/out"))
    assert "choose a path you can write" in denied


@torch.no_grad()
def test_transformers_loads_the_assembled_model(installed, base, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    write_synthetic_deltas(tmp_path / "deltas.safetensors", _state(base), installed)
    assemble.assemble_demo(tmp_path / "deltas.safetensors", tmp_path / "demo", dtype=torch.float32, progress=False)
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "demo", attn_implementation="eager").eval()
    ours = load_model(tmp_path / "demo")
    tok = Tokenizer.from_dir(tmp_path / "demo")
    assert tok.audio_id == N_TOKENS and ours.config.text.vocab_size == N_TOKENS + SPARE_ROWS  # a spare row reused
    feats, fmask = hf_features([clip(1.5, 0)], 80)
    n_audio = int(ours.audio_tower(feats, fmask.sum(-1))[1][0])
    ids = torch.tensor([[5, 6, tok.audio_bos_id] + [tok.audio_id] * n_audio + [tok.audio_eos_id, 9, 10]])
    expected = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                   attention_mask=torch.ones_like(ids)).logits
    assert (ours(ids, feats, fmask.sum(-1)) - expected).abs().max().item() < 1e-4


def test_missing_parts_name_the_extra(tiny_parts, monkeypatch, base, tmp_path, capsys):
    _, files, _, _ = tiny_parts  # pinned, but not on sys.path
    monkeypatch.setattr(parts, "DEMO_PARTS", files)
    write_synthetic_deltas(tmp_path / "deltas.safetensors", _state(base), files)
    expected = ("the default model is assembled from pretrained parts: pip install -c constraints.txt -e '.[demo]' "
                "(in the qwen2audio checkout) (about 600 MB), "
                "or pass a model directory (tiny-whisper-part1 is not installed; tiny-whisper-part2 is not installed; "
                "tiny-qwen-part1 is not installed; tiny-qwen-part2 is not installed; tiny-qwen-part3 is not installed)")
    with pytest.raises(PartsError) as err:
        assemble.assemble_demo(tmp_path / "deltas.safetensors", tmp_path / "demo", progress=False)
    assert str(err.value) == expected
    # the command line says it in one line, and writes nothing
    _ship(monkeypatch, tmp_path / "deltas.safetensors", tmp_path / "home")
    capsys.readouterr()
    assert cli_main(["chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines == [f"qwen2audio: {DEMO_NOTICE}", f"qwen2audio: error: {expected}"]
    assert [p.name for p in (tmp_path / "home").iterdir() if not p.name.endswith(".lock")] == []


def _copy_site(site: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(site, to)
    return to


def test_a_changed_piece_fails_naming_its_package(tiny_parts, monkeypatch, base, tmp_path):
    site, files, _, _ = tiny_parts
    monkeypatch.setattr(parts, "DEMO_PARTS", files)
    write_synthetic_deltas(tmp_path / "deltas.safetensors", _state(base), files)
    changed = _copy_site(site, tmp_path / "site")
    piece = changed / files["llm"].pieces[1].path
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF
    piece.write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(changed))
    with pytest.raises(PartsError, match=re.escape(f"{piece} (from tiny-qwen-part2==1.0.0) has {len(data)} bytes with "
                                                   "sha256 ") + r"[0-9a-f]{64}; the default model was built for "
                                       + re.escape(f"{len(data)} bytes with sha256 {files['llm'].pieces[1].sha256}: "
                                                   "the package's upload changed")):
        assemble.assemble_demo(tmp_path / "deltas.safetensors", tmp_path / "demo", progress=False)


def test_another_version_of_a_part_is_named(tiny_parts, monkeypatch, base, tmp_path):
    site, files, _, _ = tiny_parts
    monkeypatch.setattr(parts, "DEMO_PARTS", files)
    write_synthetic_deltas(tmp_path / "deltas.safetensors", _state(base), files)
    other = _copy_site(site, tmp_path / "site")
    info = other / f"tiny_whisper_part2-{VERSION}.dist-info" / "METADATA"
    info.write_text(info.read_text().replace(f"Version: {VERSION}", "Version: 1.0.1"))
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(PartsError, match=r"\(tiny-whisper-part2 is version 1\.0\.1, not 1\.0\.0\)$"):
        assemble.assemble_demo(tmp_path / "deltas.safetensors", tmp_path / "demo", progress=False)


def test_deltas_for_other_parts_or_shapes_are_refused_before_any_work(installed, base, tmp_path):
    base_state = _state(base)
    other = {part: PretrainedFile(spec.name, spec.what, spec.size, "0" * 64, spec.pieces)
             for part, spec in installed.items()}
    write_synthetic_deltas(tmp_path / "other.safetensors", base_state, other)
    with pytest.raises(DeltasError, match="was trained on other pretrained parts"):
        assemble.assemble_demo(tmp_path / "other.safetensors", tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists()
    bad = dict(base_state)
    bad[PROJECTOR[0]] = torch.zeros(3, 3)
    write_synthetic_deltas(tmp_path / "bad.safetensors", bad, installed)
    expected = (f"does not fit the assembled model: {PROJECTOR[0]} has shape (3, 3), the model's "
                f"{tuple(base_state[PROJECTOR[0]].shape)}")
    with pytest.raises(DeltasError, match=re.escape(expected)):
        assemble.assemble_demo(tmp_path / "bad.safetensors", tmp_path / "o2", progress=False)


# ---- which model is the default ---------------------------------------------------------------------

def _ship(monkeypatch, deltas: Path | None, home: Path) -> None:
    """As if this installation shipped ``deltas`` (None: no deltas file yet), with no override."""
    import qwen2audio.demo

    monkeypatch.delenv("QWEN2AUDIO_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("QWEN2AUDIO_HOME", str(home))
    monkeypatch.setattr(qwen2audio.demo, "DELTAS_FILE", deltas if deltas is not None else home / "absent.safetensors")


def test_the_default_is_the_tiny_model_until_deltas_ship_then_the_demo(installed, base, tmp_path, monkeypatch):
    home = tmp_path / "home"
    _ship(monkeypatch, None, home)
    assert default_model.default_model_dir() == home / "tiny-random-v1"
    assert default_model.default_notice() == default_model.TINY_NOTICE
    assert default_model.default_model_name() == "tiny-random-v1"

    deltas = tmp_path / "deltas.safetensors"
    tensors = write_synthetic_deltas(deltas, _state(base), installed)
    _ship(monkeypatch, deltas, home)
    demo = default_model.default_model_dir()
    sha = hashlib.sha256(deltas.read_bytes()).hexdigest()
    assert demo == home / f"demo-v{assemble.ASSEMBLY_VERSION}-{sha[:16]}"
    assert default_model.default_model_name() == demo.name and default_model.default_notice() == DEMO_NOTICE
    assert torch.equal(load_model(demo).multi_modal_projector.linear.bias, tensors[PROJECTOR[1]].to(torch.bfloat16))
    info = json.loads((demo / assemble.INFO_FILE).read_text())
    assert info["deltas_sha256"] == sha and info["assembly_version"] == assemble.ASSEMBLY_VERSION
    # the demo model transcribes long audio one stretch of speech at a time, with 4 beams and the fallback, by
    # its generation_config.json, which transformers still reads (it keeps the key and does not use it)
    assert transcription_defaults(demo / "generation_config.json") == {"chunk_seconds": 30.0, "cut_at_pauses": 0.3,
                                                                       "num_beams": 4, "fallback": True}
    transformers = pytest.importorskip("transformers")
    generation = transformers.GenerationConfig.from_pretrained(demo)
    assert generation.transcription == {"cut_at_pauses": 0.3, "num_beams": 4, "fallback": True}
    assert generation.eos_token_id is not None
    assert sorted(p.name for p in home.iterdir()) == sorted(["tiny-random-v1", "tiny-random-v1.lock", demo.name,
                                                             demo.name + ".lock"])

    # a new deltas file is another model, assembled anew; the older one is left for the user to delete
    write_synthetic_deltas(deltas, _state(base), installed, seed=1)
    assert default_model.default_model_dir() != demo and (demo / "config.json").is_file()


def test_the_override_names_a_directory_or_the_tiny_model(monkeypatch, tmp_path, base):
    import qwen2audio.demo

    monkeypatch.setenv("QWEN2AUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(qwen2audio.demo, "DELTAS_FILE", base / "config.json")  # "shipped": the override must win
    monkeypatch.setenv("QWEN2AUDIO_DEFAULT_MODEL", str(base))
    assert default_model.default_model_dir() == base
    assert default_model.default_notice() == f"using the default model from $QWEN2AUDIO_DEFAULT_MODEL: {base}"
    monkeypatch.setenv("QWEN2AUDIO_DEFAULT_MODEL", "tiny-random")
    assert default_model.default_model_dir() == tmp_path / "home" / "tiny-random-v1"
    monkeypatch.setenv("QWEN2AUDIO_DEFAULT_MODEL", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(f"QWEN2AUDIO_DEFAULT_MODEL={tmp_path}: no checkpoint there "
                                                          "(config.json is missing)")):
        default_model.default_model_dir()


def test_concurrent_first_runs_assemble_once(installed, base, tmp_path, monkeypatch, capsys):
    """Two first runs at once: one assembles, the other waits for it, both get the same folder."""
    deltas = tmp_path / "deltas.safetensors"
    write_synthetic_deltas(deltas, _state(base), installed)
    _ship(monkeypatch, deltas, tmp_path / "home")
    calls, entered = [], threading.Event()
    real = assemble.assemble_demo

    def slow_assemble(*args, **kwargs):
        calls.append(threading.get_ident())
        entered.set()
        time.sleep(0.5)  # long enough for the other run, started now, to find the lock taken
        return real(*args, **kwargs)

    monkeypatch.setattr(assemble, "assemble_demo", slow_assemble)
    results, errors = [], []

    def first_run():
        try:
            results.append(default_model.default_model_dir())
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    threads[0].start()
    assert entered.wait(timeout=60)  # the first run holds the lock and is assembling
    threads[1].start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file()
    assert "another process is writing the default model into" in capsys.readouterr().err


def test_two_processes_generating_the_tiny_model_both_succeed(tmp_path):
    import os

    env = {**os.environ, "QWEN2AUDIO_HOME": str(tmp_path), "QWEN2AUDIO_DEFAULT_MODEL": "tiny-random"}
    code = "from qwen2audio.default_model import default_model_dir; print(default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "tiny-random-v1")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random-v1", "tiny-random-v1.lock"]


def test_a_damaged_cached_model_is_written_again(installed, base, tmp_path, monkeypatch, capsys):
    """A cached model cut short or garbled since it was written (a disk error, a copy or sync gone wrong) is
    written again, not loaded (a bare traceback, or 're-download it' for a file nobody downloaded)."""
    deltas = tmp_path / "deltas.safetensors"
    write_synthetic_deltas(deltas, _state(base), installed)
    _ship(monkeypatch, deltas, tmp_path / "home")
    calls = []
    real = assemble.assemble_demo
    monkeypatch.setattr(assemble, "assemble_demo", lambda *a, **k: (calls.append(1), real(*a, **k)))
    demo = default_model.default_model_dir()
    weights = demo / "model.safetensors"
    whole = weights.read_bytes()
    assert default_model.default_model_dir() == demo and len(calls) == 1  # intact: used as it is
    capsys.readouterr()
    weights.write_bytes(whole[: len(whole) // 2])
    assert default_model.default_model_dir() == demo and len(calls) == 2
    assert weights.read_bytes() == whole
    assert f"qwen2audio: the default model in {demo} is damaged ({weights} is truncated" in capsys.readouterr().err
    (demo / "config.json").write_text('{"model_type": "qwen2_au')
    assert default_model.default_model_dir() == demo and len(calls) == 3
    json.loads((demo / "config.json").read_text())
    (demo / "tokenizer.json").unlink()
    assert default_model.default_model_dir() == demo and len(calls) == 4
    assert load_model(demo) is not None and Tokenizer.from_dir(demo) is not None
    # the tiny random model too
    monkeypatch.setenv("QWEN2AUDIO_DEFAULT_MODEL", "tiny-random")
    tiny = default_model.default_model_dir()
    whole = (tiny / "model.safetensors").read_bytes()
    (tiny / "model.safetensors").write_bytes(whole[:1000])
    assert default_model.default_model_dir() == tiny and (tiny / "model.safetensors").read_bytes() == whole
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == sorted(
        [demo.name, demo.name + ".lock", tiny.name, tiny.name + ".lock"])  # nothing left aside


def test_a_cache_folder_that_cannot_be_written_is_one_line(monkeypatch, tmp_path, capsys):
    """A read-only cache folder or a full disk: one line naming the folder and $QWEN2AUDIO_HOME, not a traceback."""
    import errno

    monkeypatch.setenv("QWEN2AUDIO_DEFAULT_MODEL", "tiny-random")
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "cache"  # under a file: cannot be made, as a folder without write permission
    monkeypatch.setenv("QWEN2AUDIO_HOME", str(home))
    assert cli_main(["chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qwen2audio: error: cannot write the tiny random model into {home / 'tiny-random-v1'}: Not a "
                       f"directory ({home}); make {home} writable, or set $QWEN2AUDIO_HOME to a folder you can write "
                       "(or pass a model directory)")
    assert len(err) == 2
    # two folders to make on a read-only file system (~/.cache/qwen2audio in a read-only home): the outer one fails
    (tmp_path / "ro").mkdir()
    outer, deeper = tmp_path / "ro" / "cache", tmp_path / "ro" / "cache" / "qwen2audio"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == outer:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setenv("QWEN2AUDIO_HOME", str(deeper))
    assert cli_main(["chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"qwen2audio: error: cannot write the tiny random model into {deeper / 'tiny-random-v1'}: "
                              f"Read-only file system ({outer})") and len(err) == 2, err
    monkeypatch.setattr(Path, "mkdir", real_mkdir)

    def full_disk(directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(default_model, "write_tiny_model", full_disk)
    home = tmp_path / "home"
    monkeypatch.setenv("QWEN2AUDIO_HOME", str(home))
    with pytest.raises(default_model.CheckpointError, match=re.escape(
            f"cannot write the tiny random model into {home / 'tiny-random-v1'}: No space left on device; free disk "
            "space there, or set $QWEN2AUDIO_HOME to a folder on a disk with room (or pass a model directory)")):
        default_model.default_model_dir()
    assert [p.name for p in home.iterdir()] == ["tiny-random-v1.lock"]  # the half-written folder is gone


def test_the_cache_folder_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("QWEN2AUDIO_HOME", "")  # set but empty: the default, not the current directory
    assert default_model.cache_root() == tmp_path / ".cache" / "qwen2audio"
    monkeypatch.setenv("QWEN2AUDIO_HOME", "~/models")  # quoted in a config file, so no shell expanded it
    assert default_model.cache_root() == tmp_path / "models"


# ---- exporting from training runs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Two chained LoRA runs from the base: SFT (rank 2, alpha 4), then SFT again from its final (rank 4, alpha 16)."""
    from qwen2audio.data.synthetic import write_synthetic_set

    root = tmp_path_factory.mktemp("runs")
    data = write_synthetic_set(root / "data")
    common = dict(train_data=str(data["sft"]), trainable=["projector", "llm"], max_steps=2, save_every=2)
    train("sft", model=str(base), output_dir=str(root / "one"), lora_rank=2, lora_alpha=4.0, **common)
    train("sft", model=str(root / "one" / "final"), output_dir=str(root / "two"), lora_rank=4, lora_alpha=16.0,
          lora_targets=["q_proj", "down_proj"], **common)
    return root / "one", root / "two"


def test_exported_deltas_reassemble_the_runs_final_model(installed, runs, tmp_path, capsys):
    one, _ = runs
    assert demo_cli.main(["export-deltas", str(one), str(tmp_path / "d.safetensors"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'd.safetensors'}: 2 full tensor(s), 14 LoRA adapter(s)")
    deltas = load_deltas(tmp_path / "d.safetensors")
    assert deltas.scale == 2.0 and deltas.info["base"]["llm"]["sha256"] == installed["llm"].sha256
    assert deltas.info["provenance"]["runs"][0]["step"] == 2 and deltas.info["lora_rank"] == [2]
    assemble.assemble_demo(tmp_path / "d.safetensors", tmp_path / "demo", dtype=torch.float32, progress=False)
    got, final = _state(tmp_path / "demo"), _state(one / "final")
    assert [k for k in final if not torch.equal(got[k], final[k])] == []


def test_chained_runs_stack_their_adapters(installed, runs, tmp_path):
    one, two = runs
    with pytest.raises(DeltasError, match=re.escape(f"starts from {one / 'final'}, the result of another training run: "
                                                    "pass that run's checkpoint first")):
        export_deltas([two], tmp_path / "alone.safetensors")
    with pytest.raises(DeltasError, match="give the runs in the order they were trained"):
        export_deltas([one, one], tmp_path / "twice.safetensors")
    assert demo_cli.main(["export-deltas", str(one), str(two), str(tmp_path / "d.safetensors"),
                          "--dtype", "float32"]) == 0
    deltas = load_deltas(tmp_path / "d.safetensors")
    q = LAYER.format(0) + "self_attn.q_proj"
    assert deltas.scale == 1.0 and deltas.lora[q][0].shape[0] == 2 + 4  # the scales differ: folded into B
    assert deltas.lora[LAYER.format(0) + "self_attn.k_proj"][0].shape[0] == 2  # trained in the first run only
    assemble.assemble_demo(tmp_path / "d.safetensors", tmp_path / "demo", dtype=torch.float32, progress=False)
    got, final = _state(tmp_path / "demo"), _state(two / "final")
    for key in final:  # one merge of the stacked adapter vs. two merges in turn: float32 rounding apart
        torch.testing.assert_close(got[key], final[key], rtol=1e-5, atol=1e-6)


def test_a_run_with_encoder_and_llm_adapters_exports_both(installed, base, tmp_path):
    """LoRA on the encoder beside the LLM's (configs/demo/pretrain.yaml): the deltas carry both sets of adapters,
    and applying them to the base gives the run's final model."""
    from qwen2audio.data.synthetic import write_synthetic_set
    from qwen2audio.training.config import TrainConfig
    from qwen2audio.training.loop import ENCODER_LORA_TARGETS

    data = write_synthetic_set(tmp_path / "data")
    train("sft", model=str(base), output_dir=str(tmp_path / "run"), train_data=str(data["sft"]),
          trainable=["projector", "llm", "encoder"], encoder_lora=True, lora_rank=2, lora_alpha=4.0,
          lr_by_part={"encoder": 1e-2}, max_steps=2, save_every=2)
    export_deltas([tmp_path / "run"], tmp_path / "d.safetensors", dtype="float32")
    deltas = load_deltas(tmp_path / "d.safetensors")
    encoder = {s for s in deltas.lora if s.startswith("audio_tower.layers.")}
    assert {s.rsplit(".", 1)[-1] for s in encoder} == set(ENCODER_LORA_TARGETS)
    llm = set(deltas.lora) - encoder
    assert all(s.startswith("language_model.") for s in llm)
    assert {s.rsplit(".", 1)[-1] for s in llm} == set(TrainConfig.__dataclass_fields__["lora_targets"].default_factory())
    assemble.assemble_demo(tmp_path / "d.safetensors", tmp_path / "demo", dtype=torch.float32, progress=False)
    got, final, start = _state(tmp_path / "demo"), _state(tmp_path / "run" / "final"), _state(base)
    assert any(not torch.equal(final[s + ".weight"], start[s + ".weight"]) for s in encoder)  # the encoder trained
    assert [k for k in final if not torch.equal(got[k], final[k])] == []


def test_combining_stages_is_their_sum():
    gen = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (torch.randn(shape, generator=gen) for shape in [(2, 6), (5, 2), (3, 6), (5, 3)])
    deltas = combine_stages([({"w.lora_A": a1, "w.lora_B": b1, "p": torch.ones(2)}, 2.0),
                             ({"w.lora_A": a2, "w.lora_B": b2, "p": torch.zeros(2)}, 5.0)])
    a, b = deltas.lora["w"]
    torch.testing.assert_close(deltas.scale * b @ a, 2.0 * b1 @ a1 + 5.0 * b2 @ a2)
    assert torch.equal(deltas.tensors["p"], torch.zeros(2))  # the later stage's value
    same = combine_stages([({"w.lora_A": a1, "w.lora_B": b1}, 2.0), ({"w.lora_A": a2, "w.lora_B": b2}, 2.0)])
    assert same.scale == 2.0 and torch.equal(same.lora["w"][1], torch.cat([b1, b2], dim=1))  # unscaled


def test_a_weight_trained_in_full_after_lora_on_it_is_not_adapted_twice():
    """Align with encoder_lora, then pre-training of the whole encoder: the second run's weight started from
    the first's merged adapters (W + s B A), so the assembled model is that weight, with no adapter on top."""
    from qwen2audio.demo.deltas import apply_deltas
    from qwen2audio.training.lora import merge_lora_state_dict

    gen = torch.Generator().manual_seed(0)
    w, a1, b1, a2, b2 = (torch.randn(shape, generator=gen) for shape in [(5, 6), (2, 6), (5, 2), (3, 6), (5, 3)])
    merged = merge_lora_state_dict({"w.weight": w, "w.lora_A": a1, "w.lora_B": b1}, 2.0)["w.weight"]
    trained = merged + 0.01 * torch.randn(5, 6, generator=gen)  # the second run's whole weight
    stages = [({"w.lora_A": a1, "w.lora_B": b1}, 2.0), ({"w.weight": trained}, None)]
    deltas = combine_stages(stages)
    assert deltas.lora == {}
    state = {"w.weight": w.clone()}
    apply_deltas(state, deltas, "test")
    torch.testing.assert_close(state["w.weight"], trained)
    # and LoRA of a third run on it stacks on the full weight
    deltas = combine_stages(stages + [({"w.lora_A": a2, "w.lora_B": b2}, 2.0)])
    state = {"w.weight": w.clone()}
    apply_deltas(state, deltas, "test")
    torch.testing.assert_close(state["w.weight"], trained + 2.0 * b2 @ a2)


def test_deltas_over_the_package_budget_or_float16_range_are_refused(installed, runs, tmp_path):
    one, _ = runs
    with pytest.raises(DeltasError, match=r"the deltas take 0\.\d MiB, over the 0 MiB the package may carry "
                                          r"\(14 LoRA adapters; largest full tensors: multi_modal_projector"):
        export_deltas([one], tmp_path / "big.safetensors", max_bytes=1000)
    assert not (tmp_path / "big.safetensors").exists()
    with pytest.raises(DeltasError, match="x has values that float16 cannot hold .* export with --dtype bfloat16"):
        _cast(torch.tensor([1e5]), torch.float16, "x")


def test_the_demo_extra_pins_the_parts_the_code_pins():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pins = {r for r in project["optional-dependencies"]["demo"] if "==" in r}
    assert pins == {piece.requirement for spec in parts.DEMO_PARTS.values() for piece in spec.pieces}
    assert sum(p.size for p in parts.WHISPER_BASE.pieces) == parts.WHISPER_BASE.size == 145_217_532
    assert sum(p.size for p in parts.QWEN25_CODER.pieces) == parts.QWEN25_CODER.size == 491_400_064


def test_the_shipped_deltas_fit_the_package_the_pinned_parts_and_the_three_stages():
    """The trained weights in the repository are what the default model is assembled from: within the package's
    budget, made for the parts the demo extra pins, shaped for Whisper base + Qwen2.5-Coder-0.5B, from the
    align, pre-training, SFT and DPO runs in that order."""
    import qwen2audio.demo
    from qwen2audio.demo.deltas import MAX_BYTES, check_base

    path = qwen2audio.demo.shipped_deltas()
    assert path is not None and path == qwen2audio.demo.DELTAS_FILE
    assert path.stat().st_size <= MAX_BYTES
    deltas = load_deltas(path)
    check_base(deltas, parts.DEMO_PARTS, path)
    assert deltas.tensors["multi_modal_projector.linear.weight"].shape == (896, 512)  # Whisper base -> Qwen2.5-0.5B
    assert deltas.tensors["multi_modal_projector.linear.bias"].shape == (896,)
    # (out, in) of each adapted layer: Qwen2.5-0.5B's 24 decoder layers, Whisper base's 6 encoder layers
    shapes = {"language_model.": (24, {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896),
                                       "o_proj": (896, 896), "gate_proj": (4864, 896), "up_proj": (4864, 896),
                                       "down_proj": (896, 4864)}),
              "audio_tower.": (6, {"q_proj": (512, 512), "k_proj": (512, 512), "v_proj": (512, 512),
                                   "out_proj": (512, 512), "fc1": (2048, 512), "fc2": (512, 2048)})}
    for prefix, (layers, layer_shapes) in shapes.items():
        adapters = {s: ab for s, ab in deltas.lora.items() if s.startswith(prefix)}
        assert len(adapters) == layers * len(layer_shapes), prefix
        for stem, (a, b) in adapters.items():
            out, inp = layer_shapes[stem.rsplit(".", 1)[1]]
            assert b.shape == (out, a.shape[0]) and a.shape[1] == inp, stem
    assert sum(layers * len(layer_shapes) for layers, layer_shapes in shapes.values()) == len(deltas.lora)
    runs = [run["output_dir"] for run in deltas.info["provenance"]["runs"]]
    assert runs == ["runs/demo/align", "runs/demo/pretrain", "runs/demo/sft", "runs/demo/dpo"]
