"""``specstream serve``: an OpenAI-compatible HTTP server for one model (see mlx_specstream/server.py)."""

from __future__ import annotations

import ipaddress
import signal
import socket
from pathlib import Path
from typing import Optional

import typer

from mlx_specstream.cli.common import MaxTokensOpt, ModelOpt, StreamsOpt, context_length, fail, load_model


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bindable(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        fail(f"Cannot resolve --host {host} ({exc.strerror}); use an IP address such as 127.0.0.1.")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            fail(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or stop the other server.")


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the server like Ctrl-C does


def serve(
    model: ModelOpt = None,
    streams: StreamsOpt = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port (0 picks a free one)."),
    model_name: Optional[str] = typer.Option(
        None, "--model-name", help="Model id clients send and /v1/models lists (default: the directory name).",
        show_default=False,
    ),
    max_tokens: MaxTokensOpt = 512,
    queue_size: int = typer.Option(8, "--queue-size", min=1, help="Requests that may wait; more get 503."),
    max_body_kb: int = typer.Option(1024, "--max-body-kb", min=1, help="Largest accepted request body."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions).

    Example: specstream serve --model ./my-model --port 8080  (then use base_url http://127.0.0.1:8080/v1)

    --max-tokens is the default for requests that do not set max_tokens.
    """
    from mlx_specstream.server import server_for_model

    _check_bindable(host, port)  # fail before the slow model load
    mdl, tokenizer = load_model(model, streams=streams)
    model_id = model_name or (Path(model).expanduser().resolve().name if model else "demo")
    try:
        server = server_for_model(
            mdl, tokenizer, model_id, host=host, port=port, context=context_length(mdl),
            queue_size=queue_size, default_max_tokens=max_tokens, max_body_bytes=max_body_kb * 1024,
            verbose=verbose,
        )
    except OSError as exc:
        fail(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or stop the other server.")
    if not _is_loopback(host):
        typer.secho(f"warning: listening on {host}: anyone on the network can use this server.",
                    fg=typer.colors.YELLOW, err=True)
    signal.signal(signal.SIGTERM, _stop)
    typer.echo(f"Serving {model_id} at {server.url}/v1 (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("Stopping.", err=True)
    finally:
        server.server_close()
