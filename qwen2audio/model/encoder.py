"""The Whisper-style audio encoder of Qwen2-Audio, with its 2x average pool and final LayerNorm.

Input: log-mel features (B, n_mels, T) and the number of valid mel frames per clip. Output: one
vector per 40 ms of valid audio. Only the valid part of each clip is computed: the reference runs
every clip as a full 30 s window and masks the padded keys; the valid outputs are the same, because a
valid output never depends on padded frames beyond the two that the convolutions see (and those are
kept, see ``encoder_input_frames``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..audio.features import audio_token_count, encoder_frame_count
from ..config import EncoderConfig
from .llm import Embedding

CONV_RECEPTIVE_MARGIN = 2  # mel frames past the last valid one that the two k=3 convs read


def encoder_input_frames(n_frames: int, max_frames: int) -> int:
    """How many mel frames the encoder needs to compute the outputs of ``n_frames`` valid frames."""
    return min(n_frames + CONV_RECEPTIVE_MARGIN, max_frames)


class EncoderAttention(nn.Module):
    """Bidirectional multi-head attention; q/v/out have a bias, k has none (as in Whisper)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.encoder_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = (p(x).view(B, S, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


FP16_CLAMP = torch.finfo(torch.float16).max - 1000  # the reference's bound for each layer's float16 output


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self_attn = EncoderAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as the reference: a float16 overflow saturates instead of turning inf
            x = x.clamp(-FP16_CLAMP, FP16_CLAMP)
        return x


class AudioEncoder(nn.Module):
    """conv1 -> GELU -> conv2 (stride 2) -> GELU -> + positions -> blocks -> AvgPool(2) -> LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = Embedding(cfg.max_source_positions, d)
        self.embed_positions.requires_grad_(False)  # fixed sinusoids stored in the checkpoint
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False  # training: recompute each layer in backward to save memory

    @property
    def max_mel_frames(self) -> int:
        return self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T) with T <= 3000, frame_lengths (B,) valid mel frames per clip.

        Returns (B, N, d_model) pooled states, N = the largest token count, and the token counts (B,).
        Rows past a clip's own count are padding and must be ignored.
        """
        B, n_mels, T = features.shape
        if n_mels != self.config.num_mel_bins:
            raise ValueError(f"the encoder expects {self.config.num_mel_bins} mel bins, got {n_mels}: "
                             "compute features with the checkpoint's num_mel_bins")
        if T > self.max_mel_frames:
            raise ValueError(f"{T} mel frames is more than one {self.max_mel_frames}-frame window; split long audio first")
        frame_lengths = frame_lengths.to(torch.long)
        enc_lengths = encoder_frame_count(frame_lengths)  # (B,) frames after conv2, 20 ms each
        S = int(enc_lengths.max())
        x = features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # (B, d, ceil(T/2))
        x = x[:, :, :S].transpose(1, 2)  # (B, S, d)
        x = x + self.embed_positions.weight[:S]
        key_mask = None
        if bool((enc_lengths != S).any()):
            key_mask = (torch.arange(S, device=x.device) < enc_lengths.to(x.device)[:, None])[:, None, None, :]
            # (B, 1, 1, S): True where the key is a valid frame
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, key_mask, use_reentrant=False) if recompute else layer(x, key_mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, S//2, d), 40 ms each
        return self.layer_norm(x), audio_token_count(frame_lengths)
