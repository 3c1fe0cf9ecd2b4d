"""Training at scale, the recipe: device selection, bfloat16/float16 runs, gradient accumulation
and gradient checkpointing (exact), token-budget batches, resume still bitwise."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from mlx_specstream.config import EXTRAS_FILE  # noqa: E402
from mlx_specstream.train import TrainArgs, run_training  # noqa: E402
from mlx_specstream.train.data import collate  # noqa: E402
from mlx_specstream.train_common.data import epoch_steps, token_batches  # noqa: E402
from mlx_specstream.train.dist import resolve_device  # noqa: E402
from mlx_specstream.train.loop import accumulate_gradients  # noqa: E402
from mlx_specstream.train.backbone import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from mlx_specstream.train.modes import prepare  # noqa: E402
from mlx_specstream.train_common.options import build_spec  # noqa: E402
from mlx_specstream.train.tiny import byte_tokenizer, save_tiny_checkpoint, tiny_hf_model  # noqa: E402

torch.set_num_threads(2)


def _jsonl(path, n=32):
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    rows = [{"prompt": f"Say: {words[i % 8]}{' again' * (i % 5)}\n",
             "completion": f"{words[i % 8]} {words[(i * 3) % 8]} {words[(i * 5) % 8]}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("base") / "llama", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")


def args(base, data, out, **kw):
    defaults = dict(model=str(base), data=str(data), output=str(out), streams=2, msa_layers=2, batch_size=4,
                    max_steps=3, lr=5e-3, max_length=64, progress=False, num_threads=2)
    defaults.update(kw)
    return TrainArgs(**defaults)


# ---- --device ---------------------------------------------------------------------------------

def test_auto_device_picks_cuda_then_mps_then_cpu(monkeypatch):
    import mlx_specstream.train.dist as dist_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_mod, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(dist_mod, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device must be one of"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_cuda_without_cuda_is_a_clear_error(tmp_path, base, data, capsys):
    import typer

    from mlx_specstream.cli import common
    from mlx_specstream.cli.train import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    code = common.run_app(app, ["train", "--model", str(base), "--data", str(data), "--output", str(tmp_path / "o"),
                                "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: --device cuda: PyTorch sees no CUDA device"), err
    assert not (tmp_path / "o").exists()


# ---- --dtype ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,mode,lora_rank", [("bfloat16", "shared", 4), ("float16", "lossless", 4),
                                                  ("bfloat16", "shared", 0)])
def test_low_precision_runs_train_and_save_in_the_base_dtype(tmp_path, base, data, dtype, mode, lora_rank):
    from safetensors.torch import load_file

    want = getattr(torch, dtype)
    result = run_training(args(base, data, tmp_path / "o", mode=mode, lora_rank=lora_rank, dtype=dtype,
                               max_steps=2, save_every=1))
    assert result.metrics["train"]["loss"] == result.metrics["train"]["loss"]  # not NaN
    saved = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {want}
    assert {v.dtype for v in load_file(str(tmp_path / "o" / EXTRAS_FILE)).values()} == {want}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == dtype
    # resume checkpoints hold the float32 trainables (and the optimizer state over them)
    ck = load_file(str(tmp_path / "o.checkpoints" / "step-00000001" / "trainable.safetensors"))
    assert ck and {v.dtype for v in ck.values()} == {torch.float32}
    if mode == "lossless":  # the frozen base is saved untouched
        before = load_file(str(base / "model.safetensors"))
        assert all(torch.equal(before[k].to(want), saved[k]) for k in before)


def test_low_precision_model_holds_frozen_weights_low_and_trainables_in_float32(base):
    from mlx_specstream.train.loop import load_for_training, spec_for
    from mlx_specstream.config import read_config

    a = args(base, base / "config.json", "unused", dtype="bfloat16", lora_rank=4)
    model, _ = load_for_training(a, spec_for(a, read_config(str(base))))
    kinds = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert kinds == {(True, torch.float32), (False, torch.bfloat16)}


# ---- gradient accumulation and checkpointing: exact -----------------------------------------------

def _model(mode="shared", lora_rank=4):
    tok = byte_tokenizer()
    hf = tiny_hf_model("llama", tokenizer=tok)
    spec = build_spec(num_layers=4, mode=mode, streams=3, msa_layers=2, pruning_rank=4,
                      default_targets=DEFAULT_ATTENTION_TARGETS["llama"])
    model, _ = prepare(hf, spec, lora_rank=lora_rank, lora_alpha=None, lora_targets=None, seed=0)
    return model.train(), spec


def _examples(n=6):
    from mlx_specstream.train_common.data import TokenizedExample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        T = 9 + 3 * i
        ids = torch.randint(0, 256, (T,), generator=g).tolist()
        labels = [-100] * (2 + i % 3) + ids[2 + i % 3:]
        out.append(TokenizedExample(ids, labels))
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,lora_rank", [("shared", 4), ("lossless", 4)])
def test_accumulated_micro_batches_give_the_big_batch_gradient(mode, lora_rank):
    model, spec = _model(mode, lora_rank)
    ex = _examples(6)
    kw = dict(num_streams=3, pruning=True)
    model.zero_grad(set_to_none=True)
    big_loss, big_metrics = accumulate_gradients(model, [collate(ex, 256)], **kw)
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    micro_loss, micro_metrics = accumulate_gradients(model, [collate(ex[:1], 256), collate(ex[1:4], 256),
                                                             collate(ex[4:], 256)], **kw)
    micro = _grads(model)
    assert micro_loss == pytest.approx(big_loss, rel=1e-6)
    assert micro_metrics == pytest.approx(big_metrics, rel=1e-6)
    assert big.keys() == micro.keys() and len(big) > 3
    for name in big:
        torch.testing.assert_close(micro[name], big[name], rtol=1e-5, atol=1e-7, msg=name)
    # and the big batch's loss is the model's own loss over it
    with torch.no_grad():
        assert model(**collate(ex, 256)).loss.item() == pytest.approx(big_loss, rel=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model, _ = _model("shared", 4)
    batch = collate(_examples(4), 256)
    out = []
    for grad_checkpoint in (False, True):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, grad_checkpoint=grad_checkpoint).loss
        loss.backward()
        out.append((loss.detach(), _grads(model)))
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8, msg=name)


def test_a_run_with_accumulation_matches_one_with_the_big_batch(tmp_path, base, data):
    """batch 4 x 1 step == batch 2 x 2 micro-batches: the same examples per step (epoch_steps cuts
    each big batch), the same gradients, so after a step the same weights (to float rounding)."""
    a = run_training(args(base, data, tmp_path / "a", batch_size=4, max_steps=1, lr=1e-3, grad_clip=0.0))
    b = run_training(args(base, data, tmp_path / "b", batch_size=2, grad_accumulation_steps=2, max_steps=1,
                          lr=1e-3, grad_clip=0.0))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    assert b.metrics["train"]["loss"] == pytest.approx(a.metrics["train"]["loss"], rel=1e-5)


def test_resume_is_bitwise_with_accumulation_checkpointing_and_token_batches(tmp_path, base, data, monkeypatch):
    from mlx_specstream.train import loop as loop_mod

    kw = dict(max_steps=4, save_every=2, lora_rank=4, grad_accumulation_steps=2, grad_checkpoint=True,
              batch_tokens=96, batch_size=2)
    full = run_training(args(base, data, tmp_path / "full", **kw))
    calls = {"n": 0}
    real = loop_mod.collate

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # 2 micro-batches a step: during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "collate", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_training(args(base, data, tmp_path / "cut", **kw))
    monkeypatch.setattr(loop_mod, "collate", real)
    assert [p.name for p in (tmp_path / "cut.checkpoints").iterdir()] == ["step-00000002"]
    with pytest.raises(ValueError, match=r"\['grad_accumulation_steps'\] differ"):
        run_training(args(base, data, tmp_path / "cut", resume=True, **dict(kw, grad_accumulation_steps=1)))
    resumed = run_training(args(base, data, tmp_path / "cut", resume=True, **kw))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- batches ------------------------------------------------------------------------------------

def test_token_batches_fill_a_budget_and_cover_every_example():
    lengths = [5 + (i * 37) % 60 for i in range(300)]
    batches = token_batches(lengths, 256, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(len(b) * max(lengths[i] for i in b) <= 256 for b in batches)
    fill = sum(len(b) * max(lengths[i] for i in b) for b in batches) / (256 * len(batches))
    assert fill > 0.8  # sorted windows: batches are nearly full
    assert token_batches(lengths, 256, seed=1, epoch=0) == batches  # deterministic
    assert token_batches(lengths, 256, seed=1, epoch=1) != batches


def test_epoch_steps_cut_big_batches_into_micro_batches():
    lengths = [10 + i % 7 for i in range(40)]
    one = epoch_steps(lengths, batch_size=8, seed=0, epoch=0)
    two = epoch_steps(lengths, batch_size=4, seed=0, epoch=0, accumulation=2)
    assert len(one) == len(two) == 5
    for big, micro in zip(one, two):
        assert len(big) == 1 and len(micro) == 2 and sorted(big[0]) == sorted(micro[0] + micro[1])
    ranks = epoch_steps(lengths, batch_size=4, seed=0, epoch=0, world_size=2, accumulation=2, batch_tokens=48)
    assert len(ranks) % 2 == 0 and all(len(s) == 2 for s in ranks)
