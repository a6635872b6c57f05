"""Checkpoint averaging: the mean of several checkpoints' weights, as one slim model.

Averaging the last few checkpoints of a run usually translates a little better than
any one of them (the weights settle near the middle of where the optimizer wandered).
Every input must describe the same model: same tensors, same model config, same
tokenizer. Inputs are read one at a time with the safe loader, so memory holds the
running sum, the first model (to compare against) and one more, however many are averaged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import PREFIX, CheckpointError, read_checkpoint, same_tokenizer, save_model, tokenizers_from_payload
from .files import InputError
from .model import build_model

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".ckpt", ".pt")


def checkpoints_oldest_first(ckpt_dir: str | Path) -> list[Path]:
    """The checkpoint files in a directory, oldest first: by epoch number when all are named
    epochN.ckpt (as training's end-of-epoch checkpoints are), else by modification time."""
    found = [p for p in Path(ckpt_dir).iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    epochs = [re.fullmatch(r"epoch(\d+)", p.stem) for p in found]
    if found and all(epochs):
        return [p for _, p in sorted(zip((int(m.group(1)) for m in epochs), found))]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def latest_checkpoints(run_dir: str | Path, n: int) -> list[Path]:
    """The `n` newest checkpoint files of a run (`checkpoints_oldest_first`), oldest first.

    They come from RUN_DIR/checkpoints/epochs (end-of-epoch checkpoints kept with
    train.keep_last_epochs) when it holds any, else from RUN_DIR/checkpoints.
    """
    if n < 1:
        raise InputError(f"--last must be >= 1, got {n}")
    ckpt_dir = Path(run_dir) / "checkpoints"
    if any((ckpt_dir / "epochs").glob("*.ckpt")):
        ckpt_dir = ckpt_dir / "epochs"
    if not ckpt_dir.is_dir():
        raise InputError(f"no checkpoints directory in {run_dir} (expected {ckpt_dir})")
    found = checkpoints_oldest_first(ckpt_dir)
    if len(found) < n:
        raise InputError(f"--last {n}: only {len(found)} checkpoint file(s) in {ckpt_dir}: "
                         f"{', '.join(p.name for p in found) or 'none'}")
    return found[-n:]


def _check_compatible(first: Path, ref: dict, path: Path, ckpt: dict) -> None:
    """Raise InputError naming both files unless `ckpt` describes the same model as `ref`."""
    info, ref_info = ckpt["seq2seq"], ref["seq2seq"]
    a, b = ref_info["model_config"], info["model_config"]
    if a != b:
        diff = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise InputError(f"cannot average {first} and {path}: different model configs ({'; '.join(diff)})")
    if not same_tokenizer(info["tokenizer"], ref_info["tokenizer"]):
        raise InputError(f"cannot average {first} and {path}: different tokenizers")
    keys, ref_keys = set(ckpt["state_dict"]), set(ref["state_dict"])
    if keys != ref_keys:
        odd = sorted(keys ^ ref_keys)
        raise InputError(f"cannot average {first} and {path}: different weights ({', '.join(odd[:5])})")
    for k, v in ckpt["state_dict"].items():
        if v.shape != ref["state_dict"][k].shape:
            raise InputError(f"cannot average {first} and {path}: {k} has shape "
                             f"{tuple(ref['state_dict'][k].shape)} vs {tuple(v.shape)}")


def _read(path: Path) -> dict:
    """The payload and the model weights of a checkpoint."""
    ckpt = read_checkpoint(path)
    for key in ("model_config", "tokenizer"):
        if not isinstance(ckpt["seq2seq"].get(key), dict):
            raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (no {key})")
    # optimizer state and the rest of a Lightning checkpoint are dropped at once: memory
    # then holds only weights, however many checkpoints are averaged
    return {"seq2seq": ckpt["seq2seq"],
            "state_dict": {k: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}}


def average_checkpoints(paths: Sequence[str | Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean of the model weights of `paths`, and the payload of the newest (highest step) input.

    Float tensors are summed in float64 and cast back, so averaging a checkpoint with
    itself gives it back bit for bit. Other tensors (integer buffers) must agree and are kept.
    Names of one tied tensor (shared or tied embeddings) are averaged once and stay one tensor.
    """
    if not paths:
        raise InputError("no checkpoints to average")
    paths = [Path(p) for p in paths]
    ref = _read(paths[0])
    tied_to = _tied_names(ref["state_dict"])
    sums = {k: v.to(torch.float64, copy=True) if v.is_floating_point() else v
            for k, v in ref["state_dict"].items() if tied_to[k] == k}
    newest, newest_step = ref["seq2seq"], ref["seq2seq"].get("meta", {}).get("global_step", -1)
    for path in paths[1:]:
        ckpt = _read(path)
        _check_compatible(paths[0], ref, path, ckpt)
        for k in sums:                       # one name of each tied tensor
            v = ckpt["state_dict"][k]
            if v.is_floating_point():
                sums[k] += v.double()
            elif not torch.equal(v, sums[k]):
                raise InputError(f"cannot average {paths[0]} and {path}: non-float tensor {k} differs")
        step = ckpt["seq2seq"].get("meta", {}).get("global_step", -1)
        if step >= newest_step:
            newest, newest_step = ckpt["seq2seq"], step
    dtypes = {k: v.dtype for k, v in ref["state_dict"].items()}
    averaged = {k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in sums.items()}
    return {k: averaged[tied_to[k]] for k in ref["state_dict"]}, newest


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each name -> the first name of the same tensor (one storage, offset, shape and stride)."""
    first: dict[tuple, str] = {}
    return {k: first.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride()), k)
            if v.numel() else k for k, v in state.items()}   # empty tensors may all have address 0


def average(paths: Sequence[str | Path], output: str | Path) -> Path:
    """Average `paths` into a slim model at `output` (written atomically); returns its path."""
    paths = [Path(p) for p in paths]
    if len({p.resolve() for p in paths}) < len(paths):
        log.warning("the same file is given more than once: it weighs more in the average")
    state, info = average_checkpoints(paths)
    model = build_model(dict(info["model_config"]))
    # loading strictly proves the average is a complete model before anything is written
    model.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=True)
    src_tok, tgt_tok = tokenizers_from_payload(info)
    meta = {k: v for k, v in info.get("meta", {}).items()
            # validation scores and the length penalty tuned on them described one checkpoint
            if k not in ("best_val", "last_val", "decoding")}
    meta["averaged_from"] = [str(p) for p in paths]
    return save_model(output, model, src_tok, tgt_tok, info.get("config"), meta, state_dict=state)
