"""Inference-only weight layouts: the checkpoint loader returns the weights as stored, the Engine gives
them the CPU decoding layout once, and the numbers do not change."""

from __future__ import annotations

import pytest
import torch

from qwen2audio.checkpoint import load_model
from qwen2audio.generation import weights
from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from reference import TOKENIZER, clip, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["mha_untied_80", "gqa_tied_128"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(path)
    TOKENIZER.save(path)
    return path


def wide_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in weights.wide_linears(model)]


def test_the_loader_returns_the_weights_as_stored(checkpoint):
    """Training and saving get plain contiguous tensors: nothing to undo."""
    model = load_model(checkpoint)
    assert all(p.is_contiguous() for p in model.parameters())


def test_the_engine_stores_wide_cpu_weights_column_major_with_the_same_values(checkpoint):
    model = load_model(checkpoint)
    before = {id(w): w.detach().clone() for w in wide_weights(model)}
    lm = model.language_model
    n_wide = 2 * len(lm.model.layers) + (0 if lm.config.tie_word_embeddings else 1)
    assert len(before) == n_wide

    Engine(model, TOKENIZER)
    after = wide_weights(model)
    assert len(after) == n_wide
    for w, original in zip(after, before.values()):
        assert w.t().is_contiguous() and not w.is_contiguous()  # (out, in) stored column by column
        assert torch.equal(w, original)
    if lm.config.tie_word_embeddings:  # the shared embedding table keeps its rows
        assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.is_contiguous()


def test_greedy_tokens_do_not_depend_on_the_layout(checkpoint, monkeypatch):
    messages_audio = clip(3.0, 1)
    params = SamplingParams(max_new_tokens=24)

    def greedy(engine: Engine) -> list[int]:
        from qwen2audio.text import render_chat

        rendered = render_chat([{"role": "user", "content": [{"type": "audio", "audio": messages_audio},
                                                             {"type": "text", "text": "What is it?"}]}])
        return engine.generate([engine.prepare(rendered.text, rendered.audios)], params)[0].token_ids

    column_major = greedy(Engine(load_model(checkpoint), TOKENIZER))
    monkeypatch.setattr("qwen2audio.generation.engine.prepare_for_inference", lambda model: model)
    plain_engine = Engine(load_model(checkpoint), TOKENIZER)
    assert all(w.is_contiguous() for w in wide_weights(plain_engine.model))
    assert greedy(plain_engine) == column_major
    assert len(column_major) >= 8
