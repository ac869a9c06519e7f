"""Closed-form parameter and FLOP counts, a parameter table, and the timm mapping of the encoder.

Nothing here imports the model module: the counts work from a ``ModelConfig`` alone.
"""

from __future__ import annotations

from typing import Callable


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def count_parameters(config) -> dict[str, int]:
    """Exact parameter counts of ``CaptioningModel(config)`` from its sizes (tied embedding once).

    Returns {"vision_encoder", "decoder", "total"}; card: 303.7M + 51.9M = 355.6M.
    """
    c = config
    C, M, d, m = c.enc_width, c.enc_mlp, c.dec_width, c.dec_mlp
    ln_c, ln_d = 2 * C, 2 * d
    enc_block = ln_c + _linear(C, 3 * C) + _linear(C, C) + ln_c + _linear(C, M) + _linear(M, C)
    enc = (3 * c.patch_size ** 2 * C + C          # patch_embed.proj (conv)
           + c.n_patches * C                        # pos_embed
           + c.enc_depth * enc_block + ln_c)        # blocks, final norm
    dec_block = (ln_d + _linear(d, 3 * d) + _linear(d, d)                       # self-attention
                 + ln_d + _linear(d, d) + _linear(d, 2 * d) + _linear(d, d)     # cross-attention
                 + ln_d + _linear(d, m) + _linear(m, d))                        # MLP
    dec = (c.vocab_size * d + c.max_positions * d   # wte (also the output layer), wpe
           + _linear(C, d)                          # visual_proj
           + c.dec_depth * dec_block + ln_d)        # blocks, ln_f
    return {"vision_encoder": enc, "decoder": dec, "total": enc + dec}


def flops_per_sample(config, text_len: int, *, training: bool = True) -> dict[str, float]:
    """Analytical matmul FLOPs (1 multiply-add = 2 FLOPs) per image-report pair.

    Counts every matmul of the forward pass: patch embedding, qkv/out/MLP projections, attention
    scores and weighted sums (the causal self-attention counts only its visible half), pooling,
    cross-attention keys/values, the tied LM head on all ``text_len`` positions (the training
    step computes logits on padding too). ``training`` multiplies by 3 (backward = 2x forward).
    Not counted: norms, softmax, GELU, the loss, the optimizer, checkpointing's recomputation
    (so this is model FLOPs, i.e. MFU, not hardware FLOPs). Card, 384 px: encoder 0.494 TFLOP
    forward, 1.48 TFLOP forward+backward per image.
    """
    c, T = config, text_len
    C, N, P = c.enc_width, c.n_patches, c.n_visual_tokens
    d, V = c.dec_width, c.vocab_size
    enc = 2 * N * (3 * c.patch_size ** 2) * C
    enc += c.enc_depth * (2 * N * (4 * C * C + 2 * C * c.enc_mlp) + 4 * N * N * C)
    if c.pooled_grid != c.grid:
        enc += 2 * P * N * C
    causal_pairs = T * (T + 1) / 2
    dec = 2 * P * C * d  # visual_proj
    dec += c.dec_depth * (
        2 * P * 2 * d * d                                   # cross-attention k, v of the image
        + 2 * T * (3 * d * d + d * d)                       # self-attention qkv, proj
        + 2 * T * (2 * d * d)                               # cross-attention q, proj
        + 2 * T * 2 * d * c.dec_mlp                         # MLP
        + 4 * causal_pairs * d + 4 * T * P * d)             # attention scores + weighted sums
    dec += 2 * T * d * V  # tied LM head
    k = 3.0 if training else 1.0
    return {"encoder": k * enc, "decoder": k * dec, "total": k * (enc + dec)}


def param_summary(model, print_fn: Callable[[str], None] | None = print) -> str:
    """A table of parameters per sub-module, checked against :func:`count_parameters`."""
    rows = []
    for top_name, top in model.named_children():
        for name, child in list(top.named_children()) + [
                (n, p) for n, p in top.named_parameters(recurse=False)]:
            n = child.numel() if hasattr(child, "numel") else sum(p.numel() for p in child.parameters())
            if n:
                rows.append((f"{top_name}.{name}", n))
        rows.append((f"{top_name} (total)", sum(p.numel() for p in top.parameters())))
    total = sum(p.numel() for p in model.parameters())  # the tied wte/LM head counted once
    expected = count_parameters(model.config)["total"]
    rows.append(("total", total))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {n:>13,}  {n / 1e6:9.2f}M" for name, n in rows]
    lines.append(f"closed form {expected:,}: {'matches' if expected == total else 'MISMATCH'}")
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text


def timm_vit(config, **kwargs):
    """A stock timm ``VisionTransformer`` with the encoder's architecture (no pooling, no head).

    Load our weights with ``vit.load_state_dict(to_timm_state_dict(encoder_sd))``; feed it
    images already normalised as ``VisionEncoder.normalize`` does (mean/std in pretrained_cfg).
    ``vit.forward_features(x)`` then equals ``VisionEncoder.forward_tokens`` (before pooling).
    """
    from timm.models.vision_transformer import VisionTransformer
    c = config
    ratio = c.enc_mlp / c.enc_width
    if int(c.enc_width * ratio) != c.enc_mlp:
        raise ValueError(f"enc_mlp={c.enc_mlp} is not expressible as timm's mlp_ratio")
    vit = VisionTransformer(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.enc_width, depth=c.enc_depth,
        num_heads=c.enc_heads, mlp_ratio=ratio, qkv_bias=True, class_token=False, global_pool="",
        num_classes=0, **kwargs)
    vit.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", None) or {}, input_size=(3, c.image_size, c.image_size),
                              mean=tuple(c.pixel_mean), std=tuple(c.pixel_std))
    return vit


_PREFIX = "vision_encoder."
PIXEL_MAP_KEYS = ("pixel_mean_map", "pixel_std_map")  # VisionEncoder buffers (pixel_norm="pixel")


def to_timm_state_dict(state_dict: dict) -> dict:
    """Encoder weights (``encoder_final.pt``, or a full ``model_best.pt``) -> timm's key names.

    The encoder already uses timm's names, so this only selects the encoder's tensors. The
    ``pixel_norm="pixel"`` maps are input normalisation, not timm weights: they are left out
    (normalise with them before ``forward_features``, as ``VisionEncoder.normalize`` does).
    """
    if any(k.startswith(_PREFIX) for k in state_dict):
        state_dict = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    return {k: v for k, v in state_dict.items() if k not in PIXEL_MAP_KEYS}


def from_timm_state_dict(state_dict: dict) -> dict:
    """timm ``VisionTransformer(class_token=False, num_classes=0)`` weights -> ``VisionEncoder``."""
    skip = ("head.", "fc_norm.", "cls_token", "reg_token", "attn_pool.")
    return {k: v for k, v in state_dict.items() if not k.startswith(skip)}
