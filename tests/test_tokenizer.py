"""The tokenizer: round trips, special tokens, streaming, files, and parity with transformers."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from tokenizers import AddedToken, Regex, models, pre_tokenizers, trainers

from qwen2audio.text import StreamDecoder, Tokenizer, build_byte_level_tokenizer
from qwen2audio.text.special_tokens import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN2_AUDIO_SPECIAL_TOKENS,
)
from qwen2audio.text.tokenizer import QWEN2_PRETOKENIZE_REGEX

# Plain-text merges, and byte merges whose tokens end inside a character (世 = e4 b8 96, 界 = e7 95 8c)
# or span two characters, as real byte-level BPE vocabularies have.
MERGES = [
    ("t", "h"), ("th", "e"), (" ", "the"), ("\n", "\n"), (" ", "a"),
    (b"\xe4", b"\xb8"), (b"\x96", b"\xe7"), (b"\xe4\xb8", b"\x96\xe7"),
]

TEXTS = [
    "Hello, world! It's 2024; we'll see.",
    "你好，世界。这是一个测试。",
    "Emoji: 😀👍🏽 👨‍👩‍👧 🇯🇵 and more",
    "line one\nline two\r\n\n\tindented   spaces  \n",
    "naïve café, e\u0301 (decomposed), Ångström, ﬁ ligature",
    "Mixed: the 世界 the\u00a0nbsp ½ ⅔ ٣ 123456789",
    "I'M SHOUTING, DON'T YOU'LL HE'D",
    "",
    " ",
    "\n\n\n",
    "<|im_start|>user\nWhat's that sound?<|im_end|>\n<|im_start|>assistant\n",
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nx<|endoftext|>",
    "<|im_start|><|im_start|>x<|im_end|>  <|AUDIO|><|AUDIO|>",
    "a <|AUDIO|> b",
]


def random_text(rng: random.Random, n: int) -> str:
    """A random mix of 1- to 4-byte UTF-8 characters, whitespace and special-token strings."""
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABC.,!?'",
        " \n\t\r",
        "éüßñçåøœ",  # 2 bytes
        "世界你好中文测试語",  # 3 bytes
        "😀🎵🔊👍🏽🇯🇵",  # 4 bytes (and modifiers)
    ]
    out = []
    for _ in range(n):
        if rng.random() < 0.03:
            out.append(rng.choice([IM_START, IM_END, AUDIO]))
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_byte_level_tokenizer(MERGES)


# ---- build_byte_level_tokenizer --------------------------------------------------------------------


@pytest.mark.parametrize("merges", [(), MERGES])
def test_round_trip_any_unicode(merges):
    tok = build_byte_level_tokenizer(merges)
    rng = random.Random(0)
    texts = TEXTS + [random_text(rng, 200) for _ in range(20)]
    texts.append("".join(chr(c) for c in rng.sample(range(0x20, 0xD7FF), 300)))
    for text in texts:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_base_vocabulary_is_the_bytes():
    tok = build_byte_level_tokenizer()
    assert tok.encode("A") == [ord("A")]
    assert tok.encode("é") == list("é".encode())
    assert tok.vocab_size == 256 + len(QWEN2_AUDIO_SPECIAL_TOKENS)


def test_special_tokens_follow_the_base_vocabulary_in_table_order(tok):
    first = 256 + len(MERGES)
    named = [tok.pad_id, tok.im_start_id, tok.im_end_id, tok.audio_id, tok.audio_bos_id, tok.audio_eos_id]
    assert named == list(range(first, first + 6))
    for k, (content, _) in enumerate(QWEN2_AUDIO_SPECIAL_TOKENS):
        assert tok.token_to_id(content) == first + k
    assert tok.stop_ids == {tok.im_end_id, tok.pad_id}
    assert tok.vocab_size == first + 6


def test_special_tokens_are_single_ids_and_parsed_in_text(tok):
    for token in (ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS):
        assert tok.encode(token) == [tok.token_to_id(token)]
    ids = tok.encode(f"x{AUDIO_BOS}{AUDIO}{AUDIO_EOS}\nthe")
    assert ids[1:4] == [tok.audio_bos_id, tok.audio_id, tok.audio_eos_id]
    assert tok.decode(ids) == "x\nthe"  # specials skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == f"x{AUDIO_BOS}{AUDIO}{AUDIO_EOS}\nthe"


def test_merges_apply(tok):
    assert tok.encode("the the") == [tok.token_to_id("the"), tok.token_to_id("Ġthe")]
    with pytest.raises(ValueError, match="neither a byte nor an earlier merge"):
        build_byte_level_tokenizer([("the", "m")])


def test_no_bos_is_added(tok):
    assert tok.encode("hi") == [ord("h"), ord("i")]


def test_ids_equal_transformers_fast_after_save(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    plain = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    rng = random.Random(1)
    for text in TEXTS + [random_text(rng, 100) for _ in range(10)]:
        ids = tok.encode(text)
        assert auto(text)["input_ids"] == ids
        assert plain(text)["input_ids"] == ids
        assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids)
        assert auto.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    assert auto.convert_tokens_to_ids(AUDIO) == tok.audio_id
    assert auto.pad_token_id == tok.pad_id
    assert len(auto) == tok.vocab_size


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer_config.json").is_file()
    loaded = Tokenizer.from_dir(tmp_path / "ckpt")
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.audio_id == tok.audio_id and loaded.stop_ids == tok.stop_ids
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)


# ---- errors ----------------------------------------------------------------------------------------


def test_missing_tokenizer_json_names_the_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*" + str(tmp_path)) as info:
        Tokenizer.from_dir(tmp_path)
    assert "vocab.json" in str(info.value) and "merges.txt" in str(info.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_a_tokenizer_json_that_is_not_one_names_the_file(tmp_path):
    from qwen2audio.errors import CheckpointError

    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a tokenizer file .*copy it again"):
        Tokenizer.from_dir(tmp_path)


def test_missing_special_token_is_named():
    backend = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    tok = Tokenizer(backend)
    assert tok.pad_id == 2
    with pytest.raises(ValueError, match=r"<\|AUDIO\|>"):
        tok.audio_id
    with pytest.raises(ValueError, match=r"<\|im_end\|>"):
        tok.stop_ids


def test_special_token_only_in_plain_vocabulary_is_an_error():
    backend = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, AUDIO: 1}, merges=[]))
    with pytest.raises(ValueError, match="not an added token"):
        Tokenizer(backend).audio_id


def test_unknown_token_and_id_errors(tok):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.token_to_id("<|nope|>")
    with pytest.raises(ValueError, match="outside"):
        tok.id_to_token(10**6)


# ---- streaming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("merges", [(), MERGES])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_decoder_yields_exactly_the_full_decode(merges, skip_special_tokens):
    tok = build_byte_level_tokenizer(merges)
    rng = random.Random(2)
    for _ in range(20):
        ids = tok.encode(random_text(rng, 150))
        stream = tok.stream(skip_special_tokens=skip_special_tokens)
        deltas = [stream.push(i) for i in ids]
        deltas.append(stream.flush())
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_decoder_holds_back_a_split_character(tok):
    stream = StreamDecoder(tok)
    first, second, third, fourth = "😀".encode()  # one character, four byte tokens
    assert stream.push(ord("a")) == "a"
    assert [stream.push(b) for b in (first, second, third)] == ["", "", ""]
    assert stream.push(fourth) == "😀"
    assert stream.push(tok.im_end_id) == ""
    assert stream.flush() == ""
    stream.push("世".encode()[0])
    assert stream.flush() == "\ufffd"  # an unfinished character at the very end is reported, not dropped


def test_a_special_token_inside_a_character_does_not_break_it(tok):
    """A skipped special token carries no byte: the character around it streams whole, as decode gives it."""
    for ids in ([ord("A"), *"😀".encode()[:3], tok.audio_id, "😀".encode()[3]],
                [*"世".encode()[:1], tok.audio_id, tok.audio_id, *"世".encode()[1:]]):
        stream = StreamDecoder(tok)
        deltas = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(deltas) == tok.decode(ids) and "\ufffd" not in "".join(deltas), deltas


def test_stream_decoder_does_not_stall_on_invalid_bytes(tok):
    """Bytes that can never form a character (a model's garbage) stream out, not held to the end."""
    stream = StreamDecoder(tok)
    lone_lead_byte = "Ą".encode()[0]  # 0xC4 starts a 2-byte character; repeated it never completes one
    deltas = [stream.push(lone_lead_byte) for _ in range(12)]
    assert sum(d.count("\ufffd") for d in deltas) >= 8  # out while streaming, at most 4 tokens late
    assert "".join(deltas) + stream.flush() == tok.decode([lone_lead_byte] * 12)


def test_stream_decoder_after_invalid_bytes_does_not_split_at_a_skipped_special_token(tok):
    """After invalid bytes, a tail of skipped special tokens alone (it decodes to "") was taken for the
    unfinished character: the character before it came out as U+FFFD and its later bytes were lost."""
    ids = [0xE4, 0xF0, 0xB8, tok.audio_id, 0xB8, tok.audio_id, 0xB8]
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_an_id_past_the_vocabulary_stands_for_no_bytes(tok):
    """A model's embedding may have spare rows past the tokenizer's ids (the demo base: 151,936 rows for
    151,668 ids); such an id sampled or among the top logprobs failed the request."""
    spare = tok.vocab_size + 5
    assert tok.token_bytes(spare) == b"" and tok.decode([ord("A"), spare]) == "A"
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tok.id_to_token(spare)


def test_stream_decoder_decodes_a_short_window(tok):
    """O(1) per token: every decode call sees a few tokens, however long the stream."""
    seen = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            ids = list(ids)
            seen.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = Counting(tok.backend)
    ids = tok.encode(random_text(random.Random(3), 3000))
    stream = counting.stream()
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids)
    assert len(ids) > 3000 and max(seen) <= 10


# ---- vocab.json + merges.txt fallback against transformers' slow Qwen2Tokenizer ----------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's the dog's bone, isn't it?",
    "Speech recognition turns audio into text; translation turns it into another language.",
    "语音识别把音频转换成文字。今天天气很好，我们去公园散步吧。",
    "Numbers 1234567890 and emoji 😀🎵 and accents café naïve über.",
    "What's that sound? It is the sound of glass shattering.\nHow about this one?\r\n",
]


def _train_tiny_qwen2_bpe(directory) -> int:
    """Trains a tiny byte-level BPE with Qwen2's pre-tokenizer and saves vocab.json + merges.txt."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    backend.model.save(str(directory))
    return backend.get_vocab_size()


def _write_added_tokens_config(directory, first_id: int) -> None:
    added = {
        str(first_id + k): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for k, (content, _) in enumerate(QWEN2_AUDIO_SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None, "errors": "replace",
        "clean_up_tokenization_spaces": False,
        # as in the released configs; the slow tokenizer skips only these (and pad/eos) when decoding
        "additional_special_tokens": [t for t, _ in QWEN2_AUDIO_SPECIAL_TOKENS if t != ENDOFTEXT],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_vocab_and_merges_fallback_matches_transformers_slow_tokenizer(tmp_path):
    from transformers import Qwen2Tokenizer, Qwen2TokenizerFast

    n_vocab = _train_tiny_qwen2_bpe(tmp_path)
    assert (tmp_path / "merges.txt").read_text().startswith("#version")
    _write_added_tokens_config(tmp_path, n_vocab)

    ours = Tokenizer.from_dir(tmp_path)
    slow = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    converted = Qwen2TokenizerFast.from_pretrained(str(tmp_path), from_slow=True)
    assert ours.audio_id == slow.convert_tokens_to_ids(AUDIO) == n_vocab + 3
    assert ours.vocab_size == len(slow)

    rng = random.Random(4)
    texts = TEXTS + CORPUS + [random_text(rng, 120) for _ in range(15)]
    texts.append("Cafe\u0301 vs Café: NFC makes these equal")
    for text in texts:
        ids = ours.encode(text)
        assert ids == slow.encode(text, add_special_tokens=False), text
        assert ids == converted.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == slow.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == slow.decode(ids)
    assert ours.encode("Cafe\u0301") == ours.encode("Café")  # the NFC normaliser is there


def test_fallback_reads_legacy_added_tokens_json(tmp_path):
    n_vocab = _train_tiny_qwen2_bpe(tmp_path)
    legacy = {content: n_vocab + k for k, (content, _) in enumerate(QWEN2_AUDIO_SPECIAL_TOKENS)}
    (tmp_path / "added_tokens.json").write_text(json.dumps(legacy))
    assert Tokenizer.from_dir(tmp_path).audio_eos_id == n_vocab + 5


def test_fallback_without_added_tokens_says_what_is_needed(tmp_path):
    _train_tiny_qwen2_bpe(tmp_path)
    with pytest.raises(FileNotFoundError, match="added_tokens_decoder"):
        Tokenizer.from_dir(tmp_path)


def test_fallback_with_gapped_added_token_ids_is_an_error(tmp_path):
    n_vocab = _train_tiny_qwen2_bpe(tmp_path)
    _write_added_tokens_config(tmp_path, n_vocab + 10)
    with pytest.raises(ValueError, match="without gaps"):
        Tokenizer.from_dir(tmp_path)
