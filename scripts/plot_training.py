"""Draw a run's training curves into a PNG (the same as the `seq2seq-plot-training` command).

    python scripts/plot_training.py runs/multi30k-en-de [--output curves.png]

Loss (train and validation), validation BLEU/chrF and the learning rate against step,
read from RUN_DIR/logs/metrics.csv; the picture goes to RUN_DIR/training.png by default.
"""

import sys

from seq2seq.cli import plot_training_main

if __name__ == "__main__":
    sys.exit(plot_training_main())
