"""What the PyTorch trainer (:mod:`mlx_specstream.train`) and the MLX trainer
(:mod:`mlx_specstream.mlx_train`) share, without PyTorch or MLX: the options and their checks,
tokenization and the data order, the run's ``speculative_streaming`` block, resume fingerprints,
checkpoint and output directories, and the run's records. Both trainers see the same token
sequences in the same order and write the same files because they use this one copy.
"""

from .data import IGNORE_INDEX, TokenizedExample, epoch_steps, tokenize_all, tokenize_example
from .files import atomic_directory, latest_checkpoint, list_checkpoints
from .options import RunOptions, build_spec

__all__ = ["IGNORE_INDEX", "RunOptions", "TokenizedExample", "atomic_directory", "build_spec", "epoch_steps",
           "latest_checkpoint", "list_checkpoints", "tokenize_all", "tokenize_example"]
