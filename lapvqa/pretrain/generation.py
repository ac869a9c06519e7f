"""Greedy and beam-search decoding for ``CaptioningModel.generate``.

Both are batched. The image is encoded and every layer's cross-attention keys/values are computed
once; with ``use_cache`` the decoder's self-attention keys/values are kept in a preallocated cache,
so each step runs the decoder on one new token per sequence. ``use_cache=False`` re-runs the whole
prefix each step (the reference the cached path is tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Stepper:
    """Feeds the sequences so far (``seq`` [N, t], starting with EOT) and returns next-token logits."""

    def __init__(self, model, mem_kv, n: int, capacity: int, use_cache: bool):
        cfg = model.config
        if capacity < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {capacity}")
        if capacity > cfg.max_positions:
            raise ValueError(f"max_new_tokens={capacity} > max_positions={cfg.max_positions}")
        self.decoder, self.mem_kv = model.decoder, mem_kv
        device = mem_kv[0][0].device
        self.seq = torch.full((n, 1), cfg.eot_id, dtype=torch.long, device=device)
        self.caches = model.decoder.new_caches(n, capacity, like=mem_kv[0][0]) if use_cache else None

    def next_logits(self) -> torch.Tensor:
        """[N, V] float32 logits for the position after ``seq``."""
        if self.caches is not None:
            h = self.decoder(self.seq[:, -1:], self.mem_kv, self.caches, start=self.seq.shape[1] - 1)
        else:
            h = self.decoder(self.seq, self.mem_kv)
        return self.decoder.logits(h[:, -1]).float()

    def push(self, tokens: torch.Tensor, source: torch.Tensor | None = None) -> None:
        """Append tokens [N]; ``source`` [N] first reorders the sequences (beam search)."""
        if source is not None:
            self.seq = self.seq.index_select(0, source)
            for c in self.caches or ():
                c.reorder(source)
        self.seq = torch.cat([self.seq, tokens[:, None]], dim=1)


def _memory(model, images, repeats: int = 1):
    mem_kv = model.decoder.memory_kv(model.vision_encoder(images))  # per layer [B, H, M, D] x 2
    if repeats > 1:  # beams of one image share its keys/values: rows b*k .. b*k+k-1
        mem_kv = [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in mem_kv]
    return mem_kv


def greedy_search(model, images, max_new_tokens: int, *, use_cache: bool = True) -> torch.Tensor:
    eot = model.config.eot_id
    stepper = _Stepper(model, _memory(model, images), images.shape[0], max_new_tokens, use_cache)
    done = torch.zeros(images.shape[0], dtype=torch.bool, device=stepper.seq.device)
    for _ in range(max_new_tokens):
        tok = stepper.next_logits().argmax(-1).masked_fill(done, eot)  # finished rows pad with EOT
        stepper.push(tok)
        done |= tok == eot
        if bool(done.all()):
            break
    return stepper.seq[:, 1:]


class _Hypotheses:
    """The k best finished sequences of one image, scored sum log p / length**length_penalty."""

    def __init__(self, k: int, length_penalty: float):
        self.k, self.lp, self.items = k, length_penalty, []

    def add(self, logp_sum: float, tokens: list[int]) -> None:
        self.items.append((logp_sum / len(tokens) ** self.lp, tokens))
        self.items.sort(key=lambda x: -x[0])
        del self.items[self.k:]

    def done(self, best_running_logp: float, length: int) -> bool:
        """Nothing still running can beat the worst kept hypothesis (HF's early_stopping=False)."""
        return len(self.items) == self.k and self.items[-1][0] >= best_running_logp / length ** self.lp


def beam_search(model, images, max_new_tokens: int, num_beams: int, length_penalty: float = 1.0,
                *, use_cache: bool = True) -> torch.Tensor:
    eot, k, b_n = model.config.eot_id, num_beams, images.shape[0]
    st = _Stepper(model, _memory(model, images, k), b_n * k, max_new_tokens, use_cache)
    device = st.seq.device
    scores = torch.zeros(b_n, k, device=device)
    scores[:, 1:] = float("-inf")  # step 0: all beams are the same EOT prefix, expand beam 0 only
    hyps = [_Hypotheses(k, length_penalty) for _ in range(b_n)]
    done = [False] * b_n
    for t in range(max_new_tokens):
        logp = F.log_softmax(st.next_logits(), dim=-1)  # [B*k, V]
        vocab = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(b_n, k * vocab)
        top_s, top_i = cand.topk(2 * k, dim=1)  # [B, 2k]: at most k of them end (one EOT per beam)
        top_s, top_i, seq = top_s.tolist(), top_i.tolist(), st.seq[:, 1:].tolist()
        nxt_s, nxt_tok, nxt_src = [], [], []
        for b in range(b_n):
            row = _advance(b, k, vocab, eot, t, top_s[b], top_i[b], seq, hyps[b], done[b])
            nxt_s += row[0]
            nxt_tok += row[1]
            nxt_src += row[2]
            done[b] = done[b] or hyps[b].done(row[0][0], t + 1)
        if all(done):
            break
        scores = torch.tensor(nxt_s, device=device).view(b_n, k)
        st.push(torch.tensor(nxt_tok, device=device), torch.tensor(nxt_src, device=device))
    else:  # ran to max_new_tokens: running beams become hypotheses too
        seq, final = st.seq[:, 1:].tolist(), scores.tolist()
        for b in range(b_n):
            if not done[b]:
                for j in range(k):
                    if final[b][j] > float("-inf"):
                        hyps[b].add(final[b][j], seq[b * k + j])
    best = [h.items[0][1] for h in hyps]
    out = torch.full((b_n, max(len(x) for x in best)), eot, dtype=torch.long)
    for b, toks in enumerate(best):
        out[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out.to(device)


def _advance(b, k, vocab, eot, t, top_s, top_i, seq, hyps, is_done):
    """One image's step: finished candidates -> hypotheses; the k best others -> next beams."""
    if is_done:  # keep shapes fixed: dummy beams that can never win
        return [float("-inf")] * k, [eot] * k, [b * k] * k
    s_out, tok_out, src_out = [], [], []
    for rank, (s, idx) in enumerate(zip(top_s, top_i)):
        beam, tok = divmod(idx, vocab)
        src = b * k + beam
        if tok == eot:
            if rank < k:  # only ends that rank among the k best count, as in HF
                hyps.add(s, seq[src] + [eot])
        else:
            s_out.append(s)
            tok_out.append(tok)
            src_out.append(src)
        if len(s_out) == k:
            break
    return s_out, tok_out, src_out
