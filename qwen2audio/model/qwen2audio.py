"""Qwen2-Audio assembled: audio encoder -> projector -> audio vectors placed at the <|AUDIO|> tokens of
a Qwen2 decoder's input. Module names follow the checkpoint keys (audio_tower, multi_modal_projector,
language_model), so a state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..audio.features import MIN_SAMPLES, SAMPLE_RATE, num_valid_frames
from ..config import Qwen2AudioConfig
from .encoder import AudioEncoder, encoder_input_frames
from .llm import Qwen2ForCausalLM, padded_causal_mask

MIN_FRAMES = num_valid_frames(MIN_SAMPLES)  # 3 mel frames: one audio token

IGNORE_INDEX = -100  # a label that is not trained on (prompt, audio, padding), as in PyTorch and HF


class MultiModalProjector(nn.Module):
    """Linear(d_model -> hidden_size) from encoder vectors to the decoder's embedding space."""

    def __init__(self, cfg: Qwen2AudioConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.audio.d_model, cfg.text.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Qwen2AudioModel(nn.Module):
    def __init__(self, cfg: Qwen2AudioConfig):
        super().__init__()
        self.config = cfg
        self.audio_tower = AudioEncoder(cfg.audio)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = Qwen2ForCausalLM(cfg.text)
        # Under FSDP every rank must run the same sharded layers in every forward (each gathers its weights
        # collectively): training.distributed.wrap sets what a batch without audio then runs on a silent
        # window, its vectors counting for nothing (0 x their sum): "encoder" (the encoder and the projector)
        # or "projector" (the projector alone, where the encoder's outputs come from a cache); None: nothing.
        self.idle_audio: str | None = None

    def tie_weights(self) -> None:
        """Re-tie a tied LM head to the embedding (see ``Qwen2ForCausalLM.tie_weights``)."""
        self.language_model.tie_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def encode_audio(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Log-mel windows (B, n_mels, T) and valid frames (B,) -> one (n_tokens_i, hidden) tensor per window."""
        return self.project_states(*self.encoder_states(features, frame_lengths))

    def encoder_states(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel windows (B, n_mels, T) and valid frames (B,) -> the encoder's pooled outputs (B, N, d_model)
        and their token counts (B,): the audio before the projector."""
        frame_lengths = frame_lengths.to(torch.long).cpu()
        if bool((frame_lengths < MIN_FRAMES).any()):
            short = [i for i, n in enumerate(frame_lengths.tolist()) if n < MIN_FRAMES]
            raise ValueError(f"audio window(s) {short} have fewer than {MIN_FRAMES} mel frames: a clip needs at least "
                             f"{MIN_SAMPLES} samples ({1000 * MIN_SAMPLES / SAMPLE_RATE:.1f} ms) to make one audio "
                             "token; load audio with qwen2audio.audio.load_audio, which refuses shorter clips")
        T = encoder_input_frames(int(frame_lengths.max()), self.audio_tower.max_mel_frames)
        return self.audio_tower(features[:, :, :T].to(self.device), frame_lengths)

    def project_states(self, states: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs computed earlier (B, N, d_model) with their token counts (B,) -> one
        (n_tokens_i, hidden) tensor per window: the projector alone (a frozen encoder's states can be
        computed once per clip and kept)."""
        weight = self.multi_modal_projector.linear.weight
        projected = self.multi_modal_projector(states.to(device=weight.device, dtype=weight.dtype))  # (B, N, hidden)
        return [projected[i, : int(n)] for i, n in enumerate(lengths.tolist())]

    def embed(self, input_ids: torch.Tensor, audio_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings (B, T, hidden) with the <|AUDIO|> positions replaced by audio vectors.

        ``audio_embeds`` are taken in reading order (row by row, left to right); their total length
        must equal the number of <|AUDIO|> tokens.
        """
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_audio = input_ids == self.config.audio_token_index
        n_slots = int(is_audio.sum())
        n_vectors = sum(int(a.shape[0]) for a in audio_embeds or [])
        if n_slots != n_vectors:
            raise ValueError(
                f"the prompt has {n_slots} <|AUDIO|> tokens but the audio gives {n_vectors} vectors: "
                "expand each <|AUDIO|> placeholder to its clip's audio_token_count (qwen2audio.text.chat)"
            )
        if n_slots:
            vectors = torch.cat(list(audio_embeds), dim=0).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_audio[..., None], vectors)
        return embeds

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor | None = None,
                frame_lengths: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, audio_states: torch.Tensor | None = None,
                audio_lengths: torch.Tensor | None = None, audio_only: bool = False) -> torch.Tensor:
        """Full-sequence logits (B, T, vocab), no cache: for training and for checking against a reference.

        input_ids (B, T) with expanded <|AUDIO|> runs; features (n_clips, n_mels, frames) and
        frame_lengths (n_clips,) for the clips in reading order — or, instead, the encoder's outputs
        for them, audio_states (n_clips, N, d_model) with audio_lengths (n_clips,) tokens each;
        attention_mask (B, T) 1 for real tokens (left or right padding).

        With ``labels`` (B, T) (token ids, IGNORE_INDEX where not trained), returns instead the float32
        log-probabilities (B, T) of each label given the tokens before it (0 where ignored and at
        t = 0). Only the labelled positions go through the LM head, so the (B, T, vocab) logits are
        never built: training with a 150k vocabulary needs this.

        With ``audio_only``, returns instead the audio vectors of all clips, concatenated in reading order
        (n_vectors, hidden), without running the LLM (what the align stage trains, through a DDP wrapper).
        """
        if audio_states is not None:
            audio = self.project_states(audio_states, audio_lengths)
        else:
            audio = self.encode_audio(features, frame_lengths) if features is not None else None
        idle = self._idle_audio() if audio is None and self.idle_audio is not None else None
        if audio_only:
            if audio is None:
                raise ValueError("audio_only needs audio: features with frame_lengths, or audio_states with "
                                 "audio_lengths")
            return torch.cat(audio, dim=0)
        embeds = self.embed(input_ids, audio)
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            mask = None
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = padded_causal_mask(attention_mask, input_ids.shape[1])
        hidden = self.language_model.hidden_states(embeds, positions, mask)
        out = self._label_logprobs(hidden, labels) if labels is not None else self.language_model.logits(hidden)
        return out if idle is None else out + idle

    def _idle_audio(self) -> torch.Tensor:
        """0 x the audio vectors of a silent shortest window: a zero that ran (and back-propagates through)
        the encoder and the projector (``idle_audio`` "encoder") or the projector alone ("projector"), for a
        batch without audio where every forward must run them."""
        if self.idle_audio == "projector":
            states = torch.zeros(1, 1, self.config.audio.d_model, device=self.device)
            [vectors] = self.project_states(states, torch.tensor([1]))
        else:
            features = torch.zeros(1, self.config.audio.num_mel_bins, MIN_FRAMES, device=self.device)
            [vectors] = self.encode_audio(features, torch.tensor([MIN_FRAMES]))
        return 0.0 * vectors.float().sum()

    def _label_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, hidden), labels (B, T) -> log p(labels[:, t] | tokens < t) as (B, T) float32."""
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t + 1
        keep = targets != IGNORE_INDEX  # (B, T-1)
        logits = self.language_model.logits(hidden[:, :-1][keep]).float()  # (N, vocab), N labelled tokens
        picked = -F.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
        out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)  # (B, T)
        out[:, 1:] = out[:, 1:].masked_scatter(keep, picked)
        return out
