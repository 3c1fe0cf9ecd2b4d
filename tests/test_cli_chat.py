"""``specstream chat``: the conversation logic alone, then the REPL through a real terminal."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import signal
import sys

import pytest

from mlx_specstream.cli.chat import ChatSession, run_repl


class FakeTokenizer:
    """One token per character of '<role>content' plus one for the generation prompt."""

    has_chat_template = True

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return list(range(len(text) + (1 if add_generation_prompt else 0)))


@dataclasses.dataclass
class Resp:
    text: str
    generation_tokens: int
    decode_steps: int
    tokens_per_step: float
    prompt_tokens: int
    decode_tokens_per_sec: float = 50.0
    peak_memory_gb: float = 0.01
    decode_time: float = 0.1
    finish_reason: str = None


def fake_generate(reply="ok", interrupt_after=None):
    calls = []

    def gen(prompt_ids, max_tokens, **params):
        calls.append((len(prompt_ids), max_tokens, params))
        for i, ch in enumerate(reply):
            if interrupt_after is not None and i == interrupt_after:
                raise KeyboardInterrupt
            yield Resp(ch, i + 1, (i + 2) // 2, 2.0, len(prompt_ids))

    return gen, calls


class Out(io.StringIO):
    def isatty(self):
        return False


def session(reply="ok", context=100, max_tokens=20, system="sys", **kw):
    gen, calls = fake_generate(reply, **kw)
    return ChatSession(FakeTokenizer(), gen, context=context, max_tokens=max_tokens, system=system, temp=0.0), calls


def test_history_is_kept_and_sent_with_the_template():
    chat, calls = session(reply="abc")
    assert "".join(r.text for r in chat.reply("hi")) == "abc"
    assert chat.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}]
    list(chat.reply("again"))
    # system + 2 turns + new user message, with the generation prompt
    assert calls[-1][0] == len("<system>sys<user>hi<assistant>abc<user>again") + 1
    assert calls[-1][1] == 20 and calls[-1][2] == {"temp": 0.0}


def test_oldest_exchanges_are_dropped_to_fit_the_context():
    chat, calls = session(reply="x" * 10, context=80, max_tokens=20)  # 60 prompt tokens fit
    for text in ("first message", "second message", "third message"):
        list(chat.reply(text))
    assert all(n <= 60 for n, _, _ in calls)
    assert chat.history[0]["content"] != "first message"  # dropped
    ids, dropped = chat.fit("fourth")
    assert len(ids) <= 60 and dropped >= 2 and dropped % 2 == 0
    assert chat.messages(chat.history)[0] == {"role": "system", "content": "sys"}  # never dropped


def test_a_message_too_long_for_the_context_is_refused():
    chat, calls = session(context=40, max_tokens=20)
    with pytest.raises(ValueError, match="Shorten it"):
        chat.fit("y" * 50)
    assert calls == []


def test_reset_stats_and_settings_checks():
    chat, _ = session(reply="abcd")
    assert chat.stats() == "No replies yet."
    list(chat.reply("hi"))
    stats = chat.stats()
    assert "last reply: 4 tokens" in stats and "2.00 tokens/step" in stats and "1 exchanges" in stats
    chat.reset()
    assert chat.history == []
    with pytest.raises(ValueError, match="smaller --max-tokens"):
        session(context=10, max_tokens=10)
    tok = FakeTokenizer()
    tok.has_chat_template = False
    with pytest.raises(ValueError, match="neither a chat template nor a prompt template"):
        ChatSession(tok, fake_generate()[0], context=100, max_tokens=10)


def test_a_task_model_without_chat_template_chats_through_its_prompt_template(tmp_path):
    """The bundled demo has a prompt template and no chat template: each turn's input is
    formatted like `generate --prompt` formats it, with a one-time notice."""
    from mlx_specstream import load, stream_generate
    from mlx_specstream.prompting import format_prompt

    model, tok = load()
    assert not tok.has_chat_template
    session = ChatSession(tok, lambda ids, **p: stream_generate(model, tok, ids, **p), context=512, max_tokens=40,
                          template=model.config["prompt_template"])
    mr = "name[The Eagle], eatType[coffee shop], food[French]"
    with pytest.warns(UserWarning, match="no chat template"):
        text = "".join(r.text for r in session.reply(mr))
    expected = "".join(r.text for r in stream_generate(model, tok, format_prompt(model, mr), max_tokens=40))
    assert text == expected and "Eagle" in text


def test_repl_commands_and_interrupted_reply():
    chat, calls = session(reply="hello world", interrupt_after=5)
    lines = iter(["", "/help", "/bogus", "hi", "/stats", "/reset", "/stats", "/quit", "never read"])
    out = Out()
    run_repl(chat, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "/reset   forget" in text and "Unknown command /bogus" in text
    assert "hello [stopped]" in text  # Ctrl-C during a reply stops it, the REPL goes on
    assert "last reply: 5 tokens" in text and "Conversation cleared." in text
    assert next(lines) == "never read"  # /quit left the loop
    assert chat.history == []


def test_repl_ends_on_eof_and_survives_ctrl_c_at_the_prompt():
    chat, _ = session()
    events = iter([KeyboardInterrupt, "hi", EOFError])

    def read(prompt):
        item = next(events)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    out = Out()
    run_repl(chat, read=read, out=out)
    assert "(Ctrl-D or /quit to leave)" in out.getvalue() and "ok\n" in out.getvalue()


def test_chat_without_a_terminal_is_a_one_line_error(capsys, monkeypatch):
    from mlx_specstream.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: chat needs an interactive terminal") and "\n" not in err


# --------------------------------------------------------------------------- a real terminal


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mlx_specstream.config import PruningConfig, SpecStreamConfig
    from mlx_specstream.testing import write_tiny_model_dir

    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2, pruning=PruningConfig(rank=4), default_tree="3,2,1")
    return write_tiny_model_dir(tmp_path_factory.mktemp("chat") / "tiny", spec=spec)


def test_chat_in_a_real_terminal(model_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable, ["-m", "mlx_specstream", "chat", "--model", str(model_dir), "--max-tokens", "6",
                         "--system", "be brief"],
        env={**os.environ, "TERM": "xterm"}, encoding="utf-8", codec_errors="replace", timeout=60,
        dimensions=(40, 200),
        # a test run started in the background (`cmd &` in a script) inherits SIGINT ignored,
        # and so would the child: give it the default disposition a terminal user has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        child.expect("/help for commands")
        child.expect(">>> ")
        child.sendline("hello")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"prompt (\d+) tokens")
        first_prompt = int(child.match.group(1))
        child.expect(">>> ")
        child.sendline("and again")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"prompt (\d+) tokens")
        assert int(child.match.group(1)) > first_prompt + len("and again")  # history went along
        child.expect(r"session: 2 replies")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("Conversation cleared.")
        child.expect(">>> ")
        # Up to three Ctrl-C: the first can land between readline printing the prompt and
        # waiting for input, where it only sets CPython's signal flag. The hint must come back.
        for _ in range(3):
            child.sendcontrol("c")
            if child.expect([re.escape("(Ctrl-D or /quit to leave)"), pexpect.TIMEOUT], timeout=5) == 0:
                break
        else:
            raise AssertionError(f"Ctrl-C at the prompt did not print the hint: {child.before!r}")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
