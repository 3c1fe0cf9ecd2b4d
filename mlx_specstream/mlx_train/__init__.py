"""Train Speculative Streaming streams in MLX (Apple silicon, MLX's CPU and CUDA back-ends).

The PyTorch trainer's recipe (:mod:`mlx_specstream.train`) on the runtime's own model:
any directory :func:`mlx_specstream.load` reads (float or 4/8-bit quantized) trains, and
the result is again such a directory. Lossless mode: the base (float or quantized) is frozen,
only the stream extras train, and the main stream stays the base model's. Shared mode
(:mod:`.shared`): LoRA on a float base, shared by the main stream and the streams, fused into
the saved weights.

Public API:

* :func:`train` / :class:`TrainOptions` / :class:`TrainResult` / :func:`evaluate` - the recipe;
* :func:`batch_loss` / :func:`step_gradients` - the loss and its gradients for one batch / step;
* :func:`chunked_logits` / :func:`main_pass` / :func:`stream_chunk` - the memory-linear
  teacher-forced forward (see :mod:`.forward`).
"""

from .forward import ChunkLayout, MainPass, chunked_logits, main_pass, stream_chunk
from .loop import TrainOptions, TrainResult, evaluate, run_training, step_gradients, train
from .loss import Options, batch_loss, count_targets

__all__ = ["ChunkLayout", "MainPass", "Options", "TrainOptions", "TrainResult", "batch_loss", "chunked_logits",
           "count_targets", "evaluate", "main_pass", "run_training", "step_gradients", "stream_chunk", "train"]
