"""A model directory from a mid-run checkpoint of the MLX trainer.

As :mod:`mlx_specstream.train.export` for the PyTorch trainer: the checkpoint holds only the
trainable tensors (and the optimizer's state), so the model is rebuilt as the run built it
from the arguments the checkpoint records, the tensors are loaded (shared-mode LoRA fused into
the base weights) and the same kind of model directory the finished run writes is written:
one :func:`mlx_specstream.load` reads and ``generate`` speculates with.
"""

from __future__ import annotations

from pathlib import Path

from mlx_specstream.datasets import load_dataset
from mlx_specstream.train_common.files import exported_records, read_checkpoint, run_records

from . import checkpoint as ckpt
from .loop import TrainOptions, build_for_training
from .shared import fuse_shared_lora


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model of MLX training checkpoint ``checkpoint`` to ``output``; returns ``output``.

    Raises FileNotFoundError for a directory that is not a complete checkpoint (or whose base
    model is gone) and ValueError when its tensors do not fit the model its arguments describe.
    """
    ck = Path(checkpoint)
    state, recorded = read_checkpoint(ck, ("trainable.safetensors",))
    if recorded.get("backend") != "mlx":
        raise ValueError(f"{ck} is the PyTorch trainer's checkpoint; export it with mlx_specstream.train.export "
                         "(specstream export picks the right one).")
    args = TrainOptions.from_fingerprint(recorded, str(output))
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"The run's base model {args.model} is gone; the checkpoint holds only the "
                                "trained tensors.")
    if Path(output).exists() and not overwrite:  # before building the model; write_model_dir checks again
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it.")
    model, _ = build_for_training(args)
    ckpt.load_trainable(ck, model)
    model.eval()
    if args.mode == "shared":
        fuse_shared_lora(model)
    template = load_dataset(args.data, args.data_format, limit=1).prompt_template
    run_args, metrics, history = exported_records(args, state, ck, template, model.spec.to_dict(), backend="mlx")
    return ckpt.write_model_dir(Path(output), Path(args.model), model, template,
                                run_records(run_args, metrics, history), overwrite=overwrite,
                                new_base=args.mode == "shared")
