"""An exponential moving average of the weights, for validation, checkpoints and model.pt.

After the average has taken steps 1..n with weights w_k, it is

    sum_k c_k w_k / sum_k c_k,    c_k = d_(k+1) * d_(k+2) * ... * d_n

where d_j is the decay at step j: each step weighs d times the next, and the first step's
weights hold no more than any other's. (A plain EMA started from the first step keeps
decay^n of it, a tenth after 4,600 steps at decay 0.9995: on a slow machine, near-random
weights in every validation.) With one decay throughout this is the bias correction of
Adam's moments: the n-th update mixes the new weights in by (1 - d) / (1 - d^n).

The decay is either fixed per step (train.ema_decay) or follows the training budget
(train.ema_half_life): a half-life that is a fraction of the budget's steps, estimated from
the budget's progress (schedule.budget_progress: steps, epochs or wall time, whichever ends
first), so that a machine with fewer steps in its budget averages the same share of its run.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from .schedule import budget_progress

log = logging.getLogger(__name__)


class MovingAverage(WeightAveraging):
    """The moving average as a Lightning callback, updated after every optimizer step.

    Lightning's WeightAveraging does the bookkeeping: validation on the average, the average
    as each checkpoint's `state_dict` with the raw weights beside it, resuming both. This adds
    the normalised update (one fused foreach lerp per step), a first step, and the decay that
    follows the budget; the normaliser sum_k c_k is resumed with the rest.
    """

    def __init__(self, decay: float = 0.0, start_step: int = 0, half_life: float | None = None) -> None:
        if (half_life is None) == (not decay > 0):
            raise ValueError(f"give one of decay (> 0, got {decay}) and half_life (got {half_life})")
        super().__init__(multi_avg_fn=self.mix)
        self.decay = decay
        self.half_life = half_life
        self.start_step = start_step
        self.current_decay = decay       # the decay of the step being averaged in
        self.weight_sum = 0.0            # sum_k c_k over the steps averaged so far (0: none yet)
        self._mixed_at: int | None = None

    @torch.no_grad()
    def mix(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        """torch's AveragedModel calls this for each step after its first (which it copies),
        once for each group of tensors of one device and dtype, with the same `n_averaged`."""
        n = int(n_averaged)                          # steps averaged before this one (>= 1)
        if n != self._mixed_at:                      # the first group of this step
            if self.weight_sum <= 0:                 # one step in (or an average saved without its sum)
                d = self.decay or self.current_decay  # an older run's fixed decay, or else today's
                self.weight_sum = float(n) if d in (0.0, 1.0) else (1 - d ** n) / (1 - d)
            self.weight_sum = self.current_decay * self.weight_sum + 1.0
            self._mixed_at = n
        torch._foreach_lerp_(averaged, current, 1.0 / self.weight_sum)

    def step_decay(self, trainer: L.Trainer, batch_idx: int) -> float:
        """The decay for the step just taken: fixed, or 0.5 ** (1 / half-life in steps), the
        half-life being `half_life` times the budget's steps as estimated so far."""
        if self.half_life is None:
            return self.decay
        progress = budget_progress(trainer, batch_idx + 1)
        if not progress or trainer.global_step < 1:
            return 0.0
        half_life_steps = self.half_life * trainer.global_step / progress   # (budget's steps) * fraction
        return 0.5 ** (1.0 / max(half_life_steps, 1e-9))

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.current_decay = self.step_decay(trainer, batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weight_sum": self.weight_sum}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.weight_sum = float(state_dict.get("weight_sum", 0.0))   # absent: rebuilt from the step count
        self._mixed_at = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.warn_if_budget_too_short(trainer)

    def warn_if_budget_too_short(self, trainer) -> float | None:
        """With a fixed decay, warn when at the end of the step budget (max_steps or max_epochs)
        the first half of the averaged steps still holds over a quarter of the average; returns
        that share (None: no step budget known, or a decay that follows the budget)."""
        if self.half_life is not None:
            return None
        budgets = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            budgets.append(trainer.max_steps)
        per_epoch = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and per_epoch and per_epoch != float("inf"):
            budgets.append(trainer.max_epochs * int(per_epoch) // max(trainer.accumulate_grad_batches, 1))
        if not budgets:
            return None
        steps = max(min(budgets) - self.start_step, 1)
        first_half = (self.decay ** (steps - steps // 2) - self.decay ** steps) / (1 - self.decay ** steps)
        if first_half > 0.25:
            log.warning("train.ema_decay=%g over a budget of %d optimizer steps: at the end the first half of "
                        "training still holds %.0f%% of the average, which validation and model.pt will see; "
                        "use a smaller decay (about %.4f for this budget), train.ema_half_life (a share of the "
                        "budget), a later train.ema_start_step, or 0 (no average)",
                        self.decay, steps, 100 * first_half, max(1 - 5 / steps, 0.0))
        return first_half
