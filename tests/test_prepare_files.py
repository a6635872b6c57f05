"""`seq2seq-prepare files` and `data=files`: your own corpus, any script, on tiny synthetic
corpora written in tmp_path (offline), ending with a short training run and a translation."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
from importlib import resources
from pathlib import Path

import pytest

from seq2seq.corpora import CleaningConfig, CorpusError, drop_reason, main
from seq2seq.metrics import bleu_tokenizer, corpus_scores
from seq2seq.prepare_files import PairFiles, prepare_files, read_pairs
from seq2seq.tokenizer import LARGE_ALPHABET_COVERAGE, choose_character_coverage, resolve_character_coverage

from .conftest import run_cli

GREEK = ["ο", "σκύλος", "τρέχει", "στο", "πάρκο", "η", "γάτα", "κοιμάται", "σπίτι", "μεγάλο"]
ENGLISH = ["the", "dog", "runs", "in", "park", "a", "cat", "sleeps", "house", "big"]
COMPRESS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}


def write(path: Path, lines: list[str], prefix: bytes = b"", end: str = "\n") -> Path:
    """Lines as UTF-8 (compressed when the name says so), each ending in `end`."""
    data = prefix + "".join(line + end for line in lines).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(COMPRESS.get(path.suffix, bytes)(data))
    return path


def read(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n")[:-1]


def pair(i: int, variant: int = 0) -> tuple[str, str]:
    """English and Greek sentences with the same number `i`: the pairing is visible in the text."""
    rng = random.Random(i)
    words = [rng.randrange(len(ENGLISH)) for _ in range(rng.randint(2, 6))]
    return (" ".join(ENGLISH[w] for w in words) + f" {i} .",
            " ".join(GREEK[w] for w in words) + f" {i} ." + " !" * variant)


def assert_aligned(out: Path, split: str, src: str = "en", tgt: str = "el") -> list[tuple[str, str]]:
    pairs = list(zip(read(out / f"{split}.{src}"), read(out / f"{split}.{tgt}"), strict=True))
    for source, target in pairs:
        assert source.split()[-2] == target.split()[-2 - target.count("!")], (source, target)
    return pairs


# --------------------------------------------------------------------------- alignment, inputs


def test_two_compressed_files_keep_their_alignment_and_every_line_is_fixed(tmp_path):
    pairs = [pair(i) for i in range(60)]
    sources = [s for s, _ in pairs]
    targets = [t for _, t in pairs]
    sources[3] = "the  dog\t\truns 3 ."                  # inner whitespace
    targets[4] = "  ο σκύλος 4 ."                         # edge whitespace (and every CRLF's \r, below)
    targets[5] = "ο σκύλος τρε\u0301χει 5 ."              # a decomposed accent: NFC makes it one character
    src = write(tmp_path / "in" / "corpus.en.xz", sources, prefix="\ufeff".encode())  # with a byte-order mark
    tgt = write(tmp_path / "in" / "corpus.el.gz", targets, end="\r\n")                # Windows line ends
    summary = prepare_files(tmp_path / "out", "en", "el", source_file=src, target_file=tgt,
                            valid_size=5, test_size=5)

    out, splits = tmp_path / "out", ("train", "valid", "test")
    written = dict(p for split in splits for p in assert_aligned(out, split))
    assert len(written) == 60 and written[sources[0]] == targets[0]       # the BOM is gone, not part of line 1
    assert written["the dog runs 3 ."] == targets[3]
    assert written[sources[4]] == "ο σκύλος 4 ." and written[sources[5]] == "ο σκύλος τρέχει 5 ."
    assert all("\r" not in target and "\ufeff" not in source for source, target in written.items())

    def fixed(lang: str, fix: str) -> int:
        return sum(summary["splits"][split]["fixed"][lang][fix] for split in splits)
    assert fixed("el", "edge_whitespace") == 60        # each \r once, line 4's spaces with it
    assert (fixed("el", "nfc"), fixed("en", "inner_whitespace"), fixed("en", "edge_whitespace")) == (1, 1, 0)
    assert sum(summary["splits"][split]["kept"] for split in splits) == 60
    assert summary["splits"]["train"]["kept"] == len(read(out / "train.en"))
    assert json.loads((out / "prepare.json").read_text("utf-8")) == summary
    assert summary["throughput"]["pairs"] == 60 and summary["throughput"]["pairs_per_second"] > 0
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2"])
def test_compressed_tsv_gives_what_the_plain_one_does(tmp_path, suffix):
    lines = ["\t".join(pair(i)) + "\tcolumn three, ignored" for i in range(40)]
    plain = prepare_files(tmp_path / "plain", "en", "el", tsv=write(tmp_path / "p.tsv", lines),
                          valid_size=4, test_size=4)
    packed = prepare_files(tmp_path / "packed", "en", "el", tsv=write(tmp_path / f"p.tsv{suffix}", lines),
                           valid_size=4, test_size=4)
    assert plain["splits"] == packed["splits"]
    for name in ("train.en", "train.el", "valid.el", "test.en"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "packed" / name).read_bytes()
    assert "column three" not in (tmp_path / "plain" / "train.el").read_text("utf-8")


def test_the_input_is_streamed_not_read_whole(tmp_path):
    """The first pairs come out before the reader has seen the rest of the file."""
    good = "".join("\t".join(pair(i)) + "\n" for i in range(3)).encode()
    path = tmp_path / "big.tsv"
    path.write_bytes(good + b"bad \xff byte\tx\n")
    pairs = read_pairs(PairFiles((path,)))
    assert next(pairs) == pair(0)
    with pytest.raises(CorpusError, match=rf"^{path}:4: invalid UTF-8"):
        list(pairs)


# --------------------------------------------------------------------------- cleaning


def test_every_drop_reason_is_counted_and_a_row_without_tab_shifts_nothing(tmp_path):
    rows = ["\t".join(pair(i)) for i in range(30)]
    rows[2] = "no tab in this row"                                   # malformed (and the rows after keep pairing)
    rows[3] = ""                                                     # a blank line: malformed too
    rows[4] = f"{pair(4)[0]}\t"                                      # empty target
    rows[5] = "@@\t" + pair(5)[1]                                    # placeholder
    rows[6] = "w " * 12 + "6 .\t" + "λ " * 12 + "6 ."                # too_long (max_len 10)
    rows[7] = "a b c d e f g 7 .\tτ 7"                               # ratio (9 words against 2, max 3)
    rows[8] = rows[9]                                                # duplicate (row 9 is the copy)
    rows[10] = f"{pair(25)[0]}\t{pair(25)[1]} !"                     # overlap: its source is in the test file
    rows[25] = "\t".join(pair(25))                                   # overlap again (same source)
    corpus = write(tmp_path / "c.tsv", rows)
    test = write(tmp_path / "test.tsv", ["\t".join(pair(25)), "\t".join(pair(100))])
    config = CleaningConfig(max_len=10, max_ratio=3.0)
    summary = prepare_files(tmp_path / "out", "en", "el", tsv=corpus, test_files=[test], valid_size=3,
                            cleaning=config)

    train = summary["splits"]["train"]
    assert train["dropped"] == {"malformed": 2, "empty": 1, "placeholder": 1, "too_long": 1, "ratio": 1,
                                "duplicate": 1, "overlap": 2}
    assert train["read"] + summary["splits"]["valid"]["read"] == 30
    assert train["kept"] + summary["splits"]["valid"]["kept"] == 30 - 9
    out = tmp_path / "out"
    written = assert_aligned(out, "train") + assert_aligned(out, "valid")
    # row 8 (a copy of row 9, so numbered 9) is kept, row 9 is its duplicate; 10 and 25 overlap the test file
    assert sorted(int(s.split()[-2]) for s, _ in written) == [0, 1, 9, *range(11, 25), *range(26, 30)]
    assert summary["splits"]["test"]["read"] == summary["splits"]["test"]["kept"] == 2
    assert summary["heldout"] == {"valid": "drawn: at least 3 pairs", "test": str(test)}


def test_given_heldout_files_never_lose_a_line(tmp_path):
    corpus = write(tmp_path / "c.tsv", ["\t".join(pair(i)) for i in range(20)])
    valid_src = ["@@", "", "w " * 300, pair(1)[0], pair(1)[0], " spaced  out "]
    valid_tgt = ["@@", "x", "y", pair(1)[1], pair(1)[1], "fine"]
    test_rows = [f"{pair(50)[0]}\t", "\t".join(pair(51)), "\t".join(pair(51))]   # an empty target stays
    summary = prepare_files(tmp_path / "out", "en", "el", tsv=corpus,
                            valid_files=[write(tmp_path / "dev.en", valid_src), write(tmp_path / "dev.el.bz2", valid_tgt)],
                            test_files=[write(tmp_path / "test.tsv.gz", test_rows)])
    out = tmp_path / "out"
    assert read(out / "valid.en") == ["@@", "", ("w " * 300).strip(), pair(1)[0], pair(1)[0], "spaced out"]
    assert read(out / "valid.el") == valid_tgt
    assert read(out / "test.en") == [pair(50)[0], pair(51)[0], pair(51)[0]]
    assert read(out / "test.el") == ["", pair(51)[1], pair(51)[1]]
    for split, n in (("valid", 6), ("test", 3)):
        stats = summary["splits"][split]
        assert stats["read"] == stats["kept"] == n and not any(stats["dropped"].values())
    # the training pair whose source is in valid went, and only it
    assert summary["splits"]["train"]["dropped"]["overlap"] == 1
    assert pair(1)[0] not in read(out / "train.en") and len(read(out / "train.en")) == 19

    no_tab = write(tmp_path / "bad.tsv", ["\t".join(pair(7)), "just one field"])
    with pytest.raises(CorpusError, match=rf"^{no_tab}:2: expected SOURCE<TAB>TARGET, found no TAB; "
                                          "held-out files never lose a line"):
        prepare_files(tmp_path / "out", "en", "el", tsv=corpus, valid_files=[no_tab])


def test_chinese_is_measured_by_characters_not_spaces(tmp_path):
    """A Chinese sentence has no spaces: as one 'word' its English translation would fail the ratio check."""
    config = CleaningConfig()
    english = "The little dog is running in the park with its owner ."
    chinese = "小狗和它的主人在公园里跑。"
    assert drop_reason([english, chinese], config) is None
    assert drop_reason([english, "狗"], CleaningConfig(max_ratio=2.0)) == "ratio"
    assert drop_reason(["a b", "猫" * 300], config) == "too_long"
    rows = [f"{english} {i}\t{chinese}{i}" for i in range(30)]
    summary = prepare_files(tmp_path / "out", "en", "zh", tsv=write(tmp_path / "zh.tsv", rows),
                            valid_size=3, test_size=3)
    assert not any(summary["splits"]["train"]["dropped"].values())
    assert read(tmp_path / "out" / "valid.zh")[0].startswith(chinese)


def test_bleu_splits_chinese_and_japanese_into_characters():
    """13a BLEU finds no words in text without spaces: the tokenizer follows the references' script."""
    assert bleu_tokenizer(["A dog runs .", "Ο σκύλος τρέχει ."]) == "13a"
    assert bleu_tokenizer(["小狗在公园里跑。", "A cat 猫"]) == "zh"
    assert bleu_tokenizer(["犬が公園で走っている。"]) == "char"          # Japanese: kana
    assert bleu_tokenizer(["สุนัขวิ่งในสวน"]) == "char"                    # Thai
    scores = corpus_scores(["小狗在公园跑。"], ["小狗在公园里跑。"])
    assert "tok:zh" in scores.bleu_signature and scores.bleu > 50          # 13a would give 0
    assert "tok:13a" in corpus_scores(["a dog runs ."], ["a dog runs ."]).bleu_signature


# --------------------------------------------------------------------------- held-out splits


def tsv_with_variants(n_sources: int) -> list[str]:
    """Up to three translations per source sentence: 2 * n_sources rows."""
    return ["\t".join(pair(i, v)) for i in range(n_sources) for v in range(1 + i % 3)]


def sources_of(out: Path) -> dict[str, set[str]]:
    return {split: set(read(out / f"{split}.en")) for split in ("train", "valid", "test")}


def test_drawn_heldout_is_disjoint_from_train_by_source_and_deterministic(tmp_path):
    rows = tsv_with_variants(300)
    write(tmp_path / "a.tsv", rows)
    summary = prepare_files(tmp_path / "a", "en", "el", tsv=tmp_path / "a.tsv", valid_size=50, test_size=40)
    split = sources_of(tmp_path / "a")
    assert not split["train"] & split["valid"] and not split["train"] & split["test"]
    assert not split["valid"] & split["test"]
    assert 50 <= summary["splits"]["valid"]["kept"] < 53 and 40 <= summary["splits"]["test"]["kept"] < 43
    assert sum(summary["splits"][s]["kept"] for s in ("train", "valid", "test")) == len(rows)
    for name in ("train", "valid", "test"):
        assert_aligned(tmp_path / "a", name)

    # the same file again: the same bytes; shuffled: the same sentences in each split
    prepare_files(tmp_path / "b", "en", "el", tsv=tmp_path / "a.tsv", valid_size=50, test_size=40)
    for name in ("train.en", "train.el", "valid.en", "valid.el", "test.en", "test.el"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    random.Random(3).shuffle(rows)
    write(tmp_path / "shuffled.tsv", rows)
    prepare_files(tmp_path / "c", "en", "el", tsv=tmp_path / "shuffled.tsv", valid_size=50, test_size=40)
    assert sources_of(tmp_path / "c") == split
    # another seed, another draw
    prepare_files(tmp_path / "d", "en", "el", tsv=tmp_path / "a.tsv", valid_size=50, test_size=40, seed=2)
    assert sources_of(tmp_path / "d")["valid"] != split["valid"]


def test_a_corpus_too_small_to_draw_from_is_refused_and_nothing_is_written(tmp_path):
    corpus = write(tmp_path / "c.tsv", ["\t".join(pair(i)) for i in range(10)])
    with pytest.raises(CorpusError, match=r"Corpus too small: 10 pairs .* cannot draw 1000 test and 1000 valid pairs"):
        prepare_files(tmp_path / "out", "en", "el", tsv=corpus)
    assert not (tmp_path / "out").exists()


def test_test_size_zero_makes_no_test_split_and_removes_an_old_one(tmp_path):
    corpus = write(tmp_path / "c.tsv", ["\t".join(pair(i)) for i in range(30)])
    prepare_files(tmp_path / "out", "en", "el", tsv=corpus, valid_size=3, test_size=3)
    assert (tmp_path / "out" / "test.en").is_file()
    summary = prepare_files(tmp_path / "out", "en", "el", tsv=corpus, valid_size=3, test_size=0)
    assert set(summary["splits"]) == {"train", "valid"}
    assert not (tmp_path / "out" / "test.en").exists() and not (tmp_path / "out" / "test.el").exists()


# --------------------------------------------------------------------------- bad input


def test_invalid_utf8_names_the_file_and_line_even_compressed_and_writes_nothing(tmp_path):
    lines = ["\t".join(pair(i)).encode() for i in range(5)]
    lines[3] = b"caf\xe9 in Latin-1\tx"
    path = tmp_path / "c.tsv.bz2"
    path.write_bytes(bz2.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(CorpusError, match=rf"^{path}:4: invalid UTF-8 \(invalid continuation byte, byte 0xe9\)"):
        prepare_files(tmp_path / "out", "en", "el", tsv=path, valid_size=1, test_size=1)
    assert not (tmp_path / "out").exists()

    broken = tmp_path / "cut.tsv.gz"
    broken.write_bytes(gzip.compress("\n".join("\t".join(pair(i)) for i in range(500)).encode())[:-30])
    with pytest.raises(CorpusError, match=rf"^{broken}: cannot read past line"):
        prepare_files(tmp_path / "out", "en", "el", tsv=broken, valid_size=1, test_size=1)


def test_unequal_line_counts_name_both_files(tmp_path):
    src = write(tmp_path / "c.en", [pair(i)[0] for i in range(6)])
    tgt = write(tmp_path / "c.el.gz", [pair(i)[1] for i in range(4)])
    with pytest.raises(CorpusError, match=rf"Line counts differ: {src} has 6 lines but {tgt} has 4 lines"):
        prepare_files(tmp_path / "out", "en", "el", source_file=src, target_file=tgt, valid_size=1, test_size=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["--tsv", "{c}", "--src", "e n", "--tgt", "el"], "Invalid language code 'e n' for --src"),
    (["--tsv", "{c}", "--src", "en", "--tgt", "en"], "--src and --tgt are both 'en'"),
    (["--tsv", "{c}", "--source-file", "{c}", "--src", "en", "--tgt", "el"], "Give either --tsv FILE or"),
    (["--source-file", "{c}", "--src", "en", "--tgt", "el"], "--source-file needs --target-file"),
    (["--src", "en", "--tgt", "el"], "Give your corpus as --tsv FILE, or as --source-file FILE --target-file FILE"),
    (["--tsv", "{c}", "--src", "en", "--tgt", "el", "--valid-files", "{c}", "--valid-size", "5"],
     "--valid-size draws valid pairs from the corpus, but --valid-files gives them"),
    (["--tsv", "{c}", "--src", "en", "--tgt", "el", "--test-files", "{c}", "{c}", "{c}"],
     "--test-files takes one TSV or two files (source, target), got 3"),
    (["--tsv", "{d}/nowhere.tsv", "--src", "en", "--tgt", "el"], "--tsv: missing input file: {d}/nowhere.tsv"),
])
def test_command_line_mistakes_name_the_value_and_write_nothing(tmp_path, capsys, args, expected):
    corpus = write(tmp_path / "c.tsv", ["\t".join(pair(i)) for i in range(5)])
    fill = {"c": str(corpus), "d": str(tmp_path)}
    out = tmp_path / "out"
    assert main(["files", *(a.format(**fill) for a in args), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected.format(**fill) in err and "Traceback" not in err
    assert not out.exists()


def test_the_summary_is_logged_with_the_throughput(tmp_path, caplog):
    corpus = write(tmp_path / "c.tsv", ["\t".join(pair(i)) for i in range(20)] + ["no tab"])
    assert main(["files", "--tsv", str(corpus), "--src", "en", "--tgt", "el", "--out", str(tmp_path / "out"),
                 "--valid-size", "2", "--test-size", "2"]) == 0
    assert f"files: {corpus} -> {tmp_path / 'out'}" in caplog.text    # stderr, from the console script
    assert "train: read 17, kept 16, dropped 1 (malformed 1)" in caplog.text and "pairs/s" in caplog.text
    prepare_files(tmp_path / "bar", "en", "el", tsv=corpus, valid_size=2, test_size=2, progress=True)  # with bars


# --------------------------------------------------------------------------- tokenizer, config, training


def test_character_coverage_follows_the_size_of_the_alphabet():
    greek_english = [" ".join(pair(i)) for i in range(200)]
    assert choose_character_coverage(greek_english)[0] == 1.0
    chinese = ["".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(20)) for i in range(400)]
    coverage, distinct = choose_character_coverage(chinese)
    assert coverage == LARGE_ALPHABET_COVERAGE == 0.9995 and distinct > 1000
    assert resolve_character_coverage("auto", chinese) == 0.9995
    assert resolve_character_coverage(0.98, chinese) == 0.98
    with pytest.raises(ValueError, match=r"tokenizer.character_coverage must be a number in \(0, 1\] or 'auto'.*got 'all'"):
        resolve_character_coverage("all", chinese)


def test_data_files_ships_in_the_package_and_chooses_the_coverage():
    from hydra import compose, initialize_config_module
    assert (resources.files("seq2seq.configs.data") / "files.yaml").is_file()
    with initialize_config_module(config_module="seq2seq.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=files", "data.dir=D", "data.src_lang=en",
                                                      "data.tgt_lang=el"])
    assert (cfg.data.dir, cfg.data.src_lang, cfg.data.tgt_lang, cfg.data.valid) == ("D", "en", "el", "valid")
    assert cfg.tokenizer.character_coverage == "auto" and cfg.name == "files-en-el"


def test_prepare_train_translate_end_to_end(tmp_path, monkeypatch):
    """Raw TSV -> prepared files -> two training steps of a tiny model -> a translation, through
    the console scripts (the prepare summary on stderr; test scores at the end of training)."""
    # one thread: on busy cores a second one spins waiting for its turn (2 steps took 18 s, not 0.3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write(tmp_path / "pairs.tsv.gz", tsv_with_variants(120) + ["no tab"])
    proc = run_cli(["seq2seq-prepare", "files", "--tsv", "pairs.tsv.gz", "--src", "en", "--tgt", "el",
                    "--out", "data/mine", "--valid-size", "5", "--test-size", "5"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "files: pairs.tsv.gz -> data/mine" in proc.stderr.decode() and "(malformed 1)" in proc.stderr.decode()
    run = tmp_path / "run"
    proc = run_cli(["seq2seq-train", "data=files", "data.dir=data/mine", "data.src_lang=en", "data.tgt_lang=el",
                    "trainer.max_steps=2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
                    "model.embedding_size=16", "model.encoder_hidden_size=16", "model.decoder_hidden_sizes=[16]",
                    "tokenizer.vocab_size=60", "evaluate.alpha=0.0", "evaluate.beam_size=1",
                    "train.batch_size=32", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["beam1"]["n_sentences"] == len(read(tmp_path / "data/mine/test.en")) >= 5
    assert "character_coverage 1" in (run / "train.log").read_text()   # a small alphabet: 1.0

    proc = run_cli(["seq2seq-translate", "--checkpoint", str(run / "model.pt"), pair(3)[0]], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode("utf-8").splitlines()) == 1
