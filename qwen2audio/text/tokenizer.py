"""Qwen2's byte-level BPE tokenizer, with Qwen2-Audio's special tokens by name.

A thin wrapper over the `tokenizers` library (fast, exact, the same engine transformers uses).
Special-token ids always come from the loaded tokenizer file, never from constants in the code.

    tok = Tokenizer.from_dir("Qwen2-Audio-7B-Instruct")
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>\\n")
    stream = tok.stream()
    for i in generated_ids:
        print(stream.push(i), end="")
    print(stream.flush())
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from qwen2audio.errors import CheckpointError
from qwen2audio.text.special_tokens import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN2_AUDIO_SPECIAL_TOKENS,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX / Qwen2Converter).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
N_BYTES = 256  # the byte-level base alphabet: one symbol per byte value
REPLACEMENT_CHAR = "\ufffd"  # what a UTF-8 decoder yields for an incomplete multi-byte character
_LEGACY_MERGES_HEADER = "#version"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the ByteLevel alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to
    U+0100 onwards, so a space is "Ġ" and a newline "Ċ".
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n_shifted = 0
    for b in range(N_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(N_BYTES + n_shifted)
            n_shifted += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _qwen2_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], nfc: bool = True) -> tokenizers.Tokenizer:
    """The Qwen2 tokenizer pipeline around a BPE model, as transformers' Qwen2Converter builds it."""
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _add_tokens_at_ids(tok: tokenizers.Tokenizer, added: Sequence[tuple[int, AddedToken]], source: str) -> None:
    """Adds tokens in id order and checks that each lands on the id the checkpoint gives it."""
    for token_id, token in sorted(added, key=lambda item: item[0]):
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(token.content)
        if got != token_id:
            raise ValueError(
                f"added token {token.content!r} has id {token_id} in {source} but lands on id {got}: "
                f"added-token ids must follow the base vocabulary without gaps"
            )


_BYTE_OF_SYMBOL = {c: b for b, c in bytes_to_unicode().items()}  # "Ġ" -> 32


class Tokenizer:
    """Qwen2-Audio's tokenizer: encode, decode, stream, and the special tokens by name."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self._added_ids = set(tokenizer.get_added_tokens_decoder())
        # what decode(skip_special_tokens=True) leaves out
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._stop_ids: frozenset[int] | None = None  # set_stop_ids: the checkpoint's eos_token_id

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads `tokenizer.json` from a checkpoint directory.

        Falls back to the slow-tokenizer layout (`vocab.json` + `merges.txt`, added tokens from
        `tokenizer_config.json`'s `added_tokens_decoder` or `added_tokens.json`) when there is no
        tokenizer.json; the result encodes exactly as transformers' Qwen2Tokenizer.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        if (directory / TOKENIZER_FILE).is_file():
            try:
                return cls(tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE)))
            except Exception as err:  # the tokenizers library raises a bare Exception on a bad file
                raise CheckpointError(
                    f"{directory / TOKENIZER_FILE} is not a tokenizer file the tokenizers library can read "
                    f"({str(err).splitlines()[0][:200]}); copy it again from the model's release"
                ) from err
        have_vocab = (directory / VOCAB_FILE).is_file()
        have_merges = (directory / MERGES_FILE).is_file()
        if have_vocab and have_merges:
            added = _read_added_tokens(directory)
            return cls.from_vocab_and_merges(directory / VOCAB_FILE, directory / MERGES_FILE, added)
        if have_vocab or have_merges:
            missing = MERGES_FILE if have_vocab else VOCAB_FILE
            detail = f"{VOCAB_FILE if have_vocab else MERGES_FILE} is there but {missing} is missing"
        else:
            detail = f"neither {VOCAB_FILE} nor {MERGES_FILE} is there either"
        raise FileNotFoundError(
            f"{TOKENIZER_FILE} is missing in {str(directory)!r} ({detail}). A Qwen2-Audio checkpoint "
            f"directory needs {TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE} with the added tokens "
            f"in {TOKENIZER_CONFIG_FILE}; copy them from the model's release."
        )

    @classmethod
    def from_vocab_and_merges(
        cls,
        vocab_file: str | os.PathLike,
        merges_file: str | os.PathLike,
        added_tokens: Sequence[tuple[int, AddedToken]] = (),
    ) -> Tokenizer:
        """Builds the Qwen2 tokenizer from `vocab.json` + `merges.txt` and (id, AddedToken) pairs."""
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        merges = []
        with open(merges_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line or (i == 0 and line.startswith(_LEGACY_MERGES_HEADER)):
                    continue
                pair = line.split()
                if len(pair) != 2:
                    raise ValueError(f"{merges_file}, line {i + 1}: expected two symbols, got {line!r}")
                merges.append((pair[0], pair[1]))
        tok = _qwen2_bpe(vocab, merges)
        _add_tokens_at_ids(tok, added_tokens, source=str(Path(vocab_file).parent))
        return cls(tok)

    def save(self, directory: str | os.PathLike, eos_token: str = ENDOFTEXT) -> None:
        """Writes tokenizer.json and a minimal tokenizer_config.json (loadable by AutoTokenizer), with the
        official chat template, as Qwen2-Audio-7B-Instruct's file carries it (for transformers'
        ``tokenizer.apply_chat_template``, which has no default of its own)."""
        from .chat import HF_CHAT_TEMPLATE

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(self._tok.get_added_tokens_decoder().items())
            },
            "bos_token": None,
            "eos_token": eos_token,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
            "chat_template": HF_CHAT_TEMPLATE,
        }
        with open(out / TOKENIZER_CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, added_tokens={len(self._added_ids)})"

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    # ---- special tokens by name ---------------------------------------------------------------

    def _special_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"the tokenizer has no special token {token!r}; a Qwen2-Audio tokenizer.json lists it "
                f"among its added_tokens (expected: {', '.join(t for t, _ in QWEN2_AUDIO_SPECIAL_TOKENS)})"
            )
        if token_id not in self._added_ids:
            raise ValueError(
                f"{token!r} is an ordinary vocabulary entry (id {token_id}), not an added token, so text "
                f"containing it would not be parsed as one token; add it to tokenizer.json's added_tokens"
            )
        return token_id

    @property
    def pad_id(self) -> int:
        """<|endoftext|>: padding, and the end of a document."""
        return self._special_id(ENDOFTEXT)

    @property
    def endoftext_id(self) -> int:
        return self._special_id(ENDOFTEXT)

    @property
    def im_start_id(self) -> int:
        return self._special_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._special_id(IM_END)

    @property
    def audio_id(self) -> int:
        """<|AUDIO|>, the placeholder expanded to one token per audio frame."""
        return self._special_id(AUDIO)

    @property
    def audio_bos_id(self) -> int:
        return self._special_id(AUDIO_BOS)

    @property
    def audio_eos_id(self) -> int:
        return self._special_id(AUDIO_EOS)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: the checkpoint's (``set_stop_ids``), else <|im_end|> (chat) and
        <|endoftext|> (base model)."""
        if self._stop_ids is not None:
            return self._stop_ids
        return frozenset({self.im_end_id, self.endoftext_id})

    def set_stop_ids(self, ids: frozenset[int] | None) -> None:
        """End generation at these ids (a checkpoint's generation_config.json ``eos_token_id``, as transformers'
        generate() does); None: the default pair."""
        if ids is not None:
            vocab = self.vocab_size
            if not ids or any(not 0 <= i < vocab for i in ids):
                raise ValueError(f"stop token ids {sorted(ids)} must be non-empty and within the tokenizer's "
                                 f"{vocab} ids")
            ids = frozenset(ids)
        self._stop_ids = ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ---- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in the text become their ids; no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Incomplete UTF-8 at the end comes out as U+FFFD (use StreamDecoder to stream)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """The id of a token string (byte-level form for ordinary tokens, e.g. "Ġthe")."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"id {token_id} is outside the tokenizer's vocabulary (size {self.vocab_size})")
        return token

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (its UTF-8 text for a special or added token). A token may hold
        part of a character: join the bytes of consecutive tokens before decoding them. An id past the
        vocabulary (a model's spare embedding rows: it may still produce one) stands for no bytes, as
        decode() drops it."""
        if int(token_id) >= 0 and self._tok.id_to_token(int(token_id)) is None:
            return b""
        token = self.id_to_token(token_id)
        if int(token_id) in self._added_ids:
            return token.encode("utf-8")
        return bytes(_BYTE_OF_SYMBOL[c] for c in token)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A new incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


UTF8_MAX_BYTES = 4  # bytes in the longest UTF-8 character; each token carries at least one


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time, get back only the new text.

    Byte-level BPE can split one character over several tokens; a delta is held back until its
    last character is complete, so no delta ever ends in a broken character, and no text is
    emitted twice. Each push decodes only the tokens since the previous emission plus the
    previous emission's tokens as context (like vLLM's incremental detokenizer and HF's
    TextStreamer), so the cost per token is O(1) amortised and memory stays bounded.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []  # the window: context tokens, then tokens not yet emitted
        self._read = 0  # window[:_read] was emitted already (context); window[_read:] was not

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        end = len(self._ids)  # emit the window up to here
        if text.endswith(REPLACEMENT_CHAR):
            skipped = self._tokenizer.special_ids if self._skip_special else ()
            if sum(t not in skipped for t in self._ids[self._read:]) < UTF8_MAX_BYTES:  # a skipped special
                return ""  # token carries no byte: the last character's bytes are not all here yet
            # A character would be complete by now, so some bytes are invalid (a model's garbage):
            # emit up to the last character boundary rather than stall the stream.
            keep = self._unfinished_tail(text)
            if keep is None:
                return ""
            end -= keep
        emit_text = text if end == len(self._ids) else self._decode(self._ids[:end])  # decode once when whole
        delta = emit_text[len(self._decode(self._ids[: self._read])) :]
        emitted = self._ids[self._read : end]
        self._ids = emitted + self._ids[end:]  # the tokens just emitted become the next context
        self._read = len(emitted)
        return delta

    def _unfinished_tail(self, text: str) -> int | None:
        """How many trailing tokens hold the last, unfinished character (None: no clean split). A tail of
        skipped special tokens alone decodes to "" and would split anywhere: it holds no character."""
        skipped = self._tokenizer.special_ids if self._skip_special else ()
        for keep in range(1, UTF8_MAX_BYTES):
            if all(t in skipped for t in self._ids[-keep:]):
                continue
            if self._decode(self._ids[:-keep]) + self._decode(self._ids[-keep:]) == text:
                return keep
        return None

    def flush(self) -> str:
        """Returns whatever is held back (an incomplete character comes out as U+FFFD) and resets."""
        text = self._decode(self._ids)
        delta = text[len(self._decode(self._ids[: self._read])) :]
        self._ids, self._read = [], 0
        return delta


def _read_added_tokens(directory: Path) -> list[tuple[int, AddedToken]]:
    """(id, AddedToken) pairs from tokenizer_config.json's added_tokens_decoder or added_tokens.json."""
    config_path = directory / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        with open(config_path, encoding="utf-8") as f:
            decoder = json.load(f).get("added_tokens_decoder")
        if decoder:
            return [
                (
                    int(token_id),
                    AddedToken(
                        spec["content"],
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", False),
                        special=spec.get("special", True),
                    ),
                )
                for token_id, spec in decoder.items()
            ]
    legacy_path = directory / ADDED_TOKENS_FILE
    if legacy_path.is_file():
        with open(legacy_path, encoding="utf-8") as f:
            legacy = json.load(f)
        return [(int(i), AddedToken(t, normalized=False, special=True)) for t, i in legacy.items()]
    raise FileNotFoundError(
        f"{str(directory)!r} has {VOCAB_FILE} + {MERGES_FILE} but no added tokens: expected "
        f"{TOKENIZER_CONFIG_FILE} with an 'added_tokens_decoder' (or {ADDED_TOKENS_FILE}) listing "
        f"the special tokens ({', '.join(t for t, _ in QWEN2_AUDIO_SPECIAL_TOKENS)})"
    )


def build_byte_level_tokenizer(merges: Sequence[tuple[str | bytes, str | bytes]] = ()) -> Tokenizer:
    r"""A tiny, deterministic, real byte-level BPE tokenizer with Qwen2-Audio's special tokens.

    Ids 0..255 are the 256 bytes (id b is byte b, written in GPT-2's ByteLevel alphabet). Each
    merge adds the merged piece as the next id; a merge is a pair of strings such as ("t", "h")
    or (" ", "the"), or of bytes such as (b"\xe4", b"\xb8") for a piece that ends inside a
    character. The six special tokens follow, in QWEN2_AUDIO_SPECIAL_TOKENS' order. Uses Qwen2's
    pre-tokenizer and ByteLevel decoder but no NFC normaliser, so that every Unicode string
    round-trips exactly (encode then decode gives it back).
    """
    byte_char = bytes_to_unicode()

    def symbol(piece: str | bytes) -> str:
        raw = piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)
        return "".join(byte_char[b] for b in raw)

    vocab = {byte_char[b]: b for b in range(N_BYTES)}
    bpe_merges = []
    for left, right in merges:
        left_sym, right_sym = symbol(left), symbol(right)
        for part in (left_sym, right_sym):
            if part not in vocab:
                raise ValueError(f"merge ({left!r}, {right!r}): {part!r} is neither a byte nor an earlier merge")
        if left_sym + right_sym in vocab:
            raise ValueError(f"merge ({left!r}, {right!r}) repeats an earlier token")
        vocab[left_sym + right_sym] = len(vocab)
        bpe_merges.append((left_sym, right_sym))
    tok = _qwen2_bpe(vocab, bpe_merges, nfc=False)
    specials = [
        (len(vocab) + k, AddedToken(content, normalized=False, special=True))
        for k, (content, _) in enumerate(QWEN2_AUDIO_SPECIAL_TOKENS)
    ]
    _add_tokens_at_ids(tok, specials, source="build_byte_level_tokenizer")
    return Tokenizer(tok)
