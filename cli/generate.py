"""``specstream generate``: stream text from a model (the bundled demo model by default)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mlx_specstream.cli.common import ModelOpt, SpeculateOpt, StreamsOpt


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise ValueError("Give either --prompt or --prompt-file, not both.")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise FileNotFoundError(f"Prompt file {prompt_file} does not exist.")
        return prompt_file.read_text(encoding="utf-8")
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise ValueError("No prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text with --prompt -.")
        return sys.stdin.read()
    return prompt


def generate(
    model: ModelOpt = None,
    streams: StreamsOpt = None,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; '-' reads stdin."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Maximum number of tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    tree: Optional[str] = typer.Option(None, "--tree", help="Draft tree: per-depth top-k like '4,2,2,1' or JSON paths."),
    speculate: SpeculateOpt = None,
    lookup: int = typer.Option(
        0, "--lookup", min=0, help="Draft N tokens per step by prompt lookup instead of the streams (any model)."),
    truncate_prompt: bool = typer.Option(
        False, "--truncate-prompt", help="Drop the prompt's oldest tokens if it does not fit the context."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the model's prompt template."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object instead of streaming text."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the accepted draft tokens of every step."),
) -> None:
    """Generate text with Speculative Streaming.

    Example: specstream generate --prompt "name[The Eagle], eatType[pub]" --max-tokens 64
    """
    from mlx_specstream import load, stream_generate
    from mlx_specstream.generate import will_speculate
    from mlx_specstream.lookup import PromptLookup
    from mlx_specstream.prompting import format_prompt

    text = _read_prompt(prompt, prompt_file)
    mdl, tokenizer = load(model, streams=streams)
    if not raw:
        text = format_prompt(mdl, text)
    pieces, tokens, last = [], [], None
    color = sys.stdout.isatty()
    for resp in stream_generate(
        mdl, tokenizer, text, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
        min_p=min_p, seed=seed, tree=tree, speculate=speculate, truncate_prompt=truncate_prompt,
        drafter=PromptLookup(lookup) if lookup else None,
    ):
        last = resp
        pieces.append(resp.text)
        tokens.extend(resp.token_ids)
        if as_json:
            continue
        if verbose and resp.accepted:
            # the step's text, accepted drafts included, highlighted; depth in brackets
            seg = f"{resp.text}[+{len(resp.accepted)}]"
            typer.echo(f"\033[32m{seg}\033[0m" if color else seg, nl=False)
        else:
            typer.echo(resp.text, nl=False)
    if last is None:
        raise RuntimeError("Generation produced no output.")
    stats = dict(
        text="".join(pieces),
        tokens=tokens,
        prompt_tokens=last.prompt_tokens,
        generation_tokens=last.generation_tokens,
        decode_steps=last.decode_steps,
        tokens_per_step=round(last.tokens_per_step, 4),
        decode_tokens_per_sec=round(last.decode_tokens_per_sec, 3),
        peak_memory_gb=round(last.peak_memory_gb, 4),
        speculate=bool(lookup) or will_speculate(mdl, speculate, tree),
    )
    if as_json:
        typer.echo(json.dumps(stats))
        return
    typer.echo("")
    accepted = sum(last.acceptance_lengths)
    typer.echo(
        f"[{last.generation_tokens} tokens | {last.decode_tokens_per_sec:.1f} tokens/s | "
        f"{last.tokens_per_step:.2f} tokens/step | {accepted} drafts accepted in "
        f"{last.decode_steps} steps | peak {last.peak_memory_gb:.3f} GB]"
    )
