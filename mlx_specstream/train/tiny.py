"""Tiny random Hugging Face models and checkpoints for tests (trainer, converter, runtime).

Everything here is built offline and deterministically from a seed:

* :func:`byte_tokenizer`: a byte-level tokenizer (256 byte tokens + ``<|pad|>`` 256,
  ``<|bos|>`` 257, ``<|eos|>`` 258; BOS added automatically; a tiny chat template), so
  any text round-trips and the vocabulary (259) stays small;
* :func:`train_bpe_tokenizer`: a small byte-level BPE trained on given texts (shorter
  sequences for tests that train on real text);
* :func:`tiny_hf_config`: a ``transformers`` config per variant of :data:`TINY_VARIANTS`;
* :func:`save_tiny_checkpoint`: a complete model directory (HF weights, tokenizer, and with
  a :class:`SpecStreamConfig` the ``speculative_streaming`` block + extras trained a few
  steps so no adapter is trivially zero).

Variants: ``llama`` (GQA 4/2 heads), ``mistral`` (GQA, no window), ``qwen2`` (q/k/v bias,
tied embeddings), ``qwen3`` (q/k norms, head_dim 16 != hidden/heads), ``phi`` (partial
rotary 0.5, LayerNorm, head bias), ``opt`` (pre-LN, learned positions), ``opt_project``
(OPT-350m style: post-LN, no final norm, ``project_in``/``project_out`` 32 <-> 16).

:data:`MORE_VARIANTS` (not in :data:`TINY_VARIANTS`, whose tests assume q/k/v projections
and no sliding window) covers the other trained families: ``llama3`` (llama3 rope scaling),
``qwen3_moe`` (4 experts, top-2, one dense-MLP layer), ``gemma3_text`` (window 8, layers
sliding/sliding/full/sliding, local rope base 10000 vs 1e6, soft-capped logits), ``phi3``
(fused projections, longrope with ``original_max_position_embeddings`` 16, every layer
sliding with window 10 as Phi-3-mini's 2047), ``olmo2`` and
``smollm3`` (a layer without rope every second layer, those layers sliding with window 8).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mlx_specstream.config import SpecStreamConfig

TINY_VARIANTS = ("llama", "mistral", "qwen2", "qwen3", "phi", "opt", "opt_project")
MORE_VARIANTS = ("llama3", "qwen3_moe", "gemma3_text", "phi3", "olmo2", "smollm3")
SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-in character for each byte 0..255 (GPT-2 byte-level convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _wrap(tok: Any) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos_id = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        chat_template=TINY_CHAT_TEMPLATE, model_max_length=4096)


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over raw bytes: ids 0..255 are bytes, then the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return _wrap(tok)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE of ``vocab_size`` trained on ``texts`` (specials get ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(tok)


def tiny_hf_config(variant: str, **overrides: Any) -> Any:
    """A small ``transformers`` config (hidden 32, 4 layers, vocab 259) for one of :data:`TINY_VARIANTS`
    or :data:`MORE_VARIANTS`.

    ``overrides`` replace any field (e.g. ``vocab_size``, ``num_hidden_layers``).
    """
    import transformers as tf

    common = dict(vocab_size=259, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=1024, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    rotary = dict(common, intermediate_size=64, num_key_value_heads=2, rope_theta=10000.0)
    if variant == "llama":
        cfg = tf.LlamaConfig(**dict(rotary, rms_norm_eps=1e-6, tie_word_embeddings=False))
    elif variant == "mistral":
        cfg = tf.MistralConfig(**dict(rotary, rms_norm_eps=1e-6, sliding_window=None, tie_word_embeddings=False))
    elif variant == "qwen2":
        cfg = tf.Qwen2Config(**dict(rotary, rms_norm_eps=1e-6, tie_word_embeddings=True))
    elif variant == "qwen3":
        cfg = tf.Qwen3Config(**dict(rotary, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True))
    elif variant == "phi":
        cfg = tf.PhiConfig(**dict(rotary, num_key_value_heads=4, partial_rotary_factor=0.5, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False))
    elif variant in ("opt", "opt_project"):
        proj = variant == "opt_project"
        cfg = tf.OPTConfig(**dict(common, ffn_dim=64, word_embed_proj_dim=16 if proj else 32,
                                  do_layer_norm_before=not proj, dropout=0.0, attention_dropout=0.0,
                                  tie_word_embeddings=True))
    elif variant == "llama3":
        cfg = tf.LlamaConfig(**dict(rotary, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)))
    elif variant == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**dict(rotary, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True))
    elif variant == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**dict(rotary, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                         query_pre_attn_scalar=16, sliding_window=8,
                                         layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                      "sliding_attention"],
                                         rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 10000.0},
                                                          "full_attention": {"rope_type": "default",
                                                                             "rope_theta": 1000000.0}}))
    elif variant == "phi3":
        half = 32 // 4 // 2
        cfg = tf.Phi3Config(**dict(rotary, rms_norm_eps=1e-6, tie_word_embeddings=False, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attention_dropout=0.0, original_max_position_embeddings=16,
                                   sliding_window=None, rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                        short_factor=[1.0 + 0.1 * i for i in range(half)],
                                                        long_factor=[2.0 + 0.5 * i for i in range(half)],
                                                        partial_rotary_factor=1.0)))
    elif variant == "olmo2":
        cfg = tf.Olmo2Config(**dict(rotary, rms_norm_eps=1e-6, tie_word_embeddings=False))
    elif variant == "smollm3":
        cfg = tf.SmolLM3Config(**dict(rotary, rms_norm_eps=1e-6, tie_word_embeddings=True, no_rope_layer_interval=2,
                                      use_sliding_window=True, sliding_window=8))
    else:
        raise ValueError(f"Unknown tiny variant {variant!r}; choose from {TINY_VARIANTS + MORE_VARIANTS}.")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_hf_model(variant: str, *, seed: int = 0, tokenizer: Any = None, **overrides: Any) -> Any:
    """A randomly initialised float32 ``*ForCausalLM`` (sdpa attention), vocab sized to ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    if tokenizer is not None:
        overrides = dict(dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
                         **overrides)
    cfg = tiny_hf_config(variant, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def save_tiny_checkpoint(variant: str, path: str | Path, spec_config: Optional[SpecStreamConfig] = None, *,
                         seed: int = 0, train_steps: int = 3, tokenizer: Any = None,
                         prompt_template: Optional[str] = "{input}", **overrides: Any) -> Path:
    """Write a complete tiny model directory at ``path`` and return it.

    Without ``spec_config``: a plain HF checkpoint (a base model to train from). With it:
    a Speculative Streaming checkpoint whose extras (and, in shared mode, base weights) took
    ``train_steps`` AdamW steps (lr 1e-2) on random tokens, so nothing is trivially zero.
    ``tokenizer`` defaults to :func:`byte_tokenizer`.
    """
    from .model import SpecStreamLM

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    hf = tiny_hf_model(variant, seed=seed, tokenizer=tokenizer, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    updates = {"prompt_template": prompt_template}
    if spec_config is None:
        hf.save_pretrained(path)
        _update_config(path, updates)
        return path
    model = SpecStreamLM(hf, copy.deepcopy(spec_config), seed=seed)
    if spec_config.mode == "lossless":
        hf.requires_grad_(False)
    _train_random(model, steps=train_steps, seed=seed, vocab=hf.config.vocab_size)
    model.eval()
    model.save_pretrained(path, config_updates=updates)
    return path


def _train_random(model: Any, *, steps: int, seed: int, vocab: int, batch: int = 2, length: int = 12) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def _update_config(path: Path, updates: dict[str, Any]) -> None:
    import json

    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(updates)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
