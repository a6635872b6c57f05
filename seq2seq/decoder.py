"""The decoder: a stack of nn.LSTMCell stepped one target token at a time.

Each step: layer 0 reads the embedding of the previous token and, with input feeding
(Luong et al., 2015; the default model), the previous attentional vector; each higher
layer reads the one below (with dropout between layers), the top hidden state queries the
attention, and tanh(W [context; top hidden]) is the attentional vector the output layer
reads. Without input feeding (the recipes) nothing but the cells' state passes from one
step to the next, so teacher-forced training runs each layer over the whole target as one
fused LSTM kernel (`CellStack.over_time`) and attends for all steps at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .attention import Memory, build_attention
from .bptt import teacher_forced
from .dropout import Dropout, word_dropout
from .tokenizer import PAD_ID

LayerState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (batch, hidden_l)
BRIDGES = ("dense", "zeros")


class DecoderState(NamedTuple):
    hidden: tuple[LayerState, ...]  # one (h, c) per layer
    feed: torch.Tensor              # (batch, output_size) previous attentional vector

    def index_select(self, index: torch.Tensor) -> DecoderState:
        return DecoderState(
            tuple((h.index_select(0, index), c.index_select(0, index)) for h, c in self.hidden),
            self.feed.index_select(0, index),
        )

    def cat(self, other: DecoderState) -> DecoderState:
        """These rows, then other's."""
        return DecoderState(
            tuple((torch.cat([h, oh]), torch.cat([c, oc])) for (h, c), (oh, oc) in zip(self.hidden, other.hidden)),
            torch.cat([self.feed, other.feed]),
        )


class CellStack(nn.Module):
    """nn.LSTMCell layers, each with its own hidden size, dropout between layers.

    Looping it over time with the weights of an nn.LSTM reproduces that nn.LSTM
    (tests/test_model.py holds it to that).
    """

    def __init__(self, input_size: int, hidden_sizes: Sequence[int], dropout: float = 0.0):
        super().__init__()
        sizes = [input_size, *hidden_sizes]
        self.cells = nn.ModuleList(nn.LSTMCell(sizes[i], sizes[i + 1]) for i in range(len(hidden_sizes)))
        self.dropout = Dropout(dropout)

    def over_time(self, x: torch.Tensor, hidden: Sequence[LayerState]) -> torch.Tensor:
        """Run the stack over a whole sequence at once; x: (batch, steps, input_size).

        Returns the top layer's outputs (batch, steps, top_hidden). Same result as
        looping `forward` over the steps, but each layer is one fused LSTM kernel call
        (the one nn.LSTM itself uses) with the cells' own weights: the documented
        LSTMCell/LSTM equivalence is what makes this valid, and the tests check it.
        Only possible when a step's input does not depend on the previous step's
        output (no input feeding).
        """
        for i, cell in enumerate(self.cells):
            if i > 0:
                x = self.dropout(x)
            h0, c0 = hidden[i]
            x, _, _ = torch._VF.lstm(
                x, (h0.unsqueeze(0), c0.unsqueeze(0)),
                (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),
                True, 1, 0.0, self.training, False, True,  # biases, layers, dropout, train, bidir, batch_first
            )  # (batch, steps, hidden_i)
        return x

    def forward(self, x: torch.Tensor, hidden: Sequence[LayerState]) -> tuple[LayerState, ...]:
        """x: (batch, input_size) -> new (h, c) of every layer; the top h is the output."""
        new = []
        for i, cell in enumerate(self.cells):
            if i > 0:
                x = self.dropout(x)
            h, c = cell(x, hidden[i])  # (batch, hidden_i) each
            new.append((h, c))
            x = h
        return tuple(new)


class Bridge(nn.Module):
    """Encoder final (h_n, c_n) -> initial (h, c) of every decoder layer.

    Decoder and encoder stacks are aligned at the top: decoder layer i starts from
    encoder layer i + (enc_layers - dec_layers), clamped to the bottom layer, with both
    directions concatenated, through tanh(Linear). Any combination of directions and
    layer counts works.
    """

    def __init__(self, kind: str, enc_hidden: int, enc_layers: int, enc_directions: int,
                 dec_hidden_sizes: Sequence[int]):
        super().__init__()
        if kind not in BRIDGES:
            raise ValueError(f"Unknown bridge {kind!r}; choose one of: {', '.join(BRIDGES)}")
        self.kind = kind
        self.enc_layers, self.enc_directions = enc_layers, enc_directions
        self.dec_hidden_sizes = list(dec_hidden_sizes)
        n_dec = len(dec_hidden_sizes)
        self.source_layer = [max(0, i + enc_layers - n_dec) for i in range(n_dec)]
        if kind == "dense":
            size = enc_directions * enc_hidden
            self.h_proj = nn.ModuleList(nn.Linear(size, d) for d in dec_hidden_sizes)
            self.c_proj = nn.ModuleList(nn.Linear(size, d) for d in dec_hidden_sizes)

    def forward(self, h_n: torch.Tensor, c_n: torch.Tensor) -> tuple[LayerState, ...]:
        """h_n, c_n: (directions*layers, batch, enc_hidden) -> per layer (batch, dec_hidden_i)."""
        batch = h_n.size(1)
        if self.kind == "zeros":
            return tuple((h_n.new_zeros(batch, d), h_n.new_zeros(batch, d)) for d in self.dec_hidden_sizes)

        def by_layer(x: torch.Tensor) -> torch.Tensor:
            # nn.LSTM orders the first dim as layer*directions + direction
            x = x.view(self.enc_layers, self.enc_directions, batch, -1)  # (layers, dirs, batch, hidden)
            return x.permute(0, 2, 1, 3).reshape(self.enc_layers, batch, -1)  # (layers, batch, dirs*hidden)

        h, c = by_layer(h_n), by_layer(c_n)
        return tuple(
            (torch.tanh(self.h_proj[i](h[j])), self.c_proj[i](c[j]))
            for i, j in enumerate(self.source_layer)
        )


class Decoder(nn.Module):
    """Attention LSTM decoder with input feeding over a stack of LSTMCells."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_sizes: Sequence[int],
        encoder_output_size: int,
        *,
        attention: str = "bahdanau",
        attention_size: int | None = None,
        dropout: float = 0.0,
        input_feeding: bool = True,
        tie_embeddings: bool = False,
        word_dropout: float = 0.0,
    ):
        super().__init__()
        if not hidden_sizes:
            raise ValueError("decoder needs at least one layer: hidden_sizes is empty")
        top = hidden_sizes[-1]
        self.output_size = embedding_size if tie_embeddings else top
        self.input_feeding = input_feeding
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD_ID)
        self.dropout = Dropout(dropout)
        self.word_dropout = word_dropout  # probability of dropping a whole previous target token in training
        self.cells = CellStack(embedding_size + (self.output_size if input_feeding else 0), hidden_sizes, dropout)
        self.attention = build_attention(attention, top, encoder_output_size, attention_size or top)
        self.combine = nn.Linear(encoder_output_size + top, self.output_size, bias=False)
        self.output_layer = nn.Linear(self.output_size, vocab_size, bias=True)
        if tie_embeddings:
            # One matrix for reading and writing target words (Press & Wolf, 2017):
            # fewer parameters and better BLEU on small corpora.
            self.output_layer.weight = self.embedding.weight

    def initial_state(self, hidden: tuple[LayerState, ...]) -> DecoderState:
        h0 = hidden[0][0]
        return DecoderState(hidden, h0.new_zeros(h0.size(0), self.output_size))

    def step(self, prev: torch.Tensor, state: DecoderState, memory: Memory
             ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """One decoder step.

        Args:
            prev: (batch,) previous target token ids.
        Returns:
            attentional vector (batch, output_size), new state, attention weights (batch, src_len).
        """
        return self._step(self.embed(prev), state, memory)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch[, len]) ids -> (batch[, len], emb), word dropout and dropout applied in training."""
        return self.dropout(word_dropout(self.embedding(tokens), self.word_dropout, self.training))

    def _step(self, emb: torch.Tensor, state: DecoderState, memory: Memory
              ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """`step` from the embedded previous token, emb: (batch, emb)."""
        x = torch.cat([emb, state.feed], dim=-1) if self.input_feeding else emb  # (batch, emb [+ output_size])
        hidden = self.cells(x, state.hidden)
        top = hidden[-1][0]                                     # (batch, top)
        context, weights = self.attention(top, memory.keys, memory.values, memory.mask)
        attn_vec = torch.tanh(self.combine(torch.cat([context, top], dim=-1)))  # (batch, output_size)
        return attn_vec, DecoderState(hidden, attn_vec), weights

    def logits(self, attn_vec: torch.Tensor) -> torch.Tensor:
        """(..., output_size) -> (..., vocab)."""
        return self.output_layer(self.dropout(attn_vec))

    def forward(self, tgt_in: torch.Tensor, state: DecoderState, memory: Memory
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding of a whole target batch.

        Args:
            tgt_in: (batch, tgt_len) BOS + target ids.
        Returns:
            logits (batch, tgt_len, vocab), attention weights (batch, tgt_len, src_len).
        """
        vectors, weights = self.attentional_vectors(tgt_in, state, memory)
        return self.logits(vectors), weights  # one output projection for all steps

    def attentional_vectors(self, tgt_in: torch.Tensor, state: DecoderState, memory: Memory,
                            lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing up to the output layer: (batch, tgt_len, output_size), weights (batch, tgt_len, src_len).

        lengths: optional (batch,) positions each row needs; with input feeding, positions past
        them are then not computed (zero vectors and weights), as the loss never reads them.
        """
        # Embed all steps at once: one embedding backward instead of one dense
        # (vocab, emb) gradient per step.
        embedded = self.embed(tgt_in)  # (batch, tgt_len, emb)
        if not self.input_feeding:
            # nothing feeds back from step t to t+1 but the LSTM state: run the whole
            # sequence through fused LSTM kernels and attend for all steps at once
            tops = self.cells.over_time(embedded, state.hidden)            # (batch, tgt_len, top)
            context, weights = self.attention(tops, memory.keys, memory.values, memory.mask)
            return torch.tanh(self.combine(torch.cat([context, tops], dim=-1))), weights  # (batch, tgt_len, out)
        # `_step` over every step as one autograd node with its backward written out
        # (bptt.py): the same numbers, a fraction of the time
        return teacher_forced(self, embedded, state.hidden, state.feed, memory, lengths)

    def forward_stepwise(self, tgt_in: torch.Tensor, state: DecoderState, memory: Memory
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with input feeding as a plain loop over `_step`: the reference bptt.py is held to."""
        embedded = self.embed(tgt_in)  # (batch, tgt_len, emb)
        vectors, weights = [], []
        for t in range(tgt_in.size(1)):
            attn_vec, state, w = self._step(embedded[:, t], state, memory)
            vectors.append(attn_vec)
            weights.append(w)
        return self.logits(torch.stack(vectors, dim=1)), torch.stack(weights, dim=1)
