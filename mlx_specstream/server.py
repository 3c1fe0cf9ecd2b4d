"""An OpenAI-compatible HTTP server on the standard library (no extra dependencies).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming with
server-sent events or not), ``GET /v1/models``, ``GET /health``.

* One model, one generation at a time: requests wait in a bounded FIFO queue served by one
  worker thread; a full queue answers 503 at once.
* A client that disconnects (mid-stream or while queued) cancels its generation.
* Every request is validated before it is queued. Bad input gets a JSON error body:
  400 for malformed JSON, an unknown model or a prompt too long for the context window;
  422 for a field of the wrong type or out of range; 404/405 for wrong paths or methods;
  411/413 for a missing or too large body. Only a failure of the model itself is a 500.
* ``usage`` carries ``tokens_per_step`` (the call-reduction ratio) beside the token counts.

The request schema (and its extensions: ``top_k``, ``min_p``, ``tree``, ``speculate``) lives in
``openai_schema.py``.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import select
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional

from .host import release_mlx_streams
from .openai_schema import CompletionRequest, RequestError, parse_request, usage

GenerateFn = Callable[..., Iterator[Any]]  # (prompt_ids, **params) -> GenerationResponse-like
EncodeFn = Callable[[Any], list]  # str | list[int] | list[dict] -> prompt token ids

_POLL_S = 0.05  # how often a waiting handler checks whether its client is still there


# ---------------------------------------------------------------------------------------------
# The generation queue


@dataclasses.dataclass
class Job:
    prompt_ids: list[int]
    params: dict[str, Any]
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    # ("chunk", resp) ... then exactly one of ("done", None), ("error", exc), ("cancelled", None)
    events: "queue.Queue[tuple[str, Any]]" = dataclasses.field(default_factory=queue.Queue)


class Engine:
    """One worker thread runs queued jobs one at a time, in order."""

    def __init__(self, generate_fn: GenerateFn, queue_size: int, warm_up: Optional[Callable[[], None]] = None):
        """``warm_up`` runs first, on the worker thread; the constructor waits for it and
        re-raises its error."""
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}.")
        self.generate_fn = generate_fn
        self.queue_size = queue_size
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=queue_size)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.busy = False
        self.current: Optional[Job] = None
        self._lock = threading.Lock()
        self._warm_up, self._warmed, self._warm_error = warm_up, threading.Event(), None
        self._worker = threading.Thread(target=self._run, name="specstream-generate", daemon=True)
        self._worker.start()
        self._warmed.wait()
        if self._warm_error is not None:
            raise self._warm_error

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        while True:  # cancel everything still waiting, then stop the worker
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.events.put(("cancelled", None))
        current = self.current
        if current is not None:
            current.cancel.set()
        try:
            self.jobs.put(None, timeout=timeout)
        except queue.Full:
            return  # a daemon thread: it dies with the process
        self._worker.join(timeout)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _run(self) -> None:
        try:
            self._serve_jobs()
        finally:
            release_mlx_streams()

    def _serve_jobs(self) -> None:
        try:
            if self._warm_up is not None:
                self._warm_up()
        except Exception as exc:  # re-raised by the constructor
            self._warm_error = exc
            return
        finally:
            self._warmed.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():  # the client left while waiting
                self._count("cancelled")
                job.events.put(("cancelled", None))
                continue
            self.busy, self.current = True, job
            try:
                self._generate(job)
            finally:
                self.busy, self.current = False, None

    def _generate(self, job: Job) -> None:
        gen = None
        try:
            gen = self.generate_fn(job.prompt_ids, **job.params)
            for resp in gen:
                if job.cancel.is_set():
                    break
                job.events.put(("chunk", resp))
            else:
                self._count("served")
                job.events.put(("done", None))
                return
            self._count("cancelled")
            job.events.put(("cancelled", None))
        except Exception as exc:  # reported to the client of this job; the worker goes on
            self._count("failed")
            job.events.put(("error", exc))
        finally:
            if gen is not None and hasattr(gen, "close"):
                gen.close()


# ---------------------------------------------------------------------------------------------
# HTTP


def _peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed its side (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "specstream"
    timeout = 60  # seconds a client may stay silent mid-request before we drop it
    server: "SpecStreamServer"

    # -- plumbing ---------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: Any, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        # Replaces the HTML errors of http.server (bad request lines, unknown methods) with JSON,
        # with a status line even when the request line was too broken to name its version.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        self._send_json(code, RequestError(code, message or phrase, None, phrase.lower().replace(" ", "_")).body(),
                        close=True)

    def _error(self, err: RequestError, close: bool = False) -> None:
        self._send_json(err.status, err.body(), close=close)

    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "Chunked request bodies are not supported; send Content-Length.", None,
                               "length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "The request needs a Content-Length header and a JSON body.", None,
                               "length_required")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, "Content-Length must be an integer.", None, "invalid_header") from None
        if size < 0 or size > self.server.max_body_bytes:
            raise RequestError(413, f"The request body is {size} bytes; at most {self.server.max_body_bytes} are "
                               "accepted.", None, "body_too_large")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"The request body is not valid JSON ({exc}).", None, "invalid_json") from None

    # -- routes -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        s = self.server
        if path == "/health":
            engine = s.engine
            self._send_json(200, {"status": "ok", "model": s.model_id, "busy": engine.busy,
                                  "queued": engine.jobs.qsize(), "queue_size": engine.queue_size, **engine.counts})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [s.model_card()]})
        elif path == f"/v1/models/{s.model_id}":
            self._send_json(200, s.model_card())
        elif path.startswith("/v1/models/"):
            self._error(RequestError(404, f"The model {path[len('/v1/models/'):]!r} does not exist; this server "
                                     f"serves {s.model_id!r}.", "model", "model_not_found"))
        elif path in ("/v1/chat/completions", "/v1/completions"):
            self._error(RequestError(405, f"{path} takes POST.", None, "method_not_allowed"))
        else:
            self._error(RequestError(404, f"No route {self.path}. Try /v1/chat/completions, /v1/completions, "
                                     "/v1/models or /health.", None, "not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            status = 405 if path in ("/health", "/v1/models") else 404
            # the body is unread: close the connection rather than parse it as the next request
            self._error(RequestError(status, f"No POST route {self.path}.", None, "not_found"), close=True)
            return
        try:
            body = self._read_body()
            req = self.server.parse(body, chat=path.endswith("chat/completions"))
            ids = self.server.prompt_ids(req)
        except RequestError as err:
            self._error(err, close=err.status in (411, 413))
            return
        self._complete(req, ids)

    def do_PUT(self) -> None:
        self._error(RequestError(405, "Use GET or POST.", None, "method_not_allowed"), close=True)

    do_DELETE = do_PATCH = do_PUT

    # -- generation -------------------------------------------------------------------------
    def _next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event; raises _ClientGone (and cancels the job) if the client left.

        The client is checked at least every _POLL_S seconds, also while events keep coming
        (a non-streaming response writes nothing until the end, so no write would fail)."""
        while True:
            now = time.monotonic()
            if now - getattr(self, "_checked_at", 0.0) >= _POLL_S:
                self._checked_at = now
                if _peer_closed(self.connection):
                    job.cancel.set()
                    raise _ClientGone()
            try:
                return job.events.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _complete(self, req: CompletionRequest, ids: list[int]) -> None:
        job = Job(ids, req.params)
        if not self.server.engine.submit(job):
            self._error(RequestError(503, f"The server is busy ({self.server.engine.queue_size} requests waiting); "
                                     "retry shortly.", None, "queue_full"))
            return
        try:
            kind, value = self._next_event(job)
            if kind == "error":
                self._generation_error(value)
                return
            if kind == "cancelled":
                self._error(RequestError(503, "The server is shutting down.", None, "shutting_down"), close=True)
                return
            first = value if kind == "chunk" else None
            if req.stream:
                self._stream(req, job, first)
            else:
                self._whole(req, job, first)
        except _ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            job.cancel.set()
            self.close_connection = True

    def _generation_error(self, exc: Exception) -> None:
        # A ValueError before any output is the runtime refusing the request's settings (e.g. a
        # tree deeper than the model's streams): the client's input, so 422, not 500.
        if isinstance(exc, ValueError):
            self._error(RequestError(422, str(exc), None, "invalid_value"))
        else:
            self._error(RequestError(500, f"Generation failed: {type(exc).__name__}: {exc}", None, "server_error"))

    def _events(self, job: Job, first: Any) -> Iterator[Any]:
        resp = first
        while resp is not None:
            yield resp
            kind, value = self._next_event(job)
            if kind == "chunk":
                resp = value
            elif kind == "error":
                raise value
            else:
                return

    def _whole(self, req: CompletionRequest, job: Job, first: Any) -> None:
        text, last = "", None
        try:
            for resp in self._events(job, first):
                text += resp.text
                last = resp
        except _ClientGone:
            raise
        except Exception as exc:
            self._generation_error(exc)
            return
        finish = (getattr(last, "finish_reason", None) or "length") if last is not None else "length"
        if req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        self._send_json(200, self.server.envelope(req, obj, [choice], usage=usage(last)))

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse(self, obj: Any) -> None:
        self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _stream(self, req: CompletionRequest, job: Job, first: Any) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        s = self.server
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        envelope = s.envelope(req, obj, [])

        def chunk(text: Optional[str], finish: Optional[str], role: bool = False) -> dict[str, Any]:
            if req.chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                return {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {**envelope, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}

        if req.chat:
            self._sse(chunk("", None, role=True))
        last = None
        try:
            for resp in self._events(job, first):
                last = resp
                if resp.text:
                    self._sse(chunk(resp.text, None))
        except _ClientGone:
            raise
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            self._sse({"error": RequestError(500, f"Generation failed: {type(exc).__name__}: {exc}").body()["error"]})
        else:
            finish = getattr(last, "finish_reason", None) or "length"
            self._sse(chunk(None if req.chat else "", finish))
            if req.include_usage:
                self._sse({**envelope, "choices": [], "usage": usage(last)})
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class SpecStreamServer(ThreadingHTTPServer):
    """The HTTP server; see :func:`create_server`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], generate_fn: GenerateFn, encode_fn: EncodeFn, model_id: str,
        context: int, queue_size: int, default_max_tokens: int, max_tokens_limit: Optional[int],
        max_body_bytes: int, vocab_size: Optional[int], verbose: bool,
        warm_up: Optional[Callable[[], None]] = None,
    ):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.encode_fn = encode_fn
        self.model_id = model_id
        self.context = context
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit or context
        self.max_body_bytes = max_body_bytes
        self.vocab_size = vocab_size
        self.verbose = verbose
        self.created = int(time.time())
        try:
            self.engine = Engine(generate_fn, queue_size, warm_up)
        except BaseException:
            self.socket.close()  # bound above: a failed warm-up leaves no port behind
            raise

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mlx-specstream"}

    def parse(self, body: Any, chat: bool) -> CompletionRequest:
        return parse_request(body, chat, self.model_id, self.default_max_tokens, self.max_tokens_limit,
                             self.vocab_size)

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        """Encode the prompt and check it fits the context window with its ``max_tokens``."""
        try:
            ids = list(self.encode_fn(req.prompt))
        except ValueError as exc:
            raise RequestError(400, str(exc), "messages" if req.chat else "prompt", "invalid_prompt") from None
        if not ids:
            raise RequestError(422, "The prompt encodes to no tokens.", "prompt", "invalid_value")
        room = self.context - len(ids)
        if room < 1 or (req.max_tokens_given and req.params["max_tokens"] > room):
            raise RequestError(
                400, f"This model's context window is {self.context} tokens; the prompt has {len(ids)} and "
                f"max_tokens asks for {req.params['max_tokens']}. Shorten the prompt or lower max_tokens.",
                "messages" if req.chat else "prompt", "context_length_exceeded")
        req.params["max_tokens"] = min(req.params["max_tokens"], room)
        return ids

    def envelope(self, req: CompletionRequest, obj: str, choices: list, usage: Optional[dict] = None) -> dict:
        prefix = "chatcmpl" if req.chat else "cmpl"
        out = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
               "model": self.model_id, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def server_close(self) -> None:
        self.engine.close()
        super().server_close()


def create_server(
    generate_fn: GenerateFn,
    encode_fn: EncodeFn,
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    context: int = 4096,
    queue_size: int = 8,
    default_max_tokens: int = 512,
    max_tokens_limit: Optional[int] = None,
    max_body_bytes: int = 1 << 20,
    vocab_size: Optional[int] = None,
    verbose: bool = False,
    warm_up: Optional[Callable[[], None]] = None,
) -> SpecStreamServer:
    """A bound (not yet serving) server; call ``serve_forever()``, then ``shutdown()`` and
    ``server_close()``. ``port=0`` picks a free port (see ``server.url``). ``warm_up`` runs on
    the generation thread before the server is returned."""
    return SpecStreamServer((host, port), generate_fn, encode_fn, model_id, context, queue_size,
                            default_max_tokens, max_tokens_limit, max_body_bytes, vocab_size, verbose,
                            warm_up)


def server_for_model(model: Any, tokenizer: Any, model_id: str, **kwargs: Any) -> SpecStreamServer:
    """:func:`create_server` for a loaded model: ``mlx_specstream.stream_generate`` behind it."""
    from .generate import encode_prompt, make_prompt_cache, stream_generate
    from .prompting import format_prompt, prompt_template

    # one generation at a time (one worker), so consecutive requests share one prompt cache:
    # a request that starts like the last one (a system prompt, a conversation) prefills the rest
    prompt_cache = make_prompt_cache(model)

    def generate_fn(prompt_ids: list[int], **params: Any) -> Iterator[Any]:
        return stream_generate(model, tokenizer, prompt_ids, prompt_cache=prompt_cache, **params)

    template = prompt_template(getattr(model, "config", None) or {})

    def encode_fn(prompt: Any) -> list[int]:
        # a text prompt is treated as `specstream generate --prompt` treats it: inside the
        # model's prompt template (token ids are taken as they are); chat messages go through
        # the chat template, or the prompt template around the last user message
        if isinstance(prompt, str):
            return encode_prompt(tokenizer, format_prompt(model, prompt))
        return encode_prompt(tokenizer, prompt, template)

    import mlx.core as mx

    mx.eval(model.parameters())  # nothing lazy from this thread is left for the generation thread
    base = getattr(model, "base", model)
    vocab = getattr(getattr(base, "args", None), "vocab_size", None)
    kwargs.setdefault("vocab_size", vocab if isinstance(vocab, int) else None)
    kwargs.setdefault("warm_up", lambda: _warm_up(generate_fn, tokenizer))
    return create_server(generate_fn, encode_fn, model_id, **kwargs)


def _warm_up(generate_fn: GenerateFn, tokenizer: Any) -> None:
    """A short generation on the generation thread before the first request, so one-time
    set-up (compiled steps, buffers) stays out of its latency.

    Only that thread runs matmuls. With MKL, a warm-up on the loading thread made it a second
    thread calling BLAS, and every later generation ran at half speed (docs/lab/2026-12-blas.md, "MKL on
    an Intel host"). MLX streams are per thread, so the loading thread evaluates the model's
    parameters instead (:func:`server_for_model`): nothing lazy from it is left here.
    """
    ids = list(tokenizer.encode("Hello"))[:4] or [0]
    try:
        for _ in generate_fn(ids, max_tokens=4):
            pass
    except ValueError:  # the model's default draft tree does not fit it: warm up plainly
        for _ in generate_fn(ids, max_tokens=4, speculate=False):
            pass
