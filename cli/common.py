"""Shared CLI pieces: one set of option definitions, error reporting, progress display.

Every command declares its options with the aliases below so names, help texts and ranges are
the same everywhere (``--model``, ``--max-tokens``, ``--temp``, ``--top-p``, ``--seed``,
``--tree``, ``--json``)::

    def generate(model: ModelOpt = None, max_tokens: MaxTokensOpt = 256, temp: TempOpt = 0.0): ...

Errors: raise :class:`CLIError` (or a library ``ValueError`` whose message says what to do);
``main`` prints one line, ``error: ...``, and exits non-zero. ``--debug`` prints the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn, Optional, TypeVar

import typer
from typing_extensions import Annotated

T = TypeVar("T")
DEBUG_ENV = "SPECSTREAM_DEBUG"

# ---------------------------------------------------------------------------------------------
# Options shared by every command (default values stay in each command's signature).

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Model directory or Hugging Face repo id, with or without streams (default: the bundled demo model).",
        show_default=False,
    ),
]
StreamsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--streams",
        help="Attach the streams of another model directory or repo id trained on this model's base "
        "(e.g. streams trained on the float model, used with its 4-bit copy).",
        show_default=False,
    ),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")]
TempOpt = Annotated[float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 is greedy (lossless).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 disables.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k likeliest tokens; 0 disables.")]
MinPOpt = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the top probability.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.", show_default=False)]
TreeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--tree",
        help="Draft tree: top-k per depth like '4,2,1', or a JSON file of paths (default: the model's own).",
        show_default=False,
    ),
]
SpeculateOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--speculate/--no-speculate",
        help="Draft with the streams, or plain autoregressive decoding (default: the model's own choice: "
        "speculate, unless `specstream tune` found plain decoding faster on this device).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


# ---------------------------------------------------------------------------------------------
# Errors


class CLIError(Exception):
    """A user-facing error: ``message`` says what went wrong and what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = 1) -> NoReturn:
    """Stop the command with a one-line ``message`` that says what to do."""
    raise CLIError(message, exit_code)


def pop_debug_flag(args: list[str]) -> bool:
    """Remove every ``--debug`` before a ``--`` separator, so it works after any command name."""
    end = args.index("--") if "--" in args else len(args)
    found = "--debug" in args[:end]
    args[:end] = [a for a in args[:end] if a != "--debug"]
    return found or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_message(exc: BaseException) -> str:
    """The single line printed for ``exc`` (without the ``error:`` prefix)."""
    if isinstance(exc, (CLIError, ValueError)) and str(exc):
        return _one_line(str(exc))
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"File or directory not found: {exc.filename}. Check the path."
    if isinstance(exc, PermissionError) and exc.filename is not None:
        return f"Permission denied: {exc.filename}. Check the file's permissions."
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is None and str(exc):
        return _one_line(str(exc))  # raised by our own code with a message that says what to do
    if isinstance(exc, MemoryError):
        return "Out of memory. Try a smaller model, a quantized model, or fewer --max-tokens."
    if isinstance(exc, ImportError):
        return f"{_one_line(str(exc))}. Install the missing package (see README's set-up)."
    detail = _one_line(str(exc))
    kind = type(exc).__name__
    return f"{kind}: {detail} (rerun with --debug for the traceback)" if detail else (
        f"{kind} (rerun with --debug for the traceback)"
    )


def report_error(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` for a CLI user and return the exit code."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    typer.secho("error: ", fg=typer.colors.RED, bold=True, err=True, nl=False)
    typer.echo(error_message(exc), err=True)
    return getattr(exc, "exit_code", 1) if isinstance(exc, CLIError) else 1


def run_app(app: typer.Typer, args: list[str]) -> int:
    """Run the Typer ``app`` on ``args`` and turn every failure into an exit code."""
    debug = pop_debug_flag(args)
    try:
        with warnings.catch_warnings():
            if not debug:  # "warning: <what to do>" on stderr, without the source line of a traceback
                warnings.showwarning = _show_warning
            app(args=args, prog_name="specstream", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        return 130
    except Exception as exc:  # every error of a command ends here: one line, non-zero exit
        return report_error(exc, debug)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


# ---------------------------------------------------------------------------------------------
# Input and output helpers


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt from ``--prompt``, ``--prompt-file`` or stdin (``--prompt -`` or a pipe)."""
    if prompt is not None and prompt_file is not None:
        fail("Give either --prompt or --prompt-file, not both.")
    if prompt_file is not None:
        if str(prompt_file) == "-":
            return sys.stdin.read()
        if not prompt_file.is_file():
            fail(f"Prompt file not found: {prompt_file}. Check the path.")
        return prompt_file.read_text(encoding="utf-8")
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
        if not text.strip():
            fail("The prompt read from stdin is empty. Pipe some text in or pass --prompt.")
        return text
    if prompt is None:
        fail("No prompt. Pass --prompt TEXT, --prompt-file FILE, or pipe text into stdin (--prompt -).")
    return prompt


def check_output_files(*paths: Optional[Path]) -> None:
    """Fail before any work when an output file's folder is missing ('-' means stdout)."""
    for path in paths:
        if path is not None and str(path) != "-" and not Path(path).parent.is_dir():
            fail(f"Folder {path.parent} does not exist; create it or write {path.name} elsewhere.")


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=None))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def status(message: str, quiet: bool = False) -> Iterator[None]:
    """Show ``message`` with a spinner while the block runs (stderr), then its duration."""
    start = time.perf_counter()
    if quiet:
        yield
        return
    if stderr_is_tty():
        from rich.console import Console

        console = Console(stderr=True)
        with console.status(message):
            yield
        console.print(f"{message} done ({time.perf_counter() - start:.1f}s)", style="dim", highlight=False,
                      markup=False)
    else:
        yield
        typer.echo(f"{message} done ({time.perf_counter() - start:.1f}s)", err=True)


def progress(items: Iterable[T], total: Optional[int] = None, description: str = "") -> Iterator[T]:
    """Iterate ``items`` with a progress bar on a terminal (plain iteration otherwise)."""
    if not stderr_is_tty():
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.console import Console

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total if total is not None else _len_or_none(items))
        for item in items:
            yield item
            bar.advance(task)


def _len_or_none(items: Any) -> Optional[int]:
    try:
        return len(items)
    except TypeError:
        return None


def load_model(path: Optional[str], quiet: bool = False, streams: Optional[str] = None):
    """Load ``(model, tokenizer)`` with a spinner on stderr."""
    from mlx_specstream import load

    with status(f"Loading {path or 'the demo model'}", quiet=quiet):
        return load(path, streams=streams)


def context_length(model: Any, default: int = 4096) -> int:
    """The model's context window in tokens (config's max_position_embeddings or similar)."""
    names = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    for obj in (model, getattr(model, "base", None)):
        if obj is None:
            continue
        limit = getattr(obj, "max_positions", None)
        if isinstance(limit, int) and limit > 0:
            return limit
        for source in (getattr(obj, "args", None), getattr(obj, "config", None)):
            for name in names:
                value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
                if isinstance(value, int) and value > 0:
                    return value
    return default


def stats_line(resp: Any) -> str:
    """The closing statistics of a generation (a final ``GenerationResponse``)."""
    parts = [
        f"{resp.generation_tokens} tokens",
        f"{resp.decode_tokens_per_sec:.1f} tok/s",
        f"{resp.tokens_per_step:.2f} tokens/step ({max(resp.tokens_per_step - 1.0, 0.0):.2f} drafts accepted)",
    ]
    if getattr(resp, "prompt_tokens", 0):
        parts.append(f"prompt {resp.prompt_tokens} tokens at {resp.prompt_tokens_per_sec:.1f} tok/s")
    parts.append(f"peak memory {resp.peak_memory_gb:.2f} GB")
    return ", ".join(parts)
