"""Tests for seq2seq.corpora: offline, on tiny synthetic corpora built in tmp_path."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zipfile
from pathlib import Path

import pytest

from seq2seq import corpora
from seq2seq.corpora import CleaningConfig, CorpusError, drop_reason, main, prepare

LANGS = ("en", "de", "fr", "cs")


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{line}\n" for line in lines).encode("utf-8"))
    return path


def read(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n")[:-1]


def synthetic(lang: str, n: int, tag: str) -> list[str]:
    return [f"{lang} {tag} sentence number {i} ." for i in range(n)]


@pytest.fixture
def multi30k_dir(tmp_path: Path) -> Path:
    src = tmp_path / "multi30k"
    train = {lang: synthetic(lang, 6, "train") for lang in LANGS}
    train["de"][1] = "@@"  # missing translation: whole line index must go
    train["de"][2] = "de train with a\ttab inside ."
    train["de"][3] = "  de train with stray whitespace . "
    train["en"][4] = "en train Cafe\u0301 decomposed ."  # NFD -> NFC
    for lang in LANGS:
        train[lang][5] = train[lang][0]  # exact duplicate of line 0 in all four languages
    valid = {lang: synthetic(lang, 4, "valid") for lang in LANGS}
    valid["de"][0] = "@@"
    valid["fr"][1] = ""
    valid["cs"][2] = "cs\u00a0valid\t\tline "
    for lang in LANGS:
        write(src / f"train.{lang}", train[lang])
        write(src / f"val.{lang}", valid[lang])
        write(src / f"test2016.{lang}", synthetic(lang, 3, "test"))
    return src


def test_multi30k_counts_and_alignment(multi30k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = prepare("multi30k", out, source=multi30k_dir)

    train = summary["splits"]["train"]
    assert (train["read"], train["kept"]) == (6, 4)
    assert train["dropped"] == {"empty": 0, "placeholder": 1, "too_long": 0, "ratio": 0,
                                "duplicate": 1}
    assert train["fixed"]["de"] == {"edge_whitespace": 1, "inner_whitespace": 1, "nfc": 0}
    assert train["fixed"]["en"] == {"edge_whitespace": 0, "inner_whitespace": 0, "nfc": 1}

    # Line 1 (the "@@" line) and line 5 (the duplicate) are gone from all four files.
    kept = [0, 2, 3, 4]
    for lang in LANGS:
        lines = read(out / f"train.{lang}")
        assert len(lines) == 4
        if lang in ("fr", "cs"):  # untouched languages keep exactly the surviving lines
            assert lines == [synthetic(lang, 6, "train")[i] for i in kept]
    de = read(out / "train.de")
    assert de[1] == "de train with a tab inside ."
    assert de[2] == "de train with stray whitespace ."
    assert read(out / "train.en")[3] == "en train Caf\u00e9 decomposed ."

    assert json.loads((out / "prepare.json").read_text("utf-8")) == summary
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries behind


def test_multi30k_evaluation_splits_never_drop(multi30k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = prepare("multi30k", out, source=multi30k_dir)
    valid = summary["splits"]["valid"]
    assert valid["read"] == valid["kept"] == 4
    assert sum(valid["dropped"].values()) == 0
    assert valid["fixed"]["cs"] == {"edge_whitespace": 1, "inner_whitespace": 1, "nfc": 0}
    assert read(out / "valid.de")[0] == "@@"
    assert read(out / "valid.fr")[1] == ""  # an empty evaluation line stays, and stays empty
    assert read(out / "valid.cs")[2] == "cs valid line"
    for lang in LANGS:
        assert len(read(out / f"valid.{lang}")) == 4
        assert len(read(out / f"test2016.{lang}")) == 3


def test_length_and_ratio_filters() -> None:
    config = CleaningConfig(max_len=5, max_ratio=2.0)
    assert drop_reason(["a b c", "d e f"], config) is None
    assert drop_reason(["a b c d e f", "a b c d e f"], config) == "too_long"
    assert drop_reason(["a", "b c d"], config) == "ratio"
    assert drop_reason(["a", ""], config) == "empty"
    assert drop_reason(["a", "..."], config) == "placeholder"
    with pytest.raises(ValueError):
        CleaningConfig(max_len=0)


def test_mismatched_line_counts_name_both_files(multi30k_dir: Path, tmp_path: Path) -> None:
    write(multi30k_dir / "val.fr", synthetic("fr", 3, "valid"))
    with pytest.raises(CorpusError) as info:
        prepare("multi30k", tmp_path / "out", source=multi30k_dir)
    message = str(info.value)
    assert str(multi30k_dir / "val.en") in message and "4 lines" in message
    assert str(multi30k_dir / "val.fr") in message and "3 lines" in message
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


def test_invalid_utf8_names_the_file_and_line_and_writes_nothing(multi30k_dir: Path, tmp_path: Path) -> None:
    path = multi30k_dir / "train.de"
    lines = path.read_bytes().split(b"\n")
    lines[3] = b"de train caf\xe9 in Latin-1 ."     # line 4
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorpusError, match=rf"^{path}:4: invalid UTF-8 \(invalid continuation byte, byte 0xe9\)"):
        prepare("multi30k", tmp_path / "out", source=multi30k_dir)
    assert not (tmp_path / "out").exists()


def test_lines_end_at_line_feeds_only_with_or_without_a_final_one(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    for data, want in [(b"", []), (b"\n", [""]), (b"a\n\nb", ["a", "", "b"]),
                       (b"\xef\xbb\xbfa\rb\n", ["a\rb"]),
                       ("a\u2028b\x85c\n".encode(), ["a\u2028b\x85c"])]:
        path.write_bytes(data)
        assert corpora.read_lines(path) == want, data


def test_missing_folder_and_file(multi30k_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="Input folder not found"):
        prepare("multi30k", tmp_path / "out", source=tmp_path / "nowhere")
    (multi30k_dir / "test2016.cs").unlink()
    with pytest.raises(CorpusError, match="test2016.cs"):
        prepare("multi30k", tmp_path / "out", source=multi30k_dir)


def test_main_reports_bad_input_without_traceback(tmp_path: Path, capsys) -> None:
    assert main(["multi30k", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Input folder not found") and "Traceback" not in err


def test_unknown_corpus(tmp_path: Path, capsys) -> None:
    expected = "Unknown corpus 'x'; choose one of: multi30k, tatoeba-en-de, iwslt-ted-de-en"
    with pytest.raises(CorpusError) as info:
        prepare("x", tmp_path, source=tmp_path)
    assert str(info.value) == expected
    assert main(["x", "--from", str(tmp_path)]) == 2       # the command line also offers `files`
    assert capsys.readouterr().err.strip() == f"error: {expected}, files"


def test_from_and_download_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["multi30k", "--from", str(tmp_path), "--download"])
    with pytest.raises(SystemExit):
        main(["multi30k"])


# --------------------------------------------------------------------------- tatoeba


def tatoeba_lines(n_english: int = 4000) -> list[str]:
    """About 3 German variants per English sentence: 12,000 lines for 4,000 sentences."""
    lines = []
    for k in range(n_english):
        for v in range(1 + k % 5):
            extra = "\tCC-BY 2.0 attribution #{k}" if v == 2 else ""  # newer 3-column format
            lines.append(f"english sentence {k} .\tdeutscher satz {k} variante {v} .{extra}")
    return lines


def split_english(out: Path) -> dict[str, set[str]]:
    return {split: set(read(out / f"{split}.en")) for split in ("train", "valid", "test")}


def test_tatoeba_split_by_unique_english(tmp_path: Path) -> None:
    lines = tatoeba_lines()
    assert len(lines) == 12000
    write(tmp_path / "src" / "deu.txt", lines)
    summary = prepare("tatoeba-en-de", tmp_path / "a", source=tmp_path / "src")

    english = split_english(tmp_path / "a")
    assert not english["train"] & english["valid"]
    assert not english["train"] & english["test"]
    assert not english["valid"] & english["test"]
    for split in ("valid", "test"):
        assert 2000 <= summary["splits"][split]["kept"] < 2005
    assert sum(s["kept"] for s in summary["splits"].values()) == 12000
    for split in ("train", "valid", "test"):  # German side stays aligned with its English
        pairs = zip(read(tmp_path / "a" / f"{split}.en"), read(tmp_path / "a" / f"{split}.de"))
        for en, de in pairs:
            assert en.split()[2] == de.split()[2]

    # Deterministic, and independent of the input order.
    prepare("tatoeba-en-de", tmp_path / "b", source=tmp_path / "src")
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            name = f"{split}.{lang}"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    random.Random(7).shuffle(lines)
    write(tmp_path / "shuffled" / "deu.txt", lines)
    prepare("tatoeba-en-de", tmp_path / "c", source=tmp_path / "shuffled")
    assert split_english(tmp_path / "c") == english


def test_tatoeba_bad_line_and_too_small(tmp_path: Path) -> None:
    write(tmp_path / "bad" / "deu.txt", ["one .\teins .", "two .\tzwei .", "no tab here"])
    with pytest.raises(CorpusError, match=r"deu\.txt, line 3"):
        prepare("tatoeba-en-de", tmp_path / "out", source=tmp_path / "bad")
    write(tmp_path / "small" / "deu.txt", tatoeba_lines(100))
    with pytest.raises(CorpusError, match="too small"):
        prepare("tatoeba-en-de", tmp_path / "out", source=tmp_path / "small")


# --------------------------------------------------------------------------- iwslt


def test_iwslt_keeps_every_line(tmp_path: Path) -> None:
    src = tmp_path / "iwslt"
    sizes = {("TED", "dev2010"): 5, ("TED", "tst2010"): 7, ("TEDX", "dev2012"): 4}
    for (kind, test_set), n in sizes.items():
        for lang in ("de", "en"):
            lines = synthetic(lang, n, f"{kind} {test_set}")
            lines[0] = "( talk noise )"
            lines[1] = ""
            write(src / f"IWSLT16.{kind}.{test_set}.de-en.{lang}", lines)
    # A set present only as the official XML is read from its <seg> elements.
    for lang in ("de", "en"):
        segs = [f'<seg id="{i}"> {lang} xml seg {i} &amp; more </seg>' for i in (1, 2, 3)]
        write(src / f"IWSLT16.TED.tst2011.de-en.{lang}.xml",
              ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", "<doc>", *segs, "</doc>"])
    write(src / "README.IWSLT16", ["not a data file"])

    out = tmp_path / "out"
    summary = prepare("iwslt-ted-de-en", out, source=src)
    sizes[("TED", "tst2011")] = 3
    assert set(summary["splits"]) == {f"{k.lower()}.{s}" for k, s in sizes}
    for (kind, test_set), n in sizes.items():
        split = f"{kind.lower()}.{test_set}"
        assert summary["splits"][split]["read"] == summary["splits"][split]["kept"] == n
        for lang in ("de", "en"):
            assert len(read(out / f"{split}.{lang}")) == n
    assert read(out / "ted.tst2011.en")[0] == "en xml seg 1 & more"
    assert read(out / "ted.dev2010.de")[1] == ""

    (src / "IWSLT16.TEDX.dev2012.de-en.en").unlink()
    with pytest.raises(CorpusError, match=r"IWSLT16\.TEDX\.dev2012\.de-en\.en"):
        prepare("iwslt-ted-de-en", out, source=src)


def fake_iwslt_mirror(monkeypatch, served: dict[str, bytes]) -> list[str]:
    """Serve `served` (file name -> bytes) in place of the IWSLT mirror; returns the URLs asked for."""
    calls = []

    def fake_download(url: str, dest: Path, timeout: float = 1.0) -> Path:
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(served[url.rsplit("/", 1)[1]])
        return dest

    monkeypatch.setattr(corpora, "download_file", fake_download)
    return calls


def test_iwslt_download_fetches_every_set_and_checks_it(tmp_path: Path, monkeypatch) -> None:
    served = {name: ("\n".join(synthetic(name.rsplit(".", 1)[1], 3, name)) + "\n").encode()
              for name in corpora.IWSLT_SHA256}
    monkeypatch.setattr(corpora, "IWSLT_SHA256",
                        {name: hashlib.sha256(data).hexdigest() for name, data in served.items()})
    calls = fake_iwslt_mirror(monkeypatch, served)
    summary = prepare("iwslt-ted-de-en", tmp_path / "out", download=True)
    assert len(calls) == 18 and all(url.startswith("https://raw.githubusercontent.com/") for url in calls)
    assert len(summary["splits"]) == 9 and summary["splits"]["tedx.tst2014"]["kept"] == 3
    # the download folder is a cache: files that pass the check are not fetched again
    calls.clear()
    prepare("iwslt-ted-de-en", tmp_path / "out", download=True)
    assert calls == []


def test_iwslt_download_refuses_a_changed_mirror(tmp_path: Path, monkeypatch) -> None:
    served = {name: b"not the release\n" for name in corpora.IWSLT_SHA256}
    fake_iwslt_mirror(monkeypatch, served)
    with pytest.raises(CorpusError, match=r"IWSLT16\.TED\.dev2010\.de-en\.de has SHA-256 [0-9a-f]{64}, expected 9f2c2a"):
        prepare("iwslt-ted-de-en", tmp_path / "out", download=True)
    assert not (tmp_path / "out" / "download" / "IWSLT16.TED.dev2010.de-en.de").exists()
    assert not (tmp_path / "out" / "ted.dev2010.de").exists()


# --------------------------------------------------------------------------- download


def test_download_calls_downloader(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_download(url: str, dest: Path, timeout: float = 1.0) -> Path:
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.suffix == ".zip":
            with zipfile.ZipFile(dest, "w") as bundle:
                bundle.writestr("deu.txt", "\n".join(tatoeba_lines()) + "\n")
        else:
            lang, n = dest.name.split(".")[1], 3 if dest.name.startswith("train") else 2
            dest.write_bytes(gzip.compress("\n".join(synthetic(lang, n, dest.name)).encode()))
        return dest

    monkeypatch.setattr(corpora, "download_file", fake_download)
    out = tmp_path / "m30k"
    assert main(["multi30k", "--download", "--out", str(out)]) == 0
    assert len(calls) == 12 and any("test_2016_flickr.cs.gz" in url for url in calls)
    assert len(read(out / "train.cs")) == 3 and len(read(out / "test2016.en")) == 2

    calls.clear()
    assert main(["tatoeba-en-de", "--download", "--out", str(tmp_path / "tat")]) == 0
    assert calls == [corpora.TATOEBA_URL]
    assert (tmp_path / "tat" / "download" / "deu.txt").is_file()
