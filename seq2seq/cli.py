"""`seq2seq-translate` and `seq2seq-evaluate`: thin command lines over Translator and metrics.

stdout carries results only (one line per input line, or the scores); logs and
warnings go to stderr. A user mistake (missing file, bad checkpoint, mismatched line
counts, a bad flag value) is one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import IO

from .checkpoint import CheckpointError
from .files import InputError, atomic_write, decode_lines, read_lines
from .metrics import corpus_scores
from .translate import SearchOptions, Translation, Translator

log = logging.getLogger("seq2seq")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s: %(message)s")


def _add_search_args(p: argparse.ArgumentParser, default_beam: int) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--beam-size", type=int, default=default_beam, help="1 = greedy (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=0.0, help="GNMT length penalty strength (default: 0)")
    g.add_argument("--normalisation", choices=["gnmt", "average", "none"], default="gnmt",
                   help="how finished beams are ranked (default: gnmt)")
    g.add_argument("--max-len-a", type=float, default=1.5, help="output at most a*source_len+b subwords")
    g.add_argument("--max-len-b", type=int, default=10)
    g.add_argument("--min-len", type=int, default=0, help="no EOS before this many subwords")
    g.add_argument("--batch-size", type=int, default=64, help="sentences decoded together")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--max-source-len", type=int, default=250,
                   help="longer inputs are cropped to this many subwords, with a warning")


def _search_options(args: argparse.Namespace, nbest: int = 1) -> SearchOptions:
    if args.beam_size < 1:
        raise InputError(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 1 <= nbest <= args.beam_size:
        raise InputError(f"--nbest must be between 1 and --beam-size ({args.beam_size}), got {nbest}")
    return SearchOptions(beam_size=args.beam_size, nbest=nbest, alpha=args.alpha,
                         normalisation=args.normalisation, max_len_a=args.max_len_a,
                         max_len_b=args.max_len_b, min_len=args.min_len)


def _run(main_fn, argv: Sequence[str] | None) -> int:
    try:
        return main_fn(argv)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---- translate ------------------------------------------------------------------

def translate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-translate",
        description="Translate sentences given as arguments, an --input file, or standard input "
                    "(one sentence per line). Output: one line per input line, in order.")
    p.add_argument("sentences", nargs="*", help="sentences to translate (else --input or stdin)")
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt or model.pt written by seq2seq-train")
    p.add_argument("--input", "-i", help="file to translate (default: standard input)")
    p.add_argument("--output", "-o", help="write here (atomically) instead of standard output")
    p.add_argument("--nbest", type=int, default=1,
                   help="K > 1 prints K lines per input: LINE<TAB>RANK<TAB>SCORE<TAB>TRANSLATION")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input line: hypotheses with scores, and timing")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="lines read, translated and written at a time (bounds memory on huge inputs)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings on stderr")
    _add_search_args(p, default_beam=5)
    return p


def _input_lines(args: argparse.Namespace) -> Iterator[str]:
    if args.sentences:
        if args.input:
            raise InputError("give sentences as arguments or --input, not both")
        yield from args.sentences
        return
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise InputError(f"input file not found: {path}")
        with open(path, "rb") as f:
            yield from decode_lines(f, str(path))
    else:
        yield from decode_lines(sys.stdin.buffer, "<stdin>")


def format_result(line_no: int, hyps: list[Translation], nbest: int, as_json: bool, seconds: float) -> str:
    """The output text for one input line (newline-terminated)."""
    if as_json:
        return json.dumps({"line": line_no, "translation": hyps[0].text,
                           "hypotheses": [{"text": h.text, "score": h.score, "log_prob": h.log_prob}
                                          for h in hyps],
                           "seconds": seconds}, ensure_ascii=False) + "\n"
    if nbest > 1:
        return "".join(f"{line_no}\t{rank}\t{h.score:.6f}\t{h.text}\n" for rank, h in enumerate(hyps, 1))
    return hyps[0].text + "\n"


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
    else:
        with atomic_write(path) as f:
            yield f


def translate_lines(translator: Translator, lines: Iterator[str], out: IO[str], options: SearchOptions,
                    *, batch_size: int, chunk_size: int, as_json: bool = False) -> int:
    """Translate a stream chunk by chunk; returns the number of input lines handled."""
    done = 0
    while chunk := list(islice(lines, chunk_size)):
        start = time.perf_counter()
        results = translator.translate_hypotheses(chunk, options, batch_size=batch_size, first_line=done + 1)
        per_line = (time.perf_counter() - start) / len(chunk)
        for i, hyps in enumerate(results):
            out.write(format_result(done + i + 1, hyps, options.nbest, as_json, per_line))
        out.flush()
        done += len(chunk)
    return done


def _translate(argv: Sequence[str] | None) -> int:
    args = translate_parser().parse_args(argv)
    _setup_logging(args.quiet)
    options = _search_options(args, args.nbest)
    if args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    translator = Translator.from_checkpoint(args.checkpoint, device=args.device, max_source_len=args.max_source_len)
    lines = _input_lines(args)
    start = time.perf_counter()
    with _output(args.output) as out:
        n = translate_lines(translator, lines, out, options, batch_size=args.batch_size,
                            chunk_size=args.chunk_size, as_json=args.json)
    log.info("translated %d lines in %.1f s", n, time.perf_counter() - start)
    return 0


def translate_main(argv: Sequence[str] | None = None) -> int:
    return _run(_translate, argv)


# ---- evaluate -------------------------------------------------------------------

def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-evaluate",
        description="Translate --source with a checkpoint (or take --hypothesis) and score it against "
                    "--reference with sacreBLEU: BLEU and chrF with their signatures.")
    p.add_argument("--checkpoint", "-c", help="model to translate --source with")
    p.add_argument("--source", "-s", help="source sentences, one per line")
    p.add_argument("--reference", "-r", required=True, help="reference translations, one per line")
    p.add_argument("--hypothesis", help="score this file instead of translating (no checkpoint needed)")
    p.add_argument("--output", "-o", help="also write the translations here")
    p.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", "-q", action="store_true")
    _add_search_args(p, default_beam=5)
    return p


def _evaluate(argv: Sequence[str] | None) -> int:
    args = evaluate_parser().parse_args(argv)
    _setup_logging(args.quiet)
    refs = read_lines(args.reference)
    options = _search_options(args)
    if args.hypothesis:
        hyps, hyp_name = read_lines(args.hypothesis), args.hypothesis
    else:
        if not (args.checkpoint and args.source):
            raise InputError("give --checkpoint and --source to translate, or --hypothesis to score a file")
        sources = read_lines(args.source)
        if len(sources) != len(refs):
            raise InputError(f"{args.source} has {len(sources)} lines but {args.reference} has {len(refs)}")
        translator = Translator.from_checkpoint(args.checkpoint, device=args.device,
                                                max_source_len=args.max_source_len)
        start = time.perf_counter()
        hyps = [h[0].text for h in translator.translate_hypotheses(sources, options, batch_size=args.batch_size)]
        log.info("translated %d lines in %.1f s", len(hyps), time.perf_counter() - start)
        hyp_name = f"translations of {args.source}"
        if args.output:
            with atomic_write(args.output) as f:
                f.write("".join(h + "\n" for h in hyps))
    if len(hyps) != len(refs):
        raise InputError(f"{hyp_name} has {len(hyps)} lines but {args.reference} has {len(refs)}")
    scores = corpus_scores(hyps, refs, lowercase=args.lowercase)
    if args.json:
        print(json.dumps({**scores.to_dict(), "beam_size": None if args.hypothesis else args.beam_size,
                          "lowercase": args.lowercase, "checkpoint": args.checkpoint}))
    else:
        print(scores.format())
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    return _run(_evaluate, argv)

