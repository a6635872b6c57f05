"""Training end to end through the console script, and config errors caught up front."""

from __future__ import annotations

import csv
import json
import logging
from importlib import resources

import numpy as np
import pytest
import torch

from seq2seq.files import InputError

from .conftest import run_cli


def test_toy_experiment_reaches_bleu_90_greedy_and_beam(toy_run):
    test = toy_run["results"]["test"]
    assert test["beam1"]["bleu"] >= 90, test["beam1"]
    assert test["beam5"]["bleu"] >= 90, test["beam5"]
    assert test["beam1"]["n_sentences"] == 300


def test_the_length_penalty_is_chosen_on_validation_and_used_for_test(toy_run):
    from seq2seq.translate import Translator
    decoding = toy_run["results"]["decoding"]            # evaluate.alphas of the toy experiment: 0 and 1
    assert set(decoding["grid"]) == {"0.0", "1.0"} and decoding["data"].endswith("valid.src")
    assert decoding["bleu"] == max(decoding["grid"].values())
    assert Translator.from_checkpoint(toy_run["model"]).default_alpha == decoding["alpha"]
    assert toy_run["results"]["test"]["beam5"]["alpha"] == decoding["alpha"]


def test_run_directory_holds_everything(toy_run):
    run = toy_run["dir"]
    for name in ("config.yaml", "results.json", "model.pt", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "test.beam5.hyp", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    assert any(r.get("val/bleu") for r in rows) and any(r.get("train/loss") for r in rows)


@pytest.mark.parametrize("override,expected", [
    ("model.hiden_size=3", "hiden_size"),
    ("model.attention=luong_dott", "choose one of: bahdanau, dot, general"),
    ("model.bridge=magic", "choose one of: dense, zeros"),
    ("optim.scheduler=cosine", "choose one of: plateau, anneal, none"),
    ("optim.lr=0", "optim.lr must be > 0, got 0"),
    ("optim.label_smoothing=1.0", "optim.label_smoothing must be in [0, 1), got 1.0"),
    ("optim.anneal_fraction=0", "optim.anneal_fraction must be in (0, 1], got 0.0"),
    ("evaluate.average_last=4", "set train.keep_last_epochs >= 4 (it is 0)"),
    ("evaluate.alphas=[]", "evaluate.alpha is null (choose it on validation) but evaluate.alphas is empty"),
    ("evaluate.alpha=-1", "length penalties must be >= 0, got evaluate.alpha=-1"),
    ("train.subword_alpha=1.5", "train.subword_alpha must be in [0, 1] (0 = off), got 1.5"),
    ("train.subword_nbest=0", "train.subword_nbest must be -1 (all segmentations) or >= 1, got 0"),
    ("train.subword_alpha=0.1", "only tokenizer.model_type unigram or bpe have (it is word)"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1) (0 = off, e.g. 0.999), got 1.0"),
    ("train.ema_half_life=1.5", "train.ema_half_life must be in (0, 1] (a share of the training budget"),
    ("evaluate.precision=half", "evaluate.precision: Unknown precision 'half'; choose one of: auto, float32,"),
])
def test_config_mistakes_fail_before_any_work(override, expected, tmp_path):
    # an earlier run's outputs in the same directory: a refused config must leave them alone
    earlier = tmp_path / "run" / "model.best.pt"
    earlier.parent.mkdir()
    earlier.write_bytes(b"earlier run")
    proc = run_cli(["seq2seq-train", "experiment=toy", override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr.decode()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert earlier.read_bytes() == b"earlier run"


def test_bfloat16_training_on_a_cpu_without_bfloat16_is_refused_up_front(monkeypatch):
    import seq2seq.train as train
    from omegaconf import OmegaConf
    cpu = OmegaConf.create({"precision": "bf16-mixed", "accelerator": "cpu"})
    monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: False)
    with pytest.raises(train.InputError, match="trainer.precision=bf16-mixed on this CPU: it has no bfloat16 "
                                               "instructions .* use trainer.precision=32-true"):
        train.check_precision_here(cpu)
    train.check_precision_here(OmegaConf.create({"precision": "32-true", "accelerator": "cpu"}))
    monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: True)        # e.g. avx512_bf16: allowed
    train.check_precision_here(cpu)
    monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: None)        # unknown (no /proc/cpuinfo): let it try
    train.check_precision_here(cpu)


@pytest.mark.parametrize("flags,expected", [("avx2 fma", "32-true"), ("avx2 avx512_bf16", "bf16-mixed"),
                                            ("avx512_bf16 amx_bf16", "bf16-mixed")])
def test_auto_training_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    import seq2seq.cpu as cpu
    import seq2seq.train as train
    from omegaconf import OmegaConf
    monkeypatch.setattr(cpu, "cpu_fields", lambda: {"flags": flags})
    assert train.training_precision(OmegaConf.create({"precision": "auto", "accelerator": "cpu"})) == expected
    for explicit in ("32-true", "bf16-mixed", "16-mixed"):
        assert train.training_precision(OmegaConf.create({"precision": explicit, "accelerator": "cpu"})) == explicit
    # what scripts/multi30k.sh --full asks to choose its model: float32 on the CPU, not on a GPU
    cpu = OmegaConf.create({"precision": "auto", "accelerator": "cpu"})
    assert train.trains_in_float32_on_cpu(cpu) == (expected == "32-true")
    assert not train.trains_in_float32_on_cpu(OmegaConf.create({"precision": "32-true", "accelerator": "gpu"}))
    assert train.trains_in_float32_on_cpu(OmegaConf.create({"precision": 32, "accelerator": "cpu"}))   # Lightning's "32"


@pytest.mark.parametrize("flags,en_de,de_en", [
    ("avx2 fma", "small", "small"),                          # float32, AVX2: the 5.3 M model
    ("avx2 avx512f avx512bw", "small", "medium"),            # float32, AVX-512: De->En's 9.6 M model
    ("avx512f avx512_bf16", "large", "large"),               # bfloat16: the 15.1 M model
    ("avx512f avx512_bf16 amx_bf16", "large", "large"),
])
def test_the_full_recipes_model_size_follows_the_cpu_flags(monkeypatch, flags, en_de, de_en):
    import seq2seq.cpu as cpu
    import seq2seq.train as train
    from omegaconf import OmegaConf
    monkeypatch.setattr(cpu, "cpu_fields", lambda: {"flags": flags})   # what every flag check reads
    auto = OmegaConf.create({"precision": "auto", "accelerator": "cpu"})
    assert (train.full_recipe_size("en_de", auto), train.full_recipe_size("de_en", auto)) == (en_de, de_en)
    # an explicit float32 on a bfloat16 CPU trains in float32: the float32 sizes
    float32 = OmegaConf.create({"precision": "32-true", "accelerator": "cpu"})
    assert train.full_recipe_size("de_en", float32) == ("medium" if "avx512f" in flags else "small")
    assert train.full_recipe_size("de_en", OmegaConf.create({"precision": "32-true", "accelerator": "gpu"})) == "large"
    with pytest.raises(ValueError, match="direction must be en_de or de_en, got 'fr_en'"):
        train.full_recipe_size("fr_en", auto)


def test_the_run_records_which_precision_trained_it(toy_run):
    import seq2seq.train as train
    from omegaconf import OmegaConf
    here = train.training_precision(OmegaConf.create({"precision": "auto", "accelerator": "cpu"}))
    assert toy_run["results"]["precision"] == here          # the toy experiment keeps the default, auto
    assert f"trainer.precision=auto: {here} on this machine" in (toy_run["dir"] / "train.log").read_text()
    card = run_cli(["seq2seq-info", str(toy_run["model"]), "--json"])
    assert json.loads(card.stdout)["precision"] == here
    # the length penalty and the test scores are decoded as seq2seq-evaluate decodes by default
    from seq2seq.quantize import resolve_precision
    decoded = resolve_precision("auto", "cpu")
    assert toy_run["results"]["decoding"]["precision"] == decoded
    assert {r["precision"] for r in toy_run["results"]["test"].values()} == {decoded}


def test_mismatched_training_files_name_both(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for split, (n_src, n_tgt) in {"train": (5, 4), "valid": (2, 2)}.items():
        (d / f"{split}.src").write_text("a b\n" * n_src)
        (d / f"{split}.tgt").write_text("A B\n" * n_tgt)
    proc = run_cli(["seq2seq-train", "experiment=toy", "data.name=mine", f"data.dir={d}",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"{d / 'train.src'} has 5 lines" in err and f"{d / 'train.tgt'} has 4 lines" in err
    assert "Traceback" not in err


def _compose(overrides):
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="seq2seq.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


# the experiments `_compose` reads: the installed package's configs
EXPERIMENTS = sorted(p.name.removesuffix(".yaml") for p in resources.files("seq2seq.configs.experiment").iterdir()
                     if p.name.endswith(".yaml"))


def _checked_config(experiment: str, data_dir):
    """The experiment's config over empty train/valid files in data_dir, and check_config's model config."""
    from seq2seq.train import check_config, split_paths
    cfg = _compose([f"experiment={experiment}", f"data.dir={data_dir}"])
    for split in ("train", "valid"):
        for path in split_paths(cfg, split):
            path.touch()
    return cfg, check_config(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_passes_the_config_check(experiment, tmp_path):
    """Each recipe a user can name composes and is accepted before any work starts
    (e.g. averaging no more checkpoints than it keeps, sampling only with unigram or BPE)."""
    _checked_config(experiment, tmp_path)


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.endswith("_quick")])
def test_the_quick_schedules_are_bounded_by_epochs_and_average_nothing(experiment, tmp_path):
    """A busy machine must make the main command slower, not its model worse."""
    cfg = _compose([f"experiment={experiment}", f"data.dir={tmp_path}"])
    assert cfg.trainer.max_time is None and cfg.trainer.max_steps == -1
    assert 1 <= cfg.trainer.max_epochs <= 5
    # a moving average of the weights would span most of a few epochs, the first ones included
    assert cfg.train.ema_decay == 0 and cfg.evaluate.average_last == 0


# the sizes docs/RESULTS.md and the README report for each recipe's model (joint vocabulary of 6,000)
RECIPE_PARAMETERS = {"multi30k_en_de": 15_076_720, "multi30k_en_de_quick": 5_313_136, "multi30k_en_de_small": 5_313_136,
                     "multi30k_de_en": 15_076_720, "multi30k_de_en_quick": 5_313_136, "multi30k_de_en_small": 5_313_136,
                     "multi30k_de_en_medium": 9_637_872}


@pytest.mark.parametrize("experiment", sorted(RECIPE_PARAMETERS))
def test_each_multi30k_recipe_builds_the_model_its_figures_were_measured_with(experiment, tmp_path):
    """A quick schedule inherits its full recipe's settings: a change to the full recipe's model
    must not silently change the model the main command's figures belong to."""
    from seq2seq.model import Seq2Seq
    cfg, model_cfg = _checked_config(experiment, tmp_path)
    model_cfg.src_vocab_size = model_cfg.tgt_vocab_size = cfg.tokenizer.vocab_size
    assert Seq2Seq(model_cfg).num_parameters() == RECIPE_PARAMETERS[experiment]


def test_interrupted_and_resumed_training_equals_straight_training(tmp_path, toy_data, monkeypatch, caplog):
    """Train 50 steps straight; train 25, stop, resume to 50: bitwise the same weights.

    Stopping at step 25 lands mid-epoch (94 batches per epoch), so this needs the data
    order (the loader's position) and the dropout random stream to survive the restart.
    """
    import torch

    from seq2seq.checkpoint import read_checkpoint
    from seq2seq.train import train

    monkeypatch.chdir(tmp_path)
    common = ["experiment=toy", f"data.dir={toy_data}", "model.embedding_size=16", "model.encoder_hidden_size=16",
              "model.decoder_hidden_sizes=[24]", "model.dropout=0.3", "train.checkpoint_every_n_steps=25",
              "trainer.num_sanity_val_steps=0"]

    def run(name, steps):
        cfg = _compose(common + [f"trainer.max_steps={steps}", f"hydra.run.dir={tmp_path / name}"])
        cfg.paths.output_dir = str(tmp_path / name)
        train(cfg)
        return read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")

    straight = run("straight", 50)
    run("resumed", 25)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seq2seq.train"):
        resumed = run("resumed", 50)
    # it continued from step 25 (a run started over would also end equal)
    assert any(r.getMessage().startswith("resuming from") and "last.ckpt" in r.getMessage() for r in caplog.records)
    assert straight["global_step"] == resumed["global_step"] == 50
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_nan_loss_stops_training_naming_the_step(toy_data):
    import torch

    from seq2seq.data import collate
    from seq2seq.module import TranslationModule

    module = TranslationModule({"src_vocab_size": 20, "tgt_vocab_size": 20, "embedding_size": 8,
                                "encoder_hidden_size": 8, "decoder_hidden_sizes": [8]})
    with torch.no_grad():
        module.model.decoder.output_layer.bias.fill_(float("nan"))
    batch = collate([(0, torch.tensor([5, 6]).numpy(), torch.tensor([7]).numpy())])
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0"):
        module.training_step(batch, 0)


def test_a_diverged_loss_ends_the_command_with_one_error_line_and_no_traceback(tmp_path, monkeypatch, capsys):
    import sys

    from hydra.core.global_hydra import GlobalHydra

    import seq2seq.train as train_cli

    def diverge(cfg):
        raise FloatingPointError("training loss is nan at step 7 (epoch 0, batch 7); lower optim.lr or check the data")

    monkeypatch.setattr(train_cli, "train", diverge)
    monkeypatch.setattr(sys, "argv", ["seq2seq-train", f"hydra.run.dir={tmp_path / 'run'}"])
    try:
        with pytest.raises(SystemExit) as exit_:
            train_cli.main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: training loss is nan at step 7 (epoch 0, batch 7); "
                                            "lower optim.lr or check the data")
    assert "Traceback" not in err


def test_validation_gives_a_blank_source_a_blank_output_as_translate_does(toy_data):
    import numpy as np
    import torch

    from seq2seq.data import collate
    from seq2seq.module import TranslationModule
    from seq2seq.tokenizer import train_tokenizer

    tok = train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")
    module = TranslationModule({"src_vocab_size": len(tok), "tgt_vocab_size": len(tok), "embedding_size": 8,
                                "encoder_hidden_size": 8, "decoder_hidden_sizes": [8]},
                               src_tokenizer=tok, tgt_tokenizer=tok, valid_references=["", "a b"]).eval()
    with torch.no_grad():   # a model that always says word 5: any output it gives is not blank
        module.model.decoder.output_layer.bias.fill_(-100.0)
        module.model.decoder.output_layer.bias[5] = 100.0
    batch = collate([(0, np.array([], dtype=np.int64), np.array([6])), (1, np.array([7, 8]), np.array([6]))])
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert module._val_hyps[0] == "" and module._val_hyps[1] != ""


def test_ddp_spawn_on_two_cpu_processes_gathers_validation_over_all_ranks(tmp_path, toy_data):
    """Two CPU processes (gloo): each decodes half the validation set; BLEU covers all of it."""
    import json

    run_dir = tmp_path / "ddp"
    proc = run_cli(["seq2seq-train", "experiment=toy", f"data.dir={toy_data}", "model.embedding_size=16",
                    "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[32]", "trainer.max_epochs=2",
                    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_val_bleu"] is not None
    # each batch's rows were dealt to both ranks: 6000 pairs / 64 = 94 steps per epoch, as in one process
    import torch
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 94
    assert results["test"]["beam1"]["n_sentences"] == 300
    # the speed in the logs is the two processes' summed rate (synchronised each step)
    import csv
    with open(run_dir / "logs" / "metrics.csv") as f:
        rates = [float(row["train/tok_s"]) for row in csv.DictReader(f) if row.get("train/tok_s")]
    assert rates and all(r > 0 for r in rates)


def test_sigkill_mid_epoch_then_same_command_resumes(tmp_path, toy_data):
    """kill -9 during training; the same command continues from checkpoints/last.ckpt."""
    import json
    import signal
    import subprocess
    import time

    import torch

    from .conftest import console

    run_dir = tmp_path / "killed"
    cmd = [console("seq2seq-train"), "experiment=toy", f"data.dir={toy_data}", "model.embedding_size=16",
           "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[24]", "trainer.max_epochs=1",
           "train.checkpoint_every_n_steps=10", f"hydra.run.dir={run_dir}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no checkpoint was written before the deadline"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < 94  # mid-epoch: an epoch has 94 batches
    done = run_cli(["seq2seq-train", *cmd[1:]], cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"resuming from" in done.stdout + done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 94  # the epoch was finished, not restarted


def test_training_logs_target_tokens_per_second(toy_run):
    """The progress bar's `train/tok_s` also reaches the CSV log, as a plausible rate."""
    import csv

    rows = list(csv.DictReader(open(toy_run["dir"] / "logs" / "metrics.csv")))
    rates = [float(r["train/tok_s"]) for r in rows if r.get("train/tok_s")]
    assert rates, "no train/tok_s in metrics.csv"
    assert all(10 < r < 10_000_000 for r in rates), rates


def test_tensorboard_logger_writes_loss_and_validation_bleu(tmp_path, toy_data, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from seq2seq.train import train

    monkeypatch.chdir(tmp_path)
    cfg = _compose(["experiment=toy", "logger=tensorboard", f"data.dir={toy_data}", "trainer.max_epochs=1",
                    "trainer.log_every_n_steps=10", "model.embedding_size=16", "model.encoder_hidden_size=16",
                    "model.decoder_hidden_sizes=[24]", f"hydra.run.dir={tmp_path / 'run'}"])
    cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/tok_s", "val/bleu"):
        assert tag in tags, (tag, tags)
    assert 0 <= acc.Scalars("val/bleu")[-1].value <= 100


def test_epoch_checkpoints_are_averaged_and_validation_chooses_model_pt(tmp_path, toy_data, monkeypatch):
    """keep_last_epochs keeps the newest N; average_last averages them; validation picks model.pt.

    An earlier run's epoch checkpoint in the same directory must not be averaged when the
    run starts over, and the choice must be scored on the validation split.
    """
    import json

    import seq2seq.train as train_module
    from seq2seq.average import latest_checkpoints

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints" / "epochs").mkdir(parents=True)
    (run / "checkpoints" / "epochs" / "epoch099.ckpt").write_bytes(b"an earlier run's file")
    (run / "model.avg.pt").write_bytes(b"an earlier run's average")
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text("earlier,run\n1,2\n")
    scored = []

    def fake_valid_bleu(cfg, model_path):
        scored.append((model_path.name, train_module.split_paths(cfg, "valid")[0].name))
        return 60.0 if model_path.name == "model.avg.pt" else 50.0   # the average wins

    monkeypatch.setattr(train_module, "valid_bleu", fake_valid_bleu)
    cfg = _compose(["experiment=toy", f"data.dir={toy_data}", "trainer.max_epochs=4", "model.embedding_size=16",
                    "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[24]",
                    "train.keep_last_epochs=3", "evaluate.average_last=3", f"hydra.run.dir={run}"])
    cfg.paths.output_dir = str(run)
    summary = train_module.train(cfg)
    kept = sorted(p.name for p in (run / "checkpoints" / "epochs").iterdir())
    assert kept == ["epoch001.ckpt", "epoch002.ckpt", "epoch003.ckpt"]
    assert sorted(scored) == [("model.avg.pt", "valid.src"), ("model.best.pt", "valid.src")]
    sel = summary["selection"]
    assert sel["averaged"] == kept and sel["chosen"] == "average"
    assert sel["valid_bleu_greedy"] == {"best": 50.0, "average": 60.0}
    assert summary["model_val_bleu"] == 60.0 and summary["best_val_bleu"] != 60.0  # model.pt's, not the epoch's
    avg = (run / "model.avg.pt").read_bytes()
    assert avg != b"an earlier run's average" and (run / "model.best.pt").read_bytes() != avg
    # model.pt is the average, plus the length penalty chosen on validation afterwards
    from seq2seq.checkpoint import read_checkpoint
    chosen, average = read_checkpoint(run / "model.pt"), read_checkpoint(run / "model.avg.pt")
    assert chosen["state_dict"].keys() == average["state_dict"].keys()
    assert all(torch.equal(chosen["state_dict"][k], average["state_dict"][k]) for k in average["state_dict"])
    assert chosen["seq2seq"]["meta"]["averaged_from"] == average["seq2seq"]["meta"]["averaged_from"]
    assert chosen["seq2seq"]["meta"]["decoding"] == summary["decoding"]
    assert "decoding" not in average["seq2seq"]["meta"]
    assert json.loads((run / "results.json").read_text())["selection"] == sel
    assert "earlier" not in (run / "logs" / "metrics.csv").read_text()
    # seq2seq-average --last N takes the epoch checkpoints, newest last
    assert [p.name for p in latest_checkpoints(run, 2)] == ["epoch002.ckpt", "epoch003.ckpt"]


@pytest.mark.parametrize("average", ["train.ema_decay=0.9", "train.ema_half_life=0.2"])
def test_moving_average_of_the_weights_is_what_checkpoints_validate_and_export(average, tmp_path, toy_data,
                                                                               monkeypatch):
    """train.ema_decay (or ema_half_life): every checkpoint's state_dict is the average, the raw
    weights ride along for resuming, model.pt is the average, last.ckpt holds the final step, and
    a resumed run continues the same average (its normaliser too) instead of starting a new one."""
    import seq2seq.train as train_module
    from seq2seq.checkpoint import read_checkpoint

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    overrides = ["experiment=toy", f"data.dir={toy_data}", "model.embedding_size=16", "model.encoder_hidden_size=16",
                 "model.decoder_hidden_sizes=[24]", average, "evaluate.alpha=0",
                 "train.checkpoint_every_n_steps=50", f"hydra.run.dir={run}"]

    def fit(*limits):
        cfg = _compose([*overrides, *limits])
        cfg.paths.output_dir = str(run)
        return train_module.train(cfg)

    def differs(ckpt):
        return any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])

    # stopped mid-epoch (as max_time does): a step-triggered save at 50, then the cut-short epoch's end
    first = fit("trainer.max_epochs=1", "trainer.max_steps=70", "trainer.val_check_interval=35")
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert differs(best) and differs(last)
    assert int(last["averaging_state"]["n_averaged"]) == last["global_step"] == first["steps"]
    exported = read_checkpoint(run / "model.pt")["state_dict"]
    assert exported.keys() == best["state_dict"].keys()
    assert all(torch.equal(exported[k], best["state_dict"][k]) for k in exported)

    sums = [state["weight_sum"] for state in last["callbacks"].values() if "weight_sum" in state]
    if average.startswith("train.ema_decay"):
        assert sums == [pytest.approx((1 - 0.9 ** 70) / (1 - 0.9))]
    else:                                      # steps weighted by decays below 1: fewer than 70 in effect
        assert len(sums) == 1 and 5 < sums[0] < 70

    second = fit("trainer.max_epochs=2")       # resumes from last.ckpt and keeps averaging
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["steps"] == 70 < second["steps"]
    assert int(last["averaging_state"]["n_averaged"]) == last["global_step"] == second["steps"]
    if average.startswith("train.ema_decay"):
        assert [state["weight_sum"] for state in last["callbacks"].values() if "weight_sum" in state] == \
            [pytest.approx((1 - 0.9 ** second["steps"]) / (1 - 0.9))]


def test_csv_metrics_of_a_resumed_run_keep_the_rows_from_before(tmp_path):
    """A resumed process continues logs/metrics.csv (Lightning's CSVLogger would delete it)."""
    import csv

    from seq2seq.csv_log import ResumableCSVLogger

    first = ResumableCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    first.log_metrics({"train/loss": 3.0}, step=10)
    first.save()
    resumed = ResumableCSVLogger(save_dir=str(tmp_path), name="logs", version="")   # a new process
    resumed.log_metrics({"train/loss": 2.0, "val/bleu": 12.5}, step=20)
    resumed.save()
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    assert [(r["step"], r["train/loss"], r["val/bleu"]) for r in rows] == [("10", "3.0", ""), ("20", "2.0", "12.5")]


@pytest.mark.parametrize("budget, warns", [
    (dict(max_steps=-1, max_epochs=4, num_training_batches=454), True),      # 1,816 steps: 39%
    (dict(max_steps=-1, max_epochs=40, num_training_batches=454), False),    # the full recipe: 1%
    (dict(max_steps=500, max_epochs=40, num_training_batches=454), True),    # max_steps ends it first
    (dict(max_steps=-1, max_epochs=-1, num_training_batches=454), None),     # wall time only: unknown
])
def test_a_moving_average_longer_than_the_budget_is_warned_of(budget, warns, caplog):
    from types import SimpleNamespace

    from seq2seq.moving_average import MovingAverage
    trainer = SimpleNamespace(accumulate_grad_batches=1, **budget)
    with caplog.at_level("WARNING", logger="seq2seq.moving_average"):
        first_half = MovingAverage(0.9995).warn_if_budget_too_short(trainer)
        assert MovingAverage(half_life=0.13).warn_if_budget_too_short(trainer) is None   # it follows the budget
    if warns is None:
        assert first_half is None and not caplog.records
        return
    assert (first_half > 0.25) == warns and bool(caplog.records) == warns
    if warns:
        assert "train.ema_decay=0.9995" in caplog.text and "first half of training" in caplog.text


def _average_of(decays, seed=0, resume_at=None):
    """Drive MovingAverage.mix through torch's AveragedModel (as Lightning does) over steps whose
    decays are `decays[1:]` (the first step is copied); return the average and each step's weights.
    With `resume_at` = n, before step n both states are saved and loaded into new objects, as a
    resumed process would."""
    from torch.optim.swa_utils import AveragedModel

    from seq2seq.moving_average import MovingAverage

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1).double())   # two tensor groups
    ema = MovingAverage(0.5)
    average = AveragedModel(model, multi_avg_fn=ema.mix)
    seen = []
    for n, decay in enumerate(decays, start=1):
        if n == resume_at:
            saved, saved_average = ema.state_dict(), average.state_dict()
            ema = MovingAverage(0.5)
            ema.load_state_dict(saved)
            average = AveragedModel(model, multi_avg_fn=ema.mix)
            average.load_state_dict(saved_average)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * n)
        seen.append([p.detach().clone().double() for p in model.parameters()])
        ema.current_decay = decay
        average.update_parameters(model)
    return [p.double() for p in average.module.parameters()], seen, ema


@pytest.mark.parametrize("decays", [[0.5] * 7, [0.9] * 7, [0.9995] * 7, [0.0, 0.2, 0.9, 0.5, 0.99, 0.7, 0.95]])
def test_the_moving_average_weighs_the_steps_it_has_seen_and_nothing_else(decays):
    """After n updates the average is sum_k c_k w_k / sum_k c_k over the steps' weights w_1..w_n,
    c_k the product of the decays of the steps after k: the first step's weights hold no more
    than their share, however few steps there were, and a decay that changes from step to step
    (train.ema_half_life) weighs each step by the decays that came after it."""
    got, seen, _ = _average_of(decays)
    n = len(decays)
    weights = [float(np.prod(decays[k + 1:])) for k in range(n)]
    for i, p in enumerate(got):
        expected = sum(w * s[i] for w, s in zip(weights, seen)) / sum(weights)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-5)


def test_the_moving_average_resumes_its_normaliser_and_rebuilds_a_missing_one():
    """The normaliser is saved with the callback's state; a checkpoint from before it was saved
    (a fixed decay) gets it back from the step count."""
    from seq2seq.moving_average import MovingAverage

    _, _, ema = _average_of([0.9] * 5)
    state = ema.state_dict()
    torch.testing.assert_close(state["weight_sum"], (1 - 0.9 ** 5) / (1 - 0.9))
    resumed = MovingAverage(0.9)
    resumed.load_state_dict(state)
    assert resumed.weight_sum == state["weight_sum"]
    older = MovingAverage(0.9)
    older.load_state_dict({k: v for k, v in state.items() if k != "weight_sum"})
    assert older.weight_sum == 0.0          # rebuilt at the next step from n_averaged
    older.current_decay = 0.9
    older.mix([torch.zeros(1)], [torch.ones(1)], torch.tensor(5))
    torch.testing.assert_close(older.weight_sum, (1 - 0.9 ** 6) / (1 - 0.9))


@pytest.mark.parametrize("budget", [
    dict(max_steps=3000, max_epochs=-1, global_step=1200, current_epoch=0, batch_idx=1199),   # steps
    dict(max_steps=-1, max_epochs=10, global_step=1200, current_epoch=4, batch_idx=99),       # epochs of 275
])
def test_a_half_life_as_a_share_of_the_budget_sets_the_decay_from_its_progress(budget):
    """train.ema_half_life=f: the decay per step is 0.5 ** (1 / (f * the budget's steps)), the
    budget's steps estimated from its progress (here known exactly: 3,000 and 2,750)."""
    from types import SimpleNamespace

    from seq2seq.moving_average import MovingAverage

    batch_idx = budget.pop("batch_idx")
    trainer = SimpleNamespace(num_training_batches=275, callbacks=[], **budget)
    total = 3000 if budget["max_steps"] > 0 else 2750
    decay = MovingAverage(half_life=0.13).step_decay(trainer, batch_idx)
    assert decay == pytest.approx(0.5 ** (1 / (0.13 * total)), abs=1e-12)
    assert MovingAverage(0.9995).step_decay(trainer, batch_idx) == 0.9995


def test_a_moving_average_resumed_mid_run_goes_on_as_if_never_stopped():
    """Saved after step 4 of 7 (the callback's state and the averaged model's) and loaded into new
    objects, the average ends where an uninterrupted one does, with decays changing each step."""
    decays = [0.0, 0.3, 0.9, 0.5, 0.99, 0.7, 0.95]
    whole, seen, _ = _average_of(decays)
    resumed, seen_resumed, _ = _average_of(decays, resume_at=5)
    for a, b in zip(seen, seen_resumed):                 # the same steps' weights
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    for p, q in zip(resumed, whole):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("steps", [300, 900])
def test_a_half_life_averages_the_same_share_of_any_budget(steps):
    """What train.ema_half_life is for: at the end of a run of any length, the last 13% of its
    steps hold half of the average, whose weights are read off a run in which step k's weights
    are the k-th unit vector (a fixed decay's half-life is a number of steps instead)."""
    from types import SimpleNamespace

    from torch.optim.swa_utils import AveragedModel

    from seq2seq.moving_average import MovingAverage

    weights = torch.nn.Parameter(torch.zeros(steps, dtype=torch.float64))
    holder = torch.nn.Module()
    holder.w = weights
    ema = MovingAverage(half_life=0.13)
    average = AveragedModel(holder, multi_avg_fn=ema.mix)
    for step in range(1, steps + 1):
        with torch.no_grad():
            weights.zero_()
            weights[step - 1] = 1.0
        trainer = SimpleNamespace(max_steps=steps, max_epochs=-1, callbacks=[], global_step=step)
        ema.current_decay = ema.step_decay(trainer, step - 1)
        average.update_parameters(holder)
    share = average.module.w[-round(0.13 * steps):].sum().item()
    assert share == pytest.approx(0.5 / (1 - 0.5 ** (1 / 0.13)), abs=2e-3)
    assert average.module.w.sum().item() == pytest.approx(1.0)


def test_a_fixed_decay_and_a_half_life_together_are_refused():
    from seq2seq.moving_average import MovingAverage
    from seq2seq.train import check_config

    cfg = _compose(["experiment=toy", "train.ema_decay=0.999", "train.ema_half_life=0.1"])
    with pytest.raises(InputError, match=r"train.ema_decay=0.999 and train.ema_half_life=0.1: set one of them"):
        check_config(cfg)
    with pytest.raises(ValueError, match="give one of decay"):
        MovingAverage()


def test_shared_embeddings_without_a_joint_vocabulary_are_refused():
    from seq2seq.train import check_config

    cfg = _compose(["experiment=toy", "model.share_embeddings=true", "tokenizer.joint=false"])
    with pytest.raises(InputError, match=r"model.share_embeddings=true .* set tokenizer.joint=true \(it is false\)"):
        check_config(cfg)
    check_config(_compose(["experiment=toy", "model.share_embeddings=true", "tokenizer.joint=true"]))


def test_resuming_with_the_moving_average_switched_on_or_off_is_refused(tmp_path, toy_data):
    """A checkpoint of an averaged run holds the average as its weights; training on from it
    with train.ema_decay=0 (or starting an average mid-run) is refused, naming both values."""
    common = ["seq2seq-train", "experiment=toy", f"data.dir={toy_data}", "model.embedding_size=16",
              "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[16]", "evaluate.alpha=0",
              "train.checkpoint_every_n_steps=10", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli([*common, "train.ema_decay=0.9", "trainer.max_steps=10"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    ckpt = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    refused = run_cli([*common, "train.ema_decay=0", "trainer.max_steps=20"], cwd=tmp_path)
    assert refused.returncode != 0
    assert ("was trained with train.ema_decay=0.9, train.ema_half_life=None and this run asks for "
            "train.ema_decay=0, train.ema_half_life=None") in refused.stderr.decode()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == ckpt
    resumed = run_cli([*common, "train.ema_decay=0.99", "trainer.max_steps=20"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]


def test_resuming_on_other_training_data_is_refused(tmp_path, toy_data):
    """Two corpora of one language pair share runs/files-SRC-TGT by default: the second run
    must not quietly continue the first's model on other data."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(toy_data, other)
    common = ["seq2seq-train", "experiment=toy", "model.embedding_size=16", "model.encoder_hidden_size=16",
              "model.decoder_hidden_sizes=[16]", "evaluate.alpha=0", "trainer.max_epochs=1",
              f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli([*common, f"data.dir={toy_data}", "trainer.max_steps=10"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    ckpt = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    refused = run_cli([*common, f"data.dir={other}", "trainer.max_steps=20"], cwd=tmp_path)
    assert refused.returncode != 0
    err = refused.stderr.decode()
    assert f"was trained on {toy_data}/train." in err and f"this run asks for {other}/train." in err
    assert "train.resume=false" in err
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == ckpt


def test_a_run_that_early_stopping_ended_stays_ended_when_resumed(tmp_path):
    """Rerunning a finished run resumes its last.ckpt; after early stopping, that must train nothing
    more (Lightning restores the callback's counters, not its decision to stop)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from omegaconf import OmegaConf

    from seq2seq.train import LastCheckpoint, early_stopping

    class NeverBetter(BoringModel):
        def validation_step(self, batch, batch_idx):
            self.log("val/bleu", 1.0)   # the same score every time: patience runs out

    cfg = OmegaConf.create({"train": {"early_stopping_patience": 2}, "optim": {"scheduler": "plateau"}})

    def fit(resume: bool) -> L.Trainer:
        trainer = L.Trainer(max_epochs=20, limit_train_batches=2, limit_val_batches=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[LastCheckpoint(tmp_path, every_n_train_steps=0), *early_stopping(cfg)])
        trainer.fit(NeverBetter(), ckpt_path=str(tmp_path / "last.ckpt") if resume else None)
        return trainer

    first = fit(resume=False)
    assert first.current_epoch == 3 and first.global_step == 6   # epoch 0 sets the best, 1 and 2 do not
    again = fit(resume=True)
    assert again.global_step == first.global_step
