"""Generation: the KV cache equals full recomputation; a tiny model overfits and reproduces reports."""

import pytest
import torch

from lapvqa.pretrain.model import EOT, CaptioningModel, get_config
from lapvqa.tokenizer import decode, encode

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield

REPORTS = ["Heart size is enlarged.", "No acute cardiopulmonary process.",
           "Small left pleural effusion with blunting of the costophrenic angle."]


def test_kv_cached_decoder_equals_full_forward():
    torch.manual_seed(0)
    model = CaptioningModel(get_config("tiny")).eval()
    images = torch.rand(2, 1, 128, 128)
    tokens = torch.randint(0, EOT, (2, 9))
    with torch.no_grad():
        mem = model.decoder.memory_kv(model.vision_encoder(images))
        full = model.decoder(tokens, mem)  # [2, 9, d]
        caches = model.decoder.new_caches(2, 9, like=full)
        steps = [model.decoder(tokens[:, :4], mem, caches, start=0)]  # a 4-token prefill, then 1 by 1
        steps += [model.decoder(tokens[:, t:t + 1], mem, caches, start=t) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds"):
        model.decoder(tokens[:, :1], mem, caches, start=8)


@pytest.fixture(scope="module")
def overfit():
    """Three distinct images, three reports; trained until it has memorised them."""
    torch.manual_seed(0)
    model = CaptioningModel(get_config("tiny"))
    images = torch.randint(0, 256, (3, 1, 128, 128), dtype=torch.uint8)
    ids = [[EOT] + encode(r) + [EOT] for r in REPORTS]
    tokens = torch.full((3, max(map(len, ids))), EOT)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = model(images, tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.04:
            break
    return model.eval(), images, losses


def test_tiny_model_overfits_one_batch(overfit):
    _, _, losses = overfit
    assert losses[0] > 8.0 and losses[-1] < 0.05, (losses[0], losses[-1])


def test_greedy_reproduces_reports_cached_equals_uncached(overfit):
    model, images, _ = overfit
    out = model.generate(images, max_new_tokens=40)
    assert [decode(row) for row in out.tolist()] == REPORTS  # image-conditioned: each its own
    for row, report in zip(out.tolist(), REPORTS):
        n = len(encode(report))
        assert row[n] == EOT and all(t == EOT for t in row[n:])  # stops at EOT, pads with EOT
    assert torch.equal(model.generate(images, max_new_tokens=40, use_cache=False), out)
    alone = model.generate(images[1:2], max_new_tokens=40)[0]  # batch-independent
    assert torch.equal(alone, out[1, :len(alone)])
    short = model.generate(images, max_new_tokens=3)
    assert short.shape == (3, 3) and torch.equal(short, out[:, :3])


def test_beam_search_batched_cached_and_consistent(overfit):
    model, images, _ = overfit
    beams = model.generate(images, max_new_tokens=40, num_beams=3, length_penalty=1.0)
    assert [decode(row) for row in beams.tolist()] == REPORTS
    assert torch.equal(model.generate(images, max_new_tokens=40, num_beams=3, use_cache=False), beams)
    single = model.generate(images[2:3], max_new_tokens=40, num_beams=3)
    assert torch.equal(single[0], beams[2, :single.shape[1]])
    assert model.training is False
    with pytest.raises(ValueError, match="max_positions"):
        model.generate(images, max_new_tokens=1000)
    with pytest.raises(ValueError, match=">= 1"):
        model.generate(images, max_new_tokens=0, num_beams=2)
