"""A model directory from a mid-run training checkpoint.

Training checkpoints (``{output}.checkpoints/step-NNNNNNNN/``) hold only the trainable tensors
plus the optimizer state, so that runs resume exactly. To evaluate or ship a run before it
ends, :func:`export_checkpoint` rebuilds the model as the run built it (from the arguments
recorded in the checkpoint), loads the tensors, merges LoRA, and writes the same kind of
model directory the run writes when it finishes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlx_specstream.config import read_config
from mlx_specstream.datasets import load_dataset
from mlx_specstream.train_common.files import exported_records, read_checkpoint

from .loop import TrainArgs, load_for_training, spec_for, write_model_dir
from .modes import merge_for_save
from .precision import parse_dtype


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model of training checkpoint ``checkpoint`` to ``output``; returns ``output``.

    Raises FileNotFoundError for a directory that is not a complete checkpoint and
    ValueError when its tensors do not fit the model its arguments describe.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ck = Path(checkpoint)
    state, recorded = read_checkpoint(ck, ("trainable.safetensors",))
    if recorded.get("backend") == "mlx":
        raise ValueError(f"{ck} is the MLX trainer's checkpoint; export it with mlx_specstream.mlx_train.export "
                         "(specstream export picks the right one).")
    args = TrainArgs.from_fingerprint(recorded, str(output))
    tensors_file = ck / "trainable.safetensors"
    spec = spec_for(args, read_config(args.model))
    torch.manual_seed(args.seed)
    model, peft_model = load_for_training(args, spec)
    tensors = load_file(str(tensors_file))
    own = {k for k, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != own:
        raise ValueError(f"Checkpoint {ck} does not match the model its arguments describe "
                         f"(e.g. {sorted(set(tensors) ^ own)[:6]}).")
    model.load_state_dict(tensors, strict=False)
    merge_for_save(model, peft_model, dtype=parse_dtype(args.dtype))
    model.eval()
    template = load_dataset(args.data, args.data_format, limit=1).prompt_template
    run_args, metrics, history = exported_records(args, state, ck, template, spec.to_dict())
    write_model_dir(Path(output), model, AutoTokenizer.from_pretrained(args.model), template, run_args, metrics,
                    history, overwrite=overwrite)
    return Path(output)
