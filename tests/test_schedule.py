"""optim.scheduler=anneal: the learning rate over the end of a step, epoch or wall-time budget."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import Timer

from seq2seq.schedule import annealed_lr, budget_progress


def test_the_lr_is_flat_then_falls_linearly_to_min_lr():
    lrs = [annealed_lr(2e-3, 1e-5, p / 10, 0.3) for p in range(11)]
    assert lrs[:8] == [2e-3] * 8                      # progress 0 .. 0.7
    assert lrs[8] == pytest.approx(2e-3 - (2e-3 - 1e-5) / 3)
    assert lrs[9] == pytest.approx(2e-3 - 2 * (2e-3 - 1e-5) / 3)
    assert lrs[10] == pytest.approx(1e-5)
    assert annealed_lr(2e-3, 1e-5, 1.0, 1.0) == pytest.approx(1e-5)
    assert annealed_lr(2e-3, 1e-5, 0.5, 1.0) == pytest.approx((2e-3 + 1e-5) / 2)


def _trainer(*, max_steps=-1, max_epochs=None, global_step=0, current_epoch=0, batches=100, callbacks=()):
    return SimpleNamespace(max_steps=max_steps, max_epochs=max_epochs, global_step=global_step,
                           current_epoch=current_epoch, num_training_batches=batches, callbacks=list(callbacks))


def test_progress_is_whichever_budget_runs_out_first():
    assert budget_progress(_trainer(), 0) is None
    assert budget_progress(_trainer(max_steps=400, global_step=100), 0) == pytest.approx(0.25)
    assert budget_progress(_trainer(max_epochs=10, current_epoch=3), 50) == pytest.approx(0.35)
    both = _trainer(max_steps=400, global_step=100, max_epochs=10, current_epoch=3)
    assert budget_progress(both, 50) == pytest.approx(0.35)
    assert budget_progress(_trainer(max_steps=400, global_step=500), 0) == 1.0


def test_wall_time_progress_includes_the_time_a_resumed_run_had_already_spent():
    timer = Timer(duration="00:00:01:40")             # 100 s
    timer.load_state_dict({"time_elapsed": {"train": 60.0}})   # what a checkpoint restores
    timer.on_train_start(None, None)
    progress = budget_progress(_trainer(max_epochs=1000, callbacks=[timer]), 0)
    assert 0.6 <= progress < 0.62


def test_training_with_anneal_sets_the_lr_of_every_step(tmp_path, toy_data, monkeypatch):
    """Flat for the first 60% of max_steps, then down by equal steps to min_lr; the plateau
    schedule is not also attached."""
    import seq2seq.train as train_module
    from .test_train import _compose

    class Recorder(L.Callback):
        lrs: list[float] = []

        def on_train_batch_end(self, trainer, *args):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_fit_end(self, trainer, *args):
            self.schedulers = len(trainer.lr_scheduler_configs)

    recorder = Recorder()
    monkeypatch.setattr(train_module, "weight_averaging", lambda cfg: [recorder])
    monkeypatch.chdir(tmp_path)
    cfg = _compose(["experiment=toy", f"data.dir={toy_data}", "model.embedding_size=16",
                    "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[16]", "evaluate.alpha=0",
                    "optim.scheduler=anneal", "optim.anneal_fraction=0.4", "optim.lr=0.01", "optim.min_lr=0.001",
                    "trainer.max_steps=50", "trainer.max_epochs=100", "trainer.log_every_n_steps=5",
                    f"hydra.run.dir={tmp_path / 'run'}"])
    cfg.paths.output_dir = str(tmp_path / "run")
    train_module.train(cfg)
    lrs = recorder.lrs
    assert len(lrs) == 50 and recorder.schedulers == 0
    assert lrs[:31] == [0.01] * 31                   # steps 0..30: progress <= 0.6
    assert lrs[31:] == pytest.approx([0.01 - 0.009 * (s / 50 - 0.6) / 0.4 for s in range(31, 50)])
    assert lrs[-1] == pytest.approx(0.01 - 0.009 * 0.95)
    # the rate each logged step trained with (every log_every_n_steps: steps 4, 9, ... 49)
    with open(tmp_path / "run" / "logs" / "metrics.csv", newline="") as f:
        logged = [float(row["lr-Adam"]) for row in csv.DictReader(f) if row.get("lr-Adam")]
    assert logged == pytest.approx([lrs[s] for s in range(4, 50, 5)])


def test_anneal_without_a_budget_is_refused_before_any_work(tmp_path):
    from .conftest import run_cli

    proc = run_cli(["seq2seq-train", "experiment=toy", "optim.scheduler=anneal", "trainer.max_epochs=-1",
                    "trainer.max_steps=-1", "trainer.max_time=null", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "set trainer.max_time, trainer.max_steps or trainer.max_epochs" in proc.stderr.decode()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("scheduler, patience, stops", [("plateau", 6, True), ("none", 3, True),
                                                        ("anneal", 6, False), ("plateau", 0, False)])
def test_early_stopping_is_off_where_the_schedule_sets_the_length(scheduler, patience, stops):
    from omegaconf import OmegaConf

    from seq2seq.train import early_stopping

    cfg = OmegaConf.create({"optim": {"scheduler": scheduler}, "train": {"early_stopping_patience": patience}})
    callbacks = early_stopping(cfg)
    assert len(callbacks) == int(stops)
    if stops:
        assert (callbacks[0].monitor, callbacks[0].mode, callbacks[0].patience) == ("val/bleu", "max", patience)
