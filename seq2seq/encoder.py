"""The encoder: embedding -> nn.LSTM over packed sequences."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .tokenizer import PAD_ID


class Encoder(nn.Module):
    """Bidirectional (or not) multi-layer LSTM over source embeddings.

    Sequences are packed, so a sentence's encoding does not depend on how much
    padding its batch has.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
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
        emb = self.dropout(self.embedding(src))  # (batch, src_len, emb)
        packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = self.lstm(packed)
        # total_length keeps the padded width so masks built from `src` still line up
        outputs, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        return self.dropout(outputs), (h_n, c_n)  # (batch, src_len, dirs*hidden)
