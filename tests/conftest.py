"""Shared fixtures: the toy task, and one toy model trained through the console script.

Training the toy model once per session (about a minute on 2 CPU cores) gives the
other tests a real, converged model to check search and I/O behaviour against.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import toy as toy_task
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.tokenizer import PAD_ID

BIN = Path(sys.executable).parent


def console(name: str) -> str:
    """Path of an installed console script (installed beside this Python)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"console script {name} is not installed; run the README's test command")
    return found


def run_cli(args: list[str], cwd: Path | None = None, stdin: bytes | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([console(args[0]), *args[1:]], cwd=cwd, input=stdin, capture_output=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toydata")
    toy_task.generate(d)
    return d


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> dict:
    """Train `experiment=toy` with the installed console script, from a scratch directory."""
    work = tmp_path_factory.mktemp("toyrun")
    run_dir = work / "run"
    # about 50 s alone on 2 cores; beside a training run it took over 600 s once
    proc = run_cli(["seq2seq-train", "experiment=toy", f"hydra.run.dir={run_dir}"], cwd=work, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"toy training failed ({proc.returncode}):\n{proc.stderr.decode()[-4000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"dir": run_dir, "work": work, "results": results, "model": run_dir / "model.pt",
            "data": work / "data" / "toy"}


@pytest.fixture
def tiny_model() -> Seq2Seq:
    """An untrained two-layer model with different layer sizes, in eval mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=30, tgt_vocab_size=25, embedding_size=16, encoder_hidden_size=12,
                      encoder_layers=2, decoder_hidden_sizes=[20, 24], attention="bahdanau", dropout=0.0)
    return Seq2Seq(cfg).eval()


def random_sources(lengths: list[int], vocab: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of random source ids (no specials): (batch, max(lengths)) and the lengths."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, vocab, (n,), generator=g)
    return src, torch.tensor(lengths)


@pytest.fixture(scope="module")
def toy(toy_run) -> dict:
    """The trained toy model with its test split, as paths and lines."""
    data = toy_run["data"]
    return {"model": str(toy_run["model"]), "src": data / "test.src", "tgt": data / "test.tgt",
            "lines": (data / "test.src").read_text().splitlines(),
            "refs": (data / "test.tgt").read_text().splitlines()}
