#!/usr/bin/env python
"""CPU benchmark of a trained checkpoint: matmul peak, training throughput, decoding, memory.

    python scripts/benchmark.py --checkpoint runs/multi30k-en-de/model.pt --json > bench.json

Every number is measured in the run that prints it (nothing is read from earlier runs
or from the checkpoint's metadata except the architecture, tokenizers and training
options). A human-readable table goes to stderr; with --json, stdout carries exactly
one line: the JSON object described below. Sections not chosen with --only are absent.

JSON layout
-----------
schema                "seq2seq-benchmark/1"
timestamp             UTC start time (ISO 8601); elapsed_s: wall seconds of the whole run
command               the argv of this run
environment           torch_version, python_version, seq2seq_version, num_threads
                      (torch.get_num_threads()), num_interop_threads, cpu_model (from
                      /proc/cpuinfo), cpu_count (os.cpu_count), affinity_cpus (usable cores),
                      cpu_bf16_flags (avx512_bf16/amx_bf16/... present), cpu_vector_isa
                      (avx512f, avx2 or avx: the widest), env (OMP_NUM_THREADS,
                      MKL_NUM_THREADS, SEQ2SEQ_FLOAT32_MATMUL as set), float32_matmul
                      (onednn or blas: seq2seq/matmul.py), hostname, load_average_at_start (other jobs
                      on the machine distort every figure: check it)
checkpoint            path, model_config, parameters (unique), src_vocab_size,
                      tgt_vocab_size, label_smoothing / lr / max_len (training options
                      read from the checkpoint's config, defaults if absent)
peak                  matmul peak of this machine at the current thread count:
  size                  n of the n x n @ n x n matmuls (2 n^3 FLOPs each)
  float32, bfloat16     {gflops (best timed repeat), median_gflops, repeats, seconds
                        (each timed repeat), warmup_seconds}; or {"error": ...}. Warm-up
                        and repeats stop early once --peak-budget is spent (bfloat16
                        without native CPU support runs at a few GFLOP/s). float32 is
                        measured through the library training's float32 products use
                        (environment.float32_matmul); where that is oneDNN, float32_blas
                        is torch.matmul's own BLAS (MKL) beside it
train                 training throughput on DATA/train.SRC / DATA/train.TGT, fresh model
                      (seed), BucketBatchSampler(batch_size, seed), model.train(), one step =
                      forward + CE(label_smoothing, ignore PAD, sum) / target tokens +
                      backward + clip_grad_norm_(1.0) + Adam step; batches are collated
                      before timing, so the clock covers the step only
  data                  {train_src, train_tgt, pairs (after the max_len filter), batches_per_epoch}
  batch_size, warmup_steps, timed_steps, seed
  flop_accounting       {encoder_params_per_src_token, decoder_params_per_tgt_token,
                        attention_key_params_per_src_token, bridge_params_per_sentence,
                        lookup_embedding_params_excluded, note}: see `flop_accounting`
  float32, bfloat16_autocast   each either
                        {tgt_tokens_per_s (non-PAD target tokens, EOS included),
                         src_tokens_per_s, sentences_per_s, seconds_per_step (mean),
                         median_step_s, min_step_s, tgt_tokens, src_tokens, sentences,
                         tgt_padding_fraction, src_padding_fraction (PAD share of the padded
                         target / source tensors of the timed batches), model_flops_per_step
                         (mean over timed steps), model_gflops_per_s,
                         fraction_of_float32_peak (null without the peak section),
                         fraction_of_bfloat16_peak (bf16 mode only), loss_first, loss_last,
                         warmup_step_s}
                        or {"skipped": "warm-up step took X s ..." or why --bf16 left it out}
                        or {"error": "..."}
decode                translation of DATA/TEST_SPLIT.SRC with Translator.from_checkpoint
  test_src, test_ref, sentences   (the first --sentences lines, if given)
  bleu_signature, chrf_signature
  rows                  one per (dtype, beam, batch size), each {dtype, beam_size,
                        batch_size, seconds, sentences_per_s, output_tokens (hypothesis
                        subwords + 1 EOS per sentence), output_tokens_per_s, bleu, chrf,
                        why (which sweep asked for the row)}; bfloat16 (Translator
                        precision="bfloat16": weights cast) and int8 (precision="int8") rows, greedy and beam 5 at batch
                        64, add speedup_over_float32 (the float32 row of the same setting),
                        or carry {"error"} or {"skipped"} instead. Timing covers tokenization, search
                        and detokenization (the whole translate_hypotheses call) after one
                        untimed warm-up call on a few sentences.
memory                peak resident set size of a fresh child process per job (its own
                      VmHWM on Linux; elsewhere ru_maxrss via os.wait4, which on Linux would
                      also count the parent's memory at fork), so one job does not inflate the other:
  translate             {peak_rss_mb, setup_peak_rss_mb (after imports and model load,
                        before the work), beam_size, batch_size, sentences, seconds}
  train                 {peak_rss_mb, setup_peak_rss_mb, steps, batch_size, seconds}
                        (either may be {"error": ...})
scale                 (only when asked: --only ...,scale) corpora of --scale-pairs pairs
                      synthesised by resampling DATA/train pairs (seeded), in --scale-dir:
  runs                  one per size, each {pairs, synthesis_s (not part of preparation),
                        corpus_bytes, tokenizer {seconds, sample (sentences it learned
                        from: at most --scale-sp-sample), vocab_size, peak_rss_mb},
                        prepare {seconds, sentences_per_s, cache_bytes, pairs_kept,
                        peak_rss_mb} (tokenize once into the memory-mapped token cache,
                        with the checkpoint's tokenizers), reuse_open_s (a second run
                        finding the cache), train {time_to_first_step_s (process start
                        after imports to the end of the first optimiser step: cache
                        opening, sampler, model, first batch), steps, seconds,
                        peak_rss_mb (the whole training process)}}; each part run in
                        its own child process
  train_rss_ratio       peak training RSS of the largest size / of the smallest
profile               (only when asked: --only ...,profile) where the time goes, by
                      torch.profiler (CPU, self time per operator), each {total_ms,
                      ops: the --profile-rows largest [{op, self_ms, share, calls}]}:
  train_step            one float32 training step (after --warmup steps) of a fresh
                        model, batch --train-batch-size from the training data
  beam5_batch, greedy_batch   translate_hypotheses of the first 64 test sentences in
                        one batch (after a warm-up call), beam 5 / greedy

Figures are throughput of this code on this CPU; FLOPs count only matmuls with
parameters (6 per parameter per token for forward + backward), not attention scores
over the source, elementwise work, or work on padding positions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

import seq2seq
from seq2seq import matmul
from seq2seq.checkpoint import CheckpointError, load_model
from seq2seq.cpu import KERNEL_CACHE_VAR, TRAINING_KERNELS, cpu_fields, keep_freed_memory, limit_kernel_cache
from seq2seq.data import BucketBatchSampler, ParallelDataset, collate
from seq2seq.files import InputError, read_lines
from seq2seq.metrics import corpus_scores
from seq2seq.quantize import BF16_FLAGS, cpu_has_bfloat16
from seq2seq.model import build_model
from seq2seq.module import adam, batch_loss
from seq2seq.token_cache import cached_dataset
from seq2seq.tokenizer import PAD_ID, train_tokenizer
from seq2seq.train import training_precision
from seq2seq.translate import SearchOptions, Translator

SECTIONS = ("peak", "train", "decode", "memory")
USER_KERNEL_CACHE = os.environ.get(KERNEL_CACHE_VAR)  # before main() sets the training value
OPTIONAL_SECTIONS = ("scale", "profile")  # minutes of work at millions of pairs; profiler tables
SCHEMA = "seq2seq-benchmark/1"
CHILD_START = time.perf_counter()  # after imports: where a child's time to first step starts
log = logging.getLogger("benchmark")


def say(msg: str = "") -> None:
    """Human-readable progress and tables: stderr only (stdout is for the JSON)."""
    print(msg, file=sys.stderr, flush=True)


# ---- guards -----------------------------------------------------------------------

class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise StepTimeout once `seconds` of wall time pass (checked between Python ops).

    A long C++ kernel finishes before the exception can fire, but the decoder and
    search are Python loops over small ops, so a pathologically slow mode stops soon
    after the limit instead of running for many minutes. Library code that catches every
    exception may swallow the alarm (the work then simply runs on; the training warm-up
    also checks its elapsed time afterwards).
    Used only around bfloat16 work, whose results are discarded when it fires.
    """
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise StepTimeout(f"over the {seconds:g} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ---- environment -------------------------------------------------------------------

def cpu_info() -> tuple[str, list[str], str | None]:
    """The CPU's model name (with its family and model numbers: a VM may hide the rest) and
    its widest vector extension and bfloat16 / AMX flags."""
    fields = cpu_fields() or {}
    model = fields.get("model name") or platform.processor() or "unknown"
    if fields.get("cpu family"):
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    flags = fields.get("flags", "").split()
    vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return model, sorted(f for f in flags if "bf16" in f or f.startswith("amx")), vector


def environment() -> dict:
    model, bf16_flags, vector = cpu_info()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "seq2seq_version": seq2seq.__version__,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": affinity,
        "cpu_bf16_flags": bf16_flags,
        "cpu_vector_isa": vector,
        "float32_matmul": "onednn" if matmul.enabled() else "blas",
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", matmul.ENV) if k in os.environ},
        "hostname": socket.gethostname(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---- inputs ------------------------------------------------------------------------

def data_paths(args) -> dict[str, Path]:
    d = Path(args.data)
    return {
        "train_src": d / f"train.{args.src}", "train_tgt": d / f"train.{args.tgt}",
        "test_src": d / f"{args.test_split}.{args.src}", "test_ref": d / f"{args.test_split}.{args.tgt}",
    }


def check_inputs(args, sections: list[str]) -> None:
    """Fail early, before minutes of measuring, with one line naming the missing file."""
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise InputError(f"checkpoint not found: {ckpt}")
    paths = data_paths(args)
    needed = []
    if {"train", "memory", "scale", "profile"} & set(sections):
        needed += ["train_src", "train_tgt"]
    if {"decode", "memory", "profile"} & set(sections):
        needed += ["test_src", "test_ref"]
    for key in needed:
        if not paths[key].is_file():
            raise InputError(f"file not found: {paths[key]}")


def training_options(info: dict) -> dict:
    """Loss, optimiser and length filter as the checkpoint was trained (defaults otherwise)."""
    cfg = info.get("config") or {}
    optim, train = cfg.get("optim") or {}, cfg.get("train") or {}
    return {
        "label_smoothing": float(optim.get("label_smoothing", 0.1)),
        "lr": float(optim.get("lr", 1e-3)),
        "betas": tuple(optim.get("betas", (0.9, 0.999))),
        "weight_decay": float(optim.get("weight_decay", 0.0)),
        "max_len": train.get("max_len", 100),
    }


def test_lines(args) -> tuple[list[str], list[str]]:
    paths = data_paths(args)
    src, ref = read_lines(paths["test_src"]), read_lines(paths["test_ref"])
    if len(src) != len(ref):
        raise InputError(f"{paths['test_src']} has {len(src)} lines but {paths['test_ref']} has {len(ref)}")
    if args.sentences is not None:
        src, ref = src[:args.sentences], ref[:args.sentences]
    return src, ref


# ---- 1. peak -----------------------------------------------------------------------

def matmul_gflops(dtype: torch.dtype, n: int, repeats: int, warmup: int, budget_s: float,
                  onednn: bool = False) -> dict:
    """Best and median GFLOP/s of n x n @ n x n matmuls; stops repeating past budget_s.
    onednn: through seq2seq.matmul's oneDNN path (float32), as training's products run when routed."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    c = torch.empty(n, n, dtype=dtype)

    def product():
        if onednn:
            matmul.mm_t(a, b, out=c)
        else:
            torch.matmul(a, b, out=c)

    flops = 2.0 * n ** 3
    start = time.perf_counter()
    for _ in range(warmup):
        product()
        if time.perf_counter() - start > budget_s / 2:  # a slow (emulated) dtype: one is enough
            break
    warm = time.perf_counter() - start
    times: list[float] = []
    begin = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - begin > budget_s:
            break
    rates = [flops / t / 1e9 for t in times]
    return {"gflops": max(rates), "median_gflops": statistics.median(rates), "repeats": len(times),
            "seconds": [round(t, 5) for t in times], "warmup_seconds": round(warm, 3)}


def bf16_skipped(setting: str, has_bf16: bool | None) -> str | None:
    """Why this run leaves out its bfloat16 rows (None: it measures them), for `--bf16 setting`
    on a CPU that has bfloat16 instructions (True), has none (False) or cannot tell (None)."""
    if setting == "off":
        return "--bf16 off"
    if setting == "auto" and has_bf16 is False:
        return (f"this CPU has no bfloat16 instructions (none of {', '.join(BF16_FLAGS)}): emulated, "
                "bfloat16 runs far slower than float32 (--bf16 on measures it anyway)")
    return None


def bench_peak(args) -> dict:
    out: dict = {"size": args.peak_size, "flops_per_matmul": 2 * args.peak_size ** 3}
    # float32: the library this process's float32 products use (seq2seq.matmul); where that is
    # oneDNN, float32_blas is torch.matmul's own (MKL) for comparison
    kinds = [("float32", torch.float32, matmul.enabled()), ("bfloat16", torch.bfloat16, False)]
    if matmul.enabled():
        kinds.insert(1, ("float32_blas", torch.float32, False))
    for name, dtype, onednn in kinds:
        if dtype == torch.bfloat16 and args.bf16_skipped:
            out[name] = {"skipped": args.bf16_skipped}
            say(f"peak {name:9s} skipped: {args.bf16_skipped}")
            continue
        try:
            r = matmul_gflops(dtype, args.peak_size, args.peak_repeats, args.peak_warmup, args.peak_budget,
                              onednn=onednn)
            say(f"peak {name:9s} {r['gflops']:9.1f} GFLOP/s  (median {r['median_gflops']:.1f}, "
                f"{r['repeats']} repeats of {args.peak_size}^3)")
        except Exception as e:  # noqa: BLE001 - a dtype this CPU build cannot do is a result
            r = {"error": short_error(e)}
            say(f"peak {name:9s} error: {r['error']}")
        out[name] = r
    return out


# ---- 2. train ----------------------------------------------------------------------

def flop_accounting(model: nn.Module) -> dict:
    """Parameters that take part in matmuls, split by what they are applied to.

    - encoder LSTM (everything in model.encoder but its embedding): once per source token;
    - the attention key projection (decoder.attention.key_layer, if any): it runs on the
      encoder outputs, so also once per source token;
    - the bridge: once per sentence;
    - everything else outside the encoder (decoder LSTM cells, attention query/energy,
      combine, output layer): once per target token.
    Embedding tables used only as lookups cost no matmul and are left out; a table tied
    to the output layer (tie_embeddings) is counted once, as the output layer, in the
    decoder; one shared with the encoder (share_embeddings) is likewise counted only there.
    """
    seen: set[int] = set()

    def count(params) -> int:
        total = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    lookups = {id(model.encoder.embedding.weight), id(model.decoder.embedding.weight)}
    out_w = model.decoder.output_layer.weight
    lookups.discard(id(out_w))  # tied: it is the output layer's matmul weight
    # count the decoder side first so a shared matrix lands in the decoder
    decoder_params = [p for p in model.decoder.output_layer.parameters()]
    key_layer = getattr(model.decoder.attention, "key_layer", None)
    key_ids = {id(p) for p in key_layer.parameters()} if key_layer is not None else set()
    per_tgt = count(decoder_params) + count(
        p for name, p in model.named_parameters()
        if not name.startswith(("encoder.", "bridge.")) and id(p) not in lookups and id(p) not in key_ids)
    per_src_keys = count(key_layer.parameters()) if key_layer is not None else 0
    per_sentence = count(model.bridge.parameters())
    per_src = count(p for p in model.encoder.parameters() if id(p) not in lookups)
    excluded = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) in lookups)
    return {
        "encoder_params_per_src_token": per_src,
        "attention_key_params_per_src_token": per_src_keys,
        "decoder_params_per_tgt_token": per_tgt,
        "bridge_params_per_sentence": per_sentence,
        "lookup_embedding_params_excluded": excluded,
        "note": "model FLOPs = 6 * (src_tokens * (encoder + attention_key) + tgt_tokens * decoder "
                "+ sentences * bridge); tokens are non-PAD and include EOS",
    }


def step_flops(acc: dict, src_tokens: int, tgt_tokens: int, sentences: int) -> float:
    return 6.0 * (src_tokens * (acc["encoder_params_per_src_token"] + acc["attention_key_params_per_src_token"])
                  + tgt_tokens * acc["decoder_params_per_tgt_token"]
                  + sentences * acc["bridge_params_per_sentence"])


def training_batches(args, src_tok, tgt_tok, opts: dict, count: int, batch_size: int):
    """The first `count` batches the training loader would give (epoch 0, 1, ...), collated."""
    paths = data_paths(args)
    dataset = ParallelDataset.from_files(paths["train_src"], paths["train_tgt"], src_tok, tgt_tok,
                                         max_len=opts["max_len"])
    sampler = BucketBatchSampler(dataset.lengths, batch_size, shuffle=True, seed=args.seed)  # as training does
    batches, epoch = [], 0
    while len(batches) < count:
        sampler.set_epoch(epoch)
        for idx in sampler:
            batches.append(collate([dataset[i] for i in idx]))
            if len(batches) == count:
                break
        epoch += 1
    info = {"train_src": str(paths["train_src"]), "train_tgt": str(paths["train_tgt"]),
            "pairs": len(dataset), "batches_per_epoch": len(sampler)}
    return batches, info


def run_training(model_config: dict, opts: dict, batches, *, warmup: int, steps: int, seed: int,
                 autocast_dtype: torch.dtype | None = None, guard_s: float | None = None,
                 around_timed=contextlib.nullcontext) -> dict:
    """Warm-up then timed optimiser steps on a fresh model; per-step wall times and counts.

    around_timed: a context manager factory entered around each timed step (a profiler).
    """
    torch.manual_seed(seed)
    model = build_model(dict(model_config)).train()
    optimizer = adam(model.parameters(), opts["lr"], opts["betas"], opts["weight_decay"])
    # exactly Lightning's bf16-mixed context (MixedPrecision.autocast_context_manager): no cast cache
    ctx = ((lambda: torch.autocast("cpu", dtype=autocast_dtype, cache_enabled=False)) if autocast_dtype
           else contextlib.nullcontext)

    def step(batch) -> float:  # what TranslationModule.training_step and Lightning's loop do
        optimizer.zero_grad(set_to_none=True)
        with ctx():
            loss_sum, n_tokens = batch_loss(model, batch, opts["label_smoothing"])
            loss = loss_sum / max(n_tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    warm_times, times, losses = [], [], []
    for i, batch in enumerate(batches[:warmup + steps]):
        timed = i >= warmup
        t0 = time.perf_counter()
        try:
            with time_limit(None if timed else guard_s), (around_timed() if timed else contextlib.nullcontext()):
                loss = step(batch)
        except StepTimeout:
            return {"skipped": f"warm-up step {i + 1} took over {guard_s:g} s; mode abandoned",
                    "warmup_step_s": [round(t, 3) for t in warm_times]}
        elapsed = time.perf_counter() - t0
        if not timed:
            warm_times.append(elapsed)
            if guard_s and elapsed > guard_s:
                return {"skipped": f"warm-up step {i + 1} took {elapsed:.1f} s (> {guard_s:g} s); mode abandoned",
                        "warmup_step_s": [round(t, 3) for t in warm_times]}
        else:
            times.append(elapsed)
            losses.append(loss)
    return {"times": times, "warm_times": warm_times, "losses": losses}


def summarise_training(raw: dict, batches, acc: dict, peak: dict | None, bf16: bool) -> dict:
    if "times" not in raw:
        return raw
    times = raw["times"]
    total = sum(times)
    tgt = sum(int((b.tgt_out != PAD_ID).sum()) for b in batches)
    src = sum(int(b.src_len.sum()) for b in batches)
    sents = sum(b.src.size(0) for b in batches)
    tgt_cells = sum(b.tgt_out.numel() for b in batches)
    src_cells = sum(b.src.numel() for b in batches)
    flops = sum(step_flops(acc, int(b.src_len.sum()), int((b.tgt_out != PAD_ID).sum()), b.src.size(0))
                for b in batches)
    gflops = flops / total / 1e9

    def fraction(name: str):
        p = (peak or {}).get(name) or {}
        return gflops / p["gflops"] if p.get("gflops") else None

    out = {
        "tgt_tokens_per_s": tgt / total, "src_tokens_per_s": src / total, "sentences_per_s": sents / total,
        "seconds_per_step": total / len(times), "median_step_s": statistics.median(times),
        "min_step_s": min(times), "tgt_tokens": tgt, "src_tokens": src, "sentences": sents,
        "tgt_padding_fraction": 1 - tgt / tgt_cells, "src_padding_fraction": 1 - src / src_cells,
        "model_flops_per_step": flops / len(times), "model_gflops_per_s": gflops,
        "fraction_of_float32_peak": fraction("float32"),
        "loss_first": raw["losses"][0], "loss_last": raw["losses"][-1],
        "warmup_step_s": [round(t, 3) for t in raw["warm_times"]],
    }
    if bf16:
        out["fraction_of_bfloat16_peak"] = fraction("bfloat16")
    return out


def bench_train(args, model_config: dict, src_tok, tgt_tok, opts: dict, peak: dict | None) -> dict:
    n = args.warmup + args.train_steps
    batches, data_info = training_batches(args, src_tok, tgt_tok, opts, n, args.train_batch_size)
    acc = flop_accounting(build_model(dict(model_config)))
    out = {"data": data_info, "batch_size": args.train_batch_size, "warmup_steps": args.warmup,
           "timed_steps": args.train_steps, "seed": args.seed, "flop_accounting": acc}
    timed = batches[args.warmup:]
    for key, dtype, guard in (("float32", None, None), ("bfloat16_autocast", torch.bfloat16, args.bf16_guard)):
        if dtype is not None and args.bf16_skipped:
            out[key] = {"skipped": args.bf16_skipped}
            say(f"train {key}: skipped: {args.bf16_skipped}")
            continue
        say(f"train {key}: {args.warmup} warm-up + {args.train_steps} timed steps of {args.train_batch_size} ...")
        try:
            raw = run_training(model_config, opts, batches, warmup=args.warmup, steps=args.train_steps,
                               seed=args.seed, autocast_dtype=dtype, guard_s=guard)
            out[key] = summarise_training(raw, timed, acc, peak, bf16=dtype is not None)
        except Exception as e:  # noqa: BLE001 - a failing precision mode is a result
            out[key] = {"error": short_error(e)}
        r = out[key]
        if "tgt_tokens_per_s" in r:
            frac = r["fraction_of_float32_peak"]
            say(f"  {r['tgt_tokens_per_s']:9.0f} tgt tok/s  {r['sentences_per_s']:7.1f} sent/s  "
                f"{r['seconds_per_step']:.3f} s/step  pad {r['tgt_padding_fraction']:.1%}  "
                f"{r['model_gflops_per_s']:.2f} GFLOP/s" + (f" = {frac:.1%} of fp32 peak" if frac else ""))
        else:
            say(f"  {r}")
    return out


def bench_peer(args) -> dict:
    """The peer's training throughput, measured now by its own script (../shared/peers)."""
    script = Path(args.peer_script)
    if not script.is_file():
        return {"error": f"no peer script at {script}"}
    say(f"peer {args.peer}: {args.peer_updates} training updates by {script} (minutes) ...")
    proc = subprocess.run(["bash", str(script), "speed", str(args.peer_updates)], capture_output=True, text=True,
                          env={**os.environ, "MULTI30K": args.peer_data, "SRC": args.src, "TGT": args.tgt})
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"[:300]}
    result = json.loads(lines[-1])
    say(f"  {result.get('train_tgt_tok_s')} tgt tok/s")
    return {"name": args.peer, "script": str(script), "updates": args.peer_updates, **result}


def peer_ratios(report: dict) -> dict:
    """Each of our training modes' target tokens/s over the peer's (measured in the same run)."""
    peer = (report.get("peer") or {}).get("train_tgt_tok_s")
    train = report.get("train") or {}
    out = {}
    for key in ("float32", "bfloat16_autocast", "float32_after", "bfloat16_autocast_after"):
        rate = (train.get(key) or {}).get("tgt_tokens_per_s")
        if rate and peer:
            out[key] = rate / peer
    return out


# ---- 3. decode ---------------------------------------------------------------------

def decode_once(translator: Translator, lines, refs, beam: int, batch_size: int,
                limit_s: float | None = None) -> dict:
    opts = SearchOptions(beam_size=beam)
    translator.translate_hypotheses(lines[:min(8, len(lines))], opts, batch_size=batch_size)  # warm-up
    with time_limit(limit_s):
        t0 = time.perf_counter()
        hyps = translator.translate_hypotheses(lines, opts, batch_size=batch_size)
        seconds = time.perf_counter() - t0
    best = [h[0] for h in hyps]
    n_tokens = sum(len(h.pieces) + 1 for h in best)
    scores = corpus_scores([h.text for h in best], refs)
    return {"seconds": seconds, "sentences_per_s": len(lines) / seconds, "output_tokens": n_tokens,
            "output_tokens_per_s": n_tokens / seconds, "bleu": scores.bleu, "chrf": scores.chrf,
            "_signatures": (scores.bleu_signature, scores.chrf_signature)}


def decode_plan(args) -> list[tuple[int, int, str]]:
    """(beam, batch size, why) in run order, without duplicates."""
    plan: dict[tuple[int, int], list[str]] = {}
    for bs in args.batch_sizes:
        for beam in (5, 1):
            plan.setdefault((beam, bs), []).append("batch-size sweep")
    for beam in args.beam_sizes:
        plan.setdefault((beam, 64), []).append("beam sweep")
    return [(beam, bs, " + ".join(dict.fromkeys(why))) for (beam, bs), why in plan.items()]


def bench_decode(args) -> dict:
    paths = data_paths(args)
    lines, refs = test_lines(args)
    out: dict = {"test_src": str(paths["test_src"]), "test_ref": str(paths["test_ref"]),
                 "sentences": len(lines), "rows": []}
    translator = Translator.from_checkpoint(args.checkpoint)
    fp32_seconds: dict[tuple[int, int], float] = {}
    for beam, bs, why in decode_plan(args):
        r = decode_once(translator, lines, refs, beam, bs)
        out["bleu_signature"], out["chrf_signature"] = r.pop("_signatures")
        fp32_seconds[(beam, bs)] = r["seconds"]
        out["rows"].append({"dtype": "float32", "beam_size": beam, "batch_size": bs, **r, "why": why})
        say(f"decode fp32 beam {beam:2d} batch {bs:4d}: {r['sentences_per_s']:8.1f} sent/s "
            f"{r['output_tokens_per_s']:9.0f} tok/s  BLEU {r['bleu']:.2f}")

    variants = []  # (dtype, why, how to build its translator, guarded: may be too slow to finish)
    if args.bf16_skipped and not args.no_bf16_decode:
        out["rows"] += [{"dtype": "bfloat16", "beam_size": beam, "batch_size": 64, "skipped": args.bf16_skipped}
                        for beam in (1, 5)]
        say(f"decode bfloat16: skipped: {args.bf16_skipped}")
    elif not args.no_bf16_decode:
        variants.append(("bfloat16", "bfloat16 weights (--precision bfloat16)",
                         lambda: Translator.from_checkpoint(args.checkpoint, precision="bfloat16"), True))
    if not args.no_int8_decode:
        variants.append(("int8", "int8 decoder matrices (seq2seq/quantize.py)",
                         lambda: Translator.from_checkpoint(args.checkpoint, precision="int8"), False))
    for dtype, why, build, guarded in variants:
        try:
            reduced, err = build(), None
        except Exception as e:  # noqa: BLE001 - a precision this CPU or build cannot do is a result
            reduced, err = None, short_error(e)
        for beam in (1, 5):
            row = {"dtype": dtype, "beam_size": beam, "batch_size": 64, "why": why}
            if reduced is None:
                row["error"] = err
            else:
                # a guarded run may take at most 10x the float32 time of the same setting (>= guard)
                ref = fp32_seconds.get((beam, 64))
                limit = (max(args.bf16_guard, 10 * ref) if ref else args.bf16_guard * 10) if guarded else None
                stage = "warm-up on 8 sentences"
                try:
                    with time_limit(args.bf16_guard if guarded else None):
                        reduced.translate_hypotheses(lines[:8], SearchOptions(beam_size=beam), batch_size=64)
                    stage = "full run (limit: 10x float32 time)"
                    r = decode_once(reduced, lines, refs, beam, 64, limit_s=limit)
                    r.pop("_signatures")
                    row.update(r)
                    if ref:
                        row["speedup_over_float32"] = ref / r["seconds"]
                except StepTimeout as e:
                    row["skipped"] = f"{dtype} decoding, {stage}: {e}"
                except Exception as e:  # noqa: BLE001
                    row["error"] = short_error(e)
            out["rows"].append(row)
            if "seconds" in row:
                say(f"decode {dtype:>4.4} beam {beam:2d} batch   64: {row['sentences_per_s']:8.1f} sent/s "
                    f"{row['output_tokens_per_s']:9.0f} tok/s  BLEU {row['bleu']:.2f}")
            else:
                say(f"decode {dtype:>4.4} beam {beam:2d} batch   64: {row.get('error') or row.get('skipped')}")
    return out


# ---- profile -----------------------------------------------------------------------

def top_ops(prof, rows: int) -> dict:
    """A finished torch.profiler run as {total_ms, ops: the `rows` largest by self CPU time}."""
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"total_ms": total / 1000, "ops": [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
         "calls": e.count} for e in events[:rows]]}


def bench_profile(args, model_config: dict, src_tok, tgt_tok, opts: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out = {}
    say(f"profile: one {args.profile_precision} training step of {args.train_batch_size} "
        f"after {args.warmup} warm-up steps ...")
    batches, _ = training_batches(args, src_tok, tgt_tok, opts, args.warmup + 1, args.train_batch_size)
    prof = profile(activities=[ProfilerActivity.CPU])
    dtype = torch.bfloat16 if args.profile_precision == "bf16-mixed" else None
    run_training(model_config, opts, batches, warmup=args.warmup, steps=1, seed=args.seed,
                 autocast_dtype=dtype, around_timed=lambda: prof)
    out["train_step"] = top_ops(prof, args.profile_rows)
    lines, _ = test_lines(args)
    translator = Translator.from_checkpoint(args.checkpoint)
    for key, beam in (("beam5_batch", 5), ("greedy_batch", 1)):
        say(f"profile: one {key.replace('_', ' ')} of {min(64, len(lines))} test sentences ...")
        search = SearchOptions(beam_size=beam)
        translator.translate_hypotheses(lines[:8], search, batch_size=64)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            translator.translate_hypotheses(lines[:64], search, batch_size=64)
        out[key] = top_ops(prof, args.profile_rows)
    return out


# ---- 4. memory ---------------------------------------------------------------------

def own_peak_rss_kb() -> tuple[int, str]:
    """This process image's peak resident set in kB, and where it was read.

    /proc/self/status VmHWM belongs to the memory map that exec created, so it covers this
    program only. ru_maxrss (the fallback off Linux) survives exec on Linux: a child started
    by a parent holding 1 GB reports at least that much, whatever it used itself.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]), "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def child_main(args) -> int:
    """Run one job in this (fresh) process; print its timings as JSON on stdout."""
    setup_kb = own_peak_rss_kb()[0]
    if args._child.startswith("scale-"):
        result = scale_child(args)
        peak_kb, source = own_peak_rss_kb()
        result["self_peak_rss_mb"], result["peak_rss_source"] = peak_kb / 1024, source
        print(json.dumps(result), flush=True)
        return 0
    if args._child == "translate":
        lines, _ = test_lines(args)
        translator = Translator.from_checkpoint(args.checkpoint)
        setup_kb = own_peak_rss_kb()[0]
        t0 = time.perf_counter()
        translator.translate_hypotheses(lines, SearchOptions(beam_size=5), batch_size=64)
        result = {"beam_size": 5, "batch_size": 64, "sentences": len(lines)}
    else:
        _, src_tok, tgt_tok, info = load_model(args.checkpoint)
        opts = training_options(info)
        batches, _ = training_batches(args, src_tok, tgt_tok, opts, args.memory_train_steps,
                                      args.train_batch_size)
        setup_kb = own_peak_rss_kb()[0]
        t0 = time.perf_counter()
        run_training(info["model_config"], opts, batches, warmup=0, steps=args.memory_train_steps, seed=args.seed)
        result = {"steps": args.memory_train_steps, "batch_size": args.train_batch_size}
    result["seconds"] = time.perf_counter() - t0
    peak_kb, source = own_peak_rss_kb()
    result["self_peak_rss_mb"], result["peak_rss_source"] = peak_kb / 1024, source
    result["setup_peak_rss_mb"] = setup_kb / 1024
    print(json.dumps(result), flush=True)
    return 0


def child_args(args, job: str, extra: list[str] | None = None) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--checkpoint", args.checkpoint, "--data", args.data,
            "--src", args.src, "--tgt", args.tgt, "--test-split", args.test_split,
            "--train-batch-size", str(args.train_batch_size), "--seed", str(args.seed),
            "--memory-train-steps", str(args.memory_train_steps), "--_child", job]
    if args.sentences is not None:
        argv += ["--sentences", str(args.sentences)]
    if args.no_malloc_tuning:
        argv.append("--no-malloc-tuning")
    if job.startswith("scale-"):
        argv += ["--scale-sp-sample", str(args.scale_sp_sample), "--scale-train-steps", str(args.scale_train_steps)]
    return argv + (extra or [])


def run_child(args, job: str, extra: list[str] | None = None) -> dict:
    """Start a child, read its JSON and its peak resident set (see own_peak_rss_kb)."""
    with tempfile.TemporaryFile("w+") as err:
        env = {k: v for k, v in os.environ.items() if k != KERNEL_CACHE_VAR}
        if USER_KERNEL_CACHE is not None:  # else each child sets its own, as seq2seq-train and -translate do
            env[KERNEL_CACHE_VAR] = USER_KERNEL_CACHE
        proc = subprocess.Popen(child_args(args, job, extra), stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env)
        stdout = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        return {"error": f"child exited {proc.returncode}: {tail[-1] if tail else ''}"[:300]}
    result = json.loads(stdout.strip().splitlines()[-1])
    # the child's own VmHWM where it has one: ru_maxrss also counts what the parent
    # (this process) held when it forked, since Linux keeps it across exec
    own = result.get("self_peak_rss_mb") if result.get("peak_rss_source") == "VmHWM" else None
    return {"peak_rss_mb": own if own is not None else usage.ru_maxrss / 1024, **result}


def bench_memory(args) -> dict:
    out = {}
    for job in ("translate", "train"):
        say(f"memory: {job} in a child process ...")
        out[job] = run_child(args, job)
        r = out[job]
        say(f"  peak RSS {r['peak_rss_mb']:.0f} MB (after setup {r['setup_peak_rss_mb']:.0f} MB)"
            if "peak_rss_mb" in r else f"  {r}")
    return out


# ---- 5. scale ----------------------------------------------------------------------

def synthesise(args, pairs: int, out_dir: Path) -> dict:
    """Write `pairs` pairs drawn with replacement from the training corpus (seeded)."""
    paths = data_paths(args)
    src, tgt = read_lines(paths["train_src"]), read_lines(paths["train_tgt"])
    rng = np.random.default_rng(args.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out_dir / "train.src", "w", encoding="utf-8") as fs, open(out_dir / "train.tgt", "w", encoding="utf-8") as ft:
        for start in range(0, pairs, 100_000):
            idx = rng.integers(0, len(src), size=min(100_000, pairs - start))
            fs.write("".join(src[i] + "\n" for i in idx))
            ft.write("".join(tgt[i] + "\n" for i in idx))
    return {"pairs": pairs, "synthesis_s": time.perf_counter() - t0,
            "corpus_bytes": (out_dir / "train.src").stat().st_size + (out_dir / "train.tgt").stat().st_size}


def scale_child(args) -> dict:
    """One part of the scale section, in this fresh process (see bench_scale)."""
    d = Path(args.scale_work)
    files = [d / "train.src", d / "train.tgt"]
    _, src_tok, tgt_tok, info = load_model(args.checkpoint)
    opts = training_options(info)
    if args._child == "scale-tokenizer":
        t0 = time.perf_counter()
        tok = train_tokenizer(files, len(tgt_tok), max_sentences=args.scale_sp_sample, seed=args.seed)
        return {"seconds": time.perf_counter() - t0, "sample": args.scale_sp_sample, "vocab_size": len(tok)}
    t0 = time.perf_counter()
    dataset = cached_dataset(*files, src_tok, tgt_tok, d / "cache", max_len=opts["max_len"])
    opened = time.perf_counter() - t0
    if args._child == "scale-prepare":
        cache_bytes = sum(f.stat().st_size for f in (d / "cache").rglob("*") if f.is_file())
        return {"seconds": opened, "sentences_per_s": len(dataset) / opened if opened else None,
                "cache_bytes": cache_bytes, "pairs_kept": len(dataset)}
    # scale-train: what a training run does with the cache, up to and past its first step
    sampler = BucketBatchSampler(dataset.lengths, args.train_batch_size, shuffle=True, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(dict(info["model_config"])).train()
    optimizer = adam(model.parameters(), opts["lr"])
    first, steps = None, 0
    for idx in sampler:
        batch = collate([dataset[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n_tokens = batch_loss(model, batch, opts["label_smoothing"])
        (loss_sum / max(n_tokens, 1)).backward()
        optimizer.step()
        steps += 1
        if first is None:
            first = time.perf_counter() - CHILD_START
        if steps == args.scale_train_steps:
            break
    return {"reuse_open_s": opened, "time_to_first_step_s": first, "steps": steps,
            "seconds": time.perf_counter() - t0}


def bench_scale(args) -> dict:
    base = Path(args.scale_dir or tempfile.mkdtemp(prefix="seq2seq-scale-"))
    runs = []
    try:
        for pairs in args.scale_pairs:
            work = base / f"pairs-{pairs}"
            say(f"scale: {pairs:,} pairs in {work} ...")
            run = synthesise(args, pairs, work)
            shutil.rmtree(work / "cache", ignore_errors=True)  # "prepare" must build, not find, the cache
            for part, job in (("tokenizer", "scale-tokenizer"), ("prepare", "scale-prepare"),
                              ("train", "scale-train")):
                run[part] = run_child(args, job, extra=["--scale-work", str(work)])
            if "reuse_open_s" in run["train"]:
                run["reuse_open_s"] = run["train"].pop("reuse_open_s")
            runs.append(run)
            p, t = run["prepare"], run["train"]
            say(f"  prepare {p.get('sentences_per_s') or 0:,.0f} pairs/s, cache {p.get('cache_bytes', 0) / 2**20:,.0f} "
                f"MiB; first step after {t.get('time_to_first_step_s', float('nan')):.1f} s; "
                f"training peak RSS {t.get('peak_rss_mb', float('nan')):,.0f} MB")
    finally:
        if args.scale_dir is None:
            shutil.rmtree(base, ignore_errors=True)  # gigabytes at millions of pairs: keep only when asked
    rss = [r["train"].get("peak_rss_mb") for r in runs]
    ratio = rss[-1] / rss[0] if len(rss) > 1 and None not in (rss[0], rss[-1]) else None
    return {"dir": str(base) if args.scale_dir else None, "sp_sample": args.scale_sp_sample, "train_steps": args.scale_train_steps,
            "runs": runs, "train_rss_ratio": ratio}


# ---- report ------------------------------------------------------------------------

def print_table(report: dict) -> None:
    say("\n==== benchmark summary ====")
    env = report["environment"]
    say(f"{env['cpu_model']}  threads={env['num_threads']}  torch {env['torch_version']}  "
        f"load at start {env['load_average_at_start']}")
    if "peak" in report:
        p = report["peak"]
        for k in ("float32", "float32_blas", "bfloat16"):
            if k in p:
                v = p[k]
                say(f"peak {k:12s} " + (f"{v['gflops']:.1f} GFLOP/s" if "gflops" in v else str(v)))
    if "train" in report:
        t = report["train"]
        say(f"{'train':22s} {'tgt tok/s':>10s} {'sent/s':>8s} {'s/step':>8s} {'pad':>6s} {'GFLOP/s':>8s} {'%fp32pk':>8s}")
        for k in ("float32", "bfloat16_autocast", "float32_after", "bfloat16_autocast_after"):
            if k not in t:
                continue
            r = t.get(k, {})
            if "tgt_tokens_per_s" in r:
                frac = r["fraction_of_float32_peak"]
                say(f"{k:22s} {r['tgt_tokens_per_s']:10.0f} {r['sentences_per_s']:8.1f} "
                    f"{r['seconds_per_step']:8.3f} {r['tgt_padding_fraction']:6.1%} {r['model_gflops_per_s']:8.2f} "
                    f"{(f'{frac:.2%}' if frac is not None else '-'):>8s}")
            else:
                say(f"{k:22s} {r}")
    if "decode" in report:
        d = report["decode"]
        say(f"decode ({d['sentences']} sentences)")
        say(f"{'dtype':9s} {'beam':>4s} {'batch':>5s} {'sent/s':>8s} {'tok/s':>9s} {'BLEU':>6s}")
        for r in d["rows"]:
            if "seconds" in r:
                say(f"{r['dtype']:9s} {r['beam_size']:4d} {r['batch_size']:5d} {r['sentences_per_s']:8.1f} "
                    f"{r['output_tokens_per_s']:9.0f} {r['bleu']:6.2f}")
            else:
                say(f"{r['dtype']:9s} {r['beam_size']:4d} {r['batch_size']:5d} {r.get('error') or r.get('skipped')}")
    if "memory" in report:
        for k, r in report["memory"].items():
            say(f"memory {k:10s} " + (f"peak RSS {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else str(r)))
    if "scale" in report:
        say(f"{'scale pairs':>12s} {'prep pairs/s':>12s} {'cache MiB':>9s} {'1st step s':>10s} {'train RSS MB':>12s}")
        for r in report["scale"]["runs"]:
            p, t = r["prepare"], r["train"]
            say(f"{r['pairs']:12,d} {p.get('sentences_per_s') or float('nan'):12,.0f} "
                f"{p.get('cache_bytes', float('nan')) / 2**20:9,.0f} {t.get('time_to_first_step_s', float('nan')):10.1f} "
                f"{t.get('peak_rss_mb', float('nan')):12,.0f}")
        ratio = report["scale"]["train_rss_ratio"]
        say(f"training RSS, largest / smallest corpus: {ratio:.2f}" if ratio else "training RSS ratio: n/a")
    if "peer_ratios" in report:
        peer = report.get("peer", {})
        say(f"peer {peer.get('name')}: {peer.get('train_tgt_tok_s', peer.get('error'))} tgt tok/s; ours / peer: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in report["peer_ratios"].items()))
    for key, table in report.get("profile", {}).items():
        say(f"profile {key}: {table['total_ms']:.1f} ms of self CPU time; largest:")
        for r in table["ops"][:10]:
            say(f"  {r['op'][:44]:44s} {r['self_ms']:9.1f} ms {r['share']:6.1%} {r['calls']:6d} calls")


# ---- command line --------------------------------------------------------------------

def finite(value):
    """The report as strict JSON: NaN/inf (a diverged loss, say) become null, tuples lists."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def section_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    valid = SECTIONS + OPTIONAL_SECTIONS
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad or text!r}; choose from {','.join(valid)}")
    return names


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure matmul peak, training throughput, decoding speed/BLEU "
                                            "and peak memory of a checkpoint on this CPU.")
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt or model.pt written by seq2seq-train")
    p.add_argument("--data", default="data/multi30k", help="corpus directory (default: %(default)s)")
    p.add_argument("--src", default="en", help="source language suffix (default: %(default)s)")
    p.add_argument("--tgt", default="de", help="target language suffix (default: %(default)s)")
    p.add_argument("--test-split", default="test2016", help="decoded split: DATA/SPLIT.SRC (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--only", type=section_list, default=list(SECTIONS),
                   help="comma-separated sections to run (default: all of %s)" % ",".join(SECTIONS))
    g = p.add_argument_group("peak")
    g.add_argument("--peak-size", type=positive_int, default=2048, help="matmul size n (default: %(default)s)")
    g.add_argument("--peak-repeats", type=positive_int, default=5, help="timed matmuls per dtype (default: %(default)s)")
    g.add_argument("--peak-warmup", type=int, default=2, help="untimed matmuls per dtype (default: %(default)s)")
    g.add_argument("--peak-budget", type=float, default=20.0,
                   help="stop timing a dtype after this many seconds (default: %(default)s)")
    g = p.add_argument_group("train")
    g.add_argument("--train-steps", type=positive_int, default=20, help="timed steps (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    g.add_argument("--train-batch-size", type=positive_int, default=128, help="sentences per batch (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1, help="batch order and model init (default: %(default)s)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="the bfloat16 rows (peak, bf16-mixed training, bfloat16 decoding): auto measures them "
                        "where the CPU has bfloat16 instructions or /proc/cpuinfo cannot tell, on measures "
                        "them also where they are emulated (one 2048^3 product: 54 s on an AVX2 CPU), off "
                        "never (default: %(default)s)")
    g.add_argument("--bf16-guard", type=float, default=20.0,
                   help="abandon a bfloat16 mode whose warm-up step/call takes longer (s; default: %(default)s)")
    g = p.add_argument_group("peer (training throughput of another toolkit, measured in the same run)")
    g.add_argument("--peer", choices=["fairseq"], help="measure this peer's training speed between two runs of "
                   "the train section and report our modes' ratios to it (needs ../shared/peers/setup_fairseq.sh)")
    g.add_argument("--peer-script", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
                                                  / "fairseq_multi30k.sh"), help="(default: %(default)s)")
    g.add_argument("--peer-data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"
                                                / "multi30k"), help="raw Multi30k for the peer (default: %(default)s)")
    g.add_argument("--peer-updates", type=positive_int, default=150,
                   help="the peer's training updates; its first 25 are its warm-up (default: %(default)s)")
    g = p.add_argument_group("decode")
    g.add_argument("--batch-sizes", type=int_list, default=[1, 16, 64, 128],
                   help="batch sizes, each with beam 5 and greedy (default: 1,16,64,128)")
    g.add_argument("--beam-sizes", type=int_list, default=[1, 2, 5, 10],
                   help="beam sizes at batch size 64 (default: 1,2,5,10)")
    g.add_argument("--sentences", type=positive_int, default=None, help="decode only the first N test sentences")
    g.add_argument("--no-bf16-decode", action="store_true", help="skip the bfloat16 decoding rows")
    g.add_argument("--no-int8-decode", action="store_true", help="skip the int8 decoding rows")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-train-steps", type=positive_int, default=10,
                   help="training steps in the memory child (default: %(default)s)")
    g = p.add_argument_group("ablations (to measure an optimisation against its absence)")
    g.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc as it is (seq2seq.cpu.keep_freed_memory not called)")
    g.add_argument("--input-feeding", choices=["checkpoint", "on", "off"], default="checkpoint",
                   help="train section: override the checkpoint's input feeding (default: as trained)")
    g = p.add_argument_group("profile (only with --only ...,profile)")
    g.add_argument("--profile-rows", type=positive_int, default=15,
                   help="operators kept per profile, largest self time first (default: %(default)s)")
    g.add_argument("--profile-precision", choices=["float32", "bf16-mixed"], default="float32",
                   help="the training step profiled runs in this precision (default: %(default)s)")
    g = p.add_argument_group("scale (only with --only ...,scale)")
    g.add_argument("--scale-pairs", type=int_list, default=[30_000, 5_000_000],
                   help="corpus sizes to synthesise and train on (default: 30000,5000000)")
    g.add_argument("--scale-dir", help="where the corpora and caches go (default: a new temporary directory)")
    g.add_argument("--scale-sp-sample", type=positive_int, default=1_000_000,
                   help="SentencePiece learns from at most this many sentences (default: %(default)s)")
    g.add_argument("--scale-train-steps", type=positive_int, default=20,
                   help="training steps on each corpus (default: %(default)s)")
    p.add_argument("--_child", choices=["translate", "train", "scale-tokenizer", "scale-prepare", "scale-train"],
                   help=argparse.SUPPRESS)
    p.add_argument("--scale-work", help=argparse.SUPPRESS)
    return p


def run(args) -> dict:
    check_inputs(args, args.only)
    started = time.perf_counter()
    report: dict = {"schema": SCHEMA, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": sys.argv, "environment": environment()}
    model, src_tok, tgt_tok, info = load_model(args.checkpoint)
    opts = training_options(info)
    report["checkpoint"] = {"path": str(args.checkpoint), "model_config": info["model_config"],
                            "parameters": model.num_parameters(), "src_vocab_size": len(src_tok),
                            "tgt_vocab_size": len(tgt_tok),
                            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}}
    del model
    say(f"benchmark: {args.checkpoint} ({report['checkpoint']['parameters']:,} parameters), "
        f"{torch.get_num_threads()} threads, sections {','.join(args.only)}")
    if "peak" in args.only:
        report["peak"] = bench_peak(args)
    if "train" in args.only:
        model_config = dict(info["model_config"])
        if args.input_feeding != "checkpoint":
            model_config["input_feeding"] = args.input_feeding == "on"
        report["train"] = bench_train(args, model_config, src_tok, tgt_tok, opts, report.get("peak"))
        report["train"]["input_feeding"] = model_config["input_feeding"]
        report["train"]["auto_precision"] = training_precision(OmegaConf.create({"accelerator": "cpu"}))
    if args.peer:
        report["peer"] = bench_peer(args)
        if "train" in args.only:  # ours again after the peer: the machine drifts within minutes
            again = bench_train(args, model_config, src_tok, tgt_tok, opts, report.get("peak"))
            for key in ("float32", "bfloat16_autocast"):
                report["train"][f"{key}_after"] = again[key]
        report["peer_ratios"] = peer_ratios(report)
    if "decode" in args.only:
        report["decode"] = bench_decode(args)
    if "memory" in args.only:
        report["memory"] = bench_memory(args)
    if "scale" in args.only:
        report["scale"] = bench_scale(args)
    if "profile" in args.only:
        report["profile"] = bench_profile(args, dict(info["model_config"]), src_tok, tgt_tok, opts)
    report["environment"]["malloc_tuned"] = not args.no_malloc_tuning
    report["environment"]["onednn_kernel_cache"] = os.environ.get(KERNEL_CACHE_VAR)
    report["elapsed_s"] = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    if args.warmup < 0 or args.peak_warmup < 0:
        parser().error("--warmup and --peak-warmup must be >= 0")
    args.bf16_skipped = bf16_skipped(args.bf16, cpu_has_bfloat16())
    if not args.no_malloc_tuning:
        keep_freed_memory()
    if args._child != "translate":
        limit_kernel_cache(TRAINING_KERNELS)  # as seq2seq-train keeps them: training speed depends on it
    try:
        if args._child:
            return child_main(args)
        # Whatever a library might print goes to stderr: stdout carries only the JSON line.
        real_stdout = os.dup(1)
        sys.stdout.flush()
        os.dup2(2, 1)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                report = run(args)
        finally:
            sys.stdout.flush()
            os.dup2(real_stdout, 1)
            os.close(real_stdout)
        print_table(report)
        if args.json:
            print(json.dumps(finite(report)), flush=True)
        return 0
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
