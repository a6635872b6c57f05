"""The tools around a model: checkpoint averaging, the model card, training curves,
attention pictures, and translate's progress bar."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import lightning
import pytest
import torch
from omegaconf import OmegaConf
from matplotlib.image import imread

import seq2seq
from seq2seq.average import average
from seq2seq.checkpoint import read_checkpoint, save_model
from seq2seq.cli import average_main, info_main, plot_training_main
from seq2seq.info import model_card
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.plot import plot_training
from seq2seq.quantize import cpu_has_bfloat16
from seq2seq.tokenizer import train_tokenizer
from seq2seq.train import full_recipe_size
from seq2seq.translate import Translator

from .conftest import console, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def untrained(toy_data, tmp_path_factory) -> dict[str, Path]:
    """Small untrained checkpoints: a and b share a config, c has another hidden size."""
    tok = train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")
    d = tmp_path_factory.mktemp("untrained")
    paths = {}
    for name, seed, hidden in (("a", 0, 8), ("b", 1, 8), ("c", 0, 10)):
        torch.manual_seed(seed)
        model = Seq2Seq(ModelConfig(src_vocab_size=len(tok), tgt_vocab_size=len(tok), embedding_size=8,
                                    encoder_hidden_size=hidden, decoder_hidden_sizes=[12], dropout=0.0))
        paths[name] = save_model(d / f"{name}.pt", model, tok, tok, config={"seed": seed},
                                 meta={"src_lang": "src", "tgt_lang": "tgt", "global_step": seed,
                                       "best_val": {"bleu": 1.0}})
    return paths


# ---- averaging ---------------------------------------------------------------------

def test_averaging_a_checkpoint_with_itself_changes_nothing(untrained, tmp_path):
    out = average([untrained["a"], untrained["a"], untrained["a"]], tmp_path / "avg.pt")
    original, averaged = _weights(untrained["a"]), _weights(out)
    assert original.keys() == averaged.keys()
    for k in original:
        assert torch.equal(original[k], averaged[k]), k  # bit for bit, not just close


def test_average_of_two_checkpoints_is_their_mean_and_translates(untrained, toy_data, tmp_path):
    out = average([untrained["a"], untrained["b"]], tmp_path / "avg.pt")
    a, b, avg = _weights(untrained["a"]), _weights(untrained["b"]), _weights(out)
    for k in a:
        assert avg[k].dtype == a[k].dtype
        assert torch.allclose(avg[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7), k
    assert any(not torch.equal(avg[k], a[k]) for k in a)
    meta = read_checkpoint(out)["seq2seq"]["meta"]
    assert meta["averaged_from"] == [str(untrained["a"]), str(untrained["b"])]
    assert "best_val" not in meta  # a score of one input does not describe the average
    lines = (toy_data / "test.src").read_text().splitlines()[:3]
    translations = Translator.from_checkpoint(out).translate(lines, beam_size=2)
    assert len(translations) == 3 and all(isinstance(t, str) for t in translations)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_of_tied_embeddings_is_one_mean_matrix(toy_data, tmp_path, dtype):
    """Shared and tied embeddings (three names, one tensor) are averaged once, in any float
    dtype, and stay one tensor in the file and in the model loaded from it."""
    tok = train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Seq2Seq(ModelConfig(src_vocab_size=len(tok), tgt_vocab_size=len(tok), embedding_size=8,
                                    encoder_hidden_size=6, decoder_hidden_sizes=[8], dropout=0.0,
                                    tie_embeddings=True, share_embeddings=True)).to(dtype)
        paths.append(save_model(tmp_path / f"{seed}.pt", model, tok, tok, config={"seed": seed},
                                meta={"src_lang": "src", "tgt_lang": "tgt", "global_step": seed}))
    out = average(paths, tmp_path / "avg.pt")
    a, b, avg = _weights(paths[0]), _weights(paths[1]), _weights(out)
    names = ["model.encoder.embedding.weight", "model.decoder.embedding.weight", "model.decoder.output_layer.weight"]
    mean = (a[names[0]] + b[names[0]]) / 2
    assert not torch.equal(a[names[0]], b[names[0]])
    for name in names:
        assert avg[name].dtype == dtype
        torch.testing.assert_close(avg[name], mean)
        assert avg[name].untyped_storage().data_ptr() == avg[names[0]].untyped_storage().data_ptr()
    loaded = Translator.from_checkpoint(out).model
    assert loaded.decoder.output_layer.weight is loaded.encoder.embedding.weight


def test_average_last_n_takes_the_newest_files_of_a_run(untrained, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    # oldest is b: left out of --last 2, so the average of two copies of a is a itself
    for age, (name, src) in enumerate([("old.ckpt", "b"), ("mid.ckpt", "a"), ("new.ckpt", "a")]):
        shutil.copy(untrained[src], ckpts / name)
        os.utime(ckpts / name, (1_000_000 + age * 100, 1_000_000 + age * 100))
    out = tmp_path / "avg.pt"
    assert average_main(["--output", str(out), "--last", "2", str(tmp_path / "run"), "-q"]) == 0
    a, avg = _weights(untrained["a"]), _weights(out)
    assert all(torch.equal(a[k], avg[k]) for k in a)
    assert read_checkpoint(out)["seq2seq"]["meta"]["averaged_from"] == [str(ckpts / "mid.ckpt"),
                                                                        str(ckpts / "new.ckpt")]
    assert average_main(["--output", str(out), "--last", "4", str(tmp_path / "run")]) == 2


def test_epoch_checkpoints_are_ordered_by_epoch_number_whatever_their_times(tmp_path):
    from seq2seq.average import checkpoints_oldest_first

    epochs = tmp_path / "epochs"
    epochs.mkdir()
    # copied or restored files: modification times that contradict the epochs
    for age, name in enumerate(["epoch010.ckpt", "epoch009.ckpt", "epoch002.ckpt"]):
        (epochs / name).write_bytes(b"x")
        os.utime(epochs / name, (1_000_000 + age * 100, 1_000_000 + age * 100))
    assert [p.name for p in checkpoints_oldest_first(epochs)] == ["epoch002.ckpt", "epoch009.ckpt", "epoch010.ckpt"]
    (epochs / "best.ckpt").write_bytes(b"x")          # any other name: modification time decides
    os.utime(epochs / "best.ckpt", (999_000, 999_000))
    assert [p.name for p in checkpoints_oldest_first(epochs)][0] == "best.ckpt"


def test_average_refuses_different_models_naming_both_files(untrained, tmp_path, capsys):
    out = tmp_path / "avg.pt"
    assert average_main(["-o", str(out), str(untrained["a"]), str(untrained["c"])]) == 2
    err = capsys.readouterr().err
    assert str(untrained["a"]) in err and str(untrained["c"]) in err
    assert "encoder_hidden_size: 8 vs 10" in err
    assert not out.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert average_main(["-o", str(out), str(untrained["a"]), str(garbage)]) == 2
    assert f"not a valid seq2seq checkpoint: {garbage}" in capsys.readouterr().err


# ---- model card ----------------------------------------------------------------------

def test_model_card_of_the_toy_model(toy_run):
    card = model_card(toy_run["model"])
    results = toy_run["results"]
    run_config = read_checkpoint(toy_run["model"])["seq2seq"]["config"]
    assert card["parameters"] == results["parameters"]
    assert (card["src_lang"], card["tgt_lang"], card["data"]) == ("src", "tgt", "toy")
    assert card["train_files"][0].endswith("train.src")
    assert card["tokenizer"]["type"] == run_config["tokenizer"]["model_type"]
    assert card["tokenizer"]["joint"] is run_config["tokenizer"]["joint"]
    assert card["tokenizer"]["src_vocab_size"] == card["model_config"]["src_vocab_size"]
    assert card["best_val"]["bleu"] == pytest.approx(results["best_val_bleu"], rel=1e-5)
    assert card["best_val"]["bleu_signature"].startswith("nrefs:1|")
    assert card["train_seconds"] > 0 and card["format_version"] == 1
    assert card["versions"] == {"seq2seq": seq2seq.__version__, "torch": str(torch.__version__),
                                "lightning": lightning.__version__}
    assert f"{run_config['model']['encoder_hidden_size']}" in card["architecture"]

    as_json = run_cli(["seq2seq-info", str(toy_run["model"]), "--json"])
    assert as_json.returncode == 0, as_json.stderr.decode()
    assert json.loads(as_json.stdout) == json.loads(json.dumps(card))
    text = run_cli(["seq2seq-info", str(toy_run["model"])]).stdout.decode()
    assert f"{card['parameters']:,}" in text and card["best_val"]["bleu_signature"] in text


def test_model_card_of_a_bad_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    assert info_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: not a valid seq2seq checkpoint: {bad}") and "Traceback" not in err


# ---- training curves -------------------------------------------------------------------

def test_training_curves_png_from_a_run(toy_run, tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    shutil.copy(toy_run["dir"] / "logs" / "metrics.csv", run / "logs" / "metrics.csv")
    # the script is the documented entry point: run it as a user would
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_training.py"), str(run)],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    png = run / "training.png"
    assert proc.stdout.decode().strip() == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC and imread(png).shape[0] > 300
    chosen = plot_training(run, tmp_path / "curves.png")
    assert chosen.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert plot_training_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no training log at {tmp_path / 'logs' / 'metrics.csv'}" in err
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("epoch,step\n")
    assert plot_training_main([str(tmp_path)]) == 2
    assert "has no loss or validation values" in capsys.readouterr().err


# ---- attention pictures --------------------------------------------------------------

def test_attention_plot_one_png_per_nonblank_input_line(toy_run, tmp_path):
    lines = (toy_run["data"] / "test.src").read_text().splitlines()[:50]
    short, long = min(lines, key=len), max(lines, key=len)
    (tmp_path / "in.txt").write_text(f"{short}\n\n{long}\n   \n")
    out_dir = tmp_path / "attention"
    proc = run_cli(["seq2seq-translate", "-c", str(toy_run["model"]), "--input", str(tmp_path / "in.txt"),
                    "--attention-plot", str(out_dir), "--beam-size", "3"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode().splitlines()) == 4
    # numbered by input line: the blank lines 2 and 4 get no picture and shift nothing
    assert sorted(p.name for p in out_dir.iterdir()) == ["0001.png", "0003.png"]
    pictures = {}
    for name in ("0001.png", "0003.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC
        pictures[name] = imread(out_dir / name)  # (height, width, channels): decodes as a PNG
    assert pictures["0003.png"].shape[1] > pictures["0001.png"].shape[1]  # sized to the sentence


# ---- progress bar ----------------------------------------------------------------------

BAR_MARKS = ("\r", "lines/s", "|", "%")


def _translate_file(toy_run, tmp_path, n: int) -> Path:
    lines = (toy_run["data"] / "test.src").read_text().splitlines()[:n]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_no_progress_bar_when_stderr_is_not_a_terminal(toy_run, tmp_path):
    src = _translate_file(toy_run, tmp_path, 40)
    proc = run_cli(["seq2seq-translate", "-c", str(toy_run["model"]), "--input", str(src),
                    "--chunk-size", "10", "--beam-size", "1"])
    assert proc.returncode == 0
    err = proc.stderr.decode()
    assert "translated 40 lines" in err
    assert not any(mark in err for mark in BAR_MARKS), err


def test_progress_bar_on_a_terminal(toy_run, tmp_path):
    src = _translate_file(toy_run, tmp_path, 40)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal's size
    proc = subprocess.Popen([console("seq2seq-translate"), "-c", str(toy_run["model"]), "--input", str(src),
                             "--chunk-size", "10", "--beam-size", "1"],
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    os.close(slave)
    seen = b""
    while True:  # drain the terminal while the process writes, until it closes
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        seen += data
    os.close(master)
    stdout = proc.stdout.read()
    assert proc.wait(timeout=300) == 0
    assert len(stdout.decode().splitlines()) == 40
    assert "40/40" in seen.decode() and "lines/s" in seen.decode()


def test_benchmark_json_covers_training_decoding_scale_and_profile(toy_run, tmp_path):
    """scripts/benchmark.py end to end on the toy model, sizes tiny: the JSON a user reads."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    proc = subprocess.run(
        [sys.executable, str(script), "-c", str(toy_run["model"]), "--data", str(toy_run["data"]), "--src", "src",
         "--tgt", "tgt", "--test-split", "test", "--only", "peak,train,decode,scale,profile", "--peak-size", "64", "--train-steps", "2", "--warmup", "1", "--train-batch-size", "16",
         "--bf16-guard", "3", "--scale-pairs", "300,3000", "--scale-sp-sample", "500", "--scale-train-steps", "2",
         "--scale-dir", str(tmp_path / "scale"), "--sentences", "20", "--batch-sizes", "64", "--beam-sizes", "1",
         "--no-bf16-decode", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = report["peak"]   # float32 through the library training uses; beside MKL's where that is oneDNN
    assert peak["float32"]["gflops"] > 0 and report["environment"]["float32_matmul"] in ("onednn", "blas")
    assert ("float32_blas" in peak) == (report["environment"]["float32_matmul"] == "onednn")
    fp32 = report["train"]["float32"]
    assert fp32["tgt_tokens_per_s"] > 0 and 0 <= fp32["tgt_padding_fraction"] < 1
    # --bf16 auto: bfloat16 is measured where the CPU has it, and left out (saying why) where it is emulated
    emulated = cpu_has_bfloat16() is False
    for row in (peak["bfloat16"], report["train"]["bfloat16_autocast"]):
        assert ("no bfloat16 instructions" in row.get("skipped", "")) == emulated, row
    rows = {(r["dtype"], r["beam_size"], r["batch_size"]): r for r in report["decode"]["rows"]}
    assert set(rows) == {(dtype, beam, 64) for dtype in ("float32", "int8") for beam in (1, 5)}
    for (dtype, beam, _), r in rows.items():
        assert r["sentences_per_s"] > 0 and 0 <= r["bleu"] <= 100.001, r  # sacrebleu can say 100.00000000000004
        if dtype == "int8":
            assert r["speedup_over_float32"] > 0 and abs(r["bleu"] - rows["float32", beam, 64]["bleu"]) < 10
    runs = report["scale"]["runs"]
    assert [r["pairs"] for r in runs] == [300, 3000]
    for r in runs:
        assert r["prepare"]["pairs_kept"] == r["pairs"] and r["prepare"]["cache_bytes"] > 0
        assert r["tokenizer"]["sample"] == 500 and r["tokenizer"]["vocab_size"] > 4
        assert r["train"]["steps"] == 2 and r["train"]["peak_rss_mb"] > 0
        assert 0 < r["train"]["time_to_first_step_s"] <= r["train"]["seconds"] + 60
    # the larger corpus' cache was built once, then found again (not rebuilt) by training
    assert len(list((tmp_path / "scale" / "pairs-3000" / "cache").iterdir())) == 1
    assert runs[1]["reuse_open_s"] < runs[1]["prepare"]["seconds"]
    assert report["scale"]["train_rss_ratio"] > 0
    # where the time goes: operators by self time, largest first, shares of the total
    for key in ("train_step", "beam5_batch", "greedy_batch"):
        ops = report["profile"][key]["ops"]
        assert ops and len(ops) <= 15 and all(o["calls"] >= 1 for o in ops)
        assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
        assert 0 < sum(o["share"] for o in ops) <= 1.0001
    assert any("addmm" in o["op"] or o["op"] in ("aten::mm", "mkldnn::_linear_pointwise")
               for o in report["profile"]["train_step"]["ops"])


def test_the_benchmark_leaves_out_bfloat16_only_where_asked_or_emulated():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    for has_bf16 in (True, None):  # None: /proc/cpuinfo unreadable, so measure and see
        assert benchmark.bf16_skipped("auto", has_bf16) is None
    assert "no bfloat16 instructions (none of avx512_bf16, amx_bf16" in benchmark.bf16_skipped("auto", False)
    for has_bf16 in (True, False, None):
        assert benchmark.bf16_skipped("on", has_bf16) is None
        assert benchmark.bf16_skipped("off", has_bf16) == "--bf16 off"


@pytest.mark.parametrize("args, message", [
    (["--members", "0", "--full"], "--members must be a whole number >= 1, got '0'"),
    (["--full", "--members"], "--members needs a number"),
    (["--members", "3"], "--members applies to --full only"),
    (["--members", "2", "de_en"], "--members applies to --full only"),
    (["--fast"], "unknown option '--fast': use --full, --members N, --seed N, --size auto|small|medium|large"),
    (["--full", "--size", "tiny"], "--size must be auto, small, medium or large, got 'tiny'"),
    (["--full", "--size"], "--size needs auto, small, medium or large"),
    (["--full", "--size", "medium"], "--size medium is a De->En recipe: use small or large for en_de"),
    (["--size", "small", "de_en"], "--size applies to --full only"),
    (["--full", "fr_en"], "direction must be en_de or de_en, got 'fr_en'"),
    (["--full", "--seed"], "--seed needs a number"),
    (["--full", "--seed", "-1"], "--seed must be a whole number >= 0, got '-1'"),
    (["--full", "--seed", "08"], "--seed must be a whole number >= 0, got '08'"),
    (["--seed", "3", "en_de"], "--seed applies to --full only (the quick schedule takes seed=N)"),
    (["--full", "de_en", "trainer.max_epochs=2", "seed=7"],
     "'seed=7' would give every member the same seed: use --seed N (members get N, N+1, ...)"),
    (["--full", "en_de", "++seed=7"],
     "'++seed=7' would give every member the same seed: use --seed N (members get N, N+1, ...)"),
    (["de_en", "--full"], "'--full' after the direction: options go first (bash scripts/multi30k.sh --full ... de_en)"),
    (["--full", "de_en", "--seed", "3"],
     "'--seed' after the direction: options go first (bash scripts/multi30k.sh --full ... de_en)"),
    (["MULTI30K_DIR=no/such/dir"], "MULTI30K_DIR=no/such/dir is not a directory"),
])
def test_the_main_script_refuses_bad_options_before_installing_anything(args, message, tmp_path):
    # a copy of the script in an empty tree: had it gone on, it would have failed on scripts/setup.sh
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "multi30k.sh", tmp_path / "scripts" / "multi30k.sh")
    env = dict(os.environ, **dict(a.split("=", 1) for a in args if a.startswith("MULTI30K_DIR=")))
    args = [a for a in args if not a.startswith("MULTI30K_DIR=")]
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "multi30k.sh"), *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == message, proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["multi30k.sh", "scripts"]


def test_setup_installs_once_and_again_only_when_pyproject_changes(tmp_path):
    """A second `scripts/setup.sh` only checks (so it works offline); a changed pyproject.toml
    or new extras install again. python, python3 and the venv are stand-ins that log their calls."""
    tree, calls = tmp_path / "tree", tmp_path / "calls"
    for d in ("scripts", ".venv/bin", "fake"):
        (tree / d).mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tree / "scripts" / "setup.sh")
    (tree / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for exe in (tree / ".venv" / "bin" / "python", tree / "fake" / "python3"):
        exe.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n')
        exe.chmod(0o755)
    (tree / ".venv" / "bin" / "activate").write_text(f'PATH="{tree / ".venv" / "bin"}:$PATH"\n')
    env = dict(os.environ, PATH=f"{tree / 'fake'}:{os.environ['PATH']}")

    def setup(*extras: str) -> list[str]:
        calls.write_text("")
        proc = subprocess.run(["bash", str(tree / "scripts" / "setup.sh"), *extras], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [c for c in calls.read_text().splitlines() if "-m pip" in c]

    assert "-m pip install --quiet -e ." in setup()          # no stamp yet: installs
    assert setup() == []                                     # installed: only checks
    assert "-m pip install --quiet -e .[docs]" in setup("docs")   # extras it has not installed
    assert setup("docs") == [] and setup() == []
    (tree / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert "-m pip install --quiet -e ." in setup()          # a changed pyproject.toml: again


def _script_tree(tmp_path: Path, train_body: str) -> Path:
    """A copy of scripts/multi30k.sh with no-op setup, prepared data and a stand-in seq2seq-train."""
    tree = tmp_path / "tree"
    for d in ("scripts", ".venv/bin", "fake", "data/multi30k"):
        (tree / d).mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "multi30k.sh", tree / "scripts" / "multi30k.sh")
    (tree / "scripts" / "setup.sh").write_text("true\n")
    (tree / "data" / "multi30k" / "prepare.json").write_text("{}\n")
    fake = tree / "fake" / "seq2seq-train"
    fake.write_text("#!/usr/bin/env bash\n" + train_body)
    fake.chmod(0o755)
    (tree / ".venv" / "bin" / "activate").write_text(f'PATH="{tree / "fake"}:{Path(sys.executable).parent}:$PATH"\n')
    return tree


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_full_recipe_script_stops_its_members(signal_number, tmp_path):
    """The members train in the background, where bash has them ignore Ctrl-C: the script must
    stop them when it is stopped, or they would train on beside a rerun resuming their directories."""
    pids = tmp_path / "pids"
    tree = _script_tree(tmp_path, f'echo $$ >> "{pids}"\nsleep 60\n')
    proc = subprocess.Popen(["bash", str(tree / "scripts" / "multi30k.sh"), "--full", "--members", "2", "--size", "small",
                             "en_de"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(pids.read_text().split() if pids.exists() else []) < 2:
        time.sleep(0.05)
    members = [int(p) for p in pids.read_text().split()]
    assert len(members) == 2
    proc.send_signal(signal_number)
    code = proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(_running, members)):
        time.sleep(0.05)
    assert not any(map(_running, members)), "a member outlived the script"
    assert code == 128 + signal_number   # the script's own exit, from its trap


@pytest.mark.parametrize("args, run_dir", [
    (["en_de", "seed=3", "name=seed3"], "runs/seed3"),                       # quick: another seed, its own run
    (["--full", "de_en", "name=mine"], "runs/mine/member1"),
    (["--full", "de_en", "name=mine", "hydra.run.dir=runs/x"], "runs/x/member1"),   # the directory wins
])
def test_the_main_script_trains_in_runs_name_like_seq2seq_train(args, run_dir, tmp_path):
    tree = _script_tree(tmp_path, f'printf "%s\\n" "$*" >> "{tmp_path}/calls"\nexit 3\n')
    proc = subprocess.run(["bash", str(tree / "scripts" / "multi30k.sh"), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0, proc.stderr
    first = sorted((tmp_path / "calls").read_text().splitlines())[0].split()
    assert [a for a in first if a.startswith("hydra.run.dir=")][-1] == f"hydra.run.dir={run_dir}"


def _running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("one_core, size, direction, extra", [
    (False, None, "en_de", []), (True, None, "en_de", []), (False, "small", "en_de", []),
    (True, "large", "en_de", []), (False, None, "de_en", []), (False, "medium", "de_en", []),
    (False, None, "en_de", ["trainer.precision=32-true"]), (False, None, "de_en", ["trainer.precision=bf16-mixed"])])
def test_the_full_recipe_script_trains_each_member_in_its_own_directory_under_a_users_run_dir(one_core, size, direction,
                                                                                               extra, tmp_path):
    """`--full ... hydra.run.dir=X`: the members train in X/member1, X/member2 (were the user's
    override passed on after theirs, Hydra's last value would win and both would share X); on
    one core (taskset), one member has it to itself. The model: `--size`, by default
    `full_recipe_size` for the precision the members will train in (tests/test_train.py holds
    it to the CPU flags)."""
    # a stand-in seq2seq-train that records its arguments, one line a call, and fails
    tree = _script_tree(tmp_path, f'printf "%s\\n" "threads=$OMP_NUM_THREADS $*" >> "{tmp_path}/calls"\nexit 3\n')
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if one_core else []
    proc = subprocess.run([*pin, "bash", str(tree / "scripts" / "multi30k.sh"), "--full",
                           *(["--size", size] if size else []), direction, "hydra.run.dir=runs/mine", "trainer.max_epochs=2",
                           *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "training failed: see runs/mine/member*.out" in proc.stderr, proc.stderr
    calls = sorted((tmp_path / "calls").read_text().splitlines())
    cores = 1 if one_core else len(os.sched_getaffinity(0))
    assert len(calls) == (2 if cores >= 2 else 1)
    for member, call in enumerate(calls, 1):
        args = call.split()
        assert [a for a in args if a.startswith("hydra.run.dir=")] == [f"hydra.run.dir=runs/mine/member{member}"]
        assert f"seed={member}" in args and "trainer.max_epochs=2" in args
        assert all(a in args for a in extra)
        trainer = OmegaConf.from_dotlist(["trainer.precision=auto", *extra]).trainer
        expected = size or full_recipe_size(direction, trainer)
        recipe = f"multi30k_{direction}" + ("" if expected == "large" else f"_{expected}")
        assert args[1] == f"experiment={recipe}"
        assert args[0] == f"threads={max(cores // len(calls), 1)}"


def test_the_full_recipe_script_trains_packs_tunes_and_scores_an_ensemble(tmp_path):
    """`scripts/multi30k.sh --full --seed 3 de_en` end to end on a synthetic Multi30k, with a tiny
    model: two members with seeds 3 and 4 side by side, one ensemble file with its length penalty,
    three translated lines and a score with its signature."""
    from seq2seq import toy as toy_task

    raw, corpus = tmp_path / "raw", tmp_path / "multi30k"
    toy_task.generate(raw, sizes={"train": 300, "valid": 20, "test": 12})
    corpus.mkdir()
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test2016")):
        for lang, side in (("de", "src"), ("en", "tgt"), ("fr", "tgt"), ("cs", "tgt")):
            shutil.copy(raw / f"{split}.{side}", corpus / f"{name}.{lang}")
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    (tree / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "multi30k.sh", tree / "scripts" / "multi30k.sh")
    # set-up is done already: the installed console scripts stand in for the project's .venv
    (tree / "scripts" / "setup.sh").write_text("echo 'setup: already installed'\n")
    (tree / ".venv" / "bin" / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    tiny = ["tokenizer.vocab_size=120", "tokenizer.model_type=word", "model.embedding_size=16",
            "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[16]", "train.batch_size=32",
            "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "MULTI30K_DIR": str(corpus), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(tree / "scripts" / "multi30k.sh"), "--full", "--seed", "3", "--size", "large",
                           "de_en", *tiny],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tree / "runs" / "multi30k_de_en_seed3"  # not seed 1's directory, which it would resume
    assert "training member 2 of 2 (seed 4) on" in proc.stderr
    info = read_checkpoint(run / "model.pt")["seq2seq"]
    assert info["kind"] == "ensemble" and [m["config"]["seed"] for m in info["members"]] == [3, 4]
    assert all(m["config"]["model"]["embedding_size"] == 16 for m in info["members"])  # the overrides reached both
    assert info["meta"]["decoding"]["beam_size"] == 5  # the length penalty seq2seq-tune chose
    # both members tokenized the corpus at once into one cache: one entry, no half-built one left
    assert [p.name.count(".tmp") for p in (tree / "data" / "multi30k" / ".token-cache").iterdir()] == [0]
    lines = proc.stdout.split("\n")
    assert "stored in runs/multi30k_de_en_seed3/model.pt" in lines[-7], proc.stdout  # seq2seq-tune's choice
    # the three test sentences (one line each, even an empty translation), then the scores
    assert lines[-3].startswith("BLEU = ") and "nrefs:1|case:mixed" in lines[-3], proc.stdout
    assert lines[-2].startswith("chrF2 = ") and lines[-1] == "", proc.stdout
