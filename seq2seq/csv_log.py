"""CSV metrics that survive a resumed run.

Lightning's CSVLogger deletes `metrics.csv` when its directory already holds one, so a
run resumed from `last.ckpt` would lose every loss and BLEU row logged before the
interruption (and `seq2seq-plot-training` would draw only the tail). This logger
continues the file instead: the rows already there stay, new rows are appended under
the same header (widened when a new metric appears). A run that starts over removes
the old file first (`train.clear_previous_outputs`).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # instead of deleting metrics.csv: read its header, so appended rows line up with it
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that appends to an existing metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
