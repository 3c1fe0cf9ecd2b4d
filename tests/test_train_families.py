"""The trainer on the families beyond llama/mistral/qwen/phi/opt: Qwen3-MoE, Gemma 3, Phi-3,
OLMo 2, llama3 rope scaling and SmolLM3, plus sliding-window layers (Gemma 3, Phi-3, SmolLM3,
Mistral with a window).

Tiny random models from each family's own config class (see ``tiny.MORE_VARIANTS``), CPU float32.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_specstream.config import SpecStreamConfig, StreamLoRAConfig  # noqa: E402
from mlx_specstream.train import SpecStreamLM  # noqa: E402
from mlx_specstream.train import layout  # noqa: E402
from mlx_specstream.train.backbone import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from mlx_specstream.train.tiny import MORE_VARIANTS, tiny_hf_model  # noqa: E402

torch.set_num_threads(1)
VOCAB = 259
WINDOWED = {"gemma3_text": 8, "phi3_window": 10, "smollm3": 8, "mistral_window": 8, "qwen2_window": 8}
VARIANTS = MORE_VARIANTS + ("mistral_window", "qwen2_window")


def hf_model(variant, seed=0):
    if variant == "mistral_window":  # every layer windowed (no layer_types)
        return tiny_hf_model("mistral", seed=seed, sliding_window=8)
    if variant == "qwen2_window":  # use_sliding_window: layers >= max_window_layers are windowed
        return tiny_hf_model("qwen2", seed=seed, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                             layer_types=["full_attention"] * 2 + ["sliding_attention"] * 2)
    if variant == "phi3_window":  # Phi-3's all-layer window (mlx-lm's phi3 ignores it: the trainer only)
        return tiny_hf_model("phi3", seed=seed, sliding_window=10)
    if variant == "gemma3_softcap":  # final logit soft-capping (null in real Gemma 3 checkpoints)
        return tiny_hf_model("gemma3_text", seed=seed, final_logit_softcapping=30.0)
    return tiny_hf_model(variant, seed=seed)


def make(variant, gamma=3, msa=2, mode="shared", lora=True, seed=0):
    hf = hf_model(variant, seed)
    spec = SpecStreamConfig(
        num_streams=gamma, num_msa_layers=msa if gamma else 0, mode=mode,
        stream_init="linear" if gamma else "identity", stream_init_rank=4 if gamma else None,
        stream_lora=StreamLoRAConfig(rank=4, alpha=8.0, target_modules=DEFAULT_ATTENTION_TARGETS[hf.config.model_type])
        if lora and gamma else None)
    model = SpecStreamLM(hf, spec, seed=seed).eval()
    with torch.no_grad():  # non-zero adapters, as after training
        for name, p in model.named_parameters():
            if name.startswith("stream_init.up") or name.endswith("lora_b"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def ids(B=2, T=24, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- main stream == Hugging Face ---------------------------------------------------------

@pytest.mark.parametrize("gamma", [0, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_main_logits_match_hugging_face_past_the_window(variant, gamma):
    model = make(variant, gamma=gamma)
    x = ids(T=24)  # longer than every window (8 or 10) and than phi3's original 16 positions
    with torch.no_grad():
        out = model(x)
        ref = model.hf(x).logits
    torch.testing.assert_close(out.main_logits, ref, rtol=0, atol=1e-4)
    if gamma:
        assert out.stream_logits.shape == (2, 24, gamma, VOCAB)
        assert torch.isfinite(out.stream_logits).all()


@pytest.mark.parametrize("variant", ["gemma3_text", "phi3_window"])
def test_windows_are_not_vacuous(variant):
    """Dropping the windows changes the logits: the parity above really checks them."""
    model = make(variant, gamma=0)
    x = ids(T=24)
    with torch.no_grad():
        ref = model.hf(x).logits
        bb = model.backbone
        bb.layer_windows = (None,) * bb.num_layers
        unwindowed = model(x).main_logits
    assert not torch.allclose(unwindowed[:, WINDOWED[variant]:], ref[:, WINDOWED[variant]:], atol=1e-3)
    torch.testing.assert_close(unwindowed[:, :WINDOWED[variant]], ref[:, :WINDOWED[variant]], rtol=0, atol=1e-4)


def test_gemma3_has_scaled_embedding_softcap_and_two_rope_tables():
    model = make("gemma3_softcap")
    bb = model.backbone
    assert bb.final_logit_softcapping == 30.0
    assert set(bb.rope_keys) == {"sliding_attention", "full_attention"}
    x = ids(T=24)
    with torch.no_grad():
        out = model(x)
    assert out.main_logits.abs().max() < 30.0 and out.stream_logits.abs().max() < 30.0
    pe = bb.position_embeddings(bb.embed(x, layout.default_positions(torch.ones_like(x, dtype=torch.bool))),
                                torch.arange(24)[None])
    assert not torch.allclose(pe["sliding_attention"][0], pe["full_attention"][0])


def test_phi3_longrope_table_is_chosen_by_the_main_tokens():
    """T = 14 main tokens use the short factors (14 <= 16 original positions); the streams reach
    position 16, which alone would switch HF's longrope to the long factors. The main stream must
    stay equal to HF's, so the MSA rows use the table the main tokens chose."""
    model = make("phi3")
    x = ids(T=14)
    with torch.no_grad():
        out = model(x)
        ref = model.hf(x).logits
    torch.testing.assert_close(out.main_logits, ref, rtol=0, atol=1e-4)


def test_qwen3_moe_router_outputs_do_not_break_the_forward():
    model = make("qwen3_moe")
    model.hf.config.output_router_logits = True
    x = ids(T=12)
    model.train()
    out = model(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.stream_embeddings.grad is not None
    model.eval()
    with torch.no_grad():
        hf_out = model.hf(x)
        ours = model(x).main_logits
    assert hf_out.aux_loss is not None  # HF's own forward still records its router logits
    torch.testing.assert_close(ours, hf_out.logits, rtol=0, atol=1e-4)


# ---- streams == a sequential recomputation -------------------------------------------------

def _window_allowed(pos, n_main, window):
    """Causal mask of the sequence [M_0..M_t, S_t1..S_tj] with the window rule, written out
    independently of the trainer: query q sees earlier-or-equal keys k; a main key only when
    pos[q] - pos[k] < window."""
    L = len(pos)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(q + 1):
            if k >= n_main or window is None or pos[q] - pos[k] < window:
                allowed[q, k] = True
    return allowed[None, None]


def _sequential_stream_hidden(model, x, t, j):
    """Stream (t, j) recomputed alone over its visible tokens [M_0..M_t, S_t1..S_tj]."""
    bb = model.backbone
    B, T = x.shape
    pos = torch.arange(T)[None].expand(B, T)
    h = bb.embed(x, pos)
    pe = bb.position_embeddings(h, pos)  # also picks a longrope table from the main tokens
    for i in range(model.msa_start):
        mask = bb.attention_mask(_window_allowed(list(range(T)), T, bb.layer_windows[i]), h.dtype)
        h = bb.run_layer(i, h, mask, pe, pos)
    M = h
    f = model.stream_init(M) if hasattr(model, "stream_init") else M
    seq = torch.cat([M[:, : t + 1], f[:, t, None, :] + model.stream_embeddings[:j]], 1)
    p = list(range(t + 1)) + [t + k for k in range(1, j + 1)]
    pt = torch.tensor(p)[None].expand(B, len(p))
    pe = bb.position_embeddings(seq, pt, frozen=True)
    lora = getattr(model, "stream_lora", None)
    with lora.streams_after(t + 1, seq.shape[1]):
        for i in range(model.msa_start, bb.num_layers):
            mask = bb.attention_mask(_window_allowed(p, t + 1, bb.layer_windows[i]), seq.dtype)
            seq = bb.run_layer(i, seq, mask, pe, pt)
    return seq[:, -1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_stream_equals_a_sequential_pass_over_its_visible_tokens(variant):
    model = make(variant, msa=3)
    x = ids(T=24)
    with torch.no_grad():
        hid = model.forward_hidden(x)
        for t, j in [(0, 1), (5, 3), (13, 2), (20, 3), (23, 1)]:
            seq = _sequential_stream_hidden(model, x, t, j)
            torch.testing.assert_close(hid.streams[:, t, j - 1], seq, rtol=0, atol=5e-5)


def test_gemma3_streams_of_one_position_alone_equal_the_full_pass():
    """Only position t's streams present (prefix x[:t+1], stream_start = t) gives the same stream
    states as the full parallel pass: streams of other positions are invisible, past the window too."""
    model = make("gemma3_text", msa=3)
    x = ids(T=24)
    with torch.no_grad():
        full = model.forward_hidden(x)
        for t in (9, 17, 23):
            alone = model.forward_hidden(x[:, : t + 1], stream_start=t)
            torch.testing.assert_close(alone.streams[:, 0], full.streams[:, t], rtol=0, atol=5e-5)
            torch.testing.assert_close(alone.main, full.main[:, : t + 1], rtol=0, atol=5e-5)


def _perturb_msa_input(model, rows):
    layer = model.backbone.layers[model.msa_start]

    def hook(module, args, kwargs):
        x = args[0].clone()
        x[:, rows] += 3.0
        return (x,) + args[1:], kwargs

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_gemma3_stream_window_is_relative_to_t_plus_j():
    """One MSA layer (layer 3, sliding, window 8). Stream (t, j) sits at position t + j and sees
    main position p <= t iff (t + j) - p < 8; main q sees p iff q - p < 8."""
    model = make("gemma3_text", msa=1)
    assert model.backbone.layer_windows[model.msa_start] == 8
    T, w = 24, 8
    x = ids(T=T)
    with torch.no_grad():
        base = model(x)
        for p in (6, 9, 12, 15):
            h = _perturb_msa_input(model, [p])
            out = model(x)
            h.remove()
            for t in range(T):
                for j in range(1, 4):
                    changed = not torch.allclose(out.stream_logits[:, t, j - 1], base.stream_logits[:, t, j - 1],
                                                 rtol=0, atol=1e-6)
                    assert changed == (p <= t and (t + j) - p < w), (p, t, j)
                changed = not torch.allclose(out.main_logits[:, t], base.main_logits[:, t], rtol=0, atol=1e-6)
                assert changed == (p <= t and t - p < w), (p, t)


@pytest.mark.parametrize("variant", ["gemma3_text", "smollm3"])
def test_left_padding_matches_hugging_face(variant):
    model = make(variant)
    x = ids(T=24)
    valid = torch.ones(2, 24, dtype=torch.long)
    valid[0, :5] = 0
    pos = layout.default_positions(valid.bool())
    with torch.no_grad():
        ours = model(x, attention_mask=valid).main_logits
        ref = model.hf(x, attention_mask=valid, position_ids=pos).logits
    torch.testing.assert_close(ours[valid.bool()], ref[valid.bool()], rtol=0, atol=1e-4)


def test_gemma3_right_padding_does_not_change_valid_positions():
    model = make("gemma3_text")
    x = ids(B=1, T=20)
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        a, b = model(x), model(padded, attention_mask=mask)
    torch.testing.assert_close(b.main_logits[:, :20], a.main_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.stream_logits[:, :20], a.stream_logits, rtol=0, atol=1e-5)


# ---- training ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["shared", "lossless"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_training_step_changes_the_stream_embeddings(variant, mode):
    model = make(variant, mode=mode, lora=mode == "lossless")
    if mode == "lossless":
        model.hf.requires_grad_(False)
    x = ids(T=20, seed=3)
    with torch.no_grad():
        before_main = model(x).main_logits
    emb = model.stream_embeddings.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    labels = x.clone()
    labels[:, :5] = -100  # a prompt
    out = model(x, labels=labels)
    assert torch.isfinite(out.loss)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    model.eval()
    assert not torch.allclose(model.stream_embeddings, emb)
    with torch.no_grad():
        after_main = model(x).main_logits
    if mode == "lossless":
        assert torch.equal(after_main, before_main)
    else:
        assert not torch.allclose(after_main, before_main)


@pytest.mark.parametrize("variant", ["gemma3_text", "phi3", "qwen3_moe"])
def test_save_load_round_trip(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    model = make(variant, gamma=2, mode="lossless")
    model.save_pretrained(tmp_path / variant)
    loaded = SpecStreamLM.from_pretrained(tmp_path / variant).eval()
    assert loaded.spec == model.spec
    x = ids(T=12)
    with torch.no_grad():
        a, b = model(x), loaded(x)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / variant).eval()(x).logits
    for k in ("main_logits", "stream_logits"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.main_logits, hf, rtol=0, atol=1e-4)


def test_eager_attention_gives_the_same_logits():
    model = make("gemma3_text")
    x = ids(T=24)
    with torch.no_grad():
        ref = model(x)
        clone = copy.deepcopy(model)
        clone.hf.config._attn_implementation = "eager"
        eager = clone(x)
        hf_eager = clone.hf(x).logits
    torch.testing.assert_close(eager.stream_logits, ref.stream_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(eager.main_logits, hf_eager, rtol=0, atol=1e-4)


def test_bidirectional_gemma_is_rejected():
    hf = tiny_hf_model("gemma3_text")
    hf.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="bidirectional"):
        SpecStreamLM(hf, SpecStreamConfig(num_streams=1, num_msa_layers=1))


@pytest.mark.parametrize("variant", ["phi3", "gemma3_text", "qwen3_moe", "olmo2"])
def test_shared_mode_peft_lora_on_the_default_targets(variant):
    """Shared mode's peft LoRA on each family's attention projections (phi3: qkv_proj, o_proj)
    trains, merges into plain HF weights, and the merged model's main stream equals HF's."""
    from mlx_specstream.train.modes import prepare
    from mlx_specstream.train_common.options import build_spec

    hf = hf_model(variant)
    spec = build_spec(num_layers=4, mode="shared", streams=2, msa_layers=2)
    model, peft_model = prepare(hf, spec, lora_rank=4, lora_alpha=None, lora_targets=None, seed=0)
    targets = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
               if p.requires_grad and ".lora_A." in n}
    assert targets == set(DEFAULT_ATTENTION_TARGETS[hf.config.model_type])
    x = ids(T=20, seed=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(x)
        peft_model.merge_and_unload()
        after = model(x)
        ref = model.hf(x).logits
    torch.testing.assert_close(after.main_logits, before.main_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(after.main_logits, ref, rtol=0, atol=1e-4)
