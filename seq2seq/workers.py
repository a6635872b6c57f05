"""Several service processes on one port: `seq2seq-serve --workers N`.

One service process decodes in one thread and answers HTTP in another, and the two take
turns at the interpreter lock: on a 2-core machine it keeps about 1.5 cores busy under
load, two workers 1.9 (docs/RESULTS.md, "Serving under load"). With `--workers N` each of
N processes is a whole service (its own model, batcher and event loop, `--threads` intra-op
threads: serve.py's `_worker`) listening on the same port through its own SO_REUSEPORT
socket; Linux hands each new connection to one of them by a hash of the connection's
addresses, so connections spread over the workers instead of piling onto whichever process
happens to call accept() first. This module runs the processes; serve.py builds the service
each one runs, so the import goes one way only (serve imports workers).

The parent process loads nothing but the model card (so a bad checkpoint fails before any
worker starts), holds the port, starts the workers in their own process group (a Ctrl+C
in the terminal reaches the parent only) and forwards SIGTERM / SIGINT to them as
SIGTERM: each finishes its in-flight requests, then exits. A worker that dies on its own
stops the service: the parent stops the others and exits 1, for a supervisor to restart.
A worker whose parent is gone stops itself.

`/health` answers for the whole service: every worker publishes its decoder totals, CPU
time, queue length and clients to a `StatsBoard` (shared memory, a few numbers per worker,
every 0.2 s and on each /health), and whichever worker answers sums them.

The kernel picks a worker for each connection once, and clients keep their connections
alive, so one worker may hold 18 of 32 clients and the other 14 for as long as they stay:
the first decodes longer steps, the second idles between them (measured in `git show
0e2781f:docs/RESULTS.md`, "Encoding a few lines, and join settings for two workers"). A
`ConnectionBalancer` evens this out: a worker that holds more than its share of the
service's clients answers one of them with `Connection: close`, at most every half second;
the client reconnects, and the kernel hashes the new connection afresh.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from .batcher import Batcher, DecoderStats
from .files import InputError

log = logging.getLogger("seq2seq")

FIELDS = ("sentences", "steps", "sentence_steps", "busy_s", "joins", "cpu_s", "queued", "pid", "decoding",
          "clients")
PUBLISH_EVERY_S = 0.2


class StatsBoard:
    """Each worker's decoder totals in shared memory: worker i writes row i, anyone reads all."""

    def __init__(self, workers: int, ctx=None):
        self.workers = workers
        self.array = (ctx or mp.get_context("spawn")).RawArray("d", workers * len(FIELDS))

    def publish(self, index: int, batcher: Batcher, clients: int = 0) -> None:
        s = batcher.stats
        row = (s.sentences, s.steps, s.sentence_steps, s.busy_s, s.joins, time.process_time(),
               batcher.pending, os.getpid(), float(batcher.alive), clients)
        start = index * len(FIELDS)
        self.array[start:start + len(FIELDS)] = row

    def rows(self) -> list[dict]:
        n = len(FIELDS)
        return [dict(zip(FIELDS, self.array[i * n:(i + 1) * n])) for i in range(self.workers)]

    def health(self, batcher: Batcher) -> dict:
        """/health's answer for the whole service, read by the worker that owns `batcher`.

        "status" is "ok" unless a worker that has started (published a pid) reports its
        decoding thread stopped: that worker answers every translation with 503, so the
        service is not healthy whichever worker is asked.
        """
        rows = self.rows()
        stopped = [i for i, r in enumerate(rows) if r["pid"] and not r["decoding"]]
        counts = {f: int(sum(r[f] for r in rows)) for f in ("sentences", "steps", "sentence_steps", "joins")}
        totals = DecoderStats(**counts, busy_s=sum(r["busy_s"] for r in rows), started=batcher.stats.started)
        status = f"decoding worker stopped in worker {', '.join(map(str, stopped))}" if stopped else "ok"
        return {"status": status, "queued_sentences": int(sum(r["queued"] for r in rows)),
                "decoder": {**totals.as_dict(), "workers": self.workers},
                "process_cpu_s": round(sum(r["cpu_s"] for r in rows), 3),
                "workers": [{"pid": int(r["pid"]), "sentences": int(r["sentences"]), "steps": int(r["steps"]),
                             "queued_sentences": int(r["queued"]), "decoding": bool(r["decoding"]),
                             "clients": int(r["clients"])}
                            for r in rows]}

    async def keep_publishing(self, index: int, batcher: Batcher, balancer: ConnectionBalancer) -> None:
        while True:
            self.publish(index, batcher, balancer.clients())
            await asyncio.sleep(PUBLISH_EVERY_S)


class ConnectionBalancer:
    """One worker's side of spreading kept-alive connections evenly over the workers.

    A worker counts its clients: the distinct peer addresses (host, port: one per
    connection) that sent it a request within the last `window_s` seconds. After answering
    a request it asks `close(peer)`: True when this worker holds more clients than its fair
    share of the service's total (the other workers' counts read from the board, up to
    PUBLISH_EVERY_S old), rounded up, and it has not closed a connection for `gap_s`
    seconds. The caller then answers with `Connection: close`; the client's next
    connection may land on any worker. Rounding the share up leaves a difference of one
    alone, so balanced workers close nothing.
    """

    def __init__(self, board: StatsBoard, index: int, window_s: float = 2.0, gap_s: float = 0.5,
                 clock=time.monotonic):
        self.board, self.index = board, index
        self.window_s, self.gap_s, self.clock = window_s, gap_s, clock
        self.last_seen: dict[tuple, float] = {}
        self.last_close = -float("inf")
        self.closed = 0

    def seen(self, peer: tuple | None) -> None:
        """A request arrived from `peer` (Starlette's request.client; None when unknown)."""
        if peer is not None:
            self.last_seen[tuple(peer)] = self.clock()

    def clients(self) -> int:
        cutoff = self.clock() - self.window_s
        for peer in [p for p, t in self.last_seen.items() if t < cutoff]:
            del self.last_seen[peer]
        return len(self.last_seen)

    def close(self, peer: tuple | None) -> bool:
        if peer is None or self.clock() - self.last_close < self.gap_s:
            return False
        mine = self.clients()
        others = sum(int(r["clients"]) for i, r in enumerate(self.board.rows()) if i != self.index)
        fair = -(-(mine + others) // self.board.workers)
        if mine <= fair:
            return False
        self.last_seen.pop(tuple(peer), None)
        self.last_close = self.clock()
        self.closed += 1
        return True


def bound_socket(host: str, port: int, *, reuseport: bool = False) -> socket.socket:
    """A TCP socket bound to (host, port), with SO_REUSEPORT if asked (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def claim_port(host: str, port: int, *, reuseport: bool = False) -> socket.socket:
    """`bound_socket`, or the one-line error (exit 2) when the address cannot be had."""
    try:
        return bound_socket(host, port, reuseport=reuseport)
    except OSError as e:   # taken by another program, not an address of this machine, ...
        raise InputError(f"cannot serve on {host}:{port}: {e}") from None


def check_workers_supported() -> None:
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise InputError(f"--workers above 1 needs Linux's SO_REUSEPORT load balancing (this is {sys.platform}); "
                      f"run one worker per port behind a proxy instead")


def default_threads(workers: int) -> int:
    """The CPUs this process may use, shared out among the workers (at least one each)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // workers)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its service: picklable, sent to each spawned process."""

    checkpoint: str
    card: dict
    settings: object              # serve.ServeSettings
    device: str
    max_source_len: int
    precision: str
    host: str
    port: int
    threads: int
    log_level: str
    graceful_timeout: int


def _watch_parent(parent: int) -> None:
    """Stop this worker (gracefully) once the process that started it is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _run_worker(target, index: int, spec: WorkerSpec, board: StatsBoard, parent: int) -> None:
    """A worker process: its own process group and a watch on its parent, then `target`."""
    os.setpgrp()   # the terminal's Ctrl+C goes to the parent, which asks each worker to stop once
    threading.Thread(target=_watch_parent, args=(parent,), name="seq2seq-parent-watch", daemon=True).start()
    target(index, spec, board)


def serve_workers(spec: WorkerSpec, workers: int, target, holder: socket.socket) -> int:
    """Run `workers` service processes on spec.host:spec.port until SIGTERM/SIGINT; the exit code.

    `target(index, spec, board)` builds and runs one worker's service on the shared port
    (serve.py's `_worker`); it must be a module-level function, since each spawned process
    imports it by name. The caller has checked `check_workers_supported` and claimed the port,
    `holder = claim_port(host, port, reuseport=True)`, before loading anything: the holder keeps
    the port (and resolves port 0) while the workers start, and is closed here when done.
    """
    spec = WorkerSpec(**{**vars(spec), "port": holder.getsockname()[1]})
    ctx = mp.get_context("spawn")   # fresh interpreters: no torch threads or locks inherited through fork
    board = StatsBoard(workers, ctx)
    procs = [ctx.Process(target=_run_worker, args=(target, i, spec, board, os.getpid()), name=f"seq2seq-serve-{i}")
             for i in range(workers)]
    stopping = threading.Event()
    failed: list[str] = []

    def stop(signum=None, frame=None) -> None:
        stopping.set()
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        log.info("serving http://%s:%d with %d worker processes (intra-op threads: %d each)", spec.host, spec.port,
                 workers, spec.threads)
        running = list(procs)
        while running:
            wait([p.sentinel for p in running], timeout=1.0)
            for p in [p for p in running if p.exitcode is not None]:
                running.remove(p)
                if not stopping.is_set():
                    failed.append(f"{p.name} (pid {p.pid}) exited with code {p.exitcode}")
                    log.error("worker %s; stopping the others", failed[-1])
                    stop()
    finally:
        stop()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=spec.graceful_timeout + 10)
                if p.exitcode is None:
                    p.kill()
                    p.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        holder.close()
    failed += [f"{p.name} exited with code {p.exitcode}" for p in procs if p.exitcode not in (0, None)
               and not any(f.startswith(f"{p.name} ") for f in failed)]
    return 1 if failed else 0
