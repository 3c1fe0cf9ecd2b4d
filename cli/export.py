"""``specstream export``: a model directory from a mid-run training checkpoint.

Thin over :func:`mlx_specstream.train.export.export_checkpoint` (PyTorch runs; the ``train``
extra) and :func:`mlx_specstream.mlx_train.export.export_checkpoint` (``--backend mlx`` runs),
whichever wrote the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import typer
from typing_extensions import Annotated


def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A step-NNNNNNNN directory of a training run "
                                             "(OUTPUT.checkpoints/).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model directory to write (must not exist unless "
                                         "--overwrite).", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
) -> None:
    """Write the model of a training checkpoint as a model directory (either trainer's checkpoints).

    Example: specstream export --checkpoint runs/e2e_ss.checkpoints/step-00001000 --output runs/e2e_ss_1000
    """
    from mlx_specstream.train_common.files import checkpoint_backend

    if checkpoint_backend(checkpoint) == "mlx":
        from mlx_specstream.mlx_train.export import export_checkpoint

        out = export_checkpoint(checkpoint, output, overwrite=overwrite)
        typer.echo(f"Wrote {out}; run it with: specstream generate --model {out}", err=True)
        return
    from mlx_specstream.train.export import export_checkpoint

    out = export_checkpoint(checkpoint, output, overwrite=overwrite)
    typer.echo(f"Wrote {out}; convert it with: specstream convert --hf-path {out} --mlx-path {out}_mlx", err=True)
