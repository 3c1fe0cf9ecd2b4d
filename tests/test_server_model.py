"""The server with a real (tiny, random) model: the openai client, streaming, cancellation, and
the ``specstream serve`` command itself. Loopback only."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

import mlx_specstream as ms  # noqa: E402
from mlx_specstream.server import server_for_model  # noqa: E402
from mlx_specstream.config import PruningConfig, SpecStreamConfig  # noqa: E402
from mlx_specstream.testing import write_tiny_model_dir  # noqa: E402

# 3 streams with a default tree that fits them
SPEC = SpecStreamConfig(num_streams=3, num_msa_layers=2, pruning=PruningConfig(rank=4), default_tree="3,2,1")

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("server") / "tiny", spec=SPEC)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return ms.load(model_dir)


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer = loaded
    srv = server_for_model(model, tokenizer, "tiny", port=0, queue_size=2, default_max_tokens=16)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat_matches_the_python_api(loaded, client):
    model, tokenizer = loaded
    expected = ms.generate(model, tokenizer, MESSAGES, max_tokens=12)
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert out.choices[0].message.content == expected
    usage = out.usage
    assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["tokens_per_step"] >= 1.0 and usage.model_extra["decode_steps"] >= 0

    pieces, usages = [], []
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert "".join(pieces) == expected
    assert len(usages) == 1 and usages[0].completion_tokens == usage.completion_tokens


def test_completions_stream_and_sampling(loaded, client):
    model, tokenizer = loaded
    expected = ms.generate(model, tokenizer, "Once upon", max_tokens=10, speculate=False)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=10, stream=True))
    assert text == expected  # greedy speculative == greedy autoregressive
    a = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0.9, seed=7)
    b = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_bad_inputs_with_a_real_model(client, server):
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"tree": "9,9,9,9,9,9"})
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x " * 5000, max_tokens=4)
    assert "context window" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt=[999_999], max_tokens=4)


def test_client_disconnect_cancels_a_real_generation(server):
    before = json.loads(_get(server, "/health"))["cancelled"]
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    body = json.dumps({"prompt": "a", "max_tokens": 3000, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(16)  # generation has started
    conn.close()
    deadline = time.monotonic() + 20
    health = {}
    while time.monotonic() < deadline:
        health = json.loads(_get(server, "/health"))
        if health["cancelled"] > before and not health["busy"]:
            break
        time.sleep(0.05)
    assert health["cancelled"] == before + 1 and not health["busy"]


def _get(server, path: str) -> str:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("GET", path)
    data = conn.getresponse().read().decode()
    conn.close()
    return data


def test_serve_command_end_to_end(model_dir):
    """`specstream serve` as users start it: binds loopback, answers, stops cleanly on SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_specstream", "serve", "--model", str(model_dir), "--port", "0",
         "--max-tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert out.usage.completion_tokens <= 4 and out.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_the_demo_answers_chat_and_completions_through_its_prompt_template():
    """The bundled demo has no chat template: a chat request is answered from its last user
    message inside the model's prompt template, and /v1/completions formats a text prompt the
    way `specstream generate --prompt` does."""
    from mlx_specstream.prompting import format_prompt

    model, tokenizer = ms.load()
    mr = "name[The Eagle], eatType[coffee shop], food[French], area[riverside]"
    expected = ms.generate(model, tokenizer, format_prompt(model, mr), max_tokens=40)
    assert "Eagle" in expected
    srv = server_for_model(model, tokenizer, "demo", port=0, queue_size=2, default_max_tokens=40)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": mr}])
        assert chat.choices[0].message.content == expected
        text = client.completions.create(model="demo", prompt=mr, max_tokens=40).choices[0].text
        assert text == expected
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
