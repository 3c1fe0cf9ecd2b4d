"""The OpenAI-compatible server against a scripted generator: validation, queue, SSE, cancellation.

Real HTTP on a loopback port (http.client, raw sockets and the official openai client); the model
is replaced by a fake generator so every path is fast and deterministic.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
from typing import Any, Optional

import pytest

from mlx_specstream.openai_schema import RequestError, parse_request
from mlx_specstream.server import create_server

CONTEXT = 64


@dataclasses.dataclass
class FakeResponse:
    text: str
    token_ids: list
    accepted: list
    prompt_tokens: int
    generation_tokens: int
    decode_steps: int
    tokens_per_step: float
    decode_tokens_per_sec: float
    prompt_tokens_per_sec: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None


class FakeModel:
    """Yields 'w0 w1 ...', two tokens per step. ``tree`` selects a behaviour:
    'gate' waits for ``gate``; 'slow' sleeps 20 ms a step; 'bad' / 'boom' raise."""

    def __init__(self):
        self.calls: list[dict[str, Any]] = []
        self.closed: list[int] = []  # tokens yielded when each generation ended
        self.gate = threading.Event()

    def generate(self, prompt_ids, max_tokens, tree=None, stop=None, **params):
        self.calls.append(dict(prompt_ids=list(prompt_ids), max_tokens=max_tokens, tree=tree, stop=stop, **params))
        if tree == "bad":
            raise ValueError("Tree 'bad' is malformed; give per-depth top-k like '2,1'.")
        if tree == "boom":
            raise RuntimeError("the accelerator caught fire")
        n = 0
        try:
            while n < max_tokens:
                if tree == "gate":
                    assert self.gate.wait(10)
                if tree == "slow":
                    time.sleep(0.02)
                step = min(2, max_tokens - n)
                n += step
                text = "".join(f"w{i} " for i in range(n - step, n))
                finish = "length" if n >= max_tokens else None
                if stop and any(s in text for s in stop):
                    text, finish = text.split(stop[0])[0], "stop"
                yield FakeResponse(text, list(range(step)), [0] * (step - 1), len(prompt_ids), n, n // 2, 2.0,
                                   100.0, 1000.0, 0.01, finish)
                if finish:
                    return
        finally:
            self.closed.append(n)


def encode(prompt):
    if isinstance(prompt, str):
        return list(prompt.encode())
    if prompt and isinstance(prompt[0], dict):
        return list("".join(f"<{m['role']}>{m['content']}" for m in prompt).encode())
    return list(prompt)


@pytest.fixture()
def fake():
    model = FakeModel()
    server = create_server(model.generate, encode, "tiny", port=0, context=CONTEXT, queue_size=1,
                           default_max_tokens=8, max_body_bytes=4096, vocab_size=100)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield model, server
    model.gate.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def request(server, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
            headers: Optional[dict] = None) -> tuple[int, Any, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(payload) if "json" in ctype else payload.decode(), dict(resp.getheaders())


def chat_body(**extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- happy paths


def test_warm_up_runs_on_the_generation_thread_first_and_its_error_is_raised():
    """Only the generation thread runs the model (with MKL, a second thread calling BLAS halved
    every later generation's speed), warm-up included, and before the first request."""
    model, threads = FakeModel(), []
    generate = model.generate

    def record(*args, **kwargs):
        threads.append(threading.current_thread())
        return generate(*args, **kwargs)

    server = create_server(record, encode, "tiny", port=0, context=CONTEXT,
                           warm_up=lambda: threads.append(("warm-up", threading.current_thread())))
    assert threads and threads[0][0] == "warm-up"  # done by the time the server exists
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        status, _, _ = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200
        assert threads[1] is threads[0][1] and threads[1] is not threading.current_thread()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    def broken():
        raise RuntimeError("warm-up failed: the model does not fit")

    with pytest.raises(RuntimeError, match="warm-up failed"):
        create_server(record, encode, "tiny", port=0, warm_up=broken)


def test_binds_loopback_by_default():
    server = create_server(lambda ids, **kw: iter(()), encode, "m", port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_models_and_health(fake):
    _, server = fake
    status, body, _ = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    status, body, _ = request(server, "GET", "/v1/models/tiny")
    assert status == 200 and body["id"] == "tiny"
    status, body, _ = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["busy"] is False and body["queue_size"] == 1


def test_chat_completion_with_usage(fake):
    model, server = fake
    status, body, _ = request(server, "POST", "/v1/chat/completions",
                              chat_body(max_tokens=5, temperature=0.5, top_p=0.9, seed=3, top_k=4, tree="2,1"))
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "w0 w1 w2 w3 w4 "}
    assert choice["finish_reason"] == "length"
    prompt_len = len(encode([{"role": "user", "content": "hi"}]))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 5, "total_tokens": prompt_len + 5,
                             "tokens_per_step": 2.0, "decode_steps": 2, "decode_tokens_per_sec": 100.0}
    call = model.calls[-1]
    assert (call["max_tokens"], call["temp"], call["top_p"], call["seed"], call["top_k"], call["tree"]) == (
        5, 0.5, 0.9, 3, 4, "2,1")
    assert call["speculate"] is None  # not in the request: the model's own default (speculates_by_default)


def test_completion_text_and_token_prompt(fake):
    model, server = fake
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 2})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "w0 w1 " and body["usage"]["prompt_tokens"] == 3
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": [[5, 6, 7, 8]], "max_tokens": 1,
                                                                   "speculate": False})
    assert status == 200 and model.calls[-1]["prompt_ids"] == [5, 6, 7, 8]
    assert model.calls[-1]["speculate"] is False


def test_default_max_tokens_is_clamped_to_the_context(fake):
    model, server = fake
    status, _, _ = request(server, "POST", "/v1/completions", {"prompt": "x" * 60})
    assert status == 200 and model.calls[-1]["max_tokens"] == CONTEXT - 60


def test_stop_strings_reach_the_generator(fake):
    model, server = fake
    status, body, _ = request(server, "POST", "/v1/chat/completions", chat_body(stop="w3", max_tokens=8))
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert model.calls[-1]["stop"] == ["w3"]


def test_chat_streaming_sse(fake):
    _, server = fake
    status, text, headers = request(server, "POST", "/v1/chat/completions",
                                    chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = sse_events(text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == "w0 w1 w2 w3 w4 "
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["tokens_per_step"] == 2.0
    assert len({e["id"] for e in events}) == 1


def test_completion_streaming_without_usage(fake):
    _, server = fake
    status, text, _ = request(server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3, "stream": True})
    events = sse_events(text)
    assert "".join(e["choices"][0]["text"] for e in events) == "w0 w1 w2 "
    assert not any("usage" in e for e in events)


def test_keep_alive_serves_several_requests_on_one_connection(fake):
    _, server = fake
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    for stream in (False, True, False):
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 2, "stream": stream}))
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()


def test_openai_client_against_fake(fake):
    openai = pytest.importorskip("openai")
    _, server = fake
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.choices[0].message.content == "w0 w1 w2 " and out.usage.completion_tokens == 3
    assert out.usage.model_extra["tokens_per_step"] == 2.0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True) if c.choices]
    assert "".join(pieces) == "w0 w1 w2 w3 "
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "does not exist" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)


# --------------------------------------------------------------------------- validation

BAD_CHAT = [
    ({"messages": []}, 422, "messages"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 422,
     "messages[0].content"),
    ({"messages": ["hi"]}, 422, "messages[0]"),
    (chat_body(model="other"), 400, "model"),
    (chat_body(model=7), 422, "model"),
    (chat_body(max_tokens=0), 422, "max_tokens"),
    (chat_body(max_tokens=-3), 422, "max_tokens"),
    (chat_body(max_tokens=CONTEXT + 1), 422, "max_tokens"),
    (chat_body(max_tokens="12"), 422, "max_tokens"),
    (chat_body(max_tokens=3.5), 422, "max_tokens"),
    (chat_body(max_tokens=True), 422, "max_tokens"),
    (chat_body(max_completion_tokens=0), 422, "max_completion_tokens"),
    (chat_body(temperature=-0.1), 422, "temperature"),
    (chat_body(temperature=2.5), 422, "temperature"),
    (chat_body(temperature="hot"), 422, "temperature"),
    (chat_body(top_p=0), 422, "top_p"),
    (chat_body(top_p=1.5), 422, "top_p"),
    (chat_body(top_k=-1), 422, "top_k"),
    (chat_body(min_p=2), 422, "min_p"),
    (chat_body(seed="x"), 422, "seed"),
    (chat_body(stop=["a"] * 5), 422, "stop"),
    (chat_body(stop=[""]), 422, "stop"),
    (chat_body(stop=5), 422, "stop"),
    (chat_body(stream="yes"), 422, "stream"),
    (chat_body(stream_options={"include_usage": "yes"}), 422, "stream_options"),
    (chat_body(n=2), 422, "n"),
    (chat_body(logprobs=True), 422, "logprobs"),
    (chat_body(tools=[{"type": "function"}]), 422, "tools"),
    (chat_body(presence_penalty=0.5), 422, "presence_penalty"),
    (chat_body(frequency_penalty=9), 422, "frequency_penalty"),
    (chat_body(response_format={"type": "json_object"}), 422, "response_format"),
    (chat_body(tree={"k": 2}), 422, "tree"),
    (chat_body(speculate="no"), 422, "speculate"),
    (chat_body(messages=[{"role": "user", "content": "x" * 70}]), 400, "messages"),  # > context
    (chat_body(messages=[{"role": "user", "content": "x" * 40}], max_tokens=40), 400, "messages"),
]

BAD_COMPLETION = [
    ({}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": []}, 422, "prompt"),
    ({"prompt": ["a", "b"]}, 422, "prompt"),
    ({"prompt": [1, "a"]}, 422, "prompt"),
    ({"prompt": [1, 100]}, 422, "prompt"),  # vocab_size is 100
    ({"prompt": [-1]}, 422, "prompt"),
    ({"prompt": {"text": "a"}}, 422, "prompt"),
    ({"prompt": "a", "echo": True}, 422, "echo"),
    ({"prompt": "a", "best_of": 3}, 422, "best_of"),
    ({"prompt": "a", "suffix": "z"}, 422, "suffix"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHAT)
def test_chat_validation(fake, body, status, param):
    model, server = fake
    got, err, _ = request(server, "POST", "/v1/chat/completions", body)
    assert (got, err["error"]["param"]) == (status, param), err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert model.calls == []  # nothing bad reaches the model


@pytest.mark.parametrize("body,status,param", BAD_COMPLETION)
def test_completion_validation(fake, body, status, param):
    model, server = fake
    got, err, _ = request(server, "POST", "/v1/completions", body)
    assert (got, err["error"]["param"]) == (status, param), err
    assert model.calls == []


@pytest.mark.parametrize("raw,status,code", [
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"null", 400, "invalid_json"),
    (b"x" * 5000, 413, "body_too_large"),
])
def test_malformed_bodies(fake, raw, status, code):
    _, server = fake
    got, err, _ = request(server, "POST", "/v1/chat/completions", raw=raw)
    assert (got, err["error"]["code"]) == (status, code)


def raw_exchange(server, data: bytes) -> bytes:
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            part = sock.recv(65536)
            if not part:
                break
            chunks.append(part)
    return b"".join(chunks)


def test_protocol_errors_are_json(fake):
    _, server = fake
    out = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411") and b'"length_required"' in out
    for line, status in ((b"GET /health HTTP/abc", b"400"), (b"GET /health HTTP/2.0", b"505"), (b"GARBAGE", b"400")):
        out = raw_exchange(server, line + b"\r\n\r\n")
        assert out.split(b" ")[1] == status and b'"error"' in out and b"<html" not in out.lower()
    out = raw_exchange(server, b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.split(b" ")[1] == b"501" and b'"error"' in out


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/nope", 404),
    ("GET", "/v1/chat/completions", 405),
    ("POST", "/v1/models", 405),
    ("POST", "/v1/embeddings", 404),
    ("DELETE", "/health", 405),
    ("GET", "/v1/models/other", 404),
])
def test_wrong_routes(fake, method, path, status):
    _, server = fake
    got, err, _ = request(server, method, path, body={} if method == "POST" else None)
    assert got == status and "error" in err


def test_runtime_value_error_is_422_and_other_errors_500(fake):
    model, server = fake
    got, err, _ = request(server, "POST", "/v1/completions", {"prompt": "a", "tree": "bad"})
    assert got == 422 and "malformed" in err["error"]["message"]
    got, err, _ = request(server, "POST", "/v1/completions", {"prompt": "a", "tree": "boom"})
    assert got == 500 and "caught fire" in err["error"]["message"]
    status, body, _ = request(server, "GET", "/health")
    assert body["failed"] == 2
    got, _, _ = request(server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
    assert got == 200  # the worker survives


def test_parse_request_defaults():
    req = parse_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "be"}, {
        "type": "text", "text": " brief"}]}, {"role": "assistant", "content": None}]}, True, "m", 16, 32)
    assert req.prompt == [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": ""}]
    assert req.params == dict(max_tokens=16, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=None,
                              tree=None, speculate=None)
    assert not req.stream and not req.max_tokens_given
    with pytest.raises(RequestError):
        parse_request({"prompt": "a", "tree": [[0], [True]]}, False, "m", 16, 32)
    assert parse_request({"prompt": "a", "tree": [[0], [0, 0]]}, False, "m", 16, 32).params["tree"] == [[0], [0, 0]]


# --------------------------------------------------------------------------- queue and cancellation


def _start_stream(server, body) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _health(server) -> dict:
    return request(server, "GET", "/health")[1]


def test_full_queue_gets_503_and_requests_run_in_order(fake):
    model, server = fake
    first = _start_stream(server, chat_body(max_tokens=2, tree="gate", stream=True))
    assert wait_for(lambda: _health(server)["busy"])
    results = {}
    second = threading.Thread(target=lambda: results.setdefault("second", request(
        server, "POST", "/v1/completions", {"prompt": "second", "max_tokens": 1})))
    second.start()
    assert wait_for(lambda: _health(server)["queued"] == 1)
    status, err, _ = request(server, "POST", "/v1/completions", {"prompt": "third"})
    assert status == 503 and err["error"]["code"] == "queue_full"
    model.gate.set()
    first.settimeout(10)
    data = b""
    while b"[DONE]" not in data:
        part = first.recv(65536)
        assert part
        data += part
    first.close()
    second.join(10)
    assert results["second"][0] == 200
    assert [c["prompt_ids"] for c in model.calls][1] == list(b"second")  # FIFO; 'third' never ran
    assert len(model.calls) == 2


def test_disconnect_mid_stream_cancels_generation(fake):
    model, server = fake
    sock = _start_stream(server, chat_body(max_tokens=40, tree="slow", stream=True))
    received = b""
    while b"data: " not in received:
        part = sock.recv(65536)
        assert part
        received += part
    sock.close()
    assert wait_for(lambda: _health(server)["cancelled"] == 1)
    assert wait_for(lambda: model.closed != [])
    assert model.closed[0] < 40  # stopped early
    assert not _health(server)["busy"]
    status, _, _ = request(server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
    assert status == 200


def test_disconnect_while_waiting_cancels_non_stream_and_queued(fake):
    model, server = fake
    running = _start_stream(server, {**chat_body(max_tokens=40, tree="gate"), "stream": False})
    assert wait_for(lambda: _health(server)["busy"])
    queued = _start_stream(server, chat_body(messages=[{"role": "user", "content": "queued"}]))
    assert wait_for(lambda: _health(server)["queued"] == 1)
    queued.close()
    running.close()
    time.sleep(0.2)  # both handlers notice their clients are gone
    model.gate.set()
    assert wait_for(lambda: _health(server)["cancelled"] == 2), _health(server)
    assert len(model.calls) == 1  # the queued request never started
    assert model.closed[0] < 40


def test_disconnect_during_a_non_streaming_generation_cancels_it(fake):
    model, server = fake
    sock = _start_stream(server, chat_body(max_tokens=40, tree="slow"))  # 20 ms a step, ~0.4 s in all
    assert wait_for(lambda: len(model.calls) == 1 and _health(server)["busy"])
    sock.close()
    assert wait_for(lambda: _health(server)["cancelled"] == 1)
    assert wait_for(lambda: model.closed != []) and model.closed[0] < 40
