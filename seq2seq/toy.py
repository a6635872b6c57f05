"""A synthetic translation task that needs attention, generated deterministically.

Source sentences are random strings of made-up source words; the target is the same
sentence reversed, each word replaced by its fixed target-language counterpart. Getting
it right needs a vocabulary mapping and long-range reordering, which an attention
model learns in a minute on a CPU and a model without attention does not.

    seq2seq-train experiment=toy    # generates data/toy/{train,valid,test}.{src,tgt} on first use
"""

from __future__ import annotations

import random
from pathlib import Path

from .files import atomic_write

SPLITS = {"train": 6000, "valid": 300, "test": 300}
SRC_LANG, TGT_LANG = "src", "tgt"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def _words(rng: random.Random, n: int, syllables: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)))
    return sorted(words)


def lexicon(n_words: int = 40, seed: int = 7) -> dict[str, str]:
    """Fixed source word -> target word mapping (target words are upper-case, longer)."""
    rng = random.Random(seed)
    src = _words(rng, n_words, 2)
    tgt = [w.upper() for w in _words(rng, n_words, 3)]
    rng.shuffle(tgt)
    return dict(zip(src, tgt))


def translate_toy(sentence: str, lex: dict[str, str]) -> str:
    return " ".join(lex[w] for w in reversed(sentence.split()))


def generate(out_dir: str | Path, seed: int = 13, min_len: int = 3, max_len: int = 12,
             sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Write {split}.src / {split}.tgt under `out_dir`; same seed, same files."""
    out = Path(out_dir)
    lex = lexicon()
    vocab = sorted(lex)
    rng = random.Random(seed)
    seen: set[str] = set()
    counts = {}
    for split, n in (sizes or SPLITS).items():
        src_lines = []
        while len(src_lines) < n:
            s = " ".join(rng.choice(vocab) for _ in range(rng.randint(min_len, max_len)))
            if s not in seen:  # held-out sentences never occur in training
                seen.add(s)
                src_lines.append(s)
        with atomic_write(out / f"{split}.{SRC_LANG}") as f:
            f.write("".join(line + "\n" for line in src_lines))
        with atomic_write(out / f"{split}.{TGT_LANG}") as f:
            f.write("".join(translate_toy(line, lex) + "\n" for line in src_lines))
        counts[split] = n
    return counts
