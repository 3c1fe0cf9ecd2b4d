"""Input formats, LoRA adapters, output layout (shards, index, tokenizer, config)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_convert_fixtures import copy_checkpoint, output_tensors, safetensors_torch, tiny_checkpoint, torch

import mlx.core as mx

from mlx_specstream.config import CONFIG_KEY, EXTRAS_FILE
from mlx_specstream.convert import ConversionError, convert
from mlx_specstream.loading import load_model

IDS = np.random.default_rng(1).integers(0, 259, size=(1, 10))


def test_same_result_from_safetensors_sharded_and_bin(tmp_path):
    results = {}
    for fmt in ("safetensors", "sharded", "bin"):
        src = copy_checkpoint(tiny_checkpoint("qwen2"), tmp_path / f"src-{fmt}", fmt)
        convert(src, tmp_path / f"out-{fmt}")
        results[fmt] = output_tensors(tmp_path / f"out-{fmt}")
    ref = results.pop("safetensors")
    assert any(k.startswith("stream_embeddings") for k in ref)
    for fmt, got in results.items():
        assert got.keys() == ref.keys(), fmt
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{fmt}: {k}")


def test_bfloat16_sources_kept_or_cast(tmp_path):
    src = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "src", "bin")
    sd = torch.load(src / "pytorch_model.bin")
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, src / "pytorch_model.bin")
    convert(src, tmp_path / "keep")
    weights = mx.load(str(tmp_path / "keep" / "model.safetensors"))
    assert weights["model.norm.weight"].dtype == mx.bfloat16
    want = sd["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.array(weights["model.layers.1.mlp.down_proj.weight"].astype(mx.float32)), want)
    assert mx.load(str(tmp_path / "keep" / EXTRAS_FILE))["stream_embeddings"].dtype == mx.float32  # source dtype

    convert(src, tmp_path / "f16", dtype="float16")
    assert {v.dtype for v in mx.load(str(tmp_path / "f16" / "model.safetensors")).values()} == {mx.float16}
    assert mx.load(str(tmp_path / "f16" / EXTRAS_FILE))["stream_embeddings"].dtype == mx.float16
    assert json.loads((tmp_path / "f16" / "config.json").read_text()).get("dtype", "float16") == "float16"


def test_output_layout_sharded_with_index(tmp_path):
    src = tiny_checkpoint("phi")
    result = convert(src, tmp_path / "one")
    sharded = convert(src, tmp_path / "many", max_shard_size=20_000)
    out = tmp_path / "many"
    assert len(sharded.weight_files) > 2 and sharded.weight_files[0] == f"model-00001-of-{len(sharded.weight_files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(sharded.weight_files)
    assert index["metadata"]["total_size"] == result.total_bytes
    for file in sharded.weight_files:
        assert set(mx.load(str(out / file))) == {k for k, v in index["weight_map"].items() if v == file}
    assert output_tensors(out).keys() == output_tensors(tmp_path / "one").keys()
    # tokenizer files, config block, extras file beside the weights
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", EXTRAS_FILE):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config[CONFIG_KEY]["num_streams"] == 3 and "quantization" not in config
    a, _ = load_model(tmp_path / "one")
    b, _ = load_model(out)
    np.testing.assert_array_equal(np.array(a.all_logits(mx.array(IDS))[1]), np.array(b.all_logits(mx.array(IDS))[1]))


def test_quantized_output_config_and_report(tmp_path):
    result = convert(tiny_checkpoint("llama"), tmp_path / "q", quantize=True, q_bits=8, q_group_size=32)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    weights = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.self_attn.q_proj.scales" in weights and "model.norm.scales" not in weights
    assert mx.load(str(tmp_path / "q" / EXTRAS_FILE))["stream_embeddings"].dtype == mx.float32
    table = result.summary()
    for kind in ("embed_tokens", "lm_head", "self_attn.q_proj", "mlp.down_proj"):
        assert kind in result.quantization.kinds and kind in table
    assert result.quantization.kinds["self_attn.q_proj"].tensors == 4



def test_a_tuning_verdict_is_not_carried_into_other_weights(tmp_path):
    """tune measured the source's float32 weights: a 4-bit or float16 output keeps the tree as a
    starting point but not the speculate verdict or its device, and the summary says to re-tune."""
    src = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config[CONFIG_KEY].update(default_tree="1,1", speculate=False, tuned_on="cpu: Some CPU (x86_64), 2 cores")
    (src / "config.json").write_text(json.dumps(config))

    def block(out):
        return json.loads((out / "config.json").read_text())[CONFIG_KEY]

    same = convert(src, tmp_path / "copy")
    assert block(tmp_path / "copy")["speculate"] is False and same.retune is None  # same weights: still true
    assert "tune" not in same.summary()
    for name, kwargs, change in [("q4", dict(quantize=True, q_bits=4, q_group_size=32), "4-bit"),
                                 ("f16", dict(dtype="float16"), "float16")]:
        result = convert(src, tmp_path / name, **kwargs)
        got = block(tmp_path / name)
        assert got["default_tree"] == "1,1" and "speculate" not in got and "tuned_on" not in got, name
        assert load_model(tmp_path / name)[0].spec.speculate is None  # speculates, as an untuned model
        text = result.summary()
        assert f"not {change} ones" in text and "(plain decoding on cpu: Some CPU (x86_64), 2 cores)" in text
        assert f"specstream tune --model {tmp_path / name}" in text
    assert convert(src, tmp_path / "f32", dtype="float32").retune is None  # already float32

def _lora_adapter(base_dir, out_dir, embedding: bool):
    """A peft LoRA adapter on ``base_dir`` with random (non-zero) B matrices; returns the merged HF model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"] + (["embed_tokens"] if embedding else [])
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=embedding,
                     modules_to_save=["lm_head"] if not embedding else None)
    model = get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out_dir)
    cfg_path = out_dir / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(adapter_cfg))
    return model.merge_and_unload().eval()


@pytest.mark.parametrize("embedding", [False, True])
def test_peft_adapter_merged_like_peft(tmp_path, embedding):
    from mlx_specstream.train.model import SpecStreamLM

    base = copy_checkpoint(tiny_checkpoint("llama", plain=True), tmp_path / "base")
    adapter = tmp_path / "adapter"
    merged = _lora_adapter(base, adapter, embedding)
    # streams trained with the adapter: extras file + config block live in the adapter directory
    streams = tiny_checkpoint("llama")
    shutil.copy(streams / EXTRAS_FILE, adapter / EXTRAS_FILE)
    block = json.loads((streams / "config.json").read_text())[CONFIG_KEY]
    (adapter / "config.json").write_text(json.dumps({CONFIG_KEY: block}))

    result = convert(adapter, tmp_path / "out")
    # q/v/down_proj in 4 layers, plus the LoRA'd embedding or the fully trained lm_head
    assert len(result.merged) == 13
    assert ("model.embed_tokens.weight" in result.merged) == embedding
    assert ("lm_head.weight" in result.merged) != embedding
    ref = SpecStreamLM(merged, SpecStreamLM.from_pretrained(streams).spec)
    ref.load_extras(safetensors_torch.load_file(str(adapter / EXTRAS_FILE)))
    with torch.no_grad():
        want = ref.eval()(torch.tensor(IDS))
    model, _ = load_model(tmp_path / "out")
    got = model.all_logits(mx.array(IDS))
    np.testing.assert_allclose(np.array(got[0][0]), want.main_logits[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(got[1][0]), want.stream_logits[0].numpy(), atol=1e-4, rtol=0)


def test_peft_adapter_errors(tmp_path):
    base = copy_checkpoint(tiny_checkpoint("llama", plain=True), tmp_path / "base")
    _lora_adapter(base, tmp_path / "adapter", embedding=False)
    with pytest.raises(ConversionError, match=r"\(--base\) applies to PEFT adapter directories only"):
        convert(base, tmp_path / "x", base_path=base)
    other = copy_checkpoint(tiny_checkpoint("qwen3", plain=True), tmp_path / "other")
    with pytest.raises(ConversionError, match="does not fit the base model"):
        convert(tmp_path / "adapter", tmp_path / "x", base_path=other)
    assert not (tmp_path / "x").exists()


def test_hub_id_without_network_says_pass_a_local_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConversionError, match="pass its local path as --hf-path"):
        convert("some-org/some-model", tmp_path / "out")
    with pytest.raises(ConversionError, match="does not exist; pass a local checkpoint directory"):
        convert(str(tmp_path / "nowhere" / "model"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_model_prefix(tmp_path):
    """Early OPT files were saved from the bare decoder: ``decoder.*`` instead of ``model.decoder.*``."""
    src = copy_checkpoint(tiny_checkpoint("opt"), tmp_path / "src")
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    safetensors_torch.save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(src / "model.safetensors"))
    result = convert(src, tmp_path / "out")
    assert result.renamed["decoder.embed_tokens.weight"] == "model.decoder.embed_tokens.weight"
    convert(tiny_checkpoint("opt"), tmp_path / "ref")
    got, want = output_tensors(tmp_path / "out"), output_tensors(tmp_path / "ref")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_memory_stays_near_one_shard(tmp_path):
    """A 120 MB model converted in 8 MB shards never holds more than a few shards' worth in MLX."""
    config = dict(model_type="llama", hidden_size=512, num_hidden_layers=8, intermediate_size=1408,
                  num_attention_heads=8, vocab_size=4000, tie_word_embeddings=False, rms_norm_eps=1e-5)
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    from mlx.utils import tree_flatten

    from mlx_specstream.models import build_model

    rng = np.random.default_rng(0)
    shapes = {k: v.shape for k, v in tree_flatten(build_model(config).parameters())}
    files = {}
    for i, (name, shape) in enumerate(shapes.items()):
        files.setdefault(f"model-{i % 4}.safetensors", {})[name] = rng.standard_normal(shape, dtype=np.float32)
    from safetensors.numpy import save_file

    for file, tensors in files.items():
        save_file(tensors, str(src / file))
    weight_map = {k: f for f, ts in files.items() for k in ts}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    total = sum(a.nbytes for ts in files.values() for a in ts.values())
    del files

    mx.clear_cache()
    mx.reset_peak_memory()
    result = convert(src, tmp_path / "out", max_shard_size=8 * 2**20)
    peak = mx.get_peak_memory()
    assert result.total_bytes == total > 100 * 2**20
    assert peak < 3 * 8 * 2**20, f"peak MLX memory {peak / 2**20:.0f} MiB for 8 MiB shards"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_download_fetches_only_needed_files(tmp_path, monkeypatch, fmt):
    import fnmatch

    import huggingface_hub

    repo = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "repo", fmt)
    (repo / "training_args.bin").write_bytes(b"not needed")
    (repo / "optimizer.pt").write_bytes(b"not needed")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append(list(allow_patterns))
        out = tmp_path / f"snapshot-{len(calls)}"
        out.mkdir()
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert("some-org/tiny-llama", tmp_path / "out")
    assert (tmp_path / "out" / EXTRAS_FILE).is_file()
    assert len(calls) == (1 if fmt == "safetensors" else 2)  # .bin weights only when there are no safetensors
    fetched = {p.name for p in (tmp_path / f"snapshot-{len(calls)}").iterdir()}
    assert "training_args.bin" not in fetched and "optimizer.pt" not in fetched
