"""The small trainable additions: low-rank residual maps and stream-only LoRA.

Parameter names follow the checkpoint convention of :mod:`mlx_specstream.config`
(``down.weight`` / ``up.weight``; ``stream_lora.{i}.{path}.lora_a`` / ``.lora_b``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn


class LowRankResidual(nn.Module):
    """``x + up(down(x))`` with ``down`` ``[rank, h]`` and ``up`` ``[h, rank]``.

    ``up`` starts at zero, so the map starts as the identity (stream init "linear", pruning).
    """

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden_size))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., h]`` -> ``[..., h]``."""
        return x + self.up(self.down(x))


class LoRAPair(nn.Module):
    """``lora_a`` ``[rank, in]`` and ``lora_b`` ``[out, rank]`` (zero-initialised)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    def delta(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * x @ lora_a.T @ lora_b.T``: ``[..., in]`` -> ``[..., out]``."""
        return (x @ self.lora_a.T) @ self.lora_b.T * scale


def _matching_linears(layer: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linears of ``layer`` whose path, or last path component, is in ``targets``."""
    found = {}
    for path, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and (path in targets or path.rsplit(".", 1)[-1] in targets):
            found[path] = mod
    return found


class StreamLoRA(nn.ModuleDict):
    """LoRA on chosen linears of the MSA layers, applied to stream tokens only.

    Implemented with forward hooks on the Hugging Face linears, so the HF module tree and
    its state-dict names stay untouched. The hooks act only inside :meth:`streams_after`,
    which tells them where the stream rows start (the MSA layout: ``n_main`` main rows, then
    stream rows, per sequence of ``n_total`` rows); anywhere else they leave outputs alone,
    which is why the main stream stays bit-identical to the base model.
    """

    def __init__(self, layers: nn.ModuleList, layer_indices: list[int], targets: tuple[str, ...],
                 rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self._rows: Optional[tuple[int, int]] = None
        self._handles = []
        # Keys are absolute layer indices: state-dict names stream_lora.{i}.{path}.lora_a.
        for i in layer_indices:
            linears = _matching_linears(layers[i], targets)
            if not linears:
                available = sorted(p for p, m in layers[i].named_modules() if isinstance(m, nn.Linear))
                raise ValueError(
                    f"stream LoRA targets {list(targets)} match no linear layer in decoder layer {i}; "
                    f"choose from {available}."
                )
            layer_dict = nn.ModuleDict()
            for path, linear in linears.items():
                pair = LoRAPair(linear.in_features, linear.out_features, rank)
                _nested_set(layer_dict, path.split("."), pair)
                self._handles.append(linear.register_forward_hook(_StreamRowsHook(self, pair)))
            self[str(i)] = layer_dict

    @contextlib.contextmanager
    def streams_after(self, n_main: int, n_total: int) -> Iterator[None]:
        """Activate the hooks for an MSA pass whose rows ``>= n_main`` (of ``n_total``) are streams."""
        self._rows = (n_main, n_total)
        try:
            yield
        finally:
            self._rows = None

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _StreamRowsHook:
    """Forward hook adding ``pair``'s LoRA delta to the stream rows of a linear's output.

    A small object rather than a closure, so ``copy.deepcopy`` of the model re-points it at
    the copied adapters.
    """

    def __init__(self, owner: StreamLoRA, pair: LoRAPair):
        self.owner, self.pair = owner, pair

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = self.owner._rows
        if rows is None:
            return output
        n_main, n_total = rows
        x = args[0]
        # HF layers pass [B, L, in] (OPT's MLP flattens to [B*L, in]); view both as [B, L, .].
        x3 = x.reshape(-1, n_total, x.shape[-1])
        o3 = output.reshape(-1, n_total, output.shape[-1])
        streams = o3[:, n_main:] + self.pair.delta(x3[:, n_main:], self.owner.scale)
        return torch.cat([o3[:, :n_main], streams], 1).reshape(output.shape)


def _nested_set(root: nn.ModuleDict, parts: list[str], module: nn.Module) -> None:
    node = root
    for p in parts[:-1]:
        if p not in node:
            node[p] = nn.ModuleDict()
        node = node[p]
    node[parts[-1]] = module
