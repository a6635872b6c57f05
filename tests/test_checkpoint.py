"""Checkpoints: one file is enough, loaded safely, bad files refused with a clear message."""

from __future__ import annotations

import os

import pytest
import torch

from seq2seq.checkpoint import FORMAT_VERSION, NEWEST_FORMAT_VERSION, CheckpointError, load_model, read_checkpoint, save_model
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.tokenizer import train_tokenizer
from seq2seq.translate import Translator

from .conftest import run_cli


@pytest.fixture(scope="module")
def small_checkpoint(toy_data, tmp_path_factory):
    tok = train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=len(tok), tgt_vocab_size=len(tok), embedding_size=8,
                                encoder_hidden_size=8, decoder_hidden_sizes=[12], dropout=0.0)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_model(path, model, tok, tok, config={"note": "test"}, meta={"src_lang": "src"})
    return path, model


def test_round_trip_gives_identical_translations(small_checkpoint, toy_data):
    path, model = small_checkpoint
    loaded, src_tok, tgt_tok, info = load_model(path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert info["meta"]["src_lang"] == "src" and info["format_version"] == FORMAT_VERSION
    lines = (toy_data / "test.src").read_text().splitlines()[:5]
    assert Translator(model, src_tok, tgt_tok).translate(lines) == Translator.from_checkpoint(path).translate(lines)


def test_checkpoint_is_plain_data_for_the_safe_loader(small_checkpoint, toy_run):
    for path in (small_checkpoint[0], toy_run["model"], toy_run["dir"] / "checkpoints" / "best.ckpt",
                 toy_run["dir"] / "checkpoints" / "last.ckpt"):
        ckpt = torch.load(path, weights_only=True)
        assert "seq2seq" in ckpt and "state_dict" in ckpt


def test_translate_with_only_the_checkpoint_present(toy_run, tmp_path):
    lonely = tmp_path / "alone"
    lonely.mkdir()
    (lonely / "m.pt").write_bytes(toy_run["model"].read_bytes())
    line = (toy_run["data"] / "test.src").read_text().splitlines()[0]
    proc = run_cli(["seq2seq-translate", "--checkpoint", "m.pt", line], cwd=lonely)
    assert proc.returncode == 0, proc.stderr.decode()
    expected = (toy_run["data"] / "test.tgt").read_text().splitlines()[0]
    assert proc.stdout.decode() == expected + "\n"


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SEQ2SEQ_MARKER']}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SEQ2SEQ_MARKER", str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save({"seq2seq": {"format_version": 1}, "state_dict": {}, "x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        read_checkpoint(evil)
    proc = run_cli(["seq2seq-translate", "--checkpoint", str(evil), "hello"])
    assert proc.returncode == 2
    assert b"not a valid seq2seq checkpoint" in proc.stderr and b"Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "foreign"])
def test_bad_checkpoint_files_are_named_with_a_reason(kind, small_checkpoint, tmp_path):
    bad = tmp_path / f"{kind}.ckpt"
    data = small_checkpoint[0].read_bytes()
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match=rf"not a valid seq2seq checkpoint: .*{kind}\.ckpt \(.+\)"):
        load_model(bad)
    proc = run_cli(["seq2seq-translate", "--checkpoint", str(bad), "hello"])
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert f"not a valid seq2seq checkpoint: {bad}".encode() in proc.stderr


def test_newer_format_version_is_a_clear_error(small_checkpoint, tmp_path):
    ckpt = torch.load(small_checkpoint[0], weights_only=True)
    ckpt["seq2seq"]["format_version"] = NEWEST_FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(ckpt, newer)
    with pytest.raises(CheckpointError, match="newer than this seq2seq reads"):
        load_model(newer)


def test_saving_is_atomic(small_checkpoint, tmp_path, monkeypatch):
    path, model = small_checkpoint
    target = tmp_path / "model.pt"
    target.write_bytes(path.read_bytes())
    _, tok, _, _ = load_model(path)

    def killed(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # some bytes reach the file being written, then the process is killed
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(target, model, tok, tok)
    assert target.read_bytes() == path.read_bytes()  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_separate_vocabularies_travel_in_the_checkpoint(toy_data, tmp_path):
    src_tok = train_tokenizer([toy_data / "train.src"], 60, model_type="word")
    tgt_tok = train_tokenizer([toy_data / "train.tgt"], 60, model_type="word")
    model = Seq2Seq(ModelConfig(src_vocab_size=len(src_tok), tgt_vocab_size=len(tgt_tok), embedding_size=8,
                                encoder_hidden_size=8, decoder_hidden_sizes=[12]))
    save_model(tmp_path / "sep.pt", model, src_tok, tgt_tok)
    _, src2, tgt2, info = load_model(tmp_path / "sep.pt")
    assert info["tokenizer"]["joint"] is False
    assert src2 == src_tok and tgt2 == tgt_tok and src2 != tgt2
