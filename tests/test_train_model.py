"""SpecStreamLM: parity with Hugging Face, visibility, targets, modes, save/load round trip."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig  # noqa: E402
from mlx_specstream.train import SpecStreamLM  # noqa: E402
from mlx_specstream.train import layout  # noqa: E402
from mlx_specstream.train.backbone import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from mlx_specstream.train.loss import specstream_loss  # noqa: E402
from mlx_specstream.train.tiny import TINY_VARIANTS, save_tiny_checkpoint, tiny_hf_model  # noqa: E402

torch.set_num_threads(1)
VOCAB = 259


def make(variant="llama", gamma=3, msa=2, mode="shared", lora=False, linear=True, pruning=True, seed=0):
    family = "opt" if variant.startswith("opt") else variant
    spec = SpecStreamConfig(
        num_streams=gamma, num_msa_layers=msa, mode=mode,
        stream_init="linear" if linear else "identity", stream_init_rank=4 if linear else None,
        pruning=PruningConfig(rank=4) if pruning else None,
        stream_lora=StreamLoRAConfig(rank=4, alpha=8.0, target_modules=DEFAULT_ATTENTION_TARGETS[family] + (
            ("fc1",) if family in ("opt", "phi") else ("down_proj",))) if lora else None)
    model = SpecStreamLM(tiny_hf_model(variant, seed=seed), spec, seed=seed).eval()
    # Non-zero adapters, as after training, so every path is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("stream_init.up", "pruning.up")) or name.endswith("lora_b"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def ids(B=2, T=9, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_main_logits_match_hugging_face(variant):
    model = make(variant, lora=True)
    x = ids()
    with torch.no_grad():
        out = model(x)
        ref = model.hf(x).logits
    assert out.main_logits.shape == (2, 9, VOCAB)
    assert out.stream_logits.shape == (2, 9, 3, VOCAB)
    assert out.prune_logits.shape == (2, 9, VOCAB)
    torch.testing.assert_close(out.main_logits, ref, rtol=0, atol=1e-5)


def _naive_stream_hidden(model, x, t, j):
    """Stream (t, j) recomputed alone: an ordinary causal pass over [M_0..M_t, S_t1..S_tj]."""
    bb = model.backbone
    T = x.shape[1]
    pos = torch.arange(T)[None].expand(x.shape[0], T)
    h = bb.embed(x, pos)
    mask = bb.attention_mask(layout.main_mask(torch.ones_like(x, dtype=torch.bool)), h.dtype)
    pe = bb.position_embeddings(h, pos)
    for layer in bb.layers[: model.msa_start]:
        h = bb.run_layer(layer, h, mask, pe, pos)
    M = h
    f = model.stream_init(M) if hasattr(model, "stream_init") else M
    S = f[:, t, None, :] + model.stream_embeddings[:j]  # [B, j, h]
    seq = torch.cat([M[:, : t + 1], S], 1)
    p = torch.cat([pos[:, : t + 1], pos[:, t:t + 1] + torch.arange(1, j + 1)], 1)
    m = bb.attention_mask(layout.main_mask(torch.ones(seq.shape[:2], dtype=torch.bool)), h.dtype)
    pe = bb.position_embeddings(seq, p)
    lora = getattr(model, "stream_lora", None)
    ctx = lora.streams_after(t + 1, seq.shape[1]) if lora is not None else torch.no_grad()
    with ctx:
        for layer in bb.layers[model.msa_start:]:
            seq = bb.run_layer(layer, seq, m, pe, p)
    return seq[:, -1]


@pytest.mark.parametrize("variant", ["llama", "qwen3", "phi", "opt_project"])
def test_each_stream_equals_a_plain_causal_pass_over_its_visible_tokens(variant):
    model = make(variant, lora=True)
    x = ids(T=6)
    with torch.no_grad():
        hid = model.forward_hidden(x)
        for t, j in [(0, 1), (2, 3), (5, 2), (3, 1)]:
            naive = _naive_stream_hidden(model, x, t, j)
            torch.testing.assert_close(hid.streams[:, t, j - 1], naive, rtol=0, atol=2e-5)


def _perturb_msa_input(model, rows):
    """A pre-hook on the first MSA layer adding noise to the given rows of the MSA layout."""
    layer = model.backbone.layers[model.msa_start]

    def hook(module, args, kwargs):
        x = args[0].clone()
        x[:, rows] += 3.0
        return (x,) + args[1:], kwargs

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("variant", ["llama", "phi", "opt"])
def test_visibility(variant):
    model = make(variant, lora=True)
    T, g = 6, 3
    x = ids(T=T)
    row = lambda t, j: T + t * g + (j - 1)  # noqa: E731
    with torch.no_grad():
        base = model(x)
        # later tokens do not change main (<= t) nor streams of t
        x2 = x.clone()
        x2[:, 4:] = (x2[:, 4:] + 7) % VOCAB
        other = model(x2)
        torch.testing.assert_close(other.main_logits[:, :4], base.main_logits[:, :4], rtol=0, atol=1e-5)
        torch.testing.assert_close(other.stream_logits[:, :4], base.stream_logits[:, :4], rtol=0, atol=1e-5)
        assert not torch.allclose(other.stream_logits[:, 4:], base.stream_logits[:, 4:])

        # the main stream ignores every stream token, exactly
        h = _perturb_msa_input(model, [row(t, j) for t in range(T) for j in range(1, g + 1)])
        out = model(x)
        h.remove()
        assert torch.equal(out.main_logits, base.main_logits)
        assert not torch.allclose(out.stream_logits, base.stream_logits)

        # other positions' streams and higher streams of the same position are invisible to (2, 2)
        h = _perturb_msa_input(model, [row(t, j) for t in (0, 1, 3, 4, 5) for j in range(1, g + 1)] + [row(2, 3)])
        out = model(x)
        h.remove()
        torch.testing.assert_close(out.stream_logits[:, 2, :2], base.stream_logits[:, 2, :2], rtol=0, atol=1e-5)
        assert not torch.allclose(out.stream_logits[:, 2, 2], base.stream_logits[:, 2, 2])

        # ...while a lower stream of the same position is visible (the test is not vacuous)
        h = _perturb_msa_input(model, [row(2, 1)])
        out = model(x)
        h.remove()
        assert not torch.allclose(out.stream_logits[:, 2, 1], base.stream_logits[:, 2, 1])


def test_padding_does_not_change_valid_positions():
    model = make("llama")
    x = ids(B=1, T=7)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        a, b = model(x), model(padded, attention_mask=mask)
    torch.testing.assert_close(b.main_logits[:, :7], a.main_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.stream_logits[:, :7], a.stream_logits, rtol=0, atol=1e-5)
    assert torch.isfinite(b.stream_logits).all()


def test_stream_j_at_t_is_scored_against_token_t_plus_1_plus_j():
    model = make("llama", gamma=2)
    x = torch.tensor([[257, 10, 11, 12, 13, 14, 15]])
    labels = torch.tensor([[-100, -100, -100, 12, 13, 14, 15]])  # tokens 3.. are the completion
    with torch.no_grad():
        logits = model(x)
        out = model(x, labels=labels)
    lp = lambda lg, tok: torch.log_softmax(lg, -1)[tok].item()  # noqa: E731
    # main at t predicts x[t+1] for t = 2..5; stream j at t predicts x[t+1+j] for t+1+j in 3..6
    main = -sum(lp(logits.main_logits[0, t], x[0, t + 1]) for t in range(2, 6))
    s1 = -sum(lp(logits.stream_logits[0, t, 0], x[0, t + 2]) for t in range(1, 5))
    s2 = -sum(lp(logits.stream_logits[0, t, 1], x[0, t + 3]) for t in range(0, 4))
    m = out.metrics
    assert m["main.count"].item() == 4 and m["stream1.count"].item() == 4 and m["stream2.count"].item() == 4
    for got, want in [(m["main.ce_sum"], main), (m["stream1.ce_sum"], s1), (m["stream2.ce_sum"], s2)]:
        assert got.item() == pytest.approx(want, rel=1e-5)
    expected = main / 4 + 0.1 * (s1 + s2) / 4 + 0.1 * m["prune.ce_sum"].item() / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_skipping_prompt_streams_gives_the_same_stream_states():
    model = make("qwen2", lora=True)
    x = ids(T=8)
    with torch.no_grad():
        full, part = model.forward_hidden(x), model.forward_hidden(x, stream_start=5)
    torch.testing.assert_close(part.streams, full.streams[:, 5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.main, full.main, rtol=0, atol=1e-5)


def _train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(5)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 10), generator=g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("variant", ["llama", "opt_project"])
def test_lossless_main_logits_bit_identical_after_training(variant):
    model = make(variant, mode="lossless", lora=True)
    model.hf.requires_grad_(False)
    base_state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    x = ids()
    with torch.no_grad():
        before = model(x)
    _train_steps(model)
    with torch.no_grad():
        after = model(x)
        fresh = SpecStreamLM(tiny_hf_model(variant, seed=0), SpecStreamConfig(num_streams=3, num_msa_layers=2)).eval()
        base = fresh(x)
    assert all(torch.equal(v, model.hf.state_dict()[k]) for k, v in base_state.items())
    assert torch.equal(after.main_logits, before.main_logits)
    assert torch.equal(after.main_logits, base.main_logits)  # the untouched base model, same code path
    assert not torch.allclose(after.stream_logits, before.stream_logits)
    assert not torch.allclose(after.prune_logits, before.prune_logits)


def test_shared_mode_changes_the_main_stream_and_pruning_never_does():
    model = make("llama")
    x = ids()
    with torch.no_grad():
        before = model(x).main_logits
    _train_steps(model)
    with torch.no_grad():
        assert not torch.allclose(model(x).main_logits, before)
    # the pruning loss alone gives no gradient to the base model or the streams
    model.train()
    hid = model.forward_hidden(x)
    targets = layout.stream_targets(x, 3)
    _, _ = specstream_loss(model, hid, targets)
    prune_loss = torch.nn.functional.cross_entropy(
        model.head(hid.prune, detach_weights=True).flatten(0, 1), x.flatten())
    model.zero_grad()
    prune_loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"pruning.down.weight", "pruning.up.weight"}


@pytest.mark.parametrize("variant,mode,lora,linear", [
    ("llama", "lossless", True, False),
    ("mistral", "shared", False, False),
    ("qwen2", "shared", False, True),
    ("qwen3", "lossless", True, True),
    ("phi", "shared", False, False),
    ("opt", "lossless", True, False),
    ("opt_project", "shared", False, True),
])
def test_save_load_round_trip_gives_identical_logits(tmp_path, variant, mode, lora, linear):
    from transformers import AutoModelForCausalLM

    model = make(variant, gamma=2, mode=mode, lora=lora, linear=linear)
    if mode == "lossless":
        model.hf.requires_grad_(False)
    _train_steps(model, steps=2)
    model.save_pretrained(tmp_path / variant)
    loaded = SpecStreamLM.from_pretrained(tmp_path / variant).eval()
    assert loaded.spec == model.spec
    x = ids()
    with torch.no_grad():
        a, b = model(x), loaded(x)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / variant).eval()(x).logits
    for k in ("main_logits", "stream_logits", "prune_logits"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    torch.testing.assert_close(b.main_logits, hf, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_tiny_checkpoints_have_no_trivially_zero_extras(tmp_path, variant):
    family = "opt" if variant.startswith("opt") else variant
    spec = SpecStreamConfig(num_streams=2, num_msa_layers=2, mode="lossless", stream_init="linear",
                            stream_init_rank=4, pruning=PruningConfig(rank=4),
                            stream_lora=StreamLoRAConfig(rank=4, target_modules=DEFAULT_ATTENTION_TARGETS[family]))
    path = save_tiny_checkpoint(variant, tmp_path / variant, copy.deepcopy(spec), seed=3, train_steps=2)
    loaded = SpecStreamLM.from_pretrained(path)
    assert loaded.spec == spec
    extras = loaded.extras_state_dict()
    assert "stream_lora.2.self_attn.q_proj.lora_a" in extras and "stream_init.up.weight" in extras
    assert all(v.abs().sum() > 0 for v in extras.values()), "an extra tensor is all zero"


def test_round_trip_of_an_in_memory_model(tmp_path):
    model = make("llama", mode="lossless", lora=True)
    model.save_pretrained(tmp_path / "m", config_updates={"prompt_template": "Q: {input}\nA:"})
    loaded = SpecStreamLM.from_pretrained(tmp_path / "m").eval()
    x = ids()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in ("main_logits", "stream_logits", "prune_logits"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["prompt_template"] == "Q: {input}\nA:"
    assert cfg["speculative_streaming"]["stream_lora"]["rank"] == 4


def test_bad_configurations_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        SpecStreamLM(tiny_hf_model("llama"), SpecStreamConfig(num_streams=2, num_msa_layers=5))
    with pytest.raises(ValueError, match="match no linear layer"):
        SpecStreamLM(tiny_hf_model("opt"), SpecStreamConfig(
            num_streams=2, num_msa_layers=1, mode="lossless", stream_lora=StreamLoRAConfig(target_modules=("o_proj",))))
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'"):
        SpecStreamLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)),
                     SpecStreamConfig(num_streams=1))
    plain = save_tiny_checkpoint("llama", tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'speculative_streaming' block"):
        SpecStreamLM.from_pretrained(plain)


def test_eager_attention_and_deepcopy_give_the_same_logits():
    model = make("llama", lora=True)
    x = ids()
    with torch.no_grad():
        ref = model(x)
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_b"):
                    p.zero_()  # the copy must not see this: its hooks use its own adapters
        got = clone(x)
        clone.hf.config._attn_implementation = "eager"
        eager = clone(x)
    assert torch.equal(got.stream_logits, ref.stream_logits)
    torch.testing.assert_close(eager.stream_logits, ref.stream_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(eager.main_logits, ref.main_logits, rtol=0, atol=1e-5)
