"""Learning-rate annealing over the end of a training budget (optim.scheduler=anneal).

The learning rate stays at optim.lr, then falls linearly to optim.min_lr over the last
`anneal_fraction` of the budget. The budget is whichever of trainer.max_time,
trainer.max_steps and trainer.max_epochs runs out first, so a recipe stopped by wall
time anneals on a slow laptop as on a fast one. Progress is read from the trainer
(global step, epoch, Lightning's Timer), all of which a resumed run restores.

Torch's schedulers count steps or epochs; none knows a wall-clock budget, hence this.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Timer


def budget_progress(trainer: L.Trainer, batch_idx: int) -> float | None:
    """The fraction of the training budget spent before this batch, in [0, 1].

    None when the trainer has no budget (no max_time, max_steps or max_epochs).
    """
    fractions = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        fractions.append(trainer.global_step / trainer.max_steps)
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        per_epoch = trainer.num_training_batches
        within = batch_idx / per_epoch if per_epoch and math.isfinite(per_epoch) else 0.0
        fractions.append((trainer.current_epoch + within) / trainer.max_epochs)
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            remaining = callback.time_remaining()
            if remaining is not None:
                elapsed = callback.time_elapsed()
                fractions.append(elapsed / max(elapsed + remaining, 1e-9))
    if not fractions:
        return None
    return min(max(max(fractions), 0.0), 1.0)


def annealed_lr(lr: float, min_lr: float, progress: float, anneal_fraction: float) -> float:
    """`lr` until 1 - anneal_fraction of the budget, then linearly down to `min_lr` at its end."""
    start = 1.0 - anneal_fraction
    if progress <= start or anneal_fraction <= 0:
        return lr
    return lr + (min_lr - lr) * min((progress - start) / anneal_fraction, 1.0)
