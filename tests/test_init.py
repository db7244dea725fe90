"""`qwen2audio init`: a Qwen2-Audio checkpoint assembled from a Whisper encoder and a Qwen2 LLM in every
supported format, checked against the source models' own outputs (transformers' WhisperModel and
Qwen2ForCausalLM at tiny sizes; every source file is written here, nothing is downloaded).

How the encoder is compared: Whisper applies its final LayerNorm (ln_post) to the 1500 frames the
blocks produce; Qwen2-Audio applies the same LayerNorm after a 2x average pool. So we run our
production ``audio_tower.forward`` on a full 30 s window, capture the last block's output with a
forward hook, and apply our ``layer_norm`` (Whisper's ln_post, imported) to it: that must equal
Whisper's ``last_hidden_state``. The same captured states, pooled then normed, must equal what our
forward returned, so the hook sees exactly the production path.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qwen2audio.checkpoint import load_model
from qwen2audio.checkpoint.importers import WeightImportError
from qwen2audio.checkpoint.importers.whisper import sinusoids
from qwen2audio.checkpoint.init import init_checkpoint
from qwen2audio.cli import main
from qwen2audio.text import Tokenizer
from qwen2audio.text.special_tokens import AUDIO, AUDIO_BOS, AUDIO_EOS
from reference import TOKENIZER, VOCAB, clip, hf_features

TOL = 1e-4
N_MELS = 80
N_FRAMES = 3000  # one 30 s window: what transformers' WhisperEncoder insists on
WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=N_MELS,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=96,
               max_target_positions=32, max_source_positions=1500, pad_token_id=1, bos_token_id=2,
               eos_token_id=2, decoder_start_token_id=3)
QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6)
N_AUDIO_TOKENS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed: int, skip=()):
    """Spread-out random weights (norm gains near 1), rounded to float16 so that a float16 file (the
    CTranslate2 one) holds them exactly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())
    return model.eval()


def _tokenizer_without_audio_tokens() -> Tokenizer:
    """The test tokenizer as a plain Qwen2 LLM has it: <|endoftext|>, <|im_start|>, <|im_end|> only."""
    import tokenizers

    raw = json.loads(TOKENIZER.backend.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in (AUDIO, AUDIO_BOS, AUDIO_EOS)]
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(raw)))


# ---- sources --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(**WHISPER))
    with torch.no_grad():  # sinusoids in float16 precision, so every format stores them exactly
        model.encoder.embed_positions.weight.copy_(model.encoder.embed_positions.weight.half().float())
    return _randomise(model, seed=1, skip=("embed_positions",))


@pytest.fixture(scope="module")
def whisper_dir(whisper, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_hf")
    whisper.save_pretrained(path)
    return path


def openai_state_dict(whisper) -> dict[str, torch.Tensor]:
    """The same weights under openai/whisper's names (an explicit reverse map, written independently of
    the importer's)."""
    sd = {k: v.clone() for k, v in whisper.state_dict().items()}
    out = {
        "encoder.conv1.weight": sd["encoder.conv1.weight"], "encoder.conv1.bias": sd["encoder.conv1.bias"],
        "encoder.conv2.weight": sd["encoder.conv2.weight"], "encoder.conv2.bias": sd["encoder.conv2.bias"],
        "encoder.positional_embedding": sd["encoder.embed_positions.weight"],
        "encoder.ln_post.weight": sd["encoder.layer_norm.weight"], "encoder.ln_post.bias": sd["encoder.layer_norm.bias"],
        "decoder.token_embedding.weight": sd["decoder.embed_tokens.weight"],  # a decoder tensor: ignored
        "decoder.ln.weight": sd["decoder.layer_norm.weight"],
    }
    pairs = [("attn.query", "self_attn.q_proj"), ("attn.key", "self_attn.k_proj"), ("attn.value", "self_attn.v_proj"),
             ("attn.out", "self_attn.out_proj"), ("attn_ln", "self_attn_layer_norm"), ("mlp.0", "fc1"),
             ("mlp.2", "fc2"), ("mlp_ln", "final_layer_norm")]
    for i in range(WHISPER["encoder_layers"]):
        for theirs, hf in pairs:
            for kind in ("weight", "bias"):
                if f"encoder.layers.{i}.{hf}.{kind}" in sd:
                    out[f"encoder.blocks.{i}.{theirs}.{kind}"] = sd[f"encoder.layers.{i}.{hf}.{kind}"]
    return out


OPENAI_DIMS = dict(n_mels=N_MELS, n_vocab=WHISPER["vocab_size"], n_audio_ctx=1500, n_audio_state=WHISPER["d_model"],
                   n_audio_head=WHISPER["encoder_attention_heads"], n_audio_layer=WHISPER["encoder_layers"],
                   n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=1)


@pytest.fixture(scope="module")
def openai_pt(whisper, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_openai") / "tiny.pt"
    torch.save({"dims": OPENAI_DIMS, "model_state_dict": openai_state_dict(whisper)}, path)
    return path


def write_ctranslate2(path, variables: dict[str, np.ndarray], aliases: dict[str, str], spec="WhisperSpec"):
    """CTranslate2's model.bin layout (binary version 6), as its ModelSpec._serialize writes it."""
    dtype_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
                 np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    parts = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value, order="C")  # (ascontiguousarray would make a rank-0 scalar rank 1)
        parts += [string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape),
                  struct.pack("<B", dtype_ids[value.dtype]), struct.pack("<I", value.nbytes), value.tobytes()]
    parts.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        parts += [string(alias), string(target)]
    path.write_bytes(b"".join(parts))


def ctranslate2_variables(whisper) -> dict[str, np.ndarray]:
    sd = {k: v.numpy().astype(np.float16) for k, v in whisper.state_dict().items()}
    d = WHISPER["d_model"]
    out = {
        "encoder/num_heads": np.array(WHISPER["encoder_attention_heads"], dtype=np.int16),
        "encoder/conv1/weight": sd["encoder.conv1.weight"], "encoder/conv1/bias": sd["encoder.conv1.bias"],
        "encoder/conv2/weight": sd["encoder.conv2.weight"], "encoder/conv2/bias": sd["encoder.conv2.bias"],
        "encoder/position_encodings/encodings": sd["encoder.embed_positions.weight"],
        "encoder/layer_norm/gamma": sd["encoder.layer_norm.weight"], "encoder/layer_norm/beta": sd["encoder.layer_norm.bias"],
        "decoder/embeddings/weight": sd["decoder.embed_tokens.weight"],
    }
    for i in range(WHISPER["encoder_layers"]):
        hf, ct = f"encoder.layers.{i}.", f"encoder/layer_{i}/"
        a = hf + "self_attn."
        out[ct + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
        out[ct + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[a + "q_proj.bias"], np.zeros(d, np.float16), sd[a + "v_proj.bias"]])
        out[ct + "self_attention/linear_1/weight"] = sd[a + "out_proj.weight"]
        out[ct + "self_attention/linear_1/bias"] = sd[a + "out_proj.bias"]
        out[ct + "self_attention/layer_norm/gamma"] = sd[hf + "self_attn_layer_norm.weight"]
        out[ct + "self_attention/layer_norm/beta"] = sd[hf + "self_attn_layer_norm.bias"]
        out[ct + "ffn/linear_0/weight"], out[ct + "ffn/linear_0/bias"] = sd[hf + "fc1.weight"], sd[hf + "fc1.bias"]
        out[ct + "ffn/linear_1/weight"], out[ct + "ffn/linear_1/bias"] = sd[hf + "fc2.weight"], sd[hf + "fc2.bias"]
        out[ct + "ffn/layer_norm/gamma"] = sd[hf + "final_layer_norm.weight"]
        out[ct + "ffn/layer_norm/beta"] = sd[hf + "final_layer_norm.bias"]
    return out


@pytest.fixture(scope="module")
def ct2_bin(whisper, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_ct2") / "model.bin"
    write_ctranslate2(path, ctranslate2_variables(whisper), {"decoder/projection/weight": "decoder/embeddings/weight"})
    return path


def _qwen2(tied: bool, vocab: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, tie_word_embeddings=tied, **QWEN2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _randomise(Qwen2ForCausalLM(cfg), seed=seed)
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def qwen2_untied(tmp_path_factory):
    """Untied, its tokenizer without the audio tokens and exactly as many rows as tokens: init must grow it."""
    model = _qwen2(tied=False, vocab=VOCAB - N_AUDIO_TOKENS, seed=2)
    path = tmp_path_factory.mktemp("qwen2_untied")
    model.save_pretrained(path)
    _tokenizer_without_audio_tokens().save(path)
    return model, path


@pytest.fixture(scope="module")
def qwen2_tied(tmp_path_factory):
    """Tied, sharded, spare embedding rows, and a tokenizer that already has the audio tokens."""
    model = _qwen2(tied=True, vocab=VOCAB + 10, seed=3)
    path = tmp_path_factory.mktemp("qwen2_tied")
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    TOKENIZER.save(path)
    return model, path


GGUF_NAMES = [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"),
              ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"),
              ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]


def write_gguf(path, model, qtype=None) -> dict[str, np.ndarray]:
    """A qwen2 GGUF of ``model`` as llama.cpp writes one: 2-D weights in ``qtype`` (default F32), 1-D in
    F32. Returns the dequantised values the file holds, by GGUF name."""
    import gguf
    from gguf.quants import dequantize, quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    sd = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not c.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(c.num_hidden_layers):
        for hf, gg in GGUF_NAMES:
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{'mlp' if 'proj' in hf and hf[0] in 'gud' else 'self_attn'}.{hf}.{kind}"
                if "layernorm" in hf:
                    key = f"model.layers.{i}.{hf}.{kind}"
                if key in sd:
                    names[f"blk.{i}.{gg}.{kind}"] = key
    held = {}
    for name, key in names.items():
        value = sd[key].numpy().astype(np.float32)
        if qtype is not None and value.ndim == 2:
            data = quantize(value, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            held[name] = dequantize(data, qtype).reshape(value.shape)
        else:
            w.add_tensor(name, value)
            held[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


# ---- the checks -----------------------------------------------------------------------------------

@torch.no_grad()
def assert_encoder_matches(out_dir, whisper):
    ours = load_model(out_dir)
    feats = torch.randn(1, N_MELS, N_FRAMES, generator=torch.Generator().manual_seed(4))
    captured = {}
    hook = ours.audio_tower.layers[-1].register_forward_hook(lambda m, i, o: captured.update(x=o))
    try:
        pooled, counts = ours.audio_tower(feats, torch.tensor([N_FRAMES]))
    finally:
        hook.remove()
    frames = captured["x"]  # (1, 1500, d): the last block's output, before pooling
    expected = whisper.encoder(feats).last_hidden_state  # ln_post(blocks(...)), (1, 1500, d)
    assert frames.shape == expected.shape
    assert (ours.audio_tower.layer_norm(frames) - expected).abs().max().item() < TOL
    repooled = ours.audio_tower.layer_norm(F.avg_pool1d(frames.transpose(1, 2), 2, 2).transpose(1, 2))
    assert torch.equal(repooled, pooled) and counts.tolist() == [750]


@torch.no_grad()
def assert_llm_matches(out_dir, qwen2, tol=TOL):
    ours = load_model(out_dir)
    ids = torch.tensor([[5, 80, 17, 200, 33, 101, 7, 250, 3]])
    expected = qwen2(ids).logits  # (1, T, V_source)
    got = ours(ids)  # text only: no audio
    n = expected.shape[-1]
    assert (got[..., :n] - expected).abs().max().item() < tol
    return ours, got


def tokens_of(out_dir) -> Tokenizer:
    return Tokenizer.from_dir(out_dir)


def test_sinusoids_are_whispers():
    from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids

    assert torch.equal(sinusoids(1500, 64), hf_sinusoids(1500, 64))


def test_hf_whisper_and_untied_hf_qwen2_grow_the_vocabulary(whisper, whisper_dir, qwen2_untied, tmp_path):
    qwen2, llm_dir = qwen2_untied
    report = init_checkpoint(whisper_dir, llm_dir, tmp_path / "out", dtype="float32", seed=7)
    assert report.added_tokens == [AUDIO, AUDIO_BOS, AUDIO_EOS]
    assert report.vocab_rows == (VOCAB - N_AUDIO_TOKENS, VOCAB)
    assert_encoder_matches(tmp_path / "out", whisper)
    ours, _ = assert_llm_matches(tmp_path / "out", qwen2)
    tok = tokens_of(tmp_path / "out")
    assert ours.config.audio_token_index == tok.audio_id == VOCAB - N_AUDIO_TOKENS
    assert [tok.audio_id, tok.audio_bos_id, tok.audio_eos_id] == list(range(VOCAB - N_AUDIO_TOKENS, VOCAB))
    n = VOCAB - N_AUDIO_TOKENS
    for weight, source in ((ours.language_model.model.embed_tokens.weight, qwen2.model.embed_tokens.weight),
                           (ours.language_model.lm_head.weight, qwen2.lm_head.weight)):
        assert torch.equal(weight[:n], source)
        assert torch.allclose(weight[n:], source.mean(0).expand(N_AUDIO_TOKENS, -1), atol=1e-6)
    # the projector: seeded, zero bias, the documented std
    proj = ours.multi_modal_projector.linear
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    std = qwen2.model.embed_tokens.weight.pow(2).mean().sqrt().item() / WHISPER["d_model"] ** 0.5
    assert report.projector_std == pytest.approx(std)
    assert proj.weight.std().item() == pytest.approx(std, rel=0.1)
    again = init_checkpoint(whisper_dir, llm_dir, tmp_path / "again", dtype="float32", seed=7)
    assert again.projector_std == report.projector_std
    assert torch.equal(load_model(tmp_path / "again").multi_modal_projector.linear.weight, proj.weight)


def test_openai_whisper_and_tied_sharded_qwen2_reuse_token_ids(whisper, openai_pt, qwen2_tied, tmp_path):
    qwen2, llm_dir = qwen2_tied
    report = init_checkpoint(openai_pt, llm_dir, tmp_path / "out")
    assert report.added_tokens == [] and report.vocab_rows == (VOCAB + 10, VOCAB + 10)
    assert report.audio_token_ids == {AUDIO: TOKENIZER.audio_id, AUDIO_BOS: TOKENIZER.audio_bos_id,
                                      AUDIO_EOS: TOKENIZER.audio_eos_id}
    assert_encoder_matches(tmp_path / "out", whisper)
    ours, _ = assert_llm_matches(tmp_path / "out", qwen2)
    assert ours.config.text.tie_word_embeddings
    assert ours.language_model.lm_head.weight is ours.language_model.model.embed_tokens.weight


def test_openai_whisper_without_positions_gets_sinusoids(whisper, tmp_path):
    from qwen2audio.checkpoint.importers import load_encoder

    sd = openai_state_dict(whisper)
    del sd["encoder.positional_embedding"]  # a buffer that some copies of the checkpoint leave out
    torch.save({"dims": OPENAI_DIMS, "model_state_dict": sd}, tmp_path / "nopos.pt")
    _, state = load_encoder(tmp_path / "nopos.pt")
    assert torch.equal(state["embed_positions.weight"], sinusoids(1500, WHISPER["d_model"]))


def test_ctranslate2_whisper_and_gguf_f32_qwen2(whisper, ct2_bin, qwen2_untied, tmp_path):
    qwen2, llm_dir = qwen2_untied
    write_gguf(tmp_path / "llm.gguf", qwen2)
    report = init_checkpoint(ct2_bin, tmp_path / "llm.gguf", tmp_path / "out", tokenizer=llm_dir / "tokenizer.json")
    assert report.dtype == "float32" and report.added_tokens == [AUDIO, AUDIO_BOS, AUDIO_EOS]
    assert_encoder_matches(tmp_path / "out", whisper)
    assert_llm_matches(tmp_path / "out", qwen2)
    # the directory that holds model.bin names the same encoder
    init_checkpoint(ct2_bin.parent, tmp_path / "llm.gguf", tmp_path / "out2", tokenizer=llm_dir)
    assert_encoder_matches(tmp_path / "out2", whisper)


def test_gguf_q8_0_qwen2(whisper_dir, qwen2_tied, tmp_path):
    from gguf import GGMLQuantizationType

    qwen2, llm_dir = qwen2_tied
    held = write_gguf(tmp_path / "llm.gguf", qwen2, qtype=GGMLQuantizationType.Q8_0)
    init_checkpoint(whisper_dir, tmp_path / "llm.gguf", tmp_path / "out", tokenizer=llm_dir)
    ours = load_model(tmp_path / "out")
    # exactly the values the file holds (gguf's own dequantisation) ...
    assert torch.equal(ours.language_model.model.layers[1].mlp.down_proj.weight,
                       torch.from_numpy(held["blk.1.ffn_down.weight"]))
    assert torch.equal(ours.language_model.model.embed_tokens.weight, torch.from_numpy(held["token_embd.weight"]))
    # ... which are within Q8_0's rounding of the source model: logits agree to about 1%
    ids = torch.tensor([[5, 80, 17, 200, 33, 101, 7, 250, 3]])
    expected = qwen2(ids).logits.detach()
    diff = (ours(ids).detach() - expected).abs().max().item()
    assert diff < 0.02 * expected.abs().max().item()


def test_whisper_for_conditional_generation_layout(whisper, tmp_path, qwen2_tied):
    """model.encoder.* / model.decoder.* / proj_out.* as WhisperForConditionalGeneration saves them."""
    src = tmp_path / "wfcg"
    src.mkdir()
    sd = {f"model.{k}": v.contiguous() for k, v in whisper.state_dict().items()}
    sd["proj_out.weight"] = whisper.decoder.embed_tokens.weight.detach().clone()
    save_file(sd, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "whisper", **WHISPER}))
    init_checkpoint(src, qwen2_tied[1], tmp_path / "out")
    assert_encoder_matches(tmp_path / "out", whisper)


# ---- errors name the key --------------------------------------------------------------------------

def test_unknown_missing_and_misshapen_keys_are_named(whisper, whisper_dir, qwen2_tied, tmp_path):
    llm = qwen2_tied[1]
    sd = openai_state_dict(whisper)
    sd["encoder.blocks.0.attn.key.bias"] = torch.zeros(WHISPER["d_model"])
    torch.save({"dims": OPENAI_DIMS, "model_state_dict": sd}, tmp_path / "extra.pt")
    with pytest.raises(WeightImportError, match=r"encoder\.blocks\.0\.attn\.key\.bias"):
        init_checkpoint(tmp_path / "extra.pt", llm, tmp_path / "o1")

    sd = openai_state_dict(whisper)
    del sd["encoder.blocks.1.mlp_ln.bias"]
    torch.save({"dims": OPENAI_DIMS, "model_state_dict": sd}, tmp_path / "missing.pt")
    with pytest.raises(WeightImportError, match=r"missing.*encoder\.blocks\.1\.mlp_ln\.bias"):
        init_checkpoint(tmp_path / "missing.pt", llm, tmp_path / "o2")

    variables = ctranslate2_variables(whisper)
    variables["encoder/layer_1/ffn/linear_0/bias"] = variables["encoder/layer_1/ffn/linear_0/bias"][:-1]
    write_ctranslate2(tmp_path / "bad.bin", variables, {})
    with pytest.raises(WeightImportError, match=r"encoder/layer_1/ffn/linear_0/bias.*\(255,\).*\(256,\)"):
        init_checkpoint(tmp_path / "bad.bin", llm, tmp_path / "o3")


# ---- damaged files (an interrupted download) --------------------------------------------------------

def _cut_copy(src, dst, keep: int):
    """dst: the first ``keep`` bytes of src (negative: all but the last -keep)."""
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def _init_cli(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["init", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_truncated_gguf_names_the_file_and_the_cut_tensor(qwen2_tied, whisper_dir, tmp_path, capsys):
    import gguf

    full = tmp_path / "llm.gguf"
    write_gguf(full, qwen2_tied[0])
    reader = gguf.GGUFReader(str(full))
    last = max(reader.tensors, key=lambda t: t.data_offset)
    size = full.stat().st_size
    cut = _cut_copy(full, tmp_path / "cut.gguf", last.data_offset + 8)  # inside the last tensor's data
    expected = (re.escape(f"{cut} is truncated: its header says the tensor data runs to byte ")
                + rf"\d+, the file has {last.data_offset + 8} \(tensor {re.escape(last.name)} is cut\); re-download it")
    with pytest.raises(WeightImportError, match=expected):
        init_checkpoint(whisper_dir, cut, tmp_path / "o", tokenizer=qwen2_tied[1])
    code, lines = _init_cli(capsys, "--encoder", whisper_dir, "--llm", cut, "--tokenizer", qwen2_tied[1],
                            "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1 and re.match("qwen2audio: error: " + expected, lines[0]), lines
    assert size > last.data_offset + 8 and not (tmp_path / "o").exists()
    # cut inside the header (the metadata): named too, though no tensor can be
    header_cut = _cut_copy(full, tmp_path / "header.gguf", 100)
    code, lines = _init_cli(capsys, "--encoder", whisper_dir, "--llm", header_cut, "--tokenizer", qwen2_tied[1],
                            "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1, lines
    assert f"{header_cut} could not be read as GGUF" in lines[0] and "truncated or corrupt; re-download it" in lines[0]


def test_a_truncated_ctranslate2_model_bin_is_named(ct2_bin, qwen2_tied, tmp_path, capsys):
    cut = _cut_copy(ct2_bin, tmp_path / "model.bin", ct2_bin.stat().st_size // 2)
    expected = re.escape(str(cut)) + r" is truncated: its header says variable \S+ runs to byte \d+, the file has " \
        + rf"{cut.stat().st_size}; re-download it"
    with pytest.raises(WeightImportError, match=expected):
        init_checkpoint(cut, qwen2_tied[1], tmp_path / "o")
    code, lines = _init_cli(capsys, "--encoder", cut, "--llm", qwen2_tied[1], "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1 and re.match("qwen2audio: error: " + expected, lines[0]), lines


def test_a_truncated_openai_pt_is_named(openai_pt, qwen2_tied, tmp_path, capsys):
    cut = _cut_copy(openai_pt, tmp_path / "tiny.pt", -100)
    expected = re.escape(f"{cut} is truncated: it starts as a torch.save zip archive but lacks the archive's directory")
    with pytest.raises(WeightImportError, match=expected):
        init_checkpoint(cut, qwen2_tied[1], tmp_path / "o")
    code, lines = _init_cli(capsys, "--encoder", cut, "--llm", qwen2_tied[1], "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1 and re.match("qwen2audio: error: " + expected, lines[0]), lines
    assert lines[0].endswith("re-download it")


def test_a_truncated_shard_of_the_llm_is_named(qwen2_tied, whisper_dir, tmp_path, capsys):
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(qwen2_tied[1], llm)
    shard = sorted(llm.glob("model-*.safetensors"))[-1]
    size = shard.stat().st_size
    _cut_copy(shard, shard, size - 16)
    expected = re.escape(f"{shard} is truncated: its header says {size} bytes, the file has {size - 16}; re-download")
    code, lines = _init_cli(capsys, "--encoder", whisper_dir, "--llm", llm, "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1 and re.match("qwen2audio: error: " + expected, lines[0]), lines


def test_gguf_without_tokenizer_asks_for_one(qwen2_tied, whisper_dir, tmp_path, capsys):
    write_gguf(tmp_path / "llm.gguf", qwen2_tied[0])
    code = main(["init", "--encoder", str(whisper_dir), "--llm", str(tmp_path / "llm.gguf"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_refuses_a_non_empty_out_dir(whisper_dir, qwen2_tied, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        init_checkpoint(whisper_dir, qwen2_tied[1], tmp_path / "o")


# ---- the result loads everywhere ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_out(whisper_dir, qwen2_untied, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "qwen2audio-init"
    code = main(["init", "--encoder", str(whisper_dir), "--llm", str(qwen2_untied[1]), "--out", str(out),
                 "--dtype", "float32"])
    assert code == 0
    return out


def test_cli_output_chats(cli_out, capsys):
    capsys.readouterr()
    assert main(["chat", str(cli_out), "--prompt", "hi", "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) <= 4


@torch.no_grad()
def test_transformers_loads_the_output(cli_out):
    from transformers import Qwen2AudioForConditionalGeneration

    ref = Qwen2AudioForConditionalGeneration.from_pretrained(cli_out, attn_implementation="eager").eval()
    ours = load_model(cli_out)
    tok = tokens_of(cli_out)
    feats, fmask = hf_features([clip(1.5, 0)], N_MELS)
    n_audio = int(ours.audio_tower(feats, fmask.sum(-1))[1][0])
    ids = torch.tensor([[5, 6, tok.audio_bos_id] + [tok.audio_id] * n_audio + [tok.audio_eos_id, 9, 10]])
    expected = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                   attention_mask=torch.ones_like(ids)).logits
    assert (ours(ids, feats, fmask.sum(-1)) - expected).abs().max().item() < TOL


def test_ctranslate2_int8_weights_are_dequantised(whisper, tmp_path):
    """CTranslate2's int8 quantisation: an int8 `weight` and a per-row float `weight_scale`."""
    from qwen2audio.checkpoint.importers import load_encoder

    variables = ctranslate2_variables(whisper)
    w = variables["encoder/layer_0/ffn/linear_0/weight"].astype(np.float32)
    scale = 127.0 / np.abs(w).max(axis=1)
    variables["encoder/layer_0/ffn/linear_0/weight"] = np.round(w * scale[:, None]).astype(np.int8)
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = scale.astype(np.float32)
    write_ctranslate2(tmp_path / "int8.bin", variables, {})
    _, state = load_encoder(tmp_path / "int8.bin")
    expected = variables["encoder/layer_0/ffn/linear_0/weight"].astype(np.float32) / scale[:, None]
    assert torch.equal(state["layers.0.fc1.weight"], torch.from_numpy(expected))
    assert (state["layers.0.fc1.weight"] - torch.from_numpy(w)).abs().max().item() < np.abs(w).max() / 127


def test_llm_directory_without_tokenizer_asks_for_one(whisper_dir, qwen2_tied, tmp_path):
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(qwen2_tied[1], llm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llm / name).unlink()
    with pytest.raises(ValueError, match="--tokenizer"):
        init_checkpoint(whisper_dir, llm, tmp_path / "o")
    init_checkpoint(whisper_dir, llm, tmp_path / "o", tokenizer=qwen2_tied[1])  # given: fine
