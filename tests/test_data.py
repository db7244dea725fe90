"""Training data: manifest formats, the label mask from the chat template, validation reports, batching."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from qwen2audio.audio import SAMPLE_RATE, audio_token_count, num_valid_frames
from qwen2audio.data import (Collator, ManifestDataset, chat_segments, global_batches, parse_row, rank_micro_batches,
                             read_manifest, tokenize_example)
from qwen2audio.audio.features import window_lengths
from qwen2audio.data.encode import clip_token_count
from qwen2audio.data.manifest import ManifestError
from qwen2audio.model.qwen2audio import IGNORE_INDEX
from qwen2audio.text import build_byte_level_tokenizer, expand_audio_placeholders, render_chat

TOK = build_byte_level_tokenizer()
N_MELS = 128


def _wav(path, seconds=0.5, freq=440.0):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SAMPLE_RATE)
    return str(path)


def _trained_text(seq):
    return TOK.decode([t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE_INDEX], skip_special_tokens=False)


CONVERSATION = [
    {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A dog.\n"},
    {"role": "user", "content": [{"type": "audio", "audio": "b.wav"}]},  # voice chat: audio only
    {"role": "assistant", "content": "It barks twice."},
]


def test_sft_labels_are_the_assistant_answers_with_im_end():
    ex = parse_row({"messages": CONVERSATION}, "sft", 1)
    (seq,) = tokenize_example(ex, TOK, [8000, 16000])
    assert _trained_text(seq) == "A dog.\n<|im_end|>It barks twice.<|im_end|>"
    # the ids are exactly the rendered template's, with each <|AUDIO|> expanded to its clip's token count
    rendered = render_chat(CONVERSATION, add_generation_prompt=False).text
    counts = [audio_token_count(num_valid_frames(8000)), audio_token_count(num_valid_frames(16000))]
    assert seq.input_ids == expand_audio_placeholders(TOK.encode(rendered), TOK.audio_id, counts)
    assert counts == [12, 25]
    audio_labels = [lab for t, lab in zip(seq.input_ids, seq.labels) if t == TOK.audio_id]
    assert len(audio_labels) == 37 and set(audio_labels) == {IGNORE_INDEX}


def test_system_message_and_segments_follow_the_template():
    msgs = [{"role": "system", "content": "Be brief."}] + CONVERSATION[:2]
    segs = chat_segments(msgs)
    assert "".join(t for t, _ in segs) == render_chat(msgs, add_generation_prompt=False).text
    assert [t for t, trained in segs if trained] == ["A dog.\n<|im_end|>"]


def test_ms_swift_format_equals_the_message_format(tmp_path):
    swift = parse_row({"messages": [{"role": "user", "content": "<audio>What is it?"},
                                    {"role": "assistant", "content": "A dog."}], "audios": ["a.wav"]}, "sft", 1, tmp_path)
    hf = parse_row({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"},
                                                              {"type": "text", "text": "What is it?"}]},
                                 {"role": "assistant", "content": "A dog."}]}, "sft", 1, tmp_path)
    assert swift.messages == hf.messages and swift.audios == [str(tmp_path / "a.wav")]


def test_audios_without_tags_go_before_the_first_user_text_as_ms_swift_puts_them(tmp_path):
    untagged = parse_row({"messages": [{"role": "user", "content": "What is it?"},
                                       {"role": "assistant", "content": "A dog."}], "audios": "a.wav"}, "sft", 1, tmp_path)
    tagged = parse_row({"messages": [{"role": "user", "content": "<audio>What is it?"},
                                     {"role": "assistant", "content": "A dog."}], "audios": ["a.wav"]}, "sft", 1, tmp_path)
    assert untagged.messages == tagged.messages and untagged.audios == [str(tmp_path / "a.wav")]
    dpo = parse_row({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     "chosen": "Rain.", "rejected": "Applause.", "audios": ["r.wav"]}, "dpo", 1, tmp_path)
    assert dpo.audios == [str(tmp_path / "r.wav")] and dpo.messages[1]["content"][0]["type"] == "audio"
    both = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                         {"role": "assistant", "content": "A dog."}], "audios": ["b.wav"]}
    with pytest.raises(ManifestError, match="give each clip once"):
        parse_row(both, "sft", 1, tmp_path)
    with pytest.raises(ManifestError, match='"audios" must be a list of audio paths'):
        parse_row({"messages": tagged.messages, "audios": 5}, "sft", 1, tmp_path)


def test_manifest_reads_urls_bom_and_reports_bad_bytes_by_line(tmp_path):
    wav = _wav(tmp_path / "my clip.wav")
    data_url = "data:audio/wav;base64," + base64.b64encode(Path(wav).read_bytes()).decode()
    rows = [{"audio": f"file://{tmp_path}/my%20clip.wav", "prompt": "Classify the sound.", "target": "tone"},
            {"audio": data_url, "prompt": "Classify the sound.", "target": "tone"},
            {"audio": "x" * 300 + ".wav", "prompt": "Classify the sound.", "target": "tone"},
            {"audio": "https://example.com/a.wav", "prompt": "Classify the sound.", "target": "tone"}]
    body = "\ufeff" + "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "m.jsonl").write_bytes(body.encode() + b'{"audio": "caf\xe9.wav"}\n')
    ds = ManifestDataset(tmp_path / "m.jsonl", "pretrain", TOK, N_MELS)
    assert [ex.line for ex in ds.examples] == [1, 2] and ds.examples[0].audios == [wav]
    reasons = dict(ds.report.bad)
    assert reasons[3].startswith("missing audio") and "not fetched" in reasons[4]
    assert reasons[5] == "bad text: byte 0xe9 at column 15 is not UTF-8; save the manifest as UTF-8"
    with pytest.raises(FileNotFoundError, match="is a folder; give the JSONL file"):
        read_manifest(tmp_path, "pretrain")
    with pytest.raises(ManifestError, match="an assistant message has no text"):
        parse_row({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "sft", 1)


def test_pretrain_row_trains_the_target_and_endoftext_only():
    ex = parse_row({"audio": "a.wav", "prompt": "Transcribe this English speech.", "target": "hello"}, "pretrain", 1)
    (seq,) = tokenize_example(ex, TOK, [SAMPLE_RATE])
    assert _trained_text(seq) == "hello<|endoftext|>"
    assert seq.input_ids[0] == TOK.audio_bos_id and seq.input_ids.count(TOK.audio_id) == 25
    assert TOK.decode(seq.input_ids, skip_special_tokens=True) == "Transcribe this English speech.hello"


def test_dpo_rows_give_chosen_and_rejected_with_only_the_answer_trained():
    convo = CONVERSATION[:2] + [{"role": "user", "content": "And now?"}]
    for row in ({"messages": convo, "chosen": "Quiet.", "rejected": "Loud."},
                {"messages": convo, "chosen": {"role": "assistant", "content": "Quiet."},
                 "rejected": {"role": "assistant", "content": "Loud."}},
                {"messages": convo + [{"role": "assistant", "content": "Quiet."}], "rejected_response": "Loud."}):
        ex = parse_row(row, "dpo", 1)
        chosen, rejected = tokenize_example(ex, TOK, [8000])
        assert _trained_text(chosen) == "Quiet.<|im_end|>" and _trained_text(rejected) == "Loud.<|im_end|>"
        first = chosen.labels.index(next(lab for lab in chosen.labels if lab != IGNORE_INDEX))
        assert chosen.input_ids[:first] == rejected.input_ids[:first]  # the same prompt


def test_long_audio_is_windowed_like_inference():
    assert window_lengths(30 * SAMPLE_RATE) == [30 * SAMPLE_RATE]
    assert window_lengths(45 * SAMPLE_RATE) == [int(22.5 * SAMPLE_RATE)] * 2
    assert clip_token_count(45 * SAMPLE_RATE) == 2 * audio_token_count(num_valid_frames(int(22.5 * SAMPLE_RATE)))


@pytest.mark.parametrize("decode_audio", [True, False])
def test_validation_reports_bad_rows_and_keeps_the_good(tmp_path, decode_audio):
    good = _wav(tmp_path / "good.wav")
    long = _wav(tmp_path / "long.wav", seconds=3.0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
    rows = [
        {"audio": "good.wav", "prompt": "Classify the sound.", "target": "tone"},
        {"audio": "missing.wav", "prompt": "Classify the sound.", "target": "tone"},
        {"audio": "broken.wav", "prompt": "Classify the sound.", "target": "tone"},
        {"audio": "long.wav", "prompt": "Classify the sound.", "target": "tone"},
        {"audio": "good.wav", "prompt": "Classify the sound.", "target": "  "},
        {"prompt": "Classify the sound.", "target": "tone"},
        "not an object",
    ]
    lines = [json.dumps(r) for r in rows] + ["{broken json"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = ManifestDataset(tmp_path / "m.jsonl", "pretrain", TOK, N_MELS, max_audio_seconds=2.0, decode_audio=decode_audio)
    assert len(ds) == 1 and ds.examples[0].audios == [good]
    reasons = dict(ds.report.bad)
    assert reasons[2].startswith("missing audio") and reasons[3].startswith("unreadable audio")
    assert reasons[4].startswith("too long") and reasons[5].startswith("empty target")
    assert reasons[6].startswith("missing audio") and reasons[7].startswith("bad row") and reasons[8].startswith("bad json")
    assert reasons[8] == "bad json: Expecting property name enclosed in double quotes at column 2"
    summary = ds.report.summary()
    assert "1 of 8 rows usable, 7 skipped" in summary and "line 3: unreadable audio" in summary
    assert long  # the 3 s clip is over max_audio_seconds


def test_sft_validation_catches_empty_answers_and_sequence_length(tmp_path):
    _wav(tmp_path / "a.wav")
    rows = [{"messages": [{"role": "user", "content": "<audio>Hi"}, {"role": "assistant", "content": "Hello."}],
             "audios": ["a.wav"]},
            {"messages": [{"role": "user", "content": "<audio>Hi"}, {"role": "assistant", "content": ""}],
             "audios": ["a.wav"]},
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "user", "content": "<audio><audio>Hi"}, {"role": "assistant", "content": "x"}],
             "audios": ["a.wav"]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = read_manifest(tmp_path / "m.jsonl", "sft")
    assert len(examples) == 1 and [line for line, _ in report.bad] == [2, 3, 4]
    ds = ManifestDataset(tmp_path / "m.jsonl", "sft", TOK, N_MELS, max_seq_len=20)
    assert len(ds) == 0 and "too long" in ds.report.summary()


def test_collator_pads_and_computes_features(tmp_path):
    _wav(tmp_path / "a.wav", 0.5), _wav(tmp_path / "b.wav", 1.0)
    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                          {"role": "assistant", "content": "Short."}]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "b.wav"},
                                                       {"type": "text", "text": "Longer question here?"}]},
                          {"role": "assistant", "content": "A longer answer."}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(tmp_path / "m.jsonl", "sft", TOK, N_MELS)
    batch = Collator(TOK.pad_id)([ds[0], ds[1]])
    B, T = batch["input_ids"].shape
    assert B == 2 and T == max(ds.lengths)
    assert batch["frame_lengths"].tolist() == [50, 100]
    assert batch["features"].shape == (2, N_MELS, 102)  # valid frames + the 2 the convolutions read
    assert batch["attention_mask"].sum().item() == sum(ds.lengths)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"] == TOK.audio_id).sum().item() == 12 + 25


def test_global_batches_are_deterministic_grouped_and_split_over_ranks():
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 500, size=103)]
    a = global_batches(lengths, 8, seed=1, epoch=0)
    assert a == global_batches(lengths, 8, seed=1, epoch=0) and a != global_batches(lengths, 8, seed=1, epoch=1)
    assert len(a) == 12 and len({i for b in a for i in b}) == 96  # no index twice; the last partial batch dropped
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a])
    assert spread < 0.5 * (max(lengths) - min(lengths))  # grouped by length
    for batch in a:
        parts = [rank_micro_batches(batch, r, 2, 2) for r in range(2)]
        assert all(len(p) == 2 for p in parts)
        assert sorted(i for p in parts for m in p for i in m) == sorted(batch)


@pytest.mark.parametrize("decode_audio", [False, True])
def test_a_clip_too_short_for_an_audio_token_is_skipped_and_named(tmp_path, decode_audio):
    """A 6 ms clip gives the encoder nothing to pool: such a row is reported, not left to fail mid-run."""
    soundfile.write(tmp_path / "click.wav", np.zeros(100, dtype=np.float32), 16000)
    _wav(tmp_path / "a.wav")
    rows = [{"audio": str(tmp_path / name), "prompt": "Transcribe.", "target": "hello", "task": "asr"}
            for name in ("a.wav", "click.wav")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(tmp_path / "m.jsonl", "pretrain", TOK, N_MELS, decode_audio=decode_audio)
    assert len(ds) == 1 and [line for line, _ in ds.report.bad] == [2]
    assert "too short" in ds.report.bad[0][1] and "click.wav" in ds.report.bad[0][1]


def test_an_mp3_without_a_frame_count_is_measured_by_decoding_it(tmp_path):
    """With decode_audio false a clip's length came from libsndfile's header figure, which for a VBR MP3
    without its Xing frame is a guess from the first frame's bitrate: a 6 s clip passed max_audio_seconds=3
    (and max_seq_len) as ~1 s. Such a file is decoded; one with its Xing count is read from the header."""
    from qwen2audio.audio.io import stated_length

    t = np.arange(6 * SAMPLE_RATE) / SAMPLE_RATE
    buffer = tmp_path / "whole.mp3"
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SAMPLE_RATE,
                    format="MP3", subtype="MPEG_LAYER_III")
    data = buffer.read_bytes()
    (tmp_path / "bare.mp3").write_bytes(data[data.find(data[:2], 4):])  # without the Xing/Info frame
    assert abs(stated_length(str(buffer)) - 6 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert stated_length(str(tmp_path / "bare.mp3")) is None
    rows = [{"audio": str(tmp_path / name), "prompt": "Transcribe.", "target": "hello", "task": "asr"}
            for name in ("whole.mp3", "bare.mp3")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(tmp_path / "m.jsonl", "pretrain", TOK, N_MELS, max_audio_seconds=3.0, decode_audio=False)
    assert len(ds) == 0 and [line for line, _ in ds.report.bad] == [1, 2]
    assert all("too long" in reason for _, reason in ds.report.bad)


def test_a_row_cut_short_is_placed_at_its_end_and_a_number_target_is_named():
    """A row without its closing brace was reported at column 1 (the error fell past its newline); a target
    that is a number was "missing or empty"."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        row = '{"audio": "a.wav", "prompt": "Classify.", "target": "tone"'
        (Path(tmp) / "m.jsonl").write_text(row + "\n")
        _, report = read_manifest(Path(tmp) / "m.jsonl", "pretrain")
    assert report.bad == [(1, f"bad json: Expecting ',' delimiter at column {len(row) + 1}")]
    with pytest.raises(ManifestError, match='"target" must be text, got 5'):
        parse_row({"audio": "a.wav", "prompt": "Classify.", "target": 5}, "pretrain", 1)


def test_a_dpo_answer_of_the_wrong_shape_is_a_counted_bad_row(tmp_path):
    """An answer object whose content is null or holds a non-text part was a TypeError out of read_manifest
    (the whole run died, no line named); it is a bad row like the others."""
    convo = CONVERSATION[:2] + [{"role": "user", "content": "And now?"}]
    rows = [{"messages": convo, "chosen": "Quiet.", "rejected": "Loud."},
            {"messages": convo, "chosen": {"content": None}, "rejected": "Loud."},
            {"messages": convo, "chosen": {"role": "assistant", "content": [{"type": "text", "text": 3}]},
             "rejected": "Loud."},
            {"messages": convo, "chosen": "Quiet.", "rejected": {"role": "assistant", "content": 7}}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = read_manifest(tmp_path / "m.jsonl", "dpo")
    assert len(examples) == 1
    reasons = dict(report.bad)
    assert sorted(reasons) == [2, 3, 4]
    assert reasons[2].startswith("empty target") and all(reasons[k].startswith("bad row") for k in (3, 4))
    assert 'content must be a string or a list of {"type": "text"' in reasons[3]


def test_a_task_the_manifest_lacks_is_refused_even_beside_one_it_has(tmp_path):
    """tasks=[asr, captionig]: the misspelt task's rows were left out without a word (the report counted only
    the rows kept); a training set must have rows of every task named, a validation set of one at least."""
    _wav(tmp_path / "a.wav")
    rows = [{"audio": "a.wav", "prompt": "p", "target": "t", "task": task} for task in ("asr", "asr", "caption")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"no rows of the tasks \['captionig'\] \(its rows' tasks: asr, caption\)"):
        ManifestDataset(tmp_path / "m.jsonl", "pretrain", TOK, N_MELS, tasks=["asr", "captionig"])
    ds = ManifestDataset(tmp_path / "m.jsonl", "pretrain", TOK, N_MELS, tasks=["asr", "captionig"], every_task=False)
    assert len(ds) == 2
    assert "2 of 2 rows usable, 0 skipped (1 rows of other tasks left out)" in ds.report.summary()
