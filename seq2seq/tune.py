"""The length penalty, chosen on a validation set and stored in the checkpoint.

Beam search ranks finished hypotheses by log-probability divided by the GNMT length
penalty ((5 + |Y|) / 6) ** alpha. With alpha = 0 it ranks by the raw sum, which
favours short outputs; how much to correct for that depends on the model and the
language pair, so it is measured, never guessed, and never on a test set:

    choice = choose_alpha(translator, valid_sources, valid_references, beam_size=5)
    store_decoding("model.pt", choice)     # translate, evaluate and serve now default to it

`seq2seq-train` does this after training (evaluate.alpha: null), and `seq2seq-tune`
does it for any checkpoint. An explicit --alpha always wins over the stored choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import read_checkpoint
from .files import atomic_write
from .metrics import corpus_scores
from .search import SearchOptions

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def choose_alpha(translator, sources: Sequence[str], references: Sequence[str], *, beam_size: int = 5,
                 alphas: Sequence[float] = ALPHAS, batch_size: int = 64, data: str = "validation") -> dict:
    """Decode `sources` with each alpha; the one with the highest BLEU wins (ties: the smaller).

    Returns the choice as plain data, ready for `store_decoding`:
    {"alpha", "beam_size", "normalisation", "bleu", "bleu_signature", "data", "precision",
    "grid": {alpha: BLEU}}. Decode in the precision the model will be used in: the choice is
    made for the numbers that `translator` computes.
    """
    if not alphas:
        raise ValueError("no alpha to choose from: give at least one value")
    if any(a < 0 for a in alphas):
        raise ValueError(f"alpha must be >= 0, got {min(alphas)}")
    if len(sources) != len(references):
        raise ValueError(f"cannot tune: {len(sources)} source lines but {len(references)} references")
    grid, signature = {}, None
    for alpha in sorted(set(float(a) for a in alphas)):
        start = time.perf_counter()
        options = SearchOptions(beam_size=beam_size, alpha=alpha, normalisation="gnmt")
        hyps = [h[0].text for h in translator.translate_hypotheses(sources, options, batch_size=batch_size)]
        scores = corpus_scores(hyps, references, hyp_name=f"alpha {alpha} output", ref_name=data)
        grid[alpha], signature = scores.bleu, scores.bleu_signature
        log.info("length penalty alpha %.2f: %s BLEU %.2f (beam %d, %.1f s)", alpha, data, scores.bleu,
                 beam_size, time.perf_counter() - start)
    best = max(grid, key=lambda a: (grid[a], -a))
    log.info("length penalty: alpha %.2f chosen on %s (BLEU %.2f; alpha 0: %s)", best, data, grid[best],
             f"{grid[0.0]:.2f}" if 0.0 in grid else "not tried")
    return {"alpha": best, "beam_size": beam_size, "normalisation": "gnmt", "bleu": grid[best],
            "bleu_signature": signature, "data": data, "precision": getattr(translator, "precision", "float32"),
            "grid": {str(a): b for a, b in grid.items()}}


def store_decoding(path: str | Path, choice: dict, output: str | Path | None = None) -> Path:
    """Write `choice` into the checkpoint's meta["decoding"] (atomically; in place unless `output`)."""
    ckpt = read_checkpoint(path)
    ckpt["seq2seq"].setdefault("meta", {})["decoding"] = dict(choice)
    target = Path(output or path)
    with atomic_write(target, "wb") as f:
        torch.save(ckpt, f)
    return target


def stored_alpha(info: dict) -> float | None:
    """The length penalty a checkpoint's payload recommends, or None."""
    decoding = (info.get("meta") or {}).get("decoding") or {}
    alpha = decoding.get("alpha")
    return float(alpha) if isinstance(alpha, (int, float)) and alpha >= 0 else None
