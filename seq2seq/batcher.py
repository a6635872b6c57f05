"""Dynamic batching: sentences from concurrent requests decoded together, in one thread.

    batcher = Batcher(translator, max_batch_sentences=64, max_wait_ms=10, join_group=8, join_wait_ms=100)
    batcher.start()
    future = batcher.submit(["ein Satz", ""], SearchOptions(beam_size=5))
    future.result()      # one list of Translations per sentence, as translate_hypotheses gives
    batcher.close()      # finishes what is queued, then stops the thread

Continuous batching: the worker thread keeps one `TranslationStream` (a beam search
that sentences join and leave between decoder steps, translate.py) per set of search
options in flight, and steps them in turn. When nothing is in flight, the oldest
queued sentence waits until `max_wait_ms` after it arrived (or until
`max_batch_sentences` sentences are queued), so that a burst starts together. While
sentences are in flight, queued ones join their options' stream between steps, oldest
first, up to `max_batch_sentences` in flight in all, in groups: once `join_group` of
them can join (or as many as there is room for), or once the oldest has waited
`join_wait_ms`. A join encodes the newcomers and widens the state and memory of
everything in flight, so joining a few at a time costs less than one per step (measured
in `git show 0e2781f:docs/RESULTS.md`, "Joining in groups"). Each sentence's answer goes
out at the step it finishes. Nobody waits for the longest sentence of a batch, the
decoder never idles while work is queued, and no options starve others. A stream never
mixes beam sizes or penalties (the first sentence of a request that asks for attention
goes to a stream that keeps it). Padding is masked, so a request's result is the one
`translate_hypotheses` gives for its sentences offline (up to the last bits of
floating-point sums, which can vary with the batch shape; the tests check that
translations and scores match).

Only the worker thread touches the model: torch modules are not safe to run from
several threads at once, and one step at a time is also what keeps a CPU busy
without oversubscribing it. Callers wait on a `concurrent.futures.Future` (from
asyncio: `asyncio.wrap_future`); cancelling it drops the request's sentences, queued
or in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

from .search import SearchOptions
from .translate import Translation, TranslationStream, blank_translations

log = logging.getLogger(__name__)


class BatcherUnavailable(RuntimeError):
    """The batcher is closing, or its worker thread is not running: nothing would decode."""


class Streams(Protocol):
    def stream(self, options: SearchOptions, *, return_attention: bool = False) -> TranslationStream: ...


@dataclass
class BatchRecord:
    """Sentences that joined the decoder together (a stream's first batch, or later joiners)."""

    sentences: int
    requests: int
    live_after: int               # sentences in flight once they joined


@dataclass
class DecoderStats:
    """Totals since the batcher started: what /health reports and the load test reads."""

    sentences: int = 0            # sentences answered by the model
    steps: int = 0                # decoder steps
    sentence_steps: int = 0       # sum over steps of the sentences in flight: / steps = mean batch
    busy_s: float = 0.0           # seconds spent encoding and stepping
    joins: int = 0                # groups of sentences that started together (a stream's first batch counts)
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"sentences": self.sentences, "steps": self.steps, "sentence_steps": self.sentence_steps,
                "mean_batch_sentences": round(self.sentence_steps / self.steps, 2) if self.steps else None,
                "joins": self.joins,
                "busy_s": round(self.busy_s, 3), "uptime_s": round(time.monotonic() - self.started, 3)}


@dataclass
class _Request:
    sentences: list[str]
    options: SearchOptions
    attention: bool               # keep the attention weights of sentence 0
    future: Future
    results: list[list[Translation] | None]
    remaining: int


@dataclass
class _Entry:
    """One non-blank sentence waiting in the queue."""

    request: _Request
    index: int                    # position in request.sentences
    key: tuple                    # search options and attention as a hashable value: equal keys share a stream
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, translator: Streams, *, max_batch_sentences: int = 64, max_wait_ms: float = 10.0,
                 join_group: int = 8, join_wait_ms: float = 100.0, history: int = 1000):
        for name, value in (("max_batch_sentences", max_batch_sentences), ("join_group", join_group)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("max_wait_ms", max_wait_ms), ("join_wait_ms", join_wait_ms)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.translator = translator
        self.max_batch_sentences = max_batch_sentences
        self.max_wait_s = max_wait_ms / 1000.0
        self.join_group = join_group
        self.join_wait_s = join_wait_ms / 1000.0
        self.batches: deque[BatchRecord] = deque(maxlen=history)  # the most recent joins, oldest first
        self.stats = DecoderStats()
        self._queue: list[_Entry] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ---- the callers' side -------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the batcher is already started")
        # daemon: a server that dies without running its shutdown must not hang on this thread
        self._thread = threading.Thread(target=self._work, name="seq2seq-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Decode what is queued, then stop the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Batcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (started and not closed)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Sentences queued and not yet taken into a batch."""
        with self._cond:
            return len(self._queue)

    def submit(self, sentences: list[str], options: SearchOptions, attention: bool = False) -> Future:
        """Queue sentences; the future's result is one list of Translations per sentence, in order.

        attention: also return sentence 0's attention weights and source subwords.
        """
        if options.sample:
            # a sample depends on the random draws its batch neighbours consume
            raise ValueError("sampling is not batched: a sample would depend on the other sentences in its batch")
        future: Future = Future()
        request = _Request(list(sentences), options, attention, future,
                           [None if s.strip() else blank_translations() for s in sentences], 0)
        # only sentence 0 of a request that asks for attention needs a stream that keeps it
        key = tuple(vars(options).values())   # the options' fields in order (astuple deep-copies: slower)
        entries = [_Entry(request, i, (key, attention and i == 0))
                   for i, s in enumerate(sentences) if s.strip()]
        request.remaining = len(entries)
        if not entries:
            future.set_result(request.results)
            return future
        with self._cond:
            if self._closing:
                raise BatcherUnavailable("the batcher is closing")
            if not self.alive:
                raise BatcherUnavailable("the decoding worker is not running")
            self._queue.extend(entries)
            self._cond.notify_all()
        return future

    # ---- the worker thread -------------------------------------------------------

    def _work(self) -> None:
        streams: dict[tuple, TranslationStream] = {}   # one per search-options key with sentences in flight
        running: dict[int, _Entry] = {}                # id(entry) -> entry, for the sentences in flight
        joining: list[_Entry] = []
        try:
            while True:
                self._drop_given_up(streams, running)
                joining = self._next_joiners(idle=not running, room=self.max_batch_sentences - len(running))
                if joining is None:
                    return
                for key, group in _by_key(joining):
                    self._join(streams, key, group, running)
                for key in list(streams):
                    if streams[key].live and not self._step(streams[key], running):
                        del streams[key]       # failed: its callers have their error; nothing of it is reused
                    elif not streams[key].live:
                        del streams[key]       # its tensors go; the next sentence with these options starts anew
        except BaseException as e:  # noqa: BLE001 - a bug of ours: answer everyone, then stop
            log.exception("the decoding worker stopped")
            with self._cond:
                self._closing = True
                queued, self._queue = self._queue, []
            _fail([x.request for x in list(running.values()) + (joining or []) + queued],
                  BatcherUnavailable(f"the decoding worker stopped: {type(e).__name__}: {e}"))

    def _drop_given_up(self, streams: dict[tuple, TranslationStream], running: dict[int, _Entry]) -> None:
        """Sentences of requests cancelled (timed out) or failed leave the decoder."""
        for tag in [tag for tag, e in running.items() if e.request.future.done()]:
            entry = running.pop(tag)
            streams[entry.key].drop([tag])

    def _next_joiners(self, *, idle: bool, room: int) -> list[_Entry] | None:
        """Queued sentences to start now, oldest first, at most `room`.

        With sentences in flight: never waits; takes them once `join_group` of them fit
        (or as many as `room`), or the oldest has waited `join_wait_s`, else none yet.
        With none in flight: blocks until the oldest has waited `max_wait_s` or `room`
        sentences are queued. None once closed and drained.
        """
        with self._cond:
            while True:
                # a request cancelled (timed out) or already failed needs none of its other sentences
                self._queue = [e for e in self._queue if not e.request.future.done()]
                if not idle:
                    ready = min(len(self._queue), max(room, 0))
                    if ready and (ready >= min(self.join_group, room) or self._closing
                                  or time.monotonic() - self._queue[0].arrived >= self.join_wait_s):
                        return self._take(ready)
                    return []
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                wait = self._queue[0].arrived + self.max_wait_s - time.monotonic()
                if len(self._queue) >= room or wait <= 0 or self._closing:
                    return self._take(room)
                # woken early by new sentences (the batch may be full) or a cancellation
                self._cond.wait(wait)

    def _take(self, n: int) -> list[_Entry]:
        """Remove and return the oldest `n` queued sentences (the caller holds the lock)."""
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    def _join(self, streams: dict[tuple, TranslationStream], key: tuple, group: list[_Entry],
              running: dict[int, _Entry]) -> None:
        """Start `group` (sentences with search-options key `key`) in that key's stream."""
        start = time.perf_counter()
        try:
            self._add(streams, key, group)
        except Exception as e:  # noqa: BLE001 - reported to its callers; the worker and the stream live on
            by_request: dict[int, list[_Entry]] = {}
            for x in group:
                by_request.setdefault(id(x.request), []).append(x)
            if len(by_request) == 1:
                log.exception("starting %d sentences failed", len(group))
                _fail([group[0].request], e)
                return
            # one request's sentence may be at fault: the others must not fail with it
            log.warning("starting %d sentences of %d requests together failed (%s: %s); starting each "
                        "request on its own", len(group), len(by_request), type(e).__name__, e)
            group = []
            for entries in by_request.values():
                try:
                    self._add(streams, key, entries)
                    group += entries
                except Exception as e:  # noqa: BLE001 - as above, for this request alone
                    log.exception("starting %d sentences of one request failed", len(entries))
                    _fail([entries[0].request], e)
            if not group:
                return
        finally:
            self.stats.busy_s += time.perf_counter() - start
        running.update((id(e), e) for e in group)
        self.stats.joins += 1
        self.batches.append(BatchRecord(len(group), len({id(e.request) for e in group}), len(running)))

    def _add(self, streams: dict[tuple, TranslationStream], key: tuple, group: list[_Entry]) -> None:
        if key not in streams:
            streams[key] = self.translator.stream(group[0].request.options, return_attention=key[1])
        streams[key].add([e.request.sentences[e.index] for e in group], [id(e) for e in group],
                         [e.index + 1 for e in group])

    def _step(self, stream: TranslationStream, running: dict[int, _Entry]) -> bool:
        """One decoder step of `stream`; answers the sentences it finished. False if it failed."""
        start = time.perf_counter()
        in_flight = stream.live
        try:
            finished = stream.step()
        except Exception as e:  # noqa: BLE001 - reported to every caller in that stream; the worker lives on
            log.exception("decoding %d sentences failed", in_flight)
            _fail([running.pop(t).request for t in stream.tags if t in running], e)
            return False
        finally:
            self.stats.busy_s += time.perf_counter() - start
        self.stats.steps += 1
        self.stats.sentence_steps += in_flight
        self.stats.sentences += len(finished)
        for tag, hyps in finished:
            entry = running.pop(tag)
            if not (entry.request.attention and entry.index == 0):
                for h in hyps:
                    h.attention = h.source_pieces = None  # only sentence 0 of a request that asked keeps it
            request = entry.request
            request.results[entry.index] = hyps
            request.remaining -= 1
            if request.remaining == 0:
                _settle(request.future, result=request.results)
        return True


def _by_key(entries: list[_Entry]) -> list[tuple[tuple, list[_Entry]]]:
    """Entries grouped by search-options key, groups in order of their oldest entry."""
    groups: dict[tuple, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.key, []).append(e)
    return list(groups.items())


def _fail(requests: list[_Request], error: BaseException) -> None:
    for request in {id(r): r for r in requests}.values():
        _settle(request.future, exception=error)


def _settle(future: Future, *, result=None, exception: BaseException | None = None) -> None:
    """Complete a future unless its caller already gave up on it (cancelled, timed out)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
