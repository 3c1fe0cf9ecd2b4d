"""The ``specstream`` app as a whole: registration, help, shared option names, error reporting,
``doctor``, and ``generate``'s input handling. In-process (``main(argv)`` returns the exit code)."""

from __future__ import annotations

import io
import json
import socket
import sys

import click
import pytest
import typer

from mlx_specstream.cli import common
from mlx_specstream.cli.main import COMMANDS, app, main, wants_fast_blas
from mlx_specstream.device import describe_device

EXPECTED = {"generate", "chat", "convert", "distill", "train", "export", "bench", "tune", "serve", "doctor"}
# Every command that takes one of these concepts must spell it this way.
SHARED = {"--model", "--max-tokens", "--temp", "--top-p", "--seed", "--tree", "--json"}
FORBIDDEN = {"--temperature", "--max_tokens", "--max-new-tokens", "--model-path", "--model-dir", "--top_p",
             "--topp", "--random-seed", "--output-json", "--as-json"}


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def test_openblas_reexec_only_for_mlx_commands():
    assert wants_fast_blas(["generate", "--prompt", "hi"])
    assert wants_fast_blas(["--debug", "bench", "--data", "x"])
    assert not wants_fast_blas(["train", "--model", "m"])  # PyTorch: a preloaded OpenBLAS slows it down
    assert not wants_fast_blas(["--debug", "train"])
    assert not wants_fast_blas(["generate", "--help"]) and not wants_fast_blas([])


def test_every_registered_command_has_help_with_an_example(capsys):
    names = {name for name, _, _ in COMMANDS}
    assert names <= EXPECTED and {"generate", "chat", "serve", "doctor"} <= names
    for name in names:
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and "Example: specstream " + name in " ".join(out.split()), name
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in names)


def test_option_names_are_consistent_across_commands():
    for name, command in _commands().items():
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert not opts & FORBIDDEN, (name, opts & FORBIDDEN)
    chat, serve = _commands()["chat"], _commands()["serve"]
    chat_opts = {o for p in chat.params for o in p.opts}
    assert SHARED - {"--json"} <= chat_opts
    assert {"--model", "--max-tokens"} <= {o for p in serve.params for o in p.opts}


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "no-such-command")[0] == 2
    assert run(capsys, "serve", "--port", "70000")[0] == 2
    assert run(capsys, "doctor", "--size", "3")[0] == 2
    assert run(capsys, "chat", "--temp", "-1")[0] == 2


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("specstream ")


@pytest.mark.parametrize("argv", [
    ["serve", "--model", "/no/such/model"],
    ["generate", "--model", "/no/such/model", "--prompt", "hi"],
])
def test_errors_are_one_line_with_what_to_do(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "/no/such/model" in lines[-1]
    assert "Traceback" not in err


def test_debug_shows_the_traceback_from_anywhere_on_the_line(capsys):
    code, _, err = run(capsys, "serve", "--model", "/no/such/model", "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error:")


def test_serve_fails_fast_when_the_port_is_taken(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "--model", "/no/such/model", "--port", str(port))
    assert code == 1 and err.startswith(f"error: Cannot listen on 127.0.0.1:{port}") and "--port" in err


def test_error_messages():
    msg = common.error_message
    assert msg(common.CLIError("Bad thing.\n  Do this.")) == "Bad thing. Do this."
    assert msg(ValueError("max_tokens must be >= 1, got 0.")) == "max_tokens must be >= 1, got 0."
    assert msg(FileNotFoundError(2, "No such file", "x.json")) == "File or directory not found: x.json. Check the path."
    assert msg(FileNotFoundError("Model directory m does not exist; pass a converted model directory.")).startswith(
        "Model directory m")
    assert msg(KeyError("k")) == "KeyError: 'k' (rerun with --debug for the traceback)"
    assert "Install the missing package" in msg(ImportError("No module named 'torch'"))
    assert common.pop_debug_flag(args := ["a", "--debug", "b", "--", "--debug"]) and args == ["a", "b", "--", "--debug"]


def test_read_prompt(tmp_path, monkeypatch):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    f = tmp_path / "p.txt"
    f.write_text("from a file")
    assert common.read_prompt(None, f) == "from a file"
    assert common.read_prompt("inline", None) == "inline"
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped"))
    assert common.read_prompt("-", None) == "piped"
    monkeypatch.setattr(sys, "stdin", io.StringIO("implicit pipe"))
    assert common.read_prompt(None, None) == "implicit pipe"
    monkeypatch.setattr(sys, "stdin", TTY(""))
    for prompt, path, match in [(None, None, "No prompt"), ("x", f, "not both"), (None, tmp_path / "no", "not found")]:
        with pytest.raises(common.CLIError, match=match):
            common.read_prompt(prompt, path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    with pytest.raises(common.CLIError, match="empty"):
        common.read_prompt("-", None)


def test_doctor_json(capsys):
    code, out, _ = run(capsys, "doctor", "--json", "--size", "128")
    assert code == 0
    report = json.loads(out)
    assert report["versions"]["mlx"] and report["backend"] in ("cpu", "metal", "cuda")
    assert report["device"] == describe_device()  # what tuning records as a model's tuned_on
    assert report["matmul"]["gflops"] > 0 and report["matmul"]["n"] == 128
    assert report["blas"]["kind"] in ("openblas", "reference", "accelerate", "mkl", "other", "unknown")
    if report["blas"]["kind"] == "reference" and report["blas"]["system_openblas"]:
        assert any("LD_PRELOAD=" in tip for tip in report["advice"])


def test_doctor_text(capsys):
    code, out, _ = run(capsys, "doctor", "--size", "128")
    assert code == 0
    for key in ("platform", "versions", "back-end", "BLAS", "matmul"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    assert "GFLOP/s" in out and ("to do:" in out or "All good" in out)


def test_progress_helpers_without_a_terminal(capsys):
    assert list(common.progress(range(3), description="x")) == [0, 1, 2]
    with common.status("Loading thing"):
        pass
    assert capsys.readouterr().err.startswith("Loading thing done (")
    with common.status("Quiet", quiet=True):
        pass
    assert capsys.readouterr().err == ""
