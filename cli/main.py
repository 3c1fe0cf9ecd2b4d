"""The ``specstream`` command: one Typer app, each command thin over the Python API.

``main()`` first re-executes the process with a system OpenBLAS preloaded when MLX would
otherwise run on its slow reference BLAS (Linux; ``SPECSTREAM_NO_OPENBLAS=1`` opts out, see
``mlx_specstream/blas.py``), then runs the app, turning every error into one line and a
non-zero exit code (``--debug`` anywhere on the line shows the traceback).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import typer

from mlx_specstream.cli import common

app = typer.Typer(
    name="specstream",
    help="Speculative Streaming for MLX: fast generation from one fine-tuned model.\n\n"
    "Example: specstream generate --prompt 'Hello' --max-tokens 64",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# (command name, module in mlx_specstream.cli, function). Every command of the README is here.
COMMANDS = [
    ("generate", "generate", "generate"),
    ("chat", "chat", "chat"),
    ("convert", "convert", "convert"),
    ("distill", "distill", "distill"),
    ("train", "train", "train"),
    ("export", "export", "export"),
    ("bench", "bench", "bench"),
    ("tune", "tune", "tune"),
    ("serve", "serve", "serve"),
    ("doctor", "doctor", "doctor"),
]


def _version(value: bool) -> None:
    if value:
        from mlx_specstream import __version__

        typer.echo(f"specstream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors (also accepted after the command)."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Speculative Streaming for MLX: fast generation from one fine-tuned model, no draft model."""


def _register() -> None:
    for name, module, function in COMMANDS:
        mod = importlib.import_module(f"mlx_specstream.cli.{module}")
        app.command(name)(getattr(mod, function))


_register()


# Commands that do not run MLX matmuls: no BLAS re-exec. Training runs PyTorch, and an
# OpenBLAS preloaded into it takes over torch's BLAS calls too (measured 2.4x slower steps).
NO_PRELOAD_COMMANDS = {"train", "export"}


def wants_fast_blas(args: list[str]) -> bool:
    """Whether ``specstream ARGS`` should run with a fast BLAS preloaded (see NO_PRELOAD_COMMANDS)."""
    if not args or {"-h", "--help", "--version"} & set(args):  # help needs no fast BLAS
        return False
    command = next((a for a in args if not a.startswith("-")), None)
    backends = ({v for k, v in zip(args, args[1:]) if k == "--backend"}
                | {a[len("--backend="):] for a in args if a.startswith("--backend=")})
    if command == "distill" and "torch" in backends:
        return False  # `distill --backend torch` runs PyTorch, as train does
    if command == "train" and "mlx" in backends:
        return True  # `train --backend mlx` runs MLX's matmuls
    return command not in NO_PRELOAD_COMMANDS


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: exits the process. With ``argv`` (tests) returns the exit code
    instead and skips the BLAS re-exec."""
    if argv is not None:
        return common.run_app(app, list(argv))
    args = sys.argv[1:]
    if wants_fast_blas(args):
        from mlx_specstream.blas import maybe_reexec_with_fast_blas

        try:
            maybe_reexec_with_fast_blas()
        except ValueError as e:  # an unknown SPECSTREAM_BLAS, or a named one that is missing
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    code = common.run_app(app, args)
    from mlx_specstream.host import release_mlx_streams

    release_mlx_streams()  # before the interpreter's teardown (see there)
    sys.exit(code)


if __name__ == "__main__":
    main()
