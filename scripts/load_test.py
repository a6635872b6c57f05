#!/usr/bin/env python
"""Load test of a running seq2seq-serve: throughput and latency under concurrent clients,
against offline batch translation with the same checkpoint and settings.

    seq2seq-serve --checkpoint runs/multi30k-en-de/model.pt &
    python scripts/load_test.py --clients 32 --duration 60 > load.json

Three phases, one after the other, so they never compete for the CPU:

1. offline: `Translator.translate_hypotheses` in this process over the first
   --offline-sentences lines of --sentences, with the server's checkpoint (from its
   /info, or --checkpoint), the same beam size, precision (float32, bfloat16 or int8) and
   the server's batch size (max_batch_sentences; --offline-batch-size to choose), after a
   short warm-up. The server sits idle meanwhile.
2. load: one warm-up request, then --clients concurrent clients (asyncio + aiohttp), each
   sending one sentence per request, cycling through --sentences, until --duration
   seconds have passed or --max-requests requests have been sent. Each request's latency
   is measured from send to the end of its answer. The clients run on the server's
   machine and take CPU from it, so they are kept lean: aiohttp spends about a tenth of
   httpx's CPU per request (`git show 0e2781f:docs/RESULTS.md`, "Lean clients").
3. offline again, the same way, once the server is idle (nothing queued, no decoder
   step for 0.5 s: requests the clients gave up on may still be decoding). A small
   machine's speed drifts by 10% or more over minutes (docs/RESULTS.md, "Speed"), so the ratio is
   taken against the mean of the two offline rates, before and after the load, and both
   are reported.

Only a server on this machine (loopback: 127.0.0.0/8, ::1, localhost) is accepted:
this is a way to measure our own service, not a tool to point at other people's.

Output: a short table on stderr, and as the last line of stdout one JSON object:

    schema             "seq2seq-load-test/2"
    url, clients, beam_size, duration_s (asked), max_requests, sentences_file
    server             the server's limits and batching (/info "service")
    load               {requests, sentences, errors, errors_by_kind ({"HTTP 408": 3,
                       "ReadTimeout": 1, ...}), connections (TCP connections the clients
                       opened: one each, more where the server closed some),
                       seconds (wall time of the load phase),
                       sentences_per_s (answered sentences / seconds), latency_ms
                       {p50, p95, p99, mean, max} over answered requests, decoder
                       {steps, sentences, mean_batch_sentences, busy_fraction}: the
                       server's /health totals before and after, or null without them
                       (with several worker processes: all of them, busy_fraction per
                       worker), worker_sentences (each worker's, or null with one);
                       server_cpu_cores: the server's CPU seconds per second of
                       the load (all its threads and workers; null if /health does not say);
                       client_cpu_fraction: this process's CPU time / wall time, i.e. the
                       share of a core the clients took from the machine}
    offline            {checkpoint, precision, sentences, batch_size, seconds (of both runs),
                       sentences_per_s (the mean of the two rates), before_sentences_per_s,
                       after_sentences_per_s}, or null with --offline-sentences 0
    served_over_offline  load.sentences_per_s / offline.sentences_per_s (null without offline)

Exit codes: 0 after a run (errors are counted, not fatal), 2 for a bad argument, a
non-loopback URL, a missing sentences file or a server that does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httpx

DEFAULT_SENTENCES = Path(__file__).resolve().parents[1] / "data" / "multi30k" / "test2016.en"


class LoadTestError(Exception):
    """A reason not to run: reported as one line, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running seq2seq-serve (loopback only)")
    p.add_argument("--checkpoint", help="checkpoint for the offline baseline (default: the server's, from /info)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load at most (default: 60)")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests at most (default: 100000)")
    p.add_argument("--beam-size", type=int, default=5, help="beam size of every request and of the baseline")
    p.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES,
                   help=f"one sentence per line (default: {DEFAULT_SENTENCES})")
    p.add_argument("--offline-sentences", type=int, default=1000,
                   help="sentences translated offline for the baseline (default: 1000; 0 = no baseline)")
    p.add_argument("--offline-batch-size", type=int, default=None,
                   help="batch size of the offline baseline (default: the server's max_batch_sentences)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="client-side seconds per request")
    args = p.parse_args(argv)
    for name in ("clients", "duration", "max_requests", "beam_size", "request_timeout"):
        if getattr(args, name) <= 0:
            raise LoadTestError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.offline_batch_size is not None and args.offline_batch_size < 1:
        raise LoadTestError(f"--offline-batch-size must be >= 1, got {args.offline_batch_size}")
    if args.offline_sentences < 0:
        raise LoadTestError(f"--offline-sentences must be >= 0, got {args.offline_sentences}")
    return args


def check_loopback(url: str) -> str:
    """The URL without a trailing slash, if its host is this machine; else LoadTestError."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise LoadTestError(f"--url must be http:// or https://, got {url}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadTestError(f"refusing {url}: the load test only targets this machine "
                            f"(127.0.0.0/8, ::1 or localhost), got host {host!r}")
    return url.rstrip("/")


def read_sentences(path: Path) -> list[str]:
    if not path.is_file():
        raise LoadTestError(f"sentences file not found: {path} (give one with --sentences FILE)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise LoadTestError(f"{path} has no non-blank line")
    return lines


def server_info(url: str) -> dict:
    try:
        r = httpx.get(f"{url}/info", timeout=30, trust_env=False)
    except httpx.TransportError as e:
        raise LoadTestError(f"no seq2seq-serve answers at {url} ({type(e).__name__}: {e})") from None
    if r.status_code != 200:
        raise LoadTestError(f"{url}/info answered {r.status_code}: {r.text[:200]}")
    return r.json()


def server_health(url: str) -> dict:
    """The server's /health (its decoder totals), or {} if it does not report them."""
    try:
        return httpx.get(f"{url}/health", timeout=30, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return {}


def wait_until_idle(url: str, timeout: float = 60.0) -> None:
    """Until the server has nothing queued and its decoder took no step for 0.5 s (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        health = server_health(url)
        now = (health.get("queued_sentences"), (health.get("decoder") or {}).get("steps"))
        if now == last and now[0] == 0:
            return
        last = now
        time.sleep(0.5)


def warm_up(url: str, sentence: str, beam_size: int, timeout: float) -> None:
    """One request before the load (and before the decoder totals are read), refused: LoadTestError."""
    r = httpx.post(f"{url}/translate", json={"text": [sentence], "beam_size": beam_size}, timeout=timeout,
                   trust_env=False)
    if r.status_code != 200:
        raise LoadTestError(f"the warm-up request was refused: {r.status_code} {r.text[:200]}")


def server_cpu_cores(before: dict, after: dict) -> float | None:
    """CPU seconds the server process spent per second between two /health answers (None if unsaid)."""
    try:
        wall = after["decoder"]["uptime_s"] - before["decoder"]["uptime_s"]
        return (after["process_cpu_s"] - before["process_cpu_s"]) / wall if wall > 0 else None
    except (KeyError, TypeError):
        return None


def decoder_during(before: dict, after: dict) -> dict | None:
    """What the server's decoder did between two /health answers: steps, sentences, the
    mean number of sentences per decoder step, the mean size of a group of sentences that
    joined it, milliseconds per step, and the fraction of the time it was busy."""
    a, b = before.get("decoder"), after.get("decoder")
    if not a or not b:
        return None
    steps = b["steps"] - a["steps"]
    wall = b["uptime_s"] - a["uptime_s"]
    joins = b.get("joins", 0) - a.get("joins", 0)
    sentences = b["sentences"] - a["sentences"]
    busy = b["busy_s"] - a["busy_s"]
    per_worker = None
    if len(before.get("workers", [])) == len(after.get("workers", [])) > 0:
        per_worker = [y["sentences"] - x["sentences"] for x, y in zip(before["workers"], after["workers"])]
    return {"steps": steps, "sentences": sentences, "joins": joins,
            "mean_batch_sentences": (b["sentence_steps"] - a["sentence_steps"]) / steps if steps else None,
            "mean_join_sentences": sentences / joins if joins else None,
            "ms_per_step": 1000 * busy / steps if steps else None,
            # with several worker processes (seq2seq-serve --workers) busy_s sums their decoders
            "busy_fraction": busy / wall / b.get("workers", 1) if wall > 0 else None,
            "worker_sentences": per_worker}


class OfflineBaseline:
    """Batch translation in this process, loaded once and timed as often as asked (torch imported only here)."""

    def __init__(self, checkpoint: str, sentences: list[str], beam_size: int, batch_size: int,
                 precision: str = "float32"):
        from seq2seq.search import SearchOptions
        from seq2seq.translate import Translator

        self.checkpoint, self.sentences, self.batch_size, self.precision = checkpoint, sentences, batch_size, precision
        self.translator = Translator.from_checkpoint(checkpoint, precision=precision)
        self.options = SearchOptions(beam_size=beam_size)
        self.translator.translate_hypotheses(sentences[:2], self.options, batch_size=batch_size)   # warm-up

    def seconds(self) -> float:
        start = time.perf_counter()
        self.translator.translate_hypotheses(self.sentences, self.options, batch_size=self.batch_size)
        return time.perf_counter() - start

    def summary(self, before: float, after: float) -> dict:
        n = len(self.sentences)
        return {"checkpoint": self.checkpoint, "precision": self.precision, "sentences": n,
                "batch_size": self.batch_size, "seconds": [round(before, 3), round(after, 3)],
                "sentences_per_s": (n / before + n / after) / 2,
                "before_sentences_per_s": n / before, "after_sentences_per_s": n / after}


async def run_clients(url: str, sentences: list[str], clients: int, duration: float, max_requests: int,
                      beam_size: int, request_timeout: float) -> dict:
    """Each client: one sentence per request, the next sentence of the shared cycle, until time or count is up."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    next_sentence = itertools.cycle(sentences)
    sent = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    opened = 0   # TCP connections: one per client unless the server closes some (several workers rebalancing)

    async def connection_opened(session, context, params) -> None:
        nonlocal opened
        opened += 1

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(connection_opened)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, trace_configs=[tracing]) as http:
        start = time.perf_counter()
        stop = start + duration

        async def client() -> None:
            nonlocal sent
            # one event loop thread: the counter and the cycle need no lock
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                body = {"text": [next(next_sentence)], "beam_size": beam_size}
                t0 = time.perf_counter()
                try:
                    async with http.post("/translate", json=body) as r:
                        await r.read()            # the whole answer, as a real client would wait for
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    errors[type(e).__name__] += 1
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[f"HTTP {status}"] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {"requests": sent, "latencies": latencies, "errors": errors, "seconds": seconds, "connections": opened}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))   # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def summarise(load: dict) -> dict:
    ms = [s * 1000 for s in load["latencies"]]
    answered = len(ms)   # one sentence per request
    return {
        "requests": load["requests"], "sentences": answered, "errors": sum(load["errors"].values()),
        "connections": load.get("connections"),
        "errors_by_kind": dict(load["errors"]), "seconds": round(load["seconds"], 3),
        "sentences_per_s": answered / load["seconds"] if load["seconds"] > 0 else None,
        "latency_ms": {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
                       "mean": sum(ms) / answered if answered else None, "max": max(ms) if ms else None},
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    load, off, lat = result["load"], result["offline"], result["load"]["latency_ms"]
    rows = [
        ("load test", f"{result['url']}  {result['clients']} clients, beam {result['beam_size']}, "
                      f"{load['seconds']:.1f} s"),
        ("served", f"{load['requests']} requests, {load['sentences']} sentences answered, {load['errors']} errors"
                   + (f" {load['errors_by_kind']}" if load["errors"] else "")
                   + f", over {load.get('connections', 'n/a')} connections"),
        ("throughput", f"{_fmt(load['sentences_per_s'], 2)} sentences/s"),
        ("latency", f"p50 {_fmt(lat['p50'])} ms   p95 {_fmt(lat['p95'])} ms   p99 {_fmt(lat['p99'])} ms   "
                    f"max {_fmt(lat['max'])} ms"),
        ("offline", "not measured" if off is None else
         f"{off['sentences_per_s']:.2f} sentences/s, the mean of {off['before_sentences_per_s']:.2f} before "
         f"and {off['after_sentences_per_s']:.2f} after the load ({off['sentences']} sentences, "
         f"batch {off['batch_size']})"),
        ("clients' CPU", f"{_fmt(100 * (load.get('client_cpu_fraction') or 0))}% of one core"),
        ("server's CPU", "not reported" if load.get("server_cpu_cores") is None else
         f"{_fmt(100 * load['server_cpu_cores'])}% of one core (all its threads)"),
        ("decoder", "not reported" if not load.get("decoder") else
         f"{load['decoder']['steps']} steps, {_fmt(load['decoder']['mean_batch_sentences'])} sentences per step, "
         f"{_fmt(load['decoder'].get('ms_per_step'))} ms per step (joins included), "
         f"{_fmt(load['decoder'].get('mean_join_sentences'))} sentences per join, "
         f"busy {_fmt(100 * (load['decoder']['busy_fraction'] or 0))}% of the time"),
        ("served/offline", _fmt(result["served_over_offline"], 3)),
    ]
    return "\n".join(f"{label:<15} {value}" for label, value in rows)


def run(args: argparse.Namespace) -> dict:
    url = check_loopback(args.url)
    sentences = read_sentences(args.sentences)
    info = server_info(url)
    service = info.get("service", {})
    baseline = offline = None
    if args.offline_sentences:
        checkpoint = args.checkpoint or info.get("checkpoint")
        if not checkpoint:
            raise LoadTestError("the server's /info names no checkpoint: give --checkpoint for the offline baseline")
        lines = list(itertools.islice(itertools.cycle(sentences), args.offline_sentences))
        batch_size = args.offline_batch_size or service.get("max_batch_sentences", 64)
        # the server's precision (float32, bfloat16 or int8), so that the ratio compares like with like
        baseline = OfflineBaseline(checkpoint, lines, args.beam_size, batch_size, service.get("precision", "float32"))
        before_s = baseline.seconds()
    warm_up(url, sentences[0], args.beam_size, args.request_timeout)
    before, cpu = server_health(url), time.process_time()
    load = summarise(asyncio.run(run_clients(url, sentences, args.clients, args.duration, args.max_requests,
                                             args.beam_size, args.request_timeout)))
    # the clients share the machine with the server: how much of a core they took
    load["client_cpu_fraction"] = (time.process_time() - cpu) / load["seconds"] if load["seconds"] > 0 else None
    after = server_health(url)
    load["decoder"] = decoder_during(before, after)
    load["server_cpu_cores"] = server_cpu_cores(before, after)
    if baseline is not None:
        wait_until_idle(url)
        offline = baseline.summary(before_s, baseline.seconds())
    ratio = (load["sentences_per_s"] / offline["sentences_per_s"]
             if offline and load["sentences_per_s"] is not None else None)
    return {"schema": "seq2seq-load-test/2", "url": url, "clients": args.clients, "beam_size": args.beam_size,
            "duration_s": args.duration, "max_requests": args.max_requests, "sentences_file": str(args.sentences),
            "server": service, "load": load, "offline": offline, "served_over_offline": ratio}


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(parse_args(argv))
    except LoadTestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
