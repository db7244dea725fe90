"""A Qwen2 tokenizer from a GGUF file's own metadata, so that a GGUF LLM needs no separate tokenizer.json.

llama.cpp's converter stores a byte-level BPE tokenizer as ``tokenizer.ggml.model = "gpt2"`` with

- ``tokenizer.ggml.tokens``: every id's token string (the ByteLevel alphabet, as in vocab.json), the
  embedding's spare rows written as ``[PADn]`` placeholders;
- ``tokenizer.ggml.token_type``: NORMAL for the BPE vocabulary, CONTROL / USER_DEFINED for the added
  tokens (``<|im_start|>``, ``<tool_call>``, ...), UNUSED for the placeholders;
- ``tokenizer.ggml.merges``: "left right" strings in rank order, as in merges.txt;
- ``tokenizer.ggml.pre``: the pre-tokenizer's name; "qwen2" is Qwen2's split regex.

From these this module builds exactly the tokenizer.json pipeline transformers' Qwen2Converter builds
(NFC, Qwen2's split regex, ByteLevel, BPE, ByteLevel decoder: ``qwen2audio.text.tokenizer``), so the
result encodes id for id like the model's own tokenizer.json. The UNUSED placeholders are left out
(they are not tokens). An added token is special when GGUF marks it CONTROL and not special when
USER_DEFINED: llama.cpp marks a token CONTROL when the original was special or merely looks it
(``<|fim_prefix|>``), so such a token is skipped by ``decode(skip_special_tokens=True)`` where the
original tokenizer would print it. Encoding is the same either way.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken

from ...text.tokenizer import Tokenizer, _add_tokens_at_ids, _qwen2_bpe
from .keymap import WeightImportError

BPE_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE
SUPPORTED_PRE = ("qwen2",)  # pre-tokenizers whose split is Qwen2's regex
MODEL_KEY, PRE_KEY = "tokenizer.ggml.model", "tokenizer.ggml.pre"
TOKENS_KEY, TYPES_KEY, MERGES_KEY = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
# gguf.TokenType values (spelled out here so that this module imports without the gguf package)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ASK_FOR_TOKENIZER = "pass the LLM's tokenizer with --tokenizer DIR_OR_FILE"


def has_tokenizer(reader) -> bool:
    """Whether a GGUF (a ``GGUFReader``) carries a tokenizer at all."""
    return MODEL_KEY in reader.fields and TOKENS_KEY in reader.fields


def tokenizer_from_gguf(reader, origin: str | Path) -> Tokenizer:
    """The Qwen2 tokenizer stored in a GGUF's metadata (``reader``: a ``GGUFReader`` of the file ``origin``)."""
    if not has_tokenizer(reader):
        raise WeightImportError(f"--llm {origin} is a GGUF file without a tokenizer in its metadata; "
                                + ASK_FOR_TOKENIZER)
    def field(key: str, default=None):
        if key not in reader.fields:
            return default
        try:
            return reader.fields[key].contents()
        except (UnicodeDecodeError, ValueError, IndexError) as err:
            raise WeightImportError(f"--llm {origin}: its tokenizer metadata ({key}) is damaged ({err}); "
                                    "re-download the file, or " + ASK_FOR_TOKENIZER) from None

    model = field(MODEL_KEY)
    pre = field(PRE_KEY)
    if model != BPE_MODEL or pre not in SUPPORTED_PRE:
        raise WeightImportError(f"--llm {origin} holds a {model!r} tokenizer with pre-tokenizer {pre!r}; only "
                                f"Qwen2's ({BPE_MODEL!r}, {' / '.join(map(repr, SUPPORTED_PRE))}) is read from GGUF: "
                                + ASK_FOR_TOKENIZER)
    if field(ADD_BOS_KEY):
        raise WeightImportError(f"--llm {origin}: its tokenizer adds a BOS token, which a Qwen2 tokenizer does not; "
                                + ASK_FOR_TOKENIZER)
    tokens = field(TOKENS_KEY)
    types = field(TYPES_KEY, [NORMAL] * len(tokens))
    merges = field(MERGES_KEY, [])
    if not merges and any(len(token) > 1 for token, kind in zip(tokens, types) if kind == NORMAL):
        raise WeightImportError(f"--llm {origin}: its tokenizer has no merges ({MERGES_KEY}): every text would be "
                                "split into single bytes; " + ASK_FOR_TOKENIZER)
    if len(types) != len(tokens):
        raise WeightImportError(f"--llm {origin}: {len(tokens)} tokens but {len(types)} token types; the file is "
                                "corrupt: re-download it")
    vocab: dict[str, int] = {}
    added: list[tuple[int, AddedToken]] = []
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL:
            vocab[token] = token_id
        elif kind in (CONTROL, USER_DEFINED):
            added.append((token_id, AddedToken(token, normalized=False, special=kind == CONTROL)))
        elif kind != UNUSED:  # UNKNOWN and BYTE belong to other tokenizer models (SentencePiece)
            raise WeightImportError(f"--llm {origin}: token {token_id} ({token!r}) has GGUF token type {kind}, "
                                    "which a byte-level BPE tokenizer does not use; " + ASK_FOR_TOKENIZER)
    pairs = []
    for rank, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise WeightImportError(f"--llm {origin}: merge {rank} is {merge!r}, not two symbols separated by a space")
        pairs.append((pair[0], pair[1]))
    backend = _qwen2_bpe(vocab, pairs)
    try:
        _add_tokens_at_ids(backend, added, source=str(origin))
    except ValueError as err:
        raise WeightImportError(f"--llm {origin}: {err}; " + ASK_FOR_TOKENIZER) from err
    return Tokenizer(backend)


def drop_tokenizer_fields(reader) -> None:
    """Forget the tokenizer's metadata in ``reader``: GGUFReader keeps each of a Qwen2 GGUF's 300,000
    token and merge strings as numpy objects (about 0.4 GB), which the weights' load does not need."""
    for key in (TOKENS_KEY, TYPES_KEY, MERGES_KEY):
        reader.fields.pop(key, None)
