"""seq2seq-serve: the JSON API, its limits, the dynamic batcher, and a graceful stop.

API tests drive the app in-process through FastAPI's TestClient; only the SIGTERM, worker
and load-test tests (and tests/test_browser.py) start a real uvicorn process.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from seq2seq.batcher import Batcher, BatcherUnavailable, DecoderStats
from seq2seq.search import SearchOptions
from seq2seq.serve import ServeSettings, create_app, main
from seq2seq.translate import Translator
from seq2seq.workers import ConnectionBalancer, StatsBoard

from .conftest import console

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ServeSettings(max_batch_sentences=16, batch_wait_ms=5, max_sentences=8, max_chars=200,
                       max_body_bytes=4000, timeout_s=30, max_beam=6)


@pytest.fixture(scope="module")
def model_path(toy_run) -> Path:
    return toy_run["model"]


@pytest.fixture(scope="module")
def sentences(toy_run) -> list[str]:
    return (toy_run["data"] / "test.src").read_text().splitlines()[:16]


@pytest.fixture(scope="module")
def translator(model_path) -> Translator:
    return Translator.from_checkpoint(model_path)


@pytest.fixture(scope="module")
def client(model_path):
    with TestClient(create_app(model_path, LIMITS)) as c:
        yield c


def offline(translator: Translator, lines: list[str], **options):
    return translator.translate_hypotheses(lines, SearchOptions(**options))


# ---- results --------------------------------------------------------------------------

def test_translations_equal_the_offline_translator_with_blanks_kept_in_place(client, translator, sentences):
    text = [sentences[0], "", sentences[1], "   ", sentences[2], "\u200b", "\ufeff"]   # the last two: no subwords
    r = client.post("/translate", json={"text": text, "beam_size": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = offline(translator, text, beam_size=5)
    assert body["translations"] == [h[0].text for h in expected]
    assert body["translations"][1] == body["translations"][3] == body["translations"][5] == body["translations"][6] == ""
    assert body["scores"] == pytest.approx([h[0].score for h in expected], abs=1e-4)
    assert body["model"] == "model.pt" and body["elapsed_ms"] > 0 and body["attention"] is None


def test_a_lone_surrogate_is_translated_as_the_replacement_character_not_a_500(client, translator, sentences):
    # valid JSON, not valid text: it must neither fail the request nor the others decoded with it
    body = '{"text": ["\\ud800 ' + sentences[0] + '", "' + sentences[1] + '"], "beam_size": 5}'
    r = client.post("/translate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    expected = offline(translator, ["\ufffd " + sentences[0], sentences[1]], beam_size=5)
    assert r.json()["translations"] == [h[0].text for h in expected]


def test_int8_service_equals_the_offline_int8_translator(model_path, sentences):
    """int8 quantizes with fixed scales: batching with other requests changes nothing."""
    offline_int8 = Translator.from_checkpoint(model_path, precision="int8")
    with TestClient(create_app(model_path, LIMITS, precision="int8")) as c:
        assert c.get("/info").json()["service"]["precision"] == "int8"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda i: c.post("/translate", json={"text": sentences[i:i + 4], "beam_size": 3}),
                                   range(0, 16, 4)))
    got = [t for r in bodies for t in r.json()["translations"]]
    assert got == [h[0].text for h in offline(offline_int8, sentences, beam_size=3)]


def test_nbest_gives_each_sentence_a_list_best_first(client, translator, sentences):
    text = [sentences[3], "", sentences[4]]
    r = client.post("/translate", json={"text": text, "beam_size": 4, "nbest": 3})
    assert r.status_code == 200, r.text
    expected = offline(translator, text, beam_size=4, nbest=3)
    body = r.json()
    assert body["translations"] == [[t.text for t in h] for h in expected]
    assert body["translations"][1] == [""] and body["scores"][1] == [0.0]
    assert all(len(s) == 3 and s == sorted(s, reverse=True) for s in (body["scores"][0], body["scores"][2]))


def test_attention_of_the_first_sentence_with_its_subwords(client, translator, sentences):
    text = [sentences[5], sentences[6]]
    r = client.post("/translate", json={"text": text, "beam_size": 3, "attention": True})
    assert r.status_code == 200, r.text
    attention = r.json()["attention"]
    first = translator.translate_hypotheses(text[:1], SearchOptions(beam_size=3), return_attention=True)[0][0]
    assert attention["source"] == first.source_pieces and attention["source"][-1] == "</s>"
    assert attention["target"][:len(first.pieces)] == first.pieces
    weights = attention["weights"]
    assert len(weights) == len(attention["target"]) and {len(row) for row in weights} == {len(attention["source"])}
    np.testing.assert_allclose(weights, first.attention.numpy(), atol=1e-4)
    assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in weights)
    blank_first = client.post("/translate", json={"text": ["", sentences[5]], "attention": True})
    assert blank_first.json()["attention"] is None


# ---- refusals: a 4xx with a JSON body, and the service answers the next request --------

BAD_REQUESTS = [
    pytest.param({"json": {"text": ["kime"] * 9}}, 413,
                 {"error": "too many sentences", "limit": "max_sentences", "value": 8}, id="max_sentences"),
    pytest.param({"json": {"text": ["kime " * 41]}}, 413,
                 {"error": "sentence too long", "limit": "max_chars", "value": 200}, id="max_chars"),
    pytest.param({"content": json.dumps({"text": ["kime"] * 2000}), "headers": {"content-type": "application/json"}},
                 413, {"error": "request body too large", "limit": "max_body_bytes", "value": 4000}, id="max_body_bytes"),
    pytest.param({"json": {"text": ["kime"], "beam_size": 7}}, 422, {"limit": "max_beam", "value": 6}, id="beam_too_big"),
    pytest.param({"json": {"text": ["kime"], "beam_size": 0}}, 422, {"limit": "max_beam", "value": 6}, id="beam_zero"),
    pytest.param({"json": {"text": ["kime"], "beam_size": 2, "nbest": 3}}, 422,
                 {"error": "nbest must be between 1 and beam_size (2), got 3"}, id="nbest_over_beam"),
    pytest.param({"json": {"text": ["kime"], "beam": 5}}, 422, {"error": "invalid request"}, id="unknown_field"),
    pytest.param({"json": {"text": "kime"}}, 422, {"error": "invalid request"}, id="text_not_a_list"),
    pytest.param({"json": {"text": ["kime"], "beam_size": "5"}}, 422, {"error": "invalid request"}, id="beam_a_string"),
    pytest.param({"json": {"text": ["kime"], "normalisation": "gmnt"}}, 422, {"error": "invalid request"},
                 id="unknown_normalisation"),
    pytest.param({"content": b'{"text": ["kime"], "alpha": Infinity}', "headers": {"content-type": "application/json"}},
                 422, {"error": "invalid request"}, id="alpha_infinite"),
    pytest.param({"json": ["kime"]}, 422, {"error": "invalid request"}, id="not_an_object"),
    pytest.param({"json": {}}, 422, {"error": "invalid request"}, id="no_text"),
    pytest.param({"content": b'{"text": ["kime"', "headers": {"content-type": "application/json"}}, 400,
                 {"error": "invalid JSON"}, id="invalid_json"),
    pytest.param({"content": b"text=kime", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415,
                 {"value": "application/x-www-form-urlencoded"}, id="a_form"),
]


@pytest.mark.parametrize("request_args, status, expected", BAD_REQUESTS)
def test_a_bad_request_is_a_4xx_json_answer_and_the_service_goes_on(client, sentences, request_args, status, expected):
    r = client.post("/translate", **request_args)
    assert r.status_code == status, r.text
    body = r.json()
    assert body.items() >= expected.items(), body
    after = client.post("/translate", json={"text": sentences[:1]})  # a sentence of the toy task itself
    assert after.status_code == 200 and after.json()["translations"][0]


def test_a_timed_out_request_is_408_and_its_sentences_are_never_decoded(model_path, sentences):
    slow = ServeSettings(batch_wait_ms=400, timeout_s=0.1)
    with TestClient(create_app(model_path, slow)) as c:
        r = c.post("/translate", json={"text": sentences[:3]})
        assert r.status_code == 408
        assert r.json() == {"error": "request timed out", "limit": "timeout_s", "value": 0.1}
        time.sleep(0.5)                     # past the waiting window: the batch would have run by now
        batcher = c.app.state.batcher
        assert batcher.pending == 0 and len(batcher.batches) == 0
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["queued_sentences"] == 0
        assert health["decoder"]["sentences"] == health["decoder"]["steps"] == 0


def test_a_decoding_failure_is_a_500_json_answer_and_the_worker_lives_on(model_path, sentences, monkeypatch):
    broken = Translator.from_checkpoint(model_path)
    real_stream = broken.stream
    failures = iter([RuntimeError("out of memory (simulated)")])

    def stream_failing_once(*args, **kwargs):
        stream = real_stream(*args, **kwargs)
        step = stream.step

        def fail_once():
            error = next(failures, None)
            if error is not None:
                raise error
            return step()
        stream.step = fail_once
        return stream

    monkeypatch.setattr(broken, "stream", stream_failing_once)
    with TestClient(create_app(broken, LIMITS)) as c:
        r = c.post("/translate", json={"text": sentences[:2]})
        assert r.status_code == 500
        assert r.json() == {"error": "translation failed", "detail": "RuntimeError: out of memory (simulated)"}
        again = c.post("/translate", json={"text": sentences[:2]})
        assert again.status_code == 200
        assert again.json()["translations"] == [h[0].text for h in offline(broken, sentences[:2])]
        assert c.get("/info").status_code == 404    # built from a Translator without a card
        assert c.get("/health").status_code == 200
        c.app.state.batcher.close()
        assert c.get("/health").status_code == 503  # a health check that notices a dead worker


# ---- the other endpoints -----------------------------------------------------------------

def test_health_info_openapi_and_the_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queued_sentences"] == 0
    assert set(health["decoder"]) == {"sentences", "steps", "sentence_steps", "mean_batch_sentences",
                                      "joins", "busy_s", "uptime_s"}
    info = client.get("/info").json()
    assert info["parameters"] > 0 and info["src_lang"] == "src" and info["tgt_lang"] == "tgt"
    assert "best_val" in info and info["service"]["max_beam"] == 6 and info["service"]["precision"] == "float32"
    spec = client.get("/openapi.json").json()
    assert "/translate" in spec["paths"] and "beam_size" in json.dumps(spec["components"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="heatmap"' in page.text and 'fetch("/translate"' in page.text
    assert "http://" not in page.text and "https://" not in page.text   # works offline: nothing fetched from elsewhere


# ---- the batcher -----------------------------------------------------------------------------

def test_concurrent_requests_share_a_batch_and_get_the_offline_results(model_path, translator, sentences):
    app = create_app(model_path, ServeSettings(max_batch_sentences=64, batch_wait_ms=300))
    requests = [sentences[i:i + 2] for i in range(0, 16, 2)]
    with TestClient(app) as c, ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda text: c.post("/translate", json={"text": text, "beam_size": 5}), requests))
        records = list(app.state.batcher.batches)
    assert all(a.status_code == 200 for a in answers)
    for text, answer in zip(requests, answers):
        assert answer.json()["translations"] == [h[0].text for h in offline(translator, text, beam_size=5)]
    assert max(r.requests for r in records) > 1, records
    assert sum(r.sentences for r in records) == sum(len(t) for t in requests)


def test_the_waiting_window_holds_a_sentence_for_company_and_a_full_batch_goes_at_once(translator, sentences):
    with Batcher(translator, max_batch_sentences=4, max_wait_ms=600) as batcher:
        first = batcher.submit(sentences[:1], SearchOptions(beam_size=2))
        time.sleep(0.2)
        assert not first.done()                         # still waiting inside its window
        second = batcher.submit(sentences[1:2], SearchOptions(beam_size=2))
        both = first.result(timeout=30) + second.result(timeout=30)
    assert [h[0].text for h in both] == [h[0].text for h in offline(translator, sentences[:2], beam_size=2)]
    assert [(r.sentences, r.requests) for r in batcher.batches] == [(2, 2)]
    with Batcher(translator, max_batch_sentences=4, max_wait_ms=60_000) as batcher:
        full = batcher.submit(sentences[:4], SearchOptions(beam_size=2))
        assert len(full.result(timeout=30)) == 4       # four sentences fill the batch: no minute-long wait


def test_a_batch_never_mixes_search_options(translator, sentences):
    with Batcher(translator, max_batch_sentences=64, max_wait_ms=300) as batcher:
        greedy = batcher.submit(sentences[:3], SearchOptions(beam_size=1))
        beams = batcher.submit(sentences[3:6], SearchOptions(beam_size=5, nbest=3))
        greedy_again = batcher.submit(sentences[6:8], SearchOptions(beam_size=1))
        results = [f.result(timeout=30) for f in (greedy, beams, greedy_again)]
    assert [[t.text for t in h] for h in results[0]] == [[t.text for t in h] for h in
                                                         offline(translator, sentences[:3], beam_size=1)]
    assert [[t.text for t in h] for h in results[1]] == [[t.text for t in h] for h in
                                                         offline(translator, sentences[3:6], beam_size=5, nbest=3)]
    assert all(len(h) == 1 for h in results[0] + results[2]) and all(len(h) == 3 for h in results[1])
    # the two greedy requests shared a batch; the beam request ran alone
    assert sorted((r.sentences, r.requests) for r in batcher.batches) == [(3, 1), (5, 2)]


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order(translator, sentences):
    text = sentences[:7]
    with Batcher(translator, max_batch_sentences=3, max_wait_ms=0) as batcher:
        result = batcher.submit(text, SearchOptions(beam_size=2)).result(timeout=30)
    assert [h[0].text for h in result] == [h[0].text for h in offline(translator, text, beam_size=2)]
    records = list(batcher.batches)
    assert records[0].sentences == 3 and sum(r.sentences for r in records) == 7
    assert max(r.live_after for r in records) == 3      # never more than max_batch_sentences in flight
    assert batcher.stats.sentences == 7 and batcher.stats.steps > 0


class GatedStreams:
    """A translator whose streams hold their first step until `gate` is set."""

    def __init__(self, translator: Translator):
        self.translator, self.gate, self.first_step = translator, threading.Event(), threading.Event()

    def stream(self, options, *, return_attention=False):
        stream = self.translator.stream(options, return_attention=return_attention)
        step = stream.step

        def gated_step():
            self.first_step.set()
            assert self.gate.wait(30)
            return step()
        stream.step = gated_step
        return stream


def test_a_stream_refuses_a_tag_twice_and_answers_lines_without_subwords_at_once(translator, sentences):
    stream = translator.stream(SearchOptions(beam_size=3))
    with pytest.raises(ValueError, match="tags must be distinct"):
        stream.add(sentences[:2], tags=["x", "x"])
    assert stream.live == 0
    stream.add([sentences[0], "\u200b"], tags=["a", "zw"])
    with pytest.raises(ValueError, match="tags must be distinct"):
        stream.add([sentences[1]], tags=["zw"])       # still in flight
    done = dict(stream.step())
    assert done["zw"][0].text == "" and stream.tags == ["a"]
    while stream.live:
        done.update(stream.step())
    assert done["a"][0].text == offline(translator, sentences[:1], beam_size=3)[0][0].text


def test_a_sentence_joins_a_running_stream_at_its_next_step(translator, sentences):
    gated = GatedStreams(translator)
    with Batcher(gated, max_batch_sentences=8, max_wait_ms=0, join_group=1) as batcher:
        first = batcher.submit(sentences[:2], SearchOptions(beam_size=3))
        assert gated.first_step.wait(30)                # decoding has started ...
        second = batcher.submit(sentences[2:3], SearchOptions(beam_size=3))
        gated.gate.set()                                # ... and the new sentence joins it
        results = first.result(timeout=30) + second.result(timeout=30)
    assert [h[0].text for h in results] == [h[0].text for h in offline(translator, sentences[:3], beam_size=3)]
    assert [(r.sentences, r.requests, r.live_after) for r in batcher.batches] == [(2, 1, 2), (1, 1, 3)]


@pytest.mark.parametrize("group, wait_ms, joiners, records", [
    (2, 60_000, 2, [(2, 1, 2), (2, 2, 4)]),   # a group of two is queued: it joins at the next step
    (2, 60_000, 1, [(2, 1, 2), (1, 1, 1)]),   # one alone waits (the window is long) and starts afresh
    (8, 0, 1, [(2, 1, 2), (1, 1, 3)]),        # alone, but it has waited its window: it joins
], ids=["group_joins", "too_few_wait", "waited_joins"])
def test_sentences_join_a_running_stream_in_groups(translator, sentences, group, wait_ms, joiners, records):
    gated = GatedStreams(translator)
    with Batcher(gated, max_batch_sentences=8, max_wait_ms=0, join_group=group, join_wait_ms=wait_ms) as batcher:
        first = batcher.submit(sentences[:2], SearchOptions(beam_size=3))
        assert gated.first_step.wait(30)                # decoding has started; these queue meanwhile
        later = [batcher.submit(sentences[2 + i:3 + i], SearchOptions(beam_size=3)) for i in range(joiners)]
        gated.gate.set()
        results = first.result(timeout=30) + [f.result(timeout=30)[0] for f in later]
    assert [h[0].text for h in results] == [h[0].text for h in
                                           offline(translator, sentences[:2 + joiners], beam_size=3)]
    assert [(r.sentences, r.requests, r.live_after) for r in batcher.batches] == records
    assert batcher.stats.joins == len(records)


class PoisonedStreams(GatedStreams):
    """Gated streams whose `add` fails for any group holding a sentence with "POISON" in it."""

    def stream(self, options, *, return_attention=False):
        stream = super().stream(options, return_attention=return_attention)
        add = stream.add

        def poisoned_add(lines, tags, line_numbers=None):
            if any("POISON" in line for line in lines):
                raise ValueError("cannot encode POISON (simulated)")
            return add(lines, tags, line_numbers)
        stream.add = poisoned_add
        return stream


def test_a_sentence_that_cannot_start_fails_its_own_request_not_those_joining_with_it(translator, sentences):
    poisoned = PoisonedStreams(translator)
    with Batcher(poisoned, max_batch_sentences=8, max_wait_ms=0, join_group=3, join_wait_ms=60_000) as batcher:
        first = batcher.submit(sentences[:2], SearchOptions(beam_size=3))
        assert poisoned.first_step.wait(30)             # decoding has started; these three queue as one group
        good = batcher.submit(sentences[2:3], SearchOptions(beam_size=3))
        bad = batcher.submit(["POISON " + sentences[3]], SearchOptions(beam_size=3))
        also_good = batcher.submit(sentences[4:5], SearchOptions(beam_size=3))
        poisoned.gate.set()
        results = first.result(timeout=30) + good.result(timeout=30) + also_good.result(timeout=30)
        with pytest.raises(ValueError, match="cannot encode POISON"):
            bad.result(timeout=30)
    want = offline(translator, sentences[:3] + sentences[4:5], beam_size=3)
    assert [h[0].text for h in results] == [h[0].text for h in want]


def test_a_request_given_up_in_flight_leaves_the_decoder(translator, sentences):
    gated = GatedStreams(translator)
    with Batcher(gated, max_batch_sentences=8, max_wait_ms=0) as batcher:
        doomed = batcher.submit(sentences[:4], SearchOptions(beam_size=3))
        assert gated.first_step.wait(30)
        doomed.cancel()                                 # what a timed-out request does
        gated.gate.set()
        later = batcher.submit(sentences[4:5], SearchOptions(beam_size=3)).result(timeout=30)
    assert later[0][0].text == offline(translator, sentences[4:5], beam_size=3)[0][0].text
    # the cancelled sentences took the one step already running, then left: the next
    # sentence started a stream of its own instead of joining four others
    assert [(r.sentences, r.live_after) for r in batcher.batches] == [(4, 4), (1, 1)]


def test_greedy_answers_score_as_offline_greedy_search_does(translator, sentences):
    options = dict(beam_size=1, alpha=0.6, normalisation="average")   # greedy ignores normalisation
    with Batcher(translator, max_wait_ms=0) as batcher:
        served = batcher.submit(sentences[:4], SearchOptions(**options)).result(timeout=30)
    expected = offline(translator, sentences[:4], **options)
    assert [h[0].text for h in served] == [h[0].text for h in expected]
    assert [h[0].score for h in served] == pytest.approx([h[0].score for h in expected], abs=1e-4)


def test_different_options_decode_side_by_side_without_draining(translator, sentences):
    gated = GatedStreams(translator)
    with Batcher(gated, max_batch_sentences=8, max_wait_ms=0, join_group=1) as batcher:
        beams = batcher.submit(sentences[:2], SearchOptions(beam_size=3))
        assert gated.first_step.wait(30)
        greedy = batcher.submit(sentences[2:4], SearchOptions(beam_size=1))
        gated.gate.set()
        results = greedy.result(timeout=30) + beams.result(timeout=30)
    assert [h[0].text for h in results] == [h[0].text for h in offline(translator, sentences[2:4], beam_size=1)
                                           + offline(translator, sentences[:2], beam_size=3)]
    # the greedy sentences started while the beam sentences were in flight
    assert [(r.sentences, r.live_after) for r in batcher.batches] == [(2, 2), (2, 4)]


def test_a_worker_that_dies_answers_everyone_and_refuses_more(translator, sentences):
    batcher = Batcher(translator, max_wait_ms=50)

    def bug(*args):
        raise RuntimeError("a bug in the worker")
    batcher._join = bug
    batcher.start()
    future = batcher.submit(sentences[:2], SearchOptions())
    with pytest.raises(BatcherUnavailable, match="the decoding worker stopped: RuntimeError: a bug in the worker"):
        future.result(timeout=30)
    batcher._thread.join(timeout=30)
    assert not batcher.alive
    with pytest.raises(BatcherUnavailable):
        batcher.submit(sentences[:1], SearchOptions())


def test_batcher_refuses_what_it_cannot_serve_faithfully(translator):
    with pytest.raises(ValueError, match="sampling is not batched"):
        Batcher(translator).submit(["kime"], SearchOptions(beam_size=1, sample=True))
    with pytest.raises(ValueError, match="max_batch_sentences must be >= 1, got 0"):
        Batcher(translator, max_batch_sentences=0)
    with pytest.raises(ValueError, match="join_group must be >= 1, got 0"):
        Batcher(translator, join_group=0)
    with pytest.raises(ValueError, match="join_wait_ms must be >= 0, got -1"):
        Batcher(translator, join_wait_ms=-1)
    blank = Batcher(translator).submit(["", " "], SearchOptions())   # never started: blanks need no model
    assert [h[0].text for h in blank.result(timeout=1)] == ["", ""]


def test_a_stopped_batcher_refuses_at_once_and_the_api_answers_503(model_path, translator, sentences):
    with pytest.raises(BatcherUnavailable, match="worker is not running"):
        Batcher(translator).submit(sentences[:1], SearchOptions())      # never started
    with TestClient(create_app(model_path, LIMITS)) as c:
        c.app.state.batcher.close()                                      # the worker is gone
        r = c.post("/translate", json={"text": sentences[:2]})
        assert r.status_code == 503, r.text
        assert r.json() == {"error": "service unavailable", "detail": "the batcher is closing"}
        assert c.get("/health").status_code == 503


# ---- the command line ------------------------------------------------------------------------

def test_bad_flags_and_checkpoints_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: not a valid seq2seq checkpoint:")
    assert main(["--checkpoint", "x.pt", "--timeout", "0"]) == 2
    assert capsys.readouterr().err == "error: --timeout must be > 0, got 0.0\n"
    assert main(["--checkpoint", "x.pt", "--max-sentences", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-sentences must be >= 1, got 0\n"
    assert main(["--checkpoint", "x.pt", "--join-wait-ms", "-5"]) == 2
    assert capsys.readouterr().err == "error: --join-wait-ms must be >= 0, got -5.0\n"
    assert main(["--checkpoint", "x.pt", "--join-group", "0"]) == 2
    assert capsys.readouterr().err == "error: --join-group must be >= 1, got 0\n"
    assert main(["--checkpoint", "x.pt", "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --workers must be >= 1, got 0\n"
    assert main(["--checkpoint", "x.pt", "--threads", "0"]) == 2
    assert capsys.readouterr().err == "error: --threads must be >= 1, got 0\n"
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--workers", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: not a valid seq2seq checkpoint:")
    assert main(["--checkpoint", "x.pt", "--precision", "int8", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --precision int8 --device cuda: precision int8 runs on the CPU only")
    with pytest.raises(ValueError, match="max_beam must be >= 1, got 0"):
        ServeSettings(max_beam=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, *flags: str, startup_timeout: float = 120):
    """A real `seq2seq-serve` process on a free loopback port; yields (process, base URL)."""
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([console("seq2seq-serve"), "--checkpoint", str(model), "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"seq2seq-serve exited with {proc.returncode}:\n{proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"seq2seq-serve did not answer within {startup_timeout} s")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_sigterm_finishes_the_request_in_flight_then_exits_0(model_path, translator, sentences):
    # a long waiting window keeps the request in flight while the signal arrives
    with running_server(model_path, "--batch-wait-ms", "1500") as (proc, url):
        answer = {}
        request = threading.Thread(target=lambda: answer.update(
            r=httpx.post(f"{url}/translate", json={"text": sentences[:2]}, timeout=60)))
        request.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=5).json()["queued_sentences"] < 2:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-3000:]
    r = answer["r"]
    assert r.status_code == 200
    assert r.json()["translations"] == [h[0].text for h in offline(translator, sentences[:2], beam_size=5)]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for(condition, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        time.sleep(0.05)
    return value


def both_up(url: str) -> list[int]:
    """The two workers' pids, once both have started (a worker's row is zero until then)."""
    pids = wait_for(lambda: all(p := [w["pid"] for w in httpx.get(f"{url}/health").json()["workers"]]) and p,
                    timeout=60, what="both workers publishing")
    time.sleep(0.5)   # a worker publishes as its app starts, a moment before its socket listens
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux's SO_REUSEPORT")
def test_workers_share_the_port_answer_as_offline_and_health_sums_them(model_path, translator, sentences):
    with running_server(model_path, "--workers", "2", "--threads", "1") as (proc, url):
        both_up(url)
        # a fresh connection per request: the kernel spreads connections over the workers
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda s: httpx.post(f"{url}/translate", json={"text": [s]}, timeout=60),
                                    sentences[:8] * 3))
        assert [a.status_code for a in answers] == [200] * 24
        expected = [h[0].text for h in offline(translator, sentences[:8], beam_size=5)] * 3
        assert [a.json()["translations"][0] for a in answers] == expected
        health = wait_for(lambda: (h := httpx.get(f"{url}/health").json())["decoder"]["sentences"] == 24 and h,
                          what="/health counting all 24 sentences")
        assert health["decoder"]["workers"] == 2 and len(health["workers"]) == 2
        assert all(w["sentences"] > 0 for w in health["workers"]), health["workers"]   # both served
        pids = [w["pid"] for w in health["workers"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-3000:]
    assert all(gone(pid) for pid in pids)


def test_health_of_several_workers_is_503_while_any_of_their_decoders_is_stopped(model_path, translator):
    import multiprocessing

    board = StatsBoard(2, multiprocessing.get_context("spawn"))
    app = create_app(model_path, LIMITS, board=(board, 0))
    with TestClient(app) as c:
        assert c.get("/health").json()["status"] == "ok"             # worker 1 not started yet: no verdict
        board.publish(1, Batcher(translator))                         # worker 1 up, its decoder not running
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "decoding worker stopped in worker 1"
        assert [w["decoding"] for w in r.json()["workers"]] == [True, False]
        board.publish(1, app.state.batcher)                           # a running decoder in that row
        assert c.get("/health").status_code == 200


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_over_its_share_of_clients_closes_one_connection_per_gap():
    import multiprocessing

    board, clock = StatsBoard(2, multiprocessing.get_context("spawn")), Clock()
    balancer = ConnectionBalancer(board, 0, window_s=2.0, gap_s=0.5, clock=clock)
    other = SimpleNamespace(stats=DecoderStats(), pending=0, alive=True)   # worker 1's batcher, as published
    board.publish(1, other, clients=15)             # the other worker holds 15 clients
    for port in range(17):
        balancer.seen(("127.0.0.1", port))
    assert balancer.clients() == 17
    assert balancer.close(("127.0.0.1", 3))                       # 17 of 32: one over the fair 16
    assert balancer.clients() == 16 and balancer.closed == 1      # the closed one no longer counts
    balancer.seen(("127.0.0.1", 100))                             # it came back to this worker
    assert not balancer.close(("127.0.0.1", 4))                   # within the gap: nothing more
    clock.now += 0.5
    assert balancer.close(("127.0.0.1", 4))                       # after it: the next one goes
    assert not balancer.close(None)                               # an unknown peer is never closed
    board.publish(1, other, clients=16)
    clock.now += 0.5
    assert balancer.clients() == 16 and not balancer.close(("127.0.0.1", 5))   # 16 and 16: balanced
    board.publish(1, other, clients=15)
    clock.now += 0.5
    assert not balancer.close(("127.0.0.1", 5))                   # 16 and 15: a difference of one stays
    clock.now += 1.6                                              # 2.1 s since the first requests
    balancer.seen(("127.0.0.1", 7))
    assert balancer.clients() == 1                                # the quiet ones have left the count


def test_the_worker_with_more_clients_answers_with_connection_close(model_path, translator):
    import multiprocessing

    board = StatsBoard(2, multiprocessing.get_context("spawn"))
    app = create_app(model_path, LIMITS, board=(board, 0))
    app.state.balancer.gap_s = 3600.0                             # one close in this test, not timing-dependent
    with TestClient(app, client=("127.0.0.1", 40001)) as first:
        second = TestClient(app, client=("127.0.0.1", 40002))     # a second connection, same service
        r = first.post("/translate", json={"text": ["a b"]})
        assert r.status_code == 200 and "close" not in r.headers.get("connection", "")   # 1 client of 1
        r = second.post("/translate", json={"text": ["a b"]})
        assert r.status_code == 200 and r.headers["connection"] == "close"   # 2 here, 0 there: go elsewhere
        health = first.get("/health").json()
        assert [w["clients"] for w in health["workers"]] == [1, 0]
        r = second.post("/translate", json={"text": ["a b"]})
        assert "close" not in r.headers.get("connection", "")     # the gap holds the next one back
    solo = create_app(translator, LIMITS)                         # one process: nothing to balance
    with TestClient(solo) as c:
        assert solo.state.balancer is None
        assert "close" not in c.post("/translate", json={"text": ["a b"]}).headers.get("connection", "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux's SO_REUSEPORT")
def test_kept_alive_clients_end_up_spread_evenly_over_two_workers(model_path):
    # warnings only: an access log line per request would fill the unread pipe and stall the workers
    with running_server(model_path, "--workers", "2", "--threads", "1", "--log-level", "warning") as (proc, url):
        both_up(url)

        def spread() -> list[int]:
            return sorted(w["clients"] for w in httpx.get(f"{url}/health").json()["workers"])

        # The kernel alone leaves 8 new connections at 4 and 4 in 70 of 256 cases; two rounds
        # of fresh clients, each of which must end at 4 and 4, pass without the balancer in 7%.
        for _ in range(2):
            stop, answers = threading.Event(), []

            def client() -> None:   # one kept-alive connection at a time, as a browser or a pool keeps it
                with httpx.Client(base_url=url, timeout=60) as http:
                    while not stop.is_set():
                        r = http.post("/translate", json={"text": ["a b c"], "beam_size": 2})
                        assert r.status_code == 200
                        answers.append(r.headers.get("connection"))

            with ThreadPoolExecutor(8) as pool:
                running = [pool.submit(client) for _ in range(8)]
                try:
                    wait_for(lambda: spread() == [4, 4] and len(answers) > 50, timeout=60, what="4 clients each")
                    time.sleep(1.0)
                    assert spread() == [4, 4]                      # and it stays there
                finally:
                    stop.set()
                for f in running:
                    f.result(timeout=60)
            wait_for(lambda: spread() == [0, 0], timeout=10, what="the clients leaving the count")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux's SO_REUSEPORT")
def test_a_worker_that_dies_stops_the_service_with_exit_1(model_path):
    with running_server(model_path, "--workers", "2", "--threads", "1") as (proc, url):
        pids = both_up(url)
        os.kill(pids[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        output = proc.stdout.read().decode()
    assert "exited with code -9; stopping the others" in output, output[-3000:]
    assert gone(pids[1])


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="--workers needs Linux's SO_REUSEPORT"))])
def test_a_port_another_program_holds_is_one_line_and_exit_code_2(model_path, capsys, monkeypatch, workers):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")
    monkeypatch.setattr("seq2seq.serve.create_app", no_loading)   # one process: fails before loading the model
    monkeypatch.setattr("seq2seq.serve.model_card", no_loading)   # --workers: before the parent reads the checkpoint
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--checkpoint", str(model_path), "--workers", workers, "--port", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot serve on 127.0.0.1:{port}: [Errno 98]")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--workers needs Linux's SO_REUSEPORT")
def test_workers_on_an_accelerator_warn_of_one_model_copy_each(model_path, caplog):
    with socket.socket() as taken:   # the port is taken: it stops there, after the warning, before any worker
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = ["--workers", "3", "--device", "cuda:1", "--port", str(taken.getsockname()[1])]
        assert main(["--checkpoint", str(model_path), *flags]) == 2
    assert "--workers 3 --device cuda:1: each worker loads its own copy of the model onto that device" in caplog.text


def test_load_test_refuses_a_non_loopback_server():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), "--url", "http://192.0.2.1:8000"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing http://192.0.2.1:8000: the load test only targets this machine" in proc.stderr.decode()


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    return load_test


def test_load_test_reports_what_the_decoder_did_between_two_health_answers():
    load_test = load_test_module()
    before = {"decoder": {"sentences": 10, "steps": 40, "sentence_steps": 100, "joins": 3, "busy_s": 2.0,
                          "uptime_s": 10.0}, "process_cpu_s": 30.0}
    after = {"decoder": {"sentences": 74, "steps": 140, "sentence_steps": 2100, "joins": 11, "busy_s": 6.5,
                         "uptime_s": 15.0}, "process_cpu_s": 39.0}
    assert load_test.decoder_during(before, after) == {
        "steps": 100, "sentences": 64, "joins": 8, "mean_batch_sentences": 20.0, "mean_join_sentences": 8.0,
        "ms_per_step": pytest.approx(45.0), "busy_fraction": pytest.approx(0.9), "worker_sentences": None}
    two = [{"sentences": 4}, {"sentences": 6}], [{"sentences": 40}, {"sentences": 34}]   # --workers 2
    assert load_test.decoder_during({**before, "workers": two[0]}, {**after, "workers": two[1]}
                                    )["worker_sentences"] == [36, 28]
    assert load_test.server_cpu_cores(before, after) == pytest.approx(1.8)   # 9 CPU seconds in 5 s
    assert load_test.decoder_during({}, after) is None      # a server without decoder totals
    assert load_test.server_cpu_cores({"decoder": before["decoder"]}, after) is None


def test_the_load_test_against_a_real_server_answers_every_request(model_path, sentences, tmp_path):
    lines = tmp_path / "sentences.txt"
    lines.write_text("\n".join(sentences[:6]) + "\n")
    with running_server(model_path) as (_, url):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), "--url", url,
                               "--clients", "3", "--max-requests", "12", "--duration", "60", "--beam-size", "2",
                               "--offline-sentences", "6", "--sentences", str(lines)],
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    load = result["load"]
    assert (load["requests"], load["sentences"], load["errors"]) == (12, 12, 0), load
    assert load["connections"] == 3                        # kept alive: one per client
    assert load["decoder"]["sentences"] == 12 and load["server_cpu_cores"] > 0
    off = result["offline"]
    assert off["sentences"] == 6 and result["served_over_offline"] > 0
    # the baseline is timed before and after the load; the ratio uses the mean of the two rates
    assert result["schema"] == "seq2seq-load-test/2" and len(off["seconds"]) == 2
    assert off["sentences_per_s"] == pytest.approx((off["before_sentences_per_s"] + off["after_sentences_per_s"]) / 2)
    assert result["served_over_offline"] == pytest.approx(load["sentences_per_s"] / off["sentences_per_s"])
    assert "served/offline" in proc.stderr


def test_an_overloaded_queue_answers_503_with_retry_after(model_path, sentences):
    settings = ServeSettings(max_batch_sentences=16, batch_wait_ms=1500, max_queued=3)
    with TestClient(create_app(model_path, settings)) as c, ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/translate", json={"text": sentences[:2]})   # waits 1.5 s for company
        deadline = time.monotonic() + 5
        while c.app.state.batcher.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/translate", json={"text": sentences[2:4]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "too many sentences waiting", "limit": "max_queued", "value": 3}
        assert first.result(timeout=30).status_code == 200
        assert c.post("/translate", json={"text": sentences[2:4]}).status_code == 200
