"""`qwen2audio init`: a new Qwen2-Audio checkpoint from a Whisper encoder and a Qwen2 LLM, as the paper
starts (Whisper-large-v3's encoder + a Qwen LLM; the projector between them is new).

    qwen2audio init --encoder WHISPER --llm QWEN2 [--tokenizer DIR_OR_FILE] --out DIR [--dtype ...]

What is written to DIR, loadable by ``qwen2audio chat DIR`` and by transformers'
``Qwen2AudioForConditionalGeneration.from_pretrained(DIR)``:

- ``audio_tower``: the Whisper encoder's weights, every one (Whisper's ``ln_post`` becomes the final
  ``layer_norm``, which Qwen2-Audio applies after its 2x average pool);
- ``language_model``: the Qwen2 weights, the embedding (and an untied LM head) grown to fit the
  audio special tokens where the tokenizer needs new ids;
- ``multi_modal_projector.linear``: new, ``weight ~ N(0, std^2)`` from ``--seed``, ``bias = 0``. The
  default std makes the projected audio vectors as large as the LLM's token embeddings: the encoder
  ends in a LayerNorm (about unit variance per channel), so a d_model -> hidden map with
  std = rms(embedding) / sqrt(d_model) gives outputs with the embeddings' rms (``--projector-std``
  overrides it);
- the LLM's tokenizer (``--tokenizer``, else the --llm directory's, else built from a GGUF's own
  metadata: ``importers/gguf_tokenizer.py``) with ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>``
  (existing ids are reused, missing ones appended as special added tokens; each new token's embedding
  and LM-head row starts at the mean of the LLM's rows for its original tokens); ``audio_token_index``
  is the tokenizer's id of ``<|AUDIO|>``;
- config.json, generation_config.json, preprocessor_config.json (mel bins of the encoder).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..text.special_tokens import AUDIO, AUDIO_BOS, AUDIO_EOS, ENDOFTEXT, IM_END, IM_START

if TYPE_CHECKING:  # torch is imported where it is used, so that `qwen2audio --help` stays fast
    import torch

    from ..config import Qwen2AudioConfig
    from ..text import Tokenizer

AUDIO_TOKENS = (AUDIO, AUDIO_BOS, AUDIO_EOS)  # appended in this order, as in Qwen2-Audio's tokenizer
REQUIRED_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # a Qwen2 tokenizer has these; chat and stopping need them
DEFAULT_SEED = 0
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class InitReport:
    """What ``init_checkpoint`` did, for the user and for tests."""

    out: Path
    encoder: dict
    text: dict
    dtype: str
    audio_token_ids: dict[str, int]
    added_tokens: list[str]
    vocab_rows: tuple[int, int]  # embedding rows before and after
    projector_std: float
    seed: int


def load_tokenizer(path: str | Path):
    """A tokenizer from a directory (tokenizer.json, or vocab.json + merges.txt) or a tokenizer.json file."""
    import tokenizers

    from ..text import Tokenizer

    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {path} does not exist")
    try:
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as err:  # noqa: BLE001 - the library's parse errors name no file
        raise CheckpointError(f"--tokenizer {path} is not a tokenizer.json file ({err})") from err


def add_audio_tokens(tokenizer):
    """(tokenizer with Qwen2-Audio's audio tokens, the tokens that were added). Existing ids are kept."""
    import tokenizers
    from tokenizers import AddedToken

    from ..text import Tokenizer

    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())  # a copy: the caller's stays as it was
    for token in REQUIRED_TOKENS:
        if backend.token_to_id(token) is None:
            raise CheckpointError(f"the tokenizer has no {token!r}: it is not a Qwen2 tokenizer. Pass the LLM's "
                                  "own tokenizer with --tokenizer")
    added = []
    for token in AUDIO_TOKENS:
        if backend.token_to_id(token) is None:
            backend.add_special_tokens([AddedToken(token, normalized=False, special=True)])
            added.append(token)
    result = Tokenizer(backend)
    for name in ("endoftext_id", "im_start_id", "im_end_id", "audio_id", "audio_bos_id", "audio_eos_id"):
        getattr(result, name)  # raises, naming the token, if it is an ordinary vocabulary entry
    return result, added


def _grow_rows(weight: torch.Tensor, rows: int, new_ids: list[int], n_known: int) -> torch.Tensor:
    """(V, hidden) -> (rows, hidden); the rows of ``new_ids`` set to the mean of rows [0, n_known). When no
    row is added, ``weight`` itself is changed (it is the importer's own copy): no second vocabulary matrix."""
    import torch

    mean = weight[:n_known].float().mean(dim=0)  # (hidden,)
    if rows == weight.shape[0]:
        weight[new_ids] = mean.to(weight.dtype)
        return weight
    grown = torch.empty(rows, weight.shape[1], dtype=weight.dtype)
    grown[: weight.shape[0]] = weight
    grown[weight.shape[0]:] = mean.to(weight.dtype)
    for i in new_ids:
        grown[i] = mean.to(weight.dtype)
    return grown


def default_projector_std(embedding: torch.Tensor, n_known: int, d_model: int) -> float:
    """rms(embedding rows of known tokens) / sqrt(d_model): projected unit-variance encoder states then
    have the token embeddings' rms."""
    rms = embedding[:n_known].float().pow(2).mean().sqrt().item()
    return rms / math.sqrt(d_model)


@dataclass
class Assembled:
    """A new checkpoint in memory: what ``init_checkpoint`` writes (``state`` may still be changed)."""

    config: Qwen2AudioConfig
    state: dict[str, torch.Tensor]  # our checkpoint keys -> tensors
    tokenizer: Tokenizer  # the audio tokens included
    added_tokens: list[str]
    vocab_rows: tuple[int, int]
    projector_std: float


def _llm_shapes(llm: Path, gguf_reader):
    """(the LLM's tensor shapes, the dtypes it is loaded from, its GGUFReader if it is a GGUF: opened here
    where the tokenizer did not open it), from the files' headers alone: what the memory check needs
    before the LLM is read. A GGUF's tensors are dequantised to float32."""
    import torch

    from .hf import FLOAT_DTYPES, open_safetensors, weight_files
    from .importers import is_gguf_path

    if is_gguf_path(llm):
        from .importers.gguf_qwen2 import read_gguf

        reader = gguf_reader if gguf_reader is not None else read_gguf(llm)
        return {t.name: (int(t.n_elements),) for t in reader.tensors}, {torch.float32}, reader
    shapes, stored = {}, set()
    for path in weight_files(llm):
        with open_safetensors(path) as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shapes[key] = tuple(tensor.get_shape())
                stored.add(FLOAT_DTYPES.get(tensor.get_dtype(), torch.float32))
    return shapes, stored, gguf_reader


def _read_tokenizer(tokenizer: str | Path | None, llm: str | Path):
    """(the LLM's tokenizer, an open GGUFReader of ``llm`` when the tokenizer came from its metadata)."""
    from .importers import is_gguf_path

    if tokenizer is None and is_gguf_path(llm):
        from .importers.gguf_qwen2 import check_architecture, read_gguf
        from .importers.gguf_tokenizer import drop_tokenizer_fields, tokenizer_from_gguf

        reader = read_gguf(Path(llm))  # kept: the weights are read from the same parsed header
        check_architecture(reader, llm)  # another model's GGUF is not a question of its tokenizer
        tok = tokenizer_from_gguf(reader, llm)
        drop_tokenizer_fields(reader)  # a third of a GB less while the weights are dequantised
        return tok, reader
    try:
        return load_tokenizer(tokenizer if tokenizer is not None else llm), None
    except FileNotFoundError as err:
        if tokenizer is not None:
            raise
        raise CheckpointError(f"--llm {llm} holds no tokenizer ({err}); pass the LLM's tokenizer with "
                              "--tokenizer DIR_OR_FILE") from err


def assemble_checkpoint(encoder: str | Path, llm: str | Path, tokenizer: str | Path | None = None,
                        dtype: str | torch.dtype | None = "auto", seed: int = DEFAULT_SEED,
                        projector_std: float | None = None) -> Assembled:
    """The checkpoint ``init_checkpoint`` writes, in memory (see the module's docstring).

    ``dtype`` "auto" keeps the LLM's stored dtype (float32 for GGUF, whose tensors are dequantised to
    float32) and casts the encoder and projector to it: one dtype for the whole checkpoint. Without
    ``tokenizer``, a GGUF LLM's tokenizer is built from the file's own metadata.
    """
    import torch

    from ..config import Qwen2AudioConfig
    from .hf import check_weights_fit, resolve_dtype
    from .importers import check_sources, load_encoder, load_llm

    if projector_std is not None and not (math.isfinite(projector_std) and projector_std > 0):
        raise ValueError(f"--projector-std must be a number above 0, got {projector_std}")
    check_sources(encoder, llm)  # formats and model types: before the tokenizer and minutes of loading
    tok, gguf_reader = _read_tokenizer(tokenizer, llm)  # read first: fail before the big loads
    n_known = tok.vocab_size
    tok, added = add_audio_tokens(tok)

    target = resolve_dtype(dtype)
    # the encoder first, as stored (small beside the LLM): a bad --encoder file is told before the LLM's
    # minutes of loading; cast below, once the LLM says what "auto" is
    audio_cfg, audio_state = load_encoder(encoder, None)
    shapes, stored, gguf_reader = _llm_shapes(Path(llm), gguf_reader)
    # "auto" keeps the LLM's one stored dtype (float32 for GGUF), as the state below is cast to its embedding's
    check_weights_fit(Path(llm), shapes, stored, target or (next(iter(stored)) if len(stored) == 1 else torch.float32),
                      "cpu")
    text_cfg, text_state = load_llm(llm, target, gguf_reader=gguf_reader)
    del gguf_reader  # unmaps the file
    embed = text_state["model.embed_tokens.weight"]  # (V, hidden)
    target = target or embed.dtype
    audio_state = {k: v.to(target) for k, v in audio_state.items()}

    rows_before = embed.shape[0]
    if n_known > rows_before:
        raise CheckpointError(f"the tokenizer has {n_known} tokens but the LLM's embedding only {rows_before} rows: "
                              "the tokenizer does not belong to this LLM (pass the LLM's own with --tokenizer)")
    std = projector_std if projector_std is not None else default_projector_std(embed, n_known, audio_cfg.d_model)
    del embed  # the grown copy replaces it: do not hold both
    rows = max(rows_before, tok.vocab_size)
    new_ids = [tok.token_to_id(t) for t in added]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in text_state:
            text_state[key] = _grow_rows(text_state[key], rows, new_ids, n_known)
    text_cfg = dataclasses.replace(text_cfg, vocab_size=rows)

    gen = torch.Generator().manual_seed(seed)
    projector = {
        "linear.weight": (std * torch.randn(text_cfg.hidden_size, audio_cfg.d_model, generator=gen)).to(target),
        "linear.bias": torch.zeros(text_cfg.hidden_size, dtype=target),
    }

    config = Qwen2AudioConfig(audio=audio_cfg, text=text_cfg, audio_token_index=tok.audio_id)
    state = ({f"audio_tower.{k}": v for k, v in audio_state.items()}
             | {f"multi_modal_projector.{k}": v for k, v in projector.items()}
             | {f"language_model.{k}": v for k, v in text_state.items()})
    return Assembled(config=config, state=state, tokenizer=tok, added_tokens=added,
                     vocab_rows=(rows_before, rows), projector_std=std)


def check_writable(out: Path) -> None:
    """``out`` can be made (if it is not there) and written, or a CheckpointError saying why not; what this
    check makes it removes again."""
    made = [p for p in [out, *out.parents] if not p.exists()][::-1]  # outermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".qwen2audio-init-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"--out {out} cannot be written ({err.strerror or err}); choose a directory you "
                              "can write to") from err
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def write_checkpoint(assembled: Assembled, out: Path) -> None:
    """Weights, config and the processor files of ``assembled`` into the directory ``out``."""
    from .files import write_processor_files
    from .hf import model_from_state_dict, save_model

    model = model_from_state_dict(assembled.config, assembled.state)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    write_processor_files(out, assembled.tokenizer, assembled.config.audio.num_mel_bins)


def init_checkpoint(encoder: str | Path, llm: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                    dtype: str | torch.dtype | None = "auto", seed: int = DEFAULT_SEED,
                    projector_std: float | None = None, force: bool = False) -> InitReport:
    """Write a Qwen2-Audio checkpoint directory ``out`` from a Whisper ``encoder`` and a Qwen2 ``llm``
    (``assemble_checkpoint`` says what each argument does)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory; choose a new directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory or pass --force")
    check_writable(out)  # before minutes of loading
    built = assemble_checkpoint(encoder, llm, tokenizer=tokenizer, dtype=dtype, seed=seed, projector_std=projector_std)
    write_checkpoint(built, out)
    tok, cfg = built.tokenizer, built.config
    return InitReport(
        out=out, encoder=dataclasses.asdict(cfg.audio), text=dataclasses.asdict(cfg.text),
        dtype=str(built.state["multi_modal_projector.linear.weight"].dtype).removeprefix("torch."),
        audio_token_ids={t: tok.token_to_id(t) for t in AUDIO_TOKENS}, added_tokens=built.added_tokens,
        vocab_rows=built.vocab_rows, projector_std=built.projector_std, seed=seed,
    )


# ---- the command ---------------------------------------------------------------------------------

def register(subparsers) -> None:
    """Adds `qwen2audio init` (the registry hook of qwen2audio.cli)."""
    p = subparsers.add_parser(
        "init", help="write a new Qwen2-Audio checkpoint from a Whisper encoder and a Qwen2 LLM",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, metavar="SRC",
                   help="Whisper: HF directory, OpenAI .pt, or CTranslate2 model.bin (or its directory)")
    p.add_argument("--llm", required=True, metavar="SRC", help="Qwen2: HF directory or GGUF file")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_FILE",
                   help="the LLM's tokenizer (default: the one in the --llm directory, or in a GGUF's metadata)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype (auto: the LLM's stored dtype; float32 for GGUF)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the projector's initialisation")
    p.add_argument("--projector-std", type=float, default=None,
                   help="std of the projector's weights (default: rms of the embeddings / sqrt(encoder d_model))")
    p.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    report = init_checkpoint(args.encoder, args.llm, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                             seed=args.seed, projector_std=args.projector_std, force=args.force)
    e, t = report.encoder, report.text
    print(f"wrote {report.out} ({report.dtype})")
    print(f"  encoder: d_model {e['d_model']}, {e['encoder_layers']} layers, {e['encoder_attention_heads']} heads, "
          f"ffn {e['encoder_ffn_dim']}, {e['num_mel_bins']} mel bins")
    print(f"  llm: hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']}/"
          f"{t['num_key_value_heads']} heads, vocab {report.vocab_rows[0]} -> {report.vocab_rows[1]}, "
          f"{'tied' if t['tie_word_embeddings'] else 'untied'} LM head")
    print(f"  audio tokens: {json.dumps(report.audio_token_ids)}"
          f" (added: {', '.join(report.added_tokens) or 'none, all reused'})")
    print(f"  projector: new, std {report.projector_std:.3g}, seed {report.seed}")
    sys.stdout.flush()
    return 0
