"""Text in, text out: the Python API over a checkpoint.

    from seq2seq import Translator
    translator = Translator.from_checkpoint("best.ckpt")
    translator.translate(["Ein Hund rennt."], beam_size=5)

Policies (the README's "What happens when..." lists them too):
- an empty or whitespace-only line gives an empty output line; the model never sees it;
- a line longer than `max_source_len` subwords is cropped to that length, with a
  warning naming the line;
- the output has exactly one entry per input line, in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .cpu import keep_freed_memory
from .data import collate
from .model import Seq2Seq
from .search import Hypothesis, max_lengths, search
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
_EMPTY = np.zeros(0, dtype=np.int64)  # no target side when translating


@dataclass
class Translation:
    text: str
    score: float                 # ranking score (length-normalised for beams)
    log_prob: float              # total log-probability of the output, EOS included
    pieces: list[str]            # output subwords
    attention: torch.Tensor | None = None  # (output steps, source subwords + EOS)
    source_pieces: list[str] | None = None


@dataclass
class SearchOptions:
    beam_size: int = 5
    nbest: int = 1
    alpha: float = 0.0           # GNMT length penalty strength
    normalisation: str = "gnmt"  # gnmt | average | none
    max_len_a: float = 1.5       # output at most a * source subwords + b
    max_len_b: int = 10
    max_output_len: int = 512
    min_len: int = 0


class Translator:
    def __init__(self, model: Seq2Seq, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer,
                 info: dict | None = None, *, device: str | torch.device = "cpu",
                 max_source_len: int = 250):
        keep_freed_memory()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.info = info or {}
        self.max_source_len = max_source_len

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs) -> Translator:
        model, src_tok, tgt_tok, info = load_model(path)
        return cls(model, src_tok, tgt_tok, info, device=device, **kwargs)

    def _encode_sources(self, lines: Sequence[str], line_numbers: Sequence[int]) -> list[list[int]]:
        ids = self.src_tokenizer.encode(lines)
        for i, seq in enumerate(ids):
            if len(seq) > self.max_source_len:
                log.warning("input line %d: %d subwords, cropped to the first %d",
                            line_numbers[i], len(seq), self.max_source_len)
                ids[i] = seq[:self.max_source_len]
        return ids

    def translate_hypotheses(self, lines: Sequence[str], options: SearchOptions | None = None,
                             *, batch_size: int = 64, return_attention: bool = False,
                             first_line: int = 1) -> list[list[Translation]]:
        """Up to `options.nbest` translations per line, in input order.

        `first_line` is the 1-based number of lines[0] in the user's file, for warnings.
        """
        opts = options or SearchOptions()
        results: list[list[Translation]] = [[Translation("", 0.0, 0.0, [])] for _ in lines]
        todo = [i for i, line in enumerate(lines) if line.strip()]
        if not todo:
            return results
        ids = self._encode_sources([lines[i].strip() for i in todo], [first_line + i for i in todo])
        # longest first: similar lengths share a batch, and memory peaks early if at all
        order = sorted(range(len(todo)), key=lambda j: -len(ids[j]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([(j, np.asarray(ids[j], dtype=np.int64), _EMPTY) for j in chunk])
            src, src_len = batch.src.to(self.device), batch.src_len.to(self.device)
            limits = max_lengths(src_len, opts.max_len_a, opts.max_len_b, opts.max_output_len)
            hyps = search(self.model, src, src_len, limits, opts.beam_size, nbest=opts.nbest,
                          alpha=opts.alpha, normalisation=opts.normalisation, min_len=opts.min_len,
                          return_attention=return_attention)
            for pos, (j, sentence_hyps) in enumerate(zip(chunk, hyps)):
                n_src = int(batch.src_len[pos])
                results[todo[j]] = [self._to_translation(h, ids[j], n_src, return_attention)
                                    for h in sentence_hyps]
        return results

    def _to_translation(self, h: Hypothesis, src_ids: list[int], src_len: int,
                        with_attention: bool) -> Translation:
        text = self.tgt_tokenizer.decode([h.tokens])[0]
        t = Translation(text, h.score, h.log_prob, self.tgt_tokenizer.id_to_piece(h.tokens))
        if with_attention and h.attention is not None:
            t.attention = h.attention[:, :src_len]  # (steps, src subwords + EOS)
            t.source_pieces = self.src_tokenizer.id_to_piece(src_ids) + ["</s>"]
        return t

    def translate(self, lines: Sequence[str] | str, beam_size: int = 5, *, batch_size: int = 64,
                  **options) -> list[str] | str:
        """Best translation of each line (or of one string)."""
        single = isinstance(lines, str)
        batch = [lines] if single else list(lines)
        opts = SearchOptions(beam_size=beam_size, **options)
        out = [hyps[0].text for hyps in self.translate_hypotheses(batch, opts, batch_size=batch_size)]
        return out[0] if single else out
