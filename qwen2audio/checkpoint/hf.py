"""Load and save checkpoints in the Hugging Face Qwen2-Audio layout, exactly as the files are on disk.

Loading builds the model on the ``meta`` device (no random initialisation, no memory), then assigns
each tensor from the memory-mapped safetensors files, converted to the requested dtype and device,
one shard at a time: peak memory stays near the size of the weights. Module names equal the
checkpoint keys (see ``qwen2audio.model.qwen2audio``), so the key map is the identity; what the
files must hold is exactly what the model's state dict names, less a tied LM head.

Every weight file's header is checked against the file's size before anything is loaded, so a cut
download is named as such, file by file, instead of failing somewhere inside the load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write_text
from ..config import CONFIG_FILE, Qwen2AudioConfig, checkpoint_hint
from ..errors import CheckpointError  # defined without torch, for the command line
from ..model import Qwen2AudioModel
from .files import check_preprocessor_config
from .memory import GB, check_room

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the shards save_model (and transformers) write
TIED_HEAD_KEY = "language_model.lm_head.weight"
# RoPE's inverse frequencies, recomputed from the config: some exporters saved them (per layer or per model);
# transformers drops them on load without a word, and so do we
ROTARY_BUFFER_SUFFIX = "rotary_emb.inv_freq"
DEFAULT_SHARD_BYTES = 5 * 1024**3
HEADER_SIZE_BYTES = 8  # a safetensors file starts with the length of its JSON header (u64, little-endian)
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit: a larger length means the file is not one
METADATA_KEY = "__metadata__"  # the header entry that is not a tensor
REDOWNLOAD = "re-download it (or copy it again)"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto' or None -> keep each tensor's dtype as stored; a name or torch.dtype -> that dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:  # integers, complex: a raw torch error inside load_state_dict
            raise ValueError(f"dtype {dtype} is not a floating-point dtype; use one of auto, {', '.join(sorted(DTYPES))}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


# Half-precision dtypes and whether this CPU multiplies them natively (oneDNN: AVX-512 BF16 / AMX for
# bfloat16, AVX-512 FP16 / AMX-FP16 for float16). Without it, half-precision matmuls are converted on
# the fly: with oneDNN held to AVX2, a 64-row bfloat16 product took 2.9x the float32 time (a prompt's
# prefill is such products; the first token waits for it).
_CPU_HALF_SUPPORT = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` at full speed (always for float32)."""
    check = _CPU_HALF_SUPPORT.get(dtype)
    if check is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def auto_dtype(stored: torch.dtype, device: str | torch.device) -> torch.dtype:
    """What ``dtype="auto"`` loads a tensor stored as ``stored`` in: the stored dtype, except half
    precision on a CPU that does not compute it natively, which loads as float32 (faster prefill there,
    and exact: every bfloat16 or float16 value is a float32 value)."""
    if torch.device(device).type == "cpu" and stored.is_floating_point and not cpu_computes_natively(stored):
        return torch.float32
    return stored


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (the single file, else the shards named by the index), each
    checked to be whole (``check_safetensors``)."""
    files = _weight_file_names(directory)
    for path in files:
        check_safetensors(path)
    return files


def _weight_file_names(directory: Path) -> list[Path]:
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    # The single file first, as transformers reads them: its save_pretrained(), saving unsharded where a
    # sharded checkpoint was, removes the old shards but leaves their index behind.
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(name, str) for name in names):  # (a name of null was a traceback below)
                raise TypeError(f"a shard file name is not a string: {names}")
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # bad JSON, no weight_map, wrong types
            raise CheckpointError(f"{index} is not a readable safetensors index (a JSON object with a "
                                  f"\"weight_map\" of key -> shard file; {type(err).__name__}: {err}); "
                                  f"{REDOWNLOAD}") from err
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {directory}: {', '.join(missing)}; "
                                  "copy the whole checkpoint directory")
        return [directory / n for n in names]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return [directory / found[0]]
    pickled = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
    raise CheckpointError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
                          + (f" (found {', '.join(found)} without an index)" if found else "")
                          + (f"; {pickled[0]} is PyTorch's pickle format, which qwen2audio does not load (it can run "
                             "code): convert it once with transformers, from_pretrained(DIR) then "
                             "save_pretrained(DIR, safe_serialization=True)" if pickled else ""))


def check_safetensors(path: Path) -> None:
    """Raise CheckpointError, naming ``path``, unless its header parses and its tensors' bytes end exactly
    where the file ends. Reads the header only: an interrupted download is found before any work."""
    size = path.stat().st_size
    if size < HEADER_SIZE_BYTES:
        raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header; {REDOWNLOAD}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(HEADER_SIZE_BYTES), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a safetensors file (its first bytes give a header of {n} bytes): "
                                  f"the file is corrupt; {REDOWNLOAD}")
        if HEADER_SIZE_BYTES + n > size:
            raise CheckpointError(f"{path} is truncated: its header alone should be {n} bytes, the file has "
                                  f"{size}; {REDOWNLOAD}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        data_bytes = max((int(info["data_offsets"][1]) for key, info in header.items() if key != METADATA_KEY),
                         default=0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:  # not JSON, not the schema
        raise CheckpointError(f"{path} has a garbled header ({type(err).__name__}: {err}): the file is corrupt; "
                              f"{REDOWNLOAD}") from err
    expected = HEADER_SIZE_BYTES + n + data_bytes
    if expected > size:
        raise CheckpointError(f"{path} is truncated: its header says {expected} bytes, the file has {size}; "
                              f"{REDOWNLOAD}")
    if expected < size:
        raise CheckpointError(f"{path} is corrupt: its header says {expected} bytes, the file has {size}; "
                              f"{REDOWNLOAD}")


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` on the CPU, its errors (a file damaged in a way the header check cannot see) turned
    into a CheckpointError that names the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as err:
        raise unreadable_safetensors(path, err) from err


def unreadable_safetensors(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path} could not be read ({err}): the file is corrupt; {REDOWNLOAD}")


def load_model(directory: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               strict: bool = True) -> Qwen2AudioModel:
    """Load a Qwen2-Audio checkpoint directory (config.json + safetensors) onto ``device``.

    ``dtype`` None or "auto": the dtype the weights are stored in (``auto_dtype``: float32 for half
    precision on a CPU without native support for it); float32 for a checkpoint that stores them in
    several (every half-precision value is a float32 value), so that the model computes in one. Missing
    keys always raise, naming them; unexpected keys raise when ``strict``; weights stored as integers (a
    quantized export) raise, naming one.
    """
    directory = Path(directory)
    if directory.is_file():
        raise FileNotFoundError(f"{directory} is a file; a checkpoint is a directory (config.json and the "
                                "safetensors weights)." + checkpoint_hint(directory))
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist." + checkpoint_hint(directory))
    config = Qwen2AudioConfig.from_file(directory)
    check_preprocessor_config(directory, config.audio.num_mel_bins)
    target_dtype = resolve_dtype(dtype)
    files = weight_files(directory)  # every file checked before any is read
    with torch.device("meta"):
        model = Qwen2AudioModel(config)
    expected = checkpoint_weights(model)
    stored = stored_dtypes(files, expected)
    if target_dtype is None:
        target_dtype = auto_load_dtype(stored, device)
        warn_emulated_bfloat16(target_dtype, device)
    check_weights_fit(directory, expected, stored, target_dtype, device)
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in files:
        shard: dict[str, torch.Tensor] = {}
        with open_safetensors(path) as f:
            for key in f.keys():
                if key not in expected:
                    if not key.endswith(ROTARY_BUFFER_SUFFIX):
                        unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key]):
                    raise CheckpointError(f"{path.name}: {key} has shape {tuple(tensor.shape)}, the config implies "
                                          f"{tuple(expected[key])}; config.json and the weights disagree")
                shard[key] = tensor.to(device=device, dtype=target_dtype)
                seen.add(key)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    missing = sorted(set(expected) - seen)
    if config.text.tie_word_embeddings and TIED_HEAD_KEY in unexpected:
        unexpected.remove(TIED_HEAD_KEY)  # a tied head saved anyway: identical to the embeddings
    if missing:
        raise CheckpointError(f"{directory} is missing {len(missing)} weight(s): {_names(missing)}. "
                              "The checkpoint is incomplete or not a Qwen2-Audio checkpoint of this config.")
    if unexpected and strict:
        raise CheckpointError(f"{directory} has {len(unexpected)} weight(s) this model does not use: {_names(unexpected)}. "
                              "Check that config.json is this checkpoint's (the sizes and layer counts it gives); "
                              "qwen2audio.checkpoint.load_model(..., strict=False) loads it without them.")
    model.tie_weights()
    return model.eval()


def auto_dtype_of(directory: str | Path, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype ``load_model(directory, dtype="auto", device=device)`` gives the weights, from the files'
    headers alone (what "auto" means for this checkpoint on this machine: a results file records it)."""
    directory = Path(directory)
    config = Qwen2AudioConfig.from_file(directory)
    with torch.device("meta"):
        expected = checkpoint_weights(Qwen2AudioModel(config))
    return auto_load_dtype(stored_dtypes(weight_files(directory), expected), device)


def checkpoint_weights(model: Qwen2AudioModel) -> dict[str, torch.Size]:
    """The weights a checkpoint of ``model``'s config holds, with their shapes: its state dict but a tied
    head (the embeddings' weight again)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        expected.pop(TIED_HEAD_KEY)
    return expected


def check_weights_fit(directory: Path, expected: dict[str, torch.Size], stored: set[torch.dtype],
                      dtype: torch.dtype, device: str | torch.device) -> None:
    """Refuse, before reading a byte, weights that do not fit in ``device``'s memory in ``dtype`` (and say
    which dtype would fit); warn where they fit only by swapping (``memory.check_room``)."""
    params = sum(math.prod(shape) for shape in expected.values())
    need = params * dtype.itemsize
    on_gpu = torch.device(device).type == "cuda"
    if dtype.itemsize > 2:
        stored_half = [d for d in (torch.bfloat16, torch.float16) if d in stored]
        if len(stored_half) == 1:  # the half precision the weights are stored in: no rounding
            half_dtype, stored_as = stored_half[0], " (as it is stored)"
        else:
            half_dtype = torch.bfloat16 if not on_gpu or torch.cuda.is_bf16_supported(including_emulation=False) \
                else torch.float16
            stored_as = ""
        half = str(half_dtype).removeprefix("torch.")
        slower = "" if on_gpu or cpu_computes_natively(half_dtype) else ", slower on this CPU, which does not " \
                                                                        "compute it natively"
        advice = (f"load it in {half}{stored_as} with --dtype {half} (dtype=\"{half}\" in Python): "
                  f"{params * 2 / GB:.1f} GB{slower}")
    else:
        advice = "run it on a machine with more memory" + (", or with --device cpu" if on_gpu else "")
    check_room(need, device, f"{directory.name} in {str(dtype).removeprefix('torch.')} "
                             f"({params / 1e9:.2f} B parameters)", advice)


def warn_emulated_bfloat16(dtype: torch.dtype, device: str | torch.device) -> None:
    """dtype="auto" keeps bfloat16 weights in bfloat16 on a GPU too: exact, but a GPU before compute capability 8.0
    (T4, V100) has no bfloat16 arithmetic and emulates it, several times slower. Say so, and what is native."""
    device = torch.device(device)
    if dtype != torch.bfloat16 or device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        return
    warnings.warn("the weights are bfloat16, which this GPU only emulates (compute capability below 8.0): slow. "
                  "--dtype float16 (dtype=\"float16\") computes natively here, its numbers a little apart from "
                  "bfloat16's; --dtype float32 is exact where it fits", stacklevel=3)


def auto_load_dtype(stored: set[torch.dtype], device: str | torch.device) -> torch.dtype:
    """What dtype="auto" loads weights stored in ``stored`` as: their one dtype (``auto_dtype``), float32
    for several (every half-precision value is a float32 value)."""
    return auto_dtype(next(iter(stored)) if len(stored) == 1 else torch.float32, device)


# safetensors' names of the dtypes a Qwen2-Audio checkpoint's weights may be stored in
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtypes(files: list[Path], keys) -> set[torch.dtype]:
    """The dtypes the weights named in ``keys`` are stored in (read from the files' headers); a weight
    stored in another (int8, float8: a quantized export) raises a CheckpointError naming it."""
    found: set[torch.dtype] = set()
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                if key not in keys:
                    continue
                name = f.get_slice(key).get_dtype()
                if name not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{path.name}: {key} is stored as {name}, not as floating point (F32, F16 or BF16): this "
                        "looks like a quantized export (bitsandbytes, GPTQ, AWQ, ...), which qwen2audio does not "
                        "read. Load the float16/bfloat16/float32 checkpoint it was made from (qwen2audio's own "
                        "--quantize int8 quantizes at load).")
                found.add(FLOAT_DTYPES[name])
    return found


def model_from_state_dict(config: Qwen2AudioConfig, state: dict[str, torch.Tensor]) -> Qwen2AudioModel:
    """A model that holds ``state``'s tensors themselves (no copy, no random initialisation): built on the
    ``meta`` device, the tensors assigned, a tied LM head re-tied. ``state`` names every weight of the
    model; a tied head may be left out."""
    with torch.device("meta"):
        model = Qwen2AudioModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.text.tie_word_embeddings and TIED_HEAD_KEY in missing:
        missing.remove(TIED_HEAD_KEY)
    if missing or unexpected:
        raise CheckpointError(f"the weights do not fit the config: missing {_names(sorted(missing))}; "
                              f"not in the model {_names(sorted(unexpected))}")
    model.tie_weights()
    return model


def save_model(model: Qwen2AudioModel, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write config.json and safetensors weights (sharded with an index past ``max_shard_bytes``).

    Files are written under a temporary name and renamed into place, so a reader never sees half a file.
    """
    directory = Path(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):  # (no memory taken)
        missing = [k for k in checkpoint_weights(Qwen2AudioModel(model.config)) if k not in state]
    if missing:  # an Engine's (Qwen2Audio.load's) inference-only forms: fused, packed or int8 products
        raise CheckpointError(f"this model lacks {len(missing)} of its checkpoint's weights ({missing[0]}, ...): "
                              "it was prepared for inference, its projections fused, packed or quantised, so "
                              "saving it would write a checkpoint that cannot load; save a model loaded with "
                              "load_model (or trained), before an Engine prepares it")
    directory.mkdir(parents=True, exist_ok=True)
    if model.config.text.tie_word_embeddings:
        state.pop(TIED_HEAD_KEY)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.cpu()
        size += nbytes
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = dataclasses.replace(model.config, torch_dtype=dtype)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    if len(shards) == 1:
        _atomic_save(shards[0], directory / SINGLE_FILE)
        (directory / INDEX_FILE).unlink(missing_ok=True)
        _remove_stale_shards(directory, keep=set())
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_text(directory / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / SINGLE_FILE).unlink(missing_ok=True)
    _remove_stale_shards(directory, keep=set(weight_map.values()))


def _remove_stale_shards(directory: Path, keep: set[str]) -> None:
    """Delete the shards of an earlier save into ``directory`` that this one did not write (it had another
    shard count, or was sharded and this one is not): no index names them, yet they would stay beside the
    checkpoint, as large as it. transformers' save_pretrained deletes them too."""
    for path in directory.glob("model-*-of-*.safetensors"):
        if SHARD_NAME.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
