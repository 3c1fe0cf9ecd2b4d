"""Collation into PyTorch tensors; tokenization and the order of batches are both trainers'
(:mod:`mlx_specstream.train_common.data`)."""

from __future__ import annotations

from typing import Sequence

import torch

from mlx_specstream.train_common.data import IGNORE_INDEX, TokenizedExample


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, T]``."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
