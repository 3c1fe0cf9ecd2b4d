"""Padding and stream targets for the MLX trainer, in numpy, as the PyTorch trainer builds
them (``mlx_specstream.train.data`` and ``.layout``); tokenization and the order of batches
are both trainers' (:mod:`mlx_specstream.train_common.data`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mlx_specstream.train_common.data import IGNORE_INDEX, TokenizedExample


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: ``input_ids`` and ``labels``, each ``[B, T]`` int32 numpy.

    Right padding needs no padding mask: a valid token never attends to a later one, and
    padded positions have no target."""
    t = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), t), pad_id, dtype=np.int32)
    labels = np.full((len(examples), t), IGNORE_INDEX, dtype=np.int32)
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = e.input_ids
        labels[b, : len(e.labels)] = e.labels
    return ids, labels


def stream_targets(labels: np.ndarray, num_streams: int) -> np.ndarray:
    """Targets ``[B, T, 1 + γ]``: entry ``[b, t, j] = labels[b, t + 1 + j]`` (j = 0: main stream).

    Example, labels ``[-100, -100, 7, 8, 9]`` and γ = 1: position 1 targets (7, 8),
    position 3 targets (9, ignore), position 4 targets (ignore, ignore).
    """
    b, t = labels.shape
    shifted = np.concatenate([labels, np.full((b, num_streams + 1), IGNORE_INDEX, labels.dtype)], axis=1)
    return np.stack([shifted[:, 1 + j: 1 + j + t] for j in range(num_streams + 1)], axis=-1)
