"""Greedy search, sampling, beam search and forced decoding over a model's
`encode` / `decode_step` interface.

All are batched: the beam search is vectorised over batch x beam, and sentences
that are finished are retired from the batch (their rows dropped from the decoder
state and memory) instead of being padded forward; new sentences may join a running
beam search between steps (`BeamSearch`, which the service uses for continuous
batching). Anything with that interface
can be searched: a `Seq2Seq`, or an `Ensemble` of them (ensemble.py). Penalties and
constraints on the next token (minimum length, no repeated n-grams, top-k/top-p)
are pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from .attention import pad_source
from .tokenizer import BOS_ID, EOS_ID, PAD_ID

NORMALISATIONS = ("gnmt", "average", "none")
NO_TOKEN = -1   # fills the output rows of sentences that joined a running search later


@dataclass
class Hypothesis:
    tokens: list[int]                       # output ids, without BOS/EOS
    score: float                            # what hypotheses are ranked by (normalised)
    log_prob: float                         # sum of token log-probabilities, EOS included
    attention: torch.Tensor | None = None   # (steps, src_len), steps = len(tokens) + 1 (EOS)


@dataclass
class SearchOptions:
    """How to search; validated on construction, so a bad value fails before any work."""

    beam_size: int = 5
    nbest: int = 1
    alpha: float | None = None   # GNMT length penalty strength; None: the model's (Translator), else 0
    normalisation: str = "gnmt"  # gnmt | average | none
    max_len_a: float = 1.5       # output at most a * source subwords + b
    max_len_b: int = 10
    max_output_len: int = 512
    min_len: int = 0
    no_repeat_ngram: int = 0     # N > 0: no hypothesis repeats an n-gram of N subwords
    coverage_penalty: float = 0.0  # GNMT coverage penalty strength beta (beam search)
    sample: bool = False         # draw each token at random instead of searching
    temperature: float = 1.0     # sampling: divides the log-probabilities
    top_k: int = 0               # sampling: only the k most probable tokens (0 = all)
    top_p: float = 1.0           # sampling: only the smallest set with this much probability
    seed: int = 0                # sampling: seeds a torch.Generator, never the global RNG

    def __post_init__(self):
        checks = [
            (self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}"),
            (1 <= self.nbest <= self.beam_size,
             f"nbest must be between 1 and beam_size ({self.beam_size}), got {self.nbest}"),
            (self.normalisation in NORMALISATIONS, f"Unknown length normalisation {self.normalisation!r}; "
                                                   f"choose one of: {', '.join(NORMALISATIONS)}"),
            (self.alpha is None or (math.isfinite(self.alpha) and self.alpha >= 0),
             f"alpha must be a finite number >= 0, got {self.alpha}"),
            (math.isfinite(self.max_len_a) and self.max_len_a >= 0,
             f"max_len_a must be a finite number >= 0, got {self.max_len_a}"),
            (self.max_output_len >= 1, f"max_output_len must be >= 1, got {self.max_output_len}"),
            (self.min_len >= 0, f"min_len must be >= 0, got {self.min_len}"),
            (self.no_repeat_ngram >= 0, f"no_repeat_ngram must be >= 0 (0 = off), got {self.no_repeat_ngram}"),
            (self.coverage_penalty >= 0, f"coverage_penalty must be >= 0, got {self.coverage_penalty}"),
            (self.temperature > 0 and math.isfinite(self.temperature),
             f"temperature must be a finite number > 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = whole vocabulary), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (not self.sample or self.beam_size == 1,
             f"sampling draws one translation per sentence: use beam_size 1, got {self.beam_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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
    raise ValueError(f"Unknown length normalisation {mode!r}; choose one of: {', '.join(NORMALISATIONS)}")


def coverage_penalty(attention: torch.Tensor, beta: float) -> float:
    """GNMT coverage penalty beta * sum_j log(min(sum_i a_ij, 1)) (Wu et al., 2016).

    attention: (steps, src_len) over real source positions only (no padding). Never
    positive: source words the output attended to less than once in total cost score.
    A position never attended to at all is counted as 1e-10, not as log(0).
    """
    if beta == 0:
        return 0.0
    coverage = attention.float().sum(dim=0).clamp(min=1e-10, max=1.0)  # (src_len,)
    return beta * float(coverage.log().sum())


def max_lengths(src_len: torch.Tensor, a: float, b: int, cap: int) -> torch.Tensor:
    """Maximum output length per sentence (subwords, EOS not counted): min(a * src_len + b, cap), at least 1.

    An output that reaches its limit still ends with EOS (`force_eos`), so every hypothesis'
    score includes the log-probability of its end, and a cut-off output does not outrank
    finished ones by skipping it."""
    return (src_len.float() * a + b).floor().clamp(1, cap).long()


# ---- constraints on the next token --------------------------------------------------

def repeated_ngram_mask(seqs: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """Tokens that would repeat an n-gram already in each row.

    seqs: (rows, t) output so far, right-aligned: a row may start with NO_TOKEN (-1)
    fill, which matches no token. Returns (rows, vocab) True where appending the token
    makes the last n tokens an n-gram that occurs earlier in the row.
    """
    rows, t = seqs.shape
    mask = torch.zeros(rows, vocab, dtype=torch.bool, device=seqs.device)  # (rows, vocab)
    if n < 1 or t < n:
        return mask
    grams = seqs.unfold(1, n, 1)                                             # (rows, t-n+1, n)
    prefix = seqs[:, t - n + 1:]                                             # (rows, n-1)
    seen = (grams[:, :, :n - 1] == prefix.unsqueeze(1)).all(dim=-1)          # (rows, t-n+1)
    last = grams[:, :, n - 1]                                                # (rows, t-n+1)
    seen &= last >= 0                             # NO_TOKEN (-1) fills rows that started later
    hits = torch.zeros(rows, vocab, device=seqs.device)                      # (rows, vocab)
    hits.scatter_add_(1, last.clamp(min=0), seen.float())
    return hits > 0


def constrain(log_probs: torch.Tensor, seqs: torch.Tensor, min_len: int, no_repeat_ngram: int,
              steps: torch.Tensor | None = None) -> torch.Tensor:
    """Forbid EOS before `min_len` tokens and tokens that repeat an n-gram (in place).

    log_probs: (rows, vocab) for the next step; seqs: (rows, t) output so far. `steps`
    (rows,) gives each row's own output length when rows started at different times
    (their output is right-aligned in seqs, NO_TOKEN before it); default: t for every row.
    EOS is never forbidden for repeating an n-gram (it ends the output, it is not part
    of it), and a row left with no allowed token gets EOS back, so every row can always
    finish.
    """
    if steps is None:
        steps = torch.full((seqs.size(0),), seqs.size(1), dtype=torch.long, device=seqs.device)
    short = steps < min_len                                                  # (rows,)
    if no_repeat_ngram == 0 and not short.any():
        return log_probs
    eos = log_probs[:, EOS_ID].clone()                                       # (rows,)
    if no_repeat_ngram:
        log_probs.masked_fill_(repeated_ngram_mask(seqs, no_repeat_ngram, log_probs.size(-1)), float("-inf"))
        log_probs[:, EOS_ID] = eos
    log_probs[short, EOS_ID] = float("-inf")
    stuck = torch.isneginf(log_probs).all(dim=-1)                            # (rows,)
    log_probs[stuck, EOS_ID] = eos[stuck]
    return log_probs


def force_eos(log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Only EOS may follow in `rows` (rows,) bool, the outputs at their length limit (in place).

    Call it before `constrain`: a row whose minimum length forbids EOS is then left with no
    allowed token and gets EOS back, so the length limit wins over `min_len`.
    """
    if rows.any():
        eos = log_probs[:, EOS_ID].clone()                                   # (rows,)
        log_probs.masked_fill_(rows.unsqueeze(1), float("-inf"))
        log_probs[:, EOS_ID] = eos
    return log_probs


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, -inf elsewhere; k=0 keeps all. (rows, vocab)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]                              # (rows, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens until their probability reaches p.

    The top token is always kept. logits: (rows, vocab) -> same shape, -inf where dropped.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)              # (rows, vocab)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs                                    # mass of better tokens
    drop_sorted = before >= p                                                # (rows, vocab)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# ---- greedy and sampling: one path per sentence -------------------------------------

def argmax_token(log_probs: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) -> (rows,) the most probable token."""
    return log_probs.argmax(dim=-1)


def sample_token(log_probs: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """(rows, vocab) -> (rows,) a token drawn from softmax(log_probs / temperature), filtered."""
    logits = top_p_filter(top_k_filter(log_probs / temperature, top_k), top_p)  # (rows, vocab)
    probs = torch.softmax(logits, dim=-1)                                        # (rows, vocab)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


FAST_GREEDY = True   # False forces greedy through the full log-softmax path (tests compare the two)


def _one_path(model, src: torch.Tensor, src_len: torch.Tensor, max_len: torch.Tensor, choose,
              return_attention: bool, min_len: int, no_repeat_ngram: int) -> list[list[Hypothesis]]:
    """Decode one hypothesis per sentence, `choose` picking each next token.

    choose: (live, vocab) log-probabilities -> (live,) tokens. A hypothesis' score and
    log_prob are the model's log-probabilities of the tokens chosen.
    """
    memory, state = model.encode(src, src_len)
    batch, steps = src.size(0), int(max_len.max()) + 1   # the longest output's subwords, then EOS
    device = src.device
    out = torch.full((batch, steps), EOS_ID, dtype=torch.long, device=device)  # (batch, steps)
    scores = torch.zeros(batch, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)  # steps taken, EOS included
    attn = src.new_zeros(batch, steps, src.size(1), dtype=torch.float) if return_attention else None
    rows = torch.arange(batch, device=device)   # original index of each live row
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    limit = max_len.to(device)
    # plain greedy steps may skip the full log-softmax (Seq2Seq.greedy_step; not int8, not ensembles)
    fast = (choose is argmax_token and not no_repeat_ngram and FAST_GREEDY
            and getattr(model, "has_greedy_shortcut", False))
    shortest = int(limit.min())   # before this step no output is at its limit
    for t in range(steps):
        full = t >= limit[rows] if t >= shortest else None                  # (live,) only EOS may follow
        if fast and t >= min_len and (full is None or not full.any()):
            token, token_lp, state, weights = model.greedy_step(prev, state, memory)  # (live,), (live,)
        else:
            log_probs, state, weights = model.decode_step(prev, state, memory)  # (live, vocab)
            if full is not None:
                force_eos(log_probs, full)
            if t < min_len or no_repeat_ngram:
                log_probs = constrain(log_probs, out[rows, :t], min_len, no_repeat_ngram)
            token = choose(log_probs)                                       # (live,)
            token_lp = log_probs.gather(1, token.unsqueeze(1)).squeeze(1)
        out[rows, t] = token
        scores[rows] += token_lp
        lengths[rows] = t + 1
        if attn is not None:
            attn[rows, t] = weights.float()
        done = token == EOS_ID
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


@torch.inference_mode()
def greedy_search(model, src: torch.Tensor, src_len: torch.Tensor, max_len: torch.Tensor,
                  return_attention: bool = False, *, min_len: int = 0, no_repeat_ngram: int = 0
                  ) -> list[list[Hypothesis]]:
    """Most probable token at each step, for a whole batch.

    Args:
        src: (batch, src_len) ids; src_len: (batch,); max_len: (batch,) output limits.
    Returns:
        one list with a single Hypothesis per sentence, in batch order.
    """
    return _one_path(model, src, src_len, max_len, argmax_token, return_attention, min_len, no_repeat_ngram)


@torch.inference_mode()
def sample_search(model, src: torch.Tensor, src_len: torch.Tensor, max_len: torch.Tensor, *,
                  generator: torch.Generator, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_len: int = 0, no_repeat_ngram: int = 0, return_attention: bool = False
                  ) -> list[list[Hypothesis]]:
    """Each token drawn at random, for a whole batch, like greedy search.

    The draws come from `generator` only, so the same seed, input and batching give
    the same output. Temperature, top-k and top-p shape the distribution drawn from;
    the hypothesis' log_prob is still the model's own (temperature 1) log-probability.
    top_k=1 is greedy search. Shapes as in `greedy_search`.
    """
    choose = partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _one_path(model, src, src_len, max_len, choose, return_attention, min_len, no_repeat_ngram)


# ---- beam -----------------------------------------------------------------------

class BeamSearch:
    """Beam search, vectorised over sentences x beams, that sentences join and leave between steps.

        beams = BeamSearch(model, beam_size=5)
        beams.add(src, src_len, max_len, tags=["a", "b"])   # encode and start two sentences
        beams.step()        # one decoder step for every live sentence -> [(tag, hypotheses)] of those done
        beams.add(...)      # more sentences may join a running search (continuous batching)
        beams.drop(["b"])   # ... and leave it unfinished

    `beam_search` adds one batch and steps until it is done; the service (batcher.py)
    adds sentences as requests arrive, so each step decodes every sentence in flight.
    A finished sentence is retired: its rows leave the decoder state and memory. Memory
    holds one row per sentence, which its k beam rows of the decoder state share.

    A sentence stops when it has `nbest` finished hypotheses and no live one can
    still beat them: live scores only fall as they grow, so dividing a live score by
    the largest length penalty it could reach bounds what it can become (the coverage
    penalty is never positive, so the bound holds with it). With alpha=0 this is
    exact; beam size 1 is exactly greedy search. A finished hypothesis' score is
    normalise(log_prob) + coverage_penalty(attention).

    Sentences that joined at different times sit side by side: each row's output so far
    is right-aligned in `seqs` (NO_TOKEN before it) with its own step count, and memory is
    padded (and masked) to the longest source in flight, cropped again when that leaves.
    The model's state and memory must offer `index_select`, `cat` and `crop_source`.
    """

    def __init__(self, model, beam_size: int = 5, *, nbest: int = 1, alpha: float = 0.0,
                 normalisation: str = "gnmt", min_len: int = 0, no_repeat_ngram: int = 0,
                 coverage_beta: float = 0.0, return_attention: bool = False):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if not 1 <= nbest <= beam_size:
            raise ValueError(f"nbest must be between 1 and beam_size ({beam_size}), got {nbest}")
        normalise(0.0, 1, alpha, normalisation)  # validates the mode name up front
        self.model, self.k, self.nbest = model, beam_size, nbest
        self.alpha, self.normalisation, self.coverage_beta = alpha, normalisation, coverage_beta
        self.min_len, self.no_repeat_ngram = min_len, no_repeat_ngram
        self.return_attention = return_attention
        self.keep_attn = return_attention or coverage_beta > 0
        self._clear()

    def _clear(self) -> None:
        self.tags: list = []                         # one per live sentence, in row order
        self.finished: list[list[Hypothesis]] = []   # finished hypotheses of each live sentence
        self.memory = self.state = None
        self.beam_scores = self.seqs = self.prev = self.attn_hist = None
        self.steps = self.limit = self.src_len = self.floor = None
        self.width = 0                               # source positions in memory

    @property
    def live(self) -> int:
        """Sentences in flight."""
        return len(self.tags)

    @torch.inference_mode()
    def add(self, src: torch.Tensor, src_len: torch.Tensor, max_len: torch.Tensor, tags) -> None:
        """Start sentences: src (n, src_len) ids, src_len (n,), max_len (n,) output limits, n tags."""
        tags = list(tags)
        n, k, device = src.size(0), self.k, src.device
        if len(tags) != n:
            raise ValueError(f"{n} sentences but {len(tags)} tags")
        if n == 0:
            return
        memory, state = self.model.encode(src, src_len)   # memory stays one row per sentence
        state = state.index_select(torch.arange(n, device=device).repeat_interleave(k))  # (n*k, ...)
        # only beam 0 is live at the start, so the first step does not pick k copies of one token
        beam_scores = torch.full((n, k), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0                                                # (n, k)
        prev = torch.full((n * k,), BOS_ID, dtype=torch.long, device=device)
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        floor = torch.full((n,), float("-inf"), device=device)  # nbest-th best finished score (-inf until nbest)
        width = src.size(1)
        if not self.live:
            seqs = torch.full((n * k, 0), NO_TOKEN, dtype=torch.long, device=device)          # (rows, t)
            attn_hist = src.new_zeros(n * k, 0, width, dtype=torch.float) if self.keep_attn else None
            new = (memory, state, beam_scores, prev, seqs, attn_hist, zeros, max_len.to(device),
                   src_len.to(device), floor, width)
        else:
            # everything built first and assigned at once: a failure here leaves the search as it was
            t, width = self.seqs.size(1), max(self.width, width)
            attn_hist = None
            if self.attn_hist is not None:
                attn_hist = torch.cat([pad_source(self.attn_hist, width, dim=2),
                                       self.attn_hist.new_zeros(n * k, t, width)])
            new = (self.memory.cat(memory), self.state.cat(state), torch.cat([self.beam_scores, beam_scores]),
                   torch.cat([self.prev, prev]), torch.cat([self.seqs, self.seqs.new_full((n * k, t), NO_TOKEN)]),
                   attn_hist, torch.cat([self.steps, zeros]), torch.cat([self.limit, max_len.to(device)]),
                   torch.cat([self.src_len, src_len.to(device)]), torch.cat([self.floor, floor]), width)
        (self.memory, self.state, self.beam_scores, self.prev, self.seqs, self.attn_hist,
         self.steps, self.limit, self.src_len, self.floor, self.width) = new
        self.tags += tags
        self.finished += [[] for _ in range(n)]

    @torch.inference_mode()
    def step(self) -> list[tuple[object, list[Hypothesis]]]:
        """One decoder step for every live sentence; returns (tag, up to nbest hypotheses, best first)
        for each sentence that finished, and retires them."""
        if not self.live:
            return []
        k, device = self.k, self.prev.device
        live = self.live
        log_probs, state, weights = self.model.decode_step(self.prev, self.state, self.memory)  # (live*k, vocab)
        vocab = log_probs.size(-1)
        force_eos(log_probs, (self.steps >= self.limit).repeat_interleave(k))   # outputs at their limit
        if self.min_len or self.no_repeat_ngram:
            log_probs = constrain(log_probs, self.seqs, self.min_len, self.no_repeat_ngram,
                                  steps=self.steps.repeat_interleave(k))
        cand = (self.beam_scores.view(-1, 1) + log_probs).view(live, k * vocab)  # (live, k*vocab)
        top_scores, top_ids = cand.topk(k, dim=1)                                # (live, k)
        origin = top_ids // vocab                                                # (live, k) beam it extends
        token = top_ids % vocab                                                  # (live, k)
        if k > 1:   # each new beam continues the state and output of the beam it extends
            rows = (torch.arange(live, device=device).unsqueeze(1) * k + origin).view(-1)  # (live*k,)
            state, weights = state.index_select(rows), weights.index_select(0, rows)
            self.seqs = self.seqs.index_select(0, rows)
            if self.attn_hist is not None:
                self.attn_hist = self.attn_hist.index_select(0, rows)
        self.seqs = torch.cat([self.seqs, token.view(-1, 1)], dim=1)                    # (live*k, t+1)
        self.state = state
        if self.attn_hist is not None:
            self.attn_hist = torch.cat([self.attn_hist, weights.float().unsqueeze(1)], dim=1)
        self.steps += 1

        ends = (token == EOS_ID) & (top_scores > float("-inf"))                  # (live, k)
        for i, j in ends.nonzero().tolist():
            n = int(self.steps[i])                                               # this sentence's output so far
            row = i * k + j
            attention = (self.attn_hist[row, -n:, :int(self.src_len[i])].cpu()
                         if self.attn_hist is not None else None)
            self.finished[i].append(_finished(self.seqs[row, -n:].tolist(), float(top_scores[i, j]), attention,
                                              self.alpha, self.normalisation, self.coverage_beta,
                                              self.return_attention))
            if len(self.finished[i]) >= self.nbest:
                self.floor[i] = sorted((h.score for h in self.finished[i]), reverse=True)[self.nbest - 1]
        top_scores = top_scores.masked_fill(ends, float("-inf"))

        # the best any live beam can still reach, given its remaining length budget
        best_live = top_scores.max(dim=1).values                                 # (live,)
        longest = self.limit.float() + 1          # a live beam could get as long as the limit, then EOS
        if self.normalisation == "gnmt" and self.alpha > 0:
            best_live = best_live / length_penalty(longest, self.alpha)
        elif self.normalisation == "average":
            best_live = best_live / longest
        done = (best_live <= self.floor) | torch.isneginf(best_live)            # (live,)
        self.beam_scores = top_scores
        self.prev = token.view(-1)
        if not done.any():
            return []
        out = [(self.tags[i], sorted(self.finished[i], key=lambda h: h.score, reverse=True)[:self.nbest])
               for i in done.nonzero().squeeze(1).tolist()]
        self._keep((~done).nonzero().squeeze(1))
        return out

    @torch.inference_mode()
    def drop(self, tags) -> None:
        """Retire these sentences unfinished (e.g. their caller gave up); unknown tags are ignored."""
        gone = set(tags)
        if any(t in gone for t in self.tags):
            keep = [i for i, t in enumerate(self.tags) if t not in gone]
            self._keep(torch.tensor(keep, dtype=torch.long, device=self.prev.device))

    def _keep(self, keep: torch.Tensor) -> None:
        """Keep only live sentences `keep` (live',), in that order."""
        if keep.numel() == 0:
            self._clear()
            return
        k = self.k
        keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=keep.device)).view(-1)  # (live'*k,)
        index = keep.tolist()
        self.tags = [self.tags[i] for i in index]
        self.finished = [self.finished[i] for i in index]
        self.beam_scores, self.steps, self.limit = self.beam_scores[keep], self.steps[keep], self.limit[keep]
        self.src_len, self.floor = self.src_len[keep], self.floor[keep]
        self.prev = self.prev[keep_rows]
        self.state, self.memory = self.state.index_select(keep_rows), self.memory.index_select(keep)
        # drop the columns and source positions no live sentence needs any more
        t, width = int(self.steps.max()), int(self.src_len.max())
        self.seqs = self.seqs[keep_rows, self.seqs.size(1) - t:]
        if self.attn_hist is not None:
            self.attn_hist = self.attn_hist[keep_rows, self.attn_hist.size(1) - t:, :width]
        if width < self.width:
            self.memory, self.width = self.memory.crop_source(width), width


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
    no_repeat_ngram: int = 0,
    coverage_beta: float = 0.0,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Beam search over one batch (see `BeamSearch` for the rules).

    Args:
        src: (batch, src_len); src_len: (batch,); max_len: (batch,) output limits.
    Returns:
        per sentence, up to `nbest` hypotheses, best first.
    """
    beams = BeamSearch(model, beam_size, nbest=nbest, alpha=alpha, normalisation=normalisation,
                       min_len=min_len, no_repeat_ngram=no_repeat_ngram, coverage_beta=coverage_beta,
                       return_attention=return_attention)
    beams.add(src, src_len, max_len, tags=range(src.size(0)))
    results: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    while beams.live:
        for i, hyps in beams.step():
            results[i] = hyps
    return results


def _finished(toks: list[int], log_prob: float, attention: torch.Tensor | None, alpha: float,
              normalisation: str, coverage_beta: float, return_attention: bool) -> Hypothesis:
    """A beam that ended: its tokens (EOS dropped), rank score and log-probability.

    attention: (steps, real src_len), needed when coverage_beta > 0.
    """
    n = len(toks)
    if toks and toks[-1] == EOS_ID:
        toks = toks[:-1]
    score = normalise(log_prob, n, alpha, normalisation)
    if coverage_beta > 0:
        score += coverage_penalty(attention, coverage_beta)
    return Hypothesis(toks, score, log_prob, attention if return_attention else None)


def search(model, src: torch.Tensor, src_len: torch.Tensor, max_len: torch.Tensor, options: SearchOptions,
           *, generator: torch.Generator | None = None, return_attention: bool = False
           ) -> list[list[Hypothesis]]:
    """Sampling if asked; greedy for beam size 1 with one hypothesis; beam search otherwise.

    generator: the source of randomness for sampling (default: one seeded with options.seed).
    """
    o = options
    if o.sample:
        if generator is None:
            generator = torch.Generator(device=src.device).manual_seed(o.seed)
        return sample_search(model, src, src_len, max_len, generator=generator, temperature=o.temperature,
                             top_k=o.top_k, top_p=o.top_p, min_len=o.min_len,
                             no_repeat_ngram=o.no_repeat_ngram, return_attention=return_attention)
    if o.beam_size == 1 and o.nbest == 1 and o.coverage_penalty == 0:
        return greedy_search(model, src, src_len, max_len, return_attention, min_len=o.min_len,
                             no_repeat_ngram=o.no_repeat_ngram)
    return beam_search(model, src, src_len, max_len, o.beam_size, nbest=o.nbest, alpha=o.alpha or 0.0,
                       normalisation=o.normalisation, min_len=o.min_len, no_repeat_ngram=o.no_repeat_ngram,
                       coverage_beta=o.coverage_penalty, return_attention=return_attention)


# ---- forced decoding --------------------------------------------------------------

@torch.inference_mode()
def forced_log_probs(model, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor,
                     tgt_out: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through `decode_step`: the log-probability of each given target token.

    The same steps greedy and beam search take, so the forced score of a search's
    output is that hypothesis' log_prob (and ensembles work unchanged).

    Args:
        src: (batch, src_len); src_len: (batch,);
        tgt_in: (batch, tgt_len) BOS + target ids; tgt_out: (batch, tgt_len) target ids + EOS,
        PAD after the end of each row.
    Returns:
        (batch, tgt_len) log-probabilities, 0 at padding; row sums are the totals.
    """
    memory, state = model.encode(src, src_len)
    steps = []
    for t in range(tgt_in.size(1)):
        log_probs, state, _ = model.decode_step(tgt_in[:, t], state, memory)  # (batch, vocab)
        steps.append(log_probs.gather(1, tgt_out[:, t:t + 1]).squeeze(1))      # (batch,)
    token_log_probs = torch.stack(steps, dim=1)                                # (batch, tgt_len)
    return token_log_probs.masked_fill(tgt_out == PAD_ID, 0.0)
