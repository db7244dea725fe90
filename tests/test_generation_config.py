"""A checkpoint's generation_config.json sets the default decoding of chat replies (Python API and
`qwen2audio chat`), as transformers applies it; arguments and flags override it; transcription stays
greedy, and evaluation takes what the official generate(do_sample=False) call keeps of it; and the file we
write reads back as our defaults."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from qwen2audio import CheckpointError, Qwen2Audio
from qwen2audio.checkpoint.files import GENERATION_FILE, write_generation_config
from qwen2audio.cli import build_parser
from qwen2audio.generation.params import (
    SamplingParams,
    from_generation_config,
    generation_settings,
    greedy_call_settings,
    load_generation_config,
    to_generation_config,
    transcription_defaults,
)
from reference import TOKENIZER, clip
from test_cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")

# The sampling settings of Qwen2-Audio-7B-Instruct's generation_config.json, with the keys that are
# not sampling settings (ids, versions) that such a file also holds.
INSTRUCT_FILE = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151643, 151645],
                 "do_sample": True, "top_k": 20, "top_p": 0.5, "temperature": 0.7, "repetition_penalty": 1.1,
                 "transformers_version": "4.45.0.dev0"}
INSTRUCT = {"temperature": 0.7, "top_k": 20, "top_p": 0.5, "repetition_penalty": 1.1}
NEW = 12
G = {"top_k": 50, "top_p": 1.0}  # transformers' filters, used where a caller's temperature turns sampling on


# -- reading the file -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,expected", [
    (INSTRUCT_FILE, INSTRUCT),
    # the temperature unused; top_k / top_p kept for a caller's temperature (transformers samples with them)
    ({"do_sample": False, "temperature": 0.7, "top_k": 20, "max_new_tokens": 64},
     {"temperature": 0.0, "top_k": 20, "top_p": 1.0, "max_new_tokens": 64}),
    ({"temperature": 0.7}, {"temperature": 0.0, **G}),  # do_sample absent: greedy, as transformers decodes
    ({"do_sample": True}, {"temperature": 1.0, "top_k": 50, "top_p": 1.0}),  # transformers' own defaults
    ({"do_sample": False, "repetition_penalty": 1.05, "max_length": 20, "num_beams": 1, "chat_format": "chatml"},
     {"temperature": 0.0, "repetition_penalty": 1.05, **G}),  # other keys are not ours to apply
    # top_k null: no top-k filter, as transformers' generate() applies it (not its default 50)
    ({"do_sample": True, "top_k": None, "temperature": 0.5}, {"temperature": 0.5, "top_k": 0, "top_p": 1.0}),
    ({"do_sample": False, "top_k": None}, {"temperature": 0.0, "top_k": 0, "top_p": 1.0}),
    ({"num_beams": 4, "length_penalty": 0.5}, {"temperature": 0.0, "num_beams": 4, "length_penalty": 0.5, **G}),
    ({"num_beams": 3}, {"temperature": 0.0, "num_beams": 3, **G}),  # transformers' length_penalty 1: ours too
    ({"num_beams": 1, "length_penalty": 2.0}, {"temperature": 0.0, **G}),  # one beam: no length penalty
    ({"min_new_tokens": 3}, {"temperature": 0.0, "min_new_tokens": 3, **G}),  # transformers applies it: so do we
])
def test_settings_from_a_generation_config(config, expected):
    assert from_generation_config(config) == expected
    SamplingParams(**expected)
    # the reference: each setting as transformers' GenerationConfig reads the same file
    from transformers import GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own notes on unused settings (a temperature without sampling)
        hf = GenerationConfig.from_dict(dict(config))
    assert expected["temperature"] == (hf.temperature if hf.do_sample else 0.0)
    assert expected["top_k"] == (hf.top_k or 0) and expected["top_p"] == (1.0 if hf.top_p is None else hf.top_p)
    assert expected.get("repetition_penalty", 1.0) == hf.repetition_penalty
    assert expected.get("num_beams", 1) == hf.num_beams
    assert expected.get("length_penalty", 1.0) == (hf.length_penalty if hf.num_beams > 1 else 1.0)
    assert expected.get("min_new_tokens") == hf.min_new_tokens and expected.get("max_new_tokens") == hf.max_new_tokens


def test_beam_sampling_is_read_as_transformers_applies_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = from_generation_config({"do_sample": True, "num_beams": 4, "temperature": 0.5, "length_penalty": 2})
    assert kwargs == {"temperature": 0.5, "top_k": 50, "top_p": 1.0, "num_beams": 4, "length_penalty": 2.0}
    params = SamplingParams(**kwargs)
    assert params.beams and not params.greedy
    assert from_generation_config(to_generation_config(params)) == {**kwargs, "max_new_tokens": 256}  # read back


@pytest.mark.parametrize("defaults, given, expected", [
    ({"num_beams": 4, "temperature": 0.0}, {}, {"num_beams": 4, "temperature": 0.0}),  # the checkpoint's beams
    ({"num_beams": 4, "temperature": 0.7}, {"seed": 2}, {"num_beams": 4, "temperature": 0.7, "seed": 2}),  # its
    # beam sampling
    ({"num_beams": 4}, {"temperature": 0.7}, {"num_beams": 1, "temperature": 0.7}),  # asked to sample: one beam
    ({"num_beams": 4, "temperature": 0.0}, {"stop": ("x",)}, {"num_beams": 1, "temperature": 0.0, "stop": ("x",)}),
    ({"temperature": 0.7, "top_k": 20}, {"num_beams": 3}, {"num_beams": 3, "temperature": 0.0, "top_k": 20}),
    ({"temperature": 0.7}, {"num_beams": 3, "temperature": 0.5}, {"num_beams": 3, "temperature": 0.5}),  # beam
    # sampling
    ({"temperature": 0.7}, {"seed": 1}, {"temperature": 0.7, "seed": 1}),
])
def test_chat_settings_let_the_caller_choose_between_beams_and_sampling(defaults, given, expected):
    from qwen2audio.generation.params import chat_settings

    assert chat_settings(defaults, given) == expected


def test_missing_keys_take_the_defaults_of_the_pinned_transformers():
    from transformers import GenerationConfig

    hf = GenerationConfig.from_dict({"do_sample": True})
    assert from_generation_config({"do_sample": True}) == {
        "temperature": hf.temperature, "top_k": hf.top_k, "top_p": hf.top_p}


@pytest.mark.parametrize("text,message", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    ('{"do_sample": "yes"}', "do_sample must be true or false"),
    ('{"do_sample": true, "top_k": 2.5}', "top_k must be an integer"),
    ('{"do_sample": true, "top_p": 0}', "top_p must be in"),
    ('{"do_sample": true, "temperature": NaN}', "temperature must be a number"),
    ('{"max_new_tokens": Infinity}', "max_new_tokens must be an integer"),
])
def test_a_bad_file_is_a_checkpoint_error_naming_it(tmp_path, text, message):
    path = tmp_path / GENERATION_FILE
    path.write_text(text)
    with pytest.raises(CheckpointError, match=message) as info:
        load_generation_config(path)
    assert str(path) in str(info.value) and "delete it" in str(info.value)


def test_load_tells_a_bad_file_before_it_reads_the_weights(tmp_path, monkeypatch):
    import qwen2audio.api as api

    (tmp_path / GENERATION_FILE).write_text('{"transcription": {"cut_at_pauses": -1}}')
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the weights were read first"))
    with pytest.raises(CheckpointError, match="cut_at_pauses") as info:
        Qwen2Audio.load(tmp_path)
    assert str(tmp_path / GENERATION_FILE) in str(info.value)


def test_one_read_gives_both_settings(tmp_path, monkeypatch):
    path = tmp_path / GENERATION_FILE
    path.write_text(json.dumps({**INSTRUCT_FILE, "transcription": {"cut_at_pauses": 0.3}}))
    expected = (load_generation_config(path), transcription_defaults(path), frozenset({151643, 151645}))
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or read_text(self, *a, **k))
    assert generation_settings(path) == expected and expected[1]["cut_at_pauses"] == 0.3
    assert reads == [path]


def test_no_file_means_transformers_defaults(tmp_path):
    assert load_generation_config(tmp_path / GENERATION_FILE) == {"temperature": 0.0, **G}


def test_the_file_we_write_reads_back_as_our_defaults(tmp_path):
    write_generation_config(tmp_path, TOKENIZER.pad_id, sorted(TOKENIZER.stop_ids))
    written = json.loads((tmp_path / GENERATION_FILE).read_text())
    assert written["do_sample"] is False and written["max_new_tokens"] == SamplingParams().max_new_tokens
    assert SamplingParams(**load_generation_config(tmp_path / GENERATION_FILE)) == SamplingParams()


def test_transformers_reads_the_file_we_write_as_ours_and_can_save_it_again(tmp_path):
    """transformers' GenerationConfig refuses to save a greedy config whose top_k is other than its default
    (a model loaded from our checkpoint then failed in save_pretrained()); the file's settings mean the
    same to both: greedy, and a caller's temperature samples with no top-k filter."""
    from transformers import GenerationConfig

    write_generation_config(tmp_path, TOKENIZER.pad_id, sorted(TOKENIZER.stop_ids))
    hf = GenerationConfig.from_pretrained(tmp_path)
    hf.save_pretrained(tmp_path / "again")  # raised "GenerationConfig is invalid" on top_k 0
    assert hf.do_sample is False and hf.top_k in (None, 0) and hf.top_p == 1.0
    again = json.loads((tmp_path / "again" / GENERATION_FILE).read_text())
    assert SamplingParams(**from_generation_config(again)) == SamplingParams()


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, top_p=0.5,
                                                                     repetition_penalty=1.1, max_new_tokens=99),
                                    SamplingParams(num_beams=4, length_penalty=0.8),
                                    SamplingParams(min_new_tokens=2)])
def test_settings_round_trip(params):
    assert SamplingParams(**from_generation_config(to_generation_config(params))) == params


# -- applying it ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instruct_dir(default_home, tmp_path_factory):
    """The embedded default model with the Instruct model's generation_config.json (its stop token ids those
    of the tiny model's tokenizer: the real ones lie beyond its vocabulary)."""
    from qwen2audio.default_model import default_model_dir

    path = tmp_path_factory.mktemp("instruct")
    for file in default_model_dir().iterdir():
        shutil.copy(file, path / file.name)
    (path / GENERATION_FILE).write_text(json.dumps({**INSTRUCT_FILE, "eos_token_id": sorted(TOKENIZER.stop_ids)}))
    return path


@pytest.fixture(scope="module")
def instruct(instruct_dir) -> Qwen2Audio:
    return Qwen2Audio.load(instruct_dir)


def ask(text="What is it?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": clip(2.0, 1)}, {"type": "text", "text": text}]}]


def test_chat_decodes_with_the_checkpoints_defaults(instruct):
    assert instruct.generation_defaults == INSTRUCT
    request = instruct.prepare_chat(ask())
    sampled = instruct.engine.generate([request], SamplingParams(**INSTRUCT, seed=3, max_new_tokens=NEW))[0]
    greedy = instruct.engine.generate([request], SamplingParams(max_new_tokens=NEW))[0]
    assert sampled.token_ids != greedy.token_ids, "the settings changed nothing: the test shows nothing"

    assert instruct.chat(ask(), seed=3, max_new_tokens=NEW).token_ids == sampled.token_ids
    assert "".join(instruct.stream(ask(), seed=3, max_new_tokens=NEW)) == sampled.text
    conv = instruct.conversation()
    assert conv.say(audio=clip(2.0, 1), text="What is it?", seed=3, max_new_tokens=NEW).token_ids == sampled.token_ids


def test_arguments_override_the_defaults_and_temperature_zero_is_greedy(instruct):
    request = instruct.prepare_chat(ask())
    expected = instruct.engine.generate([request], SamplingParams(temperature=0.0, repetition_penalty=1.1,
                                                                  max_new_tokens=NEW))[0]
    assert instruct.chat(ask(), temperature=0, max_new_tokens=NEW).token_ids == expected.token_ids
    plain = instruct.engine.generate([request], SamplingParams(max_new_tokens=NEW))[0]
    assert instruct.chat(ask(), temperature=0, repetition_penalty=1.0, max_new_tokens=NEW).token_ids == plain.token_ids


def test_a_beam_search_is_greedy_unless_told_to_sample(instruct):
    """The checkpoint samples, but num_beams alone means beam search (greedy); a temperature given with it
    is beam sampling, with the checkpoint's top-k, top-p and repetition penalty."""
    request = instruct.prepare_chat(ask())
    expected = instruct.engine.generate([request], SamplingParams(temperature=0.0, repetition_penalty=1.1,
                                                                  num_beams=3, max_new_tokens=NEW))[0]
    assert instruct.chat(ask(), num_beams=3, max_new_tokens=NEW).token_ids == expected.token_ids
    sampled = instruct.engine.generate([request], SamplingParams(**{**INSTRUCT, "temperature": 1.5}, seed=5,
                                                                 num_beams=3, max_new_tokens=NEW))[0]
    assert instruct.chat(ask(), num_beams=3, temperature=1.5, seed=5,
                         max_new_tokens=NEW).token_ids == sampled.token_ids


def test_a_checkpoint_that_asks_for_beams_gets_them_in_chat_replies(instruct_dir, tmp_path):
    for file in instruct_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    (tmp_path / GENERATION_FILE).write_text(json.dumps({"do_sample": False, "num_beams": 3}))
    model = Qwen2Audio.load(tmp_path)
    request = model.prepare_chat(ask())
    beams = model.engine.generate([request], SamplingParams(num_beams=3, max_new_tokens=NEW))[0]
    greedy = model.engine.generate([request], SamplingParams(max_new_tokens=NEW))[0]
    # a temperature on a file that does not sample: transformers' default top_k 50, as generate(do_sample=True)
    sampled = model.engine.generate([request], SamplingParams(temperature=0.7, top_k=50, seed=3,
                                                              max_new_tokens=NEW))[0]
    assert beams.token_ids != greedy.token_ids, "the beams changed nothing: the test shows nothing"
    assert model.chat(ask(), max_new_tokens=NEW).token_ids == beams.token_ids
    assert model.chat(ask(), num_beams=1, max_new_tokens=NEW).token_ids == greedy.token_ids
    assert model.chat(ask(), temperature=0.7, seed=3, max_new_tokens=NEW).token_ids == sampled.token_ids
    # one that asks for beam sampling gets it
    (tmp_path / GENERATION_FILE).write_text(json.dumps({"do_sample": True, "num_beams": 3, "temperature": 1.5}))
    model = Qwen2Audio.load(tmp_path)
    drawn = model.engine.generate([request], SamplingParams(num_beams=3, temperature=1.5, top_k=50, seed=4,
                                                            max_new_tokens=NEW))[0]
    assert model.chat(ask(), seed=4, max_new_tokens=NEW).token_ids == drawn.token_ids


def test_transcribe_and_complete_stay_greedy(instruct):
    audio = clip(2.0, 2)
    request = instruct.prepare_raw("Detect the language and recognize the speech: <|en|>", [audio])
    greedy = instruct.engine.generate([request], SamplingParams(max_new_tokens=NEW))[0]
    assert instruct.complete("Detect the language and recognize the speech: <|en|>", [audio],
                             max_new_tokens=NEW).token_ids == greedy.token_ids
    assert instruct.transcribe(audio, max_new_tokens=NEW) == instruct.transcribe(audio, max_new_tokens=NEW,
                                                                                temperature=0.0)


def test_the_command_line_applies_them_too(instruct, instruct_dir, capsys, monkeypatch):
    def chat_json(*flags):
        rc, out, err = cli(capsys, monkeypatch, ["chat", str(instruct_dir), "--prompt", "Hi.", "--json",
                                                 "--max-new-tokens", str(NEW), *flags])
        assert rc == 0, err
        return json.loads(out)["token_ids"]

    hi = [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}]
    assert chat_json("--seed", "5") == instruct.chat(hi, seed=5, max_new_tokens=NEW).token_ids
    assert chat_json("--temperature", "0") == instruct.chat(hi, temperature=0, max_new_tokens=NEW).token_ids


def test_help_says_where_the_defaults_come_from(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--help"])
    chat_help = " ".join(capsys.readouterr().out.split())
    assert "generation_config.json" in chat_help and "--temperature 0 is greedy" in chat_help
    with pytest.raises(SystemExit):
        parser.parse_args(["transcribe", "--help"])
    assert "Greedy by default" in " ".join(capsys.readouterr().out.split())


def test_every_sampling_field_is_a_flag_with_the_fields_default(capsys):
    from dataclasses import fields

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--help"])
    chat_help = capsys.readouterr().out
    for f in fields(SamplingParams):
        assert "--" + f.name.replace("_", "-") in chat_help
    assert "(default 256)" in " ".join(chat_help.split())


def test_the_files_other_keys_load_without_warnings(instruct_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Qwen2Audio.load(instruct_dir)


def with_generation_config(model_dir: Path, out: Path, config: dict) -> Path:
    """``out``: ``model_dir``'s files (linked) with ``config`` as generation_config.json."""
    for file in model_dir.iterdir():
        if file.name != GENERATION_FILE:
            (out / file.name).symlink_to(file)
    (out / GENERATION_FILE).write_text(json.dumps({**config, "eos_token_id": sorted(TOKENIZER.stop_ids)}))
    return out


@pytest.mark.parametrize("config,named", [
    ({**INSTRUCT_FILE, "no_repeat_ngram_size": 3, "suppress_tokens": [5, 6]},
     "no_repeat_ngram_size 3, suppress_tokens [5, 6]"),
    ({"do_sample": True, "typical_p": 0.9, "min_p": 0.05}, "typical_p 0.9, min_p 0.05"),
    ({"num_beams": 4, "early_stopping": True}, "early_stopping true"),
    ({"num_beams": 4, "renormalize_logits": True, "stop_strings": ["."]}, 'stop_strings ["."], renormalize_logits true'),
    ({"renormalize_logits": True}, None),  # one beam: greedy and sampled tokens are the same with it
    ({"do_sample": False, "early_stopping": True, "guidance_scale": 1, "min_length": 0}, None),
    # a caller's temperature samples with the file's filters in transformers
    ({"do_sample": False, "typical_p": 0.9}, "typical_p 0.9 (when sampling)"),
    ({"transcription": {"num_beams": 4}, "early_stopping": True}, "early_stopping true"),  # transcribe's beams
])
def test_settings_transformers_would_apply_and_we_do_not_are_warned_about_at_load(instruct_dir, tmp_path, config,
                                                                                  named):
    """A file whose settings we cannot apply loads, with one warning naming them; settings that would do
    nothing in transformers either (early_stopping with one beam, guidance at scale 1) are not named."""
    with_generation_config(instruct_dir, tmp_path, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Qwen2Audio.load(tmp_path)
    said = [str(w.message) for w in caught if "does not apply" in str(w.message)]
    if named is None:
        assert said == []
    else:
        assert len(said) == 1 and f"asks for {named}, which qwen2audio does not apply" in said[0], said


def test_a_checkpoint_that_asks_for_dither_gets_it(instruct, instruct_dir, tmp_path):
    """preprocessor_config.json's dither reaches the front end of the loaded model: the same torch seed,
    the same audio vectors; another draw, others (transformers adds new noise in every call too)."""
    import torch

    with_generation_config(instruct_dir, tmp_path, INSTRUCT_FILE)
    settings = json.loads((instruct_dir / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**settings, "dither": 0.01}))
    model = Qwen2Audio.load(tmp_path)
    assert model.engine.dither == 0.01 and instruct.engine.dither == 0.0
    audio = clip(2.0, 1)
    torch.manual_seed(3)
    first = model.engine.encode_audios([audio])[0]
    second = model.engine.encode_audios([audio])[0]
    torch.manual_seed(3)
    assert torch.equal(model.engine.encode_audios([audio])[0], first)
    assert not torch.equal(second, first) and not torch.equal(instruct.engine.encode_audios([audio])[0], first)


def test_the_command_line_shows_that_warning_while_it_hides_the_libraries_own(instruct_dir, tmp_path, capsys,
                                                                              monkeypatch):
    model = with_generation_config(instruct_dir, tmp_path, {**INSTRUCT_FILE, "no_repeat_ngram_size": 3})
    rc, _, err = cli(capsys, monkeypatch, ["chat", str(model), "--prompt", "Hi.", "--max-new-tokens", "2"])
    assert rc == 0, err
    assert f"qwen2audio: warning: {model / GENERATION_FILE} asks for no_repeat_ngram_size 3, which qwen2audio " \
           "does not apply" in err, err


@pytest.mark.parametrize("config,expected", [
    (INSTRUCT_FILE, {"repetition_penalty": 1.1}),  # sampling off, the penalty kept
    ({"do_sample": True, "num_beams": 3, "length_penalty": 0.5, "temperature": 0.3}, {"num_beams": 3, "length_penalty": 0.5}),
    ({"do_sample": False, "max_new_tokens": 64}, {}),  # the official call gives its own max_new_tokens
    (None, {}),  # no file
])
def test_what_the_official_greedy_call_keeps_of_the_file(tmp_path, config, expected):
    """Evaluation decodes as model.generate(..., do_sample=False) does with the checkpoint: transformers
    turns sampling off and keeps the file's repetition_penalty, num_beams and length_penalty."""
    if config is not None:
        (tmp_path / GENERATION_FILE).write_text(json.dumps(config))
    assert greedy_call_settings(tmp_path / GENERATION_FILE) == expected


def test_the_official_greedy_call_settings_refuse_a_bad_file(tmp_path):
    (tmp_path / GENERATION_FILE).write_text(json.dumps({"repetition_penalty": -1}))
    with pytest.raises(CheckpointError, match="repetition_penalty"):
        greedy_call_settings(tmp_path / GENERATION_FILE)
