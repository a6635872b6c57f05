"""One checkpoint file is enough to translate.

A checkpoint (the Lightning one written during training, or a slim exported one)
holds, besides tensors, only plain Python data under the key "seq2seq":

    {"format_version": 1,
     "model_config": {...},                       # ModelConfig.to_dict()
     "tokenizer": {"joint": bool, "src": uint8 tensor, "tgt": uint8 tensor},  # SentencePiece model bytes
                                                  # (tgt empty when joint)
     "config": {...},                             # the resolved training config
     "meta": {...}}                               # languages, best BLEU, versions, ...

and the weights under "state_dict" (keys prefixed "model."). An ensemble file
(format version 2, written by ensemble.py) holds several such models under one
tokenizer. Every file is loaded with `torch.load(weights_only=True)`, so a file
carrying a pickled payload is refused before anything in it can run.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write
from .model import ModelConfig, Seq2Seq, build_model
from .tokenizer import Tokenizer

FORMAT_VERSION = 1           # one model
ENSEMBLE_FORMAT_VERSION = 2  # several models in one file (ensemble.py)
NEWEST_FORMAT_VERSION = ENSEMBLE_FORMAT_VERSION
PREFIX = "model."


class CheckpointError(Exception):
    """A file that is not a usable seq2seq checkpoint."""


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """Raw bytes as a uint8 tensor: the safe loader accepts tensors, not pickled `bytes`."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def tokenizers_from_payload(info: dict) -> tuple[Tokenizer, Tokenizer]:
    tok = info["tokenizer"]
    src = Tokenizer(tok["src"].numpy().tobytes())
    return src, src if tok["joint"] else Tokenizer(tok["tgt"].numpy().tobytes())


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two payloads' "tokenizer" entries hold the same SentencePiece models."""
    return a["joint"] == b["joint"] and torch.equal(a["src"], b["src"]) and torch.equal(a["tgt"], b["tgt"])


def payload(model_config: ModelConfig, src_tok: Tokenizer, tgt_tok: Tokenizer,
            config: dict | None = None, meta: dict | None = None) -> dict:
    """The plain-data part of a checkpoint."""
    joint = src_tok == tgt_tok
    return {
        "format_version": FORMAT_VERSION,
        "model_config": model_config.to_dict(),
        "tokenizer": {"joint": joint, "src": bytes_to_tensor(src_tok.model_bytes),
                      "tgt": bytes_to_tensor(b"" if joint else tgt_tok.model_bytes)},
        "config": config or {},
        "meta": meta or {},
    }


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True, every failure as a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (no such file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (empty file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything that is not tensors and plain data: a pickled
        # callable (a payload that would run code) lands here, unexecuted
        detail = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        reason = detail[0] if detail else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (refused by the safe loader: {reason})") from None
    except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes the loader raise, it is not a checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} ({first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("seq2seq"), dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (no seq2seq model inside)")
    version = ckpt["seq2seq"].get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} (no format version)")
    if version > NEWEST_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this seq2seq reads "
            f"({NEWEST_FORMAT_VERSION}); upgrade seq2seq to load it"
        )
    return ckpt


def is_ensemble(info: dict) -> bool:
    """Whether a checkpoint's payload describes several models (an ensemble file)."""
    return info.get("kind") == "ensemble"


def model_from(info: dict, state_dict: dict[str, Any], path: str | Path) -> tuple[Seq2Seq, Tokenizer, Tokenizer]:
    """The model (eval mode) and tokenizers of one model's payload and its "model."-prefixed weights."""
    try:
        model = build_model(dict(info["model_config"]))
        state = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
        model.load_state_dict(state, strict=True)
        src_tok, tgt_tok = tokenizers_from_payload(info)
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"not a valid seq2seq checkpoint: {path} ({type(e).__name__}: {first})") from None
    return model.eval(), src_tok, tgt_tok


def load_model(path: str | Path) -> tuple[Seq2Seq, Tokenizer, Tokenizer, dict]:
    """Model (eval mode, CPU), source and target tokenizers, and the plain-data payload."""
    ckpt = read_checkpoint(path)
    info = ckpt["seq2seq"]
    if is_ensemble(info):
        raise CheckpointError(f"{path} is an ensemble of {len(info.get('members') or [])} models, not one model: "
                              f"seq2seq.ensemble.load_models reads it (as translate, evaluate, tune and info do)")
    model, src_tok, tgt_tok = model_from(info, ckpt["state_dict"], path)
    return model, src_tok, tgt_tok, info


def save_model(path: str | Path, model: Seq2Seq, src_tok: Tokenizer, tgt_tok: Tokenizer,
               config: dict | None = None, meta: dict | None = None,
               state_dict: dict[str, Any] | None = None) -> Path:
    """Write a slim checkpoint (weights + payload, no optimizer state), atomically."""
    state = state_dict if state_dict is not None else {PREFIX + k: v for k, v in model.state_dict().items()}
    ckpt = {"seq2seq": payload(model.config, src_tok, tgt_tok, config, meta), "state_dict": state}
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)
    return Path(path)
