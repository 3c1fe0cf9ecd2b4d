"""``SpecStreamLM``: Speculative Streaming on top of a Hugging Face causal LM (PyTorch).

Runs the HF decoder layers itself: layers ``< s = N - N_s`` on the main tokens (causal),
then the top ``N_s`` (MSA) layers on main tokens plus γ streams per position, laid out as
in :mod:`.layout`; their attention is :mod:`.attention`'s decomposition of the block mask
of :func:`.layout.msa_mask` (never built: no ``[L, L]`` tensor). The same module trains
checkpoints and is the float32 reference the MLX converter's parity tests compare against.

Semantics (shared with the MLX runtime, DESIGN.md rules 1-6):

* ``M`` = hidden state at the input of layer ``s`` (the embedding output when ``s == 0``).
* ``S[t, j] = f(M[t]) + P[j-1]``, ``f`` = identity or ``M + up(down(M))``.
* stream (t, j) has rotary position ``position(t) + j``; OPT adds learned positions at the
  embedding only, so streams inherit the main token's. A rotary table that HF picks per call
  from the largest position (longrope, dynamic) is picked once, from the main tokens.
* sliding-window layers: a main token at position q sees main positions p with q - p < window;
  stream (t, j) sees main positions p <= t with (t + j) - p < window, plus streams (t, 1..j).
* streams go through the same final norm (+ OPT ``project_out``) and LM head.
* pruning logits ``head(M + up(down(M)))`` with ``M`` and the head's weights detached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from mlx_specstream.config import CONFIG_KEY, EXTRAS_FILE, SpecStreamConfig, read_config, spec_config_from

from . import layout
from .adapters import LowRankResidual, StreamLoRA
from .attention import MSAPlan, is_right_padded, msa_layers
from .backbone import Backbone, check_model_type

EXTRA_PREFIXES = ("stream_embeddings", "stream_init.", "pruning.", "stream_lora.")


@dataclasses.dataclass
class StreamHidden:
    """Pre-head hidden states: ``main`` ``[B, T, h]``, ``streams`` ``[B, T - stream_start, γ, h]``
    (None if γ = 0; row ``i`` is position ``stream_start + i``), ``prune`` ``[B, T, h]`` (None
    without a pruning adapter)."""

    main: torch.Tensor
    streams: Optional[torch.Tensor]
    prune: Optional[torch.Tensor]
    stream_start: int = 0


@dataclasses.dataclass
class SpecStreamOutput:
    """Logits (without ``labels``) or the training loss and its metrics (with ``labels``).

    ``main_logits`` ``[B, T, V]``; ``stream_logits`` ``[B, T, γ, V]`` where stream j at
    position t predicts ``x_{t+1+j}`` (index ``j - 1``); ``prune_logits`` ``[B, T, V]``.
    ``metrics`` maps ``{main,stream1..,prune}.{ce_sum,correct,count}`` to 0-d tensors.
    """

    main_logits: Optional[torch.Tensor] = None
    stream_logits: Optional[torch.Tensor] = None
    prune_logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    metrics: Optional[dict[str, torch.Tensor]] = None


class SpecStreamLM(nn.Module):
    """A HF causal LM (``self.hf``) plus stream embeddings and optional adapters.

    Extra parameters are registered under the checkpoint-convention names, so
    :meth:`extras_state_dict` is exactly the content of ``speculative_streams.safetensors``.
    """

    def __init__(self, hf: nn.Module, spec: SpecStreamConfig, *, seed: Optional[int] = None):
        super().__init__()
        self.hf = hf
        self.spec = spec
        self.backbone = Backbone(hf)
        bb = self.backbone
        spec.validate(num_layers=bb.num_layers)
        gamma = spec.num_streams
        if gamma == 0 and (spec.pruning is not None or spec.stream_lora is not None):
            raise ValueError("The pruning adapter and stream LoRA need num_streams >= 1.")
        self.msa_start = spec.msa_start(bb.num_layers) if gamma else bb.num_layers
        h = bb.hidden_size
        ref = next(hf.parameters())
        # A seed makes the extras' initial values independent of the global RNG stream.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if gamma:
                std = float(getattr(hf.config, "initializer_range", getattr(hf.config, "init_std", 0.02)))
                self.stream_embeddings = nn.Parameter(torch.randn(gamma, h) * std)
            if spec.stream_init == "linear" and gamma:
                self.stream_init = LowRankResidual(h, int(spec.stream_init_rank))
            if spec.pruning is not None:
                self.pruning = LowRankResidual(h, spec.pruning.rank)
            if spec.stream_lora is not None:
                lc = spec.stream_lora
                self.stream_lora = StreamLoRA(bb.layers, list(range(self.msa_start, bb.num_layers)),
                                              tuple(lc.target_modules), lc.rank, lc.alpha)
        for name, p in self.named_parameters():
            if name.startswith(EXTRA_PREFIXES):
                p.data = p.data.to(device=ref.device, dtype=ref.dtype)

    # ---- forward ---------------------------------------------------------------------------

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       position_ids: Optional[torch.Tensor] = None, stream_start: int = 0,
                       grad_checkpoint: bool = False) -> StreamHidden:
        """Token ids ``[B, T]`` (+ optional padding mask / positions ``[B, T]``) -> :class:`StreamHidden`.

        ``stream_start`` > 0 skips the streams of positions before it (they do not affect
        anything else; training uses it to skip prompt positions without stream targets).
        ``grad_checkpoint`` recomputes each decoder layer in the backward pass instead of keeping
        its activations (same values and gradients).
        """
        bb, gamma = self.backbone, self.spec.num_streams
        B, T = input_ids.shape
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
        pos = position_ids if position_ids is not None else layout.default_positions(valid)
        causal_only = is_right_padded(valid)
        x = bb.embed(input_ids, pos)
        lower = range(self.msa_start)
        masks = bb.main_masks(valid, pos, x.dtype, lower, causal_only=causal_only)
        # Called even with no lower layer: it sets the dynamic/longrope table from the main positions.
        pos_emb = bb.position_embeddings(x, pos)
        for i in lower:
            x = self._layer(i, x, masks, pos_emb, pos, checkpoint=grad_checkpoint)
        M = x
        prune = self.pruning(M.detach()) if hasattr(self, "pruning") else None
        if gamma == 0:
            return StreamHidden(main=M, streams=None, prune=prune)

        n = T - stream_start  # positions with streams
        Ms = M[:, stream_start:]
        f = self.stream_init(Ms) if hasattr(self, "stream_init") else Ms
        S = f[:, :, None, :] + self.stream_embeddings  # [B, n, γ, h]
        x = torch.cat([M, S.reshape(B, n * gamma, -1).to(M.dtype)], 1)
        pos_all = layout.msa_positions(pos, gamma, stream_start)
        upper = range(self.msa_start, bb.num_layers)
        plan = MSAPlan(n_main=T, num_streams=gamma, start=stream_start, valid=valid, positions=pos,
                       main_masks=bb.main_masks(valid, pos, x.dtype, upper, causal_only=causal_only),
                       base_implementation=bb.attn_implementation, causal_only=causal_only,
                       max_position=int(pos.max()))
        pos_emb = bb.position_embeddings(x, pos_all, frozen=True)
        for i in upper:
            x = self._layer(i, x, plan, pos_emb, pos_all, checkpoint=grad_checkpoint, msa_rows=(T, x.shape[1]))
        return StreamHidden(main=x[:, :T], streams=x[:, T:].reshape(B, n, gamma, -1), prune=prune,
                            stream_start=stream_start)

    def _layer(self, i: int, x: torch.Tensor, mask: Any, pos_emb: Any, positions: torch.Tensor, *,
               checkpoint: bool, msa_rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Decoder layer ``i`` on ``x``; an MSA layer (``msa_rows`` = (main rows, all rows)) runs
        with the multi-stream attention and stream-only LoRA active. With ``checkpoint`` the
        layer is recomputed in backward, contexts included."""
        def run(h: torch.Tensor) -> torch.Tensor:
            with contextlib.ExitStack() as stack:
                if msa_rows is not None:
                    stack.enter_context(msa_layers(self.hf.config))
                    lora = getattr(self, "stream_lora", None)
                    if lora is not None:
                        stack.enter_context(lora.streams_after(*msa_rows))
                return self.backbone.run_layer(i, h, mask, pos_emb, positions)

        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        return run(x)

    def head(self, hidden: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """Final norm (+ project_out) + LM head: ``[..., h]`` -> ``[..., V]``."""
        return self.backbone.head(hidden, detach_weights=detach_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                prune_loss_weight: float = 0.1, loss_counts: Optional[dict[str, torch.Tensor]] = None,
                grad_checkpoint: bool = False) -> SpecStreamOutput:
        """Logits for ``input_ids`` ``[B, T]``; with ``labels`` ``[B, T]`` the loss instead.

        ``labels`` holds the token id at completion tokens and -100 elsewhere (see
        :func:`.layout.stream_targets`); the loss is DESIGN.md rule 10 plus
        ``prune_loss_weight`` times the pruning adapter's cross-entropy, each term divided by
        ``loss_counts[name]`` (the whole step's target counts, when this batch is one of several
        accumulated micro-batches or DDP ranks) or else by this batch's own counts.
        """
        if labels is not None:
            from .loss import specstream_loss

            targets = layout.stream_targets(labels, self.spec.num_streams)
            start = layout.first_stream_target(targets) if self.spec.num_streams else 0
            hidden = self.forward_hidden(input_ids, attention_mask, position_ids, stream_start=start,
                                         grad_checkpoint=grad_checkpoint)
            loss, metrics = specstream_loss(self, hidden, targets, prune_loss_weight=prune_loss_weight,
                                            counts=loss_counts)
            return SpecStreamOutput(loss=loss, metrics=metrics)
        hidden = self.forward_hidden(input_ids, attention_mask, position_ids, grad_checkpoint=grad_checkpoint)
        return SpecStreamOutput(
            main_logits=self.head(hidden.main),
            stream_logits=self.head(hidden.streams) if hidden.streams is not None else None,
            prune_logits=self.head(hidden.prune, detach_weights=True) if hidden.prune is not None else None,
        )

    # ---- checkpoint convention ------------------------------------------------------------

    def extras_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors of ``speculative_streams.safetensors`` (convention names)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(EXTRA_PREFIXES)}

    def load_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load convention-named tensors; every expected name must be present with its shape."""
        own = self.extras_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{EXTRAS_FILE} does not match the speculative_streaming config: missing {missing}, "
                f"unexpected {unexpected}. Re-save the model or fix the config block."
            )
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{EXTRAS_FILE}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}.")
        self.load_state_dict(tensors, strict=False)

    def save_pretrained(self, out_dir: str | Path, *, config_updates: Optional[dict[str, Any]] = None) -> None:
        """Write a model directory: HF weights + config.json (with the ``speculative_streaming``
        block when γ > 0, and ``config_updates`` as top-level keys) + the extras file.

        Merge peft LoRA first (the base weights must be plain HF weights).
        """
        from safetensors.torch import save_file

        if any(type(m).__module__.startswith("peft.") for m in self.hf.modules()):
            raise ValueError("The model still holds peft LoRA layers; merge them (merge_and_unload) before saving.")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(out)
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop(CONFIG_KEY, None)
        if self.spec.num_streams:
            cfg[CONFIG_KEY] = self.spec.to_dict()
        cfg.update(config_updates or {})
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if self.spec.num_streams:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.extras_state_dict().items()}
            save_file(tensors, str(out / EXTRAS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, spec: Optional[SpecStreamConfig] = None, *,
                        dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                        seed: Optional[int] = None) -> "SpecStreamLM":
        """Load a model directory. Without ``spec`` the config block and extras file must exist;
        with ``spec`` equal to the saved block the saved extras load, otherwise they start fresh."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        model_dir = Path(model_dir)
        config = read_config(model_dir)
        check_model_type(config.get("model_type"))
        saved = spec_config_from(config)
        if spec is None and saved is None:
            raise ValueError(
                f"{model_dir}/config.json has no '{CONFIG_KEY}' block; pass a SpecStreamConfig to add streams."
            )
        use = spec if spec is not None else saved
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
        model = cls(hf, use, seed=seed)
        if saved is not None and use == saved and use.num_streams:
            path = model_dir / EXTRAS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; config.json declares '{CONFIG_KEY}'.")
            model.load_extras(load_file(str(path)))
        return model
