"""`seq2seq-serve`: a checkpoint behind a small local HTTP service (FastAPI on uvicorn).

    seq2seq-serve --checkpoint runs/multi30k-en-de/model.pt     # http://127.0.0.1:8000/

    POST /translate   {"text": ["A dog runs.", ""], "beam_size": 5, "nbest": 1}
                   -> {"translations": ["Ein Hund rennt.", ""], "scores": [-1.2, 0.0],
                       "model": "model.pt", "elapsed_ms": 41.3}
    GET  /health      {"status": "ok", "queued_sentences": 0, "decoder": {totals: sentences, steps,
                      sentence_steps, mean_batch_sentences, busy_s, uptime_s}, "process_cpu_s":
                      CPU seconds of the whole service so far}; 503 if the decoding thread is gone.
                      With --workers N: the totals of all N processes, "decoder" also has
                      "workers": N, "workers" lists each one's pid, sentences, steps,
                      whether its decoding thread runs and its clients (connections heard
                      from in the last 2 s); 503 if any worker's decoding thread has stopped
    GET  /info        the model card (`seq2seq.info.model_card`), its limits under "service"
    GET  /            a page to type into, with the first sentence's attention drawn
    GET  /openapi.json  the OpenAPI description; /docs shows it (Swagger UI, whose
                      scripts FastAPI loads from a CDN: the one page that needs a network)

One result per input sentence, in order; a blank sentence gives "" with score 0. With
`"nbest": K > 1` each entry of `translations` and `scores` is instead a list of up to K
hypotheses of that sentence, best first (a blank sentence: [""] and [0.0]). With
`"attention": true`, `attention` (else null) holds the FIRST sentence's weights:
`{"source": [subwords + "</s>"], "target": [output subwords (+ "</s>")],
"weights": [[...] one row per target subword, one column per source subword]}`, or null
when that sentence is blank.

Concurrent requests are decoded together by a `Batcher` (batcher.py) running the model
in one thread (one per process with `--workers N`: workers.py), with continuous batching:
a sentence joins the running search at the next decoder step and leaves it as soon as it
is finished. A request's results are those `Translator.translate_hypotheses` gives for the
same sentences and options. Every refusal has a JSON body: a 4xx (503 for a full queue or a
stopped decoder); a limit names itself:
`{"error": "too many sentences", "limit": "max_sentences", "value": 64}`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .batcher import Batcher, BatcherUnavailable
from .files import InputError
from .info import model_card
from .quantize import PRECISIONS
from .search import NORMALISATIONS, SearchOptions
from .translate import Translation, Translator
from .workers import (ConnectionBalancer, StatsBoard, WorkerSpec, bound_socket, check_workers_supported, claim_port,
                      default_threads, serve_workers)

log = logging.getLogger("seq2seq")


@dataclass(frozen=True)
class ServeSettings:
    """The service's batching and limits; every one is a command-line flag of seq2seq-serve."""

    max_batch_sentences: int = 64   # sentences in flight in the decoder at most
    batch_wait_ms: float = 10.0     # an idle decoder: how long the oldest queued sentence waits for company
    join_group: int = 8             # a busy decoder: queued sentences join once this many fit ...
    join_wait_ms: float = 100.0     # ... or once the oldest has waited this long
    max_sentences: int = 64         # per request
    max_chars: int = 2000           # per sentence
    max_body_bytes: int = 1_000_000  # per request body
    timeout_s: float = 30.0         # per request, queueing included
    max_beam: int = 16              # beam_size must be in 1..max_beam
    max_queued: int = 4096          # sentences waiting to be decoded; beyond: 503, try again later

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name in ("batch_wait_ms", "join_wait_ms"):
                ok, rule = value >= 0, ">= 0"
            elif name == "timeout_s":
                ok, rule = value > 0, "> 0"
            else:
                ok, rule = value >= 1, ">= 1"
            if not ok:
                raise SettingError(name, f"{name} must be {rule}, got {value}")


class SettingError(ValueError):
    """A bad ServeSettings value; `name` is the field, for a command line to name its flag."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# ---- the JSON the API speaks --------------------------------------------------------

class TranslateRequest(BaseModel):
    # strict and closed: "5" is not a beam size, and a misspelt field is an error, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)

    text: list[str] = Field(description="sentences to translate; a blank one gives a blank translation")
    beam_size: int = Field(5, description="1 = greedy; at most the service's max_beam")
    nbest: int = Field(1, description="hypotheses per sentence (1..beam_size); above 1, lists per sentence")
    alpha: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                                description="GNMT length penalty strength (default: the model's, chosen on "
                                            "validation; /info shows it under decoding)")
    normalisation: Literal[NORMALISATIONS] = Field("gnmt", description="how finished beams are ranked")
    attention: bool = Field(False, description="also return the first sentence's attention weights")


class Attention(BaseModel):
    source: list[str]            # source subwords, then "</s>"
    target: list[str]            # output subwords (then "</s>" when the output ended with it)
    weights: list[list[float]]   # (len(target), len(source))


class TranslateResponse(BaseModel):
    translations: list[str] | list[list[str]]
    scores: list[float] | list[list[float]]
    model: str | None
    elapsed_ms: float
    attention: Attention | None = None


def _refusal(status: int, error: str, **fields) -> JSONResponse:
    return JSONResponse({"error": error, **fields}, status_code=status)


def _limit(status: int, error: str, limit: str, value) -> JSONResponse:
    return _refusal(status, error, limit=limit, value=value)


def attention_json(t: Translation) -> dict | None:
    """The attention of one translation with its axis labels (None when it has none)."""
    if t.attention is None or t.source_pieces is None:
        return None
    weights = t.attention.float().tolist()                     # (steps, src subwords + EOS)
    target = (t.pieces + ["</s>"])[:len(weights)]
    return {"source": list(t.source_pieces), "target": target, "weights": weights}


def response_json(hyps: list[list[Translation]], nbest: int, model: str | None, elapsed_ms: float,
                  attention: bool) -> dict:
    if nbest == 1:
        translations, scores = [h[0].text for h in hyps], [h[0].score for h in hyps]
    else:
        translations, scores = [[t.text for t in h] for h in hyps], [[t.score for t in h] for h in hyps]
    return {"translations": translations, "scores": scores, "model": model, "elapsed_ms": elapsed_ms,
            "attention": attention_json(hyps[0][0]) if attention and hyps else None}


# ---- the request body limit ---------------------------------------------------------

class BodyLimit:
    """Refuse a request body over `max_bytes` (413) before anything parses it.

    A declared Content-Length over the limit is refused unread; a chunked body is read
    up to the limit and refused as soon as it passes it. A body within the limit is
    handed on to the app unchanged.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = _limit(413, "request body too large", "max_body_bytes", self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                return await _refusal(400, "invalid Content-Length header",
                                      value=declared.decode("latin-1"))(scope, receive, send)
            if too_large:
                return await refusal(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":       # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await refusal(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                        # later: the disconnect, when it comes

        return await self.app(scope, replay, send)


# ---- the app ------------------------------------------------------------------------

def _page() -> str:
    return resources.files("seq2seq").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(source: Translator | str | Path, settings: ServeSettings | None = None, *,
               card: dict | None = None, device: str = "cpu", max_source_len: int = 250,
               precision: str = "float32", board: tuple[StatsBoard, int] | None = None) -> FastAPI:
    """The service over a checkpoint path (its card is read from it) or a loaded Translator.

    A Translator comes without a file to read a card from: pass `card` for /info to
    answer (else /info answers 404). The batcher's thread runs while the app's lifespan
    does (uvicorn, or `with TestClient(app)`). `board`: (the shared board, this worker's
    row) when this app is one of several worker processes (workers.py); /health then
    answers for all of them, and a worker holding more than its share of the clients
    closes a connection now and then (`ConnectionBalancer`).
    """
    settings = settings or ServeSettings()
    if isinstance(source, (str, Path)):
        translator = Translator.from_checkpoint(source, device=device, max_source_len=max_source_len,
                                                precision=precision)
        card = card or model_card(source)
    else:
        translator = source
    model_name = Path(card["checkpoint"]).name if card and card.get("checkpoint") else None
    batcher = Batcher(translator, max_batch_sentences=settings.max_batch_sentences,
                      max_wait_ms=settings.batch_wait_ms, join_group=settings.join_group,
                      join_wait_ms=settings.join_wait_ms)
    page = _page()
    balancer = ConnectionBalancer(*board) if board else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        publishing = asyncio.create_task(board[0].keep_publishing(board[1], batcher, balancer)) if board else None
        try:
            yield
        finally:
            if publishing:
                publishing.cancel()
            # uvicorn has let in-flight requests finish by now; close() decodes any leftovers
            await asyncio.to_thread(batcher.close, settings.timeout_s)

    app = FastAPI(title="seq2seq", version=__version__, lifespan=lifespan,
                  description="Translate sentences with an attention-LSTM checkpoint. "
                              "Concurrent requests are decoded together.")
    app.state.batcher, app.state.settings, app.state.balancer = batcher, settings, balancer
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type.lower():
            # curl -d sends a form unless told otherwise: say so instead of "not a dictionary"
            return _refusal(415, "send the body as JSON, with Content-Type: application/json",
                            value=content_type or None)
        if any(e["type"] == "json_invalid" for e in errors):
            return _refusal(400, "invalid JSON", detail=errors)
        return _refusal(422, "invalid request", detail=errors)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> JSONResponse:
        # a bug of ours still answers in JSON (Starlette logs the traceback)
        return _refusal(500, "internal error", detail=f"{type(exc).__name__}: {exc}")

    @app.post("/translate", response_model=TranslateResponse, responses={
        400: {"description": "invalid JSON"},
        415: {"description": "the body is not sent as JSON"},
        408: {"description": "timed out (limit timeout_s)"},
        413: {"description": "too large: limit max_sentences, max_chars or max_body_bytes"},
        503: {"description": "the service is shutting down or its decoding worker stopped"},
        422: {"description": "invalid request, beam_size out of range (limit max_beam), or bad nbest"}})
    async def translate(req: TranslateRequest, request: Request):
        if balancer:
            balancer.seen(request.client)
        if len(req.text) > settings.max_sentences:
            return _limit(413, "too many sentences", "max_sentences", settings.max_sentences)
        if any(len(s) > settings.max_chars for s in req.text):
            return _limit(413, "sentence too long", "max_chars", settings.max_chars)
        if not 1 <= req.beam_size <= settings.max_beam:
            return _refusal(422, f"beam_size must be in 1..{settings.max_beam}, got {req.beam_size}",
                            limit="max_beam", value=settings.max_beam)
        try:
            options = translator.resolve(SearchOptions(beam_size=req.beam_size, nbest=req.nbest,
                                                       alpha=req.alpha, normalisation=req.normalisation))
        except ValueError as e:
            return _refusal(422, str(e))
        start = time.perf_counter()
        if batcher.pending + len(req.text) > settings.max_queued:
            # overloaded: refuse now rather than let every request wait for its timeout
            refusal = _limit(503, "too many sentences waiting", "max_queued", settings.max_queued)
            refusal.headers["Retry-After"] = "1"
            return refusal
        try:
            future = batcher.submit(req.text, options, attention=req.attention)
        except BatcherUnavailable as e:
            return _refusal(503, "service unavailable", detail=str(e))
        try:
            # on timeout wait_for cancels the wrapped future, which drops the sentences still queued
            hyps = await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
        except asyncio.TimeoutError:
            return _limit(408, "request timed out", "timeout_s", settings.timeout_s)
        except Exception as e:  # noqa: BLE001 - a decoding failure is ours: 500, named, and the worker lives on
            return _refusal(500, "translation failed", detail=f"{type(e).__name__}: {e}")
        elapsed_ms = (time.perf_counter() - start) * 1000
        # already in TranslateResponse's shape (the tests check it): answered as it is, without
        # FastAPI validating and re-encoding it through that model on every request
        response = JSONResponse(response_json(hyps, req.nbest, model_name, elapsed_ms, req.attention))
        if balancer and balancer.close(request.client):
            response.headers["Connection"] = "close"   # this worker has more than its share of clients
        return response

    @app.get("/health")
    async def health():
        if not batcher.alive:
            return JSONResponse({"status": "decoding worker stopped", "queued_sentences": batcher.pending},
                                status_code=503)
        if board is not None:   # one of several worker processes: answer for all of them
            board[0].publish(board[1], batcher, balancer.clients())
            answer = board[0].health(batcher)
            return answer if answer["status"] == "ok" else JSONResponse(answer, status_code=503)
        return {"status": "ok", "queued_sentences": batcher.pending, "decoder": batcher.stats.as_dict(),
                "process_cpu_s": round(time.process_time(), 3)}   # all threads: decoder, torch's, HTTP

    @app.get("/info")
    async def info():
        if card is None:
            return _refusal(404, "no model card: this service was built from a Translator without one")
        return {**card, "service": {**asdict(settings), "precision": translator.precision}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


# ---- the command line -----------------------------------------------------------------

def serve_parser() -> argparse.ArgumentParser:
    d = ServeSettings()
    p = argparse.ArgumentParser(
        prog="seq2seq-serve",
        description="Serve a checkpoint over HTTP: POST /translate (JSON), GET /health, /info, "
                    "/docs, and a page at /. Binds to the loopback interface unless --host says otherwise.")
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt or model.pt written by seq2seq-train")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bfloat16 where the CPU has AVX512_BF16 or AMX (or the GPU supports it), else "
                        "float32; bfloat16: the weights in bfloat16; int8: the decoder's matrices in int8 "
                        "(CPU only; default: auto)")
    p.add_argument("--max-source-len", type=int, default=250,
                   help="longer inputs are cropped to this many subwords, with a warning")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-sentences", type=int, default=d.max_batch_sentences,
                   help=f"sentences in flight in the decoder at most (default: {d.max_batch_sentences})")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"when the decoder is idle, how long a sentence waits for others to start with it; "
                        f"while it runs, sentences join it between steps (default: {d.batch_wait_ms:g})")
    g.add_argument("--join-group", type=int, default=d.join_group,
                   help=f"while the decoder runs, queued sentences join it once this many fit "
                        f"(default: {d.join_group}) ...")
    g.add_argument("--join-wait-ms", type=float, default=d.join_wait_ms,
                   help=f"... or once the oldest has waited this long (default: {d.join_wait_ms:g})")
    g = p.add_argument_group("limits (each refusal names the limit: 413 or 422, 503 for a full queue)")
    g.add_argument("--max-sentences", type=int, default=d.max_sentences,
                   help=f"per request (default: {d.max_sentences})")
    g.add_argument("--max-chars", type=int, default=d.max_chars, help=f"per sentence (default: {d.max_chars})")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"per request body (default: {d.max_body_bytes})")
    g.add_argument("--timeout", type=float, default=d.timeout_s,
                   help=f"seconds per request, waiting included (default: {d.timeout_s:g})")
    g.add_argument("--max-beam", type=int, default=d.max_beam, help=f"largest beam_size (default: {d.max_beam})")
    g.add_argument("--max-queued", type=int, default=d.max_queued,
                   help=f"sentences waiting for decoding, all requests together; beyond, 503 (default: {d.max_queued})")
    g = p.add_argument_group("processes")
    g.add_argument("--workers", type=int, default=1,
                   help="service processes sharing the port, each with its own model and decoder (Linux; "
                        "default: 1). Two use a 2-core CPU better than one (docs/RESULTS.md)")
    g.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of each process's decoder (default: with one worker, torch's "
                        "default; with more, the CPUs shared out among them)")
    p.add_argument("--graceful-timeout", type=int, default=30,
                   help="on SIGTERM/Ctrl+C, seconds to let in-flight requests finish (default: 30)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return p


def _settings(args: argparse.Namespace) -> ServeSettings:
    try:
        return ServeSettings(
            max_batch_sentences=args.max_batch_sentences, batch_wait_ms=args.batch_wait_ms,
            join_group=args.join_group, join_wait_ms=args.join_wait_ms,
            max_sentences=args.max_sentences, max_chars=args.max_chars, max_body_bytes=args.max_body_bytes,
            timeout_s=args.timeout, max_beam=args.max_beam, max_queued=args.max_queued)
    except SettingError as e:
        flag = "--" + e.name.removesuffix("_s").replace("_", "-")   # timeout_s is --timeout
        raise InputError(f"{flag} {str(e).removeprefix(e.name + ' ')}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(app: FastAPI, log_level: str, graceful_timeout: int, *, host: str = "127.0.0.1",
               port: int = 8000, sockets: list | None = None) -> int:
    """uvicorn over the app until SIGTERM/SIGINT (in-flight requests finish); 0 if it started."""
    import uvicorn  # the server is needed by the command line only; tests drive the app directly

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=graceful_timeout))
    # After its graceful shutdown uvicorn raises the caught SIGTERM again, so that the
    # process dies of it. A stop asked for by a service manager is a clean exit: a no-op
    # handler absorbs that second SIGTERM and we return 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


def _worker(index: int, spec: WorkerSpec, board: StatsBoard) -> None:
    """One of `--workers N` service processes (started by workers.serve_workers): a whole
    service with its own model and decoder, on its own SO_REUSEPORT socket of the shared port."""
    import torch

    logging.basicConfig(level=spec.log_level.upper(), format=f"%(levelname)s: [worker {index}] %(message)s")
    torch.set_num_threads(spec.threads)
    sock = bound_socket(spec.host, spec.port, reuseport=True)
    app = create_app(spec.checkpoint, spec.settings, card=spec.card, device=spec.device,
                     max_source_len=spec.max_source_len, precision=spec.precision, board=(board, index))
    sys.exit(run_server(app, spec.log_level, spec.graceful_timeout, sockets=[sock]))


def _serve(argv: Sequence[str] | None) -> int:
    from .cli import check_precision_flags  # the same message as seq2seq-translate's

    args = serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--workers", args.workers), ("--threads", args.threads),
                        ("--max-source-len", args.max_source_len)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    settings = _settings(args)
    check_precision_flags(args.precision, args.device)
    if not _is_loopback(args.host):
        log.warning("binding %s: the service has no authentication; anyone who can reach it can use it", args.host)
    if args.workers > 1:
        check_workers_supported()
        if args.device != "cpu":
            log.warning("--workers %d --device %s: each worker loads its own copy of the model onto that device",
                        args.workers, args.device)
        holder = claim_port(args.host, args.port, reuseport=True)   # a taken port fails before the checkpoint is read
        try:
            card = model_card(args.checkpoint)   # a bad checkpoint fails here, before any worker starts
        except BaseException:
            holder.close()
            raise
        spec = WorkerSpec(args.checkpoint, card, settings, args.device, args.max_source_len, args.precision,
                          args.host, args.port, args.threads or default_threads(args.workers), args.log_level,
                          args.graceful_timeout)
        log.info("serving %s with %s", args.checkpoint, json.dumps(asdict(settings)))
        return serve_workers(spec, args.workers, _worker, holder)
    sock = claim_port(args.host, args.port)   # a taken port fails now, not after loading the model
    with sock:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        app = create_app(args.checkpoint, settings, device=args.device, max_source_len=args.max_source_len,
                         precision=args.precision)
        log.info("serving %s with %s", args.checkpoint, json.dumps(asdict(settings)))
        return run_server(app, args.log_level, args.graceful_timeout, host=args.host,
                          port=sock.getsockname()[1], sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import _run  # the command lines' one error policy: a user mistake is one line and exit code 2
    return _run(_serve, argv)
