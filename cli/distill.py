"""``specstream distill``: a model's own replies to prompts, the data lossless training learns from.

Thin over :func:`mlx_specstream.distill.distill` (same option names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from mlx_specstream.cli.common import MaxTokensOpt, MinPOpt, SeedOpt, TempOpt, TopKOpt, TopPOpt


def distill(
    prompts: Annotated[Path, typer.Option("--prompts", help="JSONL of {\"prompt\": ...} or {\"messages\": [...]} rows "
                                          "(.gz allowed).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output JSONL, trainable by `specstream train`; "
                                         "resumed when it exists.", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model directory (default: the bundled demo "
                                                 "model); with --backend torch also a Hugging Face Hub id.",
                                                 show_default=False)] = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts generated together.")] = 8,
    backend: Annotated[str, typer.Option("--backend", help="mlx (mlx-lm's batched generation) or torch "
                                         "(transformers on the training GPU).")] = "mlx",
    device: Annotated[str, typer.Option("--device", help="torch: auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16 (default: MLX keeps "
                                                 "the stored dtype, torch uses float32).", show_default=False)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the model's prompt template to plain prompts."
                                      )] = False,
    exact_only: Annotated[bool, typer.Option("--exact-only", help="Write replies whose text does not re-tokenize to "
                                             "the generated tokens to OUTPUT.rejected.jsonl, not to OUTPUT.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Generate everything again, replacing OUTPUT."
                                            )] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Generate the model's own replies to prompts: training data for --mode lossless.

    Example: specstream distill --model ./base --prompts prompts.jsonl --output distilled.jsonl
    """
    from mlx_specstream.distill import distill as run

    r = run(model, prompts, output, backend=backend, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
            min_p=min_p, seed=seed, batch_size=batch_size, device=device, dtype=dtype, raw=raw,
            exact_only=exact_only, overwrite=overwrite, progress=not quiet)
    parts = [f"Wrote {r.written} rows to {r.output}" + (f" ({r.resumed} were already there)" if r.resumed else "")]
    if r.inexact:
        parts.append(f"{r.inexact} do not re-tokenize to the generated tokens ("
                     + ("moved to the rejects file)" if exact_only else "kept, \"exact\": false)"))
    if r.rejected:
        parts.append(f"{r.rejected} rows to {r.rejected_path}")
    if r.truncated:
        parts.append(f"{r.truncated} cut at --max-tokens")
    parts.append(f"{r.tokens} tokens at {r.tokens_per_sec:.1f} tokens/s")
    typer.echo("; ".join(parts) + ".", err=True)
