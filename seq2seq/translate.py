"""Text in, text out: the Python API over a checkpoint.

    from seq2seq import Translator
    translator = Translator.from_checkpoint("best.ckpt")   # or a list of paths: an ensemble
    translator.translate(["Ein Hund rennt."], beam_size=5)
    translator.score(["Ein Hund rennt."], ["A dog runs."])  # forced decoding

Policies (docs/what-happens-when.md lists them with the others):
- an empty or whitespace-only line gives an empty output line; the model never sees it;
- a line longer than `max_source_len` subwords is cropped to that length, with a
  warning naming the line;
- the output has exactly one entry per input line, in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import is_ensemble
from .cpu import keep_freed_memory, limit_kernel_cache
from .data import collate
from .ensemble import Ensemble, load_models
from .model import Seq2Seq
from .quantize import check_precision, for_precision, resolve_precision
from .search import BeamSearch, Hypothesis, SearchOptions, forced_log_probs, max_lengths, normalise, search
from .tokenizer import Tokenizer
from .tune import stored_alpha

__all__ = ["ForcedScore", "SearchOptions", "Translation", "TranslationStream", "Translator"]

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
class ForcedScore:
    """How probable the model finds a given target (teacher forcing)."""

    log_prob: float               # total log-probability, EOS included
    token_log_probs: list[float]  # one per target subword, then EOS
    pieces: list[str]             # target subwords, then "</s>"
    score: float                  # log_prob normalised as beams are ranked (--alpha, --normalisation)

    @property
    def mean_log_prob(self) -> float:
        """log_prob per token (EOS included): the length-normalised score."""
        return self.log_prob / len(self.token_log_probs)


def blank_translations() -> list[Translation]:
    """What a blank line gets, a line with no subwords: one empty translation; the model never sees it."""
    return [Translation("", 0.0, 0.0, [])]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class Translator:
    def __init__(self, model: Seq2Seq | Ensemble, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer,
                 info: dict | None = None, *, device: str | torch.device = "cpu",
                 max_source_len: int = 250, precision: str = "float32"):
        keep_freed_memory()
        limit_kernel_cache()
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)  # "auto" -> what it is here
        self.model = for_precision(model.to(self.device).eval(), self.precision, self.device)
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.info = info or {}
        if max_source_len < 1:
            raise ValueError(f"max_source_len must be >= 1, got {max_source_len}")
        self.max_source_len = max_source_len
        # the length penalty chosen on validation for this model (tune.py), used where
        # options leave alpha None; an ensemble has one only when it was packed into a file
        # and tuned as a whole (ensemble.pack, seq2seq-tune)
        tuned = stored_alpha(self.info) if not isinstance(model, Ensemble) or is_ensemble(self.info) else None
        self.default_alpha = tuned if tuned is not None else 0.0

    @classmethod
    def from_checkpoint(cls, path: str | Path | Sequence[str | Path], device: str = "cpu",
                        max_source_len: int = 250, precision: str = "float32") -> Translator:
        """A checkpoint, or a list of them: an ensemble averaging their log-probabilities.

        precision: "auto", "float32", "bfloat16" or "int8" (CPU only); quantize.py says what they change.
        """
        check_precision(precision, device)  # before the (slow) load
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        model, src_tok, tgt_tok, info = load_models(paths)
        return cls(model, src_tok, tgt_tok, info, device=device, max_source_len=max_source_len,
                   precision=precision)

    from_checkpoints = from_checkpoint

    def resolve(self, options: SearchOptions | None = None) -> SearchOptions:
        """`options` (default: SearchOptions()) with alpha=None replaced by this model's default_alpha."""
        options = options or SearchOptions()
        return options if options.alpha is not None else replace(options, alpha=self.default_alpha)

    def sampling_generator(self, seed: int) -> torch.Generator:
        """The one source of randomness for sampling: seeded, on the model's device."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def _encode_sources(self, lines: Sequence[str], line_numbers: Sequence[int]) -> list[list[int]]:
        ids = self.src_tokenizer.encode(lines)
        for i, seq in enumerate(ids):
            if len(seq) > self.max_source_len:
                log.warning("input line %d: %d subwords, cropped to the first %d",
                            line_numbers[i], len(seq), self.max_source_len)
                ids[i] = seq[:self.max_source_len]
        return ids

    def _nonblank(self, lines: Sequence[str], first_line: int) -> tuple[list[int], list[list[int]]]:
        """The positions of the lines the model sees, and their source ids (cropped).

        A blank line is one with no subwords: empty, whitespace, or only characters the
        tokenizer drops (a zero-width space, a byte-order mark).
        """
        todo = [i for i, line in enumerate(lines) if line.strip()]
        ids = self._encode_sources([lines[i].strip() for i in todo], [first_line + i for i in todo])
        kept = [j for j, seq in enumerate(ids) if seq]
        return [todo[j] for j in kept], [ids[j] for j in kept]

    def translate_hypotheses(self, lines: Sequence[str], options: SearchOptions | None = None,
                             *, batch_size: int = 64, return_attention: bool = False,
                             first_line: int = 1, generator: torch.Generator | None = None
                             ) -> list[list[Translation]]:
        """Up to `options.nbest` translations per line, in input order.

        `first_line` is the 1-based number of lines[0] in the user's file, for warnings.
        `generator` draws the samples when `options.sample` (default: seeded with
        options.seed); pass the same one to successive calls to continue one stream.
        """
        _check_batch_size(batch_size)
        opts = self.resolve(options)
        if opts.sample and generator is None:
            generator = self.sampling_generator(opts.seed)
        results: list[list[Translation]] = [blank_translations() for _ in lines]
        todo, ids = self._nonblank(lines, first_line)
        if not todo:
            return results
        # longest first: similar lengths share a batch, and memory peaks early if at all
        order = sorted(range(len(todo)), key=lambda j: -len(ids[j]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src, src_len, limits = self._source_batch([ids[j] for j in chunk], opts)
            hyps = search(self.model, src, src_len, limits, opts, generator=generator,
                          return_attention=return_attention)
            for j, n_src, sentence_hyps in zip(chunk, src_len.tolist(), hyps):
                results[todo[j]] = [self._to_translation(h, ids[j], n_src, return_attention)
                                    for h in sentence_hyps]
        return results

    def _source_batch(self, ids: Sequence[Sequence[int]], opts: SearchOptions
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source ids -> src (n, src_len) with EOS, src_len (n,) and output limits (n,), on the device."""
        batch = collate([(j, np.asarray(seq, dtype=np.int64), _EMPTY) for j, seq in enumerate(ids)])
        src, src_len = batch.src.to(self.device), batch.src_len.to(self.device)
        return src, src_len, max_lengths(src_len, opts.max_len_a, opts.max_len_b, opts.max_output_len)

    def stream(self, options: SearchOptions | None = None, *, return_attention: bool = False) -> TranslationStream:
        """A running search that sentences join and leave between decoder steps (for the service)."""
        return TranslationStream(self, options or SearchOptions(), return_attention=return_attention)

    def _to_translation(self, h: Hypothesis, src_ids: list[int], src_len: int,
                        with_attention: bool) -> Translation:
        text = self.tgt_tokenizer.decode([h.tokens])[0]
        t = Translation(text, h.score, h.log_prob, self.tgt_tokenizer.id_to_piece(h.tokens))
        if with_attention and h.attention is not None:
            t.attention = h.attention[:, :src_len]  # (steps, src subwords + EOS)
            t.source_pieces = self.src_tokenizer.id_to_piece(src_ids) + ["</s>"]
        return t

    def translate(self, lines: Sequence[str] | str, beam_size: int = 5, *, batch_size: int = 64,
                  options: SearchOptions | None = None) -> list[str] | str:
        """Best translation of each line (or of one string); `options` overrides beam_size."""
        single = isinstance(lines, str)
        batch = [lines] if single else list(lines)
        opts = options or SearchOptions(beam_size=beam_size)
        out = [hyps[0].text for hyps in self.translate_hypotheses(batch, opts, batch_size=batch_size)]
        return out[0] if single else out

    def score(self, sources: Sequence[str], targets: Sequence[str], options: SearchOptions | None = None,
              *, batch_size: int = 64, first_line: int = 1) -> list[ForcedScore | None]:
        """Force-decode each target given its source: its log-probability under the model.

        None where the source is empty or whitespace (the model never sees it, as when
        translating); an empty target is scored as EOS alone. Sources are cropped like
        `translate_hypotheses` crops them. `options` gives alpha/normalisation for `score`.
        """
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        _check_batch_size(batch_size)
        opts = self.resolve(options)
        results: list[ForcedScore | None] = [None] * len(sources)
        todo, src_ids = self._nonblank(sources, first_line)
        if not todo:
            return results
        tgt_ids = self.tgt_tokenizer.encode([targets[i].strip() for i in todo])
        order = sorted(range(len(todo)), key=lambda j: -len(src_ids[j]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([(j, np.asarray(src_ids[j], dtype=np.int64), np.asarray(tgt_ids[j], dtype=np.int64))
                             for j in chunk])
            token_lp = forced_log_probs(self.model, batch.src.to(self.device), batch.src_len.to(self.device),
                                        batch.tgt_in.to(self.device), batch.tgt_out.to(self.device))
            token_lp = token_lp.cpu()                                  # (chunk, tgt_len), 0 at padding
            for pos, j in enumerate(chunk):
                results[todo[j]] = self._to_forced_score(tgt_ids[j], token_lp[pos], opts)
        return results

    def _to_forced_score(self, tgt_ids: list[int], token_lp: torch.Tensor, opts: SearchOptions) -> ForcedScore:
        """token_lp: (tgt_len,) one row of `forced_log_probs`, padded past this target's EOS."""
        n = len(tgt_ids) + 1                                           # EOS included
        total = float(token_lp[:n].sum())
        pieces = self.tgt_tokenizer.id_to_piece(tgt_ids) + ["</s>"]
        return ForcedScore(total, token_lp[:n].tolist(), pieces, normalise(total, n, opts.alpha, opts.normalisation))


class TranslationStream:
    """Continuous batching: sentences join a running beam search whenever they arrive.

        stream = translator.stream(SearchOptions(beam_size=5))
        stream.add(["Ein Hund rennt."], tags=["r1:0"])
        while stream.live:
            for tag, hyps in stream.step():   # the sentences that finished at this step
                ...                          # hyps: up to nbest Translations, best first

    Each `step` is one decoder step for every sentence in flight, so a sentence that
    arrives while others are being decoded starts at the next step instead of waiting
    for the whole batch to finish. Padding is masked, so a sentence's translations are
    those `Translator.translate_hypotheses` gives it (up to the last bits of
    floating-point sums; beam size 1 is greedy search). Lines must not be blank (the
    caller answers those without the model); long ones are cropped as in
    `translate_hypotheses`. Sampling is not offered: a sample would depend on its
    neighbours' random draws.
    """

    def __init__(self, translator: Translator, options: SearchOptions, *, return_attention: bool = False):
        if options.sample:
            raise ValueError("sampling cannot join a running search: a sample would depend on its neighbours")
        options = translator.resolve(options)   # alpha None: the model's tuned length penalty
        self.translator, self.options, self.return_attention = translator, options, return_attention
        o = options
        # offline, these options run greedy search, whose score is the plain log-probability:
        # beam size 1 picks the same tokens, and without normalisation gives the same score
        greedy = o.beam_size == 1 and o.nbest == 1 and o.coverage_penalty == 0
        self.search = BeamSearch(translator.model, o.beam_size, nbest=o.nbest, alpha=0.0 if greedy else o.alpha,
                                 normalisation="none" if greedy else o.normalisation, min_len=o.min_len,
                                 no_repeat_ngram=o.no_repeat_ngram, coverage_beta=o.coverage_penalty,
                                 return_attention=return_attention)
        self._sources: dict = {}   # tag -> (source ids, source length with EOS) of each sentence in flight
        self._blank: list = []     # tags of lines with no subwords, answered at the next step

    @property
    def live(self) -> int:
        """Sentences in flight."""
        return self.search.live + len(self._blank)

    @property
    def tags(self) -> list:
        """The tags of the sentences in flight."""
        return list(self._sources) + self._blank

    def add(self, lines: Sequence[str], tags: Sequence, line_numbers: Sequence[int] | None = None) -> None:
        """Start translating `lines` (none blank); each result comes back from `step` with its tag.

        Tags must be hashable and distinct from those in flight; `line_numbers` (1-based,
        default 1, 2, ...) name the lines in the warning about a cropped line.
        """
        if len(lines) != len(tags):
            raise ValueError(f"{len(lines)} lines but {len(tags)} tags")
        if any(not line.strip() for line in lines):
            raise ValueError("blank lines are answered without the model: do not add them to a stream")
        if len(set(tags)) != len(tags) or any(tag in self._sources or tag in self._blank for tag in tags):
            raise ValueError("tags must be distinct from each other and from those in flight")
        if not lines:
            return
        t = self.translator
        numbers = list(line_numbers) if line_numbers is not None else list(range(1, len(lines) + 1))
        ids = t._encode_sources([line.strip() for line in lines], numbers)
        # characters the tokenizer drops (a zero-width space) leave no subwords: blank, as offline
        self._blank += [tag for tag, seq in zip(tags, ids) if not seq]
        tags, ids = [tag for tag, seq in zip(tags, ids) if seq], [seq for seq in ids if seq]
        if not ids:
            return
        src, src_len, limits = t._source_batch(ids, self.options)
        self.search.add(src, src_len, limits, tags)
        for tag, seq, n in zip(tags, ids, src_len.tolist()):
            self._sources[tag] = (seq, n)

    def step(self) -> list[tuple[object, list[Translation]]]:
        """One decoder step; (tag, translations best first) for each sentence that finished."""
        out = [(tag, blank_translations()) for tag in self._blank]
        self._blank = []
        for tag, hyps in self.search.step():
            seq, n_src = self._sources.pop(tag)
            out.append((tag, [self.translator._to_translation(h, seq, n_src, self.return_attention) for h in hyps]))
        return out

    def drop(self, tags) -> None:
        """Stop translating these sentences (their caller gave up); unknown tags are ignored."""
        tags = list(tags)
        self._blank = [t for t in self._blank if t not in tags]
        tags = [t for t in tags if t in self._sources]
        self.search.drop(tags)
        for t in tags:
            del self._sources[t]
