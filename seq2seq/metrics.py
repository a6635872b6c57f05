"""BLEU and chrF through sacrebleu, always with their signatures.

sacrebleu's Python API silently scores only as many lines as the shorter side has;
`corpus_scores` refuses lists of different lengths instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_detail: str   # e.g. "BLEU = 38.21 70.1/46.0/31.6/21.9 (BP = 1.000 ...)"
    n_sentences: int

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (f"BLEU = {self.bleu:.2f}  ({self.bleu_signature})\n"
                f"chrF2 = {self.chrf:.2f}  ({self.chrf_signature})")


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], *, lowercase: bool = False,
                  hyp_name: str = "hypotheses", ref_name: str = "references") -> Scores:
    """Corpus BLEU (13a tokenisation, cased unless `lowercase`) and chrF2 of detokenized text."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"cannot score: {hyp_name} has {len(hypotheses)} lines but {ref_name} has {len(references)}"
        )
    if not references:
        raise ValueError(f"cannot score: {ref_name} has no lines")
    bleu = BLEU(lowercase=lowercase)
    chrf = CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()),
                  str(b), len(hypotheses))
