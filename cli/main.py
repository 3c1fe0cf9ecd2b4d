"""The ``specstream`` command: one Typer app, each command thin over the Python API."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="specstream",
    help="Speculative Streaming for MLX: fast generation from one fine-tuned model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from mlx_specstream.cli import generate

    app.command("generate")(generate.generate)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
