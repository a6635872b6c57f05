"""BLEU and chrF through sacrebleu, always with their signatures.

sacrebleu's Python API silently scores only as many lines as the shorter side has;
`corpus_scores` refuses lists of different lengths instead.

BLEU counts words, so its tokenizer must find them: sacreBLEU's `13a` (the WMT standard)
splits at spaces and punctuation, which a Chinese or Japanese sentence does not have; to
13a such a sentence is one word, and BLEU near 0 whatever the translation. `corpus_scores`
therefore picks the tokenizer from the references (`bleu_tokenizer`), as sacreBLEU's users
pick `-tok zh` by hand; the signature says which.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF

# Scripts written without spaces between words: Han (Chinese characters, also in Japanese),
# Japanese kana, Thai, Lao, Tibetan, Myanmar, Khmer. corpora.py's length checks count each of
# these characters as a word.
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
OTHER_UNSPACED = "\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"
UNSPACED_CHAR = re.compile(f"[{HAN}{KANA}{OTHER_UNSPACED}]")
_HAN_CHAR, _KANA_CHAR = re.compile(f"[{HAN}]"), re.compile(f"[{KANA}]")


def bleu_tokenizer(references: Sequence[str]) -> str:
    """sacreBLEU's tokenizer for these references.

    `13a` unless most of their characters (spaces aside) belong to scripts written without
    spaces; then `zh` (sacreBLEU's Chinese tokenizer: one word per Chinese character) when
    those are Chinese characters without Japanese kana, else `char` (one word per character:
    Japanese, whose standard `ja-mecab` needs MeCab, Thai, ...).
    """
    text = "".join(references)
    letters = len(text) - text.count(" ")
    unspaced = len(UNSPACED_CHAR.findall(text))
    if not letters or unspaced * 2 < letters:
        return "13a"
    kana = len(_KANA_CHAR.findall(text))
    return "zh" if len(_HAN_CHAR.findall(text)) * 2 >= unspaced and kana * 10 < unspaced else "char"


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
    """Corpus BLEU (cased unless `lowercase`; 13a tokenisation, or the one `bleu_tokenizer`
    picks for references in a script without spaces) and chrF2 of detokenized text."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"cannot score: {hyp_name} has {len(hypotheses)} lines but {ref_name} has {len(references)}"
        )
    if not references:
        raise ValueError(f"cannot score: {ref_name} has no lines")
    bleu = BLEU(lowercase=lowercase, tokenize=bleu_tokenizer(references))
    chrf = CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()),
                  str(b), len(hypotheses))
