"""Training speed in target tokens per second, shown in the progress bar and logged.

Lightning's own ThroughputMonitor counts samples and batches; translation people read
speed in target tokens (non-padding, EOS included), the figure the benchmark and the
peers' numbers use. This callback measures it over a sliding window of steps, wall
clock from one batch's end to the next (so data loading, the optimiser and periodic
checkpoint saves count too; validation does not). Under DDP each process measures its
own rate and the logged figure is their sum.
"""

from __future__ import annotations

import time
from collections import deque

import lightning as L

from .tokenizer import PAD_ID


class TokensPerSecond(L.Callback):
    """Logs `train/tok_s` (progress bar too) over the last `window` training steps."""

    def __init__(self, window: int = 20):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, target tokens)
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # validation and checkpointing between epochs don't count

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # a mid-epoch validation is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._steps.append((now - self._last, int((batch.tgt_out != PAD_ID).sum())))
        self._last = now
        seconds = sum(s for s, _ in self._steps)
        if seconds > 0:
            # with several processes (DDP) the figure is their sum: the speed of the whole run
            pl_module.log("train/tok_s", sum(n for _, n in self._steps) / seconds, prog_bar=True,
                          on_step=True, on_epoch=False, batch_size=batch.src.size(0),
                          sync_dist=trainer.world_size > 1, reduce_fx="sum")
