"""The report generator of the model card: a ViT-L/14 image encoder and a small causal text decoder.

Reading order: ``ModelConfig`` and its named presets, the vision encoder, the text decoder, then
``CaptioningModel`` (loss, generation, checkpointing, init). Parameter/FLOP counts and the timm
mapping live in :mod:`lapvqa.pretrain.model_utils`; blocks in :mod:`lapvqa.pretrain.layers`;
greedy and beam search in :mod:`lapvqa.pretrain.generation`.

    from lapvqa.pretrain.model import CaptioningModel
    model = CaptioningModel()                          # the card: [B,3|1,384,384] -> [B,256,1024]
    model.load_state_dict(torch.load("model_best.pt", map_location="cpu"))
    vis_tokens = model.vision_encoder(images)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lapvqa.pretrain.layers import (
    LN_EPS, DecoderBlock, LayerCache, PatchEmbed, ViTBlock, adaptive_pool_matrix, run_blocks,
    set_checkpointing,
)

EOT = 50256  # GPT-2 <|endoftext|> (lapvqa.tokenizer.EOT); starts and ends every report, pads too
PIXEL_NORMS = ("channel", "pixel")
Checkpointing = Union[bool, int, tuple]  # all/none, the first n blocks, or explicit block indices


@dataclass
class ModelConfig:
    """Every size of the model. ``asdict(config)`` round-trips through JSON via ``from_dict``."""

    # vision encoder: pre-norm ViT, no class token, learned absolute positions
    image_size: int = 384  # the input size the model expects (the data pipeline resizes to it)
    patch_size: int = 14  # 384 // 14 = 27 -> 27x27 = 729 patches (the 6-px remainder is dropped, as timm)
    enc_width: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    enc_mlp: int = 4096
    pooled_grid: int = 16  # patch grid average-pooled (adaptively) to 16x16 = 256 visual tokens
    pixel_mean: tuple = (0.5, 0.5, 0.5)  # [0,1] pixels -> (x - mean) / std inside the encoder
    pixel_std: tuple = (0.5, 0.5, 0.5)
    # "channel": (x - pixel_mean) / pixel_std, timm's input. "pixel": per-pixel mean and std maps of
    # the training images (AlexNet's mean image), persistent buffers the trainer measures before
    # step 0. They centre every input pixel, which makes a raw-pixel patch projection learn far
    # faster (the tiny demo model); encoder_final.pt then holds the two maps besides timm's keys.
    pixel_norm: str = "channel"
    # text decoder: pre-norm, causal self-attention + cross-attention to the visual tokens
    dec_width: int = 512
    dec_depth: int = 6
    dec_heads: int = 8
    dec_mlp: int = 2048
    vocab_size: int = 50257  # GPT-2 BPE; input and output embeddings are tied
    max_positions: int = 512  # learned positions; tokens incl. both EOTs must fit
    eot_id: int = EOT
    # regularisation (dropout on residual branches and embeddings; attention itself has none)
    enc_dropout: float = 0.0
    dec_dropout: float = 0.1
    # activation memory: recompute these blocks in backward (bool, first-n int, or indices)
    enc_grad_checkpointing: Checkpointing = False
    dec_grad_checkpointing: Checkpointing = False
    init_std: float = 0.02
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for k in ("pixel_mean", "pixel_std"):
            setattr(self, k, tuple(float(x) for x in getattr(self, k)))
        for k in ("enc_grad_checkpointing", "dec_grad_checkpointing"):
            v = getattr(self, k)
            if isinstance(v, list):
                setattr(self, k, tuple(v))
        self.validate()

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(f"ModelConfig({self.name}): {msg}")
        need(self.enc_width % self.enc_heads == 0, "enc_width must be divisible by enc_heads")
        need(self.dec_width % self.dec_heads == 0, "dec_width must be divisible by dec_heads")
        need(self.image_size >= self.patch_size > 0, "patch_size must be in 1..image_size")
        need(0 < self.pooled_grid <= self.grid, f"pooled_grid must be in 1..{self.grid}")
        need(self.max_positions >= 3, "max_positions must hold EOT + a token + EOT")
        need(0 <= self.eot_id < self.vocab_size, "eot_id must be a vocabulary id")
        need(len(self.pixel_mean) == 3 and len(self.pixel_std) == 3, "pixel_mean/std need 3 values")
        need(min(self.pixel_std) > 0, "pixel_std must be positive")
        need(self.pixel_norm in PIXEL_NORMS, f"pixel_norm must be one of {', '.join(PIXEL_NORMS)}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def n_visual_tokens(self) -> int:
        return self.pooled_grid ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}")
        return cls(**d)


_PRESETS: dict[str, ModelConfig] = {}


def register_preset(name: str, config: ModelConfig) -> None:
    _PRESETS[name] = dataclasses.replace(config, name=name)


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_config(name: str = "card", **overrides) -> ModelConfig:
    """A named preset, optionally with some fields replaced (``get_config("tiny", dec_depth=1)``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(list_presets())}")
    return dataclasses.replace(_PRESETS[name], **overrides)


# The card: ViT-L/14 @ 384 px -> 27x27 patches pooled to 16x16; 6-layer 512-wide decoder.
register_preset("card", ModelConfig())
# Trains in minutes on 2 CPU cores: 128 px, 8x8 patches pooled to 4x4, 4+2 narrow layers.
register_preset("tiny", ModelConfig(
    image_size=128, patch_size=16, enc_width=128, enc_depth=4, enc_heads=4, enc_mlp=512,
    pooled_grid=4, dec_width=128, dec_depth=2, dec_heads=4, dec_mlp=512, max_positions=256,
    dec_dropout=0.0,
))


class VisionEncoder(nn.Module):
    """ViT whose parameter names are timm's (``VisionTransformer(class_token=False, global_pool='')``).

    ``forward(images)`` -> pooled visual tokens [B, pooled_grid², enc_width];
    ``forward_tokens(images)`` -> the patch tokens before pooling, as timm's ``forward_features``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_size, self.grid, self.pooled_grid = cfg.image_size, cfg.grid, cfg.pooled_grid
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.enc_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_patches, cfg.enc_width))
        self.pos_drop = nn.Dropout(cfg.enc_dropout)
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.enc_width, cfg.enc_heads, cfg.enc_mlp, cfg.enc_dropout)
            for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(cfg.enc_width, eps=LN_EPS)
        # Constants, not weights: kept out of the state_dict so it maps 1:1 onto timm.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pool", adaptive_pool_matrix(cfg.grid, cfg.pooled_grid), persistent=False)
        self.pixel_maps = cfg.pixel_norm == "pixel"
        if self.pixel_maps:  # measured on the training set (set_pixel_stats), saved with the weights
            size = (1, 1, cfg.image_size, cfg.image_size)
            self.register_buffer("pixel_mean_map", torch.full(size, cfg.pixel_mean[0]))
            self.register_buffer("pixel_std_map", torch.full(size, cfg.pixel_std[0]))

    @torch.no_grad()
    def set_pixel_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """pixel_norm="pixel": the per-pixel mean and std ([S, S], pixels in [0, 1]) to normalise with."""
        if not self.pixel_maps:
            raise ValueError('set_pixel_stats needs ModelConfig.pixel_norm="pixel"')
        self.pixel_mean_map.copy_(mean.view_as(self.pixel_mean_map))
        self.pixel_std_map.copy_(std.view_as(self.pixel_std_map))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0,255] or float [0,1], [B,3|1,H,W] -> normalised float [B,3,H,W] (timm's input)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B,3,H,W] or [B,1,H,W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} for this config, "
                             f"got {tuple(images.shape[-2:])}")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            x = images.float()
        else:
            raise ValueError(f"images must be uint8 or float in [0,1], got {images.dtype}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: the same pixels in every channel
        # fp32 arithmetic even when the module was cast to bf16 (pixel steps of 1/255 need it)
        if self.pixel_maps:  # [B, 3, S, S] - [1, 1, S, S]: the same map for every channel
            return (x - self.pixel_mean_map.float()) / self.pixel_std_map.float()
        return (x - self.pixel_mean.float()) / self.pixel_std.float()

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images).to(self.patch_embed.proj.weight.dtype)  # bf16 weights: bf16 input
        x = self.patch_embed(x)  # [B, N, C]
        x = self.pos_drop(x + self.pos_embed)
        x = run_blocks(self.blocks, x)
        return self.norm(x)  # [B, N, C]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(images)  # [B, N=g², C]
        if self.pooled_grid == self.grid:
            return x
        # [M, N] @ [B, N, C] -> [B, M, C]: adaptive average pooling of the g x g grid to p x p
        return torch.matmul(self.pool.to(x.dtype), x)


class TextDecoder(nn.Module):
    """GPT-2-style causal decoder with cross-attention; output projection tied to ``wte``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dec_width)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.dec_width)
        self.visual_proj = nn.Linear(cfg.enc_width, cfg.dec_width)
        self.drop = nn.Dropout(cfg.dec_dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.dec_width, cfg.dec_heads, cfg.dec_mlp, cfg.dec_dropout)
            for _ in range(cfg.dec_depth))
        self.ln_f = nn.LayerNorm(cfg.dec_width, eps=LN_EPS)

    def memory_kv(self, visual: torch.Tensor) -> list:
        """[B, M, enc_width] visual tokens -> per layer (k, v), each [B, H, M, D]; once per image."""
        mem = self.visual_proj(visual)  # [B, M, d]
        return [blk.cross_attn.memory_kv(mem) for blk in self.blocks]

    def forward(self, tokens, mem_kv, caches=None, start: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> final-normed hidden states [B, T, d]."""
        t = tokens.shape[1]
        if start + t > self.cfg.max_positions:
            raise ValueError(f"{start + t} token positions > max_positions={self.cfg.max_positions}")
        pos = torch.arange(start, start + t, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(pos))  # [B, T, d]
        use_ckpt = caches is None and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if use_ckpt and blk.grad_checkpoint:
                x = torch.utils.checkpoint.checkpoint(blk, x, mem_kv[i], use_reentrant=False)
            else:
                x = blk(x, mem_kv[i], None if caches is None else caches[i])
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.wte.weight)  # tied output embedding: [.., d] -> [.., V]

    def new_caches(self, batch: int, capacity: int, like: torch.Tensor) -> list[LayerCache]:
        c = self.cfg
        return [LayerCache.empty(batch, c.dec_heads, capacity, c.dec_width // c.dec_heads,
                                 device=like.device, dtype=like.dtype) for _ in self.blocks]


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of [n, V] logits (any dtype; log-softmax in fp32) vs [n] targets."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


class CaptioningModel(nn.Module):
    """Image -> report. ``CaptioningModel()`` is the card's architecture; see the module docstring."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else get_config("card")
        self.vision_encoder = VisionEncoder(self.config)
        self.decoder = TextDecoder(self.config)
        self.init_weights()
        self.set_grad_checkpointing(self.config.enc_grad_checkpointing,
                                    self.config.dec_grad_checkpointing)

    def forward(self, images, tokens, token_mask=None, *, return_logits=False, reduction="mean"):
        """Cross-entropy predicting tokens[:, 1:] where token_mask[:, 1:] (pads never count).

        tokens [B, T] int64 = EOT + report + EOT, right-padded; token_mask [B, T] bool, True on real
        positions (None: all real). reduction "mean" (over counted tokens) or "sum". With
        return_logits=True returns (loss, logits [B, T, V]).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64 [B, T>=2], got {tokens.dtype} {tuple(tokens.shape)}")
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} token rows")
        mem_kv = self.decoder.memory_kv(self.vision_encoder(images))
        hidden = self.decoder(tokens, mem_kv)  # [B, T, d]
        targets = tokens[:, 1:]
        if token_mask is not None:
            targets = targets.masked_fill(~token_mask[:, 1:].bool(), -100)  # -100 = not counted
        if return_logits:
            logits = self.decoder.logits(hidden)  # [B, T, V]
            loss = _ce_sum(logits[:, :-1].flatten(0, 1), targets.flatten())
        else:
            loss = self._real_token_loss(hidden[:, :-1].flatten(0, 1), targets.flatten(),
                                         gather=token_mask is not None)
        if reduction == "mean":
            loss = loss / (targets != -100).sum().clamp(min=1)  # an all-padding batch gives 0, not NaN
        return (loss, logits) if return_logits else loss

    def _real_token_loss(self, hidden: torch.Tensor, targets: torch.Tensor, gather: bool):
        """Summed CE of [B*(T-1), d] hidden states against targets (-100 = padding).

        The LM head (a [d, V] = [512, 50257] matmul) and the fp32 log-softmax over V run on the
        real positions only: padding is ~40% of a 192-token batch of MIMIC reports, and the fp32
        [n, V] logits are the largest activations of the decoder (1.2 GB at 32 x 192). Gathering
        them is one host sync (``nonzero``); the result equals the all-positions loss."""
        if gather:
            keep = (targets != -100).nonzero().squeeze(1)  # [n]
            hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
        return _ce_sum(self.decoder.logits(hidden), targets)

    def compile_blocks(self, **compile_kwargs) -> "CaptioningModel":
        """Regional ``torch.compile``: each encoder and decoder block in place (identical blocks
        share one compiled graph, so this compiles in seconds, not minutes). Parameter names and
        the state_dict are unchanged (timm mapping, checkpoints, DeepSpeed). Returns self."""
        for blk in (*self.vision_encoder.blocks, *self.decoder.blocks):
            blk.compile(**compile_kwargs)
        return self

    @torch.no_grad()
    def generate(self, images, max_new_tokens: int = 128, num_beams: int = 1,
                 length_penalty: float = 1.0, use_cache: bool = True) -> torch.Tensor:
        """Report token ids [B, L] (no leading EOT). Each row ends with EOT, then EOT padding,
        unless it ran to max_new_tokens. Greedy for num_beams=1, else batched beam search with
        hypothesis score = sum log p / length**length_penalty. Decode with lapvqa.tokenizer.decode."""
        from lapvqa.pretrain.generation import beam_search, greedy_search
        was_training = self.training
        self.eval()  # dropout off while generating; the mode is restored afterwards
        try:
            if num_beams <= 1:
                return greedy_search(self, images, max_new_tokens, use_cache=use_cache)
            return beam_search(self, images, max_new_tokens, num_beams, length_penalty,
                               use_cache=use_cache)
        finally:
            self.train(was_training)

    def set_grad_checkpointing(self, encoder: Checkpointing | None = None,
                               decoder: Checkpointing | None = None) -> None:
        """Recompute activations of these blocks in backward: True/False, first n, or indices."""
        if encoder is not None:
            set_checkpointing(self.vision_encoder.blocks, encoder)
        if decoder is not None:
            set_checkpointing(self.decoder.blocks, decoder)

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc-normal(std) for every Linear/Conv/Embedding/pos_embed, zero biases, unit LayerNorms;
        residual output projections (attn.proj, mlp.fc2, cross_attn.proj) get std/sqrt(#residual
        branches in their stack) as in GPT-2, so the residual stream's variance stays ~1 with depth.
        Also rebuilds the non-persistent constants (after ``to_empty`` from the meta device)."""
        c, std = self.config, self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        enc, dec = self.vision_encoder, self.decoder
        nn.init.trunc_normal_(enc.pos_embed, std=std, a=-2 * std, b=2 * std)
        for blocks, branches in ((enc.blocks, 2 * c.enc_depth), (dec.blocks, 3 * c.dec_depth)):
            for name, p in blocks.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                    s = std / math.sqrt(branches)
                    nn.init.trunc_normal_(p, std=s, a=-2 * s, b=2 * s)
        enc.pixel_mean.copy_(torch.tensor(c.pixel_mean).view(1, 3, 1, 1))
        enc.pixel_std.copy_(torch.tensor(c.pixel_std).view(1, 3, 1, 1))
        enc.pool.copy_(adaptive_pool_matrix(c.grid, c.pooled_grid))


# Re-exported so that ``from lapvqa.pretrain.model import count_parameters`` etc. work.
from lapvqa.pretrain.model_utils import (  # noqa: E402
    count_parameters, flops_per_sample, param_summary, timm_vit, to_timm_state_dict,
)

__all__ = [
    "EOT", "ModelConfig", "get_config", "list_presets", "register_preset", "VisionEncoder",
    "TextDecoder", "CaptioningModel", "count_parameters", "param_summary", "flops_per_sample",
    "timm_vit", "to_timm_state_dict",
]
