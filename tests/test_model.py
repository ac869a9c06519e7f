"""CaptioningModel: presets, shapes, loss semantics, causality, padding, timm mapping, counts."""

import dataclasses
import io
import json

import pytest
import torch
import torch.nn.functional as F

from lapvqa.pretrain.layers import adaptive_pool_matrix
from lapvqa.pretrain.model import (
    EOT, CaptioningModel, ModelConfig, count_parameters, flops_per_sample, get_config,
    list_presets, param_summary, timm_vit, to_timm_state_dict,
)
from lapvqa.pretrain.model_utils import from_timm_state_dict

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CaptioningModel(get_config("tiny")).eval()


def _images(cfg, b, seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, channels, cfg.image_size, cfg.image_size), generator=g,
                         dtype=torch.uint8)


def _batch(lengths, total, seed=1):
    """EOT + random report + EOT, right-padded with EOT; mask True on real positions."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), total), EOT, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, 1:n + 1] = torch.randint(0, EOT, (n,), generator=g)
        mask[i, :n + 2] = True
    return tokens, mask


def test_presets_and_config_round_trip():
    assert {"card", "tiny"} <= set(list_presets())
    card = get_config("card")
    assert (card.grid, card.n_patches, card.n_visual_tokens) == (27, 729, 256)
    assert CaptioningModel.__init__.__defaults__ == (None,)
    for name in list_presets():
        cfg = get_config(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert get_config("tiny", dec_depth=1).dec_depth == 1
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        get_config("tiny", enc_heads=3)
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"widht": 3})


@pytest.mark.parametrize("name", ["card", "tiny"])
def test_shapes_and_param_count_on_meta(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = CaptioningModel(cfg)
    counts = count_parameters(cfg)
    assert counts["vision_encoder"] == sum(p.numel() for p in model.vision_encoder.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert model.decoder.logits.__self__.wte.weight is model.decoder.wte.weight
    s = cfg.image_size
    for images in (torch.zeros(2, 3, s, s, device="meta"),
                   torch.zeros(2, 1, s, s, dtype=torch.uint8, device="meta")):
        vis = model.vision_encoder(images)
        assert vis.shape == (2, cfg.n_visual_tokens, cfg.enc_width)
    tokens = torch.zeros(2, 33, dtype=torch.long, device="meta")
    loss, logits = model(images, tokens, torch.ones_like(tokens, dtype=torch.bool), return_logits=True)
    assert loss.shape == () and logits.shape == (2, 33, 50257)


def test_card_numbers_pinned():
    cfg = get_config("card")
    assert (cfg.enc_depth, cfg.enc_width, cfg.enc_heads, cfg.enc_mlp) == (24, 1024, 16, 4096)
    assert (cfg.dec_depth, cfg.dec_width, cfg.dec_heads, cfg.vocab_size) == (6, 512, 8, 50257)
    assert count_parameters(cfg) == {"vision_encoder": 303_661_056, "decoder": 51_743_744,
                                     "total": 355_404_800}
    enc = flops_per_sample(cfg, text_len=1)["encoder"]
    assert abs(enc / 1.48e12 - 1) < 0.01  # the card's ~1.48 TFLOP per image (fwd+bwd)


def test_param_summary_matches(tiny):
    text = param_summary(tiny, print_fn=None)
    assert "matches" in text and "MISMATCH" not in text
    assert f"{count_parameters(tiny.config)['total']:,}" in text


def test_pool_matrix_is_adaptive_avg_pool():
    x = torch.randn(2, 27 * 27, 8, dtype=torch.float64)
    ours = adaptive_pool_matrix(27, 16).double() @ x  # [2, 256, 8]
    ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 8, 27, 27), 16)
    torch.testing.assert_close(ours, ref.flatten(2).transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_encoder_input_forms_agree(tiny):
    cfg = tiny.config
    gray = _images(cfg, 2)
    with torch.no_grad():
        ref = tiny.vision_encoder(gray)
        assert ref.shape == (2, 16, 128)
        torch.testing.assert_close(tiny.vision_encoder(gray.expand(-1, 3, -1, -1).clone()), ref,
                                   rtol=0, atol=0)
        torch.testing.assert_close(tiny.vision_encoder(gray.float() / 255), ref)
    s = cfg.image_size
    for bad, msg in ((torch.zeros(1, 2, s, s), "B,3,H,W"), (torch.zeros(1, 3, s + 1, s), "128x128"),
                     (torch.zeros(1, 1, s, s, dtype=torch.int32), "uint8 or float")):
        with pytest.raises(ValueError, match=msg):
            tiny.vision_encoder(bad)


def test_future_tokens_never_change_earlier_logits(tiny):
    images = _images(tiny.config, 2)
    tokens, mask = _batch([10, 10], 12)
    with torch.no_grad():
        _, a = tiny(images, tokens, mask, return_logits=True)
        changed = tokens.clone()
        changed[:, 6] = (changed[:, 6] + 1234) % EOT
        _, b = tiny(images, changed, mask, return_logits=True)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-3


def test_padding_never_changes_the_loss(tiny):
    images = _images(tiny.config, 3)
    tokens, mask = _batch([5, 9, 2], 11)
    with torch.no_grad():
        mean = tiny(images, tokens, mask)
        total = tiny(images, tokens, mask, reduction="sum")
        assert torch.allclose(total, mean * mask[:, 1:].sum(), rtol=1e-5)
        # longer padding filled with arbitrary (not EOT) ids: same loss
        long_tok = torch.cat([tokens, torch.randint(0, EOT, (3, 7))], 1)
        long_mask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1)
        long_tok[~long_mask] = torch.randint(0, EOT, (int((~long_mask).sum()),))
        torch.testing.assert_close(tiny(images, long_tok, long_mask), mean, rtol=1e-5, atol=1e-6)
        # the batch "sum" is the sum of each sample's own "sum"
        each = sum(tiny(images[i:i + 1], tokens[i:i + 1, :n + 2], reduction="sum")
                   for i, n in enumerate([5, 9, 2]))
        torch.testing.assert_close(total, each, rtol=1e-5, atol=1e-5)
        empty = tiny(images, tokens, torch.zeros_like(mask))
        assert empty.item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        tiny(images, tokens, mask, reduction="none")
    with pytest.raises(ValueError, match="max_positions"):
        tiny(images, torch.full((3, 300), EOT))


def test_grad_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    plain = CaptioningModel(get_config("tiny"))
    ckpt = CaptioningModel(get_config("tiny", enc_grad_checkpointing=(0, 2), dec_grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    assert [b.grad_checkpoint for b in ckpt.vision_encoder.blocks] == [True, False, True, False]
    images, (tokens, mask) = _images(plain.config, 2), _batch([6, 4], 8)
    for m in (plain, ckpt):
        m(images, tokens, mask).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    ckpt.set_grad_checkpointing(encoder=1, decoder=[1])
    assert [b.grad_checkpoint for b in ckpt.decoder.blocks] == [False, True]
    with pytest.raises(ValueError, match="out of range"):
        ckpt.set_grad_checkpointing(encoder=[7])


def test_init_is_documented_scheme():
    cfg = get_config("tiny", enc_depth=8, enc_width=256, enc_mlp=1024)
    model = CaptioningModel(cfg)
    blk = model.vision_encoder.blocks[0]
    assert blk.attn.qkv.bias.abs().max() == 0 and blk.norm1.weight.eq(1).all()
    q_std, proj_std = blk.attn.qkv.weight.std().item(), blk.attn.proj.weight.std().item()
    assert 0.015 < q_std < 0.02  # trunc-normal(0.02) cut at 2 sigma has std 0.0176
    assert abs(proj_std / q_std - 1 / 4) < 0.05  # residual projections: / sqrt(2 * depth = 16)


def test_state_dicts_load_like_the_card_says(tiny):
    buf = io.BytesIO()
    torch.save(tiny.state_dict(), buf)
    enc_buf = io.BytesIO()
    torch.save(tiny.vision_encoder.state_dict(), enc_buf)
    fresh = CaptioningModel(get_config("tiny")).eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True))
    fresh.vision_encoder.load_state_dict(torch.load(io.BytesIO(enc_buf.getvalue()), map_location="cpu"))
    assert not any(k.endswith(("pool", "pixel_mean", "pixel_std")) for k in tiny.state_dict())
    images, (tokens, mask) = _images(tiny.config, 2), _batch([3, 4], 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images, tokens, mask), tiny(images, tokens, mask))


def test_encoder_weights_load_into_stock_timm(tiny):
    cfg = tiny.config
    vit = timm_vit(cfg).eval()
    vit.load_state_dict(to_timm_state_dict(tiny.state_dict()), strict=True)
    images = _images(cfg, 2, channels=3)
    with torch.no_grad():
        ours = tiny.vision_encoder.forward_tokens(images)
        theirs = vit.forward_features(tiny.vision_encoder.normalize(images))
    assert theirs.shape == (2, cfg.n_patches, cfg.enc_width)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    back = from_timm_state_dict(vit.state_dict())
    assert set(back) == set(tiny.vision_encoder.state_dict())
    assert vit.pretrained_cfg["mean"] == cfg.pixel_mean


def test_pixel_norm_maps_are_saved_used_and_kept_out_of_timm():
    cfg = get_config("tiny", image_size=32, patch_size=16, pooled_grid=2, pixel_norm="pixel")
    torch.manual_seed(0)
    model = CaptioningModel(cfg).eval()
    enc = model.vision_encoder
    images = _images(cfg, 2)
    # until measured, the maps are the channel constants: the same input as pixel_norm="channel"
    torch.testing.assert_close(enc.normalize(images), (images.float().expand(-1, 3, -1, -1) / 255 - 0.5) / 0.5)
    g = torch.Generator().manual_seed(3)
    mean, std = torch.rand(32, 32, generator=g), 0.1 + torch.rand(32, 32, generator=g)
    enc.set_pixel_stats(mean, std)
    want = (images.float() / 255 - mean) / std  # [2, 1, 32, 32], the same for every channel
    torch.testing.assert_close(enc.normalize(images), want.expand(-1, 3, -1, -1))
    state = model.state_dict()
    assert torch.equal(state["vision_encoder.pixel_mean_map"][0, 0], mean)
    fresh = CaptioningModel(cfg).eval()
    fresh.vision_encoder.load_state_dict(torch.load(_saved(enc.state_dict()), weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh.vision_encoder(images), enc(images))
    timm_sd = to_timm_state_dict(state)
    assert "pixel_mean_map" not in timm_sd and "pixel_std_map" not in timm_sd
    timm_vit(cfg).load_state_dict(timm_sd, strict=True)
    with pytest.raises(ValueError, match="pixel_norm must be one of channel, pixel"):
        get_config("tiny", pixel_norm="image")
    with pytest.raises(ValueError, match="pixel_norm"):
        CaptioningModel(get_config("tiny")).vision_encoder.set_pixel_stats(mean, std)


def _saved(state: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_dataclass_is_json_friendly_for_checkpoints():
    d = dataclasses.asdict(get_config("card", enc_grad_checkpointing=[0, 1]))
    assert json.loads(json.dumps(d))["enc_grad_checkpointing"] == [0, 1]
    assert ModelConfig.from_dict(json.loads(json.dumps(d))).enc_grad_checkpointing == (0, 1)


def test_bf16_weights_as_deepspeed_runs_them(tiny):
    """DeepSpeed bf16 casts the whole module: uint8 images must still work, loss close to fp32."""
    model = CaptioningModel(get_config("tiny")).eval()
    model.load_state_dict(tiny.state_dict())
    images, (tokens, mask) = _images(tiny.config, 2), _batch([6, 3], 8)
    with torch.no_grad():
        ref = tiny(images, tokens, mask)
    model.to(torch.bfloat16)
    loss = model(images, tokens, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert model.vision_encoder(images).dtype == torch.bfloat16
    assert model.generate(images, max_new_tokens=3, num_beams=2).shape == (2, 3)


def test_real_token_loss_equals_all_positions_loss():
    """The LM head runs on real targets only; loss and every gradient equal the all-positions path
    (which return_logits=True still takes)."""
    torch.manual_seed(0)
    model = CaptioningModel(get_config("tiny"))
    images, (tokens, mask) = _images(model.config, 3), _batch([5, 9, 0], 12)
    for reduction in ("mean", "sum"):
        grads = []
        for logits in (False, True):
            model.zero_grad(set_to_none=True)
            out = model(images, tokens, mask, reduction=reduction, return_logits=logits)
            loss = out[0] if logits else out
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
        for (name, _), a, b in zip(model.named_parameters(), grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_compile_blocks_traces_whole_blocks_and_keeps_names():
    """Regional compilation (what benchmarks/model.py --variants compile:... measures): every
    block traces as one graph (fullgraph: no graph breaks, e.g. in lapvqa.ops.attention), the
    loss is unchanged, the state_dict keeps timm's names. backend="eager" checks the tracing
    without a C++/CUDA toolchain."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CaptioningModel(get_config("tiny"))
    images, (tokens, mask) = _images(model.config, 2), _batch([6, 3], 8)
    ref = model(images, tokens, mask)
    keys = list(model.state_dict())
    assert model.compile_blocks(backend="eager", fullgraph=True) is model
    loss = model(images, tokens, mask)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    assert list(model.state_dict()) == keys
    assert all(p.grad is not None for p in model.parameters())
