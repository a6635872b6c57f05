"""Attention over encoder outputs: Bahdanau (additive), Luong dot and general.

Attention holds no state. Each kind offers `project_keys(values) -> keys`, computed
once per sentence (the expensive part that does not depend on the decoder step), and
`forward(query, keys, values, mask) -> (context, weights)`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .energy import all_scores
from .tanh import tanh_

ATTENTION_TYPES = ("bahdanau", "dot", "general")


class Attention(nn.Module):
    """Shared masking and weighting; subclasses define keys and scores."""

    def project_keys(self, values: torch.Tensor) -> torch.Tensor:
        """(batch, src_len, value_size) -> keys (batch, src_len, key_dim)."""
        raise NotImplementedError

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (batch, steps, query_size), keys (batch, src_len, key_dim) -> (batch, steps, src_len)."""
        raise NotImplementedError

    def masked_scores(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`score`, with -inf where mask (batch, src_len) is False."""
        return self.score(query, keys).masked_fill(~mask.unsqueeze(1), float("-inf"))

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend with rows of queries, or with a query for each of several steps.

        Args:
            query: (rows, query_size) or (batch, steps, query_size): decoder top states.
                With rows = group * batch, rows i*group .. i*group+group-1 all attend over
                sentence i (the beams of one sentence share its memory, unreplicated).
            keys: (batch, src_len, key_dim) from `project_keys`.
            values: (batch, src_len, value_size) encoder outputs.
            mask: (batch, src_len) True at real tokens, False at padding.
        Returns:
            context (rows or batch, [steps,] value_size) and weights (rows or batch, [steps,]
            src_len): zero at padding, summing to one over each sentence.
        """
        single = query.dim() == 2
        if single:
            rows, batch = query.size(0), keys.size(0)
            if rows % batch:
                raise ValueError(f"{rows} query rows cannot share {batch} sentences' memory evenly")
            q = query.view(batch, rows // batch, -1)                  # (batch, group, query_size)
        else:
            q = query                                                 # (batch, steps, query_size)
        scores = self.masked_scores(q, keys, mask)                    # (batch, steps, src_len)
        weights = torch.softmax(scores, dim=-1)                       # (batch, steps, src_len)
        context = torch.bmm(weights, values)                          # (batch, steps, value_size)
        if single:
            return context.reshape(rows, -1), weights.reshape(rows, -1)  # (rows, value_size), (rows, src_len)
        return context, weights


class BahdanauAttention(Attention):
    """score(q, k_j) = v . tanh(W_q q + W_k h_j)  (Bahdanau et al., 2015).

    The energies cost a tanh per query row x source position x attention unit, padding
    included. Where padding is a large share of the memory (a continuous-batching
    search pads every source to the longest one in flight), `masked_scores` computes
    them at the real positions only: the same numbers, gathered and scattered back
    (when decoding on a CPU, validation included; training steps keep the padded path).
    """

    # below this share of real positions in the memory, only the real ones are scored
    ragged_below = 0.8

    def __init__(self, query_size: int, value_size: int, attention_size: int):
        super().__init__()
        self.key_layer = nn.Linear(value_size, attention_size, bias=False)
        self.query_layer = nn.Linear(query_size, attention_size, bias=False)
        self.energy_layer = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, values: torch.Tensor) -> torch.Tensor:
        return self.key_layer(values)  # (batch, src_len, attention_size)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = self.query_layer(query)                                 # (batch, steps, attention_size)
        if torch.is_grad_enabled() and keys.device.type == "cpu":
            # training: float32 energies a cache-sized tile at a time, recomputed in the backward pass
            scores = all_scores(keys, q, self.energy_layer.weight.view(-1))  # (batch, steps, src_len)
            return scores if torch.is_autocast_enabled("cpu") else scores.to(q.dtype)
        energy = tanh_(q.unsqueeze(2) + keys.unsqueeze(1))  # (batch, steps, src_len, attention_size); one buffer
        return self.energy_layer(energy).squeeze(-1)                # (batch, steps, src_len)

    def masked_scores(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, width = mask.shape
        # training keeps the padded path (and its backward); a GPU would wait on nonzero() for little gain
        if torch.is_grad_enabled() or keys.device.type != "cpu":
            return super().masked_scores(query, keys, mask)
        real = mask.nonzero()                                       # (P, 2): sentence, position
        if real.size(0) >= self.ragged_below * batch * width:
            return super().masked_scores(query, keys, mask)
        sentence = real[:, 0]                                       # (P,)
        flat = sentence * width + real[:, 1]                        # (P,) index into batch*width
        k = keys.reshape(batch * width, -1).index_select(0, flat)   # (P, attention_size)
        q = self.query_layer(query).index_select(0, sentence)       # (P, steps, attention_size)
        energy = tanh_(q.add_(k.unsqueeze(1)))                      # (P, steps, attention_size)
        real_scores = self.energy_layer(energy).squeeze(-1)         # (P, steps)
        scores = real_scores.new_full((batch * width, query.size(1)), float("-inf"))
        scores = scores.index_copy(0, flat, real_scores)            # (batch*width, steps)
        return scores.view(batch, width, -1).transpose(1, 2)        # (batch, steps, src_len)


class DotAttention(Attention):
    """score(q, h_j) = q . h_j  (Luong et al., 2015); needs query_size == value_size."""

    def __init__(self, query_size: int, value_size: int):
        super().__init__()
        if query_size != value_size:
            raise ValueError(
                f"dot attention needs the decoder's top hidden size ({query_size}) to equal the "
                f"encoder output size ({value_size}); use attention=general or bahdanau instead"
            )

    def project_keys(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (batch, steps, src_len)


class GeneralAttention(DotAttention):
    """score(q, h_j) = q . W h_j  (Luong et al., 2015). W h_j is the precomputed key."""

    def __init__(self, query_size: int, value_size: int):
        nn.Module.__init__(self)
        self.key_layer = nn.Linear(value_size, query_size, bias=False)

    def project_keys(self, values: torch.Tensor) -> torch.Tensor:
        return self.key_layer(values)  # (batch, src_len, query_size)


def build_attention(kind: str, query_size: int, value_size: int, attention_size: int) -> Attention:
    if kind == "bahdanau":
        return BahdanauAttention(query_size, value_size, attention_size)
    if kind == "dot":
        return DotAttention(query_size, value_size)
    if kind == "general":
        return GeneralAttention(query_size, value_size)
    raise ValueError(f"Unknown attention {kind!r}; choose one of: {', '.join(ATTENTION_TYPES)}")


class Memory(NamedTuple):
    """What the decoder attends over, computed once per batch of sentences.

    One row per sentence: a beam search keeps it so, and the decoder state's k beam rows
    of a sentence share its row (see `Attention.forward`), so memory is never copied k
    times, neither when a search starts nor when sentences join or leave it.
    """

    values: torch.Tensor  # (batch, src_len, enc_out) encoder outputs
    keys: torch.Tensor    # (batch, src_len, key_dim) attention.project_keys(values)
    mask: torch.Tensor    # (batch, src_len) True at real tokens

    def index_select(self, index: torch.Tensor) -> Memory:
        """Rows `index` (e.g. to retire finished sentences)."""
        return Memory(self.values.index_select(0, index), self.keys.index_select(0, index),
                      self.mask.index_select(0, index))

    def cat(self, other: Memory) -> Memory:
        """These rows, then other's: the shorter source is padded (and masked) to the longer."""
        width = max(self.mask.size(1), other.mask.size(1))
        return Memory(*(torch.cat([pad_source(a, width), pad_source(b, width)]) for a, b in zip(self, other)))

    def crop_source(self, width: int) -> Memory:
        """Only the first `width` source positions (those past every row's length are padding)."""
        return Memory(self.values[:, :width].contiguous(), self.keys[:, :width].contiguous(),
                      self.mask[:, :width].contiguous())


def pad_source(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """x with zeros (False in a mask) appended along the source dimension `dim` up to `width`."""
    missing = width - x.size(dim)
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
