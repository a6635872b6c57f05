"""Several models translating as one.

An `Ensemble` offers the interface search needs (`encode`, `decode_step`, and
state and memory that reorder by `index_select`), so greedy, sampling, beam search
and forced decoding run over it unchanged. At every step it takes the mean of the
members' log-probabilities: the log of their geometric mean, not renormalised
(a product of experts; the scores of an ensemble of identical models are those of
one model). Its attention is the members' mean attention.

`pack` writes several models into one ensemble file (checkpoint format version 2):
one tokenizer, each member's config, meta and weights (keys "members.I.model.*"), and
a length penalty of the ensemble's own once `seq2seq-tune` has chosen one. Such a file
translates like any model.pt; `load_models` reads single-model and ensemble files alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (ENSEMBLE_FORMAT_VERSION, PREFIX, CheckpointError, is_ensemble, model_from,
                         read_checkpoint, same_tokenizer)
from .files import InputError, atomic_write
from .model import Seq2Seq
from .tokenizer import Tokenizer


def _shared_meta(meta: dict | None) -> dict:
    """A member's meta without what described it alone: the length penalty chosen for it."""
    return {k: v for k, v in (meta or {}).items() if k != "decoding"}


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


def _members(path: str | Path) -> tuple[list[tuple[dict, dict]], dict]:
    """(payload, "model."-prefixed weights) of each model in a checkpoint file, and the file's payload."""
    ckpt = read_checkpoint(path)
    info = ckpt["seq2seq"]
    if not is_ensemble(info):
        return [(info, {k: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)})], info
    members = info.get("members")
    if not isinstance(members, list) or not members:
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (an ensemble file without members)")
    out = []
    for i, member in enumerate(members):
        prefix = f"members.{i}."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        out.append(({**member, "tokenizer": info.get("tokenizer")}, state))
    return out, info


def load_models(paths: Sequence[str | Path]) -> tuple[Seq2Seq | Ensemble, Tokenizer, Tokenizer, dict]:
    """One model: it. Several (files, or the members of an ensemble file): an Ensemble, one tokenizer.

    Returns the model, source and target tokenizers, and a payload: the file's own when one
    file is given (an ensemble file's carries its tuned length penalty); with several files
    the first one's, without the length penalty chosen for that file alone.
    """
    if not paths:
        raise CheckpointError("no checkpoint given")
    models, src_tok, tgt_tok, first_info = [], None, None, None
    for path in paths:
        members, info = _members(path)
        for member, state in members:
            model, src, tgt = model_from(member, state, path)
            if src_tok is None:
                src_tok, tgt_tok, first_info = src, tgt, info
            elif src != src_tok or tgt != tgt_tok:
                raise CheckpointError(f"checkpoints {paths[0]} and {path} use different tokenizers; "
                                      f"an ensemble needs one vocabulary")
            models.append(model)
    if len(paths) > 1:
        first_info = {**first_info, "meta": _shared_meta(first_info.get("meta"))}
    if len(models) == 1:
        return models[0], src_tok, tgt_tok, first_info
    return Ensemble(models).eval(), src_tok, tgt_tok, first_info


def pack(paths: Sequence[str | Path], output: str | Path) -> Path:
    """Write the models of `paths` (model.pt, .ckpt or ensemble files) into one ensemble file.

    The members must share one tokenizer; each is loaded strictly before anything is
    written (atomically). Training checkpoints lose their optimizer state on the way.
    """
    members, state, tokenizer, sources = [], {}, None, []
    for path in paths:
        found, _ = _members(path)
        for info, weights in found:
            model_from(info, weights, path)  # a complete model, or a CheckpointError naming the file
            if tokenizer is None:
                tokenizer = info["tokenizer"]
            elif not same_tokenizer(tokenizer, info["tokenizer"]):
                raise InputError(f"cannot pack {paths[0]} and {path} into one ensemble: different tokenizers")
            i = len(members)
            state.update({f"members.{i}.{k}": v for k, v in weights.items()})
            members.append({"model_config": dict(info["model_config"]), "config": info.get("config") or {},
                            "meta": _shared_meta(info.get("meta"))})
            sources.append(str(path))
    if len(members) < 2:
        raise InputError(f"an ensemble needs at least two models, got {len(members)} in {', '.join(map(str, paths))}")
    first = members[0]["meta"]
    meta = {k: first[k] for k in ("src_lang", "tgt_lang", "data", "train_files", "seq2seq_version",
                                  "torch_version", "lightning_version") if k in first}
    meta["ensemble_of"] = sources
    ckpt = {"seq2seq": {"format_version": ENSEMBLE_FORMAT_VERSION, "kind": "ensemble", "tokenizer": tokenizer,
                        "members": members, "meta": meta},
            "state_dict": state}
    with atomic_write(output, "wb") as f:
        torch.save(ckpt, f)
    return Path(output)
