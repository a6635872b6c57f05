"""Training entry point: `seq2seq-train [experiment=NAME] [key=value ...]`.

`main` is the thin Hydra wrapper; `train(cfg)` does the work and is what tests call
with a composed config. Everything a run writes lands under `cfg.paths.output_dir`
(the Hydra run directory): the resolved config, logs, checkpoints/{best,last}.ckpt,
the exported model.pt, test translations and results.json.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from . import matmul, toy
from .average import average, checkpoints_oldest_first
from .checkpoint import CheckpointError, read_checkpoint, save_model, tokenizers_from_payload
from .cpu import TRAINING_KERNELS, cpu_flags, keep_freed_memory, limit_kernel_cache
from .datamodule import TranslationDataModule
from .files import InputError, atomic_write, read_lines
from .metrics import corpus_scores
from .model import ModelConfig
from .module import SCHEDULERS, TranslationModule
from .moving_average import MovingAverage
from .quantize import BF16_FLAGS, auto_precision, check_precision, cpu_has_bfloat16
from .throughput import TokensPerSecond
from .tokenizer import Tokenizer, train_tokenizer
from .translate import SearchOptions, Translator
from .tune import choose_alpha, store_decoding

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, fsynced, then renamed.

    A run killed while saving keeps its previous last.ckpt intact.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)


def split_paths(cfg: DictConfig, split: str) -> tuple[Path, Path]:
    d = Path(cfg.data.dir)
    return d / f"{cfg.data[split]}.{cfg.data.src_lang}", d / f"{cfg.data[split]}.{cfg.data.tgt_lang}"


def check_test_split(cfg: DictConfig) -> None:
    """The test split is scored after training: a broken one must fail now, not hours later."""
    if not cfg.data.get("test"):
        return
    paths = split_paths(cfg, "test")
    present = [p for p in paths if p.is_file()]
    if len(present) == 1:
        missing = next(p for p in paths if not p.is_file())
        raise InputError(f"test split: {present[0]} exists but {missing} does not (give both, or set data.test=null)")
    if present:
        counts = []
        for p in paths:
            with open(p, "rb") as f:
                counts.append(sum(1 for _ in f))
        if counts[0] != counts[1]:
            raise InputError(f"test files differ in length: {paths[0]} has {counts[0]} lines, "
                             f"{paths[1]} has {counts[1]}")
        if counts[0] == 0:
            raise InputError(f"test split is empty: {paths[0]} and {paths[1]} have no lines")


def check_config(cfg: DictConfig) -> ModelConfig:
    """Fail on bad settings and missing files before any work starts."""
    model_config = ModelConfig.from_dict({**OmegaConf.to_container(cfg.model, resolve=True),
                                          "src_vocab_size": 1, "tgt_vocab_size": 1})
    if cfg.data.name == "toy" and not Path(cfg.data.dir, f"{cfg.data.train}.{cfg.data.src_lang}").exists():
        log.info("generating the toy task into %s", cfg.data.dir)
        toy.generate(cfg.data.dir)
    for split in ("train", "valid"):
        for p in split_paths(cfg, split):
            if not p.is_file():
                raise InputError(f"{split} file not found: {p} (prepare the data first, or set data.dir)")
    check_test_split(cfg)
    if "TensorBoardLogger" in str(cfg.logger.get("_target_", "")):
        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("logger=tensorboard needs the tensorboard package: "
                             "pip install 'seq2seq[tensorboard]' (or use logger=csv)")
    keep, avg = int(cfg.train.keep_last_epochs), int(cfg.evaluate.average_last)
    if keep < 0 or avg < 0:
        raise InputError(f"train.keep_last_epochs and evaluate.average_last must be >= 0, got {keep} and {avg}")
    if avg > keep:
        raise InputError(f"evaluate.average_last={avg} needs at least that many epoch checkpoints: "
                         f"set train.keep_last_epochs >= {avg} (it is {keep})")
    if cfg.train.batch_size < 1:
        raise InputError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if model_config.share_embeddings and not cfg.tokenizer.joint:
        # two vocabularies of one size would pass the model's check, their ids meaning different pieces
        raise InputError("model.share_embeddings=true gives both languages one embedding table, which needs "
                         "one vocabulary: set tokenizer.joint=true (it is false)")
    sampling, nbest, sp_type = float(cfg.train.subword_alpha), int(cfg.train.subword_nbest), cfg.tokenizer.model_type
    if not 0 <= sampling <= 1:
        raise InputError(f"train.subword_alpha must be in [0, 1] (0 = off), got {sampling}")
    if nbest == 0 or nbest < -1:
        raise InputError(f"train.subword_nbest must be -1 (all segmentations) or >= 1, got {nbest}")
    if sampling > 0 and sp_type not in ("unigram", "bpe"):
        raise InputError(f"train.subword_alpha={sampling} samples segmentations, which only tokenizer.model_type "
                         f"unigram or bpe have (it is {sp_type}); set train.subword_alpha=0")
    decay, ema_start = float(cfg.train.ema_decay), int(cfg.train.ema_start_step)
    half_life = cfg.train.get("ema_half_life")
    if not 0 <= decay < 1:
        raise InputError(f"train.ema_decay must be in [0, 1) (0 = off, e.g. 0.999), got {decay}")
    if half_life is not None:
        if not 0 < float(half_life) <= 1:
            raise InputError(f"train.ema_half_life must be in (0, 1] (a share of the training budget, "
                             f"e.g. 0.13) or null, got {half_life}")
        if decay > 0:
            raise InputError(f"train.ema_decay={decay:g} and train.ema_half_life={half_life}: set one of them "
                             f"(a fixed decay per step, or a half-life that follows the budget), the other "
                             f"to 0 / null")
    if ema_start < 0:
        raise InputError(f"train.ema_start_step must be >= 0, got {ema_start}")
    if cfg.optim.scheduler not in SCHEDULERS:
        raise InputError(f"Unknown optim.scheduler {cfg.optim.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not float(cfg.optim.lr) > 0:
        raise InputError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0 <= float(cfg.optim.label_smoothing) < 1:
        raise InputError(f"optim.label_smoothing must be in [0, 1), got {cfg.optim.label_smoothing}")
    fraction = float(cfg.optim.anneal_fraction)
    if not 0 < fraction <= 1:
        raise InputError(f"optim.anneal_fraction must be in (0, 1], got {fraction}")
    if cfg.optim.scheduler == "anneal":
        t = cfg.trainer
        if t.get("max_time") is None and (t.get("max_steps") or -1) <= 0 and (t.get("max_epochs") or -1) <= 0:
            raise InputError("optim.scheduler=anneal lowers the lr over the end of the budget, but there is none: "
                             "set trainer.max_time, trainer.max_steps or trainer.max_epochs")
    check_precision_here(cfg.trainer)
    try:
        check_precision(decoding_precision(cfg), "cpu")
    except ValueError as e:
        raise InputError(f"evaluate.precision: {e}") from None
    alpha, alphas = cfg.evaluate.alpha, list(cfg.evaluate.alphas or [])
    if alpha is None and not alphas:
        raise InputError("evaluate.alpha is null (choose it on validation) but evaluate.alphas is empty: "
                         "give the values to try, or a fixed evaluate.alpha")
    if (alpha is not None and alpha < 0) or any(a < 0 for a in alphas):
        raise InputError(f"length penalties must be >= 0, got evaluate.alpha={alpha}, evaluate.alphas={alphas}")
    return model_config


def _trains_on_cpu(trainer: DictConfig) -> bool:
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                    and not torch.backends.mps.is_available())


def training_precision(trainer: DictConfig) -> str:
    """trainer.precision for Lightning: `auto` becomes bf16-mixed where the device multiplies
    bfloat16 matrices in hardware (quantize.auto_precision), 32-true elsewhere."""
    precision = str(trainer.get("precision", "auto"))
    if precision != "auto":
        return precision
    on_cpu = _trains_on_cpu(trainer)
    if not on_cpu and not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if auto_precision("cpu" if on_cpu else "cuda") == "bfloat16" else "32-true"


def trains_in_float32_on_cpu(trainer: DictConfig) -> bool:
    """Whether training with these trainer settings runs on the CPU in float32 (for `auto`: a CPU
    without bfloat16 instructions), where scripts/multi30k.sh --full picks a smaller model."""
    return _trains_on_cpu(trainer) and training_precision(trainer) in ("32-true", "32")


def full_recipe_size(direction: str, trainer: DictConfig) -> str:
    """The model `scripts/multi30k.sh --full DIRECTION` trains by default (`--size auto`).

    large (15.1 M) where training runs in bfloat16 or on a GPU; in float32 on a CPU, medium
    (9.6 M, De->En only) where the CPU has AVX-512 (twice AVX2's float32 products: about 22
    epochs in the 100 minutes), else small (5.3 M). docs/RESULTS.md has the runs behind each.
    """
    if direction not in ("en_de", "de_en"):
        raise ValueError(f"direction must be en_de or de_en, got {direction!r}")
    if not trains_in_float32_on_cpu(trainer):
        return "large"
    return "medium" if direction == "de_en" and "avx512f" in (cpu_flags() or ()) else "small"


def check_precision_here(trainer: DictConfig) -> None:
    """bfloat16 training on a CPU needs bfloat16 instructions: without them oneDNN has no
    bfloat16 LSTM and fails at the first step with an opaque message; say so up front."""
    precision = training_precision(trainer)
    if precision.startswith("bf16") and _trains_on_cpu(trainer) and cpu_has_bfloat16() is False:
        raise InputError(f"trainer.precision={precision} on this CPU: it has no bfloat16 instructions "
                         f"({', '.join(BF16_FLAGS)}), so PyTorch's LSTM cannot run in bfloat16 here; "
                         f"use trainer.precision=32-true (or auto, the default), or a CPU with them, or a GPU")


def build_tokenizers(cfg: DictConfig, resume_from: Path | None) -> tuple[Tokenizer, Tokenizer]:
    if resume_from is not None:
        return tokenizers_from_payload(read_checkpoint(resume_from)["seq2seq"])
    src_path, tgt_path = split_paths(cfg, "train")
    t = cfg.tokenizer
    kwargs = dict(model_type=t.model_type, character_coverage=t.character_coverage,
                  max_sentences=t.max_sentences, seed=int(t.seed))
    if t.joint:
        tok = train_tokenizer([src_path, tgt_path], t.vocab_size, **kwargs)
        return tok, tok
    return (train_tokenizer([src_path], t.vocab_size, **kwargs),
            train_tokenizer([tgt_path], t.vocab_size, **kwargs))


def token_cache_dir(cfg: DictConfig) -> Path | None:
    """Where training pairs are cached as ids (train.token_cache_dir); None: no cache."""
    if cfg.train.token_cache_dir is None:
        return None
    path = Path(cfg.train.token_cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        log.warning("token cache: cannot write to %s (%s); tokenizing in memory instead "
                    "(set train.token_cache_dir to a writable directory)", path, e.strerror or e)
        return None
    return path


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (cfg.train.resume and last.is_file()):
        return None
    try:
        saved = read_checkpoint(last)["seq2seq"]["config"]
    except CheckpointError as e:
        raise InputError(f"cannot resume: {e}; delete it or set train.resume=false") from None
    if saved.get("model") != OmegaConf.to_container(cfg.model, resolve=True) or \
            saved.get("tokenizer") != OmegaConf.to_container(cfg.tokenizer, resolve=True):
        raise InputError(
            f"cannot resume: {last} was trained with a different model or tokenizer config; "
            f"use another hydra.run.dir (or name=...) or train.resume=false"
        )
    keys = ("dir", "src_lang", "tgt_lang", "train")
    trained_on = {k: saved.get("data", {}).get(k) for k in keys}
    asked = {k: cfg.data.get(k) for k in keys}
    if trained_on != asked:
        def describe(d):
            return f"{d['dir']}/{d['train']}.{d['src_lang']} -> .{d['tgt_lang']}"
        raise InputError(
            f"cannot resume: {last} was trained on {describe(trained_on)} and this run asks for "
            f"{describe(asked)}; use another hydra.run.dir (or name=...) or train.resume=false"
        )
    was_train = OmegaConf.create(saved.get("train") or {})
    if averages_weights(was_train) != averages_weights(cfg.train):
        # the checkpoint's state_dict is the average when it kept one: training on from it, or
        # starting an average from raw weights mid-run, would silently change what is trained
        def describe(train):
            return (f"train.ema_decay={float(train.get('ema_decay') or 0.0):g}, "
                    f"train.ema_half_life={train.get('ema_half_life')}")
        raise InputError(
            f"cannot resume: {last} was trained with {describe(was_train)} and this run asks for "
            f"{describe(cfg.train)}; switching the moving average on or off mid-run is not supported: "
            f"keep {describe(was_train)}, or start over in another hydra.run.dir (or train.resume=false)"
        )
    log.info("resuming from %s", last)
    return last


def epoch_checkpoints(cfg: DictConfig, ckpt_dir: Path) -> list[ModelCheckpoint]:
    """Keep the newest `train.keep_last_epochs` end-of-epoch checkpoints (for averaging)."""
    keep = int(cfg.train.keep_last_epochs)
    if keep <= 0:
        return []
    # monitor "step", mode "max": the newest `keep` survive; saved at each epoch's end only,
    # so a mid-epoch validation (val_check_interval) never overwrites an epoch's file
    return [ModelCheckpoint(dirpath=ckpt_dir / "epochs", filename="epoch{epoch:03d}", monitor="step", mode="max",
                            save_top_k=keep, every_n_epochs=1, save_on_train_epoch_end=True,
                            auto_insert_metric_name=False, enable_version_counter=False)]


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt every `every_n_train_steps` steps and at the end of every epoch.

    ModelCheckpoint's own `save_last` skips the end of an epoch, and the end of fit once any
    step-triggered save has happened, which left a finished run's last.ckpt up to
    `every_n_train_steps - 1` steps behind: resuming it to train longer repeated those steps.
    An epoch cut short by max_steps or max_time also ends here, before fit does.
    """

    def __init__(self, dirpath: Path, every_n_train_steps: int) -> None:
        super().__init__(dirpath=dirpath, filename="last", save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # the whole state (optimizer, callbacks, loops), as a resume needs; said so, Lightning logs no notice
        trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}",
                                weights_only=False)


def weight_averaging(cfg: DictConfig) -> list[MovingAverage]:
    """An exponential moving average of the weights (train.ema_decay > 0 or train.ema_half_life).

    Validation scores the averaged weights, and every checkpoint stores them as its
    `state_dict` (the raw weights stay in `current_model_state` for resuming), so early
    stopping, the plateau schedule, model.pt and checkpoint averaging all see the average.
    """
    if not averages_weights(cfg.train):
        return []
    half_life = cfg.train.get("ema_half_life")
    return [MovingAverage(float(cfg.train.ema_decay), int(cfg.train.ema_start_step),
                          None if half_life is None else float(half_life))]


def averages_weights(train: DictConfig) -> bool:
    """Whether a run keeps a moving average of its weights (train.ema_decay or train.ema_half_life)."""
    return float(train.get("ema_decay") or 0.0) > 0 or train.get("ema_half_life") is not None


class StayStopped(EarlyStopping):
    """EarlyStopping whose decision survives a resume: rerunning a run it ended trains no further.

    Lightning restores the callback's counters from last.ckpt but not `trainer.should_stop`, so
    the resumed loop went on training towards max_epochs; here a restored stop stops it again.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.stopped_epoch > 0 or self.wait_count >= self.patience:
            log.info("early stopping ended this run (%d validations without a better %s): nothing more to train",
                     self.wait_count, self.monitor)
            trainer.should_stop = True


def early_stopping(cfg: DictConfig) -> list[EarlyStopping]:
    """Stop after train.early_stopping_patience validations without a better BLEU (0: never).

    Not with optim.scheduler=anneal: that schedule sets the length of training itself,
    and its last stretch, where the learning rate falls, is where the gains come; a plateau
    of validation BLEU before it is no reason to stop (an En->De run on a 2-core CPU stopped on
    one with the learning rate still at a third of its peak).
    """
    patience = int(cfg.train.early_stopping_patience)
    if patience <= 0 or cfg.optim.scheduler == "anneal":
        return []
    return [StayStopped(monitor="val/bleu", mode="max", patience=patience, check_finite=True, strict=False)]


def clear_previous_outputs(run_dir: Path) -> None:
    """A run that starts over (no resume) must not average or export an earlier run's files."""
    stale = [run_dir / "checkpoints" / "epochs", run_dir / "model.best.pt", run_dir / "model.avg.pt",
             run_dir / "logs" / "metrics.csv"]   # the CSV logger continues this file on resume
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        log.info("starting over: removed %s from an earlier run", path)


def decoding_precision(cfg: DictConfig) -> str:
    """evaluate.precision: auto by default, like seq2seq-translate and seq2seq-evaluate."""
    return str(cfg.evaluate.get("precision", "auto"))


def decoder_for(cfg: DictConfig, model_path: Path) -> Translator:
    """The model at `model_path` as the commands will decode it: on the CPU, in evaluate.precision."""
    return Translator.from_checkpoint(model_path, precision=decoding_precision(cfg))


def valid_bleu(cfg: DictConfig, model_path: Path) -> float:
    """Greedy BLEU on the validation split: the score training selects checkpoints by."""
    src_path, ref_path = split_paths(cfg, "valid")
    hyps = [h[0].text for h in decoder_for(cfg, model_path).translate_hypotheses(
        read_lines(src_path), SearchOptions(beam_size=1), batch_size=cfg.evaluate.batch_size)]
    return corpus_scores(hyps, read_lines(ref_path)).bleu


def select_average(cfg: DictConfig, best_pt: Path, epochs_dir: Path, run_dir: Path) -> dict:
    """Average the last `evaluate.average_last` epoch checkpoints; keep it if validation says so.

    The choice between the best single checkpoint and the average is made on the
    validation split (greedy BLEU), never on the test split. The chosen model is
    copied to `best_pt` (model.pt); both candidates stay as model.best.pt and model.avg.pt.
    Returns what was chosen and why (results.json's "selection").
    """
    found = checkpoints_oldest_first(epochs_dir) if epochs_dir.is_dir() else []
    paths = found[-int(cfg.evaluate.average_last):]
    if len(paths) < 2:
        log.info("averaging: %d epoch checkpoint(s) in %s; keeping the best checkpoint", len(paths), epochs_dir)
        return {"chosen": "best", "reason": f"{len(paths)} epoch checkpoint(s) to average"}
    best_copy = run_dir / "model.best.pt"
    with atomic_write(best_copy, "wb") as f:
        f.write(best_pt.read_bytes())
    avg_pt = average(paths, run_dir / "model.avg.pt")
    scores = {"best": valid_bleu(cfg, best_copy), "average": valid_bleu(cfg, avg_pt)}
    chosen = "average" if scores["average"] > scores["best"] else "best"
    if chosen == "average":
        with atomic_write(best_pt, "wb") as f:
            f.write(avg_pt.read_bytes())
    log.info("validation BLEU (greedy): best checkpoint %.2f, average of %d %.2f -> model.pt is the %s",
             scores["best"], len(paths), scores["average"], chosen)
    return {"chosen": chosen, "valid_bleu_greedy": scores, "averaged": [p.name for p in paths]}


def tune_length_penalty(cfg: DictConfig, model_pt: Path) -> dict:
    """Choose the length penalty on the validation split and store it in model.pt (tune.py)."""
    src_path, ref_path = split_paths(cfg, "valid")
    choice = choose_alpha(decoder_for(cfg, model_pt), read_lines(src_path), read_lines(ref_path),
                          beam_size=int(cfg.evaluate.beam_size), alphas=list(cfg.evaluate.alphas),
                          batch_size=cfg.evaluate.batch_size, data=str(src_path))
    store_decoding(model_pt, choice)
    return choice


def evaluate_test(cfg: DictConfig, checkpoint: Path, run_dir: Path) -> dict | None:
    """Translate the test split with the exported model and score it.

    The length penalty is evaluate.alpha, or when that is null the one stored in the
    checkpoint (chosen on validation), exactly what seq2seq-evaluate uses by default.
    """
    if not cfg.data.get("test"):
        log.info("data.test is null: skipping the test evaluation")
        return None
    src_path, ref_path = split_paths(cfg, "test")
    if not (src_path.is_file() and ref_path.is_file()):
        log.info("no test split at %s: skipping the test evaluation", src_path)
        return None
    translator = decoder_for(cfg, checkpoint)
    alpha = None if cfg.evaluate.alpha is None else float(cfg.evaluate.alpha)
    sources, refs = read_lines(src_path), read_lines(ref_path)
    results = {}
    for beam in sorted({1, int(cfg.evaluate.beam_size)}):
        opts = translator.resolve(SearchOptions(beam_size=beam, alpha=alpha))
        start = time.perf_counter()
        hyps = [h[0].text for h in translator.translate_hypotheses(sources, opts, batch_size=cfg.evaluate.batch_size)]
        seconds = time.perf_counter() - start
        scores = corpus_scores(hyps, refs, hyp_name=f"beam {beam} output", ref_name=str(ref_path))
        with atomic_write(run_dir / f"test.beam{beam}.hyp") as f:
            f.write("".join(h + "\n" for h in hyps))
        results[f"beam{beam}"] = {**scores.to_dict(), "alpha": opts.alpha, "precision": translator.precision,
                                  "seconds": seconds}
        log.info("test (%s, beam %d): %s", src_path, beam, scores.format().replace("\n", " | "))
    return results


def train(cfg: DictConfig) -> dict:
    """Train, keep the best checkpoint by validation BLEU, export it, score the test split."""
    run_dir = Path(cfg.paths.output_dir)
    model_cfg = check_config(cfg)
    precision = training_precision(cfg.trainer)
    if precision != cfg.trainer.precision:
        log.info("trainer.precision=%s: %s on this machine", cfg.trainer.precision, precision)
        cfg.trainer.precision = precision
    onednn = matmul.enabled()  # a bad SEQ2SEQ_FLOAT32_MATMUL is refused here, before any work
    if not precision.startswith(("bf16", "16")) and _trains_on_cpu(cfg.trainer):
        log.info("float32 matrix products: %s", "oneDNN" if onednn else "the default BLAS (MKL)")
    keep_freed_memory()
    limit_kernel_cache(TRAINING_KERNELS)
    L.seed_everything(cfg.seed, workers=True)
    resume = find_resume(cfg, run_dir)
    if resume is None:
        clear_previous_outputs(run_dir)
    src_tok, tgt_tok = build_tokenizers(cfg, resume)
    model_cfg.src_vocab_size, model_cfg.tgt_vocab_size = len(src_tok), len(tgt_tok)
    ModelConfig.from_dict(model_cfg.to_dict())  # re-validate with the real vocabulary sizes

    train_src, train_tgt = split_paths(cfg, "train")
    valid_src, valid_tgt = split_paths(cfg, "valid")
    datamodule = TranslationDataModule(
        train_src, train_tgt, valid_src, valid_tgt, src_tok, tgt_tok,
        batch_size=cfg.train.batch_size, max_tokens=cfg.train.max_tokens, max_len=cfg.train.max_len,
        seed=cfg.seed, num_workers=cfg.train.num_workers, cache_dir=token_cache_dir(cfg),
        subword_alpha=float(cfg.train.subword_alpha), subword_nbest=int(cfg.train.subword_nbest))
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    module = TranslationModule(
        model_cfg.to_dict(), **OmegaConf.to_container(cfg.optim, resolve=True),
        src_tokenizer=src_tok, tgt_tokenizer=tgt_tok, valid_references=read_lines(valid_tgt),
        run_config=plain_cfg,
        meta={"src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang, "data": cfg.data.name,
              "train_files": [str(train_src), str(train_tgt)], "precision": precision})
    log.info("model: %d parameters; vocabulary %d/%d", module.model.num_parameters(), len(src_tok), len(tgt_tok))

    ckpt_dir = run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/bleu", mode="max",
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    last = LastCheckpoint(ckpt_dir, every_n_train_steps=cfg.train.checkpoint_every_n_steps)
    # anneal sets the rate before every batch and logs it itself (module.py); the monitor logs the others' by epoch
    lr_monitor = [] if cfg.optim.scheduler == "anneal" else [LearningRateMonitor(logging_interval="epoch")]
    callbacks = [best, last, *lr_monitor, TokensPerSecond(),
                 *epoch_checkpoints(cfg, ckpt_dir), *weight_averaging(cfg), *early_stopping(cfg)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger),
                                     default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
    with atomic_write(run_dir / "config.yaml") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))

    start = time.monotonic()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    wall = time.monotonic() - start
    if trainer.global_rank != 0:
        return {}

    best_path = Path(best.best_model_path) if best.best_model_path else ckpt_dir / "last.ckpt"
    summary = {"run_dir": str(run_dir), "best_checkpoint": str(best_path),
               "best_val_bleu": float(best.best_model_score) if best.best_model_score is not None else None,
               "parameters": module.model.num_parameters(), "precision": precision, "fit_seconds": wall,
               "epochs": trainer.current_epoch, "steps": trainer.global_step}
    if best_path.is_file():
        # the slim model: weights + tokenizer + config, no optimizer state
        ckpt = read_checkpoint(best_path)
        info = ckpt["seq2seq"]
        # from the checkpoint itself: with ddp_spawn the callback's score stays in the workers
        summary["best_val_bleu"] = info["meta"].get("best_val", {}).get("bleu", summary["best_val_bleu"])
        model_pt = save_model(run_dir / "model.pt", module.model, src_tok, tgt_tok, info["config"],
                              info["meta"], state_dict=ckpt["state_dict"])
        # best_val_bleu: the best epoch checkpoint's, as the training loop scored it;
        # model_val_bleu: model.pt's, which is the average when validation preferred it
        summary["model_val_bleu"] = summary["best_val_bleu"]
        if cfg.evaluate.average_last > 0:
            summary["selection"] = select_average(cfg, model_pt, ckpt_dir / "epochs", run_dir)
            scores = summary["selection"].get("valid_bleu_greedy")
            if scores and summary["selection"]["chosen"] == "average":
                summary["model_val_bleu"] = scores["average"]
        if cfg.evaluate.alpha is None:
            summary["decoding"] = tune_length_penalty(cfg, model_pt)
        summary["model"] = str(model_pt)
        summary["test"] = evaluate_test(cfg, model_pt, run_dir)
    with atomic_write(run_dir / "results.json") as f:
        json.dump(summary, f, indent=2)
    log.info("results: %s", json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path="pkg://seq2seq.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (InputError, CheckpointError, ValueError, FloatingPointError) as e:
        # a user mistake (or a diverged loss, module.py): one line naming the problem, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
