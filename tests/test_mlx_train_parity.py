"""The MLX trainer against the PyTorch trainer: for the same initial weights (a trainer-written
tiny checkpoint and its MLX conversion) and the same batch, the loss and the gradient of every
stream parameter agree within float32 tolerance, per family (lossless mode)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the train extra

import mlx.core as mx  # noqa: E402

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig  # noqa: E402
from mlx_specstream.convert import convert  # noqa: E402
from mlx_specstream.loading import load_model  # noqa: E402
from mlx_specstream.mlx_train import Options, batch_loss, count_targets  # noqa: E402
from mlx_specstream.mlx_train.data import IGNORE_INDEX  # noqa: E402
from mlx_specstream.mlx_train.params import canonical_names, freeze_for_lossless  # noqa: E402
from mlx_specstream.train.model import SpecStreamLM  # noqa: E402
from mlx_specstream.train.tiny import save_tiny_checkpoint  # noqa: E402


def _spec(variant: str) -> SpecStreamConfig:
    targets = ("qkv_proj", "o_proj", "down_proj") if variant == "phi3" else ("q_proj", "v_proj", "o_proj", "up_proj")
    linear = variant == "llama"
    return SpecStreamConfig(num_streams=3, num_msa_layers=2, mode="lossless", pruning=PruningConfig(rank=4),
                            stream_lora=StreamLoRAConfig(rank=4, alpha=8.0, target_modules=targets),
                            stream_init="linear" if linear else "identity", stream_init_rank=4 if linear else None)


def _batch():
    """Two rows of 24 tokens (past phi3's 16 original positions and gemma3's window of 8), the
    second 19 long (right padding); prompts of 5 and 3 tokens."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 256, size=(2, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 19:] = 0
    ids[1, 19:] = 256  # pad
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    return ids, mask, labels


@pytest.mark.parametrize("variant", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_loss_and_stream_gradients_match_pytorch(variant, tmp_path):
    src = save_tiny_checkpoint(variant, tmp_path / "pt", _spec(variant), seed=1)
    convert(src, tmp_path / "mlx")
    ids, mask, labels = _batch()

    ref = SpecStreamLM.from_pretrained(src)
    ref.hf.requires_grad_(False)  # lossless: the base is frozen
    ref.train()
    out = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    want = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.requires_grad}

    model, _ = load_model(tmp_path / "mlx")
    freeze_for_lossless(model)
    if variant == "gemma3_text":
        # mlx-lm rounds Gemma's sqrt(hidden) embedding scale to bfloat16 (5.65625), transformers keeps
        # the float32 weights' 5.65685: a 1e-4 model difference (stream gradients 5e-5 apart) that is
        # not the trainers'. Compare the trainers on the same scale.
        model.family.embed_scale = mx.array(float(ref.hf.model.embed_tokens.embed_scale), mx.float32)
    counts = count_targets([labels.astype(np.int32)], model.num_streams, model.has_pruning)
    loss, metrics, grads = batch_loss(model, ids.astype(np.int32), labels.astype(np.int32), counts,
                                      Options(chunk_size=5))
    np.testing.assert_allclose(loss.item(), out.loss.item(), rtol=2e-6)
    for name in ("main", "stream1", "stream3", "prune"):
        np.testing.assert_allclose(metrics[f"{name}.ce_sum"].item(), out.metrics[f"{name}.ce_sum"].item(), rtol=1e-5)
        assert metrics[f"{name}.correct"].item() == out.metrics[f"{name}.correct"].item()

    got = canonical_names(model, grads)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    assert any(k.startswith("stream_lora.") for k in got)
    for k, w in want.items():
        g = np.array(got[k])
        scale = np.abs(w).max()
        assert scale > 0, f"{variant} {k}: zero reference gradient"
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * scale, err_msg=f"{variant} {k}")


@pytest.mark.parametrize("variant", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_shared_mode_loss_and_gradients_match_pytorch(variant, tmp_path):
    """Shared mode: peft LoRA (PyTorch) and mlx-lm's LoRALinear (MLX) with the same factors."""
    from peft import LoraConfig, get_peft_model

    from mlx_specstream.mlx_train.shared import attach_shared_lora, freeze_for_shared

    targets = ["qkv_proj", "o_proj"] if variant == "phi3" else ["q_proj", "v_proj", "o_proj"]
    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2, mode="shared", pruning=PruningConfig(rank=4))
    src = save_tiny_checkpoint(variant, tmp_path / "pt", spec, seed=2)
    convert(src, tmp_path / "mlx")
    ids, mask, labels = _batch()

    ref = SpecStreamLM.from_pretrained(src)
    get_peft_model(ref.hf, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets, bias="none"))
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for name, p in ref.named_parameters():
        if ".lora_B." in name:  # non-zero b, so every factor gets a gradient
            p.data = torch.randn(p.shape, generator=gen) * 0.1
        if ".lora_" in name:
            layer_path = name.split(".layers.", 1)[1]  # "{i}.self_attn.q_proj.lora_A.default.weight"
            key = layer_path.replace(".lora_A.default.weight", ".lora_a").replace(".lora_B.default.weight", ".lora_b")
            factors[name] = "stream_lora." + key  # canonical_names' spelling of base LoRA factors
    ref.train()
    out = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    want = {factors.get(k, k): p.grad.numpy().T if k in factors else p.grad.numpy()
            for k, p in ref.named_parameters() if p.requires_grad}

    model, _ = load_model(tmp_path / "mlx")
    attach_shared_lora(model, 4, 8.0, targets, seed=0)
    weights = {factors[k]: p.detach().numpy().T for k, p in ref.named_parameters() if k in factors}
    layer_prefix = "base.model.layers."
    model.load_weights([(layer_prefix + k[len("stream_lora."):], mx.array(v)) for k, v in weights.items()], strict=False)
    freeze_for_shared(model)
    if variant == "gemma3_text":  # see test_loss_and_stream_gradients_match_pytorch
        model.family.embed_scale = mx.array(float(ref.hf.model.embed_tokens.embed_scale), mx.float32)
    counts = count_targets([labels.astype(np.int32)], model.num_streams, model.has_pruning)
    loss, _, grads = batch_loss(model, ids.astype(np.int32), labels.astype(np.int32), counts, Options(chunk_size=5))
    np.testing.assert_allclose(loss.item(), out.loss.item(), rtol=2e-6)
    got = canonical_names(model, grads)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, w in want.items():
        scale = np.abs(w).max()
        assert scale > 0, f"{variant} {k}: zero reference gradient"
        np.testing.assert_allclose(np.array(got[k]), w, rtol=0, atol=2e-5 * scale, err_msg=f"{variant} {k}")


def test_same_padded_batches_and_stream_targets_as_the_pytorch_trainer():
    """Both trainers tokenize and order batches with one copy (train_common.data); what each
    builds from it, the padded batch and the per-stream targets, must agree."""
    from mlx_specstream.datasets import Example
    from mlx_specstream.mlx_train import data as mlx_data
    from mlx_specstream.train import data as pt_data
    from mlx_specstream.train import layout as pt_layout
    from mlx_specstream.train.tiny import byte_tokenizer
    from mlx_specstream.train_common.data import tokenize_all

    tok = byte_tokenizer()
    examples = [Example(prompt="Q: 2+2?", completion=" A: 4"), Example(prompt="Tell a story.", completion=" Once."),
                Example(prompt="x", completion=" a longer completion than the others")]
    tokenized, dropped = tokenize_all(tok, examples, 32)
    assert dropped == 0
    ids, labels = mlx_data.collate(tokenized, pad_id=0)
    pt = pt_data.collate(tokenized, pad_id=0)
    np.testing.assert_array_equal(ids, pt["input_ids"].numpy())
    np.testing.assert_array_equal(labels, pt["labels"].numpy())
    assert (labels != mlx_data.IGNORE_INDEX).sum() > 0 and (labels == mlx_data.IGNORE_INDEX).sum() > 0
    for gamma in (1, 3):
        np.testing.assert_array_equal(mlx_data.stream_targets(labels, gamma),
                                      pt_layout.stream_targets(pt["labels"], gamma).numpy())
