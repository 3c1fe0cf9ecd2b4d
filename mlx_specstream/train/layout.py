"""Sequence layout, masks, positions and targets of multi-stream training (pure functions).

Layout in the MSA layers (DESIGN.md rule 3), ``L = T * (1 + γ)``::

    index:   0 .. T-1          T + t*γ + (j-1)
    token:   main x_0..x_{T-1}  stream (t, j), node-major: (0,1..γ), (1,1..γ), ...

Worked example, T = 2, γ = 2 (``m`` main, ``s`` stream; 1 = may attend)::

              m0 m1 s01 s02 s11 s12
    m0        1  .  .   .   .   .
    m1        1  1  .   .   .   .
    s(0,1)    1  .  1   .   .   .
    s(0,2)    1  .  1   1   .   .
    s(1,1)    1  1  .   .   1   .
    s(1,2)    1  1  .   .   1   1

:func:`msa_mask` builds this mask densely (``[L, L]``) for tests and documentation; training
never does: :mod:`.attention` computes the same attention per stream from ``[T]``-sized pieces.

Training may give streams only to positions ``t >= start`` (earlier positions have no
completion target for any stream); the stream block then lists nodes ``start..T-1`` in the
same node-major order. Padding (``valid`` False) removes a main key for every query; each query still sees
itself, so no row is empty (an empty softmax row would put NaN into the padded rows).
"""

from __future__ import annotations

import torch

from mlx_specstream.train_common.data import IGNORE_INDEX  # noqa: F401 (re-used by the loss)


def default_positions(valid: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, T]`` counting only valid tokens (left or right padding)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def main_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask of the main stream, ``[B, 1, T, T]`` bool, from ``valid`` ``[B, T]``."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def node_and_stream(T: int, num_streams: int, start: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each index of the MSA layout, its node ``t`` and stream ``j`` (0 = main), each ``[L]``."""
    t_main = torch.arange(T, device=device)
    t_str = t_main[start:].repeat_interleave(num_streams)
    j_str = torch.arange(1, num_streams + 1, device=device).repeat(T - start)
    return torch.cat([t_main, t_str]), torch.cat([torch.zeros_like(t_main), j_str])


def msa_mask(valid: torch.Tensor, num_streams: int, start: int = 0) -> torch.Tensor:
    """Multi-stream attention mask ``[B, 1, L, L]`` bool, ``L = T + (T - start) * γ`` (see above)."""
    B, T = valid.shape
    t, j = node_and_stream(T, num_streams, start, valid.device)
    tq, tk, jq, jk = t[:, None], t[None, :], j[:, None], j[None, :]
    to_main = (jk == 0) & (tk <= tq)
    to_stream = (jk > 0) & (jq > 0) & (tk == tq) & (jk <= jq)
    key_valid = torch.cat([valid, torch.ones(B, t.numel() - T, dtype=torch.bool, device=valid.device)], 1)
    eye = torch.eye(t.numel(), dtype=torch.bool, device=valid.device)
    allowed = (to_main[None] & key_valid[:, None, :]) | to_stream[None] | eye[None]
    return allowed[:, None]


def msa_positions(positions: torch.Tensor, num_streams: int, start: int = 0) -> torch.Tensor:
    """Positions ``[B, L]`` of the MSA layout: stream (t, j) sits at ``positions[t] + j``."""
    B, T = positions.shape
    offsets = torch.arange(1, num_streams + 1, device=positions.device)
    streams = (positions[:, start:, None] + offsets).reshape(B, (T - start) * num_streams)
    return torch.cat([positions, streams], 1)


def first_stream_target(targets: torch.Tensor) -> int:
    """The first position at which any row has a valid stream target (``targets`` from
    :func:`stream_targets`); streams before it need not be computed. T if there is none."""
    has = (targets[..., 1:] != IGNORE_INDEX).any(-1).any(0)  # [T]
    idx = torch.nonzero(has)
    return int(idx[0]) if idx.numel() else targets.shape[1]


def stream_targets(labels: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Targets ``[B, T, 1 + γ]``: entry ``[b, t, j] = labels[b, t + 1 + j]`` (j = 0: main stream).

    ``labels`` ``[B, T]`` holds the token id where that token is a completion token and
    ``IGNORE_INDEX`` elsewhere (prompt, padding); targets past the sequence are ignored too.
    Example, labels ``[-100, -100, 7, 8, 9]`` and γ = 1: position 1 targets (7, 8),
    position 3 targets (9, ignore), position 4 targets (ignore, ignore).
    """
    B, T = labels.shape
    pad = torch.full((B, num_streams + 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    shifted = torch.cat([labels, pad], 1)
    return torch.stack([shifted[:, 1 + j: 1 + j + T] for j in range(num_streams + 1)], -1)
