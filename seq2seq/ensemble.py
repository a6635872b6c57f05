"""Several models translating as one.

An `Ensemble` offers the interface search needs (`encode`, `decode_step`, and
state and memory that reorder by `index_select`), so greedy, sampling, beam search
and forced decoding run over it unchanged. At every step it takes the mean of the
members' log-probabilities: the log of their geometric mean, not renormalised
(a product of experts; the scores of an ensemble of identical models are those of
one model). Its attention is the members' mean attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_model
from .model import Seq2Seq
from .tokenizer import Tokenizer


class PerModel(tuple):
    """One decoder state (or memory) per member, reordered together."""

    def index_select(self, index: torch.Tensor) -> PerModel:
        return PerModel(part.index_select(index) for part in self)

    def cat(self, other: PerModel) -> PerModel:
        return PerModel(part.cat(o) for part, o in zip(self, other))

    def crop_source(self, width: int) -> PerModel:
        return PerModel(part.crop_source(width) for part in self)


class Ensemble(nn.Module):
    def __init__(self, models: Sequence[Seq2Seq]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model, got none")
        sizes = [m.config.tgt_vocab_size for m in models]
        if len(set(sizes)) > 1:
            raise ValueError(f"an ensemble needs one target vocabulary; the models have sizes {sizes}")
        self.models = nn.ModuleList(models)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[PerModel, PerModel]:
        """src (batch, src_len), src_len (batch,) -> every member's memory and initial state."""
        encoded = [m.encode(src, src_len) for m in self.models]
        return PerModel(mem for mem, _ in encoded), PerModel(state for _, state in encoded)

    def decode_step(self, prev: torch.Tensor, state: PerModel, memory: PerModel
                    ) -> tuple[torch.Tensor, PerModel, torch.Tensor]:
        """prev (batch,) -> mean log-probabilities (batch, vocab), new states, mean attention (batch, src_len)."""
        steps = [m.decode_step(prev, s, mem) for m, s, mem in zip(self.models, state, memory)]
        log_probs = torch.stack([lp for lp, _, _ in steps]).mean(dim=0)     # (batch, vocab)
        weights = torch.stack([w.float() for _, _, w in steps]).mean(dim=0)  # (batch, src_len)
        return log_probs, PerModel(s for _, s, _ in steps), weights

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_models(paths: Sequence[str | Path]) -> tuple[Seq2Seq | Ensemble, Tokenizer, Tokenizer, dict]:
    """One checkpoint: its model. Several: an Ensemble of them, which must share tokenizers.

    Returns the model, source and target tokenizers, and the first checkpoint's payload.
    """
    if not paths:
        raise CheckpointError("no checkpoint given")
    model, src_tok, tgt_tok, info = load_model(paths[0])
    if len(paths) == 1:
        return model, src_tok, tgt_tok, info
    models = [model]
    for path in paths[1:]:
        other, other_src, other_tgt, _ = load_model(path)
        if other_src != src_tok or other_tgt != tgt_tok:
            raise CheckpointError(f"checkpoints {paths[0]} and {path} use different tokenizers; "
                                  f"an ensemble needs one vocabulary")
        models.append(other)
    return Ensemble(models).eval(), src_tok, tgt_tok, info
