"""The model card: what a checkpoint is, read from the checkpoint alone.

`model_card(path)` returns plain data (architecture, size, languages, data, tokenizer,
best validation score with its sacreBLEU signature, the tuned length penalty, training
time, versions);
`format_card(card)` lays it out for a terminal.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import is_ensemble
from .ensemble import load_models

# SentencePiece's TrainerSpec.ModelType enum; absent means the proto default, unigram
_SPM_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _proto_fields(data: bytes):
    """(field number, value) of each top-level field of a serialized protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def sentencepiece_model_type(model_bytes: bytes) -> str:
    """unigram, bpe, word or char, read from the model itself.

    The model bytes are what the checkpoint tokenizes with (the run config may be
    missing or edited), and a dozen lines of protobuf reading spare a dependency on the
    protobuf package: ModelProto field 2 is the TrainerSpec, whose field 3 is the type.
    """
    try:
        for number, value in _proto_fields(model_bytes):
            if number == 2:
                for inner, kind in _proto_fields(value):
                    if inner == 3:
                        return _SPM_MODEL_TYPES.get(kind, f"type {kind}")
                return "unigram"
    except (IndexError, ValueError):
        pass
    return "unknown"


def architecture_summary(cfg: dict) -> str:
    """One line a reader can compare across models."""
    directions = "bidirectional" if cfg["bidirectional"] else "unidirectional"
    sizes = "/".join(str(s) for s in cfg["decoder_hidden_sizes"])
    parts = [
        f"encoder {cfg['encoder_layers']}-layer {directions} LSTM {cfg['encoder_hidden_size']}",
        f"decoder {len(cfg['decoder_hidden_sizes'])}-layer LSTMCell {sizes}"
        + (" with input feeding" if cfg["input_feeding"] else ""),
        f"{cfg['attention']} attention" + (f" {cfg['attention_size']}" if cfg.get("attention_size") else ""),
        f"{cfg['bridge']} bridge",
        f"embeddings {cfg['embedding_size']}"
        + (" shared" if cfg.get("share_embeddings") else "") + (" tied" if cfg.get("tie_embeddings") else ""),
        f"dropout {cfg['dropout']}",
    ]
    return ", ".join(parts)


def _member_card(member: dict, model) -> dict:
    cfg, meta = member["model_config"], member.get("meta") or {}
    best = meta.get("best_val")
    return {"architecture": architecture_summary(cfg), "parameters": model.num_parameters(),
            "seed": (member.get("config") or {}).get("seed"), "best_val": dict(best) if best else None,
            "epoch": meta.get("epoch"), "global_step": meta.get("global_step"),
            "train_seconds": meta.get("train_seconds"), "precision": meta.get("precision")}


def model_card(path: str | Path) -> dict:
    """Everything worth knowing about a checkpoint, as plain JSON-ready data.

    Raises CheckpointError ("not a valid seq2seq checkpoint: ...") for a bad file; the
    model is fully loaded, so a card exists only for a checkpoint that would translate.
    An ensemble file's card describes each member under "members" (else None).
    """
    model, src_tok, tgt_tok, info = load_models([path])
    meta = info.get("meta", {})
    joint = bool(info["tokenizer"]["joint"])
    # the members as loaded (an Ensemble's models, in the file's order): nothing is built twice
    members = [_member_card(m, one) for m, one in zip(info["members"], model.models)] if is_ensemble(info) else None
    best = meta.get("best_val")
    if members:
        kinds = list(dict.fromkeys(m["architecture"] for m in members))
        architecture = f"ensemble of {len(members)}: " + " | ".join(kinds)
    else:
        architecture = architecture_summary(info["model_config"])
    return {
        "checkpoint": str(path),
        "format_version": info["format_version"],
        "architecture": architecture,
        "model_config": dict(info["model_config"]) if not members else None,
        "parameters": model.num_parameters(),
        "members": members,
        "src_lang": meta.get("src_lang"),
        "tgt_lang": meta.get("tgt_lang"),
        "data": meta.get("data"),
        "train_files": meta.get("train_files"),
        "tokenizer": {
            "type": sentencepiece_model_type(src_tok.model_bytes),
            "joint": joint,
            "src_vocab_size": len(src_tok),
            "tgt_vocab_size": len(tgt_tok),
        },
        "best_val": dict(best) if best else None,
        "epoch": meta.get("epoch"),
        "global_step": meta.get("global_step"),
        "train_seconds": meta.get("train_seconds"),
        "precision": meta.get("precision"),
        "averaged_from": meta.get("averaged_from"),
        "decoding": dict(meta["decoding"]) if meta.get("decoding") else None,
        "versions": {"seq2seq": meta.get("seq2seq_version"), "torch": meta.get("torch_version"),
                     "lightning": meta.get("lightning_version")},
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _tokenizer_line(tok: dict) -> str:
    if tok["joint"]:
        return f"SentencePiece {tok['type']}, joint vocabulary of {tok['src_vocab_size']}"
    return (f"SentencePiece {tok['type']}, separate vocabularies: source {tok['src_vocab_size']}, "
            f"target {tok['tgt_vocab_size']}")


def _best_line(best: dict | None, averaged_from: list | None, members: list | None = None) -> str:
    if members:
        return "none (an ensemble: its members' are below; evaluate it to score it)"
    if averaged_from:
        return f"none (an average of {len(averaged_from)} checkpoints; evaluate it to score it)"
    if not best:
        return "none recorded"
    return (f"BLEU {best['bleu']:.2f}, chrF {best.get('chrf', float('nan')):.2f} at epoch {best.get('epoch')}, "
            f"step {best.get('step')}\n{'':17}{best.get('bleu_signature', '')}")


def _decoding_line(decoding: dict | None) -> str:
    if not decoding:
        return "no length penalty stored (alpha 0 unless --alpha; seq2seq-tune chooses one)"
    grid = decoding.get("grid") or {}
    untuned = f"; alpha 0: {grid['0.0']:.2f}" if "0.0" in grid else ""
    precision = f" in {decoding['precision']}" if decoding.get("precision") else ""  # older files lack it
    return (f"length penalty alpha {decoding['alpha']:g}, chosen with beam {decoding.get('beam_size')}{precision} on "
            f"{decoding.get('data', '?')} (BLEU {decoding.get('bleu', float('nan')):.2f}{untuned})")


def format_card(card: dict) -> str:
    """The card as aligned `label  value` lines."""
    v = card["versions"]
    rows = [
        ("checkpoint", f"{card['checkpoint']} (format version {card['format_version']})"),
        ("architecture", card["architecture"]),
        ("parameters", f"{card['parameters']:,}"),
        ("languages", f"{card['src_lang'] or '?'} -> {card['tgt_lang'] or '?'}"),
        ("training data", f"{card['data'] or '?'}: {', '.join(card['train_files'] or []) or '?'}"),
        ("tokenizer", _tokenizer_line(card["tokenizer"])),
        ("best validation", _best_line(card["best_val"], card["averaged_from"], card.get("members"))),
        ("decoding", _decoding_line(card.get("decoding"))),
        ("trained", "each member as below" if card.get("members") else
         (f"{_duration(card['train_seconds'])}; saved at epoch {card['epoch']}, step {card['global_step']}"
          if card["epoch"] is not None else _duration(card["train_seconds"]))
         + (f"; precision {card['precision']}" if card.get("precision") else "")),
        ("versions", f"seq2seq {v['seq2seq'] or '?'}, torch {v['torch'] or '?'}, lightning {v['lightning'] or '?'}"),
    ]
    if card["averaged_from"]:
        rows.append(("averaged from", ", ".join(card["averaged_from"])))
    for i, m in enumerate(card.get("members") or [], 1):
        best = m["best_val"]
        rows.append((f"member {i}", f"{m['parameters']:,} parameters, seed {m['seed']}; "
                     + (f"best validation BLEU {best['bleu']:.2f} at epoch {best.get('epoch')}; " if best else "")
                     + f"trained {_duration(m['train_seconds'])}"
                     + (f", precision {m['precision']}" if m.get("precision") else "")))
    return "\n".join(f"{label:<16} {value}" for label, value in rows)
