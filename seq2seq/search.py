"""Greedy and beam search over a model's `encode` / `decode_step` interface.

Both are batched: the beam search is vectorised over batch x beam, and sentences
that are finished are retired from the batch (their rows dropped from the decoder
state and memory) instead of being padded forward. Penalties are pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import BOS_ID, EOS_ID


@dataclass
class Hypothesis:
    tokens: list[int]                       # output ids, without BOS/EOS
    score: float                            # what hypotheses are ranked by (normalised)
    log_prob: float                         # sum of token log-probabilities, EOS included
    attention: torch.Tensor | None = None   # (steps, src_len), steps = len(tokens) (+1 with EOS)


# ---- penalties -------------------------------------------------------------------

def length_penalty(length: torch.Tensor | float, alpha: float) -> torch.Tensor | float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al., 2016); alpha=0 gives 1."""
    return ((5.0 + length) / 6.0) ** alpha


def normalise(log_prob: float, length: int, alpha: float, mode: str = "gnmt") -> float:
    """Rank score of a finished hypothesis: GNMT penalty, plain average, or raw sum."""
    if mode == "gnmt":
        return log_prob / length_penalty(float(length), alpha)
    if mode == "average":
        return log_prob / max(length, 1)
    if mode == "none":
        return log_prob
    raise ValueError(f"Unknown length normalisation {mode!r}; choose one of: gnmt, average, none")


def max_lengths(src_len: torch.Tensor, a: float, b: int, cap: int) -> torch.Tensor:
    """Maximum output length per sentence: min(a * src_len + b, cap), at least 1."""
    return (src_len.float() * a + b).floor().clamp(1, cap).long()


# ---- greedy ---------------------------------------------------------------------

@torch.inference_mode()
def greedy_search(model, src: torch.Tensor, src_len: torch.Tensor, max_len: torch.Tensor,
                  return_attention: bool = False) -> list[list[Hypothesis]]:
    """Most probable token at each step, for a whole batch.

    Args:
        src: (batch, src_len) ids; src_len: (batch,); max_len: (batch,) output limits.
    Returns:
        one list with a single Hypothesis per sentence, in batch order.
    """
    memory, state = model.encode(src, src_len)
    batch, steps = src.size(0), int(max_len.max())
    device = src.device
    out = torch.full((batch, steps), EOS_ID, dtype=torch.long, device=device)  # (batch, steps)
    scores = torch.zeros(batch, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)  # steps taken, EOS included
    attn = src.new_zeros(batch, steps, src.size(1), dtype=torch.float) if return_attention else None
    rows = torch.arange(batch, device=device)   # original index of each live row
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    limit = max_len.to(device)
    for t in range(steps):
        log_probs, state, weights = model.decode_step(prev, state, memory)  # (live, vocab)
        best, token = log_probs.max(dim=-1)                                 # (live,)
        out[rows, t] = token
        scores[rows] += best
        lengths[rows] = t + 1
        if attn is not None:
            attn[rows, t] = weights.float()
        done = (token == EOS_ID) | (t + 1 >= limit[rows])
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            rows, token = rows[keep], token[keep]
            state, memory = state.index_select(keep), memory.index_select(keep)
        prev = token
    results = []
    for i in range(batch):
        n = int(lengths[i])
        toks = out[i, :n].tolist()
        if toks and toks[-1] == EOS_ID:
            toks = toks[:-1]
        results.append([Hypothesis(toks, float(scores[i]), float(scores[i]),
                                   attn[i, :n].cpu() if attn is not None else None)])
    return results


# ---- beam -----------------------------------------------------------------------

@torch.inference_mode()
def beam_search(
    model,
    src: torch.Tensor,
    src_len: torch.Tensor,
    max_len: torch.Tensor,
    beam_size: int = 5,
    *,
    nbest: int = 1,
    alpha: float = 0.0,
    normalisation: str = "gnmt",
    min_len: int = 0,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Beam search, vectorised over batch x beam.

    A sentence stops when it has `nbest` finished hypotheses and no live one can
    still beat them: live scores only fall as they grow, so dividing a live score by
    the largest length penalty it could reach bounds what it can become. With
    alpha=0 this is exact; beam size 1 is exactly greedy search.

    Args:
        src: (batch, src_len); src_len: (batch,); max_len: (batch,) output limits.
    Returns:
        per sentence, up to `nbest` hypotheses, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be between 1 and beam_size ({beam_size}), got {nbest}")
    normalise(0.0, 1, alpha, normalisation)  # validates the mode name up front
    device = src.device
    batch, k = src.size(0), beam_size
    memory, state = model.encode(src, src_len)
    expand = torch.arange(batch, device=device).repeat_interleave(k)      # (batch*k,)
    memory, state = memory.index_select(expand), state.index_select(expand)

    sent = torch.arange(batch, device=device)                # original sentence of each live row of beams
    limit = max_len.to(device)
    # only beam 0 is live at the start, so the first step does not pick k copies of one token
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0                                   # (live, k)
    seqs = torch.full((batch * k, 0), BOS_ID, dtype=torch.long, device=device)  # (live*k, t)
    attn_hist = src.new_zeros(batch * k, 0, src.size(1), dtype=torch.float) if return_attention else None
    prev = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    # nbest-th best finished score per sentence (-inf until there are nbest)
    floor = torch.full((batch,), float("-inf"), device=device)

    for t in range(int(limit.max())):
        log_probs, state, weights = model.decode_step(prev, state, memory)  # (live*k, vocab)
        vocab = log_probs.size(-1)
        if t < min_len:
            log_probs[:, EOS_ID] = float("-inf")
        live = sent.numel()
        cand = (beam_scores.view(-1, 1) + log_probs).view(live, k * vocab)  # (live, k*vocab)
        top_scores, top_ids = cand.topk(k, dim=1)                            # (live, k)
        origin = top_ids // vocab                                            # (live, k) beam it extends
        token = top_ids % vocab                                              # (live, k)
        rows = (torch.arange(live, device=device).unsqueeze(1) * k + origin).view(-1)  # (live*k,)
        seqs = torch.cat([seqs.index_select(0, rows), token.view(-1, 1)], dim=1)       # (live*k, t+1)
        state = state.index_select(rows)
        if attn_hist is not None:
            attn_hist = torch.cat([attn_hist.index_select(0, rows),
                                   weights.float().index_select(0, rows).unsqueeze(1)], dim=1)

        at_limit = (t + 1 >= limit[sent]).unsqueeze(1)                       # (live, 1)
        ends = (token == EOS_ID) | at_limit                                  # (live, k)
        ends &= top_scores > float("-inf")
        for i, j in ends.nonzero().tolist():
            toks = seqs[i * k + j].tolist()
            n = len(toks)
            if toks[-1] == EOS_ID:
                toks = toks[:-1]
            raw = float(top_scores[i, j])
            s = int(sent[i])
            finished[s].append(Hypothesis(
                toks, normalise(raw, n, alpha, normalisation), raw,
                attn_hist[i * k + j].cpu() if attn_hist is not None else None))
            if len(finished[s]) >= nbest:
                floor[s] = sorted((h.score for h in finished[s]), reverse=True)[nbest - 1]
        top_scores = top_scores.masked_fill(ends, float("-inf"))

        # the best any live beam can still reach, given its remaining length budget
        best_live = top_scores.max(dim=1).values                             # (live,)
        if normalisation == "gnmt" and alpha > 0:
            best_live = best_live / length_penalty(limit[sent].float(), alpha)
        elif normalisation == "average":
            best_live = best_live / limit[sent].float()   # a live beam could get as long as the limit
        done = (best_live <= floor[sent]) | at_limit.squeeze(1) | torch.isneginf(best_live)
        if done.all():
            break
        beam_scores = top_scores
        prev = token.view(-1)
        if done.any():
            keep = (~done).nonzero().squeeze(1)                                  # (live',)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            sent, beam_scores = sent[keep], beam_scores[keep]
            seqs, prev = seqs[keep_rows], prev[keep_rows]
            state, memory = state.index_select(keep_rows), memory.index_select(keep_rows)
            if attn_hist is not None:
                attn_hist = attn_hist[keep_rows]

    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


def search(model, src, src_len, max_len, beam_size: int = 1, **kwargs) -> list[list[Hypothesis]]:
    """Greedy for beam size 1 with one hypothesis; beam search otherwise."""
    if beam_size == 1 and kwargs.get("nbest", 1) == 1 and not kwargs.get("min_len"):
        return greedy_search(model, src, src_len, max_len, kwargs.get("return_attention", False))
    return beam_search(model, src, src_len, max_len, beam_size, **kwargs)
