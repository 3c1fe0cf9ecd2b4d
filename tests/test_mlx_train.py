"""The MLX trainer, lossless mode: the chunked forward equals all_logits, its gradients equal the
whole-sequence loss's, accumulation is exact, training keeps the main stream bit-identical, a run
writes a directory the runtime loads, resume continues exactly, a 4-bit base trains."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.loading import load_model, save_model
from mlx_specstream.mlx_train import Options, batch_loss, chunked_logits, count_targets, step_gradients, train
from mlx_specstream.mlx_train import loop as mlx_loop
from mlx_specstream.mlx_train.data import IGNORE_INDEX, stream_targets
from mlx_specstream.mlx_train.params import canonical_names, freeze_for_lossless
from mlx_specstream.testing import random_model, tiny_config, write_tiny_model_dir, write_tiny_tokenizer

FAMILIES = ("llama", "qwen3", "gemma3_text", "phi3")


def _spec(family: str, linear: bool = False) -> SpecStreamConfig:
    targets = ("qkv_proj", "o_proj") if family == "phi3" else ("q_proj", "v_proj", "o_proj")
    return SpecStreamConfig(num_streams=3, num_msa_layers=2, mode="lossless", pruning=PruningConfig(rank=4),
                            stream_lora=StreamLoRAConfig(rank=4, alpha=8.0, target_modules=targets),
                            stream_init="linear" if linear else "identity", stream_init_rank=4 if linear else None)


def _model(family: str, linear: bool = False):
    model = random_model(tiny_config(family, vocab_size=64), _spec(family, linear), seed=3)
    if linear:  # random_model leaves a zero ``up``? make every extra non-trivial
        assert float(mx.abs(model.stream_init.up.weight).max()) > 0
    return model


def _batch(t: int = 20, vocab: int = 64):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(3, t)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, t - 6:] = IGNORE_INDEX  # a shorter row (right padding)
    labels[2, :9] = IGNORE_INDEX
    return ids, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_forward_equals_all_logits(family):
    model = _model(family, linear=family == "llama")
    tokens = mx.array(_batch(20)[0])  # 20 > gemma3's window of 8
    want = model.all_logits(tokens)
    for chunk, prefill in ((3, 7), (64, 512)):
        got = chunked_logits(model, tokens, chunk=chunk, prefill_chunk=prefill)
        for name, g, w in zip(("main", "stream", "pruning"), got, want):
            np.testing.assert_allclose(np.array(g), np.array(w), rtol=0, atol=1e-5, err_msg=f"{family} {name}")


def _reference_loss(model, ids, labels, counts, prune_weight=0.1):
    """Rule 10 over all_logits (the [S, S] pass), normalised by ``counts``."""
    main, streams, prune = model.all_logits(mx.array(ids))
    tgt = stream_targets(labels, model.num_streams)
    weights = model.spec.weights()
    total = mx.array(0.0)
    parts = [("main", main, tgt[..., 0], weights[0])]
    if prune is not None:
        parts.append(("prune", prune, tgt[..., 0], prune_weight))
    parts += [(f"stream{j}", streams[:, :, j - 1], tgt[..., j], weights[j]) for j in range(1, model.num_streams + 1)]
    for name, logits, y, w in parts:
        valid = y != IGNORE_INDEX
        ce = nn.losses.cross_entropy(logits, mx.array(np.where(valid, y, 0)))
        total = total + w * (ce * mx.array(valid)).sum() / counts[name]
    return total


def assert_chunked_equals_whole_sequence(model, ids, labels, counts, option_sets) -> list[dict]:
    """batch_loss under each of ``option_sets``: the loss and every trainable gradient equal those
    of the whole-sequence reference (float32, 1e-5); returns each run's gradients by name."""
    want_loss, want = nn.value_and_grad(model, lambda m: _reference_loss(m, ids, labels, counts))(model)
    want = canonical_names(model, want)
    out = []
    for opts in option_sets:
        loss, _, grads = batch_loss(model, ids, labels, counts, opts)
        assert abs(loss.item() - want_loss.item()) < 1e-5
        got = canonical_names(model, grads)
        assert set(got) == set(want)
        for k in want:
            scale = float(mx.abs(want[k]).max())
            assert scale > 0, k
            np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=0, atol=1e-5 * max(1.0, scale),
                                       err_msg=k)
        out.append(got)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_chunked_gradients_equal_whole_sequence_loss(family):
    model = _model(family, linear=True)
    freeze_for_lossless(model)
    ids, labels = _batch(20)
    counts = count_targets([labels], model.num_streams, True)
    option_sets = (Options(chunk_size=4, prefill_chunk=8), Options(chunk_size=5, head_rows=7, grad_checkpoint=True))
    for got in assert_chunked_equals_whole_sequence(model, ids, labels, counts, option_sets):
        assert any(k.startswith("stream_lora.") for k in got)


def test_gradient_accumulation_equals_one_large_batch():
    model = _model("qwen3")
    freeze_for_lossless(model)
    ids, labels = _batch(20)
    opts = Options(chunk_size=6)
    loss1, sums1, counts1, g1 = step_gradients(model, [(ids, labels)], opts)
    micro = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    loss2, sums2, counts2, g2 = step_gradients(model, micro, opts)
    assert counts1 == counts2
    assert abs(loss1 - loss2) < 1e-5
    g1, g2 = canonical_names(model, g1), canonical_names(model, g2)
    for k in g1:
        np.testing.assert_allclose(np.array(g2[k]), np.array(g1[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def _write_data(path, n=24):
    """Stories of a repeating pattern, so streams can learn the next tokens."""
    rng = np.random.default_rng(0)
    words = ["ab", "cd", "ef", "gh"]
    with open(path, "w") as f:
        for i in range(n):
            k = int(rng.integers(0, 4))
            text = " ".join(words[(k + j) % 4] for j in range(12))
            f.write(json.dumps({"prompt": f"{i % 3}:", "completion": " " + text}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx_train")
    base = write_tiny_model_dir(root / "base", "llama", spec=None, hidden_size=32, num_hidden_layers=3)
    data = _write_data(root / "train.jsonl")
    result = train(base, data, root / "out", mode="lossless", streams=2, msa_layers=2, lora_rank=4,
                   epochs=4, lr=1e-2, batch_size=4, eval_examples=4, log_every=2, progress=False, seed=0)
    return root, base, data, result


def test_training_lowers_the_stream_loss_and_writes_a_loadable_directory(trained):
    from mlx_specstream import load

    root, base, _, result = trained
    first, last = result.metrics["initial_eval"], result.metrics["eval"]
    assert last["stream1.loss"] < first["stream1.loss"] - 0.5
    assert last["stream2.loss"] < first["stream2.loss"] - 0.5
    assert abs(last["main.loss"] - first["main.loss"]) < 1e-6  # the frozen main stream
    for name in ("config.json", "speculative_streams.safetensors", "train_metrics.json", "training_args.json",
                 "train_log.jsonl", "tokenizer.json"):
        assert (result.output_dir / name).is_file(), name
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["speculative_streaming"]["mode"] == "lossless"
    assert config["prompt_template"] == "{input}"
    # base weights unchanged (the same bytes)
    assert (result.output_dir / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()

    model, _ = load(str(result.output_dir))
    plain, _ = load_model(base)
    tokens = mx.array([[5, 9, 33, 97, 98, 32, 99, 100, 32, 101]])
    assert mx.array_equal(model(tokens), plain(tokens)).item()  # bit-identical main stream
    assert mx.array_equal(model.base(tokens), plain.base(tokens)).item()
    prompt = mx.array([48, 58, 32, 97, 98, 32], dtype=mx.int32)
    spec_ids = [t for s in generate_step(model, prompt, max_tokens=30, tree="2,1") for t in s.tokens][:30]
    ar = [t for s in generate_step(model, prompt, max_tokens=30, speculate=False) for t in s.tokens][:30]
    assert spec_ids == ar


def test_only_extras_train(trained):
    model = trained[3].model
    from mlx.utils import tree_flatten

    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(not k.startswith("base.") or k.endswith((".lora_a", ".lora_b")) for k in names)


def test_resume_continues_exactly(trained, tmp_path, monkeypatch):
    root, base, data, _ = trained
    kw = dict(mode="lossless", streams=2, msa_layers=2, lora_rank=4, epochs=2, max_steps=4, lr=1e-2, batch_size=4,
              save_every=2, progress=False, seed=1, grad_accumulation_steps=2)
    straight = train(base, data, tmp_path / "a", **kw)
    calls = {"n": 0}
    real = mlx_loop.step_gradients

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mlx_loop, "step_gradients", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(base, data, tmp_path / "b", **kw)
    monkeypatch.setattr(mlx_loop, "step_gradients", real)
    assert (tmp_path / "b.checkpoints" / "step-00000002" / "state.json").is_file()
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="differ"):
        train(base, data, tmp_path / "b", resume=True, **dict(kw, lr=2e-2))
    resumed = train(base, data, tmp_path / "b", resume=True, **kw)
    a = mx.load(str(straight.output_dir / "speculative_streams.safetensors"))
    b = mx.load(str(resumed.output_dir / "speculative_streams.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=0, atol=1e-7, err_msg=k)
    with pytest.raises(FileExistsError):
        train(base, data, tmp_path / "b", **kw)


def four_bit_base(tmp_path, num_hidden_layers: int):
    """A random 4-bit llama model directory (group size 32) with the tiny tokenizer, at tmp_path/q4."""
    config = tiny_config("llama", hidden_size=64, num_hidden_layers=num_hidden_layers)
    model = random_model(config, None, seed=0)
    nn.quantize(model.base, group_size=32, bits=4)
    tok = tmp_path / "tok"
    tok.mkdir()
    write_tiny_tokenizer(tok)
    return save_model(model, config, tmp_path / "q4", tokenizer_dir=tok, quantization={"group_size": 32, "bits": 4})


def test_four_bit_base_trains(tmp_path):
    base = four_bit_base(tmp_path, 3)
    data = _write_data(tmp_path / "train.jsonl")
    result = train(base, data, tmp_path / "out", mode="lossless", streams=2, msa_layers=1, lora_rank=4,
                   epochs=3, lr=1e-2, batch_size=4, eval_examples=4, progress=False)
    assert result.metrics["eval"]["stream1.loss"] < result.metrics["initial_eval"]["stream1.loss"] - 0.5
    trained_model, _ = load_model(result.output_dir)
    plain, _ = load_model(base)
    assert "scales" in trained_model.base.layers[0].self_attn.q_proj
    tokens = mx.array([[5, 9, 33, 97, 98, 32, 99]])
    assert mx.array_equal(trained_model(tokens), plain(tokens)).item()
    prompt = mx.array([48, 58, 32, 97, 98], dtype=mx.int32)
    spec_ids = [t for s in generate_step(trained_model, prompt, max_tokens=20, tree="2,1") for t in s.tokens][:20]
    ar = [t for s in generate_step(trained_model, prompt, max_tokens=20, speculate=False) for t in s.tokens][:20]
    assert spec_ids == ar


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_export_writes_a_mid_run_checkpoint_as_a_model_directory(trained, tmp_path, mode):
    """`specstream export` on an MLX checkpoint: the checkpoint's tensors under the convention's
    names, a directory the runtime loads, lossless output in lossless mode."""
    from mlx.utils import tree_unflatten

    from mlx_specstream import load
    from mlx_specstream.cli.main import main

    _, base, data, _ = trained
    result = train(base, data, tmp_path / "run", mode=mode, streams=2, msa_layers=2, lora_rank=4, max_steps=4,
                   save_every=2, lr=1e-2, batch_size=4, progress=False, eval_examples=4, eval_every=2)
    step = tmp_path / "run.checkpoints" / "step-00000002"
    assert main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "x")]) == 0
    assert main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "x")]) != 0  # no overwrite
    exported = mx.load(str(tmp_path / "x" / "speculative_streams.safetensors"))
    final = mx.load(str(result.output_dir / "speculative_streams.safetensors"))
    saved = mx.load(str(step / "trainable.safetensors"))
    want = canonical_names(result.model, tree_unflatten(list(saved.items())))
    if mode == "shared":  # LoRA is fused into the base weights; the extras are the rest
        want = {k: v for k, v in want.items() if not k.startswith("stream_lora.")}
    assert set(exported) == set(want) == set(final)
    for k, v in want.items():
        assert mx.array_equal(exported[k], v).item(), k
    assert any(not mx.array_equal(exported[k], final[k]).item() for k in final)  # step 2, not the end
    records = json.loads((tmp_path / "x" / "training_args.json").read_text())
    assert records["step"] == 2 and records["exported_from"] == str(step) and records["backend"] == "mlx"
    model, _ = load(str(tmp_path / "x"))
    assert model.spec.mode == mode
    prompt = mx.array([48, 58, 32, 97, 98, 32], dtype=mx.int32)
    spec_ids = [t for s in generate_step(model, prompt, max_tokens=24, tree="2,1") for t in s.tokens][:24]
    ar = [t for s in generate_step(model, prompt, max_tokens=24, speculate=False) for t in s.tokens][:24]
    assert spec_ids == ar
    if mode == "lossless":
        plain, _ = load_model(base)
        tokens = mx.array([[5, 9, 33, 97, 98, 32, 99, 100]])
        assert mx.array_equal(model(tokens), plain(tokens)).item()
    else:
        assert (tmp_path / "x" / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes()
