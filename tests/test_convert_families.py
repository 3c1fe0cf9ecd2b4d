"""``convert`` on tiny random Hugging Face checkpoints of every tested family, written by
transformers itself (``save_pretrained``: transformers-5 configs and weight names), loaded back
with mlx-lm's own ``load_model`` and compared with the PyTorch model's logits.

What this pins down: the output config.json makes mlx-lm build the same model transformers
built (rope_parameters, Gemma 3's layer_types and per-layer-type rope, Qwen3-MoE's
num_local_experts, Phi-3 LongRoPE, Llama 3 rope scaling), and tensors that mlx-lm's
``sanitize`` computes (Qwen3-MoE's stacked experts) come out exactly as sanitize computes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from mlx_lm.utils import load_model as mlx_lm_load_model  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402

from mlx_specstream.convert import ConversionError, convert  # noqa: E402
from mlx_specstream.models import model_classes  # noqa: E402

VOCAB = 128
T = 24  # longer than Gemma 3's window (8) and Phi-3 LongRoPE's original length (16)
IDS = np.random.default_rng(0).integers(0, VOCAB, size=(1, T))
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                long_factor=[1.5 + 0.5 * i for i in range(8)])


def _configs() -> dict:
    t = transformers
    return {
        "llama3": lambda: t.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
        "qwen2": lambda: t.Qwen2Config(**COMMON),  # transformers' rope_theta 1e4, not mlx-lm's 1e6
        "qwen3": lambda: t.Qwen3Config(**COMMON, head_dim=16),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(  # no head_dim: transformers writes none
            **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
            mlp_only_layers=[1], norm_topk_prob=True),
        "gemma3_text": lambda: t.Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=8, rope_local_base_freq=100.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
        "phi": lambda: t.PhiConfig(**COMMON),  # partial_rotary_factor 0.5 (mlx-lm's default is 0.4)
        "phi3": lambda: t.Phi3Config(**COMMON),
        "phi3_longrope": lambda: t.Phi3Config(**COMMON, original_max_position_embeddings=16, rope_scaling=LONGROPE),
        "olmo2": lambda: t.Olmo2Config(**COMMON),
        "opt": lambda: t.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                                   num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }


FAMILIES = list(_configs())
_SOURCES: dict[str, tuple[Path, np.ndarray]] = {}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """``source(name) -> (checkpoint dir, PyTorch float32 logits [T, V])``, built once per module."""

    def get(name: str):
        if name not in _SOURCES:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_configs()[name]()).eval()
            with torch.no_grad():
                for p in model.parameters():  # norms off 1 (Gemma: off 0) so a wrong norm shows
                    if p.ndim == 1:
                        p.add_(torch.randn_like(p) * 0.1)
                logits = model(torch.tensor(IDS)).logits[0].numpy()
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            _SOURCES[name] = (path, logits)
        return _SOURCES[name]

    yield get
    _SOURCES.clear()


def _edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of checkpoint ``src`` with some config.json keys changed."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def _load(path: Path):
    """mlx-lm's own loader (our model file for OPT, which mlx-lm lacks, chosen as the runtime does)."""
    return mlx_lm_load_model(Path(path), get_model_classes=model_classes)


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS))[0].astype(mx.float32))


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_logits_match_transformers(name, source, tmp_path):
    src, want = source(name)
    result = convert(src, tmp_path / "out")
    model, config = _load(tmp_path / "out")
    np.testing.assert_allclose(_logits(model), want, atol=1e-4, rtol=0)

    # the tensors are exactly what mlx-lm's sanitize makes of the source's (stacked experts included)
    weights = dict(mx.load(str(src / "model.safetensors")))
    model_class, args_class = model_classes(config)
    skeleton = model_class(args_class.from_dict(config))
    expected = skeleton.sanitize(weights) if hasattr(skeleton, "sanitize") else weights
    got = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and mx.array_equal(got[k], v).item(), k
    assert not result.dropped or all("lm_head" in k for k in result.dropped)


def test_written_config_keys(source, tmp_path):
    """The top-level keys mlx-lm reads, as transformers meant them; transformers' own stay too."""

    def converted(name):
        src, _ = source(name)
        result = convert(src, tmp_path / name)
        return json.loads((tmp_path / name / "config.json").read_text()), result

    gemma, _ = converted("gemma3_text")
    assert gemma["sliding_window_pattern"] == 3 and gemma["sliding_window"] == 8
    assert (gemma["rope_theta"], gemma["rope_local_base_freq"]) == (1_000_000.0, 100.0)
    assert "full_attention" in gemma["rope_parameters"]  # transformers' keys untouched
    moe, result = converted("qwen3_moe")
    assert (moe["num_experts"], moe["num_local_experts"], moe["head_dim"]) == (4, 4, 16)
    assert len(result.combined) == 3 * 3  # gate/up/down of the 3 MoE layers (layer 1 is dense)
    for target, sources in result.combined.items():  # read together: one layer's experts
        layer, proj = target.split(".mlp.")[0], target.split(".")[-2]
        assert {f"{layer}.mlp.experts.{e}.{proj}.weight" for e in range(4)} <= set(sources), target
    assert "switch_mlp" in result.summary()
    llama, _ = converted("llama3")
    assert llama["rope_theta"] == 500000.0 and llama["rope_scaling"]["rope_type"] == "llama3"
    assert llama["rope_scaling"]["original_max_position_embeddings"] == 16
    phi3, result = converted("phi3_longrope")
    assert phi3["rope_scaling"]["type"] == "longrope" and phi3["original_max_position_embeddings"] == 16
    assert any("long_factor at every length" in n for n in result.notes)
    assert json.loads((tmp_path / "gemma3_text" / "config.json").read_text()).get("tie_word_embeddings") is True
    qwen2, _ = converted("qwen2")
    assert qwen2["rope_theta"] == 10000.0 and qwen2["tie_word_embeddings"] is False
    phi, _ = converted("phi")
    assert phi["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize("name", ["gemma3_text", "qwen3_moe", "phi3_longrope"])
def test_float16_output(name, source, tmp_path):
    """float16 weights: the float32 output cast, and exactly mlx-lm's own float16 cast of the
    float32 model when run (MLX's CPU gather_mm, which Qwen3-MoE's experts use, is float32-only)."""
    src, want = source(name)
    convert(src, tmp_path / "f32")
    convert(src, tmp_path / "f16", dtype="float16")
    f32 = mx.load(str(tmp_path / "f32" / "model.safetensors"))
    f16 = mx.load(str(tmp_path / "f16" / "model.safetensors"))
    assert f16.keys() == f32.keys()
    for k, v in f16.items():
        assert v.dtype == mx.float16 and mx.array_equal(v, f32[k].astype(mx.float16)).item(), k
    model, config = _load(tmp_path / "f16")
    assert config["dtype"] == "float16"
    if name == "qwen3_moe" and mx.default_device() == mx.cpu:
        return
    ref, _ = _load(tmp_path / "f32")
    ref.set_dtype(mx.float16)
    got = _logits(model)
    np.testing.assert_array_equal(got, _logits(ref))
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("name", ["qwen3_moe", "gemma3_text"])
def test_4bit_output_is_mlx_lm_quantization(name, source, tmp_path):
    """4-bit: the same layers, bits and packed values as mlx-lm's ``quantize_model`` of the float
    model (Qwen3-MoE: experts stacked then quantized; its router at 8 bits, as mlx-lm chooses)."""
    src, want = source(name)
    convert(src, tmp_path / "f32")
    result = convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    model, config = _load(tmp_path / "q4")
    ref, ref_config = _load(tmp_path / "f32")
    _, qconfig = quantize_model(ref, ref_config, 32, 4)
    assert config["quantization"] == qconfig["quantization"] == config["quantization_config"]
    np.testing.assert_array_equal(_logits(model), _logits(ref))
    assert np.abs(_logits(model) - want).max() < 0.5 * np.abs(want).max()
    assert result.quantization.kinds
    if name == "qwen3_moe":
        assert config["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8
        w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
        assert w["model.layers.0.mlp.switch_mlp.up_proj.weight"].shape == (4, 32, 64 * 4 // 32)
        assert w["model.layers.0.mlp.switch_mlp.up_proj.weight"].dtype == mx.uint32


def test_unknown_model_type_is_a_clear_error(source, tmp_path):
    bad = _edited_copy(source("llama3")[0], tmp_path / "bad", model_type="no_such_family")
    with pytest.raises(ConversionError, match="model_type 'no_such_family', which mlx-specstream does not support"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gemma3_settings_mlx_lm_cannot_express_are_refused(source, tmp_path):
    src, _ = source("gemma3_text")
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ConversionError, match="not a repeating pattern"):
        convert(_edited_copy(src, tmp_path / "a", layer_types=layer_types), tmp_path / "out")
    with pytest.raises(ConversionError, match="final_logit_softcapping=30.0, which mlx-lm's gemma3_text"):
        convert(_edited_copy(src, tmp_path / "b", final_logit_softcapping=30.0), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_moe_experts_are_stacked_one_layer_at_a_time(tmp_path):
    """Qwen3-MoE's experts are read and stacked layer by layer: peak MLX memory stays near one
    layer's experts (in and out) plus a shard, far below the checkpoint."""
    from safetensors.numpy import save_file

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, decoder_sparse_step=1,
        mlp_only_layers=[], intermediate_size=256, max_position_embeddings=256)
    src = tmp_path / "moe"
    cfg.save_pretrained(src)
    with torch.device("meta"):  # names and shapes only; experts as save_pretrained writes them (one per expert)
        meta = transformers.AutoModelForCausalLM.from_config(cfg).state_dict()
    shapes = {}
    for k, v in meta.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            e, two_i, h = v.shape
            shapes.update({f"{k[:-len('gate_up_proj')]}{e_}.{p}.weight": (two_i // 2, h)
                           for e_ in range(e) for p in ("gate_proj", "up_proj")})
        elif k.endswith("mlp.experts.down_proj"):
            shapes.update({f"{k[:-len('down_proj')]}{e_}.down_proj.weight": tuple(v.shape[1:]) for e_ in range(v.shape[0])})
        else:
            shapes[k] = tuple(v.shape)
    rng = np.random.default_rng(0)
    files: dict[str, dict[str, np.ndarray]] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        files.setdefault(f"model-{i % 3}.safetensors", {})[name] = rng.standard_normal(shape, dtype=np.float32)
    for file, tensors in files.items():
        save_file(tensors, str(src / file))
    weight_map = {k: f for f, ts in files.items() for k in ts}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    total = sum(a.nbytes for ts in files.values() for a in ts.values())
    layer_experts = sum(a.nbytes for ts in files.values() for k, a in ts.items() if ".layers.0.mlp.experts." in k)
    del files

    mx.clear_cache()
    mx.reset_peak_memory()
    result = convert(src, tmp_path / "out", max_shard_size=4 * 2**20)
    peak = mx.get_peak_memory()
    assert result.total_bytes == total and len(result.combined) == 8 * 3
    assert peak < 2 * layer_experts + 3 * 4 * 2**20 < total / 2, (
        f"peak MLX memory {peak / 2**20:.0f} MiB; one layer's experts {layer_experts / 2**20:.0f} MiB")


def test_sliding_window_mlx_lm_ignores_is_noted(source, tmp_path):
    """Phi-3's sliding_window (2047 in Phi-3-mini-4k) is applied by transformers, not by mlx-lm's
    phi3: the conversion goes ahead (real checkpoints have it) and the summary says so."""
    src, _ = source("phi3")
    result = convert(_edited_copy(src, tmp_path / "src", sliding_window=10), tmp_path / "out")
    assert any("window of 10 tokens" in n for n in result.notes) and "window of 10 tokens" in result.summary()
    assert not convert(src, tmp_path / "plain").notes
