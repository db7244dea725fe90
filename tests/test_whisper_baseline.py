"""python -m demo.whisper_baseline: Whisper base's vocabulary, scoring and inputs (no model needed)."""

import base64
import math

import pytest

from demo import whisper_baseline as wb
from qwen2audio.eval.runner import ANSWER_KEY, score_records


def _tiktoken_file(folder, tokens: list[bytes]):
    """A .tiktoken file in openai-whisper's layout: one "BASE64 RANK" line per token, in rank order (the real
    file's one empty token is written "=", which decodes to no bytes)."""
    path = folder / wb.TIKTOKEN_FILE
    path.write_text("".join(f"{base64.b64encode(t).decode() or '='} {rank}\n" for rank, t in enumerate(tokens)))
    return path


# ---- the vocabulary ----

def test_special_tokens_take_whispers_ids_after_the_text_tokens(tmp_path):
    ranks = wb.read_ranks(_tiktoken_file(tmp_path, [b"a", b" b", b""]), n_text_tokens=3)
    tokens = wb.vocabulary_tokens(ranks)
    assert tokens[:3] == ["a", "\u0120b", ""]  # byte-level characters: a space is "Ġ"; an empty token stays
    first = 3  # the first id after the text tokens: 50257 in Whisper's multilingual vocabulary
    assert tokens[first:first + 3] == [wb.EOT, wb.SOT, "<|en|>"]
    assert tokens[first + 2 + 98] == "<|su|>"  # the 99th and last language of the multilingual models
    assert tokens[first + 101:first + 108] == [wb.TRANSLATE, wb.TRANSCRIBE, wb.SOT_LM, wb.SOT_PREV, wb.NO_SPEECH,
                                                wb.NO_TIMESTAMPS, "<|0.00|>"]
    assert tokens[-2:] == ["<|29.98|>", "<|30.00|>"]


def test_the_real_sizes_give_whispers_known_ids():
    specials = wb.special_tokens()
    assert wb.N_TEXT_TOKENS + len(specials) == wb.N_VOCAB == 51865  # CTranslate2 calls 51865 multilingual
    ids = {token: wb.N_TEXT_TOKENS + i for i, token in enumerate(specials)}
    assert (ids[wb.EOT], ids[wb.SOT], ids["<|en|>"], ids[wb.TRANSCRIBE]) == (50257, 50258, 50259, 50359)
    assert (ids[wb.NO_SPEECH], ids[wb.NO_TIMESTAMPS], ids["<|0.00|>"]) == (50362, 50363, 50364)


def test_ranks_that_are_not_whispers_are_refused_with_the_fix(tmp_path):
    with pytest.raises(wb.UsageError, match="ranks 0 .. 50256.*--whisper-assets"):
        wb.read_ranks(_tiktoken_file(tmp_path, [b"a", b"b"]))


def test_the_tiktoken_file_is_found_in_the_sdist_folder_or_refused(tmp_path):
    assets = tmp_path / "openai_whisper-1" / "whisper" / "assets"
    assets.mkdir(parents=True)
    path = _tiktoken_file(assets, [b"a"])
    assert wb.find_tiktoken(tmp_path / "openai_whisper-1") == path
    assert wb.find_tiktoken(assets) == path
    with pytest.raises(wb.UsageError, match="pip download openai-whisper"):
        wb.find_tiktoken(tmp_path)


def test_the_encoding_decodes_text_and_leaves_special_tokens_out(tmp_path):
    ranks = wb.read_ranks(_tiktoken_file(tmp_path, [bytes([b]) for b in range(256)]), n_text_tokens=256)
    vocab = wb.build_vocabulary(ranks, n_vocab=256 + len(wb.special_tokens()))
    assert vocab.id(wb.EOT) == 256 and vocab.id(wb.NO_TIMESTAMPS) == 256 + 106
    ids = vocab.encoding.encode(" Hé, there")
    assert vocab.decode(ids + [vocab.id(wb.EOT), vocab.id("<|1.00|>")]) == "Hé, there"


# ---- scoring ----

def _record(source: str, reference: str, hypothesis: str, no_speech_prob=0.0, avg_logprob=-0.1) -> dict:
    return {"id": f"{source}:{reference}", "audio": "x.flac", "source": source, "metric": "wer:en",
            "reference": reference, "hypothesis": hypothesis, "no_speech_prob": no_speech_prob,
            "avg_logprob": avg_logprob}


def test_wer_per_source_and_overall_with_the_evaluations_normaliser():
    records = score_records([
        _record("clean", "The cat sat.", "the cat sat"),  # case and punctuation are normalised away: 0 edits
        _record("clean", "Twelve dogs", "12 dogs"),  # the English normaliser writes numbers as digits: 0 edits
        _record("noisy", "the quick brown fox", "the quick"),  # 2 deletions of 4 words
    ])
    results = wb.summary(records)
    assert results["subsets"]["clean"]["score"] == 0.0
    assert results["subsets"]["noisy"]["score"] == 50.0
    assert math.isclose(results["overall"]["score"], 100 * 2 / 9)  # corpus WER: 2 edits over 3 + 2 + 4 words


def test_answers_are_counted_with_words_kept_as_speech_and_looping():
    records = score_records([
        _record("noise", "no speech", ""),
        _record("noise", "no speech", "Thank you.", no_speech_prob=0.9, avg_logprob=-1.5),  # Whisper drops it
        _record("noise", "no speech", "Thank you.", no_speech_prob=0.9, avg_logprob=-0.5),  # confident: kept
        _record("music", "no speech", " nudge" * 40),  # a repetition loop
    ])
    counts = wb.source_counts(records)
    assert counts["noise"] == {"answers": 3, "with_words": 2, "kept_as_speech": 1, "looping": 0}
    assert counts["all"] == {"answers": 4, "with_words": 3, "kept_as_speech": 2, "looping": 1}


# ---- inputs ----

def _data(tmp_path):
    (tmp_path / "data" / "eval").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "eval" / "asr.jsonl").write_text("")
    return tmp_path / "data"


def _refused(args: list[str], capsys) -> str:
    assert wb.main(args) == 2
    return capsys.readouterr().err


def test_a_missing_split_is_refused_naming_the_sets(tmp_path, capsys):
    err = _refused(["--data", str(_data(tmp_path)), "--split", "asr_typo", "--whisper-assets", str(tmp_path)], capsys)
    assert "asr_typo.jsonl not found" in err and "--split" in err


def test_missing_whisper_assets_are_refused_saying_where_to_get_them(tmp_path, capsys):
    err = _refused(["--data", str(_data(tmp_path))], capsys)
    assert "--whisper-assets" in err and "pip download openai-whisper" in err
    err = _refused(["--data", str(_data(tmp_path)), "--whisper-assets", str(tmp_path / "nowhere")], capsys)
    assert "no multilingual.tiktoken" in err


def test_summary_file_sits_beside_the_answers(tmp_path):
    assert wb.summary_path(tmp_path / "asr.jsonl") == tmp_path / "asr.summary.json"


def test_stored_answers_are_reused_only_when_made_the_same_way_and_not_failed():
    basis = wb.answer_basis()
    assert wb.reusable({ANSWER_KEY: basis, "hypothesis": "hi"}, basis)
    assert not wb.reusable({ANSWER_KEY: {**basis, "decoding": "beam 5"}, "hypothesis": "hi"}, basis)
    assert not wb.reusable({ANSWER_KEY: basis, "error": "unreadable audio"}, basis)
    assert not wb.reusable(None, basis)


def test_a_stored_answer_of_another_clip_under_the_same_id_is_made_again(tmp_path):
    """A remade data folder has other clips under the same ids: Whisper's old answers were scored against
    the new references (83 % WER on the repro)."""
    import os

    from qwen2audio.eval.runner import audio_identity

    clip = tmp_path / "a.flac"
    clip.write_bytes(b"one clip")
    basis = wb.answer_basis()

    def made_as():  # what run() asks a stored answer to have been made as, for this clip now
        return {**basis, "audio": audio_identity(str(clip))}

    record = {ANSWER_KEY: made_as(), "hypothesis": "hi"}
    assert wb.reusable(record, made_as())
    clip.write_bytes(b"another clip, remade")
    os.utime(clip, ns=(1, 1))
    assert not wb.reusable(record, made_as())
    assert not wb.reusable({ANSWER_KEY: basis, "hypothesis": "hi"}, made_as())  # stored before it was kept


def test_mean_log_probability_counts_the_end_token_as_openai_whisper():
    from types import SimpleNamespace

    result = SimpleNamespace(sequences_ids=[[11, 12, 13]], scores=[-0.4])  # summed -1.2 over 3 tokens
    assert math.isclose(wb.mean_logprob(result), -1.2 / 4)
