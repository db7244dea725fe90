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
from source_models import (N_MELS, WHISPER, ctranslate2_variables, tiny_qwen2, tiny_whisper,
                           tokenizer_without_audio_tokens, write_ctranslate2, write_gguf, write_whisper_ct2)

TOL = 1e-4
N_FRAMES = 3000  # one 30 s window: what transformers' WhisperEncoder insists on
N_AUDIO_TOKENS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- sources --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


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


@pytest.fixture(scope="module")
def ct2_bin(whisper, tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper_ct2") / "model.bin"
    write_whisper_ct2(path, whisper)
    return path


@pytest.fixture(scope="module")
def qwen2_untied(tmp_path_factory):
    """Untied, its tokenizer without the audio tokens and exactly as many rows as tokens: init must grow it."""
    model = tiny_qwen2(tied=False, vocab=VOCAB - N_AUDIO_TOKENS, seed=2)
    path = tmp_path_factory.mktemp("qwen2_untied")
    model.save_pretrained(path)
    tokenizer_without_audio_tokens().save(path)
    return model, path


@pytest.fixture(scope="module")
def qwen2_tied(tmp_path_factory):
    """Tied, sharded, spare embedding rows, and a tokenizer that already has the audio tokens."""
    model = tiny_qwen2(tied=True, vocab=VOCAB + 10, seed=3)
    path = tmp_path_factory.mktemp("qwen2_tied")
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    TOKENIZER.save(path)
    return model, path


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


def test_gguf_without_tokenizer_metadata_asks_for_one(qwen2_tied, whisper_dir, tmp_path, capsys):
    write_gguf(tmp_path / "llm.gguf", qwen2_tied[0])  # no tokenizer.ggml.* keys
    code = main(["init", "--encoder", str(whisper_dir), "--llm", str(tmp_path / "llm.gguf"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"qwen2audio: error: --llm {tmp_path / 'llm.gguf'} is a GGUF file without a tokenizer in "
                           "its metadata; pass the LLM's tokenizer with --tokenizer DIR_OR_FILE")
    assert not (tmp_path / "o").exists()


def test_gguf_tokenizer_metadata_replaces_the_tokenizer_flag(ct2_bin, qwen2_untied, tmp_path):
    """A GGUF that carries its tokenizer (as llama.cpp writes one) needs no --tokenizer: the checkpoint is the
    one --tokenizer with the LLM's tokenizer.json gives, weights and token ids alike."""
    qwen2, llm_dir = qwen2_untied
    write_gguf(tmp_path / "llm.gguf", qwen2, tokenizer_json=(llm_dir / "tokenizer.json").read_text())
    report = init_checkpoint(ct2_bin, tmp_path / "llm.gguf", tmp_path / "own")
    init_checkpoint(ct2_bin, tmp_path / "llm.gguf", tmp_path / "given", tokenizer=llm_dir / "tokenizer.json")
    assert report.added_tokens == [AUDIO, AUDIO_BOS, AUDIO_EOS]
    own, given = tokens_of(tmp_path / "own"), tokens_of(tmp_path / "given")
    text = "<|im_start|>user\nSay hi<|im_end|>\n<|audio_bos|><|AUDIO|><|audio_eos|> héllo, wörld 42!"
    assert own.encode(text) == given.encode(text)
    assert own.backend.get_added_tokens_decoder() == given.backend.get_added_tokens_decoder()
    a, b = load_model(tmp_path / "own").state_dict(), load_model(tmp_path / "given").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_audio_tokens_take_spare_embedding_rows(ct2_bin, tmp_path):
    """A GGUF with more embedding rows than tokens (as llama.cpp pads Qwen2's): the audio tokens land on the
    first spare rows, which become the mean of the original tokens' rows; the other rows stay as they were."""
    n, spare = VOCAB - N_AUDIO_TOKENS, 5
    qwen2 = tiny_qwen2(tied=False, vocab=n + spare, seed=4)
    write_gguf(tmp_path / "llm.gguf", qwen2, tokenizer_json=tokenizer_without_audio_tokens().backend.to_str())
    report = init_checkpoint(ct2_bin, tmp_path / "llm.gguf", tmp_path / "out")
    assert report.vocab_rows == (n + spare, n + spare) and report.audio_token_ids[AUDIO] == n
    ours = load_model(tmp_path / "out").language_model
    for weight, source in ((ours.model.embed_tokens.weight, qwen2.model.embed_tokens.weight),
                           (ours.lm_head.weight, qwen2.lm_head.weight)):
        assert torch.equal(weight[:n], source[:n]) and torch.equal(weight[n + N_AUDIO_TOKENS:], source[n + N_AUDIO_TOKENS:])
        assert torch.allclose(weight[n:n + N_AUDIO_TOKENS], source[:n].mean(0).expand(N_AUDIO_TOKENS, -1), atol=1e-6)


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


def test_ctranslate2_int8_convolutions_are_dequantised(whisper, tmp_path):
    """CTranslate2's int8 converter quantises the (out, in, width) convolutions too, a scale per output
    channel (faster-whisper's int8 models): their import failed ("operands could not be broadcast")."""
    from qwen2audio.checkpoint.importers import load_encoder

    variables = ctranslate2_variables(whisper)
    w = variables["encoder/conv1/weight"].astype(np.float32)  # (d_model, n_mels, 3)
    scale = 127.0 / np.abs(w).reshape(len(w), -1).max(axis=1)
    variables["encoder/conv1/weight"] = np.round(w * scale[:, None, None]).astype(np.int8)
    variables["encoder/conv1/weight_scale"] = scale.astype(np.float32)
    write_ctranslate2(tmp_path / "int8.bin", variables, {})
    _, state = load_encoder(tmp_path / "int8.bin")
    expected = variables["encoder/conv1/weight"].astype(np.float32) / scale[:, None, None]
    assert torch.equal(state["conv1.weight"], torch.from_numpy(expected))
    assert (state["conv1.weight"] - torch.from_numpy(w)).abs().max().item() < np.abs(w).max() / 127


def test_swapped_or_wrong_sources_are_named_before_anything_is_loaded(whisper_dir, qwen2_tied, tmp_path, monkeypatch):
    """A Qwen2 directory as --encoder, a Whisper one (which ships a tokenizer.json) as --llm, a safetensors
    file as --llm: each named by its flag at once, not by a tokenizer's complaint or after the LLM loaded."""
    from qwen2audio.checkpoint import importers, init

    def no_load(*args, **kwargs):
        raise AssertionError("something was loaded")

    monkeypatch.setattr(init, "_read_tokenizer", no_load)
    monkeypatch.setattr(importers, "load_llm", no_load)
    monkeypatch.setattr(importers, "load_encoder", no_load)
    llm = qwen2_tied[1]
    shard = sorted(llm.glob("*.safetensors"))[0]
    for encoder, lm, message in (
            (llm, whisper_dir, rf"--encoder {llm}/config.json has model_type 'qwen2'; --encoder expects a Whisper "
                               r"model \(model_type 'whisper'\): are --encoder and --llm swapped\?"),
            (whisper_dir, whisper_dir, rf"--llm {whisper_dir}/config.json has model_type 'whisper'; --llm expects a "
                                       r"Qwen2 model \(model_type 'qwen2'\): are --encoder and --llm swapped\?"),
            (whisper_dir, shard, rf"--llm {shard}: not a format this command reads")):
        with pytest.raises(ValueError, match=message):
            init_checkpoint(encoder, lm, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_an_out_that_cannot_be_written_is_named_before_anything_is_loaded(whisper_dir, qwen2_tied, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code = main(["init", "--encoder", str(whisper_dir), "--llm", str(qwen2_tied[1]), "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {blocker / 'sub'} cannot be written (Not a directory)" in err, err
    assert "Traceback" not in err and blocker.read_text() == ""


@pytest.mark.parametrize("std", ["nan", "inf", "-0.5", "0"])
def test_a_projector_std_that_is_not_a_positive_number_is_refused(whisper_dir, qwen2_tied, tmp_path, capsys, std):
    code = main(["init", "--encoder", str(whisper_dir), "--llm", str(qwen2_tied[1]), "--out", str(tmp_path / "o"),
                 f"--projector-std={std}"])
    assert code == 2 and "--projector-std must be a number above 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_whisper_config_with_scale_embedding_is_the_same_encoder(whisper_dir, qwen2_tied, tmp_path):
    """A Whisper config.json with scale_embedding true: the reference, transformers' WhisperModel read from
    that folder, computes its encoder as ours does from the checkpoint init makes of it."""
    import shutil

    from transformers import WhisperModel

    scaled = tmp_path / "scaled"
    shutil.copytree(whisper_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "scale_embedding": True}))
    reference = WhisperModel.from_pretrained(scaled).eval()
    assert reference.config.scale_embedding is True
    init_checkpoint(scaled, qwen2_tied[1], tmp_path / "out")
    assert_encoder_matches(tmp_path / "out", reference)


def test_llm_directory_without_tokenizer_asks_for_one(whisper_dir, qwen2_tied, tmp_path):
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(qwen2_tied[1], llm)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llm / name).unlink()
    with pytest.raises(ValueError, match="--tokenizer"):
        init_checkpoint(whisper_dir, llm, tmp_path / "o")
    init_checkpoint(whisper_dir, llm, tmp_path / "o", tokenizer=qwen2_tied[1])  # given: fine


def test_out_that_is_a_file_is_refused_even_with_force(tmp_path):
    from qwen2audio.checkpoint.init import init_checkpoint
    from qwen2audio.errors import CheckpointError

    victim = tmp_path / "clip.wav"
    victim.write_bytes(b"keep me")
    for force in (False, True):
        with pytest.raises(CheckpointError, match=r"clip\.wav is a file, not a directory; choose a new directory"):
            init_checkpoint(tmp_path / "enc", tmp_path / "llm", victim, force=force)
    assert victim.read_bytes() == b"keep me"


def test_an_aliased_int8_weight_takes_its_targets_scale(whisper, tmp_path):
    """CTranslate2 makes aliases before it quantises: an aliased weight's scale is its target's. It was read
    unscaled (int8 values as weights, ~300x too large)."""
    from qwen2audio.checkpoint.importers import load_encoder

    variables = ctranslate2_variables(whisper)
    w = variables["encoder/layer_0/ffn/linear_0/weight"].astype(np.float32)
    scale = 127.0 / np.abs(w).max(axis=1)
    variables["encoder/layer_0/ffn/linear_0/weight"] = np.round(w * scale[:, None]).astype(np.int8)
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = scale.astype(np.float32)
    del variables["encoder/layer_1/ffn/linear_0/weight"]
    write_ctranslate2(tmp_path / "alias.bin", variables,
                      {"encoder/layer_1/ffn/linear_0/weight": "encoder/layer_0/ffn/linear_0/weight"})
    _, state = load_encoder(tmp_path / "alias.bin")
    assert torch.equal(state["layers.1.fc1.weight"], state["layers.0.fc1.weight"])
    assert state["layers.1.fc1.weight"].dtype == torch.float32
    assert state["layers.1.fc1.weight"].abs().max().item() == pytest.approx(np.abs(w).max(), rel=0.01)


def test_integer_weights_with_no_scale_or_non_finite_weights_are_refused(whisper, tmp_path):
    from qwen2audio.checkpoint.importers import load_encoder

    variables = ctranslate2_variables(whisper)
    variables["encoder/conv1/weight"] = np.ones(variables["encoder/conv1/weight"].shape, np.int8)
    write_ctranslate2(tmp_path / "noscale.bin", variables, {})
    with pytest.raises(WeightImportError, match=r"encoder/conv1/weight holds torch.int8 values with no scale"):
        load_encoder(tmp_path / "noscale.bin")
    variables = ctranslate2_variables(whisper)
    variables["encoder/layer_0/ffn/linear_1/bias"] = np.full_like(variables["encoder/layer_0/ffn/linear_1/bias"], np.nan)
    write_ctranslate2(tmp_path / "nan.bin", variables, {})
    with pytest.raises(WeightImportError, match=r"encoder/layer_0/ffn/linear_1/bias holds NaN or infinite values"):
        load_encoder(tmp_path / "nan.bin")


def test_a_damaged_ctranslate2_header_is_a_checkpoint_error(ct2_bin, tmp_path):
    """Bytes flipped in the header (names, shapes, byte counts, aliases) give an error naming the file, never
    a raw UnicodeDecodeError, reshape ValueError or KeyError."""
    from qwen2audio.checkpoint.importers.ctranslate2 import read_ctranslate2
    from qwen2audio.errors import CheckpointError

    data = ct2_bin.read_bytes()
    header_end = data.index(b"encoder/conv1/weight") + 200
    rng = np.random.default_rng(0)
    outcomes = set()
    for position in rng.integers(4, header_end, 60):
        damaged = bytearray(data)
        damaged[position] ^= 0xA5
        (tmp_path / "model.bin").write_bytes(bytes(damaged))
        try:
            read_ctranslate2(tmp_path / "model.bin")
            outcomes.add("read")
        except CheckpointError as err:
            assert str(tmp_path / "model.bin") in str(err)
            outcomes.add("refused")
    alias_at = data.rindex(b"decoder/embeddings/weight")
    damaged = bytearray(data)
    damaged[alias_at + 8] = ord("X")  # the alias names a variable the file lacks
    (tmp_path / "model.bin").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"is an alias of decoder/Xmbeddings/weight, which it does not hold"):
        read_ctranslate2(tmp_path / "model.bin")
    assert "refused" in outcomes


def test_a_fused_qkv_slice_does_not_keep_the_whole_matrix(ct2_bin):
    from qwen2audio.checkpoint.importers import load_encoder

    _, state = load_encoder(ct2_bin)
    for key, tensor in state.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key


def _patch_gguf_type(path, tensor: str, new_type: int) -> None:
    import struct

    raw = bytearray(path.read_bytes())
    at = raw.index(tensor.encode()) + len(tensor)  # then n_dims u32, dims u64 each, type u32
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, new_type)
    path.write_bytes(bytes(raw))


def test_gguf_tensor_types_the_gguf_package_cannot_read_are_named_before_dequantising(qwen2_tied, tmp_path):
    from gguf import GGMLQuantizationType

    from qwen2audio.checkpoint.importers import load_llm

    write_gguf(tmp_path / "i32.gguf", qwen2_tied[0])
    _patch_gguf_type(tmp_path / "i32.gguf", "blk.1.ffn_up.weight", GGMLQuantizationType.I32)  # F32's size
    with pytest.raises(WeightImportError, match=r"tensor blk.1.ffn_up.weight is of GGML type I32, which the installed "
                                                r"gguf package cannot dequantise .*pip install -U gguf"):
        load_llm(tmp_path / "i32.gguf")
    write_gguf(tmp_path / "new.gguf", qwen2_tied[0])
    _patch_gguf_type(tmp_path / "new.gguf", "blk.1.ffn_up.weight", 250)
    with pytest.raises(WeightImportError, match=r"new.gguf: tensor blk.1.ffn_up.weight is of GGML type id 250, which "
                                                r"the installed gguf package \(.*\) does not know: upgrade it"):
        load_llm(tmp_path / "new.gguf")


def test_a_gguf_of_another_architecture_is_named_before_its_tokenizer(qwen2_tied, whisper_dir, tmp_path, capsys):
    raw = bytearray(write_gguf(tmp_path / "llm.gguf", qwen2_tied[0]) and (tmp_path / "llm.gguf").read_bytes())
    at = raw.index(b"general.architecture") + len(b"general.architecture") + 4 + 8  # value type u32, length u64
    assert raw[at:at + 5] == b"qwen2"
    raw[at:at + 5] = b"llam2"
    (tmp_path / "llm.gguf").write_bytes(bytes(raw))
    code, err = _init_cli(capsys, "--encoder", str(whisper_dir), "--llm", str(tmp_path / "llm.gguf"), "--out",
                          str(tmp_path / "o"))
    assert code == 2  # it has no tokenizer either: that was what it was told (then, given one, its architecture)
    assert err[-1].endswith("llm.gguf is a GGUF of architecture 'llam2'; --llm needs a 'qwen2' model"), err


def test_a_gguf_tokenizer_without_merges_is_refused(qwen2_tied, tmp_path):
    import gguf

    from qwen2audio.checkpoint.importers.gguf_qwen2 import read_gguf
    from qwen2audio.checkpoint.importers.gguf_tokenizer import tokenizer_from_gguf

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightImportError, match=r"its tokenizer has no merges \(tokenizer.ggml.merges\): every text "
                                                r"would be split into single bytes"):
        tokenizer_from_gguf(read_gguf(tmp_path / "t.gguf"), tmp_path / "t.gguf")


def test_a_safetensors_file_whose_length_starts_like_a_pickle_is_not_taken_for_one(tmp_path):
    """One safetensors file in 256 has a header length whose first byte is 0x80, a pickle's first byte: it was
    read as an OpenAI .pt and called corrupt."""
    import struct

    from qwen2audio.checkpoint.importers import _encoder_kind

    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(0x80, b" ")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(WeightImportError, match="not a format this command reads"):
        _encoder_kind(tmp_path / "model.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert _encoder_kind(tmp_path / "legacy.pt") == "openai"


def test_a_damaged_encoder_is_named_before_the_llm_is_loaded(ct2_bin, qwen2_tied, tmp_path, monkeypatch):
    """The encoder was read after the whole LLM was dequantised: minutes, with a 7B, before a bad --encoder
    file was named."""
    from qwen2audio.checkpoint import importers
    from qwen2audio.errors import CheckpointError

    monkeypatch.setattr(importers, "load_llm", lambda *a, **k: pytest.fail("the LLM was loaded first"))
    cut = _cut_copy(ct2_bin, tmp_path / "model.bin", ct2_bin.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="model.bin is truncated"):
        init_checkpoint(cut, qwen2_tied[1], tmp_path / "o")


@pytest.mark.parametrize("form", ["hf", "gguf"])
def test_an_llm_that_cannot_fit_in_memory_is_refused_before_it_is_read(whisper_dir, qwen2_untied, tmp_path,
                                                                        monkeypatch, form):
    """init loads the whole LLM (a GGUF dequantised to float32): a 7B one in float32 on a 16-24 GB machine was
    ended part-way by the out-of-memory killer. Its size is checked from the files' headers first."""
    from qwen2audio.checkpoint import memory
    from qwen2audio.errors import NotEnoughMemory

    qwen2, llm_dir = qwen2_untied
    llm = llm_dir
    if form == "gguf":
        llm = tmp_path / "llm.gguf"
        write_gguf(llm, qwen2)
    params = sum(p.numel() for p in qwen2.parameters())
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(memory, "device_room", lambda device: memory.Room(params * 3))  # 2 bytes each fit, 4 do not
    loaded = []
    monkeypatch.setattr("qwen2audio.checkpoint.importers.load_llm", lambda *a, **k: loaded.append(a))
    with pytest.raises(NotEnoughMemory, match=rf"{llm.name} in float32 \(0\.00 B parameters\) takes .* load it in "
                                              r"bfloat16 with --dtype bfloat16"):
        init_checkpoint(whisper_dir, llm, tmp_path / "out", tokenizer=llm_dir / "tokenizer.json")
    assert not loaded and not (tmp_path / "out").exists()
    monkeypatch.undo()
    monkeypatch.setattr(memory, "device_room", lambda device: memory.Room(params * 3))
    report = init_checkpoint(whisper_dir, llm, tmp_path / "out", tokenizer=llm_dir / "tokenizer.json",
                             dtype="bfloat16")
    assert report.dtype == "bfloat16"
