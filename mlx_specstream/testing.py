"""Tiny random models and model directories for tests and examples (no downloads, no torch).

``write_tiny_model_dir(path)`` gives a complete model directory, tokenizer included, that
``mlx_specstream.load`` and every CLI command accept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from .config import PruningConfig, SpecStreamConfig
from .loading import save_model
from .models import build_model
from .streams import SpecStreamModel

TINY_VOCAB = 260  # 256 byte tokens + <s>, </s>, <|user|>, <|assistant|>

_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(  # with Llama 3's rope scaling, so every llama test runs a non-default RoPE
        model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=4096, tie_word_embeddings=False,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=32, norm_topk_prob=True,
    ),
    "gemma3_text": dict(  # sliding-window layers (window 8) beside global ones, scaled embeddings
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=16,
        sliding_window=8, sliding_window_pattern=2, max_position_embeddings=4096,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    ),
    "phi": dict(
        model_type="phi", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, layer_norm_eps=1e-5,
        hidden_act="gelu_new", max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "phi3": dict(  # fused qkv / gate_up projections, LongRoPE (su) scaling
        model_type="phi3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, original_max_position_embeddings=64,
        rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                          long_factor=[1.0 + 0.5 * i for i in range(8)]),
        tie_word_embeddings=False,
    ),
    "olmo2": dict(
        model_type="olmo2", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500000.0,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    "smollm3": dict(  # NoPE layers (every 2nd), sliding-window layers without make_cache()
        model_type="smollm3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        no_rope_layer_interval=2, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    "opt": dict(
        model_type="opt", hidden_size=64, num_hidden_layers=4, ffn_dim=128,
        num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=32,
        do_layer_norm_before=True, activation_function="relu", tie_word_embeddings=True,
    ),
}
FAMILIES = tuple(_FAMILY_CONFIGS)


def tiny_config(family: str, vocab_size: int = TINY_VOCAB, **overrides: Any) -> dict[str, Any]:
    """A small Hugging Face-style config dict for ``family`` (one of :data:`FAMILIES`)."""
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"Unknown tiny family {family!r}; choose from {FAMILIES}.")
    config = dict(_FAMILY_CONFIGS[family], vocab_size=vocab_size, bos_token_id=256, eos_token_id=257)
    config.update(overrides)
    return config


def random_model(
    config: dict[str, Any], spec: Optional[SpecStreamConfig] = None, seed: int = 0
) -> SpecStreamModel:
    """A randomly initialised model; extras get random (non-zero) values too."""
    mx.random.seed(seed)
    model = SpecStreamModel(build_model(config), spec)
    model.attach_stream_lora()
    if model.num_streams:
        # Non-trivial extras: zero-initialised halves would hide bugs.
        updates = []
        for name, value in _extra_params(model):
            updates.append((name, mx.random.normal(value.shape) * 0.3))
        model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return model


def _extra_params(model: SpecStreamModel):
    from mlx.utils import tree_flatten

    for name, value in tree_flatten(model.parameters()):
        if not name.startswith("base.") or ".lora_" in name:
            yield name, value


def write_tiny_tokenizer(path: Path, chat_template: bool = True) -> None:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus 4 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    kwargs = dict(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        kwargs["chat_template"] = (
            "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        )
    PreTrainedTokenizerFast(**kwargs).save_pretrained(str(path))


def write_tiny_model_dir(
    path: str | Path,
    family: str = "llama",
    spec: Optional[SpecStreamConfig] = SpecStreamConfig(
        num_streams=3, num_msa_layers=2, pruning=PruningConfig(rank=4, threshold=0.0)
    ),
    seed: int = 0,
    force: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a complete tiny model directory (random weights, tokenizer) and return its path."""
    path = Path(path)
    config = tiny_config(family, **config_overrides)
    model = random_model(config, spec, seed)
    tok_dir = path.parent / f".{path.name}.tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(tok_dir)
    save_model(model, config, path, tokenizer_dir=tok_dir, force=force)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    json.loads((path / "config.json").read_text())  # written and parseable
    return path
