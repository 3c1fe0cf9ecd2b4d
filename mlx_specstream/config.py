"""The Speculative Streaming checkpoint convention, shared by the runtime, trainer and converter.

Pure Python (no MLX, no torch) so every side imports the same definitions.

A model directory is an ordinary Hugging Face model directory plus:

* a ``speculative_streaming`` block in ``config.json`` (:class:`SpecStreamConfig`);
* the extra tensors in ``speculative_streams.safetensors`` (names below).

Extra tensor names (``h`` = hidden size, ``γ`` = num_streams):

=====================================  ==============  =========================================
name                                   shape           meaning
=====================================  ==============  =========================================
``stream_embeddings``                  ``[γ, h]``      P: stream j uses row j-1
``stream_init.down.weight``            ``[η, h]``      f(M) = M + up(down(M)) (init "linear")
``stream_init.up.weight``              ``[h, η]``
``pruning.down.weight``                ``[r, h]``      o(M) = M + up(down(M)), then head
``pruning.up.weight``                  ``[h, r]``
``stream_lora.{i}.{path}.lora_a``      ``[ρ, in]``     stream-only LoRA (lossless mode) on the
``stream_lora.{i}.{path}.lora_b``      ``[out, ρ]``    linear ``{path}`` of decoder layer ``i``
=====================================  ==============  =========================================

``{path}`` is the module path inside a decoder layer with Hugging Face names, e.g.
``self_attn.q_proj`` or ``mlp.down_proj``; ``i`` is the absolute layer index (only MSA layers).
The LoRA delta is ``(alpha / rank) * lora_b @ lora_a @ x`` and applies to stream tokens only.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Optional

CONFIG_KEY = "speculative_streaming"
EXTRAS_FILE = "speculative_streams.safetensors"
MODES = ("shared", "lossless")
STREAM_INITS = ("identity", "linear")

# Loss weights of DESIGN.md rule 10.
MAIN_LOSS_WEIGHT = 1.0
STREAM_LOSS_WEIGHT = 0.1


@dataclasses.dataclass
class PruningConfig:
    """Tree pruning adapter (DESIGN.md rule 6)."""

    rank: int = 8
    threshold: float = 0.0  # children with parent->child probability below this are dropped

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"pruning.rank must be >= 1, got {self.rank}.")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"pruning.threshold must be in [0, 1), got {self.threshold}.")


@dataclasses.dataclass
class StreamLoRAConfig:
    """Stream-only LoRA in the MSA layers (lossless mode)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"stream_lora.rank must be >= 1, got {self.rank}.")
        if not self.target_modules:
            raise ValueError("stream_lora.target_modules must name at least one linear layer.")


@dataclasses.dataclass
class SpecStreamConfig:
    """The ``speculative_streaming`` block of config.json."""

    num_streams: int = 4
    num_msa_layers: int = 1
    stream_init: str = "identity"
    stream_init_rank: Optional[int] = None
    mode: str = "shared"
    pruning: Optional[PruningConfig] = None
    stream_lora: Optional[StreamLoRAConfig] = None
    default_tree: Optional[str] = None
    # False: generate decodes without speculation unless asked (`specstream tune` found plain
    # decoding faster than every tree on the device it measured); None/True: speculate
    speculate: Optional[bool] = None
    # the device `specstream tune` measured default_tree and speculate on (device.describe_device);
    # a "speculate": false measured on another device is not applied
    tuned_on: Optional[str] = None
    loss_weights: Optional[list[float]] = None  # [a_0, a_1..a_γ]; None = rule 10 defaults

    @classmethod
    def from_dict(cls, d: dict[str, Any], unknown: str = "error") -> "SpecStreamConfig":
        """Parse and validate a block. Keys this version does not know are an error
        (``unknown="error"``: training and conversion write what they understand), or, with
        ``"warn"``, ignored with a warning: generation reads model directories that a newer
        version may have written (its tuning keys, say). By the checkpoint convention the
        block describes only the streams, never the main stream, so ignoring a key can make
        drafting worse but cannot change the output (greedy tokens, or sampling's distribution)."""
        if not isinstance(d, dict):
            raise ValueError(f"'{CONFIG_KEY}' in config.json must be an object, got {type(d).__name__}.")
        if unknown not in ("error", "warn"):
            raise ValueError(f"unknown must be 'error' or 'warn', got {unknown!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra and unknown == "error":
            raise ValueError(f"Unknown keys in '{CONFIG_KEY}' block: {extra}. Known keys: {sorted(known)}.")
        if extra:
            warnings.warn(
                f"Ignoring keys of the '{CONFIG_KEY}' block that this mlx-specstream does not know: {extra} "
                f"(written by a newer version, or misspelt; known keys: {sorted(known)}). They concern only "
                "the speculative streams, so the output is unchanged (greedy: the same tokens; sampling: the same "
                "distribution), only drafting may differ; upgrade mlx-specstream to use them.",
                stacklevel=2,
            )
        d = {k: v for k, v in d.items() if k in known}
        if d.get("pruning") is not None:
            d["pruning"] = PruningConfig(**d["pruning"])
        if d.get("stream_lora") is not None:
            lora = dict(d["stream_lora"])
            if "target_modules" in lora:
                lora["target_modules"] = tuple(lora["target_modules"])
            d["stream_lora"] = StreamLoRAConfig(**lora)
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.stream_lora is not None:
            d["stream_lora"]["target_modules"] = list(self.stream_lora.target_modules)
        for key in ("speculate", "tuned_on"):  # only tuned models carry them
            if d[key] is None:
                del d[key]
        return d

    def validate(self, num_layers: Optional[int] = None) -> None:
        if self.num_streams < 0:
            raise ValueError(f"num_streams must be >= 0, got {self.num_streams}.")
        if self.num_streams > 0 and self.num_msa_layers < 1:
            raise ValueError(f"num_msa_layers must be >= 1 when streams exist, got {self.num_msa_layers}.")
        if num_layers is not None and self.num_msa_layers > num_layers:
            raise ValueError(
                f"num_msa_layers={self.num_msa_layers} exceeds the model's {num_layers} layers; "
                f"use at most {num_layers}."
            )
        if self.stream_init not in STREAM_INITS:
            raise ValueError(f"stream_init must be one of {STREAM_INITS}, got {self.stream_init!r}.")
        if self.stream_init == "linear" and not self.stream_init_rank:
            raise ValueError("stream_init='linear' needs stream_init_rank (the rank η of the map).")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.speculate is not None and not isinstance(self.speculate, bool):
            raise ValueError(f"speculate must be true, false or null, got {self.speculate!r}.")
        if self.tuned_on is not None and not isinstance(self.tuned_on, str):
            raise ValueError(f"tuned_on must be a device description (a string) or null, got {self.tuned_on!r}.")
        if self.stream_lora is not None:
            self.stream_lora.validate()
        if self.pruning is not None:
            self.pruning.validate()
        if self.loss_weights is not None and len(self.loss_weights) != self.num_streams + 1:
            raise ValueError(
                f"loss_weights needs {self.num_streams + 1} entries (main + one per stream), "
                f"got {len(self.loss_weights)}."
            )

    def weights(self) -> list[float]:
        if self.loss_weights is not None:
            return list(self.loss_weights)
        return [MAIN_LOSS_WEIGHT] + [STREAM_LOSS_WEIGHT] * self.num_streams

    def msa_start(self, num_layers: int) -> int:
        """0-based index of the first multi-stream layer (streams are inserted at its input)."""
        return num_layers - self.num_msa_layers


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No config.json in {model_dir}. Pass a Hugging Face-style model directory "
            "(config.json, weights, tokenizer files)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e


def spec_config_from(config: dict[str, Any], unknown: str = "error") -> Optional[SpecStreamConfig]:
    """The parsed block, or None for a plain model (``unknown`` as for :meth:`SpecStreamConfig.from_dict`)."""
    block = config.get(CONFIG_KEY)
    if block is None:
        return None
    return SpecStreamConfig.from_dict(block, unknown=unknown)
