"""The command lines (translate, evaluate, tune, average, ensemble, info, plot-training): thin layers
over Translator, metrics and the other modules.

stdout carries results only (one line per input line, or the scores); logs and
warnings go to stderr. A user mistake (missing file, bad checkpoint, mismatched line
counts, a bad flag value) is one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import codecs
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import IO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .average import average, latest_checkpoints
from .checkpoint import CheckpointError
from .ensemble import pack
from .files import InputError, atomic_write, check_output_path, decode_lines, read_lines
from .info import format_card, model_card
from .metrics import corpus_scores
from .quantize import PRECISIONS, check_precision
from .tokenizer import valid_text
from .translate import ForcedScore, SearchOptions, Translation, Translator
from .tune import ALPHAS, choose_alpha, store_decoding

log = logging.getLogger("seq2seq")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s: %(message)s")


def _add_search_args(p: argparse.ArgumentParser, default_beam: int) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--beam-size", type=int, default=None,
                   help=f"1 = greedy (default: {default_beam}; 1 with --sample)")
    g.add_argument("--alpha", type=float, default=None,
                   help="GNMT length penalty strength (default: the value chosen on validation and stored "
                        "in the checkpoint, as seq2seq-info shows; else 0)")
    g.add_argument("--normalisation", choices=["gnmt", "average", "none"], default="gnmt",
                   help="how finished beams are ranked (default: gnmt)")
    g.add_argument("--max-len-a", type=float, default=1.5, help="output at most a*source_len+b subwords")
    g.add_argument("--max-len-b", type=int, default=10)
    g.add_argument("--min-len", type=int, default=0, help="no EOS before this many subwords")
    g.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="no output repeats an n-gram of N subwords (default: 0 = off)")
    g.add_argument("--coverage-penalty", type=float, default=0.0, metavar="BETA",
                   help="GNMT coverage penalty strength for beam search (default: 0 = off)")
    g.add_argument("--sample", action="store_true", help="draw each subword at random instead of searching")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the K most probable subwords (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with probability P")
    g.add_argument("--seed", type=int, default=0, help="seed for --sample: same seed and input, same output")
    g.add_argument("--batch-size", type=int, default=64, help="sentences decoded together")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bfloat16 where the CPU has AVX512_BF16 or AMX (or the GPU supports it), else "
                        "float32; bfloat16: the model's weights in bfloat16; int8: the decoder's matrices in "
                        "int8 (CPU only); both are faster where the CPU supports them and may move BLEU "
                        "slightly (default: auto)")
    g.add_argument("--max-source-len", type=int, default=250,
                   help="longer inputs are cropped to this many subwords, with a warning")


def check_precision_flags(precision: str, device: str) -> None:
    """--precision and --device together (seq2seq-translate, -evaluate, -serve): an InputError naming both."""
    try:
        check_precision(precision, device)
    except ValueError as e:
        raise InputError(f"--precision {precision} --device {device}: {e}") from None


def _search_options(args: argparse.Namespace, default_beam: int, nbest: int = 1) -> SearchOptions:
    if args.beam_size is None:
        args.beam_size = 1 if args.sample else default_beam
    if args.beam_size < 1:
        raise InputError(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_source_len < 1:
        raise InputError(f"--max-source-len must be >= 1, got {args.max_source_len}")
    check_precision_flags(args.precision, args.device)
    if not 1 <= nbest <= args.beam_size:
        raise InputError(f"--nbest must be between 1 and --beam-size ({args.beam_size}), got {nbest}")
    try:
        return SearchOptions(
            beam_size=args.beam_size, nbest=nbest, alpha=args.alpha, normalisation=args.normalisation,
            max_len_a=args.max_len_a, max_len_b=args.max_len_b, min_len=args.min_len,
            no_repeat_ngram=args.no_repeat_ngram, coverage_penalty=args.coverage_penalty, sample=args.sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise InputError(str(e)) from None


def _checkpoint_alpha(options: SearchOptions, translator: Translator) -> SearchOptions:
    """The options with alpha resolved: --alpha, else the value stored in the checkpoint."""
    if options.alpha is None and translator.default_alpha:
        log.info("length penalty alpha %g (chosen on validation, stored in the checkpoint; --alpha overrides)",
                 translator.default_alpha)
    return translator.resolve(options)


def _utf8_stdout() -> None:
    """Write UTF-8 whatever the locale says, as every input is read (an ASCII or Latin-1
    locale would otherwise stop a run at the first "ß" or "▁" it cannot encode)."""
    if isinstance(sys.stdout, io.TextIOWrapper) and codecs.lookup(sys.stdout.encoding).name != "utf-8":
        sys.stdout.reconfigure(encoding="utf-8")


def _run(main_fn, argv: Sequence[str] | None) -> int:
    _utf8_stdout()
    try:
        return main_fn(argv)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# ---- translate ------------------------------------------------------------------

def translate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-translate",
        description="Translate sentences given as arguments, an --input file, or standard input "
                    "(one sentence per line). Output: one line per input line, in order.")
    p.add_argument("sentences", nargs="*", help="sentences to translate (else --input or stdin)")
    p.add_argument("--checkpoint", "-c", required=True, action="append",
                   help="a .ckpt or model.pt written by seq2seq-train; repeat it for an ensemble "
                        "(the mean of the models' log-probabilities at every step)")
    p.add_argument("--input", "-i", help="file to translate (default: standard input)")
    p.add_argument("--output", "-o", help="write here (atomically) instead of standard output")
    p.add_argument("--nbest", type=int, default=1,
                   help="K > 1 prints K lines per input: LINE<TAB>RANK<TAB>SCORE<TAB>TRANSLATION")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input line: hypotheses with scores, and timing")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="lines read, translated and written at a time (bounds memory on huge inputs; "
                        "1 when standard input is a terminal; give 1 to answer a pipe line by line)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings on stderr")
    p.add_argument("--score", action="store_true",
                   help="force-decode given targets instead of translating: input lines are SOURCE<TAB>TARGET "
                        "(or --input SRC --targets TGT); prints each target's log-probability, EOS included")
    p.add_argument("--targets", metavar="FILE", help="with --score: targets for the lines of --input")
    p.add_argument("--attention-plot", metavar="DIR",
                   help="also draw each sentence's attention as DIR/0001.png, ... (numbered by input line)")
    _add_search_args(p, default_beam=5)
    return p


def _input_lines(args: argparse.Namespace) -> Iterator[str]:
    if args.sentences:
        if args.input:
            raise InputError("give sentences as arguments or --input, not both")
        for number, sentence in enumerate(args.sentences, start=1):
            if valid_text(sentence) != sentence:
                log.warning("argument %d: invalid UTF-8, bad bytes replaced by U+FFFD", number)
        yield from args.sentences
        return
    if args.input:
        path = Path(args.input)
        if not path.exists():   # not is_file(): a pipe (--input <(zcat f.gz), /dev/stdin) is welcome
            raise InputError(f"input file not found: {path}")
        if path.is_dir():
            raise InputError(f"--input expects a file, got a directory: {path}")
        try:
            f = open(path, "rb")
        except PermissionError:
            raise InputError(f"cannot read {path}: permission denied") from None
        with f:
            yield from decode_lines(f, str(path))
    else:
        yield from decode_lines(sys.stdin.buffer, "<stdin>")


def format_result(line_no: int, hyps: list[Translation], nbest: int, as_json: bool, seconds: float) -> str:
    """The output text for one input line (newline-terminated)."""
    if as_json:
        return json.dumps({"line": line_no, "translation": hyps[0].text,
                           "hypotheses": [{"text": h.text, "score": h.score, "log_prob": h.log_prob,
                                           "tokens": h.pieces} for h in hyps],
                           "seconds": seconds}, ensure_ascii=False) + "\n"
    if nbest > 1:
        return "".join(f"{line_no}\t{rank}\t{h.score:.6f}\t{h.text}\n" for rank, h in enumerate(hyps, 1))
    return hyps[0].text + "\n"


@contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
    else:
        check_output_path(path)
        with atomic_write(path) as f:
            yield f


def translate_lines(translator: Translator, lines: Iterator[str], out: IO[str], options: SearchOptions,
                    *, batch_size: int, chunk_size: int, as_json: bool = False,
                    attention_dir: Path | None = None, progress=None) -> int:
    """Translate a stream chunk by chunk; returns the number of input lines handled.

    attention_dir: draw each non-blank line's attention there as NNNN.png (input line number).
    progress: a tqdm bar (or None), advanced after each chunk.
    """
    done = 0
    # one random stream for the whole input, so chunks do not repeat each other's draws
    generator = translator.sampling_generator(options.seed) if options.sample else None
    while chunk := list(islice(lines, chunk_size)):
        start = time.perf_counter()
        results = translator.translate_hypotheses(chunk, options, batch_size=batch_size, first_line=done + 1,
                                                  return_attention=attention_dir is not None, generator=generator)
        per_line = (time.perf_counter() - start) / len(chunk)
        for i, hyps in enumerate(results):
            out.write(format_result(done + i + 1, hyps, options.nbest, as_json, per_line))
            if attention_dir is not None and hyps[0].attention is not None:
                _plot_attention(hyps[0], attention_dir / f"{done + i + 1:04d}.png")
        out.flush()
        done += len(chunk)
        if progress is not None:
            progress.update(len(chunk))
    return done


def _translate(argv: Sequence[str] | None) -> int:
    args = translate_parser().parse_args(argv)
    _setup_logging(args.quiet)
    options = _search_options(args, 5, args.nbest)
    if args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.targets and not args.score:
        raise InputError("--targets gives targets to --score; add --score (or leave --targets out)")
    pairs = _score_pairs(args) if args.score else None
    translator = Translator.from_checkpoint(args.checkpoint, device=args.device, max_source_len=args.max_source_len,
                                            precision=args.precision)
    options = _checkpoint_alpha(options, translator)
    if pairs is not None:
        return _score(args, translator, pairs, options)
    lines = _input_lines(args)
    chunk_size = args.chunk_size
    if _typing(args):
        # someone typing: answer each line as it is entered, not after 4,096 of them
        chunk_size = 1
        log.info("reading sentences from the terminal, one per line; end with Ctrl-D")
    start = time.perf_counter()
    attention_dir = Path(args.attention_plot) if args.attention_plot else None
    with _output(args.output) as out, _progress_bar(args) as progress:
        n = translate_lines(translator, lines, out, options, batch_size=args.batch_size,
                            chunk_size=chunk_size, as_json=args.json, attention_dir=attention_dir,
                            progress=progress)
    log.info("translated %d lines in %.1f s", n, time.perf_counter() - start)
    return 0


def translate_main(argv: Sequence[str] | None = None) -> int:
    return _run(_translate, argv)


# ---- translate --score ----------------------------------------------------------

def _score_pairs(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(source, target) pairs: --input and --targets files, or SOURCE<TAB>TARGET lines.

    Flag conflicts and unequal files are refused here, before a model is loaded.
    """
    if args.nbest != 1 or args.sample:
        raise InputError(f"--score force-decodes the given targets: it takes no --nbest ({args.nbest}) "
                         f"or --sample")
    if not args.targets:
        return _tab_pairs(_input_lines(args))
    if not args.input or args.sentences:
        raise InputError("--targets pairs with the lines of an --input file (not with sentence arguments)")
    sources, targets = read_lines(args.input), read_lines(args.targets)
    if len(sources) != len(targets):
        raise InputError(f"{args.input} has {len(sources)} lines but {args.targets} has {len(targets)}")
    return zip(sources, targets)


def _tab_pairs(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            yield "", ""
            continue
        if "\t" not in line:
            raise InputError(f"input line {number} has no TAB: --score reads SOURCE<TAB>TARGET lines "
                             f"(or --input SRC --targets TGT)")
        source, target = line.split("\t", 1)
        yield source, target


def format_score(line_no: int, score: ForcedScore | None, as_json: bool) -> str:
    """One output line: the log-probability (blank for a blank source), or a JSON object."""
    if score is None and not as_json:
        return "\n"
    if score is None:
        return json.dumps({"line": line_no, "log_prob": None, "score": None, "mean_log_prob": None,
                           "tokens": [], "token_log_probs": []}) + "\n"
    if as_json:
        return json.dumps({
            "line": line_no,
            "log_prob": score.log_prob,
            "score": score.score,                  # normalised as --normalisation/--alpha rank beams
            "mean_log_prob": score.mean_log_prob,  # per token, EOS included
            "tokens": score.pieces,
            "token_log_probs": score.token_log_probs,
        }, ensure_ascii=False) + "\n"
    return f"{score.log_prob:.6f}\n"


def score_lines(translator: Translator, pairs: Iterator[tuple[str, str]], out: IO[str], options: SearchOptions,
                *, batch_size: int, chunk_size: int, as_json: bool = False) -> int:
    """Score a stream of (source, target) pairs chunk by chunk; returns the number of lines."""
    done = 0
    while chunk := list(islice(pairs, chunk_size)):
        scores = translator.score([s for s, _ in chunk], [t for _, t in chunk], options,
                                  batch_size=batch_size, first_line=done + 1)
        out.write("".join(format_score(done + i + 1, sc, as_json) for i, sc in enumerate(scores)))
        out.flush()
        done += len(chunk)
    return done


def _score(args: argparse.Namespace, translator: Translator, pairs: Iterator[tuple[str, str]],
           options: SearchOptions) -> int:
    start = time.perf_counter()
    with _output(args.output) as out:
        n = score_lines(translator, pairs, out, options, batch_size=args.batch_size,
                        chunk_size=args.chunk_size, as_json=args.json)
    log.info("scored %d lines in %.1f s", n, time.perf_counter() - start)
    return 0


# ---- evaluate -------------------------------------------------------------------

def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-evaluate",
        description="Translate --source with a checkpoint (or take --hypothesis) and score it against "
                    "--reference with sacreBLEU: BLEU and chrF with their signatures.")
    p.add_argument("--checkpoint", "-c", action="append",
                   help="model to translate --source with; repeat it for an ensemble")
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
    if not refs:
        raise InputError(f"{args.reference} is empty: nothing to score")
    options = _search_options(args, 5)
    if args.output:
        check_output_path(args.output)
    if args.hypothesis:
        hyps, hyp_name = read_lines(args.hypothesis), args.hypothesis
    else:
        if not (args.checkpoint and args.source):
            raise InputError("give --checkpoint and --source to translate, or --hypothesis to score a file")
        sources = read_lines(args.source)
        if len(sources) != len(refs):
            raise InputError(f"{args.source} has {len(sources)} lines but {args.reference} has {len(refs)}")
        translator = Translator.from_checkpoint(args.checkpoint, device=args.device,
                                                max_source_len=args.max_source_len, precision=args.precision)
        options = _checkpoint_alpha(options, translator)
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
                          "alpha": None if args.hypothesis else options.alpha, "lowercase": args.lowercase,
                          "checkpoint": _checkpoint_names(args.checkpoint)}))
    else:
        print(scores.format())
    return 0


def _checkpoint_names(paths: list[str] | None) -> str | list[str] | None:
    """One checkpoint as its name (as before ensembles), several as a list."""
    return paths[0] if paths and len(paths) == 1 else paths


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    return _run(_evaluate, argv)


# ---- translate extras: attention pictures and the progress bar --------------------

def _plot_attention(translation: Translation, path: Path) -> None:
    # matplotlib loads slowly: only a run that asks for pictures pays for it
    from .plot import plot_attention
    plot_attention(translation, path)


def _count_input_lines(args: argparse.Namespace) -> int | None:
    """How many lines the bar counts to; None for standard input (the bar shows a rate)."""
    if args.sentences:
        return len(args.sentences)
    if args.input and Path(args.input).is_file():
        with open(args.input, "rb") as f:
            return sum(1 for _ in f)
    return None


def _typing(args: argparse.Namespace) -> bool:
    """Sentences come from someone at a terminal (standard input is a tty)."""
    return not args.sentences and not args.input and sys.stdin.isatty()


@contextmanager
def _progress_bar(args: argparse.Namespace) -> Iterator[tqdm | None]:
    """A bar on stderr only for someone watching it: stderr is a terminal and no --quiet.

    Redirected stderr (a log file, a pipeline, a test) stays free of bar characters.
    """
    if args.quiet or not sys.stderr.isatty() or _typing(args):
        yield None
        return
    # log lines go through tqdm.write so a warning does not tear the bar in half
    with logging_redirect_tqdm(), tqdm(total=_count_input_lines(args), unit=" lines", file=sys.stderr,
                                       dynamic_ncols=True) as bar:
        yield bar


# ---- average --------------------------------------------------------------------

def average_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-average",
        description="Average the weights of several checkpoints of one model (same config and "
                    "tokenizer) into a slim model file that translates like any other.")
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint files to average; with --last N, one run directory")
    p.add_argument("--output", "-o", required=True, help="the averaged model (written atomically)")
    p.add_argument("--last", type=int, metavar="N",
                   help="average the N newest epoch checkpoints in RUN_DIR/checkpoints/epochs "
                        "(else the N newest in RUN_DIR/checkpoints)")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def _average_inputs(args: argparse.Namespace) -> list[Path]:
    if args.last is not None:
        if len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir():
            raise InputError(f"--last N takes one run directory, got: {' '.join(args.inputs)}")
        return latest_checkpoints(args.inputs[0], args.last)
    for name in args.inputs:
        if Path(name).is_dir():
            raise InputError(f"{name} is a directory: name checkpoint files, or use --last N {name}")
    return [Path(name) for name in args.inputs]


def _average(argv: Sequence[str] | None) -> int:
    args = average_parser().parse_args(argv)
    _setup_logging(args.quiet)
    paths = _average_inputs(args)
    output = average(paths, args.output)
    log.info("averaged %d checkpoints (%s) into %s", len(paths), ", ".join(map(str, paths)), output)
    return 0


def average_main(argv: Sequence[str] | None = None) -> int:
    return _run(_average, argv)


# ---- ensemble -------------------------------------------------------------------

def ensemble_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-ensemble",
        description="Pack several models sharing one tokenizer into one ensemble file, which translate, "
                    "evaluate, serve and info take like any model.pt (the models' log-probabilities are "
                    "averaged at every step). Then choose its length penalty: seq2seq-tune -c OUTPUT ...")
    p.add_argument("--checkpoint", "-c", required=True, action="append",
                   help="a model.pt, .ckpt or ensemble file; repeat it (at least two models in all)")
    p.add_argument("--output", "-o", required=True, help="the ensemble file (written atomically)")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def _ensemble(argv: Sequence[str] | None) -> int:
    args = ensemble_parser().parse_args(argv)
    _setup_logging(args.quiet)
    output = pack(args.checkpoint, args.output)
    log.info("packed %s into %s", ", ".join(args.checkpoint), output)
    return 0


def ensemble_main(argv: Sequence[str] | None = None) -> int:
    return _run(_ensemble, argv)


# ---- tune -----------------------------------------------------------------------

def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-tune",
        description="Choose the beam search's length penalty (GNMT alpha) on a validation set and store "
                    "it in the checkpoint, where seq2seq-translate, -evaluate and -serve take it as their "
                    "default. Never tune on the test set you report.")
    p.add_argument("--checkpoint", "-c", required=True,
                   help="a model.pt or .ckpt written by seq2seq-train, or an ensemble by seq2seq-ensemble")
    p.add_argument("--source", "-s", required=True, help="validation sources, one per line")
    p.add_argument("--reference", "-r", required=True, help="their reference translations")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS),
                   help="comma-separated values to try (default: %(default)s)")
    p.add_argument("--beam-size", type=int, default=5, help="(default: 5)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences decoded together (default: 64)")
    p.add_argument("--output", "-o", help="write the tuned checkpoint here instead of updating it in place")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="decode in this precision while choosing; use the one you will translate with "
                        "(default: auto, as seq2seq-translate and -evaluate)")
    p.add_argument("--json", action="store_true", help="print the choice as one JSON object")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def _tune(argv: Sequence[str] | None) -> int:
    args = tune_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise InputError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    if not alphas or min(alphas) < 0:
        raise InputError(f"--alphas must be numbers >= 0, got {args.alphas!r}")
    if args.beam_size < 1 or args.batch_size < 1:
        raise InputError(f"--beam-size and --batch-size must be >= 1, got {args.beam_size} and {args.batch_size}")
    sources, refs = read_lines(args.source), read_lines(args.reference)
    if len(sources) != len(refs):
        raise InputError(f"{args.source} has {len(sources)} lines but {args.reference} has {len(refs)}")
    if not refs:
        raise InputError(f"{args.reference} is empty: nothing to choose the length penalty on")
    check_precision_flags(args.precision, args.device)
    translator = Translator.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
    choice = choose_alpha(translator, sources, refs, beam_size=args.beam_size, alphas=alphas,
                          batch_size=args.batch_size, data=args.source)
    written = store_decoding(args.checkpoint, choice, args.output)
    if args.json:
        print(json.dumps({**choice, "checkpoint": str(written)}))
    else:
        for alpha, bleu in choice["grid"].items():
            print(f"alpha {float(alpha):<4g} BLEU {bleu:6.2f}{'  <- chosen' if float(alpha) == choice['alpha'] else ''}")
        print(f"({choice['bleu_signature']}, beam {choice['beam_size']}, {choice['precision']}, {choice['data']}); "
              f"stored in {written}")
    return 0


def tune_main(argv: Sequence[str] | None = None) -> int:
    return _run(_tune, argv)


# ---- info -----------------------------------------------------------------------

def info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-info",
        description="Print a checkpoint's model card: architecture, size, languages, data, tokenizer, "
                    "best validation BLEU with its signature, training time and versions.")
    p.add_argument("checkpoint", help="a .ckpt or model.pt written by seq2seq-train, -average or -ensemble")
    p.add_argument("--json", action="store_true", help="print the card as one JSON object")
    return p


def _info(argv: Sequence[str] | None) -> int:
    args = info_parser().parse_args(argv)
    card = model_card(args.checkpoint)
    print(json.dumps(card, indent=2, ensure_ascii=False) if args.json else format_card(card))
    return 0


def info_main(argv: Sequence[str] | None = None) -> int:
    return _run(_info, argv)


# ---- training curves --------------------------------------------------------------

def plot_training_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq-plot-training",
        description="Draw a run's loss, validation BLEU and learning rate against step "
                    "(from RUN_DIR/logs/metrics.csv) into a PNG.")
    p.add_argument("run_dir", help="a run directory written by seq2seq-train")
    p.add_argument("--output", "-o", help="the PNG to write (default: RUN_DIR/training.png)")
    return p


def _plot_training(argv: Sequence[str] | None) -> int:
    args = plot_training_parser().parse_args(argv)
    from .plot import plot_training  # matplotlib: loaded only by the commands that draw
    print(plot_training(args.run_dir, args.output))
    return 0


def plot_training_main(argv: Sequence[str] | None = None) -> int:
    return _run(_plot_training, argv)
