"""The encoder: embedding -> nn.LSTM, with packed-sequence semantics.

A sentence's encoding does not depend on how much padding its batch has: each
direction reads only the sentence's real tokens, and (h_n, c_n) are the states after
its last real token, exactly as `nn.LSTM` over a `PackedSequence` gives them
(tests/test_model.py holds it to that). A packed sequence makes PyTorch's CPU LSTM
step a batch of shrinking size through time with a separate small product per step,
and autograd record each one; `nn.LSTM` over a dense batch runs a fused kernel
(oneDNN, bfloat16 under autocast) instead. So on the CPU the batch is sorted by
length and cut at every length some sentence ends at: each segment of steps runs
densely over the sentences still going, from the states where the previous segment
stopped, and the backward direction reads each sentence reversed within its length.
Batches come from length buckets, so the first segment holds most of the work. In
float32 training a layer's directions are instead one autograd node with its backward pass
written out (lstm.py), which saves the kernel calls' fixed costs and steps both directions
with one batch product and one set of elementwise operations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .dropout import Dropout, dropout, word_dropout
from .lstm import sorted_lstm
from .tokenizer import PAD_ID


class Encoder(nn.Module):
    """Bidirectional (or not) multi-layer LSTM over source embeddings."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        word_dropout: float = 0.0,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD_ID)
        self.dropout = Dropout(dropout)
        self.word_dropout = word_dropout  # probability of dropping a whole source token in training
        self.lstm = nn.LSTM(
            embedding_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
            # nn.LSTM applies dropout between layers only; with one layer it would warn
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.num_directions = 2 if bidirectional else 1
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.output_size = self.num_directions * hidden_size

    def forward(
        self, src: torch.Tensor, src_len: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Encode a padded batch.

        Args:
            src: (batch, src_len) token ids.
            src_len: (batch,) true lengths.
        Returns:
            outputs: (batch, src_len, directions*hidden), zeros at padding.
            (h_n, c_n): each (directions*layers, batch, hidden), as nn.LSTM returns them.
        """
        emb = self.dropout(word_dropout(self.embedding(src), self.word_dropout, self.training))  # (batch, src_len, emb)
        if emb.device.type == "cpu":
            outputs, (h_n, c_n) = self.segmented(emb, src_len)
        else:  # cuDNN runs packed sequences fused already
            packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
            out, (h_n, c_n) = self.lstm(packed)
            # total_length keeps the padded width so masks built from `src` still line up
            outputs, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        return self.dropout(outputs), (h_n, c_n)  # (batch, src_len, dirs*hidden)

    def packed(self, emb: torch.Tensor, src_len: torch.Tensor
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """nn.LSTM over the packed batch: the reference `segmented` is held to."""
        packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=emb.size(1))[0], state

    def segmented(self, emb: torch.Tensor, src_len: torch.Tensor
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`packed`'s results from dense LSTM kernel calls over length segments (with gradients
        outside autocast: from `lstm.sorted_lstm`, one autograd node for a layer's directions).

        emb: (batch, src_len, emb) -> outputs (batch, src_len, dirs*hidden) zero at padding,
        (h_n, c_n) each (dirs*layers, batch, hidden).
        """
        batch, width, _ = emb.shape
        lengths = src_len.to("cpu", torch.long)
        order = torch.argsort(lengths, descending=True, stable=True)      # longest first
        ordered = lengths[order].tolist()
        x = emb.index_select(0, order.to(emb.device))                     # (batch, width, emb)
        reverse = None
        if self.num_directions == 2:
            # position t of row b reads position len_b-1-t (t < len_b); padding stays put
            t = torch.arange(width)
            n = torch.tensor(ordered).unsqueeze(1)
            reverse = torch.where(t < n, n - 1 - t, t).to(emb.device)     # (batch, width)
        # under autocast each kernel call would cast the weights (and its backward the
        # gradients) again: once per segment; cast them once for all segments instead
        low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        if low is not None:
            x = x.to(low)
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.lstm.dropout and self.training:
                x = dropout(x, self.lstm.dropout)
            weights = [tuple(getattr(self.lstm, f"{kind}_l{layer}{suffix}") for kind in
                             ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                       for suffix in ("", "_reverse")[:self.num_directions]]
            if low is not None:
                weights = [tuple(w.to(low) for w in ws) for ws in weights]
            inputs = [x, _gather_time(x, reverse)] if reverse is not None else [x]
            if low is None and torch.is_grad_enabled():                   # the directions as one autograd node (lstm.py)
                out, h, c = sorted_lstm(torch.stack(inputs), ordered, *(torch.stack(w) for w in zip(*weights)))
                outs, hs, cs = list(out.unbind(0)), h.unbind(0), c.unbind(0)  # each (batch, width, hidden), (batch, hidden)
            else:
                outs, hs, cs = zip(*(_run_segments(inp, ordered, ws, self.training) for inp, ws in zip(inputs, weights)))
                outs = list(outs)
            if reverse is not None:
                outs[1] = _gather_time(outs[1], reverse)
            finals_h.extend(hs)
            finals_c.extend(cs)
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]       # (batch, width, dirs*hidden)
        unsort = torch.argsort(order).to(emb.device)
        outputs = x.index_select(0, unsort)
        h_n = torch.stack(finals_h).index_select(1, unsort)               # (dirs*layers, batch, hidden)
        c_n = torch.stack(finals_c).index_select(1, unsort)
        return outputs, (h_n, c_n)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, width, size) with row b's positions taken in the order index[b] (batch, width)."""
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.size(2)))


def _run_segments(x: torch.Tensor, lengths: list[int], weights: tuple, training: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction of one layer over rows sorted by length, longest first.

    x (batch, width, in) -> outputs (batch, width, hidden) zero past each row's length,
    and the state after each row's last real step, h and c (batch, hidden).
    """
    batch, width = x.size(0), x.size(1)
    hidden = weights[1].size(1)
    h = x.new_zeros(1, batch, hidden)
    c = x.new_zeros(1, batch, hidden)
    pieces, ends_h, ends_c = [], [], []
    start = 0
    for end in sorted(set(lengths)):
        rows = sum(1 for n in lengths if n >= end)                       # the rows still going
        done = sum(1 for n in lengths if n > end)                         # rows done here: done..rows-1
        if end > start:
            out, h, c = torch._VF.lstm(
                x[:rows, start:end], (h[:, :rows], c[:, :rows]), weights,
                True, 1, 0.0, training, False, True,  # biases, layers, dropout, train, bidir, batch_first
            )                                                             # out (rows, end-start, hidden)
            pieces.append(nn.functional.pad(out, (0, 0, 0, 0, 0, batch - rows)))
        ends_h.append(h[0, done:rows])
        ends_c.append(c[0, done:rows])
        start = end
    if start < width or not pieces:
        dtype = pieces[0].dtype if pieces else x.dtype
        pieces.append(x.new_zeros(batch, width - start, hidden, dtype=dtype))
    # rows finishing first are the last rows: reverse the order of the pieces of the final states
    return torch.cat(pieces, dim=1), torch.cat(ends_h[::-1]), torch.cat(ends_c[::-1])
