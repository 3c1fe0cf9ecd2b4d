"""examples/stories260k: llama2.c import (known greedy text), tokenizer parity, distillation data."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPECSTREAM_SHARED") or REPO.parent / "shared")
STORIES = SHARED / "models" / "stories260K"
KNOWN_GREEDY = "Once upon a time, there was a little girl named Lily."

needs_stories = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file() or not (STORIES / "tok512.model").is_file(),
    reason=f"stories260K not found under {STORIES}; set SPECSTREAM_SHARED to the shared/ folder",
)


def _load_example(name: str):
    path = REPO / "examples" / "stories260k" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stories260k_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


importer = _load_example("import_llama2c")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is fastest; restore the count after."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found under {STORIES}; set SPECSTREAM_SHARED to the shared/ folder")
    return importer.import_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.model",
                                   tmp_path_factory.mktemp("stories") / "base")


@pytest.fixture(scope="module")
def hf_greedy(model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, 1:].tolist(), tokenizer


def test_interleaved_to_halves_preserves_rotary_attention_scores():
    """llama2.c rotary on interleaved pairs with W == HF rotate-half rotary with permuted W."""
    rng = np.random.default_rng(0)
    n_heads, head_dim, dim, pos = 2, 8, 16, 5
    wq, wk = rng.standard_normal((2, n_heads * head_dim, dim)).astype(np.float32)
    x_q, x_k = rng.standard_normal((2, dim)).astype(np.float32)
    freqs = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)

    def rope_interleaved(v, p):  # llama2.c: rotate (v[2i], v[2i+1]) by p * freqs[i]
        v = v.reshape(n_heads, head_dim // 2, 2)
        c, s = np.cos(p * freqs), np.sin(p * freqs)
        return np.stack([v[..., 0] * c - v[..., 1] * s, v[..., 0] * s + v[..., 1] * c], -1).reshape(n_heads, -1)

    def rope_halves(v, p):  # Hugging Face: rotate (v[i], v[i + hd/2]) by p * freqs[i]
        v = v.reshape(n_heads, 2, head_dim // 2)
        c, s = np.cos(p * freqs), np.sin(p * freqs)
        return np.concatenate([v[:, 0] * c - v[:, 1] * s, v[:, 0] * s + v[:, 1] * c], -1)

    ref = (rope_interleaved(wq @ x_q, pos) * rope_interleaved(wk @ x_k, 2)).sum(-1)
    hf_q = importer.interleaved_to_halves(wq, n_heads)
    hf_k = importer.interleaved_to_halves(wk, n_heads)
    got = (rope_halves(hf_q @ x_q, pos) * rope_halves(hf_k @ x_k, 2)).sum(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # head_dim 4 worked example from the docstring: rows [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    rows = np.arange(4, dtype=np.float32)[:, None]
    assert importer.interleaved_to_halves(rows, 1)[:, 0].tolist() == [0, 2, 1, 3]


def test_refuses_existing_output_and_bad_checkpoint(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        importer.import_llama2c(tmp_path / "missing.bin", tmp_path / "missing.model", out)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + b"\0" * 100)
    with pytest.raises(ValueError, match="implies"):
        importer.read_llama2c(bad)


@needs_stories
def test_import_writes_hf_llama_config(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 172, 5)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (8, 4, 512)
    assert config["tie_word_embeddings"] is True
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (10000.0, 1e-5, 512)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    from safetensors.numpy import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights
    assert sum(w.size for w in weights.values()) == 260_032
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    with pytest.raises(FileExistsError):
        importer.import_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.model", model_dir)


@needs_stories
def test_transformers_greedy_reproduces_known_story(hf_greedy):
    ids, tokenizer = hf_greedy
    assert len(ids) == 200
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith(KNOWN_GREEDY)


@needs_stories
def test_mlx_lm_greedy_equals_transformers(model_dir, hf_greedy):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(model_dir)
    ids = [int(t) for t, _ in generate_step(mx.array([1]), model, max_tokens=200)]
    assert ids == hf_greedy[0]
    assert tokenizer.encode(KNOWN_GREEDY) == [1] + hf_greedy[0][:15]


@needs_stories
def test_tokenizer_matches_sentencepiece(model_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts = [KNOWN_GREEDY, 'Tom said, "Let\'s go!"\nThey ran to the park.', "The café had 12 cakes.", "Zoë"]
    for text in texts:
        assert hf.encode(text) == [1] + sp.encode(text)
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == text


@needs_stories
def test_distill_data_round_trips_and_holds_out_prompts(model_dir, tmp_path):
    distill = _load_example("make_distill_data")
    out = tmp_path / "data"
    args = ["--model", str(model_dir), "--output", str(out), "--num-train", "12", "--num-heldout", "5",
            "--max-new-tokens", "24", "--batch-size", "16"]
    distill.main(args)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (out / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(heldout) == 5 and len(train) >= 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    prompt_ids = tokenizer(train[0]["prompt"])["input_ids"]
    full_ids = tokenizer(train[0]["prompt"] + train[0]["completion"])["input_ids"]
    with torch.no_grad():  # the completion is the model's own greedy continuation
        greedy = model.generate(torch.tensor([prompt_ids]), max_new_tokens=len(full_ids) - len(prompt_ids),
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy[0].tolist() == full_ids
    for row in train:
        assert set(row) == {"prompt", "completion"} and row["completion"]
        n_prompt = len(tokenizer(row["prompt"])["input_ids"])
        assert len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) - n_prompt <= 24
    with pytest.raises(SystemExit, match="--force"):
        distill.main(args)
