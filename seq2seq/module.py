"""The LightningModule: loss, optimisation, validation BLEU, and the checkpoint payload."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from . import __version__
from .checkpoint import payload
from .data import Batch
from .metrics import corpus_scores
from .model import ModelConfig, Seq2Seq
from .schedule import annealed_lr, budget_progress
from .search import greedy_search, max_lengths
from .tokenizer import Tokenizer

SCHEDULERS = ("plateau", "anneal", "none")


def batch_loss(model: Seq2Seq, batch: Batch, label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Summed label-smoothed cross-entropy of a batch's target tokens, and their count."""
    return model.token_loss(batch.src, batch.src_len, batch.tgt_in, batch.tgt_out, label_smoothing)


def adam(params, lr: float, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0, *,
         fused: bool = True) -> torch.optim.Adam:
    """Adam, by default with torch's fused kernel: one pass over each parameter instead of one per update term."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)


class TranslationModule(L.LightningModule):
    """Trains a Seq2Seq model; every constructor argument is a plain value (hparams)."""

    def __init__(
        self,
        model_config: dict,
        *,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        label_smoothing: float = 0.1,
        scheduler: str = "plateau",
        plateau_factor: float = 0.5,
        plateau_patience: int = 1,
        anneal_fraction: float = 0.3,
        min_lr: float = 1e-5,
        val_max_len_a: float = 1.5,
        val_max_len_b: int = 10,
        src_tokenizer: Tokenizer | None = None,
        tgt_tokenizer: Tokenizer | None = None,
        valid_references: Sequence[str] | None = None,
        run_config: dict | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if not 0 < anneal_fraction <= 1:
            raise ValueError(f"anneal_fraction must be in (0, 1], got {anneal_fraction}")
        # tokenizers, references and the run config travel in the "seq2seq" payload instead
        self.save_hyperparameters(ignore=["src_tokenizer", "tgt_tokenizer", "valid_references",
                                          "run_config", "meta"])
        self.model_config = ModelConfig.from_dict(dict(model_config))
        self.model = Seq2Seq(self.model_config)
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.valid_references = list(valid_references) if valid_references is not None else None
        self.run_config = run_config or {}
        self.meta = dict(meta or {})
        self._val_hyps: dict[int, str] = {}
        self._val_loss = [0.0, 0]
        self._fit_started = None

    # ---- training ---------------------------------------------------------------

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        return batch_loss(self.model, batch, self.hparams.label_smoothing)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens = self._loss(batch)
        loss = loss_sum / max(n_tokens, 1)
        if not torch.isfinite(loss):
            # stop before a NaN/inf reaches the weights (and so any checkpoint)
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); lower optim.lr or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.src.size(0))
        self.log("train/tokens", float(n_tokens), reduce_fx="sum", on_step=False, on_epoch=True)
        return loss

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        hp = self.hparams
        if hp.scheduler != "anneal":
            return
        progress = budget_progress(self.trainer, batch_idx)
        if progress is None:
            raise ValueError("optim.scheduler=anneal needs a budget: set trainer.max_time, trainer.max_steps "
                             "or trainer.max_epochs")
        lr = annealed_lr(hp.lr, hp.min_lr, progress, hp.anneal_fraction)
        optimizer = self.trainer.optimizers[0]
        for group in optimizer.param_groups:
            group["lr"] = lr
        # logged here, where it is set (a LearningRateMonitor would read it a step late); same name as the monitor's
        self.log(f"lr-{type(optimizer).__name__}", lr, on_step=True, on_epoch=False)

    def on_fit_start(self) -> None:
        self._fit_started = time.monotonic()

    def on_train_epoch_end(self) -> None:
        if self._fit_started is not None:
            self.meta["train_seconds"] = self.meta.get("train_seconds_before", 0.0) + time.monotonic() - self._fit_started

    # ---- validation: loss and greedy BLEU over the whole validation set -----------

    def on_validation_epoch_start(self) -> None:
        self._val_hyps = {}
        self._val_loss = [0.0, 0]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss_sum, n_tokens = self._loss(batch)
        self._val_loss[0] += float(loss_sum)
        self._val_loss[1] += n_tokens
        if self.valid_references is None or self.tgt_tokenizer is None:
            return
        limits = max_lengths(batch.src_len, self.hparams.val_max_len_a, self.hparams.val_max_len_b, 512)
        hyps = greedy_search(self.model, batch.src, batch.src_len, limits)
        texts = self.tgt_tokenizer.decode([h[0].tokens for h in hyps])
        for i, text, n in zip(batch.index.tolist(), texts, batch.src_len.tolist()):
            # a blank source (EOS alone) gets a blank output, as seq2seq-translate gives it
            self._val_hyps[i] = text if n > 1 else ""

    def on_validation_epoch_end(self) -> None:
        loss_sum, n_tokens = self._val_loss
        hyps = self._val_hyps
        if self.trainer.world_size > 1:
            # each rank decoded its own shard: gather everything so BLEU is over the whole set
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (loss_sum, n_tokens, hyps))
            loss_sum = sum(g[0] for g in gathered)
            n_tokens = sum(g[1] for g in gathered)
            hyps = {k: v for g in gathered for k, v in g[2].items()}
        if n_tokens:
            val_loss = loss_sum / n_tokens
            self.log("val/loss", val_loss, sync_dist=False)
            self.log("val/ppl", math.exp(min(val_loss, 50.0)), sync_dist=False)
        if self.valid_references is None or self.trainer.sanity_checking:
            return
        if len(hyps) != len(self.valid_references):
            raise RuntimeError(f"validation decoded {len(hyps)} of {len(self.valid_references)} sentences")
        scores = corpus_scores([hyps[i] for i in range(len(hyps))], self.valid_references)
        self.log("val/bleu", scores.bleu, prog_bar=True, sync_dist=False)
        self.log("val/chrf", scores.chrf, sync_dist=False)
        self.meta["last_val"] = {"epoch": self.current_epoch, "step": self.global_step, "bleu": scores.bleu,
                                 "chrf": scores.chrf, "bleu_signature": scores.bleu_signature,
                                 "chrf_signature": scores.chrf_signature}
        best = self.meta.get("best_val")
        if best is None or scores.bleu > best["bleu"]:
            self.meta["best_val"] = dict(self.meta["last_val"])

    # ---- optimisation -------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        # float16's gradient scaler would have a fused Adam unscale inside step(), after clipping
        fused = self._grad_scaler() is None
        optimizer = adam(self.parameters(), hp.lr, hp.betas, hp.weight_decay, fused=fused)
        if hp.scheduler in ("none", "anneal"):  # anneal: set before each batch (on_train_batch_start)
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=hp.plateau_factor, patience=hp.plateau_patience, min_lr=hp.min_lr)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/bleu", "interval": "epoch",
                                 "strict": False}}

    def _grad_scaler(self):
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and isinstance(self.trainer.precision_plugin, MixedPrecision) and self._grad_scaler() is None:
            # bf16-mixed has no gradient scaler, so clipping before a fused Adam step is sound;
            # Lightning's mixed-precision plugin refuses it for any fused optimizer all the same
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val,
                                     gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoint payload ---------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        meta = dict(self.meta)
        meta.update({
            "seq2seq_version": __version__,
            "torch_version": str(torch.__version__),
            "lightning_version": L.__version__,
            "parameters": self.model.num_parameters(),
            "epoch": self.current_epoch,
            "global_step": self.global_step,
        })
        checkpoint["seq2seq"] = payload(self.model_config, self.src_tokenizer, self.tgt_tokenizer,
                                        self.run_config, meta)
        # dropout draws from torch's global generator: saving it lets a resumed run
        # continue the same random stream, so resuming changes nothing
        checkpoint["rng_state"] = torch.get_rng_state()
        # hparams are already plain data; drop Lightning's copy of their container type
        checkpoint.pop("hparams_type", None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("seq2seq", {}).get("meta", {})
        for key in ("best_val", "last_val"):
            if key in saved:
                self.meta[key] = saved[key]
        self.meta["train_seconds_before"] = float(saved.get("train_seconds", 0.0))
        if isinstance(checkpoint.get("rng_state"), torch.Tensor):
            torch.set_rng_state(checkpoint["rng_state"])
