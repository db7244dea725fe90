"""The Qwen2 decoder: RMSNorm, rotate-half RoPE, grouped-query attention with q/k/v bias, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from .kv_cache import ChunkWrite, KVCache, StepWrite


class Embedding(nn.Embedding):
    """nn.Embedding that draws no random table when built on the ``meta`` device, as the checkpoint loader
    builds a model before it assigns the stored weights: torch initialises a meta tensor through its
    reference kernels, whose first call imports torch._dynamo (1.4-2.1 s of a 3-5 s load, for a table that
    is thrown away)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, then cast back before the weight, as the reference does.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for integer positions (B, T) -> each (B, 1, T, head_dim), computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (B, nh, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_mask(n_cached: int, T: int, device) -> torch.Tensor:
    """(1, 1, T, n_cached + T) boolean mask: new token t sees the cache and new tokens up to itself."""
    q = torch.arange(T, device=device)[:, None] + n_cached
    return (torch.arange(n_cached + T, device=device)[None, :] <= q)[None, None]


def padded_causal_mask(key_valid: torch.Tensor, T: int) -> torch.Tensor:
    """Mask for the last T of S positions, given which keys are real (B, S) -> (B, 1, T, S) boolean.

    A query sees the real keys up to itself; a padding query also sees itself, so that no row of the
    softmax is empty (its output is never used).
    """
    B, S = key_valid.shape
    mask = causal_mask(S - T, T, key_valid.device) & key_valid.bool()[:, None, None, :]
    diag = torch.arange(S, device=key_valid.device)[None, :] == (torch.arange(T, device=key_valid.device)[:, None] + S - T)
    return mask | diag[None, None]


def kv_cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a KV cache keeps for a model in ``dtype``: float32 for half precision on a CPU, where
    torch's attention in bfloat16 took 888 us for one query over 840 cached positions against 137 us in
    float32 (20 ms of a 0.5B model's 80 ms decoding step); otherwise the model's dtype."""
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hs, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hs, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hs, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.hs, cfg.hidden_size, bias=False)
        # Inference-only, set by the generation engine where it has them (generation/weights.py): q, k and
        # v as one product (qkv: hidden -> (n_heads + 2 n_kv) x hs; q_proj, k_proj, v_proj are then
        # None); RoPE on q and k in place, rope(q, k, cos, sin); an attention for one new token per row
        # over a float32 cache, attend(q, k, v, mask (B, S), scale).
        self.qkv = None
        self.rope = None
        self.decode_attention = None

    def forward(self, x, cos, sin, mask, cache: ChunkWrite | StepWrite | None, layer: int,
                keep: int | None = None) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden), or with ``keep`` the output of the last ``keep`` positions
        alone (B, keep, hidden): every position's keys and values are still computed and cached."""
        B, T, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split((self.n_heads * self.hs, self.n_kv * self.hs, self.n_kv * self.hs), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if (self.rope is not None and not torch.is_grad_enabled() and q.device.type == "cpu" and q.dtype == cos.dtype
                and q.dtype in (torch.float32, torch.bfloat16)):  # the kernel's dtypes; float16 in torch
            self.rope(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs), S = the cached positions read
        if keep is not None and keep < T:  # the queries of the last `keep` positions only
            q = q[:, :, T - keep:]
            if mask is not None:
                mask = mask[:, :, -keep:]
            elif keep > 1:  # SDPA's is_causal aligns a shorter query block to the first keys, not the last
                mask = causal_mask(k.shape[2] - keep, keep, q.device)
            T = keep
        causal = mask is None and T > 1 and k.shape[2] == T
        if (T == 1 and self.decode_attention is not None and k.dtype == torch.float32
                and k.device.type == "cpu" and not torch.is_grad_enabled()):
            keys_mask = None if mask is None else mask.expand(B, 1, 1, k.shape[2]).reshape(B, k.shape[2])
            y = self.decode_attention(q.float(), k, v, keys_mask, self.hs ** -0.5).to(x.dtype)
        else:  # the cache may hold keys and values in another dtype than the layer's (kv_cache_dtype)
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_kv != self.n_heads).to(x.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # Inference-only (generation/weights.py): gate and up as one product (gate_proj, up_proj then None).
        self.gate_up = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, keep: int | None = None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, keep)
        if keep is not None:
            x = x[:, x.shape[1] - keep:]
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers and the final norm (checkpoint prefix ``language_model.model``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """The decoder with its LM head (checkpoint prefix ``language_model``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # training: recompute each layer in backward to save memory
        self.tie_weights()

    def new_cache(self, max_slots: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """A pool of ``max_slots`` sequences of up to ``max_len`` positions (storage grows on demand)."""
        w = self.model.embed_tokens.weight
        c = self.config
        device = device or w.device
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_slots, max_len,
                       dtype or kv_cache_dtype(w.dtype, device), device)

    def hidden_states(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                      cache: ChunkWrite | StepWrite | None = None, keep_last: int | None = None) -> torch.Tensor:
        """embeds (B, T, hidden), positions (B, T) -> final-normed hidden states (B, T, hidden).

        ``mask`` is a boolean (B, 1, T, S) "may attend" mask over the S keys attention sees (the cached
        ones a ``cache`` writer returns, new ones included), or None for plain causal attention over the
        T new positions alone. With a cache writer, each layer's new keys and values are written into
        the KV cache where the writer says (``KVCache.chunk`` / ``KVCache.step``).

        ``keep_last=n`` returns the last n positions' states alone (B, n, hidden): the last layer then runs
        its queries, output projection and MLP on those n rows only, as a prefill that needs the next
        token's logits and the cache (not the other positions' outputs) can (1/num_layers of the work).
        """
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        x = embeds
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, keep_last if i == last else None)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make the LM head the embedding's Parameter: one tensor, two names.

        Call it again after ``load_state_dict(..., assign=True)``, which gives each name its own tensor.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
