"""The chat template: parity with the official Jinja template, audio sources, errors, expansion."""

from __future__ import annotations

import base64

import jinja2
import numpy as np
import pytest

from qwen2audio.text import (
    DEFAULT_SYSTEM_PROMPT,
    RenderedPrompt,
    build_byte_level_tokenizer,
    expand_audio_placeholders,
    raw_prompt,
    render_chat,
)
from qwen2audio.text.chat import HF_CHAT_TEMPLATE
from qwen2audio.text.special_tokens import AUDIO, AUDIO_BOS, AUDIO_EOS

# The official template as published (multi-line form), verbatim.
OFFICIAL_TEMPLATE = """{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}<|im_end|>
{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>
{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def audio(path):
    return {"type": "audio", "audio": path}


def text(t):
    return {"type": "text", "text": t}


# (conversation, add_generation_prompt)
CONVERSATIONS = {
    "voice_chat": ([{"role": "user", "content": [audio("a.wav")]}], True),
    "audio_then_text": ([{"role": "user", "content": [audio("a.wav"), text("What's that sound?")]}], True),
    "text_then_audio": ([{"role": "user", "content": [text("Transcribe this: "), audio("a.wav")]}], True),
    "multi_turn": (
        [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "audio", "audio_url": "glass.mp3"}, text("What's that sound?")]},
            {"role": "assistant", "content": "It is the sound of glass shattering."},
            {"role": "user", "content": [{"type": "audio", "audio_url": "throat.wav"}, text("How about this one?")]},
        ],
        True,
    ),
    "several_audios_one_turn": (
        [{"role": "user", "content": [audio("1.wav"), audio("2.wav"), text("Compare "), text("them."), audio("3.wav")]}],
        True,
    ),
    "custom_system_prompt": (
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": [audio("a.wav")]}],
        True,
    ),
    "system_as_parts": (
        [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": "hello"}],
        True,
    ),
    "assistant_parts_no_generation_prompt": (
        [
            {"role": "user", "content": [audio("a.wav"), text("Describe it.")]},
            {"role": "assistant", "content": [text("A dog "), text("barks.")]},
        ],
        False,
    ),
    "text_only": ([{"role": "user", "content": "Tell me a joke."}], True),
    "system_in_the_middle": (
        [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "New rules."},
            {"role": "user", "content": [audio("b.wav")]},
        ],
        True,
    ),
    "audio_url_part_and_unicode": (
        [
            {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x.flac"}}, text("这是什么声音？😀\n")]},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [audio("y.wav"), {"type": "audio_url", "audio_url": "z.wav"}]},
        ],
        True,
    ),
    "empty_parts_and_text": ([{"role": "user", "content": []}, {"role": "assistant", "content": "ok"}], False),
}


def _render_jinja(template: str, messages, add_generation_prompt: bool) -> str:
    return jinja2.Environment().from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_parity_with_the_official_jinja_template(name):
    from transformers import Qwen2AudioProcessor
    from transformers.utils.chat_template_utils import _compile_jinja_template

    messages, add_generation_prompt = CONVERSATIONS[name]
    ours = render_chat(messages, add_generation_prompt=add_generation_prompt).text
    assert ours == _render_jinja(OFFICIAL_TEMPLATE, messages, add_generation_prompt)
    assert ours == _render_jinja(HF_CHAT_TEMPLATE, messages, add_generation_prompt)
    # transformers' own default template, in the environment transformers renders it with
    hf_template = Qwen2AudioProcessor.default_chat_template.fget(None)
    compiled = _compile_jinja_template(hf_template)
    assert ours == compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert ours.count(AUDIO) == len(render_chat(messages).audios)


def test_a_saved_tokenizer_renders_chats_in_transformers_as_we_do(tmp_path):
    """Checkpoints we write carry the official template in tokenizer_config.json (as Qwen2-Audio-7B-Instruct's
    does): transformers' tokenizer.apply_chat_template, which has no default, renders every conversation as
    render_chat does."""
    from transformers import AutoTokenizer

    build_byte_level_tokenizer().save(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for messages, add_generation_prompt in CONVERSATIONS.values():
        assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == \
            render_chat(messages, add_generation_prompt=add_generation_prompt).text


def test_parity_with_the_transformers_processor_end_to_end(tmp_path):
    """Our render + encode + expansion gives the ids transformers' Qwen2AudioProcessor gives."""
    from transformers import AutoTokenizer, Qwen2AudioProcessor, WhisperFeatureExtractor

    tok = build_byte_level_tokenizer([("t", "h"), ("th", "e")])
    tok.save(tmp_path)
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=AutoTokenizer.from_pretrained(tmp_path)
    )
    messages, _ = CONVERSATIONS["multi_turn"]
    rendered = render_chat(messages)
    assert rendered.text == processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    waves = [np.zeros(16000, np.float32), np.zeros(16000 * 7 // 3, np.float32)]  # 1 s and 2.33 s
    reference = processor(text=rendered.text, audio=waves, sampling_rate=16000)["input_ids"][0]
    counts = []  # audio tokens per clip in the reference's expansion
    for position, token in enumerate(reference):
        if token == tok.audio_id and reference[position - 1] != tok.audio_id:
            counts.append(0)
        if token == tok.audio_id:
            counts[-1] += 1
    assert counts == [25, 58]  # 25 audio tokens per second (40 ms each)
    assert expand_audio_placeholders(tok.encode(rendered.text), tok.audio_id, counts) == list(reference)


def test_rendered_example_from_the_facts_sheet():
    messages = [{"role": "user", "content": [audio("glass.mp3"), text("What's that sound?")]}]
    assert render_chat(messages) == RenderedPrompt(
        text=(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat's that sound?<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        audios=["glass.mp3"],
    )


# ---- audio sources ---------------------------------------------------------------------------------

WAV_BYTES = b"RIFF\x24\x00\x00\x00WAVEfmt fake"


def test_audio_sources_in_order_of_appearance(tmp_path):
    array = np.zeros(160, np.float32)
    b64 = base64.b64encode(WAV_BYTES).decode()
    messages = [
        {"role": "user", "content": [audio("first.wav"), {"type": "audio", "audio_url": "file:///data/second%20clip.wav"}]},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64}"}},
                audio(array),
                audio(WAV_BYTES),
                audio(tmp_path / "p.wav"),
                {"type": "audio", "path": "sixth.mp3"},
                text("all of them"),
            ],
        },
    ]
    rendered = render_chat(messages)
    assert rendered.audios[:2] == ["first.wav", "/data/second clip.wav"]
    assert rendered.audios[2] == WAV_BYTES and rendered.audios[3] == WAV_BYTES
    assert rendered.audios[4] is array
    assert rendered.audios[5:] == [WAV_BYTES, str(tmp_path / "p.wav"), "sixth.mp3"]
    assert rendered.text.count(AUDIO) == 8
    assert "Audio 8: " in rendered.text and "Audio 9" not in rendered.text


def test_input_audio_renders_like_an_audio_part():
    b64 = base64.b64encode(WAV_BYTES).decode()
    openai = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64, "format": "mp3"}}]}]
    hf = [{"role": "user", "content": [audio("x.mp3")]}]
    assert render_chat(openai).text == render_chat(hf).text


def test_base64_with_line_breaks_is_accepted():
    b64 = base64.encodebytes(WAV_BYTES * 20).decode()  # MIME style, wrapped at 76 characters
    assert "\n" in b64
    part = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    assert render_chat([{"role": "user", "content": [part]}]).audios == [WAV_BYTES * 20]


# ---- malformed input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list of dicts"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\] has role 'tool'; expected one of"),
        ([{"content": "x"}], r"has role None"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a str or a list of parts"),
        ([{"role": "user", "content": None}], r"must be a str or a list of parts.*NoneType"),
        ([{"role": "user", "content": {"type": "text", "text": "x"}}], "must be a str or a list"),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\['content'\]\[0\] must be a dict"),
        ([{"role": "user", "content": [{"text": "hi"}]}], r"\[0\] has no 'type'; expected"),
        ([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}], "unknown type 'image'"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "'text' is not a str"),
        ([{"role": "user", "content": [text("a"), {"type": "audio"}]}], r"\[1\] is an audio part with no data"),
        ([{"role": "user", "content": [audio("")]}], "no data"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": ""}}]}], "no data"),
        ([{"role": "user", "content": [audio({"array": [0.0], "sampling_rate": 16000})]}], r"must be \{'url'"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}], "no data"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": "abc"}]}], "no data"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]}],
            "not valid base64",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "QUJD", "format": 3}}]}],
            "'format' must be a str",
        ),
        ([{"role": "user", "content": [audio("data:audio/wav;base64,@@@")]}], "not valid base64"),
        ([{"role": "user", "content": [audio("data:audio/wav,RIFF")]}], "data URL must look like"),
        ([{"role": "user", "content": [audio("https://example.com/a.wav")]}], "remote audio URLs are not fetched"),
        ([{"role": "user", "content": [audio("file://otherhost/a.wav")]}], "only local files"),
        ([{"role": "user", "content": [audio(12)]}], "cannot use a int as audio"),
        ([{"role": "user", "content": "hello <|AUDIO|> there"}],
         r"messages\[0\]\['content'\] contains <\|AUDIO\|>, the audio placeholder: give the audio as an audio part"),
        ([{"role": "user", "content": [audio("a.wav"), text("and <|AUDIO|>")]}],
         r"messages\[0\]\['content'\]\[1\] contains <\|AUDIO\|>"),
    ],
)
def test_malformed_messages_raise_helpful_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


def test_error_names_the_message_and_part():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [text("x"), text("y"), {"type": "video"}]},
    ]
    with pytest.raises(ValueError, match=r"messages\[2\]\['content'\]\[2\] has unknown type 'video'"):
        render_chat(messages)


# ---- raw prompts and placeholder expansion ----------------------------------------------------------


def test_raw_prompt():
    span = AUDIO_BOS + AUDIO + AUDIO_EOS
    assert raw_prompt("Detect the language and recognize the speech: <|en|>") == (
        "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
    )
    assert raw_prompt("Compare:", n_audios=2) == span + span + "Compare:"
    assert raw_prompt("just text", n_audios=0) == "just text"
    with pytest.raises(ValueError, match="non-negative"):
        raw_prompt("x", n_audios=-1)


def test_expand_audio_placeholders():
    a = 99
    assert expand_audio_placeholders([1, a, 2, a, 3], a, [3, 1]) == [1, a, a, a, 2, a, 3]
    assert expand_audio_placeholders([1, 2], a, []) == [1, 2]
    assert expand_audio_placeholders([a], a, [0]) == []
    ids = [5, a, 6]
    expand_audio_placeholders(ids, a, [4])
    assert ids == [5, a, 6]  # the input is not modified


def test_expand_audio_placeholders_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"has 2 audio placeholder.*but 3 audio token count") as info:
        expand_audio_placeholders([7, 7], 7, [1, 2, 3])
    assert "exactly one" in str(info.value)
    with pytest.raises(ValueError, match="has 0 audio placeholder"):
        expand_audio_placeholders([1, 2], 7, [5])
    with pytest.raises(ValueError, match=r"counts\[1\] must be a non-negative int"):
        expand_audio_placeholders([7, 7], 7, [1, -2])


def test_render_encode_expand_with_a_real_tokenizer():
    tok = build_byte_level_tokenizer()
    messages, _ = CONVERSATIONS["several_audios_one_turn"]
    rendered = render_chat(messages)
    ids = expand_audio_placeholders(tok.encode(rendered.text), tok.audio_id, [4, 1, 2])
    assert ids.count(tok.audio_id) == 7
    assert ids.count(tok.audio_bos_id) == ids.count(tok.audio_eos_id) == 3
    assert tok.decode(ids).startswith("system\nYou are a helpful assistant.\nuser\nAudio 1: \nAudio 2: ")
