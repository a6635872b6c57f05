"""Dynamic batching: sentences from concurrent requests decoded together, in one thread.

    batcher = Batcher(translator, max_batch_sentences=64, max_wait_ms=10)
    batcher.start()
    future = batcher.submit(["ein Satz", ""], SearchOptions(beam_size=5))
    future.result()      # one list of Translations per sentence, as translate_hypotheses gives
    batcher.close()      # finishes what is queued, then stops the thread

A request's sentences join one queue. The worker thread takes the oldest sentence,
waits until `max_wait_ms` after it arrived (or until `max_batch_sentences` sentences
with the same search options are queued), then decodes those sentences together with
one `Translator.translate_hypotheses` call. Sentences with other options stay queued,
in order, for a later batch: a batch never mixes beam sizes or penalties. Padding is
masked, so a sentence's hypotheses do not depend on its batch neighbours and a request's
result is the one `translate_hypotheses` gives for its sentences offline (up to the
last bits of floating-point sums, which can vary with the batch shape; the tests check
that translations and scores match).

Only the worker thread touches the model: torch modules are not safe to run from
several threads at once, and one batch at a time is also what keeps a CPU busy without
oversubscribing it. Callers wait on a `concurrent.futures.Future` (from asyncio:
`asyncio.wrap_future`); cancelling it drops the request's sentences not yet decoded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import astuple, dataclass, field
from typing import Protocol

from .search import SearchOptions
from .translate import Translation

log = logging.getLogger(__name__)


class BatcherUnavailable(RuntimeError):
    """The batcher is closing, or its worker thread is not running: nothing would decode."""


class TranslatesBatches(Protocol):
    def translate_hypotheses(self, lines: list[str], options: SearchOptions | None = None, *,
                             batch_size: int = 64, return_attention: bool = False) -> list[list[Translation]]: ...


@dataclass
class BatchRecord:
    """What one decoding call held: for tests, /health and tuning the window."""

    sentences: int
    requests: int
    seconds: float


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
    key: tuple                    # the search options as a hashable value: equal keys may share a batch
    arrived: float = field(default_factory=time.monotonic)


def _blank() -> list[Translation]:
    # what translate_hypotheses returns for a blank line: the model never sees it
    return [Translation("", 0.0, 0.0, [])]


class Batcher:
    def __init__(self, translator: TranslatesBatches, *, max_batch_sentences: int = 64, max_wait_ms: float = 10.0,
                 history: int = 1000):
        if max_batch_sentences < 1:
            raise ValueError(f"max_batch_sentences must be >= 1, got {max_batch_sentences}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.translator = translator
        self.max_batch_sentences = max_batch_sentences
        self.max_wait_s = max_wait_ms / 1000.0
        self.batches: deque[BatchRecord] = deque(maxlen=history)  # the most recent batches, oldest first
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
                           [None if s.strip() else _blank() for s in sentences], 0)
        entries = [_Entry(request, i, astuple(options)) for i, s in enumerate(sentences) if s.strip()]
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
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Entry] | None:
        """Block until a batch is due; None once closed and drained."""
        with self._cond:
            while True:
                # a request cancelled (timed out) or already failed needs none of its other sentences
                self._queue = [e for e in self._queue if not e.request.future.done()]
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                key = self._queue[0].key
                matching = [e for e in self._queue if e.key == key]
                wait = self._queue[0].arrived + self.max_wait_s - time.monotonic()
                if len(matching) >= self.max_batch_sentences or wait <= 0 or self._closing:
                    batch = matching[:self.max_batch_sentences]
                    taken = {id(e) for e in batch}
                    self._queue = [e for e in self._queue if id(e) not in taken]
                    return batch
                # woken early by new sentences (the batch may be full) or a cancellation
                self._cond.wait(wait)

    def _run(self, batch: list[_Entry]) -> None:
        options = batch[0].request.options
        with_attention = any(e.request.attention and e.index == 0 for e in batch)
        start = time.perf_counter()
        try:
            results = self.translator.translate_hypotheses(
                [e.request.sentences[e.index] for e in batch], options,
                batch_size=self.max_batch_sentences, return_attention=with_attention)
        except Exception as e:  # noqa: BLE001 - reported to every waiting caller; the worker lives on
            log.exception("decoding a batch of %d sentences failed", len(batch))
            for request in {id(x.request): x.request for x in batch}.values():
                _settle(request.future, exception=e)
            return
        seconds = time.perf_counter() - start
        self.batches.append(BatchRecord(len(batch), len({id(e.request) for e in batch}), seconds))
        for entry, hyps in zip(batch, results):
            if not (entry.request.attention and entry.index == 0):
                for h in hyps:
                    h.attention = h.source_pieces = None  # only sentence 0 of a request that asked keeps it
            request = entry.request
            request.results[entry.index] = hyps
            request.remaining -= 1
            if request.remaining == 0:
                _settle(request.future, result=request.results)


def _settle(future: Future, *, result=None, exception: BaseException | None = None) -> None:
    """Complete a future unless its caller already gave up on it (cancelled, timed out)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
