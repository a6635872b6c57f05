"""The command lines: translate and evaluate, including bad input."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess

import pytest

from .conftest import console, run_cli


def test_translate_arguments_stdin_and_files_agree(toy, tmp_path):
    lines, refs = toy["lines"][:5], toy["refs"][:5]
    by_args = run_cli(["seq2seq-translate", "-c", toy["model"], *lines])
    by_stdin = run_cli(["seq2seq-translate", "-c", toy["model"], "--beam-size", "5"],
                       stdin=("\n".join(lines) + "\n").encode())
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    by_file = run_cli(["seq2seq-translate", "-c", toy["model"], "--input", str(tmp_path / "in.txt"),
                       "--output", str(tmp_path / "out.txt")])
    assert by_args.returncode == by_stdin.returncode == by_file.returncode == 0
    assert by_args.stdout.decode().splitlines() == refs
    assert by_stdin.stdout == by_args.stdout
    assert by_file.stdout == b""  # stdout carries translations only, and here they went to the file
    assert (tmp_path / "out.txt").read_text().splitlines() == refs


def test_blank_lines_give_blank_output_lines(toy):
    text = f"{toy['lines'][0]}\n\n   \n\t\n{toy['lines'][1]}\n"
    proc = run_cli(["seq2seq-translate", "-c", toy["model"]], stdin=text.encode())
    assert proc.stdout.decode().split("\n") == [toy["refs"][0], "", "", "", toy["refs"][1], ""]


def test_ten_thousand_bad_lines_give_ten_thousand_outputs(toy, tmp_path):
    good = toy["lines"][0].encode()
    kinds = [good, b"", b"   ", b"\xff\xfe broken \xc3", b" ".join([good] * 60), "ünïcödé ✓".encode(),
             b"\t" + good + b"\t", b"\r"]
    raw = b"\n".join(kinds[i % len(kinds)] for i in range(10_000)) + b"\n"
    (tmp_path / "bad.txt").write_bytes(raw)
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--beam-size", "1", "--batch-size", "256",
                    "--input", str(tmp_path / "bad.txt"), "--output", str(tmp_path / "out.txt")])
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = (tmp_path / "out.txt").read_text().split("\n")
    assert len(out) == 10_001 and out[-1] == ""
    assert out[0] == toy["refs"][0] and out[1] == out[2] == ""
    assert b"bad.txt:4: invalid UTF-8" in proc.stderr
    assert b"input line 5:" in proc.stderr and b"cropped" in proc.stderr


def test_nbest_and_json_formats(toy):
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--nbest", "3", toy["lines"][0], ""])
    rows = [line.split("\t") for line in proc.stdout.decode().splitlines()]
    assert [(r[0], r[1]) for r in rows[:3]] == [("1", "1"), ("1", "2"), ("1", "3")]
    assert rows[0][3] == toy["refs"][0]
    assert float(rows[0][2]) >= float(rows[1][2]) >= float(rows[2][2])
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--json", "--nbest", "2", toy["lines"][0]])
    obj = json.loads(proc.stdout)
    assert obj["translation"] == toy["refs"][0] and len(obj["hypotheses"]) == 2


def test_evaluate_prints_scores_with_signatures(toy):
    proc = run_cli(["seq2seq-evaluate", "-c", toy["model"], "--source", str(toy["src"]),
                    "--reference", str(toy["tgt"]), "--beam-size", "5", "--json"])
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["n_sentences"] == len(toy["lines"]) and result["beam_size"] == 5
    assert result["bleu"] >= 90 and "tok:13a" in result["bleu_signature"] and "nc:6" in result["chrf_signature"]
    text = run_cli(["seq2seq-evaluate", "--hypothesis", str(toy["tgt"]), "--reference", str(toy["tgt"])])
    assert text.stdout.decode().startswith("BLEU = 100.00  (nrefs:1|case:mixed")


def test_evaluate_line_count_mismatch_names_both_files(toy, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(toy["refs"][:10]) + "\n")
    proc = run_cli(["seq2seq-evaluate", "--hypothesis", str(short), "--reference", str(toy["tgt"])])
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    msg = proc.stderr.decode()
    assert f"{short} has 10 lines" in msg and f"{toy['tgt']} has {len(toy['refs'])}" in msg


@pytest.mark.parametrize("flag", ["--reference", "--source"])
def test_missing_files_exit_2_without_traceback(toy, flag, tmp_path):
    args = {"--source": str(toy["src"]), "--reference": str(toy["tgt"])}
    args[flag] = str(tmp_path / "nope.txt")
    proc = run_cli(["seq2seq-evaluate", "-c", toy["model"], *[x for kv in args.items() for x in kv]])
    assert proc.returncode == 2
    assert b"Traceback" not in proc.stderr and b"nope.txt" in proc.stderr


def test_bad_flag_values_are_refused(toy):
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--beam-size", "2", "--nbest", "3", "x"])
    assert proc.returncode == 2 and b"--nbest must be between 1 and --beam-size (2)" in proc.stderr


def test_more_bad_input_is_one_line_and_exit_code_2(toy, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["seq2seq-evaluate", "--hypothesis", str(empty), "--reference", str(empty)], f"{empty} is empty"),
        (["seq2seq-translate", "-c", toy["model"], "--output", str(tmp_path), "x"], "is a directory"),
        (["seq2seq-translate", "-c", toy["model"], "--input", str(tmp_path)], "expects a file, got a directory"),
        (["seq2seq-translate", "-c", toy["model"], "--max-source-len", "0", "x"], "--max-source-len must be >= 1"),
    ]
    for args, expected in cases:
        proc = run_cli(args)
        assert proc.returncode == 2 and b"Traceback" not in proc.stderr, (args, proc.stderr.decode()[-2000:])
        assert expected in proc.stderr.decode(), args


def test_invalid_utf8_arguments_a_byte_order_mark_and_a_pipe_as_input(toy, tmp_path):
    line = toy["lines"][0]
    plain = run_cli(["seq2seq-translate", "-c", toy["model"], "--quiet"], stdin=(line + "\n").encode())
    assert plain.returncode == 0
    # an argument with a byte that is not UTF-8: translated as U+FFFD, with a warning, no traceback
    bad = run_cli(["seq2seq-translate", "-c", toy["model"], os.fsdecode(line.encode() + b" \xff")])
    assert bad.returncode == 0 and len(bad.stdout.decode().splitlines()) == 1, bad.stderr.decode()[-2000:]
    assert b"argument 1: invalid UTF-8" in bad.stderr
    # a file that opens with a byte-order mark translates as the same file without it
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + (line + "\n").encode())
    with_bom = run_cli(["seq2seq-translate", "-c", toy["model"], "--quiet", "--input", str(bom)])
    assert with_bom.stdout == plain.stdout
    # --input may be a pipe, not only a regular file
    piped = run_cli(["seq2seq-translate", "-c", toy["model"], "--quiet", "--input", "/dev/stdin"],
                    stdin=(line + "\n").encode())
    assert piped.returncode == 0 and piped.stdout == plain.stdout, piped.stderr.decode()[-2000:]


def test_a_terminal_gets_each_translation_as_its_line_is_entered(toy):
    lines = toy["lines"][:2]
    piped = run_cli(["seq2seq-translate", "-c", toy["model"], "--quiet"], stdin=("\n".join(lines) + "\n").encode())
    expected = piped.stdout.decode().splitlines()
    assert piped.returncode == 0 and len(expected) == 2, piped.stderr.decode()[-2000:]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([console("seq2seq-translate"), "-c", toy["model"], "--quiet"], stdin=terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        for line, want in zip(lines, expected):
            os.write(controller, (line + "\n").encode())
            # the answer must come while the terminal waits for the next line (not after 4,096 lines)
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "no translation of a typed line within 60 s"
            assert proc.stdout.readline().decode().rstrip("\n") == want
        os.write(controller, b"\x04")   # Ctrl-D: end of input
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)


def test_output_is_utf8_whatever_the_locale_encoding(toy):
    """An ASCII locale must not stop a run at the first character it cannot encode."""
    src, tgt = toy["lines"][0], toy["refs"][0]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run([console("seq2seq-translate"), "-c", toy["model"], "--score", "--json"],
                          input=f"{src}\t{tgt}\n".encode(), capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    tokens = json.loads(proc.stdout.decode("utf-8"))["tokens"]
    assert any("\u2581" in t for t in tokens)      # SentencePiece's word marker, written as UTF-8
