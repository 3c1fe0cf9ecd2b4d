"""Uniform access to the pieces of a Hugging Face causal LM that Speculative Streaming reuses.

No model code is forked: :class:`Backbone` only finds the embedding, decoder layers, rotary
table, final norm and LM head of a loaded ``transformers`` model, so :mod:`.model` can run
the decoder layers itself with its own masks and positions.

Families (``config.model_type``): llama (any ``rope_scaling``, llama3 included), mistral,
qwen2, qwen3, qwen3_moe (MoE MLPs: the router is per token; no router aux loss is added),
phi (partial rotary), phi3 (fused ``qkv_proj``/``gate_up_proj``, longrope/"su" scaling),
olmo2 (post-norms, q/k norms), gemma3_text (scaled embedding inside ``embed_tokens``,
per-layer-type rotary tables, sliding-window layers, final logit soft-capping), smollm3
(layers without rope, optional sliding layers) and opt (learned absolute positions with
Hugging Face's offset of 2, optional ``project_in``/``project_out``).

Per-layer differences are read from what the model has: each layer's attention window
(:attr:`Backbone.layer_windows`, from ``config.layer_types`` / ``config.sliding_window`` as
the HF model builds its masks), each layer's rotary table (:attr:`Backbone.rope_keys`, the
layer type when the rotary module takes one), soft-capping from the config.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import torch
from torch import nn

ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi", "qwen3_moe", "phi3", "olmo2",
                   "gemma3_text", "smollm3")
SUPPORTED_MODEL_TYPES = ROTARY_FAMILIES + ("opt",)

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
# Linear layers inside one decoder layer that stream-only LoRA targets by default.
DEFAULT_ATTENTION_TARGETS = {
    "llama": _QKVO,
    "mistral": _QKVO,
    "qwen2": _QKVO,
    "qwen3": _QKVO,
    "qwen3_moe": _QKVO,
    "olmo2": _QKVO,
    "gemma3_text": _QKVO,
    "smollm3": _QKVO,
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def check_model_type(model_type: Optional[str]) -> str:
    """Return ``model_type`` if supported, else raise a ValueError that lists the families."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}. Speculative Streaming training supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type


def layer_windows(config: Any, num_layers: int) -> tuple[Optional[int], ...]:
    """Each decoder layer's attention window (None = global), as the HF model masks it.

    With ``config.layer_types`` (qwen2, qwen3, gemma3_text, smollm3, ...): a
    ``"sliding_attention"`` layer uses ``config.sliding_window``. Without it (mistral, phi3,
    qwen3_moe): every layer uses ``config.sliding_window`` when set (Qwen2/Qwen3/Qwen3-MoE set
    it to None unless ``use_sliding_window``).
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return (None,) * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if layer_types[i] == "sliding_attention" else None for i in range(num_layers))


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, n_main_keys: int) -> torch.Tensor:
    """Boolean ``[B, 1, Lq, Lk]``: which keys a sliding-window layer lets each query see.

    Keys ``< n_main_keys`` are main-stream tokens, the rest stream tokens; stream keys (the
    query's own node's streams (t, 1..j), after the AND) are never windowed. To be ANDed with
    the causal / multi-stream mask. ``q_pos`` ``[B, Lq]``, ``k_pos`` ``[B, Lk]`` are rotary positions.
    """
    # Window rule (as the MLX runtime): query at position q (stream (t, j): q = t + j) sees main p iff q - p < window.
    near = (q_pos[:, :, None] - k_pos[:, None, :]) < window
    is_stream_key = torch.arange(k_pos.shape[1], device=k_pos.device) >= n_main_keys
    return (near | is_stream_key)[:, None]


PosEmb = Union[None, tuple, dict]


class Backbone:
    """References into a loaded HF causal LM (``hf``), plus the few family-specific calls.

    Holds no parameters of its own (it is not an ``nn.Module``), so the owner registers
    ``hf`` once. Works on a peft-wrapped model too (peft replaces linears in place).

    Per-layer tables: :attr:`layer_windows` (attention window or None) and :attr:`rope_keys`
    (which rotary table a layer uses: None when the family has one table, else the layer
    type, as Gemma 3's local/global tables). :meth:`position_embeddings` returns one
    ``(cos, sin)`` or a dict keyed by rope key; :meth:`run_layer` picks the layer's entry.
    """

    def __init__(self, hf: nn.Module):
        config = hf.config
        self.family = check_model_type(getattr(config, "model_type", None))
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Models with bidirectional attention (use_bidirectional_attention) are not causal LMs; "
                             "Speculative Streaming needs a causal decoder.")
        self.config = config
        self.hf = hf
        inner = hf.model.decoder if self.family == "opt" else hf.model
        self.inner = inner
        self.layers: nn.ModuleList = inner.layers
        self.num_layers = len(self.layers)
        self.hidden_size = int(config.hidden_size)
        self.lm_head: nn.Module = hf.lm_head
        if self.family == "opt":
            self.final_norm = inner.final_layer_norm
            self.project_out = inner.project_out
            self.rotary = None
        else:
            self.final_norm = inner.final_layernorm if self.family == "phi" else inner.norm
            self.project_out = None
            self.rotary = inner.rotary_emb
        cap = getattr(config, "final_logit_softcapping", None)
        self.final_logit_softcapping: Optional[float] = float(cap) if cap else None
        self.layer_windows = layer_windows(config, self.num_layers)
        windows = {w for w in self.layer_windows if w is not None}
        # The largest window (None if no layer is windowed); kept for callers that only report it.
        self.sliding_window: Optional[int] = max(windows) if windows else None
        takes_type = self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        if takes_type:
            self.rope_keys: tuple[Optional[str], ...] = tuple(config.layer_types[i] for i in range(self.num_layers))
        else:
            self.rope_keys = (None,) * self.num_layers

    @property
    def attn_implementation(self) -> str:
        return getattr(self.config, "_attn_implementation", None) or "eager"

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` and positions ``[B, T]`` -> input of layer 0, ``[B, T, h]``.

        Gemma 3's sqrt(hidden) scale lives inside its ``embed_tokens`` module.
        """
        inner = self.inner
        x = inner.embed_tokens(input_ids)
        if self.family == "opt":
            if inner.project_in is not None:
                x = inner.project_in(x)
            # Learned positions enter here only; streams inherit their main token's.
            x = x + inner.embed_positions(None, 0, position_ids=positions)
        elif self.family == "phi":
            x = inner.embed_dropout(x)
        return x

    def position_embeddings(self, x: torch.Tensor, positions: torch.Tensor, *, frozen: bool = False) -> PosEmb:
        """Rotary ``(cos, sin)`` for ``positions`` ``[B, L]`` (None for OPT); a dict
        ``{layer type: (cos, sin)}`` when layers use different tables (Gemma 3).

        ``frozen`` skips HF's per-call frequency update of "dynamic" and "longrope" scaling
        (which picks its table from ``max(positions) + 1``), so the MSA rows (positions up to
        ``t + γ``) use the table chosen by the main tokens' pass, exactly as HF's own forward
        over the main sequence does. Default-table families are unaffected either way.
        """
        rot = self.rotary
        if rot is None:
            return None
        if frozen:
            raw = inspect.unwrap(type(rot).forward)
            with torch.no_grad():
                call = lambda *a: raw(rot, x, positions, *a)  # noqa: E731
                return self._per_key(call)
        return self._per_key(lambda *a: rot(x, positions, *a))

    def _per_key(self, call) -> PosEmb:
        keys = sorted({k for k in self.rope_keys if k is not None})
        if not keys:
            return call()
        return {k: call(k) for k in keys}

    def attention_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean ``[B, 1, L, L]`` (True = may attend) in the form the attention backend wants."""
        if self.attn_implementation == "sdpa":
            return allowed
        # eager attention adds the mask to the scores
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def layer_masks(self, allowed: torch.Tensor, positions: torch.Tensor, n_main: int, dtype: torch.dtype,
                    layer_range: range) -> dict[Optional[int], torch.Tensor]:
        """Backend masks ``{window: mask}`` for the layers in ``layer_range``, from a dense mask.

        Training no longer builds dense multi-stream masks (:mod:`.attention`); the tests use this
        for their dense ``[L, L]`` reference. ``allowed`` is a boolean mask ``[B, 1, L, L]``, ``positions``
        the rotary positions ``[B, L]`` of its rows, ``n_main`` how many rows are main tokens.
        Windowed layers AND it with :func:`window_mask`; global layers (key None) use it as is.
        """
        out: dict[Optional[int], torch.Tensor] = {}
        for w in sorted({self.layer_windows[i] for i in layer_range}, key=lambda v: -1 if v is None else v):
            a = allowed if w is None else allowed & window_mask(positions, positions, w, n_main)
            out[w] = self.attention_mask(a, dtype)
        return out

    def main_masks(self, valid: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, layer_range: range,
                   *, causal_only: bool) -> dict[Optional[int], Optional[torch.Tensor]]:
        """Backend masks ``{window: mask}`` of the main tokens for the layers in ``layer_range``.

        None (sdpa's own causal path, which fused kernels take) where the mask would say no more
        than causality: with ``causal_only`` (no padding but on the right, which no valid query
        sees) and no window that any query reaches; else the boolean causal mask of
        :func:`.layout.main_mask` (padded keys hidden), ANDed with :func:`window_mask`. Eager
        attention always gets a mask. ``valid`` / ``positions`` ``[B, T]``.
        """
        from .layout import main_mask

        T = valid.shape[1]
        windows = sorted({self.layer_windows[i] for i in layer_range}, key=lambda v: -1 if v is None else v)
        reach = int(positions.max()) if windows != [None] else 0
        out: dict[Optional[int], Optional[torch.Tensor]] = {}
        allowed = None
        for w in windows:
            binding = w is not None and reach >= w
            if causal_only and not binding and self.attn_implementation == "sdpa":
                out[w] = None
                continue
            if allowed is None:
                allowed = main_mask(valid)
            a = allowed & window_mask(positions, positions, w, T) if binding else allowed
            out[w] = self.attention_mask(a, dtype)
        return out

    def layer_index(self, layer: Union[int, nn.Module]) -> int:
        if isinstance(layer, int):
            return layer
        for i, m in enumerate(self.layers):
            if m is layer:
                return i
        raise ValueError("run_layer: the module is not one of this backbone's decoder layers.")

    def run_layer(self, layer: Union[int, nn.Module], x: torch.Tensor, mask: Union[torch.Tensor, dict],
                  pos_emb: PosEmb, positions: torch.Tensor) -> torch.Tensor:
        """One HF decoder layer (a module of :attr:`layers` or its index) on ``x`` ``[B, L, h]``.

        ``mask`` is the backend mask, a dict ``{window: mask}`` from :meth:`layer_masks` /
        :meth:`main_masks` (the layer's window picks one), or an :class:`.attention.MSAPlan`
        (told the layer's window); ``pos_emb`` from :meth:`position_embeddings` (a dict
        picks the layer's rotary table).
        """
        per_layer = isinstance(mask, dict) or hasattr(mask, "for_layer")
        i = self.layer_index(layer) if (per_layer or isinstance(pos_emb, dict) or isinstance(layer, int)) else None
        module = self.layers[i] if i is not None else layer
        if isinstance(mask, dict):
            mask = mask[self.layer_windows[i]]
        elif hasattr(mask, "for_layer"):  # an attention.MSAPlan
            mask = mask.for_layer(self.layer_windows[i])
        if isinstance(pos_emb, dict):
            pos_emb = pos_emb[self.rope_keys[i]]
        if pos_emb is None:
            out = module(x, attention_mask=mask, position_ids=positions)
        else:
            out = module(x, attention_mask=mask, position_embeddings=pos_emb, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    def head_modules(self) -> list[nn.Module]:
        """Final norm, OPT project_out, LM head: whichever exist, in order."""
        return [m for m in (self.final_norm, self.project_out, self.lm_head) if m is not None]

    def head(self, x: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """Hidden states ``[..., h]`` -> logits ``[..., V]`` (final norm, project_out, LM head,
        then the family's ``final_logit_softcapping`` if it has one, as HF applies it).

        ``detach_weights`` runs the same modules with detached parameters, so a loss on the
        output trains only what produced ``x`` (used by the pruning adapter).
        """
        for m in self.head_modules():
            if detach_weights:
                params = {k: v.detach() for k, v in m.named_parameters()}
                x = torch.func.functional_call(m, params, (x,))
            else:
                x = m(x)
        cap = self.final_logit_softcapping
        if cap is not None:
            x = torch.tanh(x / cap) * cap
        return x
