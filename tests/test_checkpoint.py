"""Checkpoint directories: config.json both ways, dtypes, shards, every way a directory can be wrong,
and the loader's peak memory."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2audio.checkpoint import CheckpointError, hf, load_model, save_model
from qwen2audio.config import EncoderConfig, Qwen2AudioConfig, TextConfig
from qwen2audio.model import Qwen2AudioModel
from reference import AUDIO_TOKEN, CONFIGS, hf_model

ENCODER_FIELDS = [f.name for f in dataclasses.fields(EncoderConfig) if f.name != "layer_norm_eps"]
TEXT_FIELDS = [f.name for f in dataclasses.fields(TextConfig)]
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def fields_of_hf(cfg) -> dict:
    """The fields we model, read from transformers' Qwen2AudioConfig."""
    return {
        "audio": {k: getattr(cfg.audio_config, k) for k in ENCODER_FIELDS},
        "text": {k: getattr(cfg.text_config, k) for k in TEXT_FIELDS},
        "audio_token_index": cfg.audio_token_index,
    }


def fields_of_ours(cfg: Qwen2AudioConfig) -> dict:
    return {
        "audio": {k: getattr(cfg.audio, k) for k in ENCODER_FIELDS},
        "text": {k: getattr(cfg.text, k) for k in TEXT_FIELDS},
        "audio_token_index": cfg.audio_token_index,
    }


def our_config(name: str) -> Qwen2AudioConfig:
    raw = CONFIGS[name]
    return Qwen2AudioConfig(audio=EncoderConfig(**raw["audio_config"]), text=TextConfig(**raw["text_config"]),
                            audio_token_index=AUDIO_TOKEN)


def write_config(directory, raw: dict | str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))


# -- config.json ------------------------------------------------------------------------------------
ROUND_TRIP_CONFIGS = {
    **{name: our_config(name) for name in CONFIGS},
    "released_defaults": Qwen2AudioConfig(),
    "special_ids": Qwen2AudioConfig(text=TextConfig(bos_token_id=151643, eos_token_id=[151645, 151643]),
                                    torch_dtype="bfloat16"),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_config_round_trip_and_transformers_reads_it(name, tmp_path):
    from transformers import Qwen2AudioConfig as HFConfig

    cfg = ROUND_TRIP_CONFIGS[name]
    assert Qwen2AudioConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path)
    assert Qwen2AudioConfig.from_file(tmp_path) == cfg
    assert fields_of_hf(HFConfig.from_pretrained(tmp_path)) == fields_of_ours(cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_written_by_transformers_reads_the_same(name, tmp_path):
    from transformers import Qwen2AudioConfig as HFConfig

    raw = CONFIGS[name]
    hf = HFConfig(audio_config=dict(raw["audio_config"]), text_config=dict(raw["text_config"]),
                  audio_token_index=AUDIO_TOKEN)
    hf.save_pretrained(tmp_path)
    assert fields_of_ours(Qwen2AudioConfig.from_file(tmp_path)) == fields_of_hf(hf)


PARTIAL_CONFIGS = {
    "only_model_type": {"model_type": "qwen2_audio"},
    "empty": {},
    "partial_text_and_audio": {
        "model_type": "qwen2_audio",
        "audio_config": {"d_model": 64, "encoder_attention_heads": 4},
        "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        "audio_token_index": 7,
    },
    "no_audio_config": {"model_type": "qwen2_audio", "text_config": {"vocab_size": 1000, "rope_theta": 1e6}},
    # transformers reads tie_word_embeddings from text_config only: at the top level it ties nothing
    "top_level_tie_only": {"model_type": "qwen2_audio", "tie_word_embeddings": True},
    "top_level_tie_beside_text_config": {"model_type": "qwen2_audio", "tie_word_embeddings": True,
                                         "text_config": {"vocab_size": 1000}},
    # transformers' names for plain RoPE, which it loads as such
    "rope_scaling_default": {"model_type": "qwen2_audio",
                             "text_config": {"rope_scaling": {"rope_type": "default"}, "rope_theta": 1e6}},
    "rope_scaling_type_default": {"model_type": "qwen2_audio",
                                  "text_config": {"rope_scaling": {"type": "default"}, "rope_theta": 5e5}},
    # a head size spelled out, equal to hidden_size / num_attention_heads
    "head_dim_spelled_out": {"model_type": "qwen2_audio",
                             "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                             "head_dim": 16}},
}


@pytest.mark.parametrize("name", sorted(PARTIAL_CONFIGS))
def test_partial_config_takes_transformers_defaults(name, tmp_path):
    from transformers import Qwen2AudioConfig as HFConfig
    from transformers import Qwen2Config

    write_config(tmp_path, PARTIAL_CONFIGS[name])
    ours = Qwen2AudioConfig.from_file(tmp_path)
    assert fields_of_ours(ours) == fields_of_hf(HFConfig.from_pretrained(tmp_path))
    # The text fields a file leaves out are those of a bare Qwen2Config.
    given = PARTIAL_CONFIGS[name].get("text_config", {})
    default = Qwen2Config()
    for k in TEXT_FIELDS:
        if k not in given:
            assert getattr(ours.text, k) == getattr(default, k), k


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"model_type": "qwen2_audio", "text_config": {"rope_scaling": {"type": "yarn", "factor": 4.0}}}, "rope_scaling"),
        ({"model_type": "qwen2_audio", "text_config": {"use_sliding_window": True, "sliding_window": 4096}},
         "sliding"),
        ({"model_type": "qwen2_audio", "text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                           "rope_theta": 1e6}}}, "rope_parameters"),
        ({"model_type": "qwen2_audio", "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                                           "partial_rotary_factor": 0.5}}},
         "rope_parameters"),
        # transformers builds the sub-model these name (a Llama, a whole Whisper): not Qwen2-Audio's
        ({"model_type": "qwen2_audio", "text_config": {"model_type": "llama"}}, r"text_config\.model_type is 'llama'"),
        ({"model_type": "qwen2_audio", "audio_config": {"model_type": "whisper"}},
         r"audio_config\.model_type is 'whisper'"),
        # transformers sizes the attention by head_dim where a file gives one
        ({"model_type": "qwen2_audio", "text_config": {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}},
         r"head_dim 32"),
        ({"model_type": "llava", "text_config": {}}, "model_type 'llava'"),
        ({"model_type": "qwen2", "hidden_size": 64}, r"a Qwen2 language model alone: `qwen2audio init --encoder"),
        ({"model_type": "whisper", "d_model": 64}, r"a Whisper model: `qwen2audio init"),
        ({"model_type": "qwen2_audio", "text_config": {"hidden_size": 60, "num_attention_heads": 8}}, "divisible"),
        ({"model_type": "qwen2_audio", "audio_config": {"activation_function": "relu"}}, "gelu"),
        ({"model_type": "qwen2_audio", "text_config": {"hidden_size": "sixty-four"}},
         r"text_config\.hidden_size must be int, got 'sixty-four'"),
        ({"model_type": "qwen2_audio", "audio_config": {"d_model": True}}, r"audio_config\.d_model must be int"),
        ({"model_type": "qwen2_audio", "text_config": [1, 2]}, "text_config must be an object"),
        # a wrong type was a TypeError traceback (null), int()'s message naming no field ("abc"), or another
        # token read without a word (1.5 -> 1)
        ({"model_type": "qwen2_audio", "audio_token_index": None}, r"audio_token_index must be a token id .*got None"),
        ({"model_type": "qwen2_audio", "audio_token_index": "abc"}, r"audio_token_index must be a token id .*'abc'"),
        ({"model_type": "qwen2_audio", "audio_token_id": 1.5}, r"audio_token_index must be a token id .*got 1\.5"),
        # sizes that were a ZeroDivisionError or a torch error deep in the model's construction
        ({"model_type": "qwen2_audio", "text_config": {"num_attention_heads": 0}},
         r"text_config\.num_attention_heads must be > 0, got 0"),
        ({"model_type": "qwen2_audio", "text_config": {"vocab_size": -5}}, r"text_config\.vocab_size must be > 0"),
        ({"model_type": "qwen2_audio", "audio_config": {"encoder_attention_heads": 0}},
         r"audio_config\.encoder_attention_heads must be > 0"),
        ([1, 2], "config.json must hold a JSON object"),
    ],
)
def test_unsupported_configs_are_rejected_clearly(raw, message, tmp_path):
    write_config(tmp_path, raw)
    with pytest.raises(ValueError, match=message):
        Qwen2AudioConfig.from_file(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


def test_rope_scaling_null_and_sliding_window_off_are_fine(tmp_path):
    write_config(tmp_path, {"model_type": "qwen2_audio",
                            "text_config": {"rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096}})
    assert Qwen2AudioConfig.from_file(tmp_path).text == TextConfig()


def test_rope_theta_in_rope_parameters_as_transformers_5_writes_it(tmp_path):
    """transformers 5.x saves text_config's rope_theta inside rope_parameters, with none beside it; read as
    the plain field, the model would run with the default 10,000 (and a Qwen2.5 LLM's 1e6 lost)."""
    write_config(tmp_path / "v4", {"model_type": "qwen2_audio", "text_config": {"rope_theta": 1e6}})
    write_config(tmp_path / "v5", {"model_type": "qwen2_audio",
                                   "text_config": {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}})
    v5 = Qwen2AudioConfig.from_file(tmp_path / "v5")
    assert v5.text.rope_theta == 1e6
    assert v5 == Qwen2AudioConfig.from_file(tmp_path / "v4")
    assert Qwen2AudioConfig.from_dict(v5.to_dict()) == v5  # written back in the layout both versions read


def test_invalid_json_and_missing_config(tmp_path):
    write_config(tmp_path / "bad", '{"model_type": "qwen2_audio",')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_bytes(b'\xff\xfe{"model_type": "qwen2_audio"}')  # not UTF-8 text
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "bad" / "config.json")) + " is not valid JSON"):
        load_model(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_a_folder_that_is_not_a_checkpoint_says_what_it_looks_like(tmp_path, monkeypatch):
    """The commonest wrong folders: a repository id (nothing is downloaded), a LoRA adapter, a Hugging Face
    cache folder (its current snapshot named), a folder one level above the checkpoint."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"never downloads: .*huggingface-cli download "
                                                r"Qwen/Qwen2-Audio-7B-Instruct --local-dir DIR"):
        load_model("Qwen/Qwen2-Audio-7B-Instruct")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(FileNotFoundError, match=r"LoRA adapter .*not a whole model: load its base model with "
                                                r"this folder as the adapter \(--adapter"):
        load_model(tmp_path / "adapter")
    cache = tmp_path / "models--Qwen--Qwen2-Audio-7B"
    for revision in ("aaa", "fff", "ccc"):
        write_config(cache / "snapshots" / revision, {})
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("ccc")
    with pytest.raises(FileNotFoundError, match=r"Did you mean .*snapshots/ccc\? \(a Hugging Face cache folder"):
        load_model(cache)
    write_config(tmp_path / "outer" / "model", {})
    with pytest.raises(FileNotFoundError, match=r"Did you mean .*outer/model\?$"):
        load_model(tmp_path / "outer")
    with pytest.raises(FileNotFoundError, match=r"does not exist\.$"):  # nothing more to say
        load_model(tmp_path / "nowhere")


# -- weights --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (reference model, directory it saved to in fp32, one file)."""
    out = {}
    for name in CONFIGS:
        ref = hf_model(name)
        path = tmp_path_factory.mktemp(name)
        ref.save_pretrained(path)
        out[name] = (ref, path)
    return out


def state(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_auto_keeps_the_stored_dtype_and_named_dtypes_convert(name, stored, saved, tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: True)  # the fallback: the test below
    ref, _ = saved[name]
    copy.deepcopy(ref).to(stored).save_pretrained(tmp_path)  # the fixture's model is shared: not in place
    stored_name = str(stored).removeprefix("torch.")
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype", stored_name) == stored_name
    files = load_file(tmp_path / SINGLE)

    auto = load_model(tmp_path, dtype="auto")
    assert auto.config.torch_dtype == stored_name
    for k, v in state(auto).items():
        assert v.dtype == stored, k
        if k in files:
            assert torch.equal(v, files[k]), k
    for requested in ("float32", "bfloat16"):
        got = load_model(tmp_path, dtype=requested)
        target = getattr(torch, requested)
        assert got.dtype == target
        for k, v in state(got).items():
            assert v.dtype == target, k
            if k in files:
                assert torch.equal(v, files[k].to(target)), k
    if CONFIGS[name]["text_config"]["tie_word_embeddings"]:
        assert auto.language_model.lm_head.weight is auto.language_model.model.embed_tokens.weight


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_dtype_auto_loads_half_precision_as_float32_on_a_cpu_without_it(stored, saved, tmp_path, monkeypatch):
    """bfloat16 matmuls on a CPU without AVX-512 BF16 / AMX are converted on the fly, several times slower
    than float32: "auto" gives float32 there (exactly the stored values), and the stored dtype elsewhere."""
    ref, _ = saved["gqa_tied_128"]
    copy.deepcopy(ref).to(stored).save_pretrained(tmp_path)
    files = load_file(tmp_path / SINGLE)
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: dtype not in (torch.float16, torch.bfloat16))
    slow_cpu = load_model(tmp_path, dtype="auto")
    for k, v in state(slow_cpu).items():
        assert v.dtype == torch.float32, k
        if k in files:
            assert torch.equal(v, files[k].float()), k
    assert load_model(tmp_path, dtype=stored).dtype == stored  # asked for by name: as asked
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: True)
    assert load_model(tmp_path, dtype="auto").dtype == stored


def test_native_half_precision_check_answers_on_this_cpu():
    assert hf.cpu_computes_natively(torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert isinstance(hf.cpu_computes_natively(dtype), bool)
    expected = torch.float32 if not hf.cpu_computes_natively(torch.bfloat16) else torch.bfloat16
    assert hf.auto_dtype(torch.bfloat16, "cpu") == expected
    assert hf.auto_dtype(torch.int64, "cpu") == torch.int64


def test_loading_draws_no_random_tables_and_imports_no_compiler(saved):
    """The model is built on the meta device before the stored weights are assigned: nothing of it is
    initialised, which for nn.Embedding would import torch._dynamo (1.4-2 s of a load) in a fresh process."""
    _, path = saved[sorted(saved)[0]]
    code = textwrap.dedent(f"""
        import sys
        from qwen2audio.checkpoint import load_model
        model = load_model({str(path)!r})
        assert model.language_model.model.embed_tokens.weight.abs().sum() > 0
        print("torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_unknown_dtype_is_rejected(saved):
    _, path = saved["mha_untied_80"]
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(path, dtype="float8")
    for dtype in (torch.int8, torch.complex64):  # a torch dtype that is not floating point
        with pytest.raises(ValueError, match=rf"dtype {dtype} is not a floating-point dtype; use one of auto"):
            load_model(path, dtype=dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_checkpoint_equals_single_file(name, saved, tmp_path):
    ref, path = saved[name]
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / INDEX).is_file() and not (tmp_path / SINGLE).exists()
    assert_same_weights(load_model(tmp_path), load_model(path))


def test_our_sharded_save_round_trips(saved, tmp_path):
    _, path = saved["gqa_tied_128"]
    model = load_model(path)
    save_model(model, tmp_path, max_shard_bytes=100_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2
    assert_same_weights(load_model(tmp_path), model)
    save_model(model, tmp_path)  # re-saved as one file: the stale index goes, the single file loads
    assert not (tmp_path / INDEX).exists() and (tmp_path / SINGLE).is_file()
    assert_same_weights(load_model(tmp_path), model)


def test_resaving_deletes_the_shards_of_an_earlier_save(saved, tmp_path):
    """A save with another shard count, or unsharded, leaves no shard of the earlier one behind (no index
    names them; they were as large as the checkpoint), as transformers' save_pretrained deletes them."""
    _, path = saved["gqa_tied_128"]
    model = load_model(path)
    (tmp_path / "notes-00001-of-00002.safetensors").write_bytes(b"not ours")  # not a shard name: kept
    save_model(model, tmp_path, max_shard_bytes=100_000)
    first = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    save_model(model, tmp_path, max_shard_bytes=300_000)
    second = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(first) > len(second) >= 2
    assert second == sorted(set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values()))
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors", "notes-00001-of-00002.safetensors"]
    assert_same_weights(load_model(tmp_path), model)


def test_an_index_left_beside_the_single_file_is_ignored_as_transformers_does(tmp_path):
    """transformers' save_pretrained(), saving unsharded where a sharded checkpoint was, deletes the old
    shards but leaves their index: transformers then reads model.safetensors, and so must we."""
    from transformers import Qwen2AudioForConditionalGeneration

    hf_model("mha_untied_80").save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / INDEX).is_file()
    newer = hf_model("mha_untied_80", seed=1)
    newer.save_pretrained(tmp_path)
    assert (tmp_path / INDEX).is_file() and (tmp_path / SINGLE).is_file()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    ours = load_model(tmp_path).state_dict()
    for key, value in ours.items():
        assert torch.equal(value, ref[key]), key


def copy_config(src, dst) -> None:
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_key_is_named(saved, tmp_path):
    _, path = saved["mha_untied_80"]
    tensors = load_file(path / SINGLE)
    victim = "language_model.model.layers.1.self_attn.k_proj.bias"
    del tensors[victim]
    copy_config(path, tmp_path)
    save_file(tensors, tmp_path / SINGLE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1 weight\(s\): " + victim.replace(".", r"\.")):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match=victim):
        load_model(tmp_path, strict=False)  # strict only concerns extra keys; a missing one always fails


def test_unexpected_key_is_named_and_strict_false_loads(saved, tmp_path):
    _, path = saved["mha_untied_80"]
    tensors = load_file(path / SINGLE)
    tensors["audio_tower.extra_adapter.weight"] = torch.zeros(3, 3)
    copy_config(path, tmp_path)
    save_file(tensors, tmp_path / SINGLE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"audio_tower\.extra_adapter\.weight.*strict=False"):
        load_model(tmp_path)
    assert_same_weights(load_model(tmp_path, strict=False), load_model(path))


def test_tied_head_saved_anyway_is_not_unexpected(saved, tmp_path):
    _, path = saved["gqa_tied_128"]
    tensors = load_file(path / SINGLE)
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    copy_config(path, tmp_path)
    save_file(tensors, tmp_path / SINGLE, metadata={"format": "pt"})
    model = load_model(tmp_path)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


def test_saved_rotary_frequencies_are_dropped_as_transformers_drops_them(saved, tmp_path):
    """Some exporters saved RoPE's recomputed inverse frequencies (per model, or per layer as old
    transformers did): transformers loads such a checkpoint without a word; it is no other model."""
    from transformers import Qwen2AudioForConditionalGeneration

    _, path = saved["mha_untied_80"]
    tensors = load_file(path / SINGLE)
    extra = ["language_model.model.rotary_emb.inv_freq", "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    copy_config(path, tmp_path)
    save_file({**tensors, **{k: torch.arange(8.0) for k in extra}}, tmp_path / SINGLE, metadata={"format": "pt"})
    Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path)  # the reference takes it
    assert_same_weights(load_model(tmp_path), load_model(path))


def test_wrong_shape_names_key_and_both_shapes(saved, tmp_path):
    _, path = saved["mha_untied_80"]
    tensors = load_file(path / SINGLE)
    key = "multi_modal_projector.linear.weight"
    assert tuple(tensors[key].shape) == (64, 64)
    tensors[key] = torch.zeros(64, 32)
    copy_config(path, tmp_path)
    save_file(tensors, tmp_path / SINGLE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear\.weight has shape \(64, 32\).*\(64, 64\)"):
        load_model(tmp_path)


def test_weights_stored_as_integers_are_refused_as_a_quantized_export(saved, tmp_path):
    """An int8 weight (a bitsandbytes export stores them so) with the right shape: no raw torch error, and
    no integers loaded as weights when a dtype is named."""
    _, path = saved["gqa_tied_128"]
    tensors = load_file(path / SINGLE)
    key = "language_model.model.layers.1.self_attn.q_proj.weight"
    tensors[key] = torch.ones_like(tensors[key], dtype=torch.int8)
    copy_config(path, tmp_path)
    save_file(tensors, tmp_path / SINGLE, metadata={"format": "pt"})
    for dtype in ("auto", "float32"):
        with pytest.raises(CheckpointError, match=re.escape(f"{SINGLE}: {key} is stored as I8") + ".*quantized export"):
            load_model(tmp_path, dtype=dtype)


def test_a_checkpoint_stored_in_several_dtypes_loads_in_one(saved, tmp_path, monkeypatch):
    """bfloat16 weights with float32 norms: "auto" loads every weight as float32 (exactly the stored
    values), and the model computes, as transformers' from_pretrained(dtype="auto") loads one dtype."""
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: True)
    ref, path = saved["gqa_tied_128"]
    tensors = load_file(path / SINGLE)
    mixed = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in tensors.items()}
    assert {v.dtype for v in mixed.values()} == {torch.float32, torch.bfloat16}
    copy_config(path, tmp_path)
    save_file(mixed, tmp_path / SINGLE, metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="auto")
    assert {v.dtype for v in state(model).values()} == {torch.float32}
    for k, v in state(model).items():
        if k in mixed:
            assert torch.equal(v, mixed[k].float()), k
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(ids)).all()  # one dtype: no "mat1 and mat2 must have the same dtype"


def test_index_naming_a_missing_shard(saved, tmp_path):
    ref, _ = saved["mha_untied_80"]
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    gone = sorted(tmp_path.glob("model-*.safetensors"))[1].name
    (tmp_path / gone).unlink()
    with pytest.raises(CheckpointError, match=rf"names shards that are not in .*{gone}"):
        load_model(tmp_path)


def test_directory_without_weights_says_what_is_expected(saved, tmp_path):
    _, path = saved["mha_untied_80"]
    copy_config(path, tmp_path)
    with pytest.raises(CheckpointError, match=r"expected model\.safetensors or model\.safetensors\.index\.json"):
        load_model(tmp_path)
    # Several loose safetensors files without an index: which one is meant is not guessed.
    tensors = load_file(path / SINGLE)
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:5]}, tmp_path / "a.safetensors")
    save_file({k: tensors[k] for k in keys[5:]}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"found a\.safetensors, b\.safetensors without an index"):
        load_model(tmp_path)
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is PyTorch's pickle format, which qwen2audio does "
                                              r"not load .*save_pretrained\(DIR, safe_serialization=True\)"):
        load_model(tmp_path)


# -- damaged files (an interrupted download, a bad copy) --------------------------------------------------
def _cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _garble_header(path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # the start of the JSON header: no longer JSON (nor UTF-8)
    path.write_bytes(bytes(data))


def _change_a_dtype(path) -> None:
    """A header that still parses and whose sizes add up, but describes an F32 tensor as F16."""
    data = path.read_bytes()
    n = _header_length(path)
    header = data[8:8 + n].replace(b'"F32"', b'"F16"', 1)
    path.write_bytes(data[:8] + header + data[8 + n:])


DAMAGES = {  # name -> (damage the file, the message; every message names the file and says re-download)
    "cut in the tensors": (lambda p: _cut(p, p.stat().st_size // 2),
                           r"is truncated: its header says (\d+) bytes, the file has (\d+); re-download it"),
    "cut in the header": (lambda p: _cut(p, 40), r"is truncated: its header alone should be \d+ bytes, the file has 40"),
    "cut before the header": (lambda p: _cut(p, 5), r"is truncated: 5 bytes, too short for a safetensors header"),
    "garbled header": (_garble_header, r"has a garbled header .*the file is corrupt; re-download it"),
    "bytes appended": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10), r"is corrupt: its header says \d+ bytes"),
    "inconsistent header": (_change_a_dtype, r"could not be read \(.*\): the file is corrupt; re-download it"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_weight_file_is_named_before_any_tensor_is_read(damage, saved, tmp_path, monkeypatch):
    import qwen2audio.checkpoint.hf as hf

    ref, _ = saved["mha_untied_80"]
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    victim = shards[-1]
    damage_file, message = DAMAGES[damage]
    damage_file(victim)
    opened = []
    real_safe_open = hf.safe_open
    monkeypatch.setattr(hf, "safe_open", lambda *a, **k: opened.append(a[0]) or real_safe_open(*a, **k))
    with pytest.raises(CheckpointError, match=re.escape(str(victim)) + " " + message) as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)
    if damage != "inconsistent header":  # found from the header alone, before any shard is opened
        assert opened == []


def test_truncated_size_figures_are_the_files(saved, tmp_path):
    _, path = saved["mha_untied_80"]
    copy_config(path, tmp_path)
    data = (path / SINGLE).read_bytes()
    (tmp_path / SINGLE).write_bytes(data[:10000])  # past the header, inside the tensors
    with pytest.raises(CheckpointError, match=rf"header says {len(data)} bytes, the file has 10000;"):
        load_model(tmp_path)


def test_a_garbled_index_is_named(saved, tmp_path):
    ref, _ = saved["mha_untied_80"]
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    for text in ('{"weight_map": {"a": ', '{"weight_map": {"a": null}}'):  # cut short; a file name of null
        (tmp_path / INDEX).write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / INDEX)) + " is not a readable safetensors index"):
            load_model(tmp_path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from qwen2audio.default_model import write_tiny_model

    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path)
    return path


@pytest.mark.parametrize("damage", ["cut in the tensors", "garbled header"])
def test_cli_says_which_file_is_damaged_in_one_line(damage, tiny_dir, tmp_path, capsys):
    import shutil

    from qwen2audio.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    damage_file, message = DAMAGES[damage]
    damage_file(model / SINGLE)
    capsys.readouterr()
    assert main(["chat", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match("qwen2audio: error: " + re.escape(str(model / SINGLE)) + " " + message,
                                        lines[0]), lines


def test_model_from_state_dict_ties_the_head_and_names_what_does_not_fit(saved):
    from qwen2audio.checkpoint.hf import model_from_state_dict

    _, path = saved["gqa_tied_128"]
    config = Qwen2AudioConfig.from_file(path)
    tensors = load_file(path / SINGLE)
    assert "language_model.lm_head.weight" not in tensors
    model = model_from_state_dict(config, dict(tensors))
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert lm.model.embed_tokens.weight.data_ptr() == tensors["language_model.model.embed_tokens.weight"].data_ptr()
    del tensors["multi_modal_projector.linear.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing multi_modal_projector\.linear\.bias; not in the model extra\.weight"):
        model_from_state_dict(config, tensors)


# -- peak memory ---------------------------------------------------------------------------------------
MEDIUM = Qwen2AudioConfig(
    audio=EncoderConfig(num_mel_bins=80, d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024),
    text=TextConfig(vocab_size=20000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    audio_token_index=19999,
)

MEASURE = textwrap.dedent("""
    import sys
    import torch, qwen2audio
    from qwen2audio.checkpoint import load_model

    def peak_rss() -> int:
        # VmHWM, the peak resident set of this process image. Not resource.getrusage's ru_maxrss:
        # Linux carries that over from the parent through fork and exec, so a child of a big pytest
        # process would start with the parent's peak and show no growth at all.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    load_model(sys.argv[2])  # a tiny checkpoint first: one-time allocations of the loading code path
    before = peak_rss()
    model = load_model(sys.argv[1])
    # Touch every weight: memory-mapped tensors count only once their pages are read.
    total = sum(float(t.float().sum()) for t in model.state_dict().values())
    print(peak_rss() - before, total)
""")


def test_loading_peak_memory_is_about_one_copy_of_the_weights(tmp_path):
    """No random-init copy next to the loaded one: the process grows by < 1.6x the weight bytes."""
    with torch.device("meta"):
        model = Qwen2AudioModel(MEDIUM)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(0.001 * (i + 1))  # real, non-zero bytes on disk
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert 180e6 < weight_bytes < 260e6
    save_model(model, tmp_path / "medium")
    del model
    with torch.device("meta"):
        tiny = Qwen2AudioModel(our_config("mha_untied_80"))
    save_model(tiny.to_empty(device="cpu"), tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "medium"), str(tmp_path / "tiny")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    growth, total = out.stdout.split()
    assert float(total) > 0  # the weights really were read
    ratio = int(growth) / weight_bytes
    print(f"peak growth {ratio:.2f}x the weight bytes")
    assert ratio < 1.6, f"loading {weight_bytes / 1e6:.0f} MB of weights grew the process by {ratio:.2f}x"


# -- preprocessor_config.json ---------------------------------------------------------------------------
def _with_preprocessor(saved, tmp_path, **settings):
    """The 80-mel test checkpoint with a preprocessor_config.json that transformers' own
    WhisperFeatureExtractor writes, with ``settings`` passed to it (None: write raw text instead)."""
    from transformers import WhisperFeatureExtractor

    _, path = saved["mha_untied_80"]
    copy_config(path, tmp_path)
    (tmp_path / SINGLE).symlink_to(path / SINGLE)
    WhisperFeatureExtractor(**{"feature_size": 80, **settings}).save_pretrained(tmp_path)
    return path


def test_preprocessor_config_transformers_writes_for_the_model_loads(saved, tmp_path, recwarn):
    path = _with_preprocessor(saved, tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["feature_size"] == 80
    assert_same_weights(load_model(tmp_path), load_model(path))
    assert not [w for w in recwarn if "preprocessor" in str(w.message)]


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # transformers' own, for 8 kHz with 80 mels
@pytest.mark.parametrize("settings, named", [
    ({"feature_size": 128}, r"feature_size 128 \(config\.json's num_mel_bins: 80\)"),
    ({"sampling_rate": 8000}, r"sampling_rate 8000 \(ours: 16000\)"),
    ({"hop_length": 320}, r"hop_length 320 \(ours: 160\)"),
    ({"chunk_length": 20}, r"chunk_length 20 \(ours: 30\)"),
])
def test_preprocessor_settings_our_front_end_does_not_compute_are_refused(saved, tmp_path, settings, named):
    _with_preprocessor(saved, tmp_path, **settings)
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json asks for features .*" + named):
        load_model(tmp_path)


def test_preprocessor_dither_is_read_and_applied(saved, tmp_path):
    from qwen2audio.checkpoint.files import check_preprocessor_config

    path = _with_preprocessor(saved, tmp_path, dither=1e-4)
    assert check_preprocessor_config(tmp_path, 80) == 1e-4
    assert check_preprocessor_config(path, 80) == 0.0  # no file: the official settings, no dither
    assert_same_weights(load_model(tmp_path), load_model(path))


@pytest.mark.parametrize("text, message", [
    ("{not json", r"not readable JSON"),
    ("[1, 2]", r"not a JSON object"),
    ('{"feature_extractor_type": "SeamlessM4TFeatureExtractor"}', r"WhisperFeatureExtractor\) only"),
    ('{"dither": "a little"}', r"dither must be a number >= 0, got 'a little'"),
    ('{"dither": -0.5}', r"dither must be a number >= 0, got -0\.5"),
])
def test_a_bad_preprocessor_config_is_named(saved, tmp_path, text, message):
    _with_preprocessor(saved, tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json.*" + message):
        load_model(tmp_path)


@pytest.mark.parametrize("text", [
    # transformers computes plain RoPE for type default whatever its factor (it warns of the key) ...
    {"rope_scaling": {"type": "default", "factor": 1.0}},
    {"rope_scaling": {"rope_type": "default", "factor": 2.0}},
    # ... and for linear scaling by 1
    {"rope_scaling": {"rope_type": "linear", "factor": 1.0}},
    # keys neither type uses: transformers warns of them and computes plain RoPE
    {"rope_scaling": {"rope_type": "default", "original_max_position_embeddings": 32768}},
    {"rope_scaling": {"rope_type": "linear", "factor": 1.0, "original_max_position_embeddings": 32768}},
])
def test_rope_settings_transformers_computes_as_plain_rope_load(text, tmp_path):
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, **text)
    plain = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    kind = text["rope_scaling"].get("rope_type", text["rope_scaling"].get("type"))
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    plain_freq, plain_scale = ROPE_INIT_FUNCTIONS["default"](plain, "cpu")
    assert torch.equal(inv_freq, plain_freq) and scale == plain_scale  # the reference: plain RoPE

    write_config(tmp_path, {"model_type": "qwen2_audio", "text_config": {"rope_theta": 1e6, **text}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = Qwen2AudioConfig.from_file(tmp_path)
    assert ours.text.rope_theta == 1e6
    assert any("ignores its factor" in str(w.message) for w in caught) == (kind == "default" and "factor" in
                                                                            text["rope_scaling"])
    extra = "original_max_position_embeddings" in text["rope_scaling"]
    assert any("ignores its keys ['original_max_position_embeddings']" in str(w.message) for w in caught) == extra


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 1.0}])
def test_rope_scaling_that_changes_positions_is_refused(rope, tmp_path):
    write_config(tmp_path, {"model_type": "qwen2_audio", "text_config": {"rope_scaling": rope}})
    with pytest.raises(ValueError, match="plain RoPE"):
        Qwen2AudioConfig.from_file(tmp_path)


@pytest.mark.parametrize("text,slides", [
    # a string is truthy: transformers slides with "false" as with true
    ({"use_sliding_window": "false", "num_hidden_layers": 4, "max_window_layers": 2}, True),
    ({"use_sliding_window": True, "num_hidden_layers": 4, "max_window_layers": 2}, True),
    # no layer from max_window_layers on, or layer_types naming none: full attention everywhere
    ({"use_sliding_window": True, "num_hidden_layers": 4, "max_window_layers": 4}, False),
    ({"use_sliding_window": True, "num_hidden_layers": 2, "max_window_layers": 1,
      "layer_types": ["full_attention", "full_attention"]}, False),
    ({"use_sliding_window": True, "sliding_window": None, "num_hidden_layers": 4, "max_window_layers": 0}, False),
])
def test_sliding_window_refused_exactly_where_transformers_slides(text, slides, tmp_path):
    from transformers import Qwen2Config

    hf = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **text)
    # the reference: a layer slides where its type is sliding and the config keeps a window
    assert (hf.sliding_window is not None and "sliding_attention" in hf.layer_types) == slides
    write_config(tmp_path, {"model_type": "qwen2_audio",
                            "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                            **text}})
    if slides:
        with pytest.raises(ValueError, match=rf"use_sliding_window is {text['use_sliding_window']!r}"):
            Qwen2AudioConfig.from_file(tmp_path)
    else:
        assert Qwen2AudioConfig.from_file(tmp_path).text.num_hidden_layers == text["num_hidden_layers"]


@pytest.mark.parametrize("text", [
    {"use_sliding_window": False, "layer_types": ["full_attention", "sliding_attention"]},
    {"use_sliding_window": True, "sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]},
    {"layer_types": ["sliding_attention", "sliding_attention"]},
])
def test_sliding_layer_types_without_a_window_are_refused(text, tmp_path):
    from transformers import Qwen2Config, Qwen2Model

    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
             "intermediate_size": 128, "vocab_size": 100}
    hf = Qwen2Model(Qwen2Config(**sizes, **text))
    assert hf.config.sliding_window is None
    with pytest.raises(TypeError):  # the reference cannot run these layers: no window to compare positions with
        hf(torch.tensor([[1, 2, 3]]))
    write_config(tmp_path, {"model_type": "qwen2_audio", "text_config": {**sizes, **text}})
    with pytest.raises(ValueError, match=r"layer_types names \d sliding_attention layer.*full_attention"):
        Qwen2AudioConfig.from_file(tmp_path)


@pytest.mark.parametrize("rope", [
    # transformers' Qwen2Config copies "type" over "rope_type": this is linear scaling by 2 there
    {"type": "linear", "rope_type": "default", "factor": 2.0},
    # no type but a factor: transformers refuses it (rope_type missing); no plain RoPE was meant
    {"factor": 2.0},
    {"original_max_position_embeddings": 32768},
])
def test_rope_settings_transformers_does_not_compute_as_plain_rope_are_refused(rope, tmp_path):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    plain = Qwen2RotaryEmbedding(Qwen2Config(**sizes)).inv_freq
    try:  # the reference: another RoPE, or none at all
        assert not torch.equal(Qwen2RotaryEmbedding(Qwen2Config(**sizes, rope_scaling=dict(rope))).inv_freq, plain)
    except KeyError:
        pass
    write_config(tmp_path, {"model_type": "qwen2_audio", "text_config": {"rope_scaling": rope}})
    with pytest.raises(ValueError, match="plain RoPE"):
        Qwen2AudioConfig.from_file(tmp_path)


@pytest.mark.parametrize("major, warned", [(7, True), (8, False)])
def test_auto_dtype_warns_of_bfloat16_on_gpus_that_only_emulate_it(monkeypatch, major, warned):
    """dtype "auto" keeps bfloat16 weights in bfloat16 on a GPU: on a T4 or V100 (compute capability 7.x) every
    product is emulated; the user is told, with the dtype that is native there."""
    from types import SimpleNamespace

    from qwen2audio.checkpoint.hf import warn_emulated_bfloat16

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=5))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_emulated_bfloat16(torch.bfloat16, "cuda")
        warn_emulated_bfloat16(torch.float16, "cuda")  # native on both
        warn_emulated_bfloat16(torch.bfloat16, "cpu")  # the CPU's own rule: auto_dtype loads float32 there
    assert [("only emulates" in str(w.message) and "--dtype float16" in str(w.message)) for w in caught] == \
        ([True] if warned else [])
